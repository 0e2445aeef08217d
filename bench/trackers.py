"""What a tracker costs the training thread per metrics row.

    python bench/trackers.py --mlflow-uri http://127.0.0.1:5000 [--rows 500]
    python bench/trackers.py --smoke        # 20 rows, MLflow in a SQLite store: checks it runs

Times `log_row` of each tracker on the thread that calls it (the training loop's), for a row as
`MetricsLogger.log_step` makes it, against writing the row to metrics.jsonl (what every run pays
anyway) and against the plain alternatives: MLflow's `log_batch` on the calling thread (what a
tracker without a background thread does) and MLflow's own `synchronous=False`. W&B runs offline.
Without --mlflow-uri, MLflow logs to a SQLite store in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from train.config import MonitorConfig
from train.trackers import RunInfo, TensorBoardTracker, scalars


def row(step: int) -> dict:
    return {"step": step, "loss": 5.0 / step, "lr": 3e-4, "grad_norm": 1.2, "tokens_per_s": 1.5e5, "mfu": 0.41,
            "tokens_seen": step * 2**20, "memory_bytes": 60 * 2**30, "memory_reserved_bytes": 70 * 2**30,
            "skipped_shards": 0, "skipped_steps": 0, "data_wait_s": 0.001, "source_tokens": {"web": step * 2**20},
            "slow_ranks": [], "time": time.time()}


def per_row_us(log_row, rows: int) -> tuple[float, float]:
    """(median, mean) microseconds of one call."""
    times = []
    for step in range(1, rows + 1):
        r = row(step)
        start = time.perf_counter()
        log_row(r)
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times), 1e6 * statistics.fmean(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mlflow-uri", default="")
    parser.add_argument("--rows", type=int, default=500)
    parser.add_argument("--smoke", action="store_true", help="20 rows: checks it runs")
    args = parser.parse_args()
    if args.smoke:
        args.rows = 20
    os.environ.setdefault("WANDB_MODE", "offline")
    tmp = Path(tempfile.mkdtemp(prefix="bench-trackers-"))
    info = RunInfo(run_id="bench", run_dir=tmp, name="bench-trackers", config={"optim": {"lr": 3e-4}})
    monitor = MonitorConfig(mlflow_tracking_uri=args.mlflow_uri)
    results: dict[str, tuple[float, float]] = {}

    with open(tmp / "metrics.jsonl", "a", buffering=1) as jsonl:
        results["metrics.jsonl (baseline)"] = per_row_us(lambda r: jsonl.write(json.dumps(r) + "\n"), args.rows)
    tensorboard = TensorBoardTracker(info)
    results["TensorBoard"] = per_row_us(tensorboard.log_row, args.rows)
    tensorboard.close()

    from mlflow.entities import Metric

    from train.mlflow_tracker import MLflowTracker

    mlflow = MLflowTracker(info, monitor)
    results["MLflow (harness: queued)"] = per_row_us(mlflow.log_row, args.rows)
    start = time.perf_counter()
    mlflow.close()
    flush_s = time.perf_counter() - start

    def batch(r: dict) -> list:
        return [Metric(k, v, int(r["time"] * 1000), r["step"]) for k, v in scalars(r).items()]

    client = mlflow._client
    results["MLflow log_batch, same thread"] = per_row_us(
        lambda r: client.log_batch(mlflow.run_id, metrics=batch(r)), args.rows)
    futures = []
    results["MLflow log_batch(synchronous=False)"] = per_row_us(
        lambda r: futures.append(client.log_batch(mlflow.run_id, metrics=batch(r), synchronous=False)), args.rows)
    for future in futures:
        future.wait()

    from train.wandb_tracker import WandbTracker

    wandb = WandbTracker(info, monitor)
    results["W&B offline"] = per_row_us(wandb.log_row, args.rows)
    wandb.close()

    shutil.rmtree(tmp, ignore_errors=True)
    base = results["metrics.jsonl (baseline)"][1]
    print(f"# {args.rows} rows; {os.cpu_count()} CPUs, Python {platform.python_version()}; MLflow at "
          f"{args.mlflow_uri or 'a SQLite store'}")
    print(f"{'per row, training thread':40s} {'median us':>10s} {'mean us':>10s} {'x jsonl':>8s}")
    for name, (median, mean) in results.items():
        print(f"{name:40s} {median:10.1f} {mean:10.1f} {mean / base:8.1f}")
    print(f"MLflow close (flushing the queue of {args.rows} rows): {flush_s:.2f} s")


if __name__ == "__main__":
    main()
