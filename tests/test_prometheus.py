"""Live metrics for Prometheus (train/prometheus.py), checked through a real Prometheus server.

A 2-node job (the 2x1xCPU layout: two torchrun agents on this host, one rank each) serves two
exporters on one port range; Debian's prometheus, started on loopback, scrapes both every
second. The test waits for what it needs (scrapes, a committed checkpoint, an evaluation), freezes
rank 0 for a moment to see it show as hung from the other node, then asks the run to stop (a STOP
file), and compares what Prometheus stored, through its HTTP API, with metrics.jsonl and
checkpoints.jsonl. Waiting on conditions, not on a number of steps, keeps it independent of the
machine's speed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import FAST
from tests.distributed import REPO, finish, free_port, start, train
from tests.services import unavailable
from train import prometheus
from train.config import ConfigError, MonitorConfig
from train.distributed import World
from train.trackers import RunInfo

PROMETHEUS = "/usr/bin/prometheus"
DASHBOARD = REPO / "docs" / "grafana" / "train-harness.json"
GPU_ONLY = {"train_memory_reserved_bytes"}  # the CUDA allocator's: a CPU run has none
RUN_ID = "prom-run"


def free_ports(count: int) -> int:
    """The first of `count` consecutive ports free on loopback now."""
    for _ in range(50):
        first = free_port()
        if first + count > 65536:
            continue
        try:
            for port in range(first, first + count):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
    raise RuntimeError(f"no {count} consecutive free ports")


class Prometheus:
    """Debian's prometheus on loopback, scraping `targets` every second."""

    def __init__(self, workdir: Path, targets: list[str]) -> None:
        config = workdir / "prometheus.yml"
        config.write_text(json.dumps({  # JSON is YAML
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "scrape_configs": [{"job_name": "train", "static_configs": [{"targets": targets}]}],
        }))
        self.url = f"http://127.0.0.1:{free_port()}"
        with open(workdir / "prometheus.log", "w") as log:  # the child keeps its own copy of the file
            self.proc = subprocess.Popen(
                [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={workdir / 'tsdb'}",
                 f"--web.listen-address={self.url.removeprefix('http://')}"],
                stdout=log, stderr=subprocess.STDOUT)
        wait_for(lambda: self._ready(), 60, "prometheus to be ready", self.proc)

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def api(self, path: str, **params: Any) -> Any:
        query = urllib.parse.urlencode(params, doseq=True)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.load(response)
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query's result (a vector, or a matrix for a range selector)."""
        return self.api("query", query=expr, **({} if at is None else {"time": at}))["result"]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def wait_for(condition: Callable[[], Any], timeout_s: float, what: str, *procs: subprocess.Popen) -> Any:
    """Poll `condition` until it is truthy; fail naming `what` on timeout or when a process ended."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        ended = [p for p in procs if p.poll() is not None]
        if ended:
            pytest.fail(f"waiting for {what}: {ended[0].args[:3]} ended with {ended[0].returncode}", pytrace=False)
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout_s:g} s waiting for {what}", pytrace=False)


def rank_pid(agents: list[subprocess.Popen], rank: int) -> int:
    """The training process of `rank`, among those the torchrun agents started."""
    pids = {a.pid for a in agents}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
            environ = (stat.parent / "environ").read_bytes().split(b"\0") if parent in pids else []
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ:
            return int(stat.parent.name)
    raise AssertionError(f"no rank {rank} under the torchrun agents {sorted(pids)}")


def samples(result: list[dict[str, Any]]) -> dict[float, float]:
    """A one-series matrix result as {scrape time: value} (none yet: {})."""
    assert len(result) <= 1, result
    return {float(t): float(v) for series in result for t, v in series["values"]}


@pytest.fixture(scope="module")
def scraped(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path) -> dict[str, Any]:
    """A 2-node run scraped by Prometheus until it has logged rows, evaluated, committed a
    checkpoint, and shown a frozen rank 0 from node 1; then stopped. What Prometheus stored."""
    if not shutil.which(PROMETHEUS):
        unavailable("prometheus", f"{PROMETHEUS} not found (apt-get install prometheus)")
    tmp = tmp_path_factory.mktemp("prometheus")
    first = free_ports(2)
    server = Prometheus(tmp, [f"127.0.0.1:{first}", f"127.0.0.1:{first + 1}"])
    try:
        return _scrape_a_run(server, tmp, first, harness_cache)
    finally:
        server.stop()


def _scrape_a_run(server: Prometheus, tmp: Path, first_port: int, harness_cache: Path) -> dict[str, Any]:
    run_dir = tmp / RUN_ID
    overrides = [*FAST, "+cluster=2x1xCPU", f"run.dir={run_dir}", "trainer.max_steps=100000",
                 "trainer.global_batch_tokens=512", "trainer.eval_interval_steps=4", "checkpoint.interval=3",
                 "trainer.heartbeat_interval_s=1", "cluster.peak_flops_bf16=1e12",  # a made-up peak: MFU is served
                 f"monitor.prometheus_port={first_port}", "monitor.prometheus_port_count=2",
                 "monitor.prometheus_address=127.0.0.1"]
    rdzv = ["--nnodes=2", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "--rdzv-id=prometheus"]
    started = time.time()
    nodes = [start(overrides, cwd=tmp, nproc=1, cache_dir=harness_cache, torchrun_args=rdzv) for _ in range(2)]
    run = f'run="{RUN_ID}"'
    try:
        wait_for(lambda: (len(set(samples(server.query(f"train_step{{{run}}}[10m]")).values())) >= 3
                          and server.query(f"train_checkpoint_time_seconds{{{run}}}")
                          and server.query(f"train_val_loss{{{run}}}")
                          and len(server.query(f"train_heartbeat_age_seconds{{{run}}}")) == 3),
                 300, "scrapes of rows, an evaluation, a checkpoint and 3 heartbeat series", *nodes)
        healthy_at = time.time()
        # rank 0 frozen: its own exporter freezes with it; node 1's still reports its heartbeat age
        rank0 = rank_pid(nodes, 0)
        os.kill(rank0, signal.SIGSTOP)
        try:
            frozen = wait_for(lambda: server.query(
                f'train_heartbeat_age_seconds{{{run},rank="0"}} >= 3 and on(instance) train_info{{node="1"}}'),
                120, "node 1 to report rank 0's heartbeat age >= 3 s")
        finally:
            os.kill(rank0, signal.SIGCONT)
        wait_for(lambda: server.query(f'train_heartbeat_age_seconds{{{run},rank="0"}} < 3 '
                                      f'and on(instance) train_info{{node="1"}}'),
                 120, "rank 0's heartbeat age to fall again after it resumed", *nodes)
        (run_dir / "STOP").touch()
        output = "".join(finish(node, timeout_s=300).output for node in nodes)
    finally:
        stop_nodes(nodes)
    assert "stop requested (stop file" in output, output[-4000:]
    names = [*(name for name, _ in prometheus.ROW_SERIES.values()), "train_val_loss",
             *(name for name, _ in prometheus.CHECKPOINT_SERIES.values())]
    return {
        "raw": {name: server.query(f"{name}{{{run}}}[1h]") for name in names},
        "names": server.api("label/__name__/values", **{"match[]": f"{{{run}}}"}),
        "healthy": server.query(f"train_heartbeat_age_seconds{{{run}}}", at=healthy_at),
        "info": server.query(f"train_info{{{run}}}", at=healthy_at),
        "frozen": frozen,
        "panels": {expr: server.api("query_range", query=expr.replace("$run", RUN_ID), start=started,
                                    end=time.time(), step=1)["result"] for expr in dashboard_queries()},
        "runs": server.api("label/run/values", **{"match[]": "train_info"}),  # the dashboard's `run` variable
        "rows": {row["step"]: row for row in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())},
        "checkpoints": [json.loads(line) for line in (run_dir / "checkpoints.jsonl").read_text().splitlines()],
    }


def stop_nodes(nodes: list[subprocess.Popen]) -> None:
    """Whatever is still running after a failure: the workers, then their torchrun agents."""
    for node in nodes:
        if node.poll() is None:
            for rank in range(2):
                with contextlib.suppress(AssertionError, ProcessLookupError):
                    os.kill(rank_pid([node], rank), signal.SIGKILL)
            node.kill()
            node.communicate()


def test_prometheus_stores_the_rows_of_metrics_jsonl(scraped: dict[str, Any]) -> None:
    """Every run-level value Prometheus scraped equals that step's metrics.jsonl row."""
    steps = samples(scraped["raw"]["train_step"])
    assert len(set(steps.values())) >= 3
    compared = set()
    for key, (name, _) in prometheus.ROW_SERIES.items():
        if not scraped["raw"][name]:  # memory_reserved_bytes (CUDA only) and grad_norm when not finite
            assert all(scraped["rows"][int(step)][key] is None for step in steps.values()), name
            continue
        values = samples(scraped["raw"][name])
        assert values.keys() == steps.keys(), name  # the same scrapes: each from one row
        for at, step in steps.items():
            assert values[at] == scraped["rows"][int(step)][key], (name, step)
        compared.add(key)
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_s", "memory_bytes", "time"} <= compared
    evaluated = {row["val_loss"] for row in scraped["rows"].values() if "val_loss" in row}
    assert set(samples(scraped["raw"]["train_val_loss"]).values()) <= evaluated


