"""Mixed precision: what `parallel.mixed_precision` means on a device, and the autocast around forward.

Shared by both engines (the native engine's FSDP2 policy and autocast, DeepSpeed's bf16 section),
so neither engine module imports the other.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist

from train.config import ParallelConfig


def resolve_mixed_precision(cfg: ParallelConfig, device: torch.device) -> str:
    """"bf16" or "fp32" for cfg.mixed_precision on this device ("auto": bf16 on CUDA, else fp32)."""
    if cfg.mixed_precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return str(cfg.mixed_precision)


def autocast(cfg: ParallelConfig, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast around forward when bf16 is asked for and FSDP does not already do it.

    FSDP2 casts its gathered parameters through its MixedPrecisionPolicy, so it needs no
    autocast; DDP, TP-only and single-process models get torch.autocast. fp32: nothing.
    cfg.dp/cfg.tp may read -1; they are then resolved like the mesh is (world size / (pp x tp)).
    """
    if resolve_mixed_precision(cfg, device) != "bf16" or _fsdp_applied(cfg):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _fsdp_applied(cfg: ParallelConfig) -> bool:
    """Whether `parallelize` wraps in FSDP for this config: data_parallel=fsdp and dp > 1."""
    if cfg.data_parallel != "fsdp":
        return False
    dp = cfg.dp
    if dp < 1:
        world = dist.get_world_size() if dist.is_initialized() else 1
        tp = cfg.tp if cfg.tp >= 1 else int(os.environ.get("LOCAL_WORLD_SIZE", world))
        dp = world // (tp * cfg.pp)
    return dp > 1
