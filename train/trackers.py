"""Experiment trackers: where rank 0 sends each metrics row besides metrics.jsonl.

`monitor.loggers` names them (TensorBoard by default). Each is a `Tracker`: it is opened once
with the run's identity and resolved config (`RunInfo`), then given every metrics row and every
committed checkpoint, and closed at the end. A tracker that fails while the run trains costs a
warning, not the run (`train.metrics.MetricsLogger` catches it): the scalars are in
metrics.jsonl anyway, and `python -m train.report` draws them.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from train.config import Logger

log = logging.getLogger(__name__)

# Row keys that are one number per row, sent to every tracker as a scalar (under "train/").
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "memory_bytes",
           "memory_reserved_bytes", "data_wait_s", "tokens_seen", "skipped_steps", "skipped_shards")


@dataclass(frozen=True)
class RunInfo:
    """What identifies the run to a tracker (the same on every restart of the run)."""

    run_id: str  # the run directory's name: a restarted or requeued job keeps it
    run_dir: Path
    name: str  # run.name
    config: dict[str, Any]  # the resolved config, secrets redacted (what config.yaml holds)
    labels: dict[str, str] = field(default_factory=dict)  # cluster, model, parallel: for dashboards
    first_step: int = 0  # the step the run resumed from (0 = a fresh start)


def run_id_of(run_dir: Path) -> str:
    """The run directory's name; a sweep job's (runs/<sweep>/<n>) with its sweep's in front."""
    return f"{run_dir.parent.name}-{run_dir.name}" if run_dir.name.isdigit() else run_dir.name


class Tracker(Protocol):
    def log_row(self, row: dict[str, Any]) -> None:
        """One metrics.jsonl row (train.metrics.MetricsLogger.log_step)."""

    def log_checkpoint(self, row: dict[str, Any]) -> None:
        """One checkpoints.jsonl row: a committed checkpoint's step, save_s, blocked_s, time."""

    def close(self) -> None:
        """Flush; the run is over (or stopping to be resumed)."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A row's scalars as tracker names -> finite numbers (per-source values included)."""
    out = {f"train/{k}": float(row[k]) for k in SCALARS
           if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])}
    out.update({f"data/source_tokens/{n}": float(v) for n, v in (row.get("source_tokens") or {}).items()})
    out.update({f"val/loss/{n}": float(v) for n, v in (row.get("val_loss_by_source") or {}).items()})
    return out


class TensorBoardTracker:
    """Scalars as TensorBoard events under <run dir>/tensorboard (`tensorboard --logdir runs`)."""

    def __init__(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"))

    def log_row(self, row: dict[str, Any]) -> None:
        for name, value in scalars(row).items():
            self._writer.add_scalar(name, value, row["step"])

    def log_checkpoint(self, row: dict[str, Any]) -> None:
        self._writer.add_scalar("checkpoint/save_s", row["save_s"], row["step"])
        self._writer.add_scalar("checkpoint/blocked_s", row["blocked_s"], row["step"])

    def close(self) -> None:
        self._writer.close()


def open_trackers(loggers: list[Logger], run: RunInfo) -> list[Tracker]:
    """Rank 0: the trackers `monitor.loggers` names, opened for this run."""
    trackers: list[Tracker] = []
    for name in dict.fromkeys(loggers):  # a name given twice is one tracker
        if name == Logger.tensorboard:
            try:
                trackers.append(TensorBoardTracker(run))
            except ImportError:  # tensorboard is a dependency; a broken install still trains
                log.warning("tensorboard is not importable; no TensorBoard events are written")
        else:
            raise NotImplementedError(f"monitor.loggers: {name} is not built yet")
    return trackers
