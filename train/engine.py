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
neither `python -m train.run` nor the native engine ever imports deepspeed. The native engine
under a pipeline (`train.pipeline.PipelineEngine`, parallel.pp > 1) is `pipelined`: the schedule
orders every micro-batch's forward and backward across the stages, so the loop hands it the
whole step at once (`engine.train_step(inputs, targets, documents)`, then `engine.step`), and
evaluates through `engine.eval_loss`.

A checkpoint records which engine wrote it (`engine` in its COMMITTED marker; markers from
before that key existed are native), and `check_engine` refuses the other engine's
checkpoints with one line: the two formats hold the same state but are not interchangeable.
"""

from __future__ import annotations

import contextlib
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict
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
STATE_DICT_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)  # see ModelAndOptimizer


class EngineUnavailable(RuntimeError):
    """The chosen engine cannot run on this machine (its package is missing)."""


class Engine(ABC):
    """What the loop needs from an engine: forward through `model`, backward, step, checkpoints."""

    name: str
    model: nn.Module  # called for forward (train and eval); .train()/.eval() switch its mode
    pipelined = False  # True: the step's micro-batches run together through pipeline stages (train.pipeline)
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
    """Model and optimizer as one DCP entry ("model", "optim"), with fully-qualified names any
    engine agrees on. The model may be the pipeline stages a rank runs (`train.pipeline`), each
    with its optimizer: a stage keeps the whole model's parameter names, and the optimizer state
    is flattened (one entry per parameter and key: "state.<name>.exp_avg", "param_groups.<name>.lr"),
    so the same keys are written and read whichever stages, ranks or shards hold the parameters.

    Checkpoints written before pipeline parallel hold the optimizer's parameter groups as a list
    ("param_groups.0.params", ...): `match_checkpoint` (called by `Checkpointer.load` with the
    keys the checkpoint holds) reads those in their own format where one module holds the whole
    model; the next save writes the flattened format."""

    LEGACY_KEY = "optim.param_groups.0.params"  # only the per-group format has it

    def __init__(self, model: nn.Module | list[nn.Module],
                 optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer]) -> None:
        self.models = model if isinstance(model, list) else [model]
        self.optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
        self.flatten = True

    def match_checkpoint(self, name: str, saved: set[str], url: str) -> None:
        """Read the checkpoint's optimizer format (`saved`: its keys; this entry is `name`)."""
        self.flatten = f"{name}.{self.LEGACY_KEY}" not in saved
        if not self.flatten and len(self.models) > 1:
            raise CheckpointError(
                f"checkpoint {url} was written before pipeline parallel (its optimizer state is kept per "
                f"parameter group), so pipeline stages cannot take their share of it: resume it once with "
                f"parallel.pp=1 and save (checkpoint.interval, or trainer.stop_after_steps); checkpoints "
                f"written from then on load with any parallel.pp")

    def state_dict(self) -> dict[str, Any]:
        model: dict[str, Any] = {}
        optim: dict[str, Any] = {}
        options = STATE_DICT_OPTIONS if self.flatten else StateDictOptions()
        for module, optimizer in zip(self.models, self.optimizers, strict=True):
            model_sd, optim_sd = get_state_dict(module, optimizer, options=options)
            model.update(model_sd)
            optim.update(optim_sd)
        return {"model": model, "optim": optim}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # each stage takes its own names from the union (DCP read exactly the keys state_dict() named)
        options = StateDictOptions(flatten_optimizer_state_dict=self.flatten, strict=len(self.models) == 1)
        for module, optimizer in zip(self.models, self.optimizers, strict=True):
            set_state_dict(module, optimizer, model_state_dict=state_dict["model"],
                           optim_state_dict=state_dict["optim"], options=options)


class NativeEngine(Engine):
    """torch.distributed's DDP, FSDP2 and TP (as `train.parallelize` applied them), AdamW.

    Checkpoints are DCP through the Checkpointer, so they reshard on load: any native layout
    and any world size reads them. `train.pipeline.PipelineEngine` is this engine over several
    modules (the pipeline stages of a rank), one optimizer each.
    """

    name = NATIVE

    def __init__(self, model: nn.Module | list[nn.Module],
                 optimizer: torch.optim.Optimizer | list[torch.optim.Optimizer], parallel: ParallelConfig,
                 device: torch.device, grad_clip_norm: float,
                 pp_group: dist.ProcessGroup | None = None) -> None:
        self.parts = model if isinstance(model, list) else [model]
        self.optimizers = optimizer if isinstance(optimizer, list) else [optimizer]
        self.model = self.parts[0] if len(self.parts) == 1 else nn.ModuleList(self.parts)
        self.parallel, self.device, self.grad_clip_norm, self.pp_group = parallel, device, grad_clip_norm, pp_group
        # tensorwise float8 under FSDP all-gathers float8 weights: their scales are computed for
        # all parameters at once after each step (one all-reduce), not per parameter per gather
        self._float8_fsdp_scales = parallel.float8 == "tensorwise" and isinstance(self.parts[0], FSDPModule)

    def autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self.parallel, self.device)

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        return grad_sync(self.parts[0], enabled=sync,
                         fsdp_reduce_per_micro_batch=self.parallel.fsdp_reduce_per_micro_batch)

    def backward(self, loss: torch.Tensor) -> None:
        with backward_context():
            loss.backward()

    def step(self, loss_finite: torch.Tensor) -> torch.Tensor:
        grad_norm = clip_grad_norm_(self.parts, self.grad_clip_norm, self.pp_group)
        # The fused AdamW kernel's own gate (GradScaler's found_inf): 1 leaves parameters,
        # moments and the step count as they were, decided on the device.
        found_inf = (~(loss_finite & torch.isfinite(grad_norm))).float()
        with implicit_replication(), self._own_section():  # found_inf: a plain tensor beside DTensor parameters
            for optimizer in self.optimizers:
                optimizer.found_inf = found_inf
                optimizer.step()  # each rank's own parameters or shards: no collective
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)
        if self._float8_fsdp_scales:
            from torchao.float8 import precompute_float8_dynamic_scale_for_fsdp

            for part in self.parts:
                precompute_float8_dynamic_scale_for_fsdp(part)
        return grad_norm

    @property
    def forward_waits_for_peers(self) -> bool:
        # FSDP2 and TP make parameters DTensors: FSDP all-gathers them, TP reduces activations
        return any(isinstance(p, DTensor) for p in self.model.parameters())

    def set_lr(self, lr: float) -> None:
        for optimizer in self.optimizers:
            set_learning_rate(optimizer, lr)

    @property
    def lr(self) -> float:
        return self.optimizers[0].param_groups[0]["lr"]

    def save(self, checkpointer: Checkpointer, step: int, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        checkpointer.save(step, {"app": ModelAndOptimizer(self.parts, self.optimizers), **extra}, meta)

    def load(self, checkpointer: Checkpointer, info: CheckpointInfo, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        checkpointer.load(info, {"app": ModelAndOptimizer(self.parts, self.optimizers), **extra}, meta)
