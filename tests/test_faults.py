"""Nothing lost when a rank dies: real SIGKILLs under `torchrun --max-restarts`.

One 2-rank job is killed twice: first in the middle of a checkpoint save (the rank is frozen
with SIGSTOP as soon as the save's directory appears, the test checks the save is not yet
committed, then kills it), then at a training step after the restart, drawn from a fixed seed
(SEED; the failure message names it and the choices, so a failure reproduces). torchrun
restarts the workers each time; they resume from the latest committed checkpoint. The job
must end with the same loss at every step and bitwise the same final weights and optimizer
state as a job that was never killed, with checkpoints on local disk or in the real Ceph.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests.ceph_fixture import Ceph
from tests.conftest import FAST
from tests.distributed import Run, _torchrun_cmd, base_env, finish, start, torchrun
from train.distributed import RESTART_STORE_FIX
from train.preemption import EXIT_PREEMPTED, STOP_FILE

STEPS = 16  # saves at 2, 4, ..., 16: several chances to catch one before its commit
JOB = [*FAST, f"trainer.max_steps={STEPS}", "checkpoint.interval=2", "checkpoint.keep_last=0"]
SEED = 20261126  # which ranks are killed and at which step; fixed, so a failure reproduces
# The interrupted save is one of 4, 6, ..., LAST_SAVE_TO_KILL; the second kill falls in a step
# after the restart has trained past it and before the last step: always at least 2 to pick from.
LAST_SAVE_TO_KILL = STEPS - 6


def _ok(run: Run) -> Run:
    assert run.returncode == 0, run.output[-4000:]
    return run


@pytest.fixture(scope="module")
def never_killed(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path) -> Run:
    tmp = tmp_path_factory.mktemp("never-killed")
    return _ok(torchrun(2, [*JOB, f"run.dir={tmp}/run"], cwd=tmp, cache_dir=harness_cache))


def _workers(torchrun_pid: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun runs now."""
    found = {}
    for child in Path(f"/proc/{torchrun_pid}/task/{torchrun_pid}/children").read_text().split():
        try:
            env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        except (FileNotFoundError, ProcessLookupError):
            continue  # exited meanwhile
        ranks = [int(v[5:]) for v in env if v.startswith(b"RANK=")]
        if ranks:
            found[ranks[0]] = int(child)
    return found


def _wait(what: str, condition: Callable[[], object], proc: subprocess.Popen, timeout_s: float = 180):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"the job ended while waiting for {what}"
        time.sleep(0.002)
    raise AssertionError(f"timed out waiting for {what}")


def _state(pid: int) -> str:
    """The process's state letter (R, S, T: stopped, Z: zombie, ...), or "gone"."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return "gone"


def _last_step(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines() if metrics.exists() else []
    return json.loads(lines[-1])["step"] if lines else 0


class Checkpoints:
    """The job's checkpoint directory, local or in the bucket, as the test sees it."""

    def __init__(self, url: str, fs=None) -> None:
        self.url, self.fs = url, fs

    def exists(self, name: str) -> bool:
        if self.fs is None:
            return os.path.exists(f"{self.url}/{name}")
        self.fs.invalidate_cache()
        return self.fs.exists(f"{self.url}/{name}")

    def steps(self) -> list[str]:
        if self.fs is None:
            return sorted(p.name for p in Path(self.url).glob("step-*"))
        self.fs.invalidate_cache()
        return sorted(p.rsplit("/", 1)[-1] for p in self.fs.ls(self.url) if "/step-" in p)

    def local_copy(self, step: int, into: Path) -> Path:
        name = f"step-{step:08d}"
        if self.fs is None:
            return Path(self.url) / name
        self.fs.get(f"{self.url}/{name}", str(into / name), recursive=True)
        return into / name


