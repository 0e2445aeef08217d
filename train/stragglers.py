"""Stragglers: a rank whose own work per step is slower than the other ranks'.

In a synchronous step every rank waits for the slowest at each collective, so every rank's step
takes the same wall time, and the wall time names nobody. What tells ranks apart is the time each
spends on work that waits for no other rank, its *own time* per step:

- its data wait (reading and assembling its batches: a slow disk, cache or network on its node);
- its forward passes (with the loss), where the forward has no collective: DDP, DeepSpeed
  ZeRO-1/2, one process. Under FSDP, TP and ZeRO-3 the forward gathers weights or reduces
  activations, and in a pipeline a stage waits for the previous one's, so a fast rank's forward
  waits for the slow one and is left out;
- the native engine's optimizer update, which changes each rank's own parameters (or shards)
  without a collective under every layout.

So a rank with a slow GPU or CPU (throttled, a noisy neighbour, a failing card) is named under
DDP and ZeRO-1/2 by its forward, and under FSDP/TP by its optimizer update; a rank whose data
comes slowly is named under every layout by its data wait. On a GPU the forward and the update
are timed with CUDA events on the compute stream and read at the log step (which reads the
device anyway), so steps that do not log still never wait for the GPU; on the CPU with the
wall clock.

Each rank's mean own time per step over the last metrics window travels in its heartbeat
(train/heartbeat.py). At every log step rank 0 reads the beats (one store read) and names a rank
whose own time has been more than `trainer.straggler_factor` times the median of the other
ranks' (and at least `MIN_GAP_S` more: no one is named for a fraction of a millisecond) for at
least `trainer.straggler_steps` steps: one warning when it becomes slow, one when it recovers,
and `slow_ranks` in every `metrics.jsonl` row. Beats are sent every
`trainer.heartbeat_interval_s`, so rank 0 may judge a window late by up to that interval.
"""

from __future__ import annotations

import contextlib
import logging
import statistics
import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

MIN_GAP_S = 0.001  # own time this much above the others' median, at least, to count as slow


class OwnTime:
    """This rank's own time (see the module docstring), summed over the steps of a window.

    `section()` times device work (CUDA events on the current stream, read at `take`); `add`
    adds host time already measured (the data wait)."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self._host_s = 0.0
        self._steps = 0
        self._pairs: list[tuple[torch.cuda.Event, torch.cuda.Event]] = []
        self._free: list[torch.cuda.Event] = []

    @contextlib.contextmanager
    def section(self, enabled: bool = True) -> Iterator[None]:
        if not enabled:
            yield
            return
        if not self.cuda:
            started = time.perf_counter()
            yield
            self._host_s += time.perf_counter() - started
            return
        start, end = self._event(), self._event()
        start.record()
        yield
        end.record()
        self._pairs.append((start, end))

    def _event(self) -> torch.cuda.Event:
        return self._free.pop() if self._free else torch.cuda.Event(enable_timing=True)

    def add(self, seconds: float) -> None:
        self._host_s += seconds

    def step_done(self) -> None:
        self._steps += 1

    def take(self) -> float | None:
        """The mean own time per step since the last `take` (None before a step), and restart.
        On a GPU it waits for the window's last timed section."""
        if not self._steps:
            return None
        device_s = 0.0
        if self._pairs:
            self._pairs[-1][1].synchronize()
            for start, end in self._pairs:
                device_s += start.elapsed_time(end) / 1000
                self._free += [start, end]
            self._pairs.clear()
        mean = (self._host_s + device_s) / self._steps
        self._host_s, self._steps = 0.0, 0
        return mean


@dataclass
class _Run:
    through_step: int = 0  # the last step of the rank's window that was judged
    slow_steps: int = 0  # steps in a row (counted in windows) over the threshold
    named: bool = False


class StragglerWatch:
    """Rank 0's view of the other ranks' own times, from their heartbeats."""

    def __init__(self, factor: float, steps: int) -> None:
        self.factor, self.steps = factor, steps
        self._runs: dict[int, _Run] = {}

    def update(self, beats: dict) -> list[int]:
        """Judge each rank's latest reported window (`beats`: rank -> Beat); the ranks named
        slow now, sorted. A window already judged (an old beat) is not counted again."""
        if self.factor <= 0:
            return []
        times = {r: b.own_step_s for r, b in beats.items() if b.own_step_s is not None}
        for rank, beat in beats.items():
            run = self._runs.setdefault(rank, _Run())
            own, others = times.get(rank), [t for r, t in times.items() if r != rank]
            if own is None or not others or beat.through_step <= run.through_step:
                continue
            median = statistics.median(others)
            steps = beat.through_step - run.through_step
            run.through_step = beat.through_step
            if own > self.factor * median and own - median >= MIN_GAP_S:
                run.slow_steps += steps
                if run.slow_steps >= self.steps and not run.named:
                    run.named = True
                    log.warning("rank %d (host %s, pid %d) at %s is a straggler: its own time per step "
                                "(data wait, forward and update: %.1f ms) has been over %gx the other "
                                "ranks' median (%.1f ms now) for %d steps, up to step %d; every rank "
                                "waits for it at each collective. Check that node (GPU clocks and "
                                "temperature, other processes, its disk and network)",
                                rank, beat.host, beat.pid, beat.address, 1000 * own, self.factor,
                                1000 * median, run.slow_steps, beat.through_step)
            else:
                if run.named:
                    log.warning("rank %d (host %s) is no longer slow: %.1f ms own time per step against "
                                "the others' median %.1f ms (step %d)", rank, beat.host, 1000 * own,
                                1000 * median, beat.through_step)
                run.slow_steps, run.named = 0, False
        return sorted(r for r, run in self._runs.items() if run.named)
