"""Pipeline parallel in the native engine (parallel.pp > 1), on torch.distributed.pipelining.

The model is built as without a pipeline (seeded whole, or on the meta device), then `cut` into
the stages this rank runs (`train.stages` says which layers and which stages): each stage is the
same `Transformer` with the other blocks deleted from its ModuleDict, the embedding only on the
first stage and norm and output only on the last, so its parameters keep the whole model's names
and DCP checkpoints do not depend on the split. Each stage is then parallelized over dp and tp
exactly as a whole model is (`train.parallelize.parallelize`).

`PipelineEngine` drives them with torch's schedule of `parallel.pp_schedule` over the mesh's "pp"
dimension: the step's gradient-accumulation micro-batches are the pipeline's micro-batches, the
loss is the engine's `cross_entropy` (loss parallel under TP) on the last stage, and the schedule
divides the gradients by the micro-batches (scale_grads), as dividing each micro-batch's loss
does without a pipeline. Clipping takes the norm over every stage (one all-reduce over "pp"); the
step's loss comes to every stage by an all-reduce over "pp", on the device. Each stage has its own
AdamW; the checkpoint holds them under the whole model's names (`train.engine.ModelAndOptimizer`).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.pipelining import PipelineStage
from torch.distributed.pipelining._backward import stage_backward
from torch.distributed.pipelining.schedules import get_schedule_class

from train import stages
from train.config import Config, ParallelConfig
from train.engine import NativeEngine
from train.model import Transformer
from train.optim import build_optimizer
from train.parallelize import backward_context, cross_entropy

_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # of the hidden states eval sends between stages


def cut(model: Transformer, layers: range, first: bool, last: bool) -> Transformer:
    """The stage of `model` that holds blocks `layers`, the embedding if `first`, the final norm and
    output projection if `last`. A new module tree over the same parameter and buffer tensors (no
    copy of any weight), so a stage of the seeded whole model has exactly its weights."""
    shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
    stage = copy.deepcopy(model, shared)
    for name in [name for name in stage.layers if int(name) not in layers]:
        del stage.layers[name]
    if not first:
        stage.tok_embeddings = None
    if not last:
        stage.norm = stage.output = None
    return stage


def parts(model: Transformer, parallel: ParallelConfig, pp_rank: int) -> list[Transformer]:
    """What this rank runs of `model`: the whole model without a pipeline, else its stages in order."""
    if parallel.pp == 1:
        return [model]
    layers, last = stages.stage_layers(model.cfg, parallel), stages.num_stages(parallel) - 1
    return [cut(model, layers[s], s == 0, s == last) for s in stages.local_stages(parallel, pp_rank)]


class _Stage(PipelineStage):
    """torch's PipelineStage with the engine's autocast around each forward, and FSDP reducing
    every micro-batch's gradients when parallel.fsdp_reduce_per_micro_batch says so.

    torch's stage otherwise keeps FSDP from reducing until the step's last backward (FSDP then
    holds every unsharded fp32 gradient of the stage for the whole step: what
    fsdp_reduce_per_micro_batch=false means). With it true, a full backward runs as it does
    without a pipeline, FSDP's own hooks reduce-scattering and freeing each micro-batch's
    gradients; the schedule's final reduction then finds nothing left to reduce. (ZBVZeroBubble's
    split backward, input then weight gradients, runs without data parallel: `train.checks`.)
    """

    def __init__(self, *args: Any, autocast: Callable[[], contextlib.AbstractContextManager],
                 reduce_per_micro_batch: bool, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._autocast, self._reduce_per_micro_batch = autocast, reduce_per_micro_batch

    def forward_maybe_with_nosync(self, *args: Any, **kwargs: Any) -> Any:
        with self._autocast():
            return super().forward_maybe_with_nosync(*args, **kwargs)

    def backward_maybe_with_nosync(self, backward_type: str, bwd_kwargs: dict, last_backward: bool = False):
        if self._reduce_per_micro_batch and backward_type == "full" and isinstance(self.submod, FSDPModule):
            grads = stage_backward(bwd_kwargs["stage_output"], bwd_kwargs["output_grads"], bwd_kwargs["input_values"])
            return grads, None
        return super().backward_maybe_with_nosync(backward_type, bwd_kwargs, last_backward)


class PipelineEngine(NativeEngine):
    """The native engine over the pipeline stages this rank runs (`parts`), one AdamW per stage."""

    pipelined = True

    def __init__(self, modules: list[nn.Module], cfg: Config, mesh: DeviceMesh, device: torch.device,
                 accum_steps: int) -> None:
        p = cfg.parallel
        self.group = mesh["pp"].get_group()
        super().__init__(modules, [build_optimizer(module, cfg.optim) for module in modules], p, device,
                         cfg.optim.grad_clip_norm, pp_group=self.group)
        self.pp_rank = mesh["pp"].get_local_rank()
        self.rank_of = stages.stage_ranks(p)
        self.indices = stages.local_stages(p, self.pp_rank)
        self.num_stages = stages.num_stages(p)
        self.has_first, self.has_last = 0 in self.indices, self.num_stages - 1 in self.indices
        pipeline_stages = [
            _Stage(module, index, self.num_stages, device, group=self.group, autocast=self.autocast,
                   reduce_per_micro_batch=p.fsdp_reduce_per_micro_batch)
            for index, module in zip(self.indices, modules, strict=True)
        ]
        schedule = get_schedule_class(str(p.pp_schedule))
        first = pipeline_stages[0] if str(p.pp_schedule) in stages.SINGLE_STAGE else pipeline_stages
        self.schedule = schedule(first, n_microbatches=accum_steps, loss_fn=cross_entropy, scale_grads=True)

    @property
    def forward_waits_for_peers(self) -> bool:
        return True  # a stage waits for the previous stage's activations

    def accumulate(self, sync: bool) -> contextlib.AbstractContextManager:
        raise RuntimeError("a pipeline runs the step's micro-batches together: PipelineEngine.train_step")

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
        """Forward and backward of the step's micro-batches (`inputs` and `targets` [m x B, T], the
        micro-batches one after another) through the pipeline; returns the step's loss (the mean
        of the micro-batches' mean losses), 0-d on the device, the same on every stage."""
        losses: list[torch.Tensor] = []
        kwargs = {} if documents is None else {"documents": documents}  # every stage masks attention
        with backward_context():  # loss parallel: its backward runs inside the schedule
            self.schedule.step(*((inputs,) if self.has_first else ()), target=targets if self.has_last else None,
                               losses=losses if self.has_last else None, return_outputs=False, **kwargs)
        return self._from_last_stage(torch.stack(losses).detach().mean() if self.has_last else None, ())

    @torch.no_grad()
    def eval_loss(self, inputs: torch.Tensor, targets: torch.Tensor, documents: torch.Tensor | None) -> torch.Tensor:
        """The per-token loss [B, T] of one held-out micro-batch, forward only through the stages in
        order (each hands its hidden states to the next, point to point), on every stage."""
        hidden = inputs
        for index, module in zip(self.indices, self.parts, strict=True):
            if index > 0 and self.rank_of[index - 1] != self.pp_rank:
                hidden = self._receive(self.rank_of[index - 1])
            with self.autocast():
                hidden = module(hidden, documents)
            if index < self.num_stages - 1 and self.rank_of[index + 1] != self.pp_rank:
                self._send(hidden, self.rank_of[index + 1])
        loss = cross_entropy(hidden, targets, reduction="none") if self.has_last else None
        return self._from_last_stage(loss, tuple(targets.shape))

    def _from_last_stage(self, value: torch.Tensor | None, shape: tuple[int, ...]) -> torch.Tensor:
        """`value` (fp32), computed on the last stage, on every stage of this pipeline: an all-reduce
        over "pp" to which the other stages add zeros."""
        value = value.float() if value is not None else torch.zeros(shape, device=self.device)
        dist.all_reduce(value, group=self.group)
        return value

    def _send(self, hidden: torch.Tensor, pp_rank: int) -> None:
        header = torch.tensor([*hidden.shape, _DTYPES.index(hidden.dtype)], device=hidden.device)
        dist.send(header, group=self.group, group_dst=pp_rank)
        dist.send(hidden.contiguous(), group=self.group, group_dst=pp_rank)

    def _receive(self, pp_rank: int) -> torch.Tensor:
        header = torch.zeros(4, dtype=torch.int64, device=self.device)  # [B, T, dim, dtype]
        dist.recv(header, group=self.group, group_src=pp_rank)
        *shape, dtype = header.tolist()  # eval only: the header says how much to receive
        hidden = torch.empty(shape, dtype=_DTYPES[dtype], device=self.device)
        dist.recv(hidden, group=self.group, group_src=pp_rank)
        return hidden