def test_every_series_carries_the_run_labels(scraped: dict[str, Any]) -> None:
    for name, result in scraped["raw"].items():
        if name in GPU_ONLY:
            continue
        labels = result[0]["metric"]
        assert {k: labels[k] for k in ("run", "cluster", "model", "parallel")} == {
            "run": RUN_ID, "cluster": "2x1xCPU", "model": "tiny", "parallel": "ddp"}, name
    assert sorted(s["metric"]["node"] for s in scraped["info"]) == ["0", "1"]  # one exporter per node


def test_each_rank_heartbeat_age_is_served_and_a_frozen_rank_0_shows_from_the_other_node(
        scraped: dict[str, Any]) -> None:
    ages = {(s["metric"]["rank"], s["metric"]["instance"]): float(s["value"][1]) for s in scraped["healthy"]}
    assert sorted(rank for rank, _ in ages) == ["0", "0", "1"]  # node 1 watches rank 0 too
    assert all(age < 10 for age in ages.values()), ages  # interval 1 s: a live rank's stays under ~1.5 s
    for series in scraped["healthy"]:  # 2x1xCPU: rank r lives on node r
        labels = series["metric"]
        assert (labels["run"], labels["node"]) == (RUN_ID, labels["rank"]), labels
    assert float(scraped["frozen"][0]["value"][1]) >= 3


