"""Stop requests: checkpoint at the next step boundary, then exit so the job can be restarted.

A stop is requested by SIGTERM or SIGUSR1 to any rank (Slurm's `--signal`, a scheduler's
preemption, `kill`), or by a file named `STOP` in the run directory (what a batch script
writes when its own shell got the signal, since launchers like torchrun do not pass SIGUSR1
on to the workers). Every step all ranks agree on it with one tiny all-reduce, so they all
save the same step and leave together. That all-reduce runs over the CPU (gloo) on a host
tensor: one over the GPUs would make the host wait for the device every step.
"""

from __future__ import annotations

import logging
import signal
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

# EX_TEMPFAIL: "try again later". torchrun --max-restarts restarts on any non-zero exit;
# a Slurm batch script requeues the job when it sees this code.
EXIT_PREEMPTED = 75
STOP_FILE = "STOP"
SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class StopRequest:
    """Collects stop requests on this rank and agrees on them with the other ranks."""

    def __init__(self, run_dir: Path, device: torch.device, rank: int, timeout_s: float | None = None) -> None:
        """Every rank, at the same point of start-up: on a GPU layout this creates the gloo group
        the ranks agree over (a collective call), with `timeout_s` (trainer.collective_timeout_s;
        None: torch's default)."""
        self.stop_file = run_dir / STOP_FILE
        self.rank = rank
        self.reason: str | None = None
        self._group: dist.ProcessGroup | None = None  # None: the default group, gloo on the CPU
        if device.type != "cpu" and dist.is_initialized() and dist.get_world_size() > 1:
            timeout = timedelta(seconds=timeout_s) if timeout_s else None
            self._group = dist.new_group(backend="gloo", timeout=timeout)

    def install(self) -> None:
        """Handle the stop signals, and forget a stop file left by the run this one resumes."""
        for sig in SIGNALS:
            signal.signal(sig, self._on_signal)
        if self.rank == 0 and self.stop_file.exists():
            log.info("removing %s left by the previous attempt", self.stop_file)
            self.stop_file.unlink(missing_ok=True)

    def _on_signal(self, signum: int, frame) -> None:  # noqa: ARG002 - signal handler signature
        self.reason = f"signal {signal.Signals(signum).name}"

    def requested(self) -> str | None:
        """The reason to stop, agreed by all ranks (any rank's request counts), else None."""
        if self.reason is None and self.rank == 0 and self.stop_file.exists():
            self.reason = f"stop file {self.stop_file}"
        if dist.is_initialized() and dist.get_world_size() > 1:
            flag = torch.tensor([1 if self.reason else 0])  # host memory, never a device's
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            if flag.numpy()[0] and self.reason is None:
                self.reason = "another rank was asked to stop"
        return self.reason

    def restore(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
