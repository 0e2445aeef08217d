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

`--breakdown` measures where a local save's and load's time goes instead (local disk only, one
process, the state in host memory): each phase of `Checkpointer.save` and `.load` and of DCP's
writer and reader inside them, the process's CPU seconds, and beside them, in the middle of each
repeat, the raw limit: the bytes written as one file and as two from two threads (fsync'd), read
back cold into new buffers and into the destination tensors. With
`--baseline FILE` (another version of storage/checkpoint.py, e.g. `git show
HEAD:storage/checkpoint.py > /tmp/checkpoint_head.py`) that version is measured in the same
repeats, the order alternating; `--variants` adds settings of this version that were tried
(writer threads, a file per tensor, no CRC32, one syncfs instead of per-file fsyncs, the stock
reader, one reader thread). Prints a table of medians; --json writes every repeat.

    python bench/storage_ckpt.py --breakdown --local-dir /tmp/ck --baseline /tmp/checkpoint_head.py --repeats 5
    python bench/storage_ckpt.py --breakdown --local-dir /tmp/ck --variants all --repeats 5
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import inspect
import json
import os
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType

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


def raw_write(state: dict[str, torch.Tensor], path: str) -> None:
    """The state's bytes as one file, fsync'd."""
    with open(path, "wb") as f:
        f.writelines(memoryview(t.numpy()).cast("B") for t in state.values())
        f.flush()
        os.fsync(f.fileno())


def raw_read(path: str) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def raw_read_into(path: str, into: dict[str, torch.Tensor]) -> None:
    """The file `raw_write` wrote, read into the tensors that exist already (as a load's are)."""
    with open(path, "rb", buffering=0) as f:
        for t in into.values():
            view = memoryview(t.numpy()).cast("B")
            while view:
                n = f.readinto(view)
                if not n:
                    raise EOFError(f"{path} is shorter than the state")
                view = view[n:]


def raw_local(state: dict[str, torch.Tensor], path: str) -> tuple[float, float]:
    """(write + fsync seconds, cold read seconds) of the state's bytes as one file."""
    w = timed(lambda: raw_write(state, path))
    drop_page_cache([path])
    r = timed(lambda: raw_read(path))
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


# -- --breakdown ----------------------------------------------------------------------------

class Phases:
    """Seconds per named phase of one save and load, summed over calls: a phase that runs in
    several threads at once (DCP's writer threads, the reader's) counts thread-seconds. A label's
    "{stage}" is the stage (save or load) the call came in."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stage = ""

    def timed(self, fn, label: str):
        def call(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[label.format(stage=self.stage)] += time.perf_counter() - start
        return call

    def wrap(self, obj, attr: str, label: str) -> None:
        setattr(obj, attr, self.timed(getattr(obj, attr), label))

    @contextlib.contextmanager
    def whole(self, stage: str):
        """Time the block as `stage`, in seconds and in the process's CPU seconds."""
        self.stage = stage
        cpu, start = time.process_time(), time.perf_counter()
        yield
        self.seconds[stage] = time.perf_counter() - start
        self.seconds[f"{stage} CPU"] = time.process_time() - cpu


@contextlib.contextmanager
def patched(obj, **attrs):
    """`obj`'s attributes set to `attrs` for the block (the bench's way into the code it times)."""
    saved = {name: getattr(obj, name) for name in attrs}
    for name, value in attrs.items():
        setattr(obj, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(obj, name, value)


def load_module(path: Path) -> ModuleType:
    """Another version of storage/checkpoint.py, imported under a name of its own."""
    spec = importlib.util.spec_from_file_location("checkpoint_baseline", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module


def syncfs(path: str) -> None:
    """Flush the whole filesystem that holds `path` (Linux syncfs(2))."""
    fd = os.open(path, os.O_RDONLY)
    try:
        if ctypes.CDLL(None, use_errno=True).syncfs(fd) != 0:
            raise OSError(ctypes.get_errno(), f"syncfs {path}")
    finally:
        os.close(fd)


@contextlib.contextmanager
def without_crc32():
    """torch.save (DCP's writer uses it per tensor) without the CRC32 of each zip record."""
    before = torch.serialization.get_crc32_options()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(before)


@contextlib.contextmanager
def _stacked(*managers):
    with contextlib.ExitStack() as stack:
        for manager in managers:
            stack.enter_context(manager)
        yield


def variant(name: str, mod: ModuleType) -> contextlib.AbstractContextManager:
    """A setting of `mod` (this version of storage/checkpoint.py) that was tried, for the block."""
    import torch.distributed.checkpoint as dcp

    def writer(**kwargs):
        return patched(mod, _writer=lambda url: dcp.FileSystemWriter(url, **kwargs))

    if name.startswith("writer-threads="):
        return writer(thread_count=int(name.split("=")[1]))
    if name == "file-per-tensor":
        return writer(thread_count=2, single_file_per_rank=False)
    if name == "no-crc32":
        return without_crc32()
    if name == "one-syncfs":  # no fsync per file; one syncfs of the filesystem before the commit
        save_write = mod.Checkpointer._write

        def write_then_syncfs(self, state, url):
            save_write(self, state, url)
            syncfs(url)
        return _stacked(writer(thread_count=2, sync_files=False), patched(mod.Checkpointer, _write=write_then_syncfs))
    if name == "stock-reader":
        return patched(mod, _reader=lambda url: dcp.FileSystemReader(url))
    if name == "reader-threads=1":
        import storage.dcp_local

        return patched(storage.dcp_local, _READ_THREADS=1)
    raise SystemExit(f"--variants: unknown variant {name!r}; known: {', '.join(VARIANTS)}")


VARIANTS = ("writer-threads=1", "writer-threads=4", "writer-threads=8", "file-per-tensor", "no-crc32", "one-syncfs",
            "stock-reader", "reader-threads=1")


def breakdown(mod: ModuleType, state: dict[str, torch.Tensor], into: dict[str, torch.Tensor],
              path: str) -> dict[str, float]:
    """One local save and one cold load through `mod.Checkpointer`, phase by phase: seconds, and
    the process's CPU seconds for each whole call. Labels: `save`/`load` the whole call; below
    them the Checkpointer's own steps and DCP's writer/reader calls; `fsync`, `torch.load`,
    `copy_` and `preadv` wherever they ran."""
    phases = Phases()
    make_writer, make_reader = mod._writer, mod._reader

    def writer(url: str):
        w = make_writer(url)
        for attr in ("prepare_local_plan", "prepare_global_plan", "write_data", "finish"):
            phases.wrap(w, attr, f"{{stage}}: dcp {attr}")
        return w

    def reader(url: str):
        r = make_reader(url)
        for attr in ("read_metadata", "read_data"):
            phases.wrap(r, attr, f"{{stage}}: dcp {attr}")
        return r

    ck = mod.Checkpointer(path, keep_last=0, rank=0, world_size=1)
    for attr, label in (("begin", "begin (remove an interrupted save)"), ("_save_rng", "RNG file"),
                        ("_write", "dcp.save"), ("_verify_written", "verification listing"),
                        ("commit", "COMMITTED, latest, prune"), ("_load_rng", "RNG file")):
        phases.wrap(ck, attr, "{stage}: " + label)
    thread_s = "{stage}: %s (thread-s)"
    with patched(mod, _writer=writer, _reader=reader):
        with patched(os, fsync=phases.timed(os.fsync, thread_s % "fsync")), phases.whole("save"):
            ck.save(1, {"app": state}, {})
        drop_page_cache(files_under(ck.url))
        info = ck.latest()
        copy_ = phases.timed(torch.Tensor.copy_, thread_s % "copy_ into the destination")
        preadv = phases.timed(os.preadv, thread_s % "preadv into the destination")
        with patched(torch, load=phases.timed(torch.load, thread_s % "torch.load")), \
                patched(torch.Tensor, copy_=copy_), patched(os, preadv=preadv), phases.whole("load"):
            ck.load(info, {"app": into}, {})
    ck.fs.rm(ck.root, recursive=True)
    return dict(phases.seconds)


def raw_breakdown(state: dict[str, torch.Tensor], into: dict[str, torch.Tensor], path: str,
                  two_first: bool) -> dict[str, float]:
    """The raw limit: the state's bytes written to one file and fsync'd, then read back cold into
    new buffers (what `raw_local` measures) and into the destination tensors; and written as two
    files from two threads, each fsync'd (the layout of DCP's writer with thread_count=2), before
    or after the rest as `two_first` says."""
    phases = Phases()
    names = list(state)
    halves = [{k: state[k] for k in names[::2]}, {k: state[k] for k in names[1::2]}]
    two = [f"{path}.0", f"{path}.1"]

    def write_two() -> None:
        with ThreadPoolExecutor(2) as pool, phases.whole("raw write + fsync, 2 files from 2 threads"):
            list(pool.map(raw_write, halves, two))
        for half in two:
            os.unlink(half)

    if two_first:
        write_two()
    with patched(os, fsync=phases.timed(os.fsync, "fsync")), phases.whole("raw write + fsync"):
        raw_write(state, path)
    drop_page_cache([path])
    with phases.whole("raw read (cold)"):
        raw_read(path)
    drop_page_cache([path])
    with phases.whole("raw read into the destination (cold)"):
        raw_read_into(path, into)
    os.unlink(path)
    if not two_first:
        write_two()
    phases.seconds["raw: its fsync"] = phases.seconds.pop("fsync")
    return dict(phases.seconds)


def run_breakdown(args, state: dict[str, torch.Tensor], into: dict[str, torch.Tensor]) -> dict:
    import storage.checkpoint as this

    runs: dict[str, list[float]] = defaultdict(list)
    cases: list[tuple[str, ModuleType, str | None]] = [("this", this, None)]
    if args.baseline:
        cases.insert(0, ("baseline", load_module(args.baseline), None))
    names = VARIANTS if args.variants == "all" else [v for v in args.variants.split(",") if v]
    cases += [(name, this, name) for name in names]
    for r in range(args.repeats):
        order = cases if r % 2 == 0 else cases[::-1]
        for i, (case, mod, setting) in enumerate(order):
            if i == len(order) // 2:  # the raw limit in the middle of every repeat
                raw = raw_breakdown(state, into, os.path.join(args.local_dir, f"raw-{r}.bin"), two_first=r % 2 == 1)
                for label, seconds in raw.items():
                    runs[label].append(seconds)
            for t in into.values():
                t.zero_()  # a run's model exists (its pages are there) before it loads
            with variant(setting, mod) if setting else contextlib.nullcontext():
                measured = breakdown(mod, state, into, os.path.join(args.local_dir, f"{case}-{r}"))
            if not all(torch.equal(into[k], state[k].cpu()) for k in state):
                raise SystemExit(f"{case}: the loaded state differs from the saved one")
            for label, seconds in measured.items():
                runs[f"{case} | {label}"].append(seconds)
        print(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{k} {v[-1]:.2f}s" for k, v in runs.items() if k.endswith(("| save", "| load")) or k.startswith("raw w")),
            file=sys.stderr, flush=True)
    return {"bytes": sum(t.nbytes for t in state.values()), "tensors": len(state), "seconds": dict(runs)}


def print_breakdown(result: dict) -> None:
    runs = result["seconds"]
    mib = result["bytes"] / 2**20
    print(f"| phase ({mib:.0f} MiB in {result['tensors']} tensors) | median s | min–max |\n|---|---:|---:|")
    for label, seconds in runs.items():
        print(f"| {label} | {statistics.median(seconds):.3f} | {min(seconds):.3f}–{max(seconds):.3f} |")
    print("\nraw / ours: the median of each repeat's ratio (its raw run in the middle of it), and in brackets "
          "the best raw run over the best of ours (the noise of a shared machine only ever adds time)\n")
    print("| case | save s | raw write / save | raw write, 2 files / save | load s | raw read / load "
          "| raw read into the destination / load |\n|---|---:|---:|---:|---:|---:|---:|")

    def ratio(raw: str, ours: str) -> str:
        per_repeat = statistics.median(a / b for a, b in zip(runs[raw], runs[ours]))
        return f"{per_repeat:.2f} ({min(runs[raw]) / min(runs[ours]):.2f})"

    for case in dict.fromkeys(k.split(" | ")[0] for k in runs if " | " in k):
        save, load = f"{case} | save", f"{case} | load"
        print(f"| {case} | {statistics.median(runs[save]):.2f} | {ratio('raw write + fsync', save)} "
              f"| {ratio('raw write + fsync, 2 files from 2 threads', save)} "
              f"| {statistics.median(runs[load]):.2f} | {ratio('raw read (cold)', load)} "
              f"| {ratio('raw read into the destination (cold)', load)} |")


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
    p.add_argument("--breakdown", action="store_true", help="where a local save's and load's time goes (see above)")
    p.add_argument("--baseline", type=Path, default=None, help="--breakdown: another storage/checkpoint.py to compare")
    p.add_argument("--variants", default="", help=f"--breakdown: 'all' or some of {','.join(VARIANTS)}")
    args = p.parse_args()
    if args.breakdown and args.device != "cpu":
        p.error(f"--breakdown times host memory to local disk; --device {args.device} is for the default mode")
    configure(storage_config("ceph"))
    host = make_state(args.mib, args.tensors)
    state = {k: v.to(args.device) for k, v in host.items()}
    into = {k: torch.empty_like(v) for k, v in state.items()}
    nbytes = sum(t.numel() * t.element_size() for t in state.values())
    runs: dict[str, list[float]] = {}

    def add(name: str, seconds: float) -> None:
        runs.setdefault(name, []).append(seconds)

    os.makedirs(args.local_dir, exist_ok=True)
    if args.breakdown:
        result = run_breakdown(args, state, into)
        print_breakdown(result)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
        return
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