def test_the_checkpoint_time_is_the_commit_time_of_checkpoints_jsonl(scraped: dict[str, Any]) -> None:
    times = samples(scraped["raw"]["train_checkpoint_time_seconds"])
    steps = samples(scraped["raw"]["train_checkpoint_step"])
    committed = {row["time"]: row["step"] for row in scraped["checkpoints"]}
    assert times and set(times.values()) <= committed.keys()
    for at, value in times.items():
        assert steps[at] == committed[value]


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]


def test_every_query_of_the_grafana_dashboard_draws_this_run(scraped: dict[str, Any]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert {i["name"] for i in dashboard["__inputs"]} == {"DS_PROMETHEUS"}  # importable: the data source is asked for
    run_variable = next(v for v in dashboard["templating"]["list"] if v["name"] == "run")
    assert run_variable["query"]["query"] == "label_values(train_info, run)" and RUN_ID in scraped["runs"]
    named = set(re.findall(r"\btrain_[a-z_]+\b", " ".join(scraped["panels"])))
    assert len(named) >= 20, named
    assert named - GPU_ONLY <= set(scraped["names"]), named - set(scraped["names"])
    for expr, result in scraped["panels"].items():
        assert result or set(re.findall(r"\btrain_[a-z_]+\b", expr)) <= GPU_ONLY, expr
        assert all(series["metric"]["run"] == RUN_ID for series in result), expr


# --- the exporter alone: the port range -------------------------------------------------------

SINGLE = World(rank=0, world_size=1, local_rank=0, local_world_size=1, launched_by="single")


def _serve(tmp_path: Path, first: int, count: int) -> prometheus.Exporter | None:
    cfg = MonitorConfig(prometheus_port=first, prometheus_port_count=count, prometheus_address="127.0.0.1")
    info = RunInfo(run_id="unit", run_dir=tmp_path, name="t", config={}, labels={"cluster": "c"})
    return prometheus.serve(cfg, SINGLE, info, heartbeat_interval_s=0)


def _metrics(url: str) -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        return response.read().decode()


def test_a_taken_first_port_gives_the_next_one(tmp_path: Path) -> None:
    first = free_ports(2)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", first))
        taken.listen()
        exporter = _serve(tmp_path, first, 2)
    assert exporter is not None and exporter.url.endswith(f":{first + 1}/metrics")
    try:
        exporter.log_row({"step": 7, "loss": 2.5, "slow_ranks": [], "source_tokens": {}})
        text = _metrics(f"http://127.0.0.1:{first + 1}/metrics")
        assert 'train_loss{cluster="c",run="unit"} 2.5' in text
        assert 'train_step{cluster="c",run="unit"} 7.0' in text
    finally:
        exporter.close()
    again = _serve(tmp_path, first + 1, 1)  # closing frees the port: a sweep's next job in this process binds it
    assert again is not None and again.url.endswith(f":{first + 1}/metrics")
    again.close()


def test_a_resumed_run_serves_the_age_of_the_checkpoint_it_resumed_from(tmp_path: Path) -> None:
    committed = {"step": 50, "save_s": 1.5, "blocked_s": 0.5, "time": 1796000000.25, "url": "x"}
    (tmp_path / "checkpoints.jsonl").write_text(json.dumps({**committed, "step": 40}) + "\n"
                                                + json.dumps(committed) + "\n" + '{"step": 6')  # cut by a crash
    exporter = _serve(tmp_path, free_ports(1), 1)
    assert exporter is not None
    try:
        text = _metrics(exporter.url)
    finally:
        exporter.close()
    assert 'train_checkpoint_step{cluster="c",run="unit"} 50.0' in text
    assert 'train_checkpoint_time_seconds{cluster="c",run="unit"} 1.79600000025e+09' in text
    assert "train_checkpoint_age_seconds{" in text


def test_no_free_port_warns_once_and_training_goes_on(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    first = free_ports(1)
    with socket.socket() as taken, caplog.at_level(logging.WARNING, logger="train.prometheus"):
        taken.bind(("127.0.0.1", first))
        taken.listen()
        assert _serve(tmp_path, first, 1) is None
    assert [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING] == [
        (f"Prometheus exporter not started: every port of {first}-{first} on 127.0.0.1 is taken; raise "
         f"monitor.prometheus_port_count or choose another monitor.prometheus_port. Training goes on without it")]


def test_an_address_this_host_lacks_warns_and_training_goes_on(tmp_path: Path,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    cfg = MonitorConfig(prometheus_port=free_ports(1), prometheus_address="192.0.2.1")  # TEST-NET-1: no host's
    info = RunInfo(run_id="unit", run_dir=tmp_path, name="t", config={})
    with caplog.at_level(logging.WARNING, logger="train.prometheus"):
        assert prometheus.serve(cfg, SINGLE, info, heartbeat_interval_s=0) is None
    assert "cannot bind 192.0.2.1" in caplog.text and "set monitor.prometheus_address" in caplog.text


def test_a_range_past_the_last_port_is_refused() -> None:
    with pytest.raises(ConfigError, match="reaches port 65536, past 65535"):
        prometheus.check(MonitorConfig(prometheus_port=65535, prometheus_port_count=2))


def test_a_bad_port_range_stops_the_run_with_one_line(tmp_path: Path, harness_cache: Path) -> None:
    run = train([*FAST, f"run.dir={tmp_path}/run", "monitor.prometheus_port=65535", "monitor.prometheus_port_count=2"],
                cwd=tmp_path, cache_dir=harness_cache)
    assert run.returncode == 2, run.output[-3000:]
    assert ("monitor.prometheus_port=65535 with monitor.prometheus_port_count=2 reaches port 65536, past 65535; "
            "lower either") in run.output
    assert not (tmp_path / "run").exists()
