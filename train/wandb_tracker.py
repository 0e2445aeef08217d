"""The Weights & Biases tracker (`monitor.loggers=[wandb]`, `pip install 'train-harness[wandb]'`)."""

from __future__ import annotations

import os
import secrets
import sys
from typing import Any

from train.config import MonitorConfig
from train.trackers import RunInfo, checkpoint_scalars, read_state, remember, scalars


class WandbTracker:
    """A Weights & Biases run: the scalars against the harness's step, the resolved config, the run
    id as the name and the labels as tags; files under <run dir>/wandb/ (or WANDB_DIR). Online
    with WANDB_API_KEY, or WANDB_MODE=offline (then `wandb sync <run dir>/wandb/offline-run-*`).
    wandb.log hands rows to W&B's own service process: the training thread never waits for the
    network."""

    PREFIXES = ("train/*", "data/*", "val/*", "checkpoint/*")

    def __init__(self, run: RunInfo, monitor: MonitorConfig) -> None:
        import wandb

        state = read_state(run.run_dir).get("wandb") or {}
        project, entity = monitor.experiment or run.name, monitor.wandb_entity or None
        same = state.get("project") == project and state.get("entity") == entity
        wandb_id = state["id"] if same and state.get("id") else secrets.token_hex(6)
        self._run = wandb.init(
            project=project, entity=entity, id=wandb_id, resume="allow", name=run.run_id,
            dir=os.environ.get("WANDB_DIR") or str(run.run_dir), config=run.config,
            tags=[f"{k}={v}"[:64] for k, v in run.labels.items()],
            settings=wandb.Settings(console="off"))  # the job's own log has every line already
        remember(run.run_dir, "wandb", {"id": wandb_id, "project": project, "entity": entity})
        # Charts against the harness's step: a resume that repeats steps since its checkpoint shows
        # them again, as metrics.jsonl does, instead of W&B dropping steps below its last one.
        self._run.define_metric("step")
        for prefix in self.PREFIXES:
            self._run.define_metric(prefix, step_metric="step")

    def log_row(self, row: dict[str, Any]) -> None:
        self._run.log({"step": row["step"], **scalars(row)})

    def log_checkpoint(self, row: dict[str, Any]) -> None:
        self._run.log({"step": row["step"], **checkpoint_scalars(row)})

    def close(self) -> None:
        """Called from the run's `finally`: an exception on its way out means the run failed."""
        self._run.finish(exit_code=1 if sys.exc_info()[0] else 0)
