"""One timed pass over a token dataset, in a fresh process: a plain read loop or the harness's loader.

    python bench/storage_read.py --mode plain --url s3://bucket/ds          # s3fs cat_file, one shard after another
    python bench/storage_read.py --mode plain --threads 4 --url s3://bucket/ds
    python bench/storage_read.py --mode harness --workers 2 --cache-dir /tmp/c --url s3://bucket/ds
    python bench/storage_read.py --mode plain --drop-page-cache --url /data/ds  # local files, cold

`bench/storage_bench.py` runs it once per measurement, so no measurement sees another one's
in-process state (s3fs connections, the shard reader's memory maps). Prints one JSON object:
`bytes` (token bytes delivered), `seconds` (wall time of the pass), `cpu_s` (CPU time of this
process's threads and of its DataLoader workers during the pass; not RGW's or the OSD's) and
`mib_s`.

- plain: every train shard of index.json read whole (s3fs `cat_file`, or `open().read()` for a
  local path), in index order, by `--threads` threads. The raw limit of the storage for this data.
- harness: `storage.dataset.BatchStream`, built as `train/build.py` builds it (dp_size 1, the
  storage preset's prefetch settings, the node cache from `cache_from_config`, the block
  shuffle of --block-shards shards), reading one epoch of optimizer steps; bytes = samples x
  seq_len x token size. Also `first_step_s` (the first next_step: starting the workers, the
  first shards) and `step_s_after_first`, the loader's time per step once it runs.

The index is read before the clock starts in both modes; S3 settings come from the preset
(`storage.fs.configure`) and credentials from the environment.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage.cache import cache_from_config
from storage.dataset import BatchStream
from storage.fs import configure, is_local, join, url_to_fs
from storage.order import DEFAULT_BLOCK_SHARDS
from storage.shards import read_index
from train.config import StorageConfig


def storage_config(preset: str, **overrides) -> StorageConfig:
    """configs/storage/<preset>.yaml merged into its schema, with `overrides` on top."""
    data = OmegaConf.load(REPO / "configs" / "storage" / f"{preset}.yaml")
    cfg = OmegaConf.merge(OmegaConf.structured(StorageConfig), data, overrides)
    return OmegaConf.to_object(cfg)


def drop_page_cache(paths: list[str]) -> None:
    """Evict the files' pages (they are clean: written and fsync'd), so the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def cpu_seconds() -> float:
    """CPU time of this process and of its children that have ended (DataLoader workers)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def plain(url: str, threads: int) -> dict:
    index = read_index(url)
    fs, root = url_to_fs(url)
    paths = [join(root, e.file) for e in index.shards("train")]
    if is_local(fs):
        def read(path: str) -> int:
            with open(path, "rb") as f:
                return len(f.read())
    else:
        def read(path: str) -> int:
            return len(fs.cat_file(path))
    cpu, start = cpu_seconds(), time.perf_counter()
    if threads == 1:
        total = sum(read(p) for p in paths)
    else:
        with ThreadPoolExecutor(threads) as pool:
            total = sum(pool.map(read, paths))
    seconds = time.perf_counter() - start
    return {"bytes": total, "seconds": seconds, "cpu_s": cpu_seconds() - cpu, "shards": len(paths)}


def harness(url: str, args: argparse.Namespace) -> dict:
    overrides = {"fetch_workers": args.fetch_workers} if args.fetch_workers else {}
    cfg = storage_config(args.preset, cache_dir=args.cache_dir, **overrides)
    index = read_index(url)
    gbs = args.micro_batch * args.accum
    stream = BatchStream(
        index, split="train", seq_len=args.seq_len, seed=1234, global_batch_samples=gbs,
        micro_batch_size=args.micro_batch, dp_rank=0, dp_size=1, num_workers=args.workers,
        block_shards=args.block_shards, cache=cache_from_config(cfg), prefetch_shards=cfg.prefetch_shards,
        fetch_workers=cfg.fetch_workers, on_corrupt_shard=cfg.on_corrupt_shard)
    steps = stream.samples_per_epoch // gbs
    samples = 0
    cpu, start = cpu_seconds(), time.perf_counter()
    for step in range(steps):
        samples += sum(b.shape[0] for b in stream.next_step())
        if step == 0:
            first = time.perf_counter() - start
    seconds = time.perf_counter() - start
    stream.close()
    gc.collect()  # the DataLoader iterator goes, its workers are joined, and their CPU counted
    cpu = cpu_seconds() - cpu
    itemsize = 2 if index.dtype.endswith("u2") else 4
    return {"bytes": samples * args.seq_len * itemsize, "seconds": seconds, "cpu_s": cpu, "samples": samples,
            "steps": steps, "first_step_s": first, "step_s_after_first": (seconds - first) / max(1, steps - 1),
            "block_shards": args.block_shards, "prefetch_shards": cfg.prefetch_shards,
            "fetch_workers": cfg.fetch_workers}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("plain", "harness"), required=True)
    p.add_argument("--url", required=True, help="dataset directory (local path or s3://)")
    p.add_argument("--threads", type=int, default=1, help="plain: reader threads")
    p.add_argument("--workers", type=int, default=0, help="harness: DataLoader workers")
    p.add_argument("--cache-dir", default="", help="harness, s3: node cache directory (empty = no cache)")
    p.add_argument("--fetch-workers", type=int, default=0, help="harness: download threads per process (0 = the preset's)")
    p.add_argument("--preset", default="ceph", help="harness: storage preset in configs/storage/ (local for a local path)")
    p.add_argument("--block-shards", type=int, default=DEFAULT_BLOCK_SHARDS,
                   help="harness: data.shuffle_block_shards (1: data.shuffle=false, one shard at a time)")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--drop-page-cache", action="store_true", help="local: evict the shard files first")
    args = p.parse_args()
    configure(storage_config("ceph"))  # endpoint from $S3_ENDPOINT_URL; harmless for local paths
    if args.drop_page_cache:
        _, root = url_to_fs(args.url)
        drop_page_cache([join(root, e.file) for e in read_index(args.url).shards("train")])
    result = plain(args.url, args.threads) if args.mode == "plain" else harness(args.url, args)
    result["mib_s"] = result["bytes"] / result["seconds"] / 2**20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
