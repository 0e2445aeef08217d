"""The node-local prefetch cache: one verified download per shard per node, under its limit.

The "remote" is a local directory behind a non-local fsspec protocol (`cachetest://`), so the
storage layer treats it as it treats s3:// (no memmap, no bypass), and every open of a shard
is logged to a file that all processes append to: the test counts what the source served.
The real-Ceph streaming test sits with the other Ceph tests.
"""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter

import fsspec
import numpy as np
import pytest
import torch.distributed as dist
from fsspec.implementations.local import LocalFileSystem

from storage.cache import NodeCache
from storage.dataset import BatchStream
from storage.order import SampleOrder
from storage.shards import CorruptShardError, MissingShardError, ShardWriter, TokenizerInfo, read_index
from storage.tokenizer import ByteTokenizer
from tests.distributed import spawn

SEQ = 16
SHARD_TOKENS = 4 * 1024 + 1  # 256 windows of SEQ+1 tokens per shard
SHARD_BYTES = SHARD_TOKENS * 2
N_SHARDS = 8
BLOCK = 2  # shards per shuffle block when streaming
PREFETCH = 2
NEEDED = 2 * BLOCK + PREFETCH  # shards the cache must hold: two blocks and the prefetch after them
READS_LOG = "CACHETEST_READS_LOG"


class RemoteDir(LocalFileSystem):
    """A local directory that the harness must treat as remote; logs every shard it serves."""

    protocol = "cachetest"

    @classmethod
    def _strip_protocol(cls, path):
        path = str(path)
        return super()._strip_protocol(path[len("cachetest://"):] if path.startswith("cachetest://") else path)

    def _open(self, path, mode="rb", **kwargs):
        if path.endswith(".bin") and "r" in mode and os.environ.get(READS_LOG):
            with open(os.environ[READS_LOG], "a") as f:
                f.write(path + "\n")
        return super()._open(path, mode, **kwargs)


# Registered at import, so spawned ranks (which import this module) and their forked workers see it.
fsspec.register_implementation("cachetest", RemoteDir, clobber=True)


@pytest.fixture
def remote(tmp_path, monkeypatch):
    """(url of an 8-shard dataset behind cachetest://, its local directory, reads log path)."""
    local = tmp_path / "ds"
    writer = ShardWriter(str(local), TokenizerInfo.of(ByteTokenizer()), shard_tokens=SHARD_TOKENS)
    writer.add(np.random.default_rng(0).integers(1, 256, SHARD_TOKENS * N_SHARDS), "train")
    writer.close()
    reads = tmp_path / "reads.log"
    monkeypatch.setenv(READS_LOG, str(reads))
    return f"cachetest://{local}", local, reads


def _source_reads(reads) -> Counter:
    return Counter(reads.read_text().split()) if reads.exists() else Counter()


def _all_windows(local) -> list[tuple]:
    order = SampleOrder(read_index(str(local)), "train", SEQ, seed=0)
    return sorted(tuple(order.sample(p).tolist()) for p in range(order.num_samples))


