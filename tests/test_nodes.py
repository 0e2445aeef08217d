"""Several nodes for real: each node runs in its own test host (tests/hosts_fixture.py), with its
own address, so the nodes meet over a network, started with the very lines `python -m launch`
prints for them and nothing set by hand. A job on two hosts trains exactly as the same world on
one; a rendezvous host that cannot be reached, or an interface that does not exist, stops a node
at once with one line."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.ceph_fixture import Ceph
from tests.conftest import FAST
from tests.distributed import base_env, free_port, torchrun, train
from tests.hosts_fixture import Host, Hosts, hosts_fixture, python_path  # noqa: F401 - the fixture

NETWORK_VARIABLES = ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "NCCL_IB_HCA", "MASTER_ADDR", "MASTER_PORT")


def _env(cache: Path, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a shell on the node: none of the network variables set by hand."""
    env = {**base_env(cache), "PATH": python_path(), **(extra or {})}
    for key in NETWORK_VARIABLES:
        env.pop(key, None)
    return env


def printed_lines(overrides: list[str], rendezvous: str, cwd: Path) -> list[str]:
    """The per-node lines `python -m launch` prints for this layout, node 0 first."""
    out = subprocess.run([sys.executable, "-m", "launch", *overrides, f"--rdzv-endpoint={rendezvous}",
                          "--rdzv-id=test-nodes"], cwd=cwd, capture_output=True, text=True,
                         env=base_env(), timeout=120)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if not line.startswith("#")]
    assert all(line.startswith("python -m launch ") for line in lines), out.stdout
    return lines


