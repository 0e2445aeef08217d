"""Experiment trackers beyond TensorBoard (`monitor.loggers`): MLflow against a real tracking
server (`mlflow server` on loopback with a SQLite store, started once for the module), W&B in
offline mode (its run files read back in W&B's own record format). One run stopped half way and
resumed serves both: a resumed run continues the same tracker run. A missing package or an
unreachable server is one line; no tracker credential reaches a file.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.conftest import FAST
from tests.distributed import REPO, Run, free_port, train
from tests.services import unavailable

# Fake credentials in the runs' environment: none may appear in anything they leave.
SECRETS = {
    "MLFLOW_TRACKING_TOKEN": "mlflow-token-5b0c7e1d9a",
    "WANDB_API_KEY": "wandbkey" + "4f2e9c1a7b" * 3 + "12",  # W&B keys are 40 characters
    "AWS_SECRET_ACCESS_KEY": "aws-secret-8d3f6a2c41",
}
SECOND_HALF_SECRETS = {"MLFLOW_TRACKING_USERNAME": "harness-user", "MLFLOW_TRACKING_PASSWORD": "mlflow-pass-e7a19c"}
EXPERIMENT = "trackers-test"
TRACKED = [*FAST, "optim.lr=0.002", f"monitor.experiment={EXPERIMENT}",
           "monitor.loggers=[tensorboard,mlflow,wandb]"]


def _require(package: str) -> None:
    if importlib.util.find_spec(package) is None:
        unavailable(package, f"the {package} package is not installed (pip install -e '.[test]')")


def _stop(proc: subprocess.Popen) -> None:
    """The server and what it started (uvicorn, its job consumers: its own session); a throw-away
    store needs no graceful stop (SIGTERM takes it 20 s)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory):
    """`mlflow server` with a SQLite store on a free loopback port; yields (URI, store directory)."""
    _require("mlflow")
    store = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    with open(store / "server.log", "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{store}/mlflow.db",
             "--default-artifact-root", str(store / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"], cwd=store, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        uri = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 240
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=5) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                _stop(proc)
                pytest.fail(f"mlflow server did not start:\n{(store / 'server.log').read_text()[-3000:]}", pytrace=False)
            time.sleep(1)
        yield uri, store
        _stop(proc)


@dataclass
class Tracked:
    first: Run  # stopped after step 3 (trainer.stop_after_steps)
    second: Run  # the same run directory resumed to step 6
    run_dir: Path
    wandb_home: Path  # W&B's config, cache and data directories
    mlflow_uri: str
    mlflow_store: Path


def _wandb_env(home: Path) -> dict[str, str]:
    return {"WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(home / "config"),
            "WANDB_CACHE_DIR": str(home / "cache"), "WANDB_DATA_DIR": str(home / "data")}


@pytest.fixture(scope="module")
def tracked(mlflow_server, tmp_path_factory: pytest.TempPathFactory) -> Tracked:
    """A run with TensorBoard, MLflow and W&B, stopped after step 3 and resumed to step 6 (the
    second half with MLflow's user and password instead of its token)."""
    _require("wandb")
    uri, store = mlflow_server
    cwd = tmp_path_factory.mktemp("tracked")
    env = {"MLFLOW_TRACKING_URI": uri, **_wandb_env(cwd / "wandb-home"), **SECRETS}
    overrides = [*TRACKED, f"run.dir={cwd}/run"]
    first = train([*overrides, "trainer.stop_after_steps=3"], cwd=cwd, env=env)
    assert first.returncode == 0 and sorted(first.losses) == [1, 2, 3], first.output[-4000:]
    env.pop("MLFLOW_TRACKING_TOKEN")
    second = train(overrides, cwd=cwd, env={**env, **SECOND_HALF_SECRETS})
    assert second.returncode == 0, second.output[-4000:]
    assert "resumed from" in second.output and sorted(second.losses) == [1, 2, 3, 4, 5, 6]
    return Tracked(first, second, second.run_dir, cwd / "wandb-home", uri, store)


def test_mlflow_run_continues_across_a_resume(tracked: Tracked) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracked.mlflow_uri)
    experiment = client.get_experiment_by_name(EXPERIMENT)
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1  # the resume continued it: one MLflow run, not two
    run = runs[0]
    state = json.loads((tracked.run_dir / "trackers.json").read_text())["mlflow"]
    assert state == {"run_id": run.info.run_id, "experiment_id": experiment.experiment_id,
                     "tracking_uri": tracked.mlflow_uri}
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == tracked.second.losses  # steps 1-3 from the first process, 4-6 from the second
    checkpoints = [json.loads(line) for line in (tracked.run_dir / "checkpoints.jsonl").read_text().splitlines()]
    saves = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "checkpoint/save_s")}
    assert saves == {row["step"]: row["save_s"] for row in checkpoints} and sorted(saves) == [3, 6]
    assert run.data.params["optim.lr"] == "0.002" and run.data.params["trainer.max_steps"] == "6"
    assert run.data.params["monitor.loggers"] == '["tensorboard", "mlflow", "wandb"]'
    tags = run.data.tags
    assert tags["mlflow.runName"] == tags["run_id"] == "run" and tags["run_dir"] == str(tracked.run_dir)
    assert (tags["cluster"], tags["model"], tags["parallel"]) == ("local-1xCPU", "tiny", "ddp")
    assert run.info.status == "FINISHED"


