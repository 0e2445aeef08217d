"""The MLflow tracker (`monitor.loggers=[mlflow]`, `pip install 'train-harness[mlflow]'`).

Rows go to the server from a background thread with a bounded queue, and MLflow's HTTP retries
are bounded, so a slow or gone server never stalls a training step (train/trackers.py says what
happens when it fails).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from train.config import MonitorConfig
from train.trackers import RunInfo, checkpoint_scalars, failed, flat, read_state, remember, scalars, without_credentials

log = logging.getLogger(__name__)

# MLflow's HTTP client retries a request 7 times with exponential backoff and a 120 s timeout:
# minutes per request to a gone server. Set for this process unless the user set them.
MLFLOW_HTTP_BOUNDS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                      "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def param_key(key: str) -> str:
    """A config key as MLflow accepts it: letters, digits and _-. :/ only, at most 250 characters
    (a free-form mapping such as parallel.deepspeed_extra may hold others)."""
    from mlflow.utils.validation import MAX_ENTITY_KEY_LENGTH

    return re.sub(r"[^\w\-. :/]", "_", key)[:MAX_ENTITY_KEY_LENGTH]


class Sender:
    """Sends rows to a tracker from a background thread, so the training thread only queues them
    (each row a list of values). At most `max_rows` wait: beyond that, while the server is slow or
    gone, new rows are dropped with a warning. Rows that waited are sent together, up to
    `batch_rows` a request; a failed request is warned about once per outage, and sending goes on
    with the next rows. Every row is in metrics.jsonl anyway."""

    def __init__(self, name: str, send: Callable[[list[Any]], None], *, max_rows: int = 10_000,
                 batch_rows: int = 50) -> None:
        self.name = name
        self._send = send
        self._batch_rows = batch_rows
        self._queue: queue.Queue = queue.Queue(maxsize=max_rows)
        self.dropped = 0  # rows never queued: the queue was full
        self.lost = 0  # rows queued, but their request failed
        self.healthy = True  # the last request succeeded
        self._thread = threading.Thread(target=self._run, name=f"{name}-sender", daemon=True)
        self._thread.start()

    def put(self, row: list[Any]) -> None:
        try:
            self._queue.put_nowait(row)
        except queue.Full:
            self.dropped += 1
            if self.dropped == 1:
                log.warning("%s is not keeping up (%d rows waiting): rows are dropped until it does "
                            "(they are all in metrics.jsonl)", self.name, self._queue.maxsize)

    def _run(self) -> None:
        done = False
        while not done:
            rows = [self._queue.get()]
            while rows[-1] is not None and len(rows) < self._batch_rows:
                try:
                    rows.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            done = rows[-1] is None
            rows = [row for row in rows if row is not None]
            if rows:
                self._try(rows)

    def _try(self, rows: list[list[Any]]) -> None:
        try:
            self._send([value for row in rows for value in row])
        except Exception as exc:  # noqa: BLE001 - a tracker's failure must not reach the run
            self.lost += len(rows)
            if self.healthy:
                log.warning("%s: sending failed (%s); trying again with the next rows (all rows are in "
                            "metrics.jsonl)", self.name, failed(exc))
            self.healthy = False
            return
        if not self.healthy:
            log.warning("%s: sending again (%d rows lost so far)", self.name, self.lost)
        self.healthy = True

    def close(self, timeout_s: float) -> None:
        """Send what is queued, waiting at most `timeout_s`; say what did not go."""
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            pass
        self._thread.join(max(0.0, deadline - time.monotonic()))
        unsent = self._queue.qsize() if self._thread.is_alive() else 0
        if unsent or self.dropped or self.lost:
            log.warning("%s: %d rows dropped, %d lost, %d unsent after %g s (all rows are in metrics.jsonl)",
                        self.name, self.dropped, self.lost, unsent, timeout_s)


class MLflowTracker:
    """An MLflow run: the scalars as metrics, the resolved config as params (dotted keys), the
    run id and labels as tags. The server is monitor.mlflow_tracking_uri, else
    MLFLOW_TRACKING_URI, else a SQLite store in <run dir>/mlflow.db (`mlflow ui
    --backend-store-uri sqlite:///<run dir>/mlflow.db`). Credentials: MLFLOW_TRACKING_TOKEN or
    MLFLOW_TRACKING_USERNAME / PASSWORD, read by MLflow from the environment."""

    CLOSE_TIMEOUT_S = 30.0  # the end of the run waits this long at most for queued rows

    def __init__(self, run: RunInfo, monitor: MonitorConfig) -> None:
        for key, value in MLFLOW_HTTP_BOUNDS.items():
            os.environ.setdefault(key, value)
        from mlflow import MlflowClient
        from mlflow.entities import Metric

        self._metric = Metric
        local = not (monitor.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        uri = monitor.mlflow_tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{run.run_dir}/mlflow.db"
        self.where = without_credentials(uri)
        # trackers.json names the local store by its place in the run directory, which may move
        self._place = "<run dir>/mlflow.db" if local else self.where
        self._client = MlflowClient(tracking_uri=uri)
        experiment = monitor.experiment or run.name
        mlrun = self._reopen(read_state(run.run_dir).get("mlflow") or {})
        if mlrun is None:
            mlrun = self._client.create_run(
                self._experiment_id(experiment, run.run_dir / "mlartifacts" if local else None),
                run_name=run.run_id, tags={"run_id": run.run_id, "run_dir": str(run.run_dir), **run.labels})
            remember(run.run_dir, "mlflow", {"run_id": mlrun.info.run_id, "experiment_id": mlrun.info.experiment_id,
                                             "tracking_uri": self._place})
        self.run_id = mlrun.info.run_id
        self._log_params(mlrun.data.params, flat(run.config))
        self._sender = Sender(f"MLflow ({self.where})", self._send)
        log.info("MLflow run %s in experiment %s at %s", self.run_id, experiment, self.where)

    def _reopen(self, state: dict[str, Any]) -> Any:
        """The MLflow run this run directory began, set running again; None if there is none here."""
        if not state:
            return None
        if state.get("tracking_uri") != self._place:
            log.warning("MLflow: this run began at %s, now it logs to %s: a new MLflow run there",
                        state.get("tracking_uri"), self._place)
            return None
        from mlflow.exceptions import MlflowException

        try:
            self._client.update_run(state["run_id"], status="RUNNING")
            return self._client.get_run(state["run_id"])
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            log.warning("MLflow run %s (trackers.json) is gone from %s: a new MLflow run", state["run_id"], self.where)
            return None

    def _experiment_id(self, name: str, artifacts: Path | None) -> str:
        from mlflow.exceptions import MlflowException

        found = self._client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self._client.create_experiment(name, artifact_location=artifacts.as_uri() if artifacts else None)
        except MlflowException:  # another job of the sweep created it first
            found = self._client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def _log_params(self, logged: dict[str, str], config: dict[str, Any]) -> None:
        """The config as params, within MLflow's limits (value length, params per request). A
        resumed run's params stay as they began (MLflow refuses to change one): new keys are
        added, changed ones named in a log line (config.yaml has the new values)."""
        from mlflow.entities import Param
        from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

        params = {param_key(k): (v if isinstance(v, str) else json.dumps(v))[:MAX_PARAM_VAL_LENGTH]
                  for k, v in config.items()}
        changed = sorted(k for k, v in params.items() if k in logged and logged[k] != v)
        if changed:
            log.info("MLflow keeps the params run %s began with; changed since: %s", self.run_id, ", ".join(changed))
        new = [Param(k, v) for k, v in params.items() if k not in logged]
        for i in range(0, len(new), MAX_PARAMS_TAGS_PER_BATCH):
            self._client.log_batch(self.run_id, params=new[i:i + MAX_PARAMS_TAGS_PER_BATCH])

    def _send(self, metrics: list[Any]) -> None:
        from mlflow.utils.validation import MAX_METRICS_PER_BATCH

        for i in range(0, len(metrics), MAX_METRICS_PER_BATCH):
            self._client.log_batch(self.run_id, metrics=metrics[i:i + MAX_METRICS_PER_BATCH])

    def _queue(self, values: dict[str, float], row: dict[str, Any]) -> None:
        ms = int(row["time"] * 1000)
        self._sender.put([self._metric(k, v, ms, row["step"]) for k, v in values.items()])

    def log_row(self, row: dict[str, Any]) -> None:
        self._queue(scalars(row), row)

    def log_checkpoint(self, row: dict[str, Any]) -> None:
        self._queue(checkpoint_scalars(row), row)

    def close(self) -> None:
        """Called from the run's `finally`: an exception on its way out means the run failed."""
        self._sender.close(self.CLOSE_TIMEOUT_S)
        if self._sender.healthy:  # a gone server would hold the end of the run for its retries
            self._client.set_terminated(self.run_id, status="FAILED" if sys.exc_info()[0] else "FINISHED")