def _kill_during_a_save(proc: subprocess.Popen, ckpts: Checkpoints, rank: int) -> int:
    """Freeze `rank` as a save's directory appears; if that save is not committed a moment
    later, the rank is inside it: SIGKILL it there. Returns the step of the killed save."""
    for step in range(4, LAST_SAVE_TO_KILL + 1, 2):  # step 2 stays: a committed checkpoint to go back to
        name = f"step-{step:08d}"
        _wait(f"the save of step {step}", lambda name=name: ckpts.exists(name), proc)
        pid = _workers(proc.pid)[rank]
        os.kill(pid, signal.SIGSTOP)
        time.sleep(0.5)  # the other rank cannot commit without the frozen one
        if not ckpts.exists(f"{name}/COMMITTED"):
            os.kill(pid, signal.SIGKILL)
            return step
        os.kill(pid, signal.SIGCONT)  # the save had already finished: try the next one
    raise AssertionError("no save was caught before its commit")


def _kill_step(killed_save: int, rng: random.Random) -> int:
    """A step after the restart has trained again past the killed save, before the last step."""
    assert 4 <= killed_save <= LAST_SAVE_TO_KILL, killed_save
    return rng.randrange(killed_save + 2, STEPS - 2)  # never empty: killed_save + 2 < STEPS - 2


def _kill_at_a_step(proc: subprocess.Popen, run_dir: Path, rank: int, step: int) -> None:
    old = set(_workers(proc.pid).values())
    new = _wait("the restarted workers",
                lambda: (w := _workers(proc.pid)) and len(w) == 2 and not set(w.values()) & old and w,
                proc)
    _wait(f"step {step}", lambda: _last_step(run_dir) >= step, proc)
    os.kill(new[rank], signal.SIGKILL)


def _final_state(path: Path, into: Path) -> dict[str, torch.Tensor]:
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(path, into)
    flat = {}

    def walk(prefix: str, value) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}", inner)
        elif isinstance(value, torch.Tensor):
            flat[prefix] = value

    walk("", torch.load(into, weights_only=False))
    return flat


def _killed_twice(tmp_path: Path, never_killed: Run, harness_cache: Path, ckpt_url: str,
                  ckpts: Checkpoints) -> None:
    rng = random.Random(SEED)
    first, second = rng.choice([0, 1]), rng.choice([0, 1])
    run_dir = tmp_path / "run"
    proc = start([*JOB, f"run.dir={run_dir}", f"checkpoint.url={ckpt_url}"], cwd=tmp_path, nproc=2,
                 cache_dir=harness_cache, torchrun_args=["--max-restarts=2"],
                 env={RESTART_STORE_FIX: "1"})
    killed_save = killed_step = None

    def choices() -> str:
        return f"(SEED {SEED}: rank {first} killed saving step {killed_save}, rank {second} at step {killed_step})"

    try:
        killed_save = _kill_during_a_save(proc, ckpts, first)
        killed_step = _kill_step(killed_save, rng)
        _kill_at_a_step(proc, run_dir, second, killed_step)
        job = finish(proc)
    except AssertionError as exc:
        raise AssertionError(f"{choices()} {exc}") from exc
    finally:
        if proc.poll() is None:
            proc.kill()
    why = choices()
    assert job.returncode == 0, f"{why}\n{job.output[-4000:]}"
    # The interrupted save was never loaded: the first restart went back to the one before it,
    # found the half-written directory, removed it and saved that step again.
    assert f"removing interrupted checkpoint {ckpt_url}/step-{killed_save:08d}" in job.output, why
    assert f"resumed from {ckpt_url}/step-{killed_save - 2:08d}" in job.output, why
    assert ckpts.steps() == [f"step-{s:08d}" for s in range(2, STEPS + 1, 2)], why
    assert all(ckpts.exists(f"{s}/COMMITTED") for s in ckpts.steps()), why
    # Every step's loss, including the steps trained twice, equals the never-killed job's.
    rows = job.metrics
    assert {r["step"] for r in rows} == set(range(1, STEPS + 1)), why
    for row in rows:
        assert row["loss"] == never_killed.losses[row["step"]], (why, row)
    # Bitwise the same final weights and optimizer state.
    expected = _final_state(never_killed.run_dir / "checkpoints" / f"step-{STEPS:08d}", tmp_path / "a.pt")
    got = _final_state(ckpts.local_copy(STEPS, tmp_path), tmp_path / "b.pt")
    assert expected.keys() == got.keys() and len(expected) > 10
    for key, tensor in expected.items():
        assert torch.equal(got[key], tensor), (why, key)