def _stream_epoch(rank: int, world: int, url: str, cache_dir: str, limit: int, batch: int = 32) -> dict:
    """One rank with 2 DataLoader workers: an epoch of steps of `batch` samples in lockstep with
    the other rank (as the gradient all-reduce keeps them), while a thread samples the cache's size."""
    # Workers fork from the rank, as under torchrun (a spawned rank would spawn them, and they
    # would not know the test's cachetest:// protocol).
    multiprocessing.set_start_method("fork", force=True)
    cache = NodeCache(cache_dir, limit)
    stream = BatchStream(url, "train", SEQ, 5, global_batch_samples=batch, micro_batch_size=4, dp_rank=rank,
                         dp_size=world, num_workers=2, block_shards=BLOCK, cache=cache, prefetch_shards=PREFETCH)
    peak, done = [0], threading.Event()

    def sample_size() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], cache.usage_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_size, daemon=True)
    sampler.start()
    rows = []
    for _ in range(stream.samples_per_epoch // batch):
        rows.extend(tuple(r.tolist()) for b in stream.next_step() for r in b)
        dist.barrier()
    done.set()
    sampler.join()
    steps_per_item = stream._workers.k
    stream.close()
    return {"rows": rows, "peak": peak[0], "steps_per_item": steps_per_item}


def test_two_ranks_with_workers_share_one_cache_under_its_limit(remote, tmp_path):
    url, local, reads = remote
    limit = NEEDED * SHARD_BYTES
    # Steps of 16 samples: small enough that each worker sends 2 of its steps per item, as
    # many as keep its run-ahead within half a block (2 shards x 256 samples).
    results = spawn(_stream_epoch, 2, url, str(tmp_path / "cache"), limit, 16)
    assert [r["steps_per_item"] for r in results] == [2, 2]
    seen = sorted(row for r in results for row in r["rows"])
    assert seen == _all_windows(local)  # every sample exactly once in the epoch, across ranks
    cache = NodeCache(str(tmp_path / "cache"), limit)
    once = Counter(f"{url}/train/shard-{i:05d}.bin" for i in range(N_SHARDS))
    # Near the end, readers (and workers running ahead) enter epoch 1's first block and prefetch
    # past it: those shards, evicted meanwhile, may be fetched a second time.
    order = SampleOrder(read_index(url), "train", SEQ, seed=5, block_shards=BLOCK)
    ahead = order.block_at(order.num_samples) + order.upcoming_shards(order.num_samples, PREFETCH)
    next_epoch = {f"{url}/train/shard-{s:05d}.bin" for s in ahead}
    extra = cache.downloads() - once
    assert set(cache.downloads()) == set(once) and set(extra) <= next_epoch and max(extra.values(), default=1) == 1
    source = Counter(f"cachetest://{p}" for p in _source_reads(reads).elements())
    assert source == cache.downloads()  # the source served exactly what the cache logged
    assert max(r["peak"] for r in results) <= limit and cache.usage_bytes() <= limit
    assert not [n for n in os.listdir(cache.cache_dir) if ".tmp." in n or n.endswith(".lock") and n != ".cache.lock"]


def _entry(url, i):
    index = read_index(url)
    return index, index.splits["train"][i]


def test_pinned_shard_is_never_evicted_until_released(remote, tmp_path):
    url, _, _ = remote
    cache = NodeCache(str(tmp_path / "cache"), 2 * SHARD_BYTES)
    a = cache.pin(*_entry(url, 0))
    b = cache.get(*_entry(url, 1))
    for i in (2, 3):  # each needs room: only the unpinned shard can give it
        cache.get(*_entry(url, i))
        assert os.path.exists(a.path) and cache.usage_bytes() <= 2 * SHARD_BYTES
    assert not os.path.exists(b)
    a.release()  # counts as a use: shard 3 is now the least recently used
    cache.get(*_entry(url, 4))
    assert os.path.exists(a.path)
    cache.get(*_entry(url, 5))
    assert not os.path.exists(a.path)


def test_pin_of_a_killed_process_does_not_hold_the_shard(remote, tmp_path):
    url, _, _ = remote
    cache = NodeCache(str(tmp_path / "cache"), SHARD_BYTES)
    path = cache.get(*_entry(url, 0))
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_SH); print('pinned', flush=True); time.sleep(60)", path],
        stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "pinned"
    cache.get(*_entry(url, 1))  # over the limit rather than evict a held shard
    assert os.path.exists(path)
    holder.kill()
    holder.wait()
    cache.get(*_entry(url, 2))
    assert not os.path.exists(path)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.parametrize("owner", ["dead pid", "timed out"])
def test_stale_lock_is_recovered(remote, tmp_path, owner):
    url, _, reads = remote
    cache = NodeCache(str(tmp_path / "cache"), lock_timeout_s=60)
    index, entry = _entry(url, 3)
    final = cache.path_for(entry)
    pid = _dead_pid() if owner == "dead pid" else os.getpid()
    with open(final + ".lock", "w") as f:
        json.dump({"pid": pid, "host": socket.gethostname(), "time": time.time(), "nonce": "x", "bytes": 0}, f)
    with open(final + ".tmp.somehost.123.4", "wb") as f:
        f.write(b"half a download")
    if owner == "timed out":
        old = time.time() - 3600
        os.utime(final + ".lock", (old, old))
    waits = []
    wait_or_recover = cache._wait_or_recover
    cache._wait_or_recover = lambda lock, path: (waits.append(lock), wait_or_recover(lock, path))[1]
    assert cache.get(index, entry) == final
    assert len(waits) == 1  # recovered on first sight: no poll, no wait for the lock timeout
    assert sorted(os.listdir(cache.cache_dir)) == sorted([os.path.basename(final), ".cache.lock", "downloads.log"])
    assert sum(_source_reads(reads).values()) == 1


def test_waiter_takes_the_file_another_process_downloads(remote, tmp_path):
    url, _, reads = remote
    cache = NodeCache(str(tmp_path / "cache"))
    index, entry = _entry(url, 0)
    lock = cache.path_for(entry) + ".lock"
    with open(lock, "w") as f:  # a live download by this very process (pid alive)
        json.dump({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(), "nonce": "x"}, f)

    def finish() -> None:
        time.sleep(0.3)
        os.unlink(lock)
        NodeCache(cache.cache_dir).get(index, entry)

    threading.Thread(target=finish).start()
    assert cache.get(index, entry) == cache.path_for(entry)
    assert sum(_source_reads(reads).values()) == 1


def _corrupt(local, i) -> None:
    shard = local / "train" / f"shard-{i:05d}.bin"
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF
    shard.write_bytes(bytes(data))


