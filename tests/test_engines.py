"""The same run gives the same losses whichever native engine and world size trains it.

Every comparison runs the real entry point (`python -m train.run`, under torchrun for more
than one rank) with the same seed and global batch; only the layout changes.

Tolerance: fp32 on CPU. Splitting the global batch over ranks or a matmul over TP shards
changes the order of floating-point sums (about 1e-7 relative per reduction); AdamW then
carries that through 6 steps. A relative 2e-4 on the loss is far below what a real bug
(wrong gradient scaling, a lost micro-batch, a mis-sharded weight) produces: those move the
loss in the second or third digit from step 2 on.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import FAST
from tests.distributed import Run, torchrun, train

RTOL = 2e-4


def _ok(run: Run) -> Run:
    assert run.returncode == 0, run.output[-4000:]
    assert run.run_dir is not None and len(run.losses) == 6, run.output[-4000:]
    return run


def _assert_same_losses(a: Run, b: Run) -> None:
    for step, loss in a.losses.items():
        assert b.losses[step] == pytest.approx(loss, rel=RTOL), (step, a.losses, b.losses)


@pytest.fixture(scope="module")
def single_rank(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path) -> Run:
    cwd = tmp_path_factory.mktemp("single")
    return _ok(train([*FAST, "parallel=ddp"], cwd=cwd, cache_dir=harness_cache))


def test_ddp_on_two_ranks_matches_one_rank(single_rank: Run, ddp_two_ranks: Run) -> None:
    _assert_same_losses(single_rank, ddp_two_ranks)
    # and it learns: a falling loss, not two equally broken runs
    assert ddp_two_ranks.losses[6] < ddp_two_ranks.losses[1] - 0.3


def test_fsdp_matches_ddp(ddp_two_ranks: Run, tmp_path: Path, harness_cache: Path) -> None:
    fsdp = _ok(torchrun(2, [*FAST, "parallel=fsdp"], cwd=tmp_path, cache_dir=harness_cache))
    _assert_same_losses(ddp_two_ranks, fsdp)


def test_tensor_parallel_matches_no_tensor_parallel(single_rank: Run, tmp_path: Path,
                                                     harness_cache: Path) -> None:
    tp = _ok(torchrun(2, [*FAST, "parallel=tp"], cwd=tmp_path, cache_dir=harness_cache))
    _assert_same_losses(single_rank, tp)


def test_fsdp_x_tp_on_four_ranks_matches_one_rank(single_rank: Run, tmp_path: Path,
                                                   harness_cache: Path) -> None:
    two_d = _ok(torchrun(4, [*FAST, "parallel=fsdp_tp", "parallel.tp=2"], cwd=tmp_path,
                         cache_dir=harness_cache))
    _assert_same_losses(single_rank, two_d)
    config = (two_d.run_dir / "config.yaml").read_text()
    assert "dp: 2" in config and "tp: 2" in config
