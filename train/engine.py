"""The engine interface the training loop drives, and the native engine behind it.

The loop (train/trainer.py) is the same for every engine. Per optimizer step it does:

    engine.set_lr(lr)                                   # the harness's schedule, a function of step
    for each micro-batch:
        with engine.accumulate(sync=last), engine.autocast():
            loss = loss_fn(engine.model(inputs)) / n    # the loop averages over micro-batches
            engine.backward(loss)
    grad_norm = engine.step(finite)                     # clip, optimizer step, zero gradients

and saves and loads through `engine.save` / `engine.load`, handing over the loop's own
Stateful objects (progress, data position) to be stored beside the weights.

Two engines implement it: `NativeEngine` here (DDP, FSDP2, TP over torch.distributed; DCP
checkpoints through storage.checkpoint.Checkpointer) and `train.deepspeed_engine.DeepSpeedEngine`
(ZeRO-1/2/3; DeepSpeed's own checkpoint format), which is imported only when chosen so that
neither `python -m train.run` nor the native engine ever imports deepspeed.

A checkpoint records which engine wrote it (`engine` in its COMMITTED marker; markers from
before that key existed are native), and `check_engine` refuses the other engine's
checkpoints with one line: the two formats hold the same state but are not interchangeable.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.distributed.tensor.experimental import implicit_replication

from storage.checkpoint import Checkpointer, CheckpointError, CheckpointInfo
from train.config import ParallelConfig
from train.optim import set_learning_rate
from train.parallelize import backward_context, clip_grad_norm_, cross_entropy, grad_sync
from train.precision import autocast

NATIVE, DEEPSPEED = "native", "deepspeed"


class EngineUnavailable(RuntimeError):
    """The chosen engine cannot run on this machine (its package is missing)."""


class Engine(ABC):
    """What the loop needs from an engine: forward through `model`, backward, step, checkpoints."""

    name: str
    model: nn.Module  # called for forward (train and eval); .train()/.eval() switch its mode
    own_time: Any = None  # the loop's train.stragglers.OwnTime: the engine times its local optimizer update into it

    @property
    def forward_waits_for_peers(self) -> bool:
        """Whether the forward has collectives (gathers weights, reduces activations), so that its
        time on one rank includes waiting for the others (train/stragglers.py leaves it out)."""
        return False

    def _own_section(self) -> contextlib.AbstractContextManager:
        return self.own_time.section() if self.own_time is not None else contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        """Around forward: the engine's mixed precision, if it is done by autocast."""
        return contextlib.nullcontext()

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's forward and backward; gradients are reduced over ranks only
        when `sync` (the last micro-batch of the step)."""
        return contextlib.nullcontext()

    def loss(self, logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The next-token loss of `model`'s logits (`train.parallelize.cross_entropy`: vocabulary-
        parallel where tensor parallel left the logits sharded): the mean, or per token ("none")."""
        return cross_entropy(logits, targets, reduction)

    @abstractmethod
    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradients of `loss` (already divided by the micro-batches per step)."""

    @abstractmethod
    def step(self, loss_finite: torch.Tensor) -> torch.Tensor:
        """Clip to optim.grad_clip_norm, apply the optimizer, zero the gradients; return the
        global gradient norm before clipping: a 0-d fp32 tensor on the device, the same on
        every rank, which the loop reads only at log steps.

        `loss_finite` (0-d bool on the device, the same on every rank) says whether the step's
        loss was finite. The native engine applies the update only where it and the gradient
        norm are both finite, decided on the device (no host read): otherwise weights and
        optimizer state stay as they were (trainer.on_nonfinite_loss=skip relies on it; with
        stop, the run stops at its next log step with the weights of the last finite step).
        DeepSpeed steps its own optimizer and always applies (skip is refused at start-up)."""

    @abstractmethod
    def set_lr(self, lr: float) -> None:
        """The learning rate of the next `step`, for every parameter group."""

    @property
    @abstractmethod
    def lr(self) -> float:
        """The learning rate in use, for the metrics."""

    @abstractmethod
    def save(self, checkpointer: Checkpointer, step: int, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        """Write weights, optimizer state, `extra` and RNG as checkpoint `step`; commit it once
        every rank's files are complete."""

    @abstractmethod
    def load(self, checkpointer: Checkpointer, info: CheckpointInfo, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        """Restore what `save` wrote (`extra` in place). `check_engine` has already passed."""


def check_engine(info: CheckpointInfo, meta: dict[str, Any], parallel_name: str) -> None:
    """Refuse a checkpoint of the other engine, in one line that says what to do instead."""
    saved = info.meta.get("engine", NATIVE)  # markers written before the key existed are native
    wanted = meta["engine"]
    if saved == wanted:
        return
    if saved == DEEPSPEED:
        stage = info.meta.get("zero_stage", "?")
        raise CheckpointError(
            f"checkpoint {info.url} was written by the DeepSpeed engine (ZeRO-{stage}); this run "
            f"uses the native engine (parallel={parallel_name}), which cannot read DeepSpeed's "
            f"format: resume with parallel=zero{stage}, or start a new checkpoint.url")
    raise CheckpointError(
        f"checkpoint {info.url} was written by the native engine (DCP); this run uses the "
        f"DeepSpeed engine (parallel={parallel_name}), which cannot read it: resume with the "
        f"native engine (parallel=ddp, fsdp, tp or fsdp_tp), or start a new checkpoint.url")


class ModelAndOptimizer(Stateful):
    """Model and optimizer as one DCP entry, with fully-qualified names any engine agrees on."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                       optim_state_dict=state_dict["optim"])


class NativeEngine(Engine):
    """torch.distributed's DDP, FSDP2 and TP (as `train.parallelize` applied them), AdamW.

    Checkpoints are DCP through the Checkpointer, so they reshard on load: any native layout
    and any world size reads them.
    """

    name = NATIVE

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, parallel: ParallelConfig,
                 device: torch.device, grad_clip_norm: float) -> None:
        self.model, self.optimizer = model, optimizer
        self.parallel, self.device, self.grad_clip_norm = parallel, device, grad_clip_norm
        # tensorwise float8 under FSDP all-gathers float8 weights: their scales are computed for
        # all parameters at once after each step (one all-reduce), not per parameter per gather
        self._float8_fsdp_scales = parallel.float8 == "tensorwise" and isinstance(model, FSDPModule)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.parallel, self.device)

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        return grad_sync(self.model, enabled=sync, fsdp_reduce_per_micro_batch=self.parallel.fsdp_reduce_per_micro_batch)

    def backward(self, loss: torch.Tensor) -> None:
        with backward_context():
            loss.backward()

    def step(self, loss_finite: torch.Tensor) -> torch.Tensor:
        grad_norm = clip_grad_norm_(self.model, self.grad_clip_norm)
        # The fused AdamW kernel's own gate (GradScaler's found_inf): 1 leaves parameters,
        # moments and the step count as they were, decided on the device.
        self.optimizer.found_inf = (~(loss_finite & torch.isfinite(grad_norm))).float()
        with implicit_replication(), self._own_section():  # found_inf: a plain tensor beside DTensor parameters
            self.optimizer.step()  # each rank's own parameters or shards: no collective
        self.optimizer.zero_grad(set_to_none=True)
        if self._float8_fsdp_scales:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            precompute_float8_dynamic_scale_for_fsdp(self.model)
        return grad_norm

    @property
    def forward_waits_for_peers(self) -> bool:
        # FSDP2 and TP make parameters DTensors: FSDP all-gathers them, TP reduces activations
        return any(isinstance(p, DTensor) for p in self.model.parameters())

    def set_lr(self, lr: float) -> None:
        set_learning_rate(self.optimizer, lr)

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def save(self, checkpointer: Checkpointer, step: int, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        checkpointer.save(step, {"app": ModelAndOptimizer(self.model, self.optimizer), **extra}, meta)

    def load(self, checkpointer: Checkpointer, info: CheckpointInfo, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        checkpointer.load(info, {"app": ModelAndOptimizer(self.model, self.optimizer), **extra}, meta)
