from __future__ import annotations

import os
from pathlib import Path

import pytest

# The real services, started at most once per test session whichever modules use them
# (a fixture imported into several test modules would be a separate one in each).
from tests.ceph_fixture import ceph  # noqa: F401
from tests.slurm_fixture import slurm  # noqa: F401

# A small, fast configuration of the real harness: the builtin byte corpus, the tiny model,
# short sequences, a log row every step, no periodic evaluation or checkpoint.
FAST = [
    "data.seq_len=64",
    "data.builtin_max_bytes=2000000",
    "trainer.global_batch_tokens=2048",
    "trainer.micro_batch_size=4",
    "trainer.max_steps=6",
    "trainer.log_interval_steps=1",
    "trainer.eval_interval_steps=0",
    "trainer.eval_batches=1",
    "checkpoint.interval=0",
]


@pytest.fixture(scope="session")
def harness_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One builtin-dataset cache for the whole session, so the corpus is built once."""
    return tmp_path_factory.mktemp("harness-cache")


@pytest.fixture(scope="session", autouse=True)
def no_home_cache(harness_cache: Path) -> None:
    """Every run the tests start caches under the session's directory, never in ~/.cache: a
    cache left by another session must not serve shards a test means to fetch."""
    os.environ["TRAIN_HARNESS_CACHE"] = str(harness_cache)


@pytest.fixture(scope="session")
def ddp_two_ranks(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path):
    """FAST under torchrun on 2 ranks (DDP): the reference several files compare with."""
    from tests.distributed import torchrun

    cwd = tmp_path_factory.mktemp("ddp2")
    run = torchrun(2, [*FAST, "parallel=ddp"], cwd=cwd, cache_dir=harness_cache)
    assert run.returncode == 0, run.output[-4000:]
    return run
