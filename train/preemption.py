"""Stop requests: checkpoint at the next step boundary, then exit so the job can be restarted.

A stop is requested by SIGTERM or SIGUSR1 to any rank (Slurm's `--signal`, a scheduler's
preemption, `kill`), or by a file named `STOP` in the run directory (what a batch script
writes when its own shell got the signal, since launchers like torchrun do not pass SIGUSR1
on to the workers). Every step all ranks agree on it with one tiny all-reduce, so they all
save the same step and leave together.
"""

from __future__ import annotations

import logging
import signal
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

    def __init__(self, run_dir: Path, device: torch.device, rank: int) -> None:
        self.stop_file = run_dir / STOP_FILE
        self.device = device
        self.rank = rank
        self.reason: str | None = None

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
            flag = torch.tensor([1 if self.reason else 0], device=self.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() and self.reason is None:
                self.reason = "another rank was asked to stop"
        return self.reason

    def restore(self) -> None:
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
