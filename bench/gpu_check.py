"""The hot path on one GPU, in one run: the harness against a plain PyTorch loop, MFU, memory,
float8, and the capacity planner's predictions beside the measurements.

    python bench/gpu_check.py --json gpu_check.json     # one H100/H200: at most 8 minutes, no network
    python bench/gpu_check.py --smoke                   # CPU: tiny model, 3 steps; checks it runs

For each model (llama_124m, llama_1b, and llama_8b's shape with 4 layers: the 8B-shaped one),
bf16, batch x 2048 tokens, no gradient accumulation, it measures in this one process:

- the harness: `train.run.train` (the entry point's body) with the model, compile off, compile
  on, and compile on with parallel.float8=tensorwise; tokens/s is the median over logging
  windows of WINDOW steps after the warm-up (each window ends with the log step's one read);
  peak memory allocated and reserved are the metrics rows' (window peaks, max over ranks);
- the plain loop: the same `Transformer`, the same compile and float8 setting, bf16 autocast,
  fused AdamW, gradient clipping, random tokens already on the device; timed over the same
  windows with one synchronize at each window's end;
- the planner (`train.fits.make_plan`, as `python -m launch.plan` computes it) for the harness's
  config on the 1xH100 layout: predicted peak memory (without and with its margin) and step time;
- on the first harness run, the device synchronisations (torch.cuda.set_sync_debug_mode) on
  steps that neither log, evaluate nor save: the hot path's promise, on a GPU.

MFU = flops_per_token (6N + attention, train/model.py) x tokens/s / 989 TFLOP/s (dense bf16,
H100 and H200 datasheet). The final checkpoint every real run writes is left out (a no-op
save): the figures are training steps, and a 30 GB write would not fit the time budget.
A case that fails (out of memory, float8 unavailable, a refused setting) is reported as such
in its row, and the others still run. --smoke runs the same code on the CPU at tiny sizes
(eager only; float8 is then refused by the start-up check, which the report shows).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from hydra import compose, initialize_config_dir

import train.trainer
from train import config, distributed, fits, run
from train.checks import startup_checks
from train.model import Transformer, flops_per_token
from train.parallelize import apply_compile, apply_float8, clip_grad_norm_, cross_entropy

PEAK_FLOPS = 989e12  # dense bf16, H100/H200 SXM datasheet
GiB = 2**30
# In the order of the goals (docs/benchmarks.md), so that a run cut short by --budget-s has them.
MODELS = {  # name: (preset, extra overrides, micro-batch)
    "llama_1b": ("llama_1b", [], 4),
    "8b-shaped (4 layers)": ("llama_8b", ["model.n_layers=4", "model.max_seq_len=2048"], 2),
    "llama_124m": ("llama_124m", [], 8),
}
CASES = {"compile": (True, "off"), "compile+float8": (True, "tensorwise"), "eager": (False, "off")}
SMOKE_MODELS = {"tiny": ("tiny", ["data.builtin_max_bytes=2000000"], 4)}
SMOKE_CASES = {"eager": (False, "off"), "float8": (False, "tensorwise")}


@dataclasses.dataclass
class Settings:
    seq_len: int
    warmup: int  # steps not timed (compile, allocator)
    window: int  # steps per timed window (one log row each)
    windows: int
    cluster: str | None  # layout for the plan and the float8 check; None = the local one

    @property
    def steps(self) -> int:
        return self.warmup + self.window * self.windows


GPU = Settings(seq_len=2048, warmup=10, window=10, windows=2, cluster="1xH100")
SMOKE = Settings(seq_len=64, warmup=1, window=1, windows=2, cluster=None)


def overrides_for(preset: str, extra: list[str], batch: int, compile_: bool, float8: str, s: Settings,
                  run_dir: Path) -> list[str]:
    return [f"model={preset}", *extra, f"data.seq_len={s.seq_len}", f"trainer.micro_batch_size={batch}",
            f"trainer.global_batch_tokens={batch * s.seq_len}", f"trainer.max_steps={s.steps}",
            f"trainer.log_interval_steps={s.window}", "trainer.eval_interval_steps=0", "trainer.eval_batches=1",
            "checkpoint.interval=0", "checkpoint.resume=never", "trainer.heartbeat_interval_s=0",
            f"optim.warmup_steps={s.warmup}", f"parallel.compile={str(compile_).lower()}",
            f"parallel.float8={float8}", f"run.dir={run_dir}",
            *([f"+cluster={s.cluster}"] if s.cluster else [])]


def compose_config(overrides: list[str]):
    with initialize_config_dir(config_dir=str(REPO / "configs"), version_base=None):
        return compose(config_name="config", overrides=overrides)


def plan(dcfg) -> dict[str, float | None]:
    """The planner's peak memory (without and with its margin) and step time for this config."""
    cfg = config.to_object(dcfg)
    cluster = cfg.cluster or distributed.local_layout(distributed.World.from_env())
    startup = startup_checks(cfg, cluster, memory=False)
    p = fits.make_plan(cfg, cluster, fits.current_option(cfg, cluster, startup.degrees, startup.accum_steps))
    return {"memory_bytes": p.memory.total - p.memory.margin, "memory_total_bytes": p.memory.total,
            "step_s": p.time.step_s}


