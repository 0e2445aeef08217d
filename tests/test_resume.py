"""A stopped run resumes where it stopped: same steps, same data, same numbers.

On one CPU rank in fp32 the resumed steps are bitwise equal to an uninterrupted run: the
checkpoint restores weights, AdamW moments, step (hence the learning rate) and the data
position exactly, and nothing else feeds the computation.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FAST
from tests.distributed import Run, torchrun, train

EIGHT = [*FAST, "trainer.max_steps=8", "checkpoint.interval=2"]


def _ok(run: Run) -> Run:
    assert run.returncode == 0, run.output[-4000:]
    return run


def _steps(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path) -> Run:
    """The uninterrupted 8-step run on one rank that resumed runs must equal."""
    tmp = tmp_path_factory.mktemp("whole")
    return _ok(train([*EIGHT, f"run.dir={tmp}/whole"], cwd=tmp, cache_dir=harness_cache))


def test_resume_continues_bitwise_identical(tmp_path: Path, harness_cache: Path, whole: Run) -> None:
    first = _ok(train([*EIGHT, f"run.dir={tmp_path}/cut", "trainer.stop_after_steps=4"],
                      cwd=tmp_path, cache_dir=harness_cache))
    assert max(first.losses) == 4
    assert _steps(first.run_dir) == ["step-00000002", "step-00000004"]
    second = _ok(train([*EIGHT, f"run.dir={tmp_path}/cut"], cwd=tmp_path, cache_dir=harness_cache))
    assert "resumed from" in second.output and "step 4" in second.output
    assert "tokens per step" not in second.output  # the same global batch: no warning
    resumed = {s: l for s, l in second.losses.items()}
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6, 7, 8]  # metrics.jsonl is appended to
    for step in range(5, 9):
        assert resumed[step] == whole.losses[step], (step, resumed, whole.losses)


def test_uncommitted_checkpoint_is_never_loaded(tmp_path: Path, harness_cache: Path, whole: Run) -> None:
    """Also: an async save (step 2, written while steps 3 and 4 train) holds step 2's state."""
    cut = _ok(train([*EIGHT, f"run.dir={tmp_path}/cut", "trainer.stop_after_steps=4",
                     "checkpoint.async_save=true"], cwd=tmp_path, cache_dir=harness_cache))
    assert "writing it in the background" in cut.output
    assert _steps(cut.run_dir) == ["step-00000002", "step-00000004"]
    # As if the process died after writing step 4's data but before committing it.
    (cut.run_dir / "checkpoints" / "step-00000004" / "COMMITTED").unlink()
    again = _ok(train([*EIGHT, f"run.dir={tmp_path}/cut"], cwd=tmp_path, cache_dir=harness_cache))
    assert "resumed from" in again.output and "step 2" in again.output
    rows = [r for r in again.metrics if r["step"] >= 3][-6:]  # the resumed run's steps 3..8
    assert [r["step"] for r in rows] == [3, 4, 5, 6, 7, 8]
    for row in rows:
        assert row["loss"] == whole.losses[row["step"]]
    assert (again.run_dir / "checkpoints" / "step-00000004" / "COMMITTED").exists()


def test_resuming_with_another_global_batch_says_so_with_the_one_to_keep(tmp_path: Path,
                                                                        harness_cache: Path) -> None:
    """A global batch derived from the layout (trainer.global_batch_tokens=0) changes with the
    layout; resuming under another one trains on, with a warning naming the checkpoint's."""
    derived = [*FAST, "trainer.global_batch_tokens=0", f"run.dir={tmp_path}/run"]  # 4 x 64 tokens per rank
    _ok(train([*derived, "trainer.max_steps=2"], cwd=tmp_path, cache_dir=harness_cache))
    resumed = _ok(train([*derived, "trainer.max_steps=3", "trainer.micro_batch_size=8"], cwd=tmp_path,
                        cache_dir=harness_cache))
    assert ("trained 256 tokens per step (mean over 2 steps); this run trains 512 per step" in resumed.output
            and "set trainer.global_batch_tokens=256" in resumed.output), resumed.output[-3000:]
    assert max(resumed.losses) == 3


def test_resume_on_fewer_ranks_continues_data(tmp_path: Path, harness_cache: Path) -> None:
    """Written by 4 FSDP ranks (saving in the background), resumed on 2: same data position,
    same losses (fp tolerance)."""
    fsdp = [*EIGHT, "parallel=fsdp"]
    whole = _ok(torchrun(2, [*fsdp, f"run.dir={tmp_path}/whole"], cwd=tmp_path,
                         cache_dir=harness_cache))
    cut = _ok(torchrun(4, [*fsdp, f"run.dir={tmp_path}/cut", "trainer.stop_after_steps=4",
                           "checkpoint.async_save=true"], cwd=tmp_path, cache_dir=harness_cache))
    assert _steps(cut.run_dir) == ["step-00000002", "step-00000004"]
    resumed = _ok(torchrun(2, [*fsdp, f"run.dir={tmp_path}/cut"], cwd=tmp_path,
                           cache_dir=harness_cache))
    assert "written by 4 ranks" in resumed.output
    for step in range(5, 9):
        # rtol as in test_engines: only the order of fp32 sums differs between 4 and 2 ranks
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=2e-4)