def wandb_records(path: Path):
    """The records of a W&B run file (run-<id>.wandb): LevelDB's log format (32 KiB blocks of
    chunks with a 7-byte header: CRC, length, type) after W&B's own 7-byte file header, each
    record a wandb.proto Record."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    ident, magic, _version = struct.unpack("<4sHB", data[:7])
    assert (ident, magic) == (b":W&B", 0xBEE1)
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if left < 7 or (kind == 0 and length == 0):  # the rest of the block is padding
            pos += left
            continue
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full, first | middle, last
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def test_wandb_offline_run_continues_across_a_resume(tracked: Tracked) -> None:
    files = sorted((tracked.run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 2  # one per process, both under the run's one W&B id
    wandb_id = json.loads((tracked.run_dir / "trackers.json").read_text())["wandb"]["id"]
    losses: dict[int, float] = {}
    for path in files:
        records = list(wandb_records(path))
        (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        assert (run.run_id, run.display_name, run.project) == (wandb_id, "run", EXPERIMENT)
        assert {"cluster=local-1xCPU", "model=tiny", "parallel=ddp"} <= set(run.tags)
        config = {item.key: json.loads(item.value_json) for item in run.config.update}
        assert config["optim"]["lr"] == 0.002 and config["run"]["dir"] == str(tracked.run_dir)
        for r in records:
            if r.WhichOneof("record_type") == "history":
                # a key with "/" comes as nested_key: W&B would otherwise read it as a path
                row = {item.key or "/".join(item.nested_key): json.loads(item.value_json)
                       for item in r.history.item}
                if "train/loss" in row:
                    losses[row["step"]] = row["train/loss"]
    assert losses == tracked.second.losses  # both halves, step by step


def test_tracker_credentials_reach_no_file(tracked: Tracked) -> None:
    """Tokens, keys and passwords in the environment: in no file under the run directory
    (trackers.json, wandb/, tensorboard/, config.yaml, ...), W&B's own directories, the MLflow
    server's store, or the runs' output."""
    values = [v.encode() for v in [*SECRETS.values(), *SECOND_HALF_SECRETS.values()]]
    written = {"output": (tracked.first.output + tracked.second.output).encode()}
    for root in (tracked.run_dir, tracked.wandb_home, tracked.mlflow_store):
        written.update({str(p): p.read_bytes() for p in root.rglob("*") if p.is_file()})
    names = " ".join(written)
    assert "trackers.json" in names and ".wandb" in names and "mlflow.db" in names and "tfevents" in names
    assert [name for name, data in written.items() if any(v in data for v in values)] == []


def test_a_tracking_uri_with_a_password_is_refused_without_repeating_it() -> None:
    from train.config import ConfigError, MonitorConfig
    from train.trackers import check_trackers

    with pytest.raises(ConfigError) as refused:
        check_trackers(MonitorConfig(mlflow_tracking_uri="https://me:s3cr3t-pw@mlflow.example:5000/"))
    assert "monitor.mlflow_tracking_uri=https://mlflow.example:5000/ carries a credential" in str(refused.value)
    assert "s3cr3t-pw" not in str(refused.value) and "MLFLOW_TRACKING_PASSWORD" in str(refused.value)


def test_missing_tracker_package_is_one_line_naming_the_install(tmp_path: Path) -> None:
    """A package that fails to import (a real ImportError, from a broken copy ahead of the real
    one on the path): exit 2 before the model is built, and the run directory is left as it was.
    (wandb goes through the same loop over monitor.loggers.)"""
    package = "mlflow"
    fake = tmp_path / "broken" / package
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(f"raise ImportError('{package} is broken in this environment')\n")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n')
    run = train([*FAST, f"run.dir={run_dir}", f"monitor.loggers=[tensorboard,{package}]"], cwd=tmp_path,
                env={"PYTHONPATH": f"{fake.parent}{os.pathsep}{REPO}"}, timeout_s=300)
    assert run.returncode == 2, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in run.output
    assert f"the {package} package does not import here ({package} is broken in this environment): " \
           f"pip install 'train-harness[{package}]'" in errors[0]
    assert "model tiny" not in run.output  # stopped before building anything
    assert [p.name for p in run_dir.iterdir()] == ["metrics.jsonl"]
    assert (run_dir / "metrics.jsonl").read_text() == '{"step": 1, "loss": 5.0}\n'


def test_unreachable_mlflow_server_stops_a_fresh_run(tmp_path: Path) -> None:
    _require("mlflow")
    uri = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    run = train([*FAST, f"run.dir={tmp_path}/run", "monitor.loggers=[mlflow]"], cwd=tmp_path,
                env={"MLFLOW_TRACKING_URI": uri}, timeout_s=300)
    assert run.returncode == 2, run.output[-3000:]
    errors = [line for line in run.output.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "Traceback" not in run.output
    assert "monitor.loggers: mlflow could not be opened" in errors[0] and "127.0.0.1" in errors[0]
    assert "drop mlflow from monitor.loggers" in errors[0]
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == ""  # not a step trained


def test_without_a_server_mlflow_logs_in_the_run_directory_and_a_resume_survives_a_gone_one(
        tmp_path: Path) -> None:
    """No tracking URI: a SQLite store in the run directory, which may move. A resume that cannot
    reach its tracker warns and trains on (a requeued job nobody watches must not stop for an
    observer); the next one that can continues the same MLflow run."""
    from mlflow import MlflowClient

    _require("mlflow")
    first_dir, run_dir = tmp_path / "first", tmp_path / "moved"
    overrides = [*FAST, "monitor.loggers=[mlflow]"]
    first = train([*overrides, f"run.dir={first_dir}", "trainer.stop_after_steps=3"], cwd=tmp_path,
                  env={"MLFLOW_TRACKING_URI": ""})
    assert first.returncode == 0 and sorted(first.losses) == [1, 2, 3], first.output[-3000:]
    first_dir.rename(run_dir)
    gone = train([*overrides, f"run.dir={run_dir}"], cwd=tmp_path,
                 env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{free_port()}"})
    assert gone.returncode == 0, gone.output[-3000:]
    assert "mlflow could not be opened" in gone.output and "this resumed run trains on without it" in gone.output
    back = train([*overrides, f"run.dir={run_dir}", "trainer.max_steps=8"], cwd=tmp_path,
                 env={"MLFLOW_TRACKING_URI": ""})
    assert back.returncode == 0 and sorted(back.losses) == list(range(1, 9)), back.output[-3000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("train").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "train/loss")}
    assert history == {step: loss for step, loss in back.losses.items() if step not in (4, 5, 6)}


class CuttingProxy:
    """TCP in front of the MLflow server that cuts it off as a network blip would: the first
    request that carries `cut_on` is aborted before the server sees it, and so are the next
    `refuse` connections (MLflow's client tries a request 3 times with our bounds)."""

    def __init__(self, backend_port: int, cut_on: bytes, refuse: int) -> None:
        self.backend_port = backend_port
        self.cut_on, self.refuse = cut_on, refuse
        self.cut = False
        self.aborted = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._client, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut and self.refuse:
            self.refuse -= 1
            self.aborted += 1
            writer.transport.abort()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, inspect: bool) -> None:
            try:
                while data := await src.read(65536):
                    if inspect and not self.cut and self.cut_on in data:
                        self.cut = True
                        self.aborted += 1
                        writer.transport.abort()
                        up_writer.transport.abort()
                        return
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer, True), pipe(up_reader, writer, False))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def test_mlflow_connection_lost_mid_run_costs_warnings_not_steps(mlflow_server, tmp_path: Path) -> None:
    """The connection to the server is cut when the first row goes out, for all 3 tries of that
    request: the row is lost, with a warning; the run trains every step, and every row after it
    reaches the server."""
    from mlflow import MlflowClient

    uri, _ = mlflow_server
    proxy = CuttingProxy(int(uri.rsplit(":", 1)[1]), cut_on=b"train/loss", refuse=2)
    run = train([*FAST, f"run.dir={tmp_path}/run", "monitor.loggers=[mlflow]", "monitor.experiment=trackers-cut"],
                cwd=tmp_path, env={"MLFLOW_TRACKING_URI": f"http://127.0.0.1:{proxy.port}"})
    proxy.close()
    assert run.returncode == 0, run.output[-3000:]
    assert sorted(run.losses) == [1, 2, 3, 4, 5, 6] and proxy.aborted == 3
    assert "sending failed" in run.output and "sending again (1 rows lost so far)" in run.output
    client = MlflowClient(tracking_uri=uri)
    (mlrun,) = client.search_runs([client.get_experiment_by_name("trackers-cut").experiment_id])
    history = {m.step: m.value for m in client.get_metric_history(mlrun.info.run_id, "train/loss")}
    assert history == {step: loss for step, loss in run.losses.items() if step != 1}
