"""The training loop: get batch, forward, backward (accumulating), clip, step, log, save.

The loop sees an engine (train/engine.py: native or DeepSpeed), a data stream and a
checkpointer through small interfaces, whichever engine or storage is behind them. Everything
that must survive a restart (weights, optimizer, step, data position, RNG) goes into one
checkpoint, in the engine's format.

The step never waits on the host: nothing reads a device tensor on a step that does not log,
evaluate or save. Each step leaves its loss (averaged over the ranks on the device), gradient
norm and own loss in one small device tensor; the engine skips a non-finite step on the device;
the loop reads the steps since the last read at once, where it must anyway (a log row, an
evaluation, a checkpoint), and checks each of them, in order, exactly as if it had read it at
once: a skipped step is counted and named, and a run that must stop stops there, naming the
step, before anything later is logged or saved. The stop request is agreed over the CPU
(train/preemption.py). tests/test_hot_path.py counts the reads.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.stateful import Stateful

from storage.checkpoint import Checkpointer, CheckpointError, CheckpointInfo
from train.config import Config
from train.engine import Engine, check_engine
from train.metrics import MemorySnapshot, MetricsLogger, StepProfiler, StepTimer, memory_peaks, reset_memory_peaks
from train.model import document_ids
from train.optim import learning_rate
from train.heartbeat import Heartbeat, is_collective_failure
from train.stragglers import OwnTime, StragglerWatch
from train.preemption import StopRequest

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf."""


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


def _mean_over_world(value: torch.Tensor) -> torch.Tensor:
    """Average a scalar over all ranks (gloo has no AVG, so SUM / world), on the device."""
    value = value.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value


def resume_target(checkpointer: Checkpointer, resume: str) -> CheckpointInfo | None:
    """The checkpoint `checkpoint.resume` names: none for "never", the latest committed one under
    checkpoint.url for "auto" (none if there is none), else the one at that URL."""
    if resume == "never":
        return None
    return checkpointer.latest() if resume == "auto" else checkpointer.info(resume)