def test_ranks_killed_mid_save_and_mid_step_lose_nothing_local(tmp_path: Path, never_killed: Run,
                                                               harness_cache: Path) -> None:
    url = str(tmp_path / "run" / "checkpoints")
    _killed_twice(tmp_path, never_killed, harness_cache, url, Checkpoints(url))


def test_ranks_killed_mid_save_and_mid_step_lose_nothing_s3(tmp_path: Path, never_killed: Run,
                                                            harness_cache: Path, ceph: Ceph) -> None:
    url = ceph.unique("killed") + "/checkpoints"
    _killed_twice(tmp_path, never_killed, harness_cache, url, Checkpoints(url, ceph.fs()))


def test_frozen_rank_is_named_within_the_collective_timeout(tmp_path: Path, harness_cache: Path) -> None:
    """Rank 1 is frozen (SIGSTOP) mid-run: rank 0 gives up after trainer.collective_timeout_s and
    says which rank stopped and after which step, instead of hanging.

    What the message guarantees (train/heartbeat.py): the step named is the last one rank 0
    finished when its collective failed, and every rank had finished it. Rank 0 writes a metrics
    row for every step as soon as it finishes it (no collective in between here: no evaluation,
    no skipped-shard count), so its last row is exactly the step named."""
    timeout_s = 8
    run_dir = tmp_path / "run"
    proc = start([*FAST, "trainer.max_steps=10000", f"trainer.collective_timeout_s={timeout_s}",
                  "trainer.heartbeat_interval_s=0.5", f"run.dir={run_dir}"], cwd=tmp_path, nproc=2,
                 cache_dir=harness_cache)
    try:
        _wait("step 3", lambda: _last_step(run_dir) >= 3, proc)
        workers = _workers(proc.pid)
        os.kill(workers[1], signal.SIGSTOP)
        step = _last_step(run_dir)
        # A safety net, not a speed requirement: far beyond the timeout, so a hang fails here.
        _wait("rank 0 to give up", lambda: _state(workers[0]) in ("Z", "gone"), proc, timeout_s=300)
        frozen = _state(workers[1])  # rank 0 gave up on its own: rank 1 was still frozen, not dead
        os.kill(workers[1], signal.SIGKILL)
        job = finish(proc)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert frozen == "T", frozen
    assert job.returncode != 0
    line = next((l for l in job.output.splitlines() if "stopped answering" in l), "")
    assert "[rank0]" in line and f"rank 1 (host {socket.gethostname()}, pid {workers[1]})" in line, \
        job.output[-3000:]
    finished = _last_step(run_dir)  # rank 0's last finished step
    assert f"stopped answering after step {finished} (every rank had finished step {finished}). " \
           f"rank 0 gave up waiting in a collective after step {finished}: no answer within " \
           f"trainer.collective_timeout_s={timeout_s} (" in line, (line, finished)
    # Rank 0 got at most one step past what it had logged when rank 1 froze: without rank 1 it
    # cannot finish another step.
    assert step <= finished <= step + 1, (step, finished)
    assert "exitcode  : 3" in job.output  # the launcher sees a failure it can restart from


