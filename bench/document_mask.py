"""What `data.document_mask=true` costs: a training step with the block-causal document mask
against the plain causal step, in one run.

    python bench/document_mask.py                          # tiny and llama_124m steps, then the default run
    python bench/document_mask.py --parts step --models llama_124m --seq-len 2048 --batch 1
    python bench/document_mask.py --smoke                  # seconds: one repeat of tiny sizes; checks it runs

1. step: forward, backward and an AdamW step of the harness's `Transformer` on one batch of
   packed documents (random tokens, documents of random lengths around --doc-len, each ended
   by eos), once plain causal (SDPA's is_causal) and once with the document mask of
   `train.model.attention_mask`: on the CPU the dense [B, 1, T, T] SDPA mask, on CUDA also
   FlexAttention's block mask (compiled). The modes alternate inside every repeat, so the
   machine's noise falls on both; reported: median ms per step and the ratio to causal.
2. run: `python -m train.run` (the default run, shortened to --run-steps) with
   data.document_mask false and true, alternating; median tokens/s from metrics.jsonl.
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.throughput import model_config
from train.model import Transformer, document_ids

EOS = 0


def packed_batch(batch: int, seq_len: int, doc_len: int, vocab: int, seed: int = 0) -> torch.Tensor:
    """[batch, seq_len + 1] tokens: documents of exponential lengths (mean doc_len), eos-ended."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(1, vocab, (batch, seq_len + 1), generator=gen)
    for row in tokens:
        at = 0
        while True:
            at += 1 + int(torch.empty(1).exponential_(1 / doc_len, generator=gen))
            if at > seq_len:
                break
            row[at - 1] = EOS
    return tokens


def time_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, tokens: torch.Tensor,
               documents: torch.Tensor | None, steps: int, sync) -> float:
    """Median seconds of one forward, backward and optimizer step."""
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        logits = model(inputs, documents)
        F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_step(name: str, args: argparse.Namespace, device: torch.device) -> dict:
    cfg = model_config(name)
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    tokens = packed_batch(args.batch, args.seq_len, args.doc_len, cfg.vocab_size).to(device)
    documents = document_ids(tokens[:, :-1], EOS)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    kernels = ["sdpa", "flex"] if device.type == "cuda" else ["sdpa"]
    modes = {"causal": None, **{f"document mask ({k})": k for k in kernels}}
    times: dict[str, list[float]] = {m: [] for m in modes}
    for repeat in range(args.repeats):
        for mode, kernel in modes.items():
            model.mask_kernel = kernel
            time_steps(model, optimizer, tokens, documents if kernel else None, 1, sync)  # warm-up (compile)
            times[mode].append(time_steps(model, optimizer, tokens, documents if kernel else None, args.steps, sync))
    median = {m: statistics.median(t) for m, t in times.items()}
    return {"model": name, "batch": args.batch, "seq_len": args.seq_len,
            "documents_per_sample": round(float((tokens[:, :-1] == EOS).sum(1).float().mean()) + 1, 1),
            "ms_per_step": {m: round(1000 * s, 2) for m, s in median.items()},
            "vs_causal": {m: round(s / median["causal"], 3) for m, s in median.items()}}


def bench_run(args: argparse.Namespace) -> dict:
    tokens_per_s: dict[str, list[float]] = {"causal": [], "document mask": []}
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for mode, flag in (("causal", "false"), ("document mask", "true")):
                run_dir = Path(tmp) / f"{mode.replace(' ', '_')}-{repeat}"
                cmd = [sys.executable, "-m", "train.run", f"trainer.max_steps={args.run_steps}",
                       "trainer.log_interval_steps=1", "trainer.eval_interval_steps=0", "checkpoint.interval=0",
                       f"data.document_mask={flag}", f"run.dir={run_dir}"]
                proc = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, env=env, timeout=3600)
                if proc.returncode != 0:
                    raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
                rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
                tokens_per_s[mode].append(statistics.median(r["tokens_per_s"] for r in rows[1:] or rows))
    median = {m: statistics.median(v) for m, v in tokens_per_s.items()}
    return {"steps": args.run_steps, "tokens_per_s": {m: round(v) for m, v in median.items()},
            "vs_causal": round(median["document mask"] / median["causal"], 3)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="step,run", help="comma-separated: step, run")
    p.add_argument("--models", default="tiny,llama_124m", help="configs/model presets for the step part")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--doc-len", type=int, default=300, help="mean document length in tokens")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode and repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--run-steps", type=int, default=60, help="train.run steps per run in the run part")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one repeat: checks it runs")
    args = p.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.seq_len, args.doc_len = "tiny", 2, 64, 16
        args.steps, args.repeats, args.run_steps = 1, 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    parts = args.parts.split(",")
    results: dict = {"device": torch.cuda.get_device_name() if device.type == "cuda" else f"cpu, {os.cpu_count()} cores",
                     "torch": torch.__version__}
    if "step" in parts:
        results["step"] = [bench_step(name, args, device) for name in args.models.split(",")]
        for r in results["step"]:
            print(f"{r['model']} {r['batch']}x{r['seq_len']} ({r['documents_per_sample']} documents a sample): "
                  + ", ".join(f"{m} {ms} ms ({r['vs_causal'][m]}x)" for m, ms in r["ms_per_step"].items()))
    if "run" in parts:
        results["run"] = bench_run(args)
        r = results["run"]
        print(f"python -m train.run, {r['steps']} steps: causal {r['tokens_per_s']['causal']} tokens/s, "
              f"document mask {r['tokens_per_s']['document mask']} tokens/s ({r['vs_causal']}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
