"""What the block shuffle does to the default run: held-out loss by step, one shard at a time
(`data.shuffle=false`, the order before blocks) against blocks of `data.shuffle_block_shards`.

    python bench/mixing.py --seeds 1234 1 2            # the default run (300 steps), 6 runs one after another
    python bench/mixing.py --smoke                     # seconds: a few steps of one seed; checks it runs

Each run is `python -m train.run` with nothing but `trainer.seed` and `data.shuffle` changed
(the builtin corpus, the tiny model, 16 x 256 tokens a step, evaluation every 50 steps on the
same fixed held-out batches for both orders). The runs go one after another, never side by
side: they share the machine's cores. Reported per run: the held-out loss at each evaluation,
the training loss (mean of the 10 steps before each evaluation), the data wait per step and
tokens/s from metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ORDERS = {"one shard at a time": "data.shuffle=false", "block shuffle": "data.shuffle=true"}


def run(overrides: list[str], workdir: Path) -> list[dict]:
    """One `python -m train.run`; its metrics.jsonl rows."""
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "train.run", *overrides, f"run.dir={workdir}"], cwd=workdir.parent,
                          capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"train.run {' '.join(overrides)} failed:\n{proc.stderr[-3000:]}")
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line]


def summarize(rows: list[dict]) -> dict:
    evals = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    train = {}
    for step in evals:
        window = [r["loss"] for r in rows if step - 10 < r["step"] <= step]
        train[step] = statistics.mean(window)
    timed = rows[1:] or rows
    return {"val_loss": evals, "train_loss": train,
            "data_wait_ms": 1000 * statistics.median(r["data_wait_s"] for r in timed),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed)}


def table(results: dict, seeds: list[int], key: str) -> list[str]:
    steps = sorted(next(iter(results.values()))[seeds[0]][key])
    head = ["step"] + [f"{order}, seed {seed}" for order in ORDERS for seed in seeds] + \
        [f"{order}, mean" for order in ORDERS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for step in steps:
        cells = [str(step)]
        cells += [f"{results[order][seed][key][step]:.3f}" for order in ORDERS for seed in seeds]
        cells += [f"{statistics.mean(results[order][s][key][step] for s in seeds):.3f}" for order in ORDERS]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--steps", type=int, default=0, help="trainer.max_steps (0: the default run's)")
    parser.add_argument("--smoke", action="store_true", help="a few steps of one seed: checks it runs")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    extra = []
    if args.smoke:
        args.seeds = args.seeds[:1]
        extra = ["trainer.max_steps=6", "trainer.eval_interval_steps=3", "trainer.log_interval_steps=1",
                 "data.builtin_max_bytes=2000000", "data.seq_len=64", "checkpoint.interval=0"]
    elif args.steps:
        extra = [f"trainer.max_steps={args.steps}"]
    results: dict = {order: {} for order in ORDERS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for order, override in ORDERS.items():
                workdir = Path(tmp) / f"{seed}-{override.split('=')[1]}"
                rows = run([f"trainer.seed={seed}", override, *extra], workdir)
                results[order][seed] = summarize(rows)
                print(f"seed {seed}, {order}: held-out loss {results[order][seed]['val_loss']}", flush=True)
                if args.json:  # after every run: a long benchmark stopped half-way keeps what it measured
                    args.json.write_text(json.dumps(results, indent=1))
    print("\nheld-out loss")
    print("\n".join(table(results, args.seeds, "val_loss")))
    print("\ntraining loss (mean of the 10 steps up to the evaluation)")
    print("\n".join(table(results, args.seeds, "train_loss")))
    print("\nper run: data wait per step (median, ms) and tokens/s (median)")
    for order in ORDERS:
        for seed in args.seeds:
            r = results[order][seed]
            print(f"  {order}, seed {seed}: {r['data_wait_ms']:.2f} ms, {r['tokens_per_s']:,.0f} tokens/s")


if __name__ == "__main__":
    main()
