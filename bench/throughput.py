"""Harness throughput against a plain PyTorch loop on the same model, in one run.

    python bench/throughput.py --model tiny --steps 40
    python bench/throughput.py --model llama_124m --cluster 1xH100 --compile --steps 50
    python bench/throughput.py --smoke         # seconds: tiny sizes, one repeat; checks it runs, measures nothing

1. The harness: `torchrun --nproc_per_node=1 -m train.run` with the chosen model, batch,
   precision and compile setting, logging every step; tokens/s is the median over the steps
   after the warm-up, read from its metrics.jsonl (evaluation and checkpointing excluded,
   as the harness itself excludes them).
2. The plain loop: the same `Transformer` class, the same batch shape, AdamW, bf16 autocast on
   GPU (fp32 on CPU), the same compile setting, random tokens already on the device: nothing
   but forward, backward, clip and step. Its median step time is the raw limit of this model
   on this device.

The ratio harness / plain is the harness's overhead (data loading, gradient-accumulation
bookkeeping, metrics). MFU = flops_per_token x tokens/s / peak (see train/model.py for the
FLOPs count; the peak is the cluster layout's dense bf16 figure, none on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from train.config import ModelConfig
from train.model import Transformer, flops_per_token


def model_config(name: str) -> ModelConfig:
    data = OmegaConf.load(REPO / "configs" / "model" / f"{name}.yaml")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ModelConfig), data))


def cluster_peak(name: str | None) -> float:
    if not name:
        return 0.0
    return float(OmegaConf.load(REPO / "configs" / "cluster" / f"{name}.yaml").peak_flops_bf16)


def run_harness(args: argparse.Namespace, workdir: Path) -> dict:
    overrides = [
        f"model={args.model}", f"data.seq_len={args.seq_len}",
        f"model.max_seq_len={max(args.seq_len, model_config(args.model).max_seq_len)}",
        f"trainer.global_batch_tokens={args.batch * args.seq_len}",
        f"trainer.micro_batch_size={args.batch}", f"trainer.max_steps={args.steps}",
        "trainer.log_interval_steps=1", "trainer.eval_interval_steps=0", "trainer.eval_batches=1",
        "checkpoint.interval=0", "checkpoint.resume=never", f"run.dir={workdir}/harness",
        f"parallel.compile={str(args.compile).lower()}",
        f"optim.warmup_steps={min(10, args.steps)}", *args.overrides,
    ]
    if args.cluster:
        overrides.append(f"+cluster={args.cluster}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           "-m", "train.run", *overrides]
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"harness run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (workdir / "harness" / "metrics.jsonl").open()]
    timed = [r["tokens_per_s"] for r in rows if r["step"] > args.warmup]
    return {"tokens_per_s": statistics.median(timed), "steps_timed": len(timed)}


def run_plain(args: argparse.Namespace, device: torch.device) -> dict:
    torch.manual_seed(0)
    cfg = model_config(args.model)
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
    model = Transformer(cfg)
    model.init_weights()
    model.to(device)
    if args.compile:
        for name, block in model.layers.named_children():
            model.layers.register_module(name, torch.compile(block))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1)
    bf16 = device.type == "cuda"
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len + 1), device=device)
    times = []
    for step in range(args.steps):
        start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            logits = model(tokens[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    step_s = statistics.median(times)
    peak_mem = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {"tokens_per_s": args.batch * args.seq_len / step_s, "steps_timed": len(times),
            "peak_memory_bytes": peak_mem}


# --smoke: the same two runs and the same report at sizes that take seconds (a small builtin
# corpus too, so a first run does not build the full one); flags given beside it still win.
SMOKE = {"model": "tiny", "batch": 4, "seq_len": 64, "steps": 6, "warmup": 2, "repeats": 1,
         "overrides": ["data.builtin_max_bytes=2000000"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny", help="a preset in configs/model/")
    parser.add_argument("--cluster", default=None, help="a layout in configs/cluster/ (for the peak FLOP/s)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per step")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps not timed")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs of each; medians")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: seconds, to check it runs")
    parser.set_defaults(overrides=[])
    if parser.parse_known_args(argv)[0].smoke:
        parser.set_defaults(**SMOKE)
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = model_config(args.model)
    fpt = flops_per_token(cfg, args.seq_len)
    peak = cluster_peak(args.cluster)
    # Alternate the two so that a noisy neighbour slows both alike; report medians.
    harness_runs, plain_runs = [], []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as tmp:
            harness_runs.append(run_harness(args, Path(tmp)))
        plain_runs.append(run_plain(args, device))
    harness = {**harness_runs[0], "tokens_per_s": statistics.median(
        r["tokens_per_s"] for r in harness_runs), "runs": [r["tokens_per_s"] for r in harness_runs]}
    plain = {**plain_runs[0], "tokens_per_s": statistics.median(
        r["tokens_per_s"] for r in plain_runs), "runs": [r["tokens_per_s"] for r in plain_runs]}

    def mfu(tps: float) -> str:
        return f"{100 * fpt * tps / peak:.1f}%" if peak else "n/a"

    name = torch.cuda.get_device_name(0) if device.type == "cuda" else f"CPU x{os.cpu_count()}"
    ratio = harness["tokens_per_s"] / plain["tokens_per_s"]
    print(f"device: {name} | torch {torch.__version__} | model {args.model} | batch {args.batch} x "
          f"{args.seq_len} | compile {args.compile} | {'bf16' if device.type == 'cuda' else 'fp32'}")
    print(f"{'':8} {'tokens/s':>12} {'GFLOP/s':>9} {'MFU':>7}")
    for label, result in (("harness", harness), ("plain", plain)):
        runs = ", ".join(f"{r:,.0f}" for r in result["runs"])
        print(f"{label:8} {result['tokens_per_s']:12,.0f} {fpt * result['tokens_per_s'] / 1e9:9,.1f} "
              f"{mfu(result['tokens_per_s']):>7}   "
              f"(runs: {runs})")
    print(f"harness / plain = {ratio:.3f}")
    if args.json:
        args.json.write_text(json.dumps({
            "device": name, "model": args.model, "batch": args.batch, "seq_len": args.seq_len,
            "compile": args.compile, "flops_per_token": fpt, "peak_flops": peak,
            "harness": harness, "plain": plain, "ratio": ratio}, indent=1))


if __name__ == "__main__":
    main()