def test_corrupt_source_shard_names_it_and_leaves_nothing_in_the_cache(remote, tmp_path):
    url, local, _ = remote
    _corrupt(local, 2)
    cache = NodeCache(str(tmp_path / "cache"))
    index, entry = _entry(url, 2)
    with pytest.raises(CorruptShardError) as e:
        cache.get(index, entry)
    assert f"{url}/train/shard-00002.bin" in str(e.value) and entry.sha256 in str(e.value)
    assert len([w for w in str(e.value).split() if len(w.strip(",;")) == 64]) == 2  # both checksums
    assert [n for n in os.listdir(cache.cache_dir) if n != ".cache.lock"] == []
    stream = BatchStream(url, "train", SEQ, 5, 32, 4, 0, 1, cache=cache)
    with pytest.raises(CorruptShardError, match="shard-00002.bin"):
        for _ in range(stream.samples_per_epoch // 32):
            stream.next_step()


def test_missing_shard_names_it(remote, tmp_path):
    url, local, _ = remote
    (local / "train" / "shard-00001.bin").unlink()
    with pytest.raises(MissingShardError, match="shard missing: cachetest://.*shard-00001.bin"):
        NodeCache(str(tmp_path / "cache")).get(*_entry(url, 1))


def _epoch_rows(url, cache, dp_size, workers):
    streams = [BatchStream(url, "train", SEQ, 5, 32, 4, r, dp_size, num_workers=workers, cache=cache,
                           on_corrupt_shard="skip") for r in range(dp_size)]
    rows = [tuple(r.tolist()) for _ in range(streams[0].samples_per_epoch // 32)
            for s in streams for b in s.next_step() for r in b]
    return rows, [s.skipped_shards for s in streams], streams[0].skipped_shard_files


def test_skip_mode_replaces_a_corrupt_shard_deterministically_and_counts_it(remote, tmp_path):
    url, local, _ = remote
    bad = set(tuple(w) for w in _all_windows_of_shard(local, 6))
    _corrupt(local, 6)
    cache = NodeCache(str(tmp_path / "cache"))
    rows, counts, files = _epoch_rows(url, cache, dp_size=1, workers=2)
    assert counts == [1] and files == ["train/shard-00006.bin"]
    assert len(rows) == N_SHARDS * 256 and not bad & set(rows)
    two_ranks, counts2, _ = _epoch_rows(url, cache, dp_size=2, workers=0)
    assert sorted(two_ranks) == sorted(rows) and counts2 == [1, 1]


def _all_windows_of_shard(local, i):
    tokens = np.fromfile(local / "train" / f"shard-{i:05d}.bin", dtype="<u2")
    return [tokens[w * SEQ: w * SEQ + SEQ + 1].tolist() for w in range((len(tokens) - 1) // SEQ)]


def test_prefetch_fetches_the_next_shards_in_the_order(remote, tmp_path):
    url, _, _ = remote
    cache = NodeCache(str(tmp_path / "cache"))
    stream = BatchStream(url, "train", SEQ, 5, 32, 4, 0, 1, block_shards=BLOCK, cache=cache, prefetch_shards=2)
    order = SampleOrder(read_index(url), "train", SEQ, 5, block_shards=BLOCK)
    stream.next_step()
    expected = {f"{url}/train/shard-{s:05d}.bin" for s in [*order.block_at(31), *order.upcoming_shards(31, 2)]}
    assert len(expected) == 2 * BLOCK  # the step's block and the first shards after it
    deadline = time.monotonic() + 10
    while set(cache.downloads()) != expected and time.monotonic() < deadline:
        time.sleep(0.02)
    assert set(cache.downloads()) == expected


def test_local_dataset_bypasses_the_cache(remote, tmp_path):
    _, local, _ = remote
    cache = NodeCache(str(tmp_path / "cache"))
    BatchStream(str(local), "train", SEQ, 5, 32, 4, 0, 1, cache=cache, prefetch_shards=2).next_step()
    assert os.listdir(cache.cache_dir) == []


def test_full_disk_evicts_then_retries_once_then_says_so(remote, tmp_path, monkeypatch):
    url, _, _ = remote
    cache = NodeCache(str(tmp_path / "cache"))
    old = cache.get(*_entry(url, 0))
    real, calls = NodeCache._fetch, []

    def full_once(source, tmp, lock):
        calls.append(source)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(source, tmp, lock)

    monkeypatch.setattr(NodeCache, "_fetch", staticmethod(full_once))
    assert os.path.exists(cache.get(*_entry(url, 1))) and not os.path.exists(old) and len(calls) == 2

    def always_full(source, tmp, lock):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(NodeCache, "_fetch", staticmethod(always_full))
    with pytest.raises(OSError, match=r"node cache .* out of disk space fetching .*shard-00002.bin.*cache_limit_bytes"):
        cache.get(*_entry(url, 2))
    assert not [n for n in os.listdir(cache.cache_dir) if ".tmp." in n or n.endswith(".bin.lock")]