def start_nodes(hosts: list[Host], lines: list[str], cwd: Path, env: dict[str, str]) -> list[subprocess.Popen]:
    """Line K in host K, as a user would paste it into a shell there (each in its own session, so
    that everything a node started can be killed at once)."""
    return [subprocess.Popen(host.command(["bash", "-c", line]), cwd=cwd, env=env, text=True,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
            for host, line in zip(hosts, lines)]


def kill_node(proc: subprocess.Popen) -> None:
    """SIGKILL every process the node's command started: launcher, torchrun agent, workers."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def finish(procs: list[subprocess.Popen], timeout_s: float = 600) -> list[tuple[int, str, str]]:
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout_s)
            results.append((proc.returncode, out, err))
    finally:
        for proc in procs:
            kill_node(proc)
            if proc.poll() is None:
                proc.communicate()
    return results


def last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")] if path.exists() else []
    return max((row["step"] for row in rows), default=0)


def wait_until(ready, procs: list[subprocess.Popen], what: str, timeout_s: float = 300) -> None:
    """A safety net against hangs, not a speed requirement."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if any(proc.poll() is not None for proc in procs):
            raise AssertionError(f"a node ended before {what}: {finish(procs, 60)}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout_s} s")


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return {row["step"]: row["loss"] for row in rows if "loss" in row}


def test_two_hosts_train_as_the_same_world_on_one(hosts: Hosts, tmp_path: Path, harness_cache: Path,
                                                  ceph: Ceph) -> None:
    """Two processes on each of two hosts, checkpoints in the test Ceph reached from each host over
    its bridge: the losses of 4 ranks on one host. (One process per host is what the lost-node and
    cut-link tests below run; the lost-node test compares its steps before the loss with 2 ranks on
    one host too.)"""
    node0 = hosts.hosts[0]
    checkpoints = ceph.unique("nodes")
    overrides = ["+cluster=2x1xCPU", "cluster.procs_per_node=2", "cluster.name=2x2xCPU", *FAST,
                 f"run.dir={tmp_path}/nodes", f"checkpoint.url={checkpoints}"]
    lines = printed_lines(overrides, f"{node0.name}:{free_port()}", tmp_path)
    assert len(lines) == 2 and all(f"--node-rank={k}" in line for k, line in enumerate(lines)), lines
    env = _env(harness_cache, {"S3_ENDPOINT_URL": ceph.endpoint_at(hosts.bridge)})
    results = finish(start_nodes(hosts.hosts, lines, tmp_path, env))
    for k, (host, (code, out, err)) in enumerate(zip(hosts.hosts, results)):
        assert code == 0, f"node {k}:\n{err[-4000:]}"
        # each node says which interface and address it trains over: its own, on the bridge
        assert re.search(rf"launch: node {k} of 2 \(.*\): address {re.escape(host.address)} on interface "
                         rf"eth0 \(auto", err), err[:2000]
        assert f"--local-addr={host.address} " in err
    log = results[0][2] + results[1][2]
    assert "world 4 = dp 4 x tp 1" in log
    reference = torchrun(4, ["+cluster=4xCPU", *FAST, f"run.dir={tmp_path}/one"], cwd=tmp_path,
                         cache_dir=harness_cache)
    assert reference.returncode == 0, reference.output[-3000:]
    two_hosts = losses(tmp_path / "nodes")
    assert list(two_hosts) == [1, 2, 3, 4, 5, 6]
    assert two_hosts == pytest.approx(reference.losses, rel=1e-6, abs=1e-6)
    assert ceph.fs().exists(f"{checkpoints}/step-00000006/COMMITTED".removeprefix("s3://"))


def _the_error(stderr: str) -> str:
    """The launcher's one error line; nothing else ran: no traceback, torchrun never started."""
    lines = [line for line in stderr.splitlines() if line.startswith("launch: ")]
    assert len(lines) == 1 and "Traceback" not in stderr and "+ torchrun" not in stderr, stderr
    return lines[0]


def test_unreachable_rendezvous_or_missing_interface_stops_a_node_at_once(hosts: Hosts, tmp_path: Path) -> None:
    node0, node1 = hosts.hosts
    port = free_port()
    overrides = ["+cluster=2x1xCPU", *FAST]
    env = _env(tmp_path)

    node1_line = printed_lines(overrides, f"{node0.name}:{port}", tmp_path)[1]

    def node1_runs(extra: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(node1.command(["bash", "-c", " ".join([node1_line, *extra])]), cwd=tmp_path,
                              env=env, text=True, capture_output=True, timeout=120)

    node0.set_link(False)  # node 0's cable cut: nothing answers at its address
    try:
        cut = node1_runs([])
    finally:
        node0.set_link(True)
    assert cut.returncode == 2, cut.stderr
    line = _the_error(cut.stderr)
    assert line.startswith(f"launch: rendezvous {node0.name}:{port} ({node0.address}) is unreachable from ")
    assert f"through interface eth0 ({node1.address}" in line

    missing = node1_runs(["cluster.network_interface=ib0"])
    assert missing.returncode == 2, missing.stderr
    line = _the_error(missing.stderr)
    assert line.startswith("launch: cluster.network_interface=ib0: ") and "no such interface" in line
    assert f"rendezvous {node0.name}:{port}" in line and f"eth0 {node1.address}" in line

    elsewhere = subprocess.run(node1.command([sys.executable, "-m", "launch", *overrides, "--run", "--node-rank=0",
                                              f"--rdzv-endpoint={node0.name}:{port}", "--rdzv-id=x"]),
                               cwd=tmp_path, env=env, text=True, capture_output=True, timeout=120)
    assert elsewhere.returncode == 2  # node 0's line run on another host
    assert f"this node hosts the rendezvous (node 0), but {node0.address} is not one of its addresses" \
        in elsewhere.stderr


def test_a_cut_link_stops_the_job_naming_the_lost_node(hosts: Hosts, tmp_path: Path, harness_cache: Path) -> None:
    """Node 1's cable is cut mid-run (`ip link set ... down`) in a job without elasticity: node 0
    gives up after trainer.collective_timeout_s and names the rank that stopped answering, its
    node's address and the last step every rank finished, instead of hanging."""
    node0, node1 = hosts.hosts
    timeout_s = 8
    run_dir = tmp_path / "run"
    overrides = ["+cluster=2x1xCPU", *FAST, "trainer.max_steps=10000", f"trainer.collective_timeout_s={timeout_s}",
                 "trainer.heartbeat_interval_s=0.5", f"run.dir={run_dir}"]
    lines = printed_lines(overrides, f"{node0.name}:{free_port()}", tmp_path)
    procs = start_nodes(hosts.hosts, lines, tmp_path, _env(harness_cache))
    try:
        wait_until(lambda: last_step(run_dir) >= 3, procs, "step 3")
        node1.set_link(False)
        code, _, err = finish(procs[:1], timeout_s=300)[0]  # node 0 gives up by itself
    finally:
        node1.set_link(True)
        for proc in procs:  # node 1 is still waiting for node 0: nothing tells it to stop
            kill_node(proc)
            proc.communicate()
    assert code != 0
    line = next((line for line in err.splitlines() if "stopped answering" in line), "")
    finished = last_step(run_dir)  # rank 0 logs each step as it finishes it
    assert line.startswith("[rank0]") and f") at {node1.address} stopped answering after step {finished} " \
        f"(every rank had finished step {finished})" in line, err[-3000:]
    assert f"no answer within trainer.collective_timeout_s={timeout_s} " in line


def test_a_lost_node_leaves_the_others_to_finish_with_every_sample_once(hosts: Hosts, tmp_path: Path,
                                                                        harness_cache: Path) -> None:
    """cluster.min_nodes=1 on two hosts: every process of host 1 is SIGKILLed at a random step.
    Host 0 names the lost rank, re-rendezvouses alone, resumes from the last committed checkpoint
    with the same global batch (accumulation doubled) and finishes the run. Its losses equal a
    reference on one host that ran the same steps on 2 ranks, then switched to 1 at the same
    step: the same samples, in the same order, none lost or repeated."""
    node0, node1 = hosts.hosts
    seed = random.randrange(1 << 16)
    kill_after = 3 + seed % 5
    print(f"node 1 killed after step {kill_after} (seed {seed})")
    steps = 10
    common = [*FAST, f"trainer.max_steps={steps}", "checkpoint.interval=1", "trainer.heartbeat_interval_s=0.5",
              "trainer.collective_timeout_s=30"]
    run_dir = tmp_path / "elastic"
    lines = printed_lines(["+cluster=2x1xCPU", "cluster.min_nodes=1", *common, f"run.dir={run_dir}"],
                          f"{node0.name}:{free_port()}", tmp_path)
    procs = start_nodes(hosts.hosts, lines, tmp_path, _env(harness_cache))
    try:
        wait_until(lambda: last_step(run_dir) >= kill_after, procs, f"step {kill_after}")
        everything = subprocess.run(["ip", "netns", "pids", node1.name], capture_output=True, text=True,
                                    check=True).stdout.split()  # launcher, torchrun agent and worker
        for pid in everything:
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)
        [(code, _, err)] = finish(procs[:1])
    finally:
        for proc in procs:
            kill_node(proc)
            proc.communicate()
    assert code == 0, err[-4000:]
    assert f") at {node1.address} stopped answering after step " in err
    resumed = re.search(r"resumed from \S+ \(step (\d+), written by 2 ranks\)", err)
    assert resumed, err[-4000:]
    committed = int(resumed.group(1))
    assert "world 1 = dp 1 x tp 1 | native engine, ddp | global batch 2048 tokens, accum 8" in err
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    logged = [row["step"] for row in rows]
    # the first attempt logged steps 1..committed, or one more that was never committed (trained again)
    restart = next((i for i in range(1, len(logged)) if logged[i] <= logged[i - 1]), committed)
    assert logged[:restart] in (list(range(1, committed + 1)), list(range(1, committed + 2))), logged
    assert logged[restart:] == list(range(committed + 1, steps + 1)), logged  # nothing skipped or trained twice after
    assert rows[-1]["tokens_seen"] == steps * 2048

    before = torchrun(2, ["+cluster=2xCPU", *common, f"trainer.stop_after_steps={committed}",
                          f"run.dir={tmp_path}/ref"], cwd=tmp_path, cache_dir=harness_cache)
    assert before.returncode == 0, before.output[-3000:]
    after = train([*common, f"run.dir={tmp_path}/ref"], cwd=tmp_path, cache_dir=harness_cache)
    assert after.returncode == 0 and "written by 2 ranks" in after.output, after.output[-3000:]
    elastic = {row["step"]: row["loss"] for row in rows[:committed]} | {row["step"]: row["loss"]
                                                                          for row in rows[restart:]}
    assert elastic == pytest.approx(after.losses, rel=1e-6, abs=1e-6)
