"""Experiment trackers: where rank 0 sends each metrics row besides metrics.jsonl.

`monitor.loggers` names them (TensorBoard by default; MLflow and W&B are optional extras,
imported only when chosen). Each is a `Tracker`: it is opened once with the run's identity and
resolved config (`RunInfo`), then given every metrics row and every committed checkpoint, and
closed at the end. A resumed run continues the same tracker run: its id is remembered in
`<run dir>/trackers.json` (no credentials: those come only from the environment).

Failures: a chosen tracker whose package does not import stops the run at start-up
(`check_trackers`, every rank, before anything is built). One that cannot be opened (server
unreachable, bad URI or credentials) stops a fresh run in one line, on every rank: the user asked
for it and is there to fix it; a resumed run (a requeue or a restart nobody watches) warns and
trains on. A tracker that fails while the run trains costs a warning, not the run
(`train.metrics.MetricsLogger` catches it): the scalars are in metrics.jsonl anyway, and
`python -m train.report` draws them. MLflow rows go out from a background thread with a bounded
queue and bounded HTTP retries, so a slow or gone server never stalls a step.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import torch.distributed as dist

from train.config import ConfigError, Logger, MonitorConfig

log = logging.getLogger(__name__)

# Row keys that are one number per row, sent to every tracker as a scalar (under "train/").
SCALARS = ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "val_loss", "memory_bytes",
           "memory_reserved_bytes", "data_wait_s", "tokens_seen", "skipped_steps", "skipped_shards")

# The optional trackers: their module, which is also the name of the extra that installs it.
EXTRAS = {Logger.mlflow: "mlflow", Logger.wandb: "wandb"}

STATE_FILE = "trackers.json"  # <run dir>/trackers.json: each tracker's own run id, for a resume


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


class TrackerError(ConfigError):
    """A tracker could not be opened: what, where, and what to do."""


def scalars(row: dict[str, Any]) -> dict[str, float]:
    """A row's scalars as tracker names -> finite numbers (per-source values included)."""
    out = {f"train/{k}": float(row[k]) for k in SCALARS
           if isinstance(row.get(k), (int, float)) and math.isfinite(row[k])}
    out.update({f"data/source_tokens/{n}": float(v) for n, v in (row.get("source_tokens") or {}).items()})
    out.update({f"val/loss/{n}": float(v) for n, v in (row.get("val_loss_by_source") or {}).items()})
    return out


def checkpoint_scalars(row: dict[str, Any]) -> dict[str, float]:
    """A checkpoints.jsonl row's scalars as tracker names."""
    return {"checkpoint/save_s": float(row["save_s"]), "checkpoint/blocked_s": float(row["blocked_s"])}


def flat(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config as dotted keys (optim.lr); lists stay values."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def without_credentials(uri: str) -> str:
    """A URI fit for a log line or a file: no user:password@, no query string."""
    parts = urlsplit(uri)
    if not parts.netloc:
        return uri
    host = parts.hostname or ""
    return parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host, query="", fragment="").geturl()


def read_state(run_dir: Path) -> dict[str, Any]:
    """<run dir>/trackers.json: what each tracker needs to continue its run on a resume."""
    path = run_dir / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else {}


def remember(run_dir: Path, tracker: str, state: dict[str, Any]) -> None:
    """Record `tracker`'s run (ids and where it lives, never a credential) for the next resume."""
    merged = {**read_state(run_dir), tracker: state}
    tmp = run_dir / f".{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(merged, indent=1) + "\n")
    os.replace(tmp, run_dir / STATE_FILE)


def check_trackers(monitor: MonitorConfig) -> None:
    """Start-up check (every rank, and the launchers, which run the same interpreter as the job):
    each chosen tracker's package imports, and no credential sits in the config."""
    for name in dict.fromkeys(monitor.loggers):
        if name not in EXTRAS:
            continue
        try:
            importlib.import_module(EXTRAS[name])
        except ImportError as exc:
            why = (str(exc).splitlines() or [type(exc).__name__])[0]
            chosen = ",".join(str(n) for n in monitor.loggers)
            raise ConfigError(f"monitor.loggers=[{chosen}]: the {name} package does not "
                              f"import here ({why}): pip install 'train-harness[{EXTRAS[name]}]', or drop "
                              f"{name} from monitor.loggers") from None
    uri = monitor.mlflow_tracking_uri
    if urlsplit(uri).password is not None or "token=" in urlsplit(uri).query.lower():
        raise ConfigError(f"monitor.mlflow_tracking_uri={without_credentials(uri)} carries a credential, which "
                          f"config.yaml would record: give the URI without it, and the credential in the "
                          f"environment (MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, or "
                          f"MLFLOW_TRACKING_TOKEN)")


