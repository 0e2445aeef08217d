"""The embedded default, `python -m train.run` with nothing else, as a new user runs it."""

from __future__ import annotations

import math
from pathlib import Path

from tests.distributed import train


def test_default_run_learns_and_keeps_the_output_contract(tmp_path: Path, harness_cache: Path) -> None:
    run = train([], cwd=tmp_path, cache_dir=harness_cache, timeout_s=900)
    assert run.returncode == 0, run.output[-4000:]
    assert run.run_dir is not None and run.run_dir.is_dir()
    assert run.run_dir.parent == tmp_path / "runs"  # runs/<run id>, relative to where it started
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # nothing else (no run.log)
    # the output contract
    assert run.stdout.splitlines()[-1] == f"run_dir: {run.run_dir}"
    assert (run.run_dir / "config.yaml").exists()
    assert list((run.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    rows = run.metrics
    for row in rows:
        assert {"step", "loss", "tokens_per_s", "mfu"} <= row.keys()
        assert row["mfu"] is None  # no known peak FLOP/s on a CPU
        assert row["tokens_per_s"] > 0
    # it learns: from about ln(256) = 5.55 for random bytes to under 2.5
    assert abs(rows[0]["loss"] - math.log(256)) < 0.6, rows[0]
    assert rows[-1]["loss"] < 2.5, rows[-1]
    assert rows[-1]["val_loss"] < 2.6, rows[-1]
    # and ends with a committed checkpoint of its last step
    final = run.run_dir / "checkpoints" / f"step-{rows[-1]['step']:08d}"
    assert (final / "COMMITTED").exists()