def test_nonfinite_steps_are_skipped_leaving_weights_unchanged_then_stop(tmp_path: Path,
                                                                         harness_cache: Path) -> None:
    """A learning rate of 1e20 breaks the model at step 1; every later gradient is NaN. With
    on_nonfinite_loss=skip those steps change nothing, and the run stops after the limit."""
    from tests.distributed import train

    run = train([*FAST, "optim.lr=1e20", "optim.warmup_steps=1", "trainer.on_nonfinite_loss=skip",
                 "trainer.max_skipped_steps=2", "checkpoint.interval=1", f"run.dir={tmp_path}/run"],
                cwd=tmp_path, cache_dir=harness_cache)
    assert run.returncode == 2
    for step in (2, 3):
        assert f"gradient norm nan at step {step} (non-finite gradients): step skipped" in run.output
    assert "at step 4 (non-finite gradients): 3 non-finite steps in a row (more than " \
           "trainer.max_skipped_steps=2)" in run.output
    ckpts = tmp_path / "run" / "checkpoints"
    states = [_final_state(ckpts / f"step-{s:08d}", tmp_path / f"{s}.pt") for s in (1, 2, 3)]
    weights = [k for k in states[0] if ".model." in k or k.startswith(".app.model")]
    assert weights
    for key in states[0]:
        if "step" not in key:  # the optimizer's step counter is a tensor too
            assert torch.equal(states[1][key], states[0][key]) and torch.equal(states[2][key], states[0][key]), key


def test_a_throttled_rank_is_named_a_straggler_then_cleared(tmp_path: Path, harness_cache: Path) -> None:
    """Rank 1's CPU is throttled from outside (SIGSTOP/SIGCONT, 80 % of every 50 ms, the way
    cpulimit does it) from step 4 on: rank 0 names it a straggler in its log and in the
    metrics rows' `slow_ranks` only after trainer.straggler_steps throttled steps, never names
    rank 0, and says when rank 1 is no longer slow once the throttle ends."""
    run_dir, steps = tmp_path / "run", 6
    cmd = _torchrun_cmd(2, [*FAST, "trainer.max_steps=100000", "trainer.log_interval_steps=2",
                            "trainer.heartbeat_interval_s=0.2", f"trainer.straggler_steps={steps}",
                            f"run.dir={run_dir}"], None)
    rows = lambda: [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()] \
        if (run_dir / "metrics.jsonl").exists() else []  # noqa: E731
    throttling = threading.Event()

    def throttle(pid: int) -> None:
        while throttling.is_set():
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.04)
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.01)

    with open(tmp_path / "output.txt", "w") as out:  # a file, not a pipe nobody reads while it runs
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=base_env(harness_cache), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
        try:
            _wait("step 4", lambda: _last_step(run_dir) >= 4, proc)
            rank1 = _workers(proc.pid)[1]
            throttling.set()
            thread = threading.Thread(target=throttle, args=(rank1,), daemon=True)
            thread.start()
            throttled_from = _last_step(run_dir)  # rank 1 is slow in every step after this one
            named = _wait("rank 1 named", lambda: next((r for r in rows() if r["slow_ranks"]), None), proc)
            throttling.clear()
            thread.join()
            os.kill(rank1, signal.SIGCONT)
            _wait("rank 1 cleared", lambda: rows()[-1]["step"] > named["step"] and not rows()[-1]["slow_ranks"],
                  proc)
            (run_dir / STOP_FILE).touch()  # a graceful stop: a checkpoint, then the preempted exit status
            proc.wait(timeout=300)
        finally:
            throttling.clear()
            if proc.poll() is None:
                proc.kill()
    output = (tmp_path / "output.txt").read_text()
    assert f"exitcode  : {EXIT_PREEMPTED}" in output, output[-3000:]  # it stopped because it was asked to
    assert named["slow_ranks"] == [1], named
    assert named["step"] >= throttled_from + steps, (named, throttled_from)  # slow for straggler_steps first
    assert all(r["slow_ranks"] in ([], [1]) for r in rows()), rows()  # rank 0 is never named
    line = next((l for l in output.splitlines() if "is a straggler" in l), "")
    assert f"rank 1 (host {socket.gethostname()}, pid {rank1}) at " in line, output[-3000:]
    assert "rank 1 (host " in output.split("is a straggler", 1)[1] and "is no longer slow" in output, output[-3000:]
