"""Hydra sweeps: `python -m train.run -m ...` gives every job its own run directory and checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAST
from tests.distributed import base_env

SWEEP_FAST = [o for o in FAST if not o.startswith("trainer.max_steps=")]


def _sweep(tmp_path: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.run", "-m", *SWEEP_FAST, *overrides], cwd=tmp_path,
                          capture_output=True, text=True, env=base_env(cache), timeout=600)


def _steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_each_job_of_a_sweep_trains_from_scratch_in_its_own_run_directory(tmp_path: Path,
                                                                          harness_cache: Path) -> None:
    proc = _sweep(tmp_path, harness_cache, "trainer.max_steps=2,3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dirs = [Path(line.split(": ", 1)[1]) for line in proc.stdout.splitlines() if line.startswith("run_dir: ")]
    assert [d.name for d in run_dirs] == ["0", "1"] and run_dirs[0].parent == run_dirs[1].parent
    assert run_dirs[0].parent.parent == tmp_path / "runs"
    assert (run_dirs[0].parent / "multirun.yaml").exists()
    assert _steps(run_dirs[0]) == [1, 2] and _steps(run_dirs[1]) == [1, 2, 3]
    # each job's own checkpoints, and the second did not resume from the first
    assert (run_dirs[0] / "checkpoints" / "step-00000002" / "COMMITTED").exists()
    assert (run_dirs[1] / "checkpoints" / "step-00000003" / "COMMITTED").exists()
    assert not (run_dirs[1] / "checkpoints" / "step-00000002").exists()
    assert proc.stderr.count("starting from step 0") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # Hydra wrote nothing else here


def test_a_sweep_with_an_explicit_checkpoint_url_says_the_jobs_share_it(tmp_path: Path,
                                                                        harness_cache: Path) -> None:
    shared = tmp_path / "shared-ckpt"
    proc = _sweep(tmp_path, harness_cache, "trainer.max_steps=1,2", f"checkpoint.url={shared}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if "is set explicitly, so every job of this sweep" in line]
    assert len(warnings) == 2 and f"checkpoint.url={shared}" in warnings[0], proc.stderr[-3000:]
    # as said: the second job resumed from the first one's checkpoint
    assert f"resumed from {shared}/step-00000001 (step 1" in proc.stderr, proc.stderr[-3000:]
