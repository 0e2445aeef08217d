"""The pipeline bubble measured on the CPU against the planner's formula, 1F1B and Interleaved1F1B.

    python bench/pipeline_bubble.py                        # m = 4, 8, 16; 5 timed steps each
    python bench/pipeline_bubble.py --micro-batches 8 --steps 10 --json bubble.json
    python bench/pipeline_bubble.py --smoke                # seconds: m = 2, one timed step

Two gloo ranks (one thread each) run the real `train.pipeline.PipelineEngine` with pp=2 on a
small untied model (--layers blocks of --dim, even so every stage of both schedules holds the
same number of blocks), 1F1B (v = 1) and Interleaved1F1B (v = 2), for every m of
--micro-batches. Each rank times its stages' forward and backward computations
(`forward_one_chunk`, `backward_one_chunk`, from the start of each to its end); a step's wall
time runs from a barrier to the end of `train_step`. Idle = 1 - busy / wall per rank, averaged
over the ranks and the timed steps (one untimed step first: torch's shape inference). The formula
is `train.stages.bubble_fraction`: (p - 1) / (v m + p - 1), which assumes equal forward and
backward times on every stage and free point-to-point transfers; what a CPU adds (the loss on the
last stage, the embedding on the first, gloo's copies, the schedule's own Python) shows as the
difference. The plain alternative, one process running the same m micro-batches through the whole
model (accumulating), is timed in the same run: `vs 1 process` is the pipeline's step time over
half of it (1.0 = a perfect 2-stage speedup).

On a GPU: one GPU cannot host a pipeline of two stages; docs/planning.md gives the planner's
prediction for 70B on 4 x 8 A100 instead.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SCHEDULES = {"1F1B": 1, "Interleaved1F1B": 2}  # name: stages per rank
SMOKE = {"micro_batches": [2], "steps": 1, "dim": 64, "layers": 4, "seq_len": 32}


def _overrides(args: argparse.Namespace, schedule: str | None) -> list[str]:
    model = [f"model.dim={args.dim}", f"model.n_layers={args.layers}", "model.n_heads=4", "model.n_kv_heads=4",
             "model.tie_embeddings=false", f"data.seq_len={args.seq_len}", f"trainer.micro_batch_size={args.micro_batch}"]
    if schedule is None:
        return model
    return ["+cluster=2xCPU", *model, "parallel.pp=2", f"parallel.pp_schedule={schedule}",
            f"parallel.pp_stages_per_rank={SCHEDULES[schedule]}"]


class _Busy:
    """Seconds spent inside the stages' forward and backward computations of this process."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, cls: type, name: str) -> None:
        method = getattr(cls, name)

        def timed(*a, **k):
            start = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                self.seconds += time.perf_counter() - start

        setattr(cls, name, timed)


def _rank(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from launch.compose import load
    from train import pipeline
    from train.model import Transformer

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    busy = _Busy()
    busy.wrap(pipeline._Stage, "forward_one_chunk")
    busy.wrap(pipeline._Stage, "backward_one_chunk")
    rows = []
    for schedule in SCHEDULES:
        _, cfg = load(_overrides(args, schedule))
        for m in args.micro_batches:
            mesh = init_device_mesh("cpu", (2, 1, 1), mesh_dim_names=("pp", "dp", "tp"))
            torch.manual_seed(0)
            parts = pipeline.parts(Transformer(cfg.model), cfg.parallel, mesh["pp"].get_local_rank())
            engine = pipeline.PipelineEngine(parts, cfg, mesh, torch.device("cpu"), m)
            tokens = torch.randint(0, cfg.model.vocab_size, (m * args.micro_batch, args.seq_len + 1),
                                   generator=torch.Generator().manual_seed(0))
            for step in range(args.steps + 1):
                dist.barrier()
                busy.seconds, start = 0.0, time.perf_counter()
                engine.train_step(tokens[:, :-1], tokens[:, 1:], None)
                wall = time.perf_counter() - start
                if step:
                    rows.append({"schedule": schedule, "m": m, "rank": rank, "wall_s": wall, "busy_s": busy.seconds})
    dist.destroy_process_group()
    Path(out).write_text(json.dumps(rows))


def _one_process(args: argparse.Namespace, m: int) -> float:
    """Seconds per step of the same m micro-batches through the whole model in one process."""
    import torch

    from launch.compose import load
    from train.model import Transformer
    from train.parallelize import cross_entropy

    torch.set_num_threads(1)
    _, cfg = load(_overrides(args, None))
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    tokens = torch.randint(0, cfg.model.vocab_size, (m, args.micro_batch, args.seq_len + 1),
                           generator=torch.Generator().manual_seed(0))
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        for i in range(m):
            (cross_entropy(model(tokens[i, :, :-1]), tokens[i, :, 1:]) / m).backward()
        if step:
            times.append(time.perf_counter() - start)
    return statistics.mean(times)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--micro-batches", type=int, nargs="+", default=[4, 8, 16])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per schedule and m")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--micro-batch", type=int, default=2, help="sequences per micro-batch")
    parser.add_argument("--json", type=Path, help="write every timed step of every rank here")
    parser.add_argument("--smoke", action="store_true", help="seconds: m = 2, one timed step, a tiny model")
    args = parser.parse_args()
    if args.smoke:
        for key, value in SMOKE.items():
            setattr(args, key, value)
    if args.layers % 4:
        parser.error(f"--layers {args.layers}: must be a multiple of 4 (4 stages of Interleaved1F1B, equal)")

    import torch.multiprocessing as mp

    from train import stages
    from train.config import ParallelConfig, PipelineSchedule

    with tempfile.TemporaryDirectory() as tmp:
        outs = [f"{tmp}/rank{r}.json" for r in range(2)]
        mp.start_processes(_rank_entry, args=(_free_port(), args, outs), nprocs=2, join=True, start_method="spawn")
        rows = [row for out in outs for row in json.loads(Path(out).read_text())]
    plain = {m: _one_process(args, m) for m in args.micro_batches}

    print(f"pp=2 on 2 gloo ranks, 1 thread each; {args.layers} blocks of dim {args.dim}, micro-batch "
          f"{args.micro_batch} x {args.seq_len} tokens; {args.steps} timed step(s) each")
    print("| schedule | m | step s | idle measured | formula (p-1)/(vm+p-1) | measured / formula | vs 1 process |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for schedule, v in SCHEDULES.items():
        parallel = ParallelConfig(pp=2, pp_schedule=PipelineSchedule[schedule], pp_stages_per_rank=v)
        for m in args.micro_batches:
            mine = [r for r in rows if r["schedule"] == schedule and r["m"] == m]
            idle = statistics.mean(1 - r["busy_s"] / r["wall_s"] for r in mine)
            wall = statistics.mean(r["wall_s"] for r in mine)
            formula = stages.bubble_fraction(parallel, m)
            print(f"| {schedule} | {m} | {wall:.3f} | {idle:.1%} | {formula:.1%} | {idle / formula:.2f} | "
                  f"{wall / (plain[m] / 2):.2f} |")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "one_process_s": plain}, indent=1))


def _rank_entry(rank: int, port: int, args: argparse.Namespace, outs: list[str]) -> None:
    _rank(rank, port, args, outs[rank])


if __name__ == "__main__":
    main()
