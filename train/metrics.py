"""Step metrics: a log line, a row of `metrics.jsonl` and the trackers' scalars (rank 0 only);
and, on demand, where the time and the memory went (docs/profiling.md).

MFU = flops_per_token x tokens/s / (peak FLOP/s per device x devices); null where the peak is
unknown (CPUs). tokens/s counts every rank's tokens (the global batch), not one rank's. Memory
is the peak of the logging window, the maximum over the ranks: allocated (what tensors held,
`torch.cuda.max_memory_allocated`) and reserved (what the caching allocator took from the
driver, closer to nvidia-smi); on the CPU the process's peak RSS since it started.

- `StepProfiler`: trainer.profile_steps=[A, B] traces steps A..B with torch.profiler into
  `<run dir>/profile/rank-NNNNN.json` (Chrome/Perfetto trace format, one per rank).
- `MemorySnapshot`: trainer.memory_snapshot=true records the CUDA allocator's history and
  dumps it to `<run dir>/memory/rank-NNNNN-{end,oom}.pickle` (pytorch.org/memory_viz).
"""

from __future__ import annotations

import json
import logging
import math
import resource
import time
from pathlib import Path
from typing import Any

import torch

from train.config import ConfigError
from train.trackers import Tracker

log = logging.getLogger(__name__)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this process: CUDA allocator peak on GPU, peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux: KiB


def memory_peaks(device: torch.device) -> tuple[int, int | None]:
    """(allocated, reserved) peak bytes of this process since `reset_memory_peaks`, read from
    the allocator's own counters (no device sync); on the CPU, (peak RSS since the start, None)."""
    if device.type != "cuda":
        return peak_memory_bytes(device), None
    return int(torch.cuda.max_memory_allocated(device)), int(torch.cuda.max_memory_reserved(device))


def reset_memory_peaks(device: torch.device) -> None:
    """Start the next logging window's peaks (CUDA; a process's peak RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


class StepProfiler:
    """trainer.profile_steps=[A, B]: a torch.profiler trace of steps A to B (CPU and CUDA
    activity, shapes, memory, Python stacks) per rank, written when step B ends."""

    def __init__(self, cfg: Any, run_dir: Path, rank: int, device: torch.device) -> None:
        steps = list(cfg.profile_steps)
        if steps and (len(steps) != 2 or not 1 <= steps[0] <= steps[1]):
            raise ConfigError(f"trainer.profile_steps={steps} must be [first, last] steps with "
                              f"1 <= first <= last (e.g. trainer.profile_steps=[10,12]), or [] for none")
        self.steps = steps
        self.path = run_dir / "profile" / f"rank-{rank:05d}.json"
        self.device = device
        self._profiler: Any = None

    def before(self, step: int) -> None:
        if not self.steps or step != self.steps[0]:
            return
        from torch.profiler import ProfilerActivity, profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self._profiler = profile(activities=activities, record_shapes=True, profile_memory=True, with_stack=True)
        self._profiler.__enter__()

    def after(self, step: int) -> None:
        if self._profiler is not None and step == self.steps[1]:
            self.stop()

    def stop(self) -> None:
        """End the trace (at step B, or when the run ends before it) and write it."""
        if self._profiler is None:
            return
        profiler, self._profiler = self._profiler, None
        profiler.__exit__(None, None, None)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        profiler.export_chrome_trace(str(self.path))
        log.info("profile of steps %d-%d written to %s (open it in https://ui.perfetto.dev)",
                    *self.steps, self.path)


class MemorySnapshot:
    """trainer.memory_snapshot=true: the CUDA caching allocator's history (every allocation and
    free, with its Python stack) for the whole run, dumped at the end and on out-of-memory.
    On the CPU there is no such allocator: one log line, and nothing recorded."""

    MAX_ENTRIES = 100_000  # allocations and frees kept (the most recent)

    def __init__(self, enabled: bool, run_dir: Path, rank: int, device: torch.device) -> None:
        self.enabled = enabled and device.type == "cuda"
        self.prefix = run_dir / "memory" / f"rank-{rank:05d}"
        if enabled and not self.enabled and rank == 0:
            log.warning("trainer.memory_snapshot=true records the CUDA allocator; this run is on the %s: "
                        "nothing recorded (peak memory is in metrics.jsonl)", device.type)

    def start(self) -> MemorySnapshot:
        if self.enabled:
            torch.cuda.memory._record_memory_history(max_entries=self.MAX_ENTRIES)
        return self

    def dump(self, when: str) -> None:
        """Write the snapshot (`when`: "end" or "oom") for pytorch.org/memory_viz, and stop recording."""
        if not self.enabled:
            return
        path = self.prefix.with_name(f"{self.prefix.name}-{when}.pickle")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        torch.cuda.memory._record_memory_history(enabled=None)
        self.enabled = False
        log.warning("CUDA memory snapshot written to %s (drop it on https://pytorch.org/memory_viz)", path)


class StepTimer:
    """Wall time and tokens between two log lines."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, tokens: int) -> None:
        self.tokens += tokens

    def lap(self) -> tuple[float, int]:
        now = time.perf_counter()
        elapsed, tokens = now - self.start, self.tokens
        self.start, self.tokens = now, 0
        return elapsed, tokens