@contextlib.contextmanager
def quiet_step_syncs(record: list[int] | None, s: Settings):
    """While active (on CUDA, when `record` is a list): every device synchronisation is charged
    to the step being trained (reads for a log row or the evaluation count towards the step
    they follow); `record` gets the counts of the steps that neither log, evaluate nor save."""
    if record is None or not torch.cuda.is_available():
        yield
        return
    current = [0]
    original = train.trainer.Trainer.train_step

    def counted(self):
        current[0] = self.progress.step + 1
        return original(self)

    per_step: dict[int, int] = {}
    train.trainer.Trainer.train_step = counted
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            showwarning = warnings.showwarning

            def count(message, *args, **kwargs):
                if "synchroniz" in str(message):
                    per_step[current[0]] = per_step.get(current[0], 0) + 1
                else:
                    showwarning(message, *args, **kwargs)

            warnings.showwarning = count
            yield
    finally:
        torch.cuda.set_sync_debug_mode(0)
        train.trainer.Trainer.train_step = original
    logged = {1, s.steps} | {step for step in range(1, s.steps + 1) if step % s.window == 0}
    record.extend(n for step, n in per_step.items() if step and step not in logged)


def run_harness(overrides: list[str], s: Settings, run_dir: Path, syncs: list[int] | None) -> dict[str, Any]:
    dcfg = compose_config(overrides)
    planned = plan(dcfg)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    original_save = train.trainer.Trainer.save
    train.trainer.Trainer.save = lambda self: None  # training steps only (module docstring)
    try:
        with quiet_step_syncs(syncs, s):
            run.train(dcfg)
    finally:
        train.trainer.Trainer.save = original_save
        distributed.shutdown()
        free_memory()
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    timed = [r for r in rows if r["step"] > s.warmup]
    reserved = [r["memory_reserved_bytes"] for r in rows if r.get("memory_reserved_bytes") is not None]
    return {"tokens_per_s": statistics.median(r["tokens_per_s"] for r in timed),
            "memory_bytes": max(r["memory_bytes"] for r in rows),
            "memory_reserved_bytes": max(reserved) if reserved else None,
            "loss": rows[-1]["loss"], "plan": planned}


