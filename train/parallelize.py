"""Apply the native engine's parallelism to a `train.model.Transformer`, over a 2-D mesh.

`parallelize(model, mesh, cfg, device)` runs, in this order:

1. `apply_tp`       tensor parallel over mesh["tp"] (DTensor plans on the raw module names);
2. `apply_ac`       activation checkpointing, one wrapper per block;
3. `apply_compile`  torch.compile, one per block;
4. `apply_fsdp`     FSDP2 over mesh["dp"], per block then the root, or
   `apply_ddp`      DDP over mesh["dp"].

Each later step wraps what the earlier one produced, so the order is fixed: TP plans name
the blocks' own submodules, which wrapping would hide; checkpointing a compiled block would
recompute outside the compiled graph; and FSDP must see the final parameters (the DTensors
TP made) and the final per-block modules to group its all-gathers by block.

Also here, for the training loop: `grad_sync` (gradient accumulation), `clip_grad_norm_`
(any mix of plain and DTensor gradients), `autocast` and `resolve_mixed_precision`.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from train.config import ModelConfig, ParallelConfig
from train.model import Transformer, ffn_hidden_dim
from train.precision import resolve_mixed_precision

log = logging.getLogger(__name__)


def parallelize(model: Transformer, mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Return `model` tensor-parallel over mesh["tp"] and data-parallel over mesh["dp"].

    The mesh's sizes are the truth (cfg.dp and cfg.tp may still read -1). The model may be
    on the meta device; FSDP and TP leave it there, DDP needs real parameters.
    """
    dp, tp = mesh["dp"].size(), mesh["tp"].size()
    if tp > 1:
        apply_tp(model, mesh["tp"], cfg.sequence_parallel)
    elif cfg.sequence_parallel:
        log.warning("sequence_parallel has no effect without tensor parallel (tp=1)")
    if cfg.activation_checkpointing == "full":
        apply_ac(model)
    if cfg.compile:
        apply_compile(model)
    if dp == 1:
        return model
    if cfg.data_parallel == "fsdp":
        apply_fsdp(model, mesh["dp"], resolve_mixed_precision(cfg, device), cfg.fsdp_reshard_after_forward)
        return model
    return apply_ddp(model, mesh["dp"], device)


def validate_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError unless every dimension TP splits divides evenly by `tp`."""
    splits = {
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "ffn hidden size": ffn_hidden_dim(cfg),
        "vocab_size": cfg.vocab_size,
    }
    for what, size in splits.items():
        if size % tp:
            raise ValueError(
                f"tensor parallel degree tp={tp} must divide {what}={size} of model {cfg.name} "
                f"(each rank holds {what}/tp); pick a tp that divides "
                f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, "
                f"ffn hidden size={ffn_hidden_dim(cfg)} and vocab_size={cfg.vocab_size}"
            )


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool) -> None:
    """Megatron-style tensor parallel: shard the matmuls of every block over tp_mesh.

    wq/wk/wv and w1/w3 are split by output column (each rank gets whole heads / a slice of
    the hidden units), wo and w2 by input row, so each block needs one all-reduce forward
    (attention) and one (feed-forward). The embedding is split over the vocabulary, the
    output projection too, and its logits are gathered (Replicate) so the loss sees them all.
    Both are sharded Shard(0) over vocab, so a tied weight stays one DTensor (re-tied below).

    With sequence_parallel, the norms and the residual stream are sharded over the sequence
    (Shard(1)) between the blocks' matmuls: the all-reduces become reduce-scatter/all-gather
    pairs and norm activations take 1/tp of the memory.

    Runs first: the plans address the blocks' own submodules, which later wrappers would hide.
    """
    validate_tp(model.cfg, tp_mesh.size())
    residual = Shard(1) if sequence_parallel else Replicate()
    parallelize_module(model, tp_mesh, {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Replicate(), use_local_output=True),
        **({"norm": SequenceParallel()} if sequence_parallel else {}),
    })
    for block in model.layers.values():
        plan = {
            "attention.wq": ColwiseParallel(),
            "attention.wk": ColwiseParallel(),
            "attention.wv": ColwiseParallel(),
            "attention.wo": RowwiseParallel(output_layouts=residual),
            "feed_forward.w1": ColwiseParallel(),
            "feed_forward.w3": ColwiseParallel(),
            "feed_forward.w2": RowwiseParallel(output_layouts=residual),
        }
        if sequence_parallel:
            plan.update({
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                # Attention and feed-forward see the whole sequence: gather it at their entry.
                # (x, cos, sin, mask): the document mask is per sample, the same on every TP rank.
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
                ),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
    if model.cfg.tie_embeddings:
        # Each plan replaced its module's weight with its own new DTensor; share one again.
        model.output.weight = model.tok_embeddings.weight


def apply_ac(model: Transformer) -> None:
    """Recompute each block's activations in backward instead of keeping them (full AC).

    Wraps every block in place inside `model.layers`, so parameter names gain a
    `_checkpoint_wrapped_module.` part that `state_dict()` and DCP strip again. Runs after
    TP (whose plans need the unwrapped names) and before compile and FSDP, so the compiled
    graph and FSDP's per-block hooks contain the recomputation.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    for name, block in model.layers.items():
        model.layers[name] = checkpoint_wrapper(block)