def failed(exc: BaseException) -> str:
    """An exception as one short line: an HTTP client's chain of wrapped errors (MLflow's "API request
    to URL failed with exception HTTPConnectionPool(...): Max retries exceeded ... [Errno 111]
    Connection refused") comes down to the request and its innermost reason."""
    text = (str(exc).strip().splitlines() or [""])[0]
    reason = re.findall(r"\[Errno -?\d+\] [^'\")]+|timed out|Connection reset by peer|Connection aborted", text)
    if reason:
        text = f"{text.split(' with exception')[0].split(' (Caused by')[0][:200]}: {reason[-1]}"
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class TensorBoardTracker:
    """Scalars as TensorBoard events under <run dir>/tensorboard (`tensorboard --logdir runs`)."""

    def __init__(self, run: RunInfo) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self._writer = SummaryWriter(log_dir=str(run.run_dir / "tensorboard"))

    def log_row(self, row: dict[str, Any]) -> None:
        for name, value in scalars(row).items():
            self._writer.add_scalar(name, value, row["step"])

    def log_checkpoint(self, row: dict[str, Any]) -> None:
        for name, value in checkpoint_scalars(row).items():
            self._writer.add_scalar(name, value, row["step"])

    def close(self) -> None:
        self._writer.close()


HINTS = {
    Logger.tensorboard: "check that the run directory is writable",
    Logger.mlflow: "start the server or fix the URI (monitor.mlflow_tracking_uri, MLFLOW_TRACKING_URI) and the "
                   "credentials (MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME/PASSWORD)",
    Logger.wandb: "set WANDB_API_KEY (or run `wandb login`), or WANDB_MODE=offline and `wandb sync` later",
}


def _open(name: Logger, run: RunInfo, monitor: MonitorConfig) -> Tracker:
    if name == Logger.tensorboard:
        return TensorBoardTracker(run)
    if name == Logger.mlflow:
        from train.mlflow_tracker import MLflowTracker

        return MLflowTracker(run, monitor)
    from train.wandb_tracker import WandbTracker

    return WandbTracker(run, monitor)


def open_trackers(monitor: MonitorConfig, run: RunInfo) -> list[Tracker]:
    """Rank 0: the trackers `monitor.loggers` names, opened for this run. One that cannot be opened
    raises TrackerError on a fresh start, and is left out with a warning on a resume."""
    trackers: list[Tracker] = []
    for name in dict.fromkeys(monitor.loggers):  # a name given twice is one tracker
        try:
            trackers.append(_open(name, run, monitor))
        except Exception as exc:  # noqa: BLE001 - whatever the tracker's library raises, said in one line
            if name == Logger.tensorboard and isinstance(exc, ImportError):
                # tensorboard is a dependency; a broken install still trains
                log.warning("tensorboard is not importable; no TensorBoard events are written")
                continue
            what = f"monitor.loggers: {name} could not be opened ({failed(exc)})"
            if run.first_step > 0:
                log.warning("%s; this resumed run trains on without it (its rows are in metrics.jsonl): %s",
                            what, HINTS[name])
                continue
            for tracker in trackers:
                tracker.close()
            raise TrackerError(f"{what}: {HINTS[name]}, or drop {name} from monitor.loggers") from None
    return trackers


def start_trackers(monitor: MonitorConfig, run: RunInfo, rank: int) -> list[Tracker]:
    """Every rank: rank 0 opens the trackers (`open_trackers`); if that fails, every rank raises
    rank 0's TrackerError, so the job stops in one line instead of the other ranks waiting for a
    rank that left."""
    trackers: list[Tracker] = []
    error = ""
    if rank == 0:
        try:
            trackers = open_trackers(monitor, run)
        except TrackerError as exc:
            error = str(exc)
    if dist.is_initialized() and dist.get_world_size() > 1:
        box = [error]
        dist.broadcast_object_list(box, src=0)
        error = box[0]
    if error:
        raise TrackerError(error)
    return trackers
