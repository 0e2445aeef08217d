"""Data and checkpoints in a real Ceph, through RGW's S3 API: what a user running against an
object store relies on. Faults are made on the real service (RGW killed, an object
overwritten, a closed port, a wrong key), never with a mock.
"""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.ceph_fixture import Ceph
from tests.conftest import FAST
from tests.distributed import REPO, Run, base_env, finish, free_port, spawn, start, torchrun, train

CORPUS = Path(logging.__file__).parent  # ~180 kB of text that every Python has
SHARDS = [*FAST, "data=shards", "model.vocab_size=256", "data.seq_len=64", "data.num_workers=0",
          "storage=ceph"]
EIGHT = [*SHARDS, "trainer.max_steps=8", "checkpoint.interval=2"]


@pytest.fixture(autouse=True)
def own_shard_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`storage=ceph` caches shards in $TRAIN_HARNESS_CACHE/shards: give each test its own, so no
    run finds shards an earlier test cached (they are named by sha256, and every dataset here is
    the same corpus) and nothing lands in ~/.cache."""
    monkeypatch.setenv("TRAIN_HARNESS_CACHE", str(tmp_path / "harness-cache"))
    return tmp_path / "harness-cache"


def _ok(run: Run) -> Run:
    assert run.returncode == 0, run.output[-4000:]
    return run


def _prepare(output: str, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "storage.prepare", "--input", str(CORPUS), "--output", output,
         "--shard-tokens", "16384", "--val-fraction", "0.3", *extra],
        capture_output=True, text=True, env=base_env(), cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def s3_dataset(ceph: Ceph, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    """The same corpus prepared into the bucket and into a local directory."""
    url = ceph.unique("datasets/logging")
    local = tmp_path_factory.mktemp("local-ds") / "logging"
    for out in (url, str(local)):
        proc = _prepare(out)
        assert proc.returncode == 0, proc.stderr[-3000:]
    return url, local


def test_prepare_to_s3_writes_the_dataset_and_refuses_a_second_run(ceph: Ceph, s3_dataset) -> None:
    url, local = s3_dataset
    fs = ceph.fs()
    names = sorted(p.rsplit("/", 1)[-1] for p in fs.find(url.removeprefix("s3://")))
    assert names == sorted(p.name for p in local.rglob("*") if p.is_file())  # same shards + index.json
    for shard in local.rglob("*.bin"):
        assert fs.cat_file(f"{url}/{shard.relative_to(local).as_posix()}") == shard.read_bytes()
    again = _prepare(url)
    assert again.returncode == 1
    assert f"{url} already holds a dataset (index.json exists); pass --overwrite" in again.stderr


def test_training_from_s3_equals_training_from_local_disk(tmp_path: Path, s3_dataset) -> None:
    url, local = s3_dataset
    workers = ["data.num_workers=2"]  # spawned workers must get the S3 settings too
    remote = _ok(train([*SHARDS, *workers, f"data.url={url}", f"run.dir={tmp_path}/s3"], cwd=tmp_path))
    disk = _ok(train([*SHARDS, *workers, f"data.url={local}", f"run.dir={tmp_path}/disk"], cwd=tmp_path))
    assert remote.losses == disk.losses and len(remote.losses) == 6


def test_half_written_dataset_in_s3_is_refused(ceph: Ceph, tmp_path: Path, s3_dataset) -> None:
    url, _ = s3_dataset
    half = ceph.unique("datasets/half")
    fs = ceph.fs()
    fs.copy(f"{url}/train/", f"{half}/train/", recursive=True)  # shards, but no index.json
    run = train([*SHARDS, f"data.url={half}", f"run.dir={tmp_path}/run"], cwd=tmp_path)
    assert run.returncode == 2
    assert f"dataset {half} is incomplete" in run.output and "no index.json" in run.output


def test_checkpoints_in_s3_save_on_two_ranks_resume_on_one(ceph: Ceph, tmp_path: Path, s3_dataset) -> None:
    """Written by 2 ranks into the bucket, resumed on 1 from the latest *committed* one."""
    url, _ = s3_dataset
    ckpt = ceph.unique("run") + "/checkpoints"
    data = f"data.url={url}"
    whole = _ok(train([*EIGHT, data, f"run.dir={tmp_path}/whole"], cwd=tmp_path))
    _ok(torchrun(2, [*EIGHT, data, f"run.dir={tmp_path}/cut", f"checkpoint.url={ckpt}",
                     "trainer.stop_after_steps=6"], cwd=tmp_path, env=ceph.env))
    fs = ceph.fs()
    steps = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(ckpt.removeprefix("s3://")))
    assert steps == ["latest", "step-00000002", "step-00000004", "step-00000006"]
    # As if the save of step 6 died before its commit: it must be ignored.
    fs.rm(f"{ckpt}/step-00000006/COMMITTED")
    resumed = _ok(train([*EIGHT, data, f"run.dir={tmp_path}/cut", f"checkpoint.url={ckpt}"],
                        cwd=tmp_path, env=ceph.env))
    assert "resumed from" in resumed.output and f"{ckpt}/step-00000004" in resumed.output
    assert "written by 2 ranks" in resumed.output
    for step in range(5, 9):
        # DDP on 2 ranks vs 1: only the order of fp32 sums differs (as in test_resume)
        assert resumed.losses[step] == pytest.approx(whole.losses[step], rel=2e-4), step


def _stream_epoch_from_s3(rank: int, world_size: int, url: str, cache_dir: str, limit: int,
                          endpoint: str) -> dict:
    from storage import fs as storage_fs
    from tests.test_cache import _stream_epoch
    from train.config import StorageConfig

    storage_fs.configure(StorageConfig(endpoint_url=endpoint))
    return _stream_epoch(rank, world_size, url, cache_dir, limit)


def test_two_ranks_with_workers_stream_through_one_node_cache(ceph: Ceph, tmp_path: Path, s3_dataset) -> None:
    """2 ranks x 2 DataLoader workers stream an epoch from RGW through one node cache: every
    sample exactly once across ranks, the cache never over its limit, and RGW's own access log
    shows each shard served once for the node."""
    from storage.cache import NodeCache
    from storage.order import SampleOrder
    from storage.shards import read_index
    from tests.test_cache import BLOCK, NEEDED, PREFETCH, SEQ, _all_windows

    url, local = s3_dataset
    index = read_index(str(local))
    shards = index.splits["train"]
    limit = NEEDED * max(s.tokens for s in shards) * 2  # two blocks and the prefetch after them
    served = ceph.requests()
    results = spawn(_stream_epoch_from_s3, 2, url, str(tmp_path / "cache"), limit, ceph.endpoint)
    order = SampleOrder(index, "train", SEQ, seed=5, block_shards=BLOCK)
    seen = sorted(row for r in results for row in r["rows"])
    # The epoch's whole steps: every sample of positions [0, steps x 32) once, none twice.
    assert len(seen) == order.num_samples // 32 * 32 > 0.9 * order.num_samples
    assert seen == sorted(tuple(order.sample(p).tolist()) for p in range(len(seen)))
    assert set(seen) <= set(_all_windows(local))
    assert max(r["peak"] for r in results) <= limit
    # Near the end readers enter the next epoch's first block and prefetch past it; those
    # shards, evicted since, are at most fetched a second time.
    prefix = url.removeprefix("s3://")
    ahead = order.block_at(order.num_samples) + order.upcoming_shards(order.num_samples, PREFETCH)
    again = {f"{prefix}/{shards[s].file}" for s in ahead}
    gets = Counter(path.lstrip("/") for path, status in served.served("GET")
                   if status in (200, 206) and path.endswith(".bin"))
    expected = Counter(f"{prefix}/{s.file}" for s in shards)
    assert set(gets) == set(expected), (gets, expected)
    assert all(n == 1 or (n == 2 and key in again) for key, n in gets.items()), gets
    cache = NodeCache(str(tmp_path / "cache"), limit)
    assert sum(cache.downloads().values()) == sum(gets.values())


def test_storage_ceph_fetches_each_shard_once_per_node_by_default(ceph: Ceph, tmp_path: Path,
                                                                  own_shard_cache: Path, s3_dataset) -> None:
    """`torchrun` with 2 ranks x 2 DataLoader workers and `storage=ceph`, no cache setting: the
    preset's node cache is on, in $TRAIN_HARNESS_CACHE/shards, and RGW's own access log shows
    every shard the run read (and the one prefetched ahead) served once for the node, whole, and
    not a byte more. Without the cache each rank downloads every shard it reads: twice each here."""
    from storage.cache import NodeCache
    from storage.dataset import EVAL_SEED
    from storage.order import SampleOrder
    from storage.shards import read_index

    url, local = s3_dataset
    seed, steps, seq_len = 2, 6, 64  # a seed whose first steps read two train shards
    batch_samples = 2048 // seq_len  # FAST's trainer.global_batch_tokens
    eval_samples = 2 * 4  # one held-out micro-batch of 4 (FAST) on each rank
    served = ceph.requests()
    run = _ok(torchrun(2, [*SHARDS, "+cluster=2xCPU", "data.num_workers=2", f"trainer.seed={seed}",
                           f"trainer.max_steps={steps}", f"data.url={url}", f"run.dir={tmp_path}/run"],
                       cwd=tmp_path, env=ceph.env))
    assert sorted(run.losses) == list(range(1, steps + 1))

    index = read_index(str(local))
    prefix = "/" + url.removeprefix("s3://")
    itemsize = np.dtype(index.dtype).itemsize
    size = {f"{prefix}/{e.file}": e.tokens * itemsize for split in ("train", "val") for e in index.shards(split)}
    # The shards the run's samples came from: the order is a pure function of (seed, position).
    read = set()
    for split, order_seed, samples in (("train", seed, steps * batch_samples), ("val", EVAL_SEED, eval_samples)):
        order, shards = SampleOrder(index, split, seq_len, order_seed), index.shards(split)
        read |= {f"{prefix}/{shards[order.locate(p)[0]].file}" for p in range(samples)}
    gets = Counter(path for path, status in served.served("GET")
                   if status in (200, 206) and path.startswith(prefix + "/") and path.endswith(".bin"))
    assert len(read) >= 3 and read <= set(gets), (read, gets)  # the rest of gets: prefetched ahead
    assert set(gets.values()) == {1}, gets  # once per node: not once per rank
    sent = {path: n for path, n in served.bytes_sent("GET").items() if path in gets}
    assert sent == {path: size[path] for path in gets}  # 1.00x: each shard whole, no more
    # Where the README says the preset puts the cache.
    cached = NodeCache(str(own_shard_cache / "shards")).downloads()
    assert set(cached) == {f"s3://{path.removeprefix('/')}" for path in gets}


def _save_and_load(rank: int, world_size: int, url: str, endpoint: str) -> None:
    from storage import fs as storage_fs
    from storage.checkpoint import Checkpointer
    from train.config import StorageConfig

    storage_fs.configure(StorageConfig(endpoint_url=endpoint))
    gen = torch.Generator().manual_seed(rank)
    saved = {f"rank{rank}.w": torch.randn(1000, 300, generator=gen), "shared": torch.arange(10.0)}
    ckpt = Checkpointer(url, keep_last=0, rank=rank, world_size=world_size)
    ckpt.save(3, {"state": saved}, {"model": "x"})
    loaded = {"state": {k: torch.zeros_like(v) for k, v in saved.items()}}
    ckpt.load(ckpt.latest(), loaded, {"model": "x"})
    for key, tensor in saved.items():
        assert torch.equal(loaded["state"][key], tensor), key


def test_checkpoint_read_back_from_s3_equals_what_was_saved(ceph: Ceph) -> None:
    """1.2 MB per rank through FsspecWriter: every byte comes back (a writer that silently
    drops data on an object store would fail here, or at commit)."""
    spawn(_save_and_load, 2, ceph.unique("dcp"), ceph.endpoint)


def test_unreachable_endpoint_fails_fast_naming_it(tmp_path: Path, ceph: Ceph, s3_dataset) -> None:
    url, _ = s3_dataset
    closed = f"http://127.0.0.1:{free_port()}"
    run = train([*SHARDS, f"data.url={url}", f"run.dir={tmp_path}/run"], cwd=tmp_path,
                env={"S3_ENDPOINT_URL": closed}, timeout_s=60)
    assert run.returncode == 2, run.output[-3000:]
    # fast because it is the one start-up check (one request, no retries), before anything runs
    assert f"S3 endpoint {closed} is unreachable" in run.output and f"while checking {url}" in run.output
    assert "; retry " not in run.output  # storage.fs.retrying would have logged each attempt
    assert not (tmp_path / "run").exists()


def test_wrong_secret_key_says_access_denied(tmp_path: Path, ceph: Ceph, s3_dataset) -> None:
    url, _ = s3_dataset
    wrong = "x" * len(ceph.env["AWS_SECRET_ACCESS_KEY"])
    run = train([*SHARDS, f"data.url={url}", f"run.dir={tmp_path}/run"], cwd=tmp_path,
                env={"AWS_SECRET_ACCESS_KEY": wrong}, timeout_s=60)
    assert run.returncode == 2, run.output[-3000:]
    assert "access denied: the secret key does not match" in run.output
    assert wrong not in run.output


def test_missing_credentials_are_named_before_anything_runs(tmp_path: Path, ceph: Ceph, s3_dataset) -> None:
    url, _ = s3_dataset
    run = train([*SHARDS, f"data.url={url}", f"run.dir={tmp_path}/run"], cwd=tmp_path, timeout_s=60,
                env={"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                     "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"), "AWS_CONFIG_FILE": str(tmp_path / "none")})
    assert run.returncode == 2, run.output[-3000:]
    assert f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in run.output
    assert not (tmp_path / "run").exists()


def test_missing_bucket_says_so(tmp_path: Path, ceph: Ceph) -> None:
    run = train([*SHARDS, "data.url=s3://no-such-bucket/ds", f"run.dir={tmp_path}/run"], cwd=tmp_path,
                timeout_s=60)
    assert run.returncode == 2, run.output[-3000:]
    assert "bucket 'no-such-bucket' does not exist" in run.output


def test_corrupt_object_stops_the_run_naming_the_shard(tmp_path: Path, ceph: Ceph, s3_dataset) -> None:
    url, local = s3_dataset
    bad = ceph.unique("datasets/corrupt")
    assert _prepare(bad).returncode == 0
    fs = ceph.fs()
    shard = f"{bad}/train/shard-00000.bin"
    size = fs.size(shard)
    fs.pipe_file(shard, bytes(size))  # same size, other bytes: only the checksum can tell
    run = train([*SHARDS, f"data.url={bad}", f"run.dir={tmp_path}/run"], cwd=tmp_path)
    assert run.returncode != 0
    assert "corrupt shard" in run.output and shard in run.output, run.output[-3000:]


def test_rgw_restarted_mid_run_loses_no_sample(tmp_path: Path, ceph: Ceph, s3_dataset) -> None:
    """RGW is killed and started again while a run streams shards and checkpoints through it;
    the run retries, finishes, and its losses equal those of an undisturbed run."""
    url, _ = s3_dataset
    steps = [*SHARDS, "trainer.max_steps=16", "checkpoint.interval=1", f"data.url={url}"]
    quiet = _ok(train([*steps, f"run.dir={tmp_path}/quiet", f"checkpoint.url={ceph.unique('quiet')}"],
                      cwd=tmp_path, cache_dir=tmp_path / "quiet-cache"))
    # its own shard cache: shards the quiet run cached would spare this run's reads the fault
    proc = start([*steps, f"run.dir={tmp_path}/hit", f"checkpoint.url={ceph.unique('hit')}"], cwd=tmp_path,
                 cache_dir=tmp_path / "hit-cache")
    metrics = tmp_path / "hit" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert proc.poll() is None and time.monotonic() < deadline, "run ended before the fault"
        time.sleep(0.05)
    pid = ceph.rgw_pid
    ceph.stop_rgw()
    rows_at_stop = len(metrics.read_text().splitlines())
    time.sleep(3.0)  # longer than botocore's own retries may wait: the harness retries too
    # The fault was hit: every step commits a checkpoint to RGW, so while it is down the run
    # is alive but cannot get past the step it was in.
    assert proc.poll() is None, "the run ended while RGW was down"
    assert len(metrics.read_text().splitlines()) <= rows_at_stop + 1 < 16
    ceph.start_rgw()
    assert ceph.rgw_pid != pid
    hit = _ok(finish(proc))
    assert hit.losses == quiet.losses and len(hit.losses) == 16


def test_credentials_appear_in_nothing_the_run_wrote(tmp_path: Path, ceph: Ceph, s3_dataset) -> None:
    url, _ = s3_dataset
    ckpt = ceph.unique("creds") + "/checkpoints"
    run = _ok(torchrun(2, [*SHARDS, "trainer.max_steps=2", f"data.url={url}", f"checkpoint.url={ckpt}",
                           f"run.dir={tmp_path}/run"], cwd=tmp_path, env=ceph.env))
    secrets = [ceph.env["AWS_ACCESS_KEY_ID"].encode(), ceph.env["AWS_SECRET_ACCESS_KEY"].encode()]
    written: dict[str, bytes] = {"stdout+stderr": run.output.encode()}
    for path in run.run_dir.rglob("*"):
        if path.is_file():
            written[str(path)] = path.read_bytes()
    fs = ceph.fs()
    objects = fs.find(ckpt.removeprefix("s3://"))
    assert any(o.endswith("COMMITTED") for o in objects) and any(o.endswith(".metadata") for o in objects)
    for obj in objects:
        written[f"s3://{obj}"] = fs.cat_file(obj)
    assert "config.yaml" in " ".join(written)
    leaks = [name for name, data in written.items() if any(s in data for s in secrets)]
    assert leaks == []
