"""`python -m train.run`, unchanged, with the time it waits for data recorded per step.

    python bench/storage_wait.py OUT.json data=shards data.url=s3://bucket/ds storage=ceph ...

Wraps `storage.dataset.BatchStream.next_step`, the one call through which the training loop
takes each step's micro-batches (train/trainer.py: `Trainer.train_step`), with a timer, then
runs `train.run`'s Hydra entry point with the given overrides. At exit it writes OUT.json:
`calls`, a list of [start, end] perf_counter seconds of each next_step call. A call's length is
the data wait of that step; the gap between two starts is the step time.

The loop reports the same wait itself, as the mean per step of each metrics.jsonl row
(`data_wait_s`; bench/data_wait.py reads that); this wrapper keeps every call's start and end,
so the first step's wait and each step's period can be told apart.
"""

from __future__ import annotations

import atexit
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    out, overrides = Path(sys.argv[1]), sys.argv[2:]
    import storage.dataset

    calls: list[list[float]] = []
    next_step = storage.dataset.BatchStream.next_step

    def timed(self):
        start = time.perf_counter()
        batches = next_step(self)
        calls.append([start, time.perf_counter()])
        return batches

    storage.dataset.BatchStream.next_step = timed
    atexit.register(lambda: out.write_text(json.dumps({"calls": calls})))
    from train.run import main as train_main

    sys.argv = ["train.run", *overrides]
    train_main()


if __name__ == "__main__":
    main()
