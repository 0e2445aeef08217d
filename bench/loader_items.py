"""What a DataLoader worker's item costs: the numbers behind storage/dataset.py's choice of k.

    python bench/loader_items.py --json loader-items.json    # a minute or two on 2 cores
    python bench/loader_items.py --smoke                     # seconds: every part once, tiny

Two parts, both on this machine only (no storage in the way: a local dataset in the page cache):

  memory  ms per MiB to get bytes to another process through fresh memory, as DataLoader does
          for every item (a new shared-memory tensor: `torch.empty(n).share_memory_()`, then
          written), against fresh anonymous memory (`mmap`) and against a buffer reused
          (written again). Fresh memory costs a page fault per 4 KiB, on both sides.
  steps   `storage.dataset.BatchStream` over a local dataset of random tokens, warm: inline
          (num_workers 0) and with --workers workers sending k of their steps per item, for
          each k of --k ("auto": the choice `_StepPlan.steps_per_item` makes), for each step
          shape of --shapes (micro-batch x accumulation x seq_len). Per step: wall time, the
          rank's process's CPU (what the training loop pays) and the workers' CPU.

Every variant runs in this process, one after another, alternating in every repeat; medians.
The workers are forked (Linux's default), so they count in RUSAGE_CHILDREN once joined.
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from storage import dataset
from storage.shards import ShardWriter, TokenizerInfo, read_index

SMOKE = {"repeats": 1, "shards": 2, "shard_mib": 1, "steps": 40, "mib": 4, "k": "1,auto", "shapes": "4x2x256"}


def memory_ms_per_mib(mib: int, rounds: int) -> dict[str, float]:
    """ms per MiB to get `mib` MiB written through fresh shared memory, fresh anonymous memory,
    and a buffer written again."""
    n = mib << 20
    reused = np.empty(n, np.uint8)
    reused[:] = 0

    def shared() -> None:
        torch.empty(n, dtype=torch.uint8).share_memory_().fill_(1)

    def anonymous() -> None:
        m = mmap.mmap(-1, n)
        a = np.frombuffer(m, np.uint8)
        a[:] = 1
        del a
        m.close()

    def again() -> None:
        reused[:] = 1

    out = {}
    for name, f in (("fresh shared memory (DataLoader's way)", shared), ("fresh anonymous memory", anonymous),
                    ("buffer written again", again)):
        f()
        start = time.perf_counter()
        for _ in range(rounds):
            f()
        out[name] = (time.perf_counter() - start) / rounds / mib * 1e3
    return out


def cpu_s(who: int) -> float:
    u = resource.getrusage(who)
    return u.ru_utime + u.ru_stime


def one_pass(index, shape: tuple[int, int, int], workers: int, k: str, steps: int) -> dict:
    """A stream of `steps` steps after its first (the workers' start is not counted)."""
    mbs, accum, seq = shape
    auto = dataset._StepPlan.steps_per_item
    if k != "auto":
        dataset._StepPlan.steps_per_item = lambda self, w: int(k)  # this process makes the choice
    try:
        stream = dataset.BatchStream(index, "train", seq, 1, mbs * accum, mbs, 0, 1, num_workers=workers)
        stream.next_step()
        chosen = stream._workers.k if workers else 0
        own, kids, start = cpu_s(resource.RUSAGE_SELF), cpu_s(resource.RUSAGE_CHILDREN), time.perf_counter()
        for _ in range(steps):
            stream.next_step()
        wall = time.perf_counter() - start
        own = cpu_s(resource.RUSAGE_SELF) - own
        stream.close()  # joins the workers: their CPU is in RUSAGE_CHILDREN from here
        del stream
        gc.collect()
        kids = cpu_s(resource.RUSAGE_CHILDREN) - kids
    finally:
        dataset._StepPlan.steps_per_item = auto
    return {"k": chosen, "wall_ms": wall / steps * 1e3, "main_cpu_ms": own / steps * 1e3,
            "workers_cpu_ms": kids / steps * 1e3}


def write_dataset(path: Path, shards: int, shard_mib: int) -> str:
    tokens = shard_mib << 19
    rng = np.random.default_rng(0)
    with ShardWriter(str(path), TokenizerInfo("bench-random", 256, 0, "bench"), shard_tokens=tokens,
                     dtype="<u2") as writer:
        for _ in range(shards):
            writer.add(rng.integers(0, 256, tokens, dtype=np.uint16), "train")
        writer.close()
    return str(path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="8x4x2048,16x1x256",
                   help="step shapes micro_batch x accum x seq_len: the storage benchmark's, the default run's")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--k", default="1,2,4,8,16,32,auto", help="steps per item to measure ('auto': the harness's)")
    p.add_argument("--steps", type=int, default=600, help="steps per pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--shards", type=int, default=16)
    p.add_argument("--shard-mib", type=int, default=8)
    p.add_argument("--mib", type=int, default=64, help="memory part: MiB per round")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="every part once, tiny: to check it runs")
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    args.shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    args.k = args.k.split(",")
    return args


def main() -> None:
    args = parse_args()
    result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                "load_average": os.getloadavg()}, "torch": torch.__version__}
    memory = [memory_ms_per_mib(args.mib, 5) for _ in range(args.repeats)]
    result["memory_ms_per_mib"] = {name: statistics.median(m[name] for m in memory) for name in memory[0]}
    print("| memory written for another process | ms per MiB |\n|---|---:|")
    for name, ms in result["memory_ms_per_mib"].items():
        print(f"| {name} | {ms:.2f} |")
    with tempfile.TemporaryDirectory(prefix="bench-loader-items-") as tmp:
        index = read_index(write_dataset(Path(tmp) / "ds", args.shards, args.shard_mib))
        variants = [(shape, 0, "1") for shape in args.shapes]
        variants += [(shape, args.workers, k) for shape in args.shapes for k in args.k]
        runs: dict[str, list[dict]] = {}
        for shape in args.shapes:  # page cache, and this process's checks of every shard, before any clock
            one_pass(index, shape, 0, "1", 10)
        for r in range(args.repeats):
            for shape, workers, k in variants:
                key = f"{'x'.join(map(str, shape))} workers {workers} k {k}"
                runs.setdefault(key, []).append(one_pass(index, shape, workers, k, args.steps))
                res = runs[key][-1]
                print(f"  [{r + 1}/{args.repeats}] {key}: {res['wall_ms']:.3f} ms/step, main {res['main_cpu_ms']:.3f}, "
                      f"workers {res['workers_cpu_ms']:.3f} ms CPU/step", file=sys.stderr, flush=True)
    result["steps"] = runs
    print("\n| step (mbs x accum x seq_len, KiB of uint16) | workers | steps per item | ms/step | "
          "rank's CPU ms/step | workers' CPU ms/step |\n|---|---:|---:|---:|---:|---:|")
    for key, rs in runs.items():
        shape, rest = key.split(" workers ")
        workers, k = rest.split(" k ")
        mbs, accum, seq = (int(x) for x in shape.split("x"))
        kib = mbs * accum * (seq + 1) * 2 / 1024
        med = {m: statistics.median(r[m] for r in rs) for m in ("wall_ms", "main_cpu_ms", "workers_cpu_ms")}
        shown = "" if workers == "0" else (f"{rs[0]['k']} (auto)" if k == "auto" else k)
        print(f"| {shape} ({kib:,.0f}) | {workers} | {shown} | {med['wall_ms']:.3f} | {med['main_cpu_ms']:.3f} | "
              f"{med['workers_cpu_ms']:.3f} |")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