class Trainer:
    def __init__(self, *, cfg: Config, engine: Engine, data: Any, eval_data: list[torch.Tensor],
                 checkpointer: Checkpointer, metrics: MetricsLogger, device: torch.device, accum_steps: int,
                 checkpoint_meta: dict[str, Any], stop: StopRequest | None = None) -> None:
        self.cfg = cfg
        self.engine = engine
        self.model = engine.model
        self.data = data
        self.eval_data = eval_data
        self.checkpointer = checkpointer
        self.metrics = metrics
        self.device = device
        self.accum_steps = accum_steps
        self.checkpoint_meta = checkpoint_meta
        self.progress = Progress()
        self.skipped_steps = 0  # non-finite steps skipped (trainer.on_nonfinite_loss=skip)
        self._data_wait_s, self._steps_since_row = 0.0, 0  # time the loop waited for batches
        self._skipped_in_a_row = 0
        # Steps not yet read on the host: (step, [loss over ranks, gradient norm, own loss] on the device)
        self._unread: list[tuple[int, torch.Tensor]] = []
        self._grad_norm = float("nan")  # the last read step's
        self._blocked_s: dict[int, float] = {}  # step -> time the loop waited for its save
        self._memory_peaks: torch.Tensor | None = None  # the window's (allocated, reserved) peaks, max over ranks
        self.tokens_per_step = cfg.trainer.global_batch_tokens
        # data.document_mask: the (eos, bos) ids that separate the documents packed into a sample
        self.boundaries: tuple[int, int | None] | None = None
        if cfg.data.document_mask:
            tokenizer = data.index.tokenizer
            self.boundaries = (tokenizer.eos_id, tokenizer.bos_id)
        self.last_saved_step = -1
        self.stop = stop
        self.stopped_by: str | None = None  # why fit() returned before max_steps, if it did
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.profiler = StepProfiler(cfg.trainer, metrics.run_dir, self.rank, device)
        # stragglers (train/stragglers.py): this rank's own time per step, rank 0's judgement
        self.own_time = OwnTime(device)
        self.engine.own_time = self.own_time  # the engine times its optimizer update into it
        self._own_forward = not engine.forward_waits_for_peers
        self._stragglers = StragglerWatch(cfg.trainer.straggler_factor, cfg.trainer.straggler_steps)
        self._heartbeat: Heartbeat | None = None

    def state(self) -> dict[str, Stateful]:
        """What the loop itself keeps in a checkpoint, beside the engine's weights and optimizer."""
        return {"progress": self.progress, "data": self.data}

    def resume(self) -> None:
        """Load the checkpoint `checkpoint.resume` names: the latest committed one by default."""
        info = resume_target(self.checkpointer, self.cfg.checkpoint.resume)
        if info is None:
            log.info("no committed checkpoint under %s: starting from step 0", self.checkpointer.url)
            return
        self._check_tokenizer(info)
        check_engine(info, self.checkpoint_meta, self.cfg.parallel.name)
        self.engine.load(self.checkpointer, info, self.state(), self.checkpoint_meta)
        self.last_saved_step = self.progress.step
        self._warn_if_the_batch_changed(info)

    def _warn_if_the_batch_changed(self, info: CheckpointInfo) -> None:
        """Resuming with another global batch is allowed (the schedule goes on by step), but
        easy to do by accident: trainer.global_batch_tokens=0 derives it from the layout, so
        another layout (pp=2 -> pp=1, fewer ranks) silently changes it. Say so, with the fix."""
        step, seen = self.progress.step, self.progress.tokens_seen
        if self.rank != 0 or step == 0 or seen == step * self.tokens_per_step:
            return
        log.warning("checkpoint %s trained %d tokens per step (mean over %d steps); this run trains %d per step "
                    "(trainer.global_batch_tokens, derived from the layout when 0). To keep the batch, set "
                    "trainer.global_batch_tokens=%d", info.url, round(seen / step), step,
                    self.tokens_per_step, round(seen / step))

    def _check_tokenizer(self, info: CheckpointInfo) -> None:
        """The same token ids must mean the same text: refuse data made by another tokenizer."""
        saved, wanted = info.meta.get("tokenizer"), self.checkpoint_meta.get("tokenizer")
        if saved and wanted and saved != wanted:
            raise CheckpointError(
                f"checkpoint {info.url} was trained on data made with tokenizer {saved['name']} "
                f"(fingerprint {saved['fingerprint'][:12]}), but the dataset {self.data.index.url} "
                f"was made with tokenizer {wanted['name']} (fingerprint {wanted['fingerprint'][:12]}): "
                f"its token ids mean other text. Re-make the dataset with the checkpoint's tokenizer "
                f"(python -m storage.prepare --tokenizer ...), or start a new checkpoint.url")

    def save(self) -> None:
        if self.last_saved_step == self.progress.step:
            return
        self._read_steps()  # a step that must stop the run stops it before its weights are saved
        started = time.perf_counter()
        self.engine.save(self.checkpointer, self.progress.step, self.state(), self.checkpoint_meta)
        if self.rank == 0:  # only rank 0 reports commits (`_report_commits`)
            self._blocked_s[self.progress.step] = time.perf_counter() - started
        self.last_saved_step = self.progress.step
        self._report_commits()

    def _report_commits(self) -> None:
        """Rank 0: checkpoints committed since the last call (a background save commits later)
        to checkpoints.jsonl and the trackers, with the time the loop waited for each."""
        for commit in self.checkpointer.take_commits():
            self.metrics.log_checkpoint(commit["step"], save_s=commit["save_s"],
                                        blocked_s=self._blocked_s.pop(commit["step"], 0.0),
                                        committed_time=commit["time"], url=commit["url"])

    def _inputs(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """A batch's inputs and targets (the tokens shifted by one) on the device, and with
        data.document_mask the document ids of its inputs."""
        batch = batch.to(self.device, non_blocking=True).long()
        inputs, targets = batch[:, :-1], batch[:, 1:]
        documents = None if self.boundaries is None else document_ids(inputs, *self.boundaries)
        return inputs, targets, documents

    def _loss(self, batch: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        """The micro-batch's mean next-token loss ("none": [batch, seq_len] per token; what a
        pipeline computes, through its stages, on every stage)."""
        if self.engine.pipelined:
            per_token = self.engine.eval_loss(*self._inputs(batch))
            return per_token if reduction == "none" else per_token.mean()
        inputs, targets, documents = self._inputs(batch)
        with self.engine.autocast():
            return self.engine.loss(self.model(inputs, documents), targets, reduction)

    def _to_device(self, micro_batches: list[torch.Tensor]) -> list[torch.Tensor]:
        """The step's micro-batches on the device, every copy started before the first forward.

        On CUDA from pinned host memory, without blocking: a copy from pageable memory holds
        the host until the GPU has drained the work queued before it. So the host runs ahead of
        the GPU, and fetches and copies step s+1's batches while the GPU still computes step s.
        """
        if self.device.type != "cuda":
            return micro_batches
        return [batch.pin_memory().to(self.device, non_blocking=True) for batch in micro_batches]

    def train_step(self) -> torch.Tensor:
        """One optimizer step over `accum_steps` micro-batches; returns [loss averaged over the
        ranks, gradient norm, this rank's own loss] as one fp32 tensor on the device, unread."""
        self.model.train()
        waited = time.perf_counter()
        micro_batches = self.data.next_step()
        waited = time.perf_counter() - waited
        self._data_wait_s += waited
        self.own_time.add(waited)
        if self.engine.pipelined:  # the micro-batches go through the stages together, as the schedule orders
            total = self.engine.train_step(*self._inputs(torch.cat(self._to_device(micro_batches))))
        else:
            total = torch.zeros((), device=self.device)
            for i, batch in enumerate(self._to_device(micro_batches)):
                last = i == len(micro_batches) - 1
                with self.engine.accumulate(sync=last):
                    with self.own_time.section(self._own_forward):
                        loss = self._loss(batch) / len(micro_batches)
                    self.engine.backward(loss)
                total += loss.detach()
        loss = _mean_over_world(total)
        grad_norm = self.engine.step(torch.isfinite(loss))
        self._memory_peaks = self._peaks_over_ranks()
        self.own_time.step_done()
        return torch.stack([loss, grad_norm.float(), total])

    def _peaks_over_ranks(self) -> torch.Tensor:
        """This logging window's (allocated, reserved) peak bytes so far, the maximum over the
        ranks: an int64 device tensor, read at the log step (CPU: peak RSS, no reserved: -1).

        One tiny all-reduce after the optimizer step, every step. It is also the step's last
        collective, which every rank joins only once its optimizer step is done: a rank that
        got through it knows every rank finished the step (train/heartbeat.py relies on it)."""
        allocated, reserved = memory_peaks(self.device)
        peaks = torch.tensor([allocated, -1 if reserved is None else reserved], dtype=torch.int64)
        if self.device.type == "cuda":  # a fresh pinned buffer: the copy may run after the next step's write
            peaks = peaks.pin_memory().to(self.device, non_blocking=True)
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(peaks, op=dist.ReduceOp.MAX)
        return peaks

    def _read_steps(self) -> None:
        """Read the steps since the last read (one copy to the host) and check each in order:
        count its loss towards the next metrics row, or skip it, or stop the run (raises)."""
        if not self._unread:
            return
        rows = torch.stack([values for _, values in self._unread]).tolist()
        steps = [step for step, _ in self._unread]
        self._unread.clear()
        for step, (loss, grad_norm, own_loss) in zip(steps, rows, strict=True):
            self._grad_norm = grad_norm
            if self._check_finite(step, loss, grad_norm, own_loss):
                self._window.append(loss)

    @torch.no_grad()
    def evaluate(self) -> tuple[float | None, dict[str, float]]:
        """The held-out loss over every rank's held-out batches, and (for a mixture of several
        data sources) each source's own: the mean over that source's held-out samples."""
        if not self.eval_data:
            return None, {}
        self.model.eval()
        names = getattr(self.eval_data, "names", ["data"])
        sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=self.device)
        counts = torch.zeros_like(sums)
        for b, batch in enumerate(self.eval_data):
            per_sample = self._loss(batch, reduction="none").mean(1).double()
            sources = (self.eval_data.sources[b] if len(names) > 1 else torch.zeros(len(batch), dtype=torch.long))
            sources = sources.to(self.device)
            sums[:-1].index_add_(0, sources, per_sample)
            counts[:-1].index_add_(0, sources, torch.ones_like(per_sample))
        sums[-1], counts[-1] = sums[:-1].sum(), counts[:-1].sum()
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(sums)
            dist.all_reduce(counts)
        means = (sums / counts).tolist()
        by_source = {n: m for n, m, c in zip(names, means, counts.tolist()) if c} if len(names) > 1 else {}
        return means[-1], by_source

    def _nonfinite_ranks(self, own_loss: float) -> list[int]:
        """The ranks whose own loss was NaN/inf (every rank calls this: the averaged loss or
        the gradient norm, the same everywhere, was not finite)."""
        if self.world_size == 1:
            return [0] if not math.isfinite(own_loss) else []
        flags: list[Any] = [None] * self.world_size
        dist.all_gather_object(flags, not math.isfinite(own_loss))
        return [rank for rank, bad in enumerate(flags) if bad]

    def _check_finite(self, step: int, loss: float, grad_norm: float, own_loss: float) -> bool:
        """True if the step counts; False if it was skipped; raises if the run must stop."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self._skipped_in_a_row = 0
            return True
        ranks = self._nonfinite_ranks(own_loss)
        where = (f"loss {loss}, gradient norm {grad_norm} at step {step} "
                 f"({'non-finite loss on rank ' + ', '.join(map(str, ranks)) if ranks else 'non-finite gradients'})")
        t = self.cfg.trainer
        if t.on_nonfinite_loss == "skip":
            self._skipped_in_a_row += 1
            self.skipped_steps += 1
            if self._skipped_in_a_row <= t.max_skipped_steps:
                log.warning("%s: step skipped, weights unchanged (%d in a row, at most %d)", where,
                            self._skipped_in_a_row, t.max_skipped_steps)
                return False
            raise NonFiniteLossError(
                f"{where}: {self._skipped_in_a_row} non-finite steps in a row (more than "
                f"trainer.max_skipped_steps={t.max_skipped_steps}); lower optim.lr or resume from "
                f"the last checkpoint under {self.checkpointer.url}")
        raise NonFiniteLossError(
            f"{where}; lower optim.lr, resume from the last checkpoint under "
            f"{self.checkpointer.url}, or set trainer.on_nonfinite_loss=skip")

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

    def _memory(self) -> tuple[int, int | None]:
        """(allocated, reserved) peak bytes of the window, the maximum over the ranks (CPU: peak
        RSS since the start, nothing reserved); the peaks restart for the next window."""
        allocated, reserved = self._memory_peaks.tolist()
        reset_memory_peaks(self.device)
        return allocated, None if reserved < 0 else reserved

    def _log(self, step: int, *, first: bool, last: bool) -> None:
        """A metrics row at log steps, evaluation steps, the first and the last step.

        Its loss is the mean over the steps since the previous row; its tokens/s counts
        training only (the timer is lapped before evaluation and after saving).
        """
        t = self.cfg.trainer
        evaluate = last or self._is_due(step, t.eval_interval_steps)
        if not (first or last or evaluate or self._is_due(step, t.log_interval_steps)):
            return
        self._read_steps()
        if not self._window:
            return  # every step since the last row was skipped: no loss to report
        elapsed, tokens = self._timer.lap()
        data_wait_s = self._data_wait_s / max(1, self._steps_since_row)
        self._data_wait_s, self._steps_since_row = 0.0, 0
        memory_bytes, memory_reserved_bytes = self._memory()
        slow_ranks = self._slow_ranks(step)
        val_loss, val_by_source = self.evaluate() if evaluate else (None, {})
        self.metrics.log_step(
            step, loss=sum(self._window) / len(self._window), grad_norm=self._grad_norm,
            lr=self.engine.lr, elapsed_s=elapsed, tokens=tokens,
            tokens_seen=self.progress.tokens_seen, val_loss=val_loss,
            skipped_shards=self._skipped_shards(), skipped_steps=self.skipped_steps,
            data_wait_s=data_wait_s, source_tokens=self.data.source_tokens(), val_loss_by_source=val_by_source,
            memory_bytes=memory_bytes, memory_reserved_bytes=memory_reserved_bytes, slow_ranks=slow_ranks)
        self._window.clear()
        self._report_commits()
        self._timer.lap()

    def _slow_ranks(self, step: int) -> list[int]:
        """Send this rank's own time per step since the last row with its heartbeat; on rank 0,
        the ranks named stragglers so far (train/stragglers.py). Others return []."""
        own = self.own_time.take()
        beat = self._heartbeat
        if own is None or beat is None or not beat.active:
            return []
        beat.report(own, step)
        if self.rank != 0:
            return []
        try:
            return self._stragglers.update(beat.read())
        except Exception as exc:  # noqa: BLE001 - the store's host is gone: the next collective says so
            log.debug("stragglers not judged: %s", exc)
            return []

    def fit(self) -> dict[str, Any]:
        """Train until trainer.max_steps (or stop_after_steps); save at intervals and the end."""
        t = self.cfg.trainer
        started = time.perf_counter()
        first_step = self.progress.step
        self._timer, self._window = StepTimer(), []
        heartbeat = self._heartbeat = Heartbeat(self.rank, self.world_size, t.heartbeat_interval_s).start()
        snapshot = MemorySnapshot(t.memory_snapshot, self.metrics.run_dir, self.rank, self.device).start()
        try:
            self._fit(first_step)
        except Exception as exc:
            if isinstance(exc, torch.OutOfMemoryError):
                snapshot.dump("oom")
            if is_collective_failure(exc):
                raise heartbeat.explain(exc, self.progress.step, t.collective_timeout_s) from exc
            raise
        finally:
            heartbeat.stop()
            self.profiler.stop()
        snapshot.dump("end")
        self.checkpointer.wait()  # a background save is committed before the run reports done
        self._report_commits()
        return self.metrics.summary(steps=self.progress.step - first_step,
                                    wall_s=time.perf_counter() - started,
                                    tokens_seen=self.progress.tokens_seen)

    def _fit(self, first_step: int) -> None:
        t = self.cfg.trainer
        while self.progress.step < t.max_steps:
            step = self.progress.step + 1
            self.engine.set_lr(learning_rate(step, self.cfg.optim, t.max_steps))
            self.profiler.before(step)
            self._unread.append((step, self.train_step()))
            self.profiler.after(step)
            self._steps_since_row += 1
            self.progress.step = step
            self.progress.tokens_seen += self.tokens_per_step
            self._timer.add(self.tokens_per_step)
            stopping = step == t.stop_after_steps
            last = step == t.max_steps or stopping
            self._log(step, first=step == first_step + 1, last=last)
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
