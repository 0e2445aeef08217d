"""How long the training loop waits for data: `python -m train.run` with and without DataLoader workers.

    python bench/data_wait.py --json data-wait.json       # the default run and a 124M model's step
    python bench/data_wait.py --default-steps 300         # the default run's full length (slow on 2 cores)
    python bench/data_wait.py --smoke                     # seconds: each run once, a few tiny steps

Runs the default `python -m train.run` (builtin corpus, tiny model, 16 x 256-token samples a
step) and `model=llama_124m` (--big-model: a GPT-2-small-sized step; on a CPU a few steps of
a small batch, --big-micro-batch sequences, one micro-batch a step) with each of --workers
(data.num_workers), alternating the settings in every repeat, each run in a fresh process.
Nothing else is changed: no checkpoint but the final one, evaluation as configured (the
big model's: once, at the end, on one micro-batch).

From every metrics.jsonl row: `data_wait_s` (the mean time per step that `Trainer.train_step`
waited in `BatchStream.next_step` since the previous row) and the step time (the row's
global batch tokens / `tokens_per_s`). The first row is step 1 alone: its wait includes
starting the DataLoader workers and the first reads, so it is reported apart from the rest.
The goal (issue 13): the wait after step 1 under 1 % of the step. Prints a markdown table;
--json writes every row of every run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# --smoke: every run once, a few tiny steps; flags given beside it still win.
# The big model's run is the same code with other overrides: left out of the smoke run.
SMOKE = {"repeats": 1, "default_steps": 3, "big_steps": 0, "seq_len": 32}


def run(name: str, overrides: list[str], workers: int, work: Path) -> dict:
    """One `python -m train.run` in a fresh process; its metrics rows and what they say."""
    run_dir = work / f"{name}-w{workers}-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "train.run", f"data.num_workers={workers}", "checkpoint.interval=0",
           "checkpoint.resume=never", f"run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, check=False, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
    shutil.rmtree(run_dir, ignore_errors=True)  # the 124M model's final checkpoint is 1.5 GB
    return {"cmd": cmd[1:], "rows": rows, **summarise(rows)}


def summarise(rows: list[dict]) -> dict:
    """Step time of each row from its tokens/s: tokens per step = tokens_seen / step."""
    tokens_per_step = rows[0]["tokens_seen"] / rows[0]["step"]
    step_s = [tokens_per_step / r["tokens_per_s"] for r in rows]
    waits = [r["data_wait_s"] for r in rows]
    after = rows[1:] or rows
    steps_after = [b["step"] - a["step"] for a, b in itertools.pairwise(rows)] or [1]
    wait_after = sum(r["data_wait_s"] * n for r, n in zip(after, steps_after)) / sum(steps_after)
    step_after = statistics.median(step_s[1:] or step_s)
    return {"first_wait_s": waits[0], "first_step_s": step_s[0], "wait_s": wait_after,
            "max_row_wait_s": max(w for w in (waits[1:] or waits)), "step_s": step_after,
            "wait_fraction": wait_after / step_after, "tokens_per_step": tokens_per_step}


def fmt_ms(values: list[float], digits: int = 2) -> str:
    ms = [v * 1e3 for v in values]
    med = statistics.median(ms)
    return f"{med:,.{digits}f}" if len(ms) == 1 else f"{med:,.{digits}f} ({min(ms):,.{digits}f}–{max(ms):,.{digits}f})"


def report(results: dict[str, list[dict]]) -> str:
    header = ("| run | workers | step 1: wait, ms / step, ms | wait per step after step 1, ms (max row) "
              "| step, ms | wait / step |")
    lines = [header, "|---|---:|---:|---:|---:|---:|"]
    for key, runs in results.items():
        name, workers = key.rsplit(" workers ", 1)
        first = f"{fmt_ms([r['first_wait_s'] for r in runs], 0)} / {fmt_ms([r['first_step_s'] for r in runs], 0)}"
        worst = max(r["max_row_wait_s"] for r in runs) * 1e3
        frac = statistics.median(r["wait_fraction"] for r in runs)
        lines.append(f"| {name} | {workers} | {first} | {fmt_ms([r['wait_s'] for r in runs], 3)} ({worst:.2f}) "
                     f"| {fmt_ms([r['step_s'] for r in runs], 0)} | {100 * frac:.3f} % |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="0,2", help="data.num_workers settings, comma-separated")
    p.add_argument("--repeats", type=int, default=2, help="runs of each setting, alternating")
    p.add_argument("--default-steps", type=int, default=100, help="steps of the default run (its own default: 300)")
    p.add_argument("--big-model", default="llama_124m", help="the second run's model preset (configs/model/)")
    p.add_argument("--big-steps", type=int, default=6, help="steps of the big model's run (0: leave it out)")
    p.add_argument("--big-micro-batch", type=int, default=2, help="big model: sequences per step")
    p.add_argument("--seq-len", type=int, default=0, help="data.seq_len of both runs (0: the default run's, 256)")
    p.add_argument("--workdir", type=Path, default=None, help="scratch for run dirs (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="each run once, a few tiny steps: to check it runs")
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    args.workers = [int(w) for w in args.workers.split(",")]
    return args


def main() -> None:
    args = parse_args()
    seq = [f"data.seq_len={args.seq_len}"] if args.seq_len else []
    runs = {"default run": [f"trainer.max_steps={args.default_steps}", *seq]}
    if args.big_steps:
        # One micro-batch a step; evaluation once, at the end, on one micro-batch.
        runs[args.big_model] = [f"model={args.big_model}", f"trainer.max_steps={args.big_steps}",
                                f"trainer.micro_batch_size={args.big_micro_batch}", "trainer.log_interval_steps=1",
                                "trainer.eval_interval_steps=0", "trainer.eval_batches=1", *seq]
    work = Path(tempfile.mkdtemp(prefix="bench-data-wait-", dir=args.workdir))
    started = time.time()
    results: dict[str, list[dict]] = {}
    try:
        for r in range(args.repeats):
            for name, overrides in runs.items():
                for workers in args.workers:  # alternating: one run of each setting per repeat
                    res = run(name.replace(" ", "-"), overrides, workers, work)
                    results.setdefault(f"{name} workers {workers}", []).append(res)
                    print(f"  [{r + 1}/{args.repeats}] {name}, workers {workers}: step 1 waits "
                          f"{res['first_wait_s'] * 1e3:.0f} ms, then {res['wait_s'] * 1e3:.3f} ms a step of "
                          f"{res['step_s'] * 1e3:.0f} ms ({100 * res['wait_fraction']:.3f} %)", file=sys.stderr, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(report(results))
    if args.json:
        args.json.write_text(json.dumps({
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                        "load_average": os.getloadavg()},
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "wall_s": time.time() - started, "runs": results}, indent=1))


if __name__ == "__main__":
    main()