def run_plain(dcfg, s: Settings, compile_: bool, float8: str, device: torch.device) -> dict[str, Any]:
    """The same model in a plain loop: forward, loss, backward, clip, fused AdamW step."""
    cfg = config.to_object(dcfg)
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(cfg.model)
    if float8 != "off":
        apply_float8(model, float8, fsdp=False)
    if compile_:
        apply_compile(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    batch = cfg.trainer.micro_batch_size
    tokens = torch.randint(0, cfg.model.vocab_size, (batch, s.seq_len + 1), device=device)
    bf16 = device.type == "cuda"
    if bf16:
        torch.cuda.reset_peak_memory_stats()

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = cross_entropy(model(tokens[:, :-1]), tokens[:, 1:])
        loss.backward()
        clip_grad_norm_(model, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for _ in range(s.warmup):
        step()
    rates = []
    for _ in range(s.windows):
        started = time.perf_counter()
        for _ in range(s.window):
            step()
        if bf16:
            torch.cuda.synchronize()
        rates.append(s.window * batch * s.seq_len / (time.perf_counter() - started))
    memory = torch.cuda.max_memory_allocated() if bf16 else None
    return {"tokens_per_s": statistics.median(rates), "memory_bytes": memory}


def free_memory() -> None:
    """Let the next run start from an empty device (the last run's objects may sit in cycles)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def case(model: str, spec: tuple, name: str, compile_: bool, float8: str, s: Settings, device: torch.device,
         syncs: list[int] | None) -> dict[str, Any]:
    preset, extra, batch = spec
    row: dict[str, Any] = {"model": model, "case": name, "batch": batch, "seq_len": s.seq_len}
    with tempfile.TemporaryDirectory() as tmp:
        run_dir = Path(tmp) / "run"
        overrides = overrides_for(preset, extra, batch, compile_, float8, s, run_dir)
        dcfg = compose_config(overrides)
        fpt = flops_per_token(config.to_object(dcfg).model, s.seq_len)
        try:
            row["harness"] = run_harness(overrides, s, run_dir, syncs)
            row["plain"] = run_plain(dcfg, s, compile_, float8, device)
            free_memory()
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - the row says why; the other cases still run
            row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            distributed.shutdown()
            free_memory()
    row["flops_per_token"] = fpt
    if "harness" in row:
        row["ratio"] = row["harness"]["tokens_per_s"] / row["plain"]["tokens_per_s"]
        row["mfu"] = fpt * row["harness"]["tokens_per_s"] / PEAK_FLOPS if device.type == "cuda" else None
        row["step_s"] = batch * s.seq_len / row["harness"]["tokens_per_s"]
    return row


def gib(value: float | None) -> str:
    return f"{value / GiB:.2f}" if value is not None else "n/a"


def report(device_name: str, rows: list[dict[str, Any]], syncs: list[int] | None) -> None:
    print(f"device: {device_name} | torch {torch.__version__} | bf16 on GPU, fp32 on CPU | MFU over "
          f"{PEAK_FLOPS / 1e12:.0f} TFLOP/s")
    print("| model | case | harness tokens/s | plain tokens/s | harness / plain | MFU | peak GiB (plan) "
          "| reserved GiB (plan with margin) | step s (plan) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r:
            print(f"| {r['model']} | {r['case']} | not run: {r['error']} |")
            continue
        h, p, planned = r["harness"], r["plain"], r["harness"]["plan"]
        mfu = f"{100 * r['mfu']:.1f} %" if r["mfu"] is not None else "n/a"
        step_plan = f"{planned['step_s']:.3f}" if planned["step_s"] is not None else "n/a"
        print(f"| {r['model']} | {r['case']} | {h['tokens_per_s']:,.0f} | {p['tokens_per_s']:,.0f} | "
              f"{r['ratio']:.3f} | {mfu} | {gib(h['memory_bytes'])} ({gib(planned['memory_bytes'])}) | "
              f"{gib(h['memory_reserved_bytes'])} ({gib(planned['memory_total_bytes'])}) | "
              f"{r['step_s']:.3f} ({step_plan}) |")
    if syncs is None:
        print("device syncs on steps that neither log, evaluate nor save: n/a (no GPU)")
    else:
        print(f"device syncs on steps that neither log, evaluate nor save: {sum(syncs)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, 3 steps: checks it runs")
    parser.add_argument("--models", nargs="*", default=None, help=f"a subset of {list(MODELS)}")
    parser.add_argument("--budget-s", type=float, default=420,
                        help="start no case after this many seconds (the rest are reported as skipped)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()
    config.register()
    logging.getLogger().setLevel(logging.WARNING)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    models, cases, s = (SMOKE_MODELS, SMOKE_CASES, SMOKE) if args.smoke else (MODELS, CASES, GPU)
    models = {k: v for k, v in models.items() if args.models is None or k in args.models}
    syncs: list[int] | None = [] if device.type == "cuda" else None
    device_name = torch.cuda.get_device_name(0) if device.type == "cuda" else "CPU"
    started, rows = time.perf_counter(), []
    for model, spec in models.items():
        for name, (compile_, float8) in cases.items():
            if time.perf_counter() - started > args.budget_s:
                rows.append({"model": model, "case": name, "error": f"skipped: past --budget-s={args.budget_s:g}"})
                continue
            first = not rows
            rows.append(case(model, spec, name, compile_, float8, s, device, syncs if first else None))
            print(f"{model} {name}: done at {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
            if args.json:  # after every case: a run stopped from outside keeps what it measured
                write_json(args.json, device_name, rows, syncs, time.perf_counter() - started)
    report(device_name, rows, syncs)


def write_json(path: Path, device_name: str, rows: list[dict[str, Any]], syncs: list[int] | None,
               wall_s: float) -> None:
    path.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "peak_flops": PEAK_FLOPS,
                                "quiet_step_syncs": None if syncs is None else sum(syncs), "rows": rows,
                                "wall_s": wall_s}, indent=1))


if __name__ == "__main__":
    main()
