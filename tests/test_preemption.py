"""A stop request (signal or STOP file) checkpoints at the next step boundary and exits so
that a restart resumes with nothing lost: the resumed steps equal an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from tests.conftest import FAST
from tests.distributed import Run, finish, start, train

LONG = [*FAST, "trainer.max_steps=40", "checkpoint.interval=0"]


def _wait_for_step(run_dir: Path, step: int, proc, timeout_s: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it was asked to stop"
        if metrics.exists():
            rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
            if rows and rows[-1]["step"] >= step:
                return
        time.sleep(0.05)
    raise AssertionError(f"no step {step} in {metrics} after {timeout_s} s")


def _committed(run_dir: Path) -> list[str]:
    return sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/COMMITTED"))


def _assert_resumed_run_matches(run_dir: Path, whole: Run, tmp_path: Path, cache: Path) -> None:
    stopped_at = int(_committed(run_dir)[-1].split("-")[1])
    resumed = train([*LONG, f"run.dir={run_dir}"], cwd=tmp_path, cache_dir=cache)
    assert resumed.returncode == 0, resumed.output[-3000:]
    assert f"step {stopped_at}" in resumed.output
    rows = [r for r in resumed.metrics if r["step"] > stopped_at]
    assert rows[-1]["step"] == 40
    for row in rows[1:]:  # the first resumed row may average a partial window
        assert row["loss"] == whole.losses[row["step"]], row


def test_sigterm_checkpoints_and_exits_for_a_restart(tmp_path: Path, harness_cache: Path) -> None:
    whole = train([*LONG, f"run.dir={tmp_path}/whole"], cwd=tmp_path, cache_dir=harness_cache)
    assert whole.returncode == 0, whole.output[-3000:]
    run_dir = tmp_path / "cut"
    proc = start([*LONG, f"run.dir={run_dir}"], cwd=tmp_path, cache_dir=harness_cache)
    _wait_for_step(run_dir, 3, proc)
    os.kill(proc.pid, signal.SIGTERM)
    stopped = finish(proc)
    assert stopped.returncode == 75, stopped.output[-3000:]
    assert "stop requested (signal SIGTERM)" in stopped.output
    assert stopped.stdout.splitlines()[-1] == f"run_dir: {run_dir}"
    assert len(_committed(run_dir)) == 1 and _committed(run_dir) != ["step-00000040"]
    _assert_resumed_run_matches(run_dir, whole, tmp_path, harness_cache)


def test_stop_file_stops_every_rank_at_the_same_step(tmp_path: Path, harness_cache: Path) -> None:
    run_dir = tmp_path / "run"
    proc = start([*LONG, f"run.dir={run_dir}"], cwd=tmp_path, nproc=2, cache_dir=harness_cache)
    _wait_for_step(run_dir, 3, proc)
    (run_dir / "STOP").touch()
    stopped = finish(proc)
    assert stopped.returncode != 0  # torchrun reports the workers' exit 75 as a failure
    assert "exitcode  : 75" in stopped.output
    [checkpoint] = _committed(run_dir)
    assert json.loads((run_dir / "checkpoints" / checkpoint / "COMMITTED").read_text())["world_size"] == 2
    again = train([*LONG, f"run.dir={run_dir}"], cwd=tmp_path, cache_dir=harness_cache)
    assert again.returncode == 0, again.output[-3000:]
    assert not (run_dir / "STOP").exists()  # a resumed run does not stop on the old request
    assert again.metrics[-1]["step"] == 40
