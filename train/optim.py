"""AdamW and its learning-rate schedule (linear warm-up, cosine decay).

The schedule is a pure function of the step, so resuming needs only the step number: there
is no scheduler object whose state could drift from the optimizer's. Both engines use it: the
DeepSpeed engine gets no DeepSpeed scheduler, its optimizer's lr is set from here every step.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from train.config import OptimConfig


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Weight decay on matrices only (not on norms), as in GPT-2/Llama recipes.

    Both engines build AdamW from these groups (the DeepSpeed engine hands them to
    `deepspeed.initialize` as its model parameters), so decay applies to the same tensors. A
    ZeRO-3 parameter built under zero.Init holds an empty tensor between uses: its full shape
    is `ds_shape`.
    """
    if cfg.name != "adamw":
        raise ValueError(f"optim.name={cfg.name!r} is not supported; use optim=adamw")
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (decay if len(getattr(param, "ds_shape", param.shape)) >= 2 else no_decay).append(param)
    return [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over `param_groups` (the native engine's optimizer), fused: one kernel per
    parameter group on the device instead of torch's default (a loop of small kernels per
    tensor on the CPU, foreach kernels on CUDA).

    Both devices the harness runs on (cpu, cuda) have the fused kernel. It keeps its step count
    on the device, so bias correction reads nothing on the host (foreach and the loop read a
    host step count each step), and it takes `found_inf`, the gate with which the native
    engine skips a non-finite step on the device (`NativeEngine.step`): foreach has no gate.
    """
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             eps=cfg.eps, fused=True)


def learning_rate(step: int, cfg: OptimConfig, max_steps: int) -> float:
    """LR for optimizer step `step` (1-based): warm-up to cfg.lr, then cosine to lr*min_ratio."""
    if cfg.warmup_steps > 0 and step <= cfg.warmup_steps:
        return cfg.lr * step / cfg.warmup_steps
    decay_steps = cfg.decay_steps if cfg.decay_steps > 0 else max(1, max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