class MetricsLogger:
    """Writes what the output contract promises: metrics.jsonl and checkpoints.jsonl, and the
    same rows to the experiment trackers (train/trackers.py; TensorBoard by default)."""

    def __init__(self, run_dir: Path, *, enabled: bool, flops_per_token: float,
                 peak_flops_total: float, device: torch.device, trackers: list[Tracker] | None = None) -> None:
        self.enabled = enabled
        self.flops_per_token = flops_per_token
        self.peak_flops_total = peak_flops_total
        self.device = device
        self.run_dir = run_dir
        self.rows: list[dict[str, Any]] = []
        self.trackers = list(trackers or []) if enabled else []
        self._jsonl = None
        if enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def _to_trackers(self, method: str, row: dict[str, Any]) -> None:
        """A tracker that fails (its server gone, a disk full) is warned about and dropped: the
        row is in the run directory's files anyway, and the run trains on."""
        for tracker in list(self.trackers):
            try:
                getattr(tracker, method)(row)
            except Exception as exc:  # noqa: BLE001 - any tracker error: keep training
                log.warning("%s failed (%s: %s); it gets no more metrics this run (they are in %s)",
                            type(tracker).__name__, type(exc).__name__, exc, self.run_dir / "metrics.jsonl")
                self.trackers.remove(tracker)

    def mfu(self, tokens_per_s: float) -> float | None:
        if self.peak_flops_total <= 0:
            return None
        return self.flops_per_token * tokens_per_s / self.peak_flops_total

    def log_step(self, step: int, *, loss: float, lr: float, grad_norm: float,
                 elapsed_s: float, tokens: int, tokens_seen: int,
                 val_loss: float | None = None, skipped_shards: int = 0,
                 skipped_steps: int = 0, data_wait_s: float = 0.0,
                 source_tokens: dict[str, int] | None = None,
                 val_loss_by_source: dict[str, float] | None = None, memory_bytes: int | None = None,
                 memory_reserved_bytes: int | None = None, slow_ranks: list[int] | None = None) -> dict[str, Any]:
        tokens_per_s = tokens / elapsed_s if elapsed_s > 0 else 0.0
        mfu = self.mfu(tokens_per_s)
        row: dict[str, Any] = {
            "step": step, "loss": loss, "lr": lr,
            "grad_norm": grad_norm if math.isfinite(grad_norm) else None,  # JSON has no NaN
            "tokens_per_s": tokens_per_s, "mfu": mfu, "tokens_seen": tokens_seen,
            # peaks of the window, maximum over the ranks (see the module docstring)
            "memory_bytes": peak_memory_bytes(self.device) if memory_bytes is None else memory_bytes,
            "memory_reserved_bytes": memory_reserved_bytes, "skipped_shards": skipped_shards,
            "skipped_steps": skipped_steps,
            "data_wait_s": data_wait_s,  # per step, mean since the previous row: the loop waiting for batches
            "source_tokens": source_tokens or {},  # tokens trained on per data source so far; they add up to tokens_seen
            "slow_ranks": slow_ranks or [],  # ranks named stragglers now (train/stragglers.py)
            "time": time.time(),
        }
        if val_loss is not None:
            row["val_loss"] = val_loss
        if val_loss_by_source:  # a mixture: each source's own held-out loss
            row["val_loss_by_source"] = val_loss_by_source
        self.rows.append(row)
        if not self.enabled:
            return row
        mfu_text = f"{100 * mfu:5.1f}%" if mfu is not None else "  n/a"
        val_text = f" | val {val_loss:.4f}" if val_loss is not None else ""
        if val_loss_by_source:
            val_text += " (" + ", ".join(f"{n} {v:.4f}" for n, v in val_loss_by_source.items()) + ")"
        reserved = row["memory_reserved_bytes"]
        log.info(
            "step %6d | loss %.4f%s | lr %.2e | gnorm %.3f | %s tok/s | mfu %s | mem %.2f GiB%s",
            step, loss, val_text, lr, grad_norm, f"{tokens_per_s:,.0f}", mfu_text,
            row["memory_bytes"] / 2**30, f" (reserved {reserved / 2**30:.2f})" if reserved is not None else "",
        )
        self._jsonl.write(json.dumps(row) + "\n")
        self._to_trackers("log_row", row)
        return row

    def summary(self, *, steps: int, wall_s: float, tokens_seen: int) -> dict[str, Any]:
        """One line at the end: what a user wants to know about the run that just finished."""
        timed = [r for r in self.rows[1:]] or self.rows  # the first window includes start-up
        tps = sorted(r["tokens_per_s"] for r in timed)
        median_tps = tps[len(tps) // 2] if tps else 0.0
        first = self.rows[0]["loss"] if self.rows else float("nan")
        last = self.rows[-1]["loss"] if self.rows else float("nan")
        vals = [r["val_loss"] for r in self.rows if "val_loss" in r]
        out = {
            "steps": steps, "wall_s": wall_s, "tokens_seen": tokens_seen,
            "first_loss": first, "final_loss": last, "final_val_loss": vals[-1] if vals else None,
            "median_tokens_per_s": median_tps, "mfu": self.mfu(median_tps),
            # every row's peak is the maximum over the ranks already
            "peak_memory_bytes": max((r["memory_bytes"] for r in self.rows), default=peak_memory_bytes(self.device)),
        }
        if self.enabled:
            mfu = out["mfu"]
            log.info(
                "done: %d steps in %.1f s | loss %.4f -> %.4f%s | %s tok/s (median) | mfu %s | "
                "peak mem %.2f GiB", steps, wall_s, first, last,
                f" | val {out['final_val_loss']:.4f}" if vals else "", f"{median_tps:,.0f}",
                f"{100 * mfu:.1f}%" if mfu is not None else "n/a", out["peak_memory_bytes"] / 2**30,
            )
        return out

    def log_checkpoint(self, step: int, *, save_s: float, blocked_s: float, committed_time: float,
                       url: str) -> dict[str, Any]:
        """A committed checkpoint: a row of checkpoints.jsonl (step; save_s, from the start of the
        save to its commit; blocked_s, how long the training loop waited for it; the commit's
        time; its URL), and the same to the trackers."""
        row = {"step": step, "save_s": save_s, "blocked_s": blocked_s, "time": committed_time, "url": url}
        if self.enabled:
            with open(self.run_dir / "checkpoints.jsonl", "a") as f:
                f.write(json.dumps(row) + "\n")
            self._to_trackers("log_checkpoint", row)
        return row

    def close(self) -> None:
        if self._jsonl is not None:
            self._jsonl.close()
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:  # noqa: BLE001 - the run's result stands; say what was lost
                log.warning("%s failed to close (%s: %s)", type(tracker).__name__, type(exc).__name__, exc)
