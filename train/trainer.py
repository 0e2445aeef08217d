"""The training loop: get batch, forward, backward (accumulating), clip, step, log, save.

The loop sees a model, an optimizer, a data stream and a checkpointer through small
interfaces, whichever engine or storage is behind them. Everything that must survive a
restart (weights, optimizer, step, data position, RNG) goes into one DCP checkpoint.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.stateful import Stateful

from storage.checkpoint import Checkpointer
from train.config import Config
from train.metrics import MetricsLogger, StepTimer
from train.optim import learning_rate, set_learning_rate
from train.parallelize import autocast, clip_grad_norm_, grad_sync
from train.preemption import StopRequest

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf."""


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


@dataclass
class Progress(Stateful):
    """Where the run is: the optimizer step just finished and the tokens trained on so far."""

    step: int = 0
    tokens_seen: int = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "tokens_seen": self.tokens_seen}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.step = int(state_dict["step"])
        self.tokens_seen = int(state_dict["tokens_seen"])


def _mean_over_world(value: torch.Tensor) -> float:
    """Average a scalar over all ranks (gloo has no AVG, so SUM / world)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        value = value.detach().clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return float(value)


class Trainer:
    def __init__(self, *, cfg: Config, model: nn.Module, optimizer: torch.optim.Optimizer,
                 data: Any, eval_data: list[torch.Tensor], checkpointer: Checkpointer,
                 metrics: MetricsLogger, device: torch.device, accum_steps: int,
                 checkpoint_meta: dict[str, Any], stop: StopRequest | None = None) -> None:
        self.cfg = cfg
        self.model = model
        self.optimizer = optimizer
        self.data = data
        self.eval_data = eval_data
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.device = device
        self.accum_steps = accum_steps
        self.checkpoint_meta = checkpoint_meta
        self.progress = Progress()
        self.tokens_per_step = cfg.trainer.global_batch_tokens
        self.last_saved_step = -1
        self.stop = stop
        self.stopped_by: str | None = None  # why fit() returned before max_steps, if it did

    def state(self) -> dict[str, Stateful]:
        return {"app": ModelAndOptimizer(self.model, self.optimizer), "progress": self.progress,
                "data": self.data}

    def resume(self) -> None:
        """Load the checkpoint `checkpoint.resume` names: the latest committed one by default."""
        resume = self.cfg.checkpoint.resume
        if resume == "never":
            return
        info = self.checkpointer.latest() if resume == "auto" else self.checkpointer.info(resume)
        if info is None:
            log.info("no committed checkpoint under %s: starting from step 0", self.checkpointer.url)
            return
        self.checkpointer.load(info, self.state(), self.checkpoint_meta)
        self.last_saved_step = self.progress.step

    def save(self) -> None:
        if self.last_saved_step == self.progress.step:
            return
        self.checkpointer.save(self.progress.step, self.state(), self.checkpoint_meta)
        self.last_saved_step = self.progress.step

    def _loss(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with autocast(self.cfg.parallel, self.device):
            logits = self.model(inputs)
        return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

    def train_step(self) -> tuple[float, float]:
        """One optimizer step over `accum_steps` micro-batches; returns (loss, grad norm)."""
        self.model.train()
        micro_batches = self.data.next_step()
        total = torch.zeros((), device=self.device)
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            with grad_sync(self.model, enabled=last):
                loss = self._loss(batch) / len(micro_batches)
                loss.backward()
            total += loss.detach()
        grad_norm = clip_grad_norm_(self.model, self.cfg.optim.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return _mean_over_world(total), grad_norm

    @torch.no_grad()
    def evaluate(self) -> float | None:
        if not self.eval_data:
            return None
        self.model.eval()
        losses = torch.stack([self._loss(batch) for batch in self.eval_data])
        return _mean_over_world(losses.mean())

    def _check_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            rank = dist.get_rank() if dist.is_initialized() else 0
            raise NonFiniteLossError(
                f"loss is {loss} at step {self.progress.step} (rank {rank}); lower optim.lr or "
                f"resume from the last checkpoint under {self.checkpointer.url}")

    def _is_due(self, step: int, interval: int) -> bool:
        return interval > 0 and step % interval == 0

    def _skipped_shards(self) -> int:
        """Corrupt shards skipped so far (storage.on_corrupt_shard=skip), counted once over ranks."""
        if self.cfg.storage.on_corrupt_shard != "skip":
            return 0  # nothing can be skipped: no collective at log steps
        files = set(getattr(self.data, "skipped_shard_files", []))
        if dist.is_initialized() and dist.get_world_size() > 1:
            gathered: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(gathered, sorted(files))
            files = set().union(*gathered)
        return len(files)

    def _log(self, step: int, grad_norm: float, *, first: bool, last: bool) -> None:
        """A metrics row at log steps, evaluation steps, the first and the last step.

        Its loss is the mean over the steps since the previous row; its tokens/s counts
        training only (the timer is lapped before evaluation and after saving).
        """
        t = self.cfg.trainer
        evaluate = last or self._is_due(step, t.eval_interval_steps)
        if not (first or last or evaluate or self._is_due(step, t.log_interval_steps)):
            return
        elapsed, tokens = self._timer.lap()
        val_loss = self.evaluate() if evaluate else None
        self.metrics.log_step(
            step, loss=sum(self._window) / len(self._window), grad_norm=grad_norm,
            lr=self.optimizer.param_groups[0]["lr"], elapsed_s=elapsed, tokens=tokens,
            tokens_seen=self.progress.tokens_seen, val_loss=val_loss,
            skipped_shards=self._skipped_shards())
        self._window.clear()
        self._timer.lap()

    def fit(self) -> dict[str, Any]:
        """Train until trainer.max_steps (or stop_after_steps); save at intervals and the end."""
        t = self.cfg.trainer
        started = time.perf_counter()
        first_step = self.progress.step
        self._timer, self._window = StepTimer(), []
        while self.progress.step < t.max_steps:
            step = self.progress.step + 1
            set_learning_rate(self.optimizer, learning_rate(step, self.cfg.optim, t.max_steps))
            loss, grad_norm = self.train_step()
            self.progress.step = step
            self.progress.tokens_seen += self.tokens_per_step
            self._timer.add(self.tokens_per_step)
            self._check_finite(loss)
            self._window.append(loss)
            stopping = step == t.stop_after_steps
            last = step == t.max_steps or stopping
            self._log(step, grad_norm, first=step == first_step + 1, last=last)
            if last or self._is_due(step, self.cfg.checkpoint.interval):
                self.save()
                self._timer.lap()  # saving does not count towards tokens/s
            if stopping:
                log.info("stopping after step %d (trainer.stop_after_steps)", step)
                break
            self.stopped_by = self.stop.requested() if self.stop else None
            if self.stopped_by:
                log.warning("stop requested (%s): saving step %d, then exiting", self.stopped_by, step)
                self.save()
                break
        return self.metrics.summary(steps=self.progress.step - first_step,
                                    wall_s=time.perf_counter() - started,
                                    tokens_seen=self.progress.tokens_seen)
