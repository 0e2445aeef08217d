"""Batch jobs on a real Slurm (two nodes in two test hosts, see launch/dev/slurm.sh) through
launch.slurm: a 2-node gloo run, each node on its own address, finishes with its checkpoint and
metrics, a USR1 before the time limit
checkpoints, requeues and resumes in the same run directory, and a layout the partition
cannot hold is refused before anything is submitted."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import FAST
from tests.distributed import base_env
from tests.slurm_fixture import Slurm

TWO_NODES = ["+cluster=2x1xCPU", *FAST]


def _env(cache: Path | None) -> dict[str, str]:
    """The submitter's environment (the jobs get it through --export=ALL). The dev Slurm's two
    nodes share this machine's cores: one thread per rank, or the ranks' OpenMP threads
    oversubscribe the cores and steps stall for seconds."""
    return {**base_env(cache), "OMP_NUM_THREADS": "1"}


def _launch_slurm(args: list[str], cwd: Path, cache: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "launch.slurm", *args]


def _submit(args: list[str], cwd: Path, cache: Path | None = None,
            timeout_s: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(_launch_slurm(args, cwd), cwd=cwd, env=_env(cache), text=True,
                          capture_output=True, timeout=timeout_s)


def _field(stdout: str, key: str) -> str:
    [value] = [line.split(": ", 1)[1] for line in stdout.splitlines() if line.startswith(f"{key}: ")]
    return value


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def _committed(run_dir: Path) -> list[int]:
    return sorted(int(p.parent.name.split("-")[1])
                  for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))


def test_two_node_job_runs_to_completion(slurm: Slurm, tmp_path: Path, harness_cache: Path) -> None:
    job = _submit([*TWO_NODES, "--wait"], tmp_path, harness_cache)
    assert job.returncode == 0, job.stdout + job.stderr
    job_id = job.stdout.splitlines()[0].removeprefix("Submitted batch job ")
    run_dir = Path(_field(job.stdout, "run_dir"))
    assert run_dir == tmp_path / "runs" / f"slurm-{job_id}"  # the run id is Slurm's job id
    log = Path(_field(job.stdout, "log")).read_text()
    assert "world 2 = dp 2 x tp 1" in log, log[-3000:]
    # each node trained from its own host's address, over its interface to the other
    first = next(iter(slurm.nodes))  # the allocation's first: node 0, which hosts the rendezvous
    for rank, node in enumerate(slurm.nodes):
        address = slurm.nodes[node]
        assert f"address {address} on interface eth0 (auto: the route to {first} ({slurm.nodes[first]}))" in log
        assert f"--rdzv-endpoint={first}:" in log and f"--rdzv-conf=is_host={int(rank == 0)} --local-addr={address} " in log
    assert [row["step"] for row in _rows(run_dir)] == [1, 2, 3, 4, 5, 6]
    assert _committed(run_dir) == [6]
    assert json.loads((run_dir / "checkpoints/step-00000006/COMMITTED").read_text())["world_size"] == 2
    script = (run_dir / "sbatch.sh").read_text()  # the script that was submitted
    assert "#SBATCH --nodes=2" in script and " ".join(TWO_NODES) in script


def test_usr1_checkpoints_requeues_and_resumes(slurm: Slurm, tmp_path: Path,
                                               harness_cache: Path) -> None:
    proc = subprocess.Popen(_launch_slurm([*TWO_NODES, "trainer.max_steps=40", "--wait"], tmp_path),
                            cwd=tmp_path, env=_env(harness_cache), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        job_id = proc.stdout.readline().strip().removeprefix("Submitted batch job ")
        assert job_id.isdigit(), job_id
        run_dir = tmp_path / "runs" / f"slurm-{job_id}"
        _wait_until(lambda: _rows(run_dir) and _rows(run_dir)[-1]["step"] >= 2, proc, 300,
                    "metrics at step 2")
        # What Slurm does signal_lead_s before the time limit (--signal=B:USR1@N).
        subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)
        # Slurm holds the requeued job cred_expire+1 s (launch/dev/slurm.sh sets 10 s) and then
        # starts it by itself. Releasing it earlier makes the nodes refuse its launch ("Job
        # credential revoked": the previous attempt's credential is still revoked there).
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            subprocess.run(["scancel", job_id])
            proc.kill()
    log = (tmp_path / "runs" / f"slurm-{job_id}.out").read_text()
    assert proc.returncode == 0, out + err + log[-4000:]
    assert "attempt 2" in log and "requeueing job" in log, log[-4000:]
    [stopped_at, final] = _committed(run_dir)  # the stop's checkpoint and the end's
    assert final == 40 and 2 <= stopped_at < 40
    steps = [row["step"] for row in _rows(run_dir)]
    assert steps == list(range(1, 41)), steps  # resumed after stopped_at: nothing lost or repeated
    assert list((tmp_path / "runs").glob("slurm-*/")) == [run_dir]  # one run dir for both attempts
    assert not (run_dir / "STOP").exists()


def test_layout_the_partition_cannot_hold_is_refused(slurm: Slurm, tmp_path: Path) -> None:
    before = slurm.submissions()
    cases = {
        "+cluster=2x8xH100": "needs 2 node(s) with 8 GPUs each; partition debug has 0 such node(s) of 2",
        "+cluster=4xCPU": "needs 1 node(s) with 4 CPUs each; partition debug has 0 such node(s) of 2",
    }
    for cluster, message in cases.items():
        job = _submit([cluster, "trainer.micro_batch_size=1"], tmp_path)
        assert job.returncode == 2, job.stdout + job.stderr
        assert message in job.stderr and "not submitted" in job.stderr, job.stderr
    more_nodes = _submit([*TWO_NODES, "cluster.nodes=4"], tmp_path)
    assert more_nodes.returncode == 2
    assert "needs 4 node(s) with 1 CPUs each; partition debug has 2" in more_nodes.stderr
    bad_key = _submit([*TWO_NODES, "trainer.max_stpes=5"], tmp_path)
    assert bad_key.returncode == 2 and "Key 'max_stpes' not in 'TrainerConfig'" in bad_key.stderr
    other = _submit([*TWO_NODES, "slurm.partition=gpu"], tmp_path)
    assert other.returncode == 2 and "slurm.partition=gpu: no such partition" in other.stderr
    assert slurm.submissions() == before  # sbatch was never reached
    assert not (tmp_path / "runs").exists()


def _wait_until(ready, proc: subprocess.Popen, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ready():
            return
        if proc.poll() is not None:
            raise AssertionError(f"launch.slurm ended before {what}: {proc.communicate()}")
        time.sleep(0.2)
    raise AssertionError(f"no {what} after {timeout_s} s")
