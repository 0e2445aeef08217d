"""DeepSpeed ZeRO-2 and ZeRO-3 against the native engine's FSDP2: same model, data, layout, run.

    python bench/engines.py --model llama_124m --nproc 2 --seq-len 128 --batch 2 --steps 8
    python bench/engines.py --model llama_1b --cluster 8xH100 --nproc 8 --seq-len 2048 --batch 4 --steps 30
    python bench/engines.py --smoke       # seconds: tiny model, 4 steps, one repeat; checks it runs

Each engine is the real entry point (`torchrun -m train.run`) with only `parallel=` changed:
`fsdp` (FSDP2, the native engine), `zero2`, `zero3`. Every setting gets the same model, seed,
global batch (`--batch` sequences per rank per micro-batch, one micro-batch per step),
precision (bf16 on GPU, fp32 on CPU) and optimizer; evaluation and checkpointing are off
the clock, as the harness itself excludes them. Engines alternate `--repeats` times, in a
rotated order, so drift of a shared machine hits them alike; medians are reported.

- tokens/s: the median of the harness's own per-step figure (metrics.jsonl) after `--warmup`
  steps, over all ranks.
- peak memory: what the harness reports for rank 0 (ranks are symmetric here): the CUDA
  allocator's peak (torch.cuda.max_memory_allocated) on a GPU, the process's peak resident
  set (getrusage ru_maxrss) on a CPU, where it includes the Python runtime and libraries
  (DeepSpeed's import and its kernels too).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ENGINES = ("fsdp", "zero2", "zero3")


# --smoke: every engine through the same runs and the same table, at sizes that take seconds (a small
# builtin corpus too, so a first run does not build the full one), on one rank: each DeepSpeed rank
# spends about 20 s of CPU importing and starting, and tests/test_deepspeed.py runs them on two.
# Flags beside it win.
SMOKE = {"model": "tiny", "nproc": 1, "seq_len": 64, "batch": 4, "steps": 4, "warmup": 1, "repeats": 1,
         "overrides": ["data.builtin_max_bytes=2000000"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="llama_124m")
    parser.add_argument("--cluster", default="", help="+cluster layout (default: the local one)")
    parser.add_argument("--nproc", type=int, default=2, help="processes (ranks) on this machine")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3, help="steps left out of the median")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: seconds, to check it runs")
    parser.set_defaults(overrides=[])
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**SMOKE)
    return parser.parse_args(argv)


def run_engine(args: argparse.Namespace, engine: str, workdir: Path) -> dict:
    run_dir = workdir / f"{engine}-{time.monotonic_ns()}"
    overrides = [
        f"parallel={engine}", f"model={args.model}", f"data.seq_len={args.seq_len}",
        f"model.max_seq_len={args.seq_len}",
        f"trainer.global_batch_tokens={args.batch * args.nproc * args.seq_len}",
        f"trainer.micro_batch_size={args.batch}", f"trainer.max_steps={args.steps}",
        "trainer.log_interval_steps=1", "trainer.eval_interval_steps=0", "trainer.eval_batches=1",
        "checkpoint.interval=0", "checkpoint.resume=never", f"run.dir={run_dir}",
        f"checkpoint.url={run_dir}/checkpoints", f"optim.warmup_steps={min(10, args.steps)}",
        "plan.enforce_memory=false", *args.overrides,
    ]
    if args.cluster:
        overrides.append(f"+cluster={args.cluster}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={args.nproc}", "-m", "train.run", *overrides]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{engine} run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    timed = [r["tokens_per_s"] for r in rows if r["step"] > args.warmup]
    return {"tokens_per_s": statistics.median(timed), "memory_bytes": max(r["memory_bytes"] for r in rows),
            "final_loss": rows[-1]["loss"]}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    engines = args.engines.split(",")
    results: dict[str, list[dict]] = {e: [] for e in engines}
    with tempfile.TemporaryDirectory(prefix="bench-engines-") as tmp:
        for repeat in range(args.repeats):
            order = engines[repeat % len(engines):] + engines[:repeat % len(engines)]
            for engine in order:
                results[engine].append(run_engine(args, engine, Path(tmp)))
                print(f"# repeat {repeat + 1} {engine}: {results[engine][-1]}", file=sys.stderr)
    import torch

    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"{os.cpu_count()} CPU cores"
    print(f"# {args.model}, {args.nproc} ranks, {args.batch} x {args.seq_len} tokens per rank per step, "
          f"{args.steps} steps ({args.warmup} warm-up), {args.repeats} repeat(s); {device}, "
          f"torch {torch.__version__}, {platform.python_version()}")
    base = statistics.median(r["tokens_per_s"] for r in results[engines[0]])
    print(f"| engine | tokens/s | vs {engines[0]} | peak memory per rank (GiB) | loss at step {args.steps} |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for engine in engines:
        tps = statistics.median(r["tokens_per_s"] for r in results[engine])
        mem = statistics.median(r["memory_bytes"] for r in results[engine]) / 2**30
        loss = results[engine][-1]["final_loss"]
        print(f"| {engine} | {tps:,.0f} | {tps / base:.2f} | {mem:.2f} | {loss:.4f} |")


if __name__ == "__main__":
    main()