def apply_compile(model: Transformer) -> None:
    """torch.compile each block separately: blocks share one shape, so they share one graph.

    Runs after AC (the checkpoint then lives inside the compiled graph) and before FSDP,
    whose all-gather and reduce-scatter hooks stay outside the compiled regions.
    """
    for name, block in model.layers.items():
        model.layers[name] = torch.compile(block)


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, mixed_precision: str, reshard_after_forward: bool) -> None:
    """FSDP2: shard parameters, gradients and optimizer state over dp_mesh.

    One `fully_shard` per block, so each block's parameters are all-gathered just before it
    runs and freed after, then one on the root for the embedding, final norm and output.
    Runs last: it must see the DTensors TP made (it shards them further, 2-D) and the final
    per-block modules. Under bf16, parameters are gathered in bf16 and gradients reduced in
    fp32 (the sharded master weights stay fp32).
    """
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    last = str(len(model.layers) - 1)
    for name, block in model.layers.items():
        # Backward starts with the last block, so freeing its gathered parameters after
        # forward would only gather them again at once.
        fully_shard(block, mesh=dp_mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward and name != last)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """Wrap in DDP over dp_mesh's process group: every rank keeps all parameters.

    DDP broadcasts rank 0's parameters at construction, so ranks start equal. Buffers are
    not broadcast each step: the only ones are the RoPE tables, computed alike everywhere.
    Parameter names gain a `module.` prefix, which DCP's state-dict helpers strip.
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "data_parallel=ddp needs materialised parameters (DDP broadcasts rank 0's weights at "
            "construction); build the model on the device and init_weights() before parallelize, "
            "or use data_parallel=fsdp to build it on the meta device"
        )
    return DistributedDataParallel(
        model,
        process_group=dp_mesh.get_group(),
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
    )


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool) -> Iterator[None]:
    """Within the block, reduce gradients across data-parallel ranks only if `enabled`.

    For gradient accumulation: run all micro-batches but the last with enabled=False (the
    forward and backward both inside the block, as DDP's no_sync requires), so gradients
    accumulate locally and are reduced once. A plain or TP-only model has nothing to skip.
    """
    if enabled:
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float) -> float:
    """Scale all gradients so their global 2-norm is at most max_norm; return that norm (before clipping).

    max_norm <= 0 only measures (clipping off, as optim.grad_clip_norm=0 means).

    Works for plain, DDP, FSDP2, TP and 2-D models: DTensor gradients are grouped by mesh and
    placements (one norm and one collective per group, as DTensor math cannot mix meshes),
    plain gradients are taken as identical on every rank (DDP all-reduced them; under TP
    they belong to replicated modules). The result is the same float on every rank.
    """
    groups: dict[object, list[torch.Tensor]] = {}
    for p in model.parameters():
        if p.grad is None:
            continue
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p.grad)
    if not groups:
        return 0.0
    squares = []
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().pow(2))
    total = torch.stack([s.to(squares[0].device) for s in squares]).sum().sqrt().item()
    coef = max_norm / (total + 1e-6)
    if max_norm > 0 and coef < 1.0:
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
