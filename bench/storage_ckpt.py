"""Checkpoint save and load through `storage.checkpoint.Checkpointer` vs a raw write and read of
the same bytes, to a local directory and to S3 (RGW), plus async save's blocking time.

    python bench/storage_ckpt.py --local-dir /tmp/ck --s3-url s3://bucket/ck --mib 512 --repeats 3 --json out.json
    python bench/storage_ckpt.py --local-dir /tmp/ck --device cuda --mib 4096 --repeats 3   # state on a GPU

The state is `--tensors` float32 tensors of `--mib` MiB in all (the size class of a 124M-parameter
model with its AdamW moments: 3 x 124M x 4 bytes = 1.4 GiB). In each repeat, in this order:

- local: `Checkpointer.save` (DCP FileSystemWriter, fsync'd, verified, committed) vs one file
  written with the same bytes and fsync'd; then, with both evicted from the page cache,
  `Checkpointer.load` into preallocated tensors vs reading the file back.
- S3: `Checkpointer.save` (DCP FsspecWriter, 4 threads) vs s3fs `pipe_file` of the same bytes as
  4 objects from 4 threads, and as one object; `Checkpointer.load` vs `cat_file` of them.
- async: a synchronous save vs an async one, local and S3: the time until the call returns
  (what the training loop is blocked for) and until the checkpoint is complete. With
  `Checkpointer(async_save=True)` when the Checkpointer has it (then `wait()` completes it),
  else `torch.distributed.checkpoint.async_save` with the Checkpointer's own writer. One
  Checkpointer saves twice, as a run does: the first save allocates its host staging buffers
  (`*_async_blocked_first`), the second reuses them (`*_async_blocked`, `*_async_done`: what
  every later save of a run costs).

Prints one JSON object (also written to --json): per measurement, the list of seconds per repeat.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.storage_read import drop_page_cache, storage_config
from storage.checkpoint import Checkpointer, _writer
from storage.fs import configure, url_to_fs

HAS_ASYNC = "async_save" in inspect.signature(Checkpointer).parameters


def make_state(mib: int, tensors: int) -> dict[str, torch.Tensor]:
    numel = (mib << 20) // 4 // tensors
    gen = torch.Generator().manual_seed(0)
    return {f"w{i:03d}": torch.randn(numel, generator=gen) for i in range(tensors)}


def files_under(path: str) -> list[str]:
    return [os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs]


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def raw_local(state: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
    """(write + fsync seconds, cold read seconds) of the state's bytes as one file."""
    def write() -> None:
        with open(path, "wb") as f:
            f.writelines(memoryview(t.numpy()).cast("B") for t in state.values())
            f.flush()
            os.fsync(f.fileno())

    w = timed(write)
    drop_page_cache([path])

    def read() -> None:
        with open(path, "rb") as f:
            while f.read(64 << 20):
                pass

    r = timed(read)
    os.unlink(path)
    return w, r


def raw_s3(state: dict[str, torch.Tensor], url: str, parts: int) -> tuple[float, float]:
    """(pipe_file seconds, cat_file seconds) of the state's bytes as `parts` objects from as many threads."""
    fs, root = url_to_fs(url)
    names = list(state)
    groups = [names[i::parts] for i in range(parts)]
    blobs = [b"".join(memoryview(state[n].numpy()).cast("B") for n in g) for g in groups]  # outside the clock
    paths = [f"{root}/part-{i}" for i in range(parts)]
    with ThreadPoolExecutor(parts) as pool:
        w = timed(lambda: list(pool.map(fs.pipe_file, paths, blobs)))
        blobs.clear()  # the copies go before the read (the lambda above ran, and is done, already)
        r = timed(lambda: list(pool.map(fs.cat_file, paths)))
    fs.rm(root, recursive=True)
    return w, r


def ckpt(url: str, state: dict[str, torch.Tensor], into: dict[str, torch.Tensor], local: bool) -> tuple[float, float]:
    """(Checkpointer.save seconds, Checkpointer.load seconds); the page cache dropped in between."""
    ck = Checkpointer(url, keep_last=0, rank=0, world_size=1)
    w = timed(lambda: ck.save(1, {"app": state}, {}))
    if local:
        drop_page_cache(files_under(ck.url))
    info = ck.latest()
    r = timed(lambda: ck.load(info, {"app": into}, {}))
    ck.fs.rm(ck.root, recursive=True)
    return w, r


def async_save(url: str, state: dict[str, torch.Tensor]) -> tuple[float, float, float]:
    """(seconds until the first save call returns, until the second one returns, until the
    second checkpoint is complete): two saves of one Checkpointer, as in a run."""
    blocked = []
    if HAS_ASYNC:
        ck = Checkpointer(url, keep_last=0, rank=0, world_size=1, async_save=True)
        for step in (1, 2):
            start = time.perf_counter()
            ck.save(step, {"app": state}, {})
            blocked.append(time.perf_counter() - start)
            ck.wait()
    else:
        import torch.distributed.checkpoint as dcp

        ck = Checkpointer(url, keep_last=0, rank=0, world_size=1)
        for step in (1, 2):
            start = time.perf_counter()
            future = dcp.async_save({"app": state}, storage_writer=_writer(ck.step_url(step)))
            blocked.append(time.perf_counter() - start)
            future.result()
    done = time.perf_counter() - start
    ck.fs.rm(ck.root, recursive=True)
    return blocked[0], blocked[1], done


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--local-dir", required=True)
    p.add_argument("--s3-url", default="", help="s3://bucket/prefix; empty = local only")
    p.add_argument("--mib", type=int, default=512)
    p.add_argument("--tensors", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--device", default="cpu", help="where the state lives (cuda: saves copy it from the GPU, "
                                                   "as a run's do; the raw transfers use a host copy)")
    args = p.parse_args()
    configure(storage_config("ceph"))
    host = make_state(args.mib, args.tensors)
    state = {k: v.to(args.device) for k, v in host.items()}
    into = {k: torch.empty_like(v) for k, v in state.items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    runs: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        runs.setdefault(name, []).append(seconds)

    os.makedirs(args.local_dir, exist_ok=True)
    for r in range(args.repeats):
        w, rd = ckpt(os.path.join(args.local_dir, f"ck-{r}"), state, into, local=True)
        add("local_save", w)
        add("local_load", rd)
        w, rd = raw_local(host, os.path.join(args.local_dir, f"raw-{r}.bin"))
        add("local_raw_write", w)
        add("local_raw_read", rd)
        if args.s3_url:
            w, rd = ckpt(f"{args.s3_url}/ck-{r}", state, into, local=False)
            add("s3_save", w)
            add("s3_load", rd)
            for parts in (4, 1):
                w, rd = raw_s3(host, f"{args.s3_url}/raw-{r}-{parts}", parts)
                add(f"s3_raw_put_{parts}", w)
                add(f"s3_raw_get_{parts}", rd)
        targets = [("local", os.path.join(args.local_dir, f"async-{r}"))]
        if args.s3_url:
            targets.append(("s3", f"{args.s3_url}/async-{r}"))
        for where, url in targets:
            first, blocked, done = async_save(url, state)
            add(f"{where}_async_blocked_first", first)
            add(f"{where}_async_blocked", blocked)
            add(f"{where}_async_done", done)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.2f}s" for k, v in runs.items()),
              file=sys.stderr, flush=True)
    result = {"bytes": nbytes, "tensors": args.tensors, "async_api": "Checkpointer(async_save=True)" if HAS_ASYNC
              else "torch.distributed.checkpoint.async_save", "seconds": runs}
    print(json.dumps(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
