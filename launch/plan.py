"""Capacity plan: `python -m launch.plan +cluster=8xA100 model=llama_8b parallel=fsdp_tp [--compare]`.

From the same config as a run, and without starting anything, prints per GPU the memory of
the layout (parameters, gradients, optimizer state, activations with and without
checkpointing, a working margin), the bytes each collective moves on each link, the
predicted step time, tokens/s and MFU, and a verdict. Where the layout does not fit, it names
the cheapest changes that make it fit, each with its predicted cost. `--compare` adds a table
over every engine setting. Exit status: 0 fits (or the accelerator's memory is unknown),
1 does not fit, 2 the layout itself is wrong.

`check_fits(cfg, cluster, degrees)` is what `train.run` calls before it allocates anything.
The formulas are in `launch.plan_model` and docs/planning.md.
"""

from __future__ import annotations

import itertools
import sys
from dataclasses import dataclass, replace

import hydra
from omegaconf import DictConfig

from launch import plan_model as pm
from train import config, distributed
from train.config import ClusterConfig, Config
from train.model import flops_per_token
from train.parallelize import validate_tp

GiB = 1024**3
COMPARE_FLAG = "--compare"


class PlanError(ValueError):
    """The layout's predicted memory exceeds the accelerator's."""


@dataclass(frozen=True)
class Option:
    """A setting and workload, with the overrides that select it."""

    setting: pm.Setting
    workload: pm.Workload
    overrides: tuple[str, ...] = ()


@dataclass
class Plan:
    option: Option
    memory: pm.Memory
    time: pm.StepTime
    capacity: int  # accelerator memory; 0 = unknown

    @property
    def fits(self) -> bool | None:
        return None if self.capacity <= 0 else self.memory.total <= self.capacity


def is_bf16(cfg: Config, cluster: ClusterConfig) -> bool:
    mp = cfg.parallel.mixed_precision
    return mp == "bf16" or (mp == "auto" and cluster.device == "cuda")


def current_option(cfg: Config, cluster: ClusterConfig, degrees: distributed.Degrees) -> Option:
    """The setting the run would use, as `train.parallelize.parallelize` applies it."""
    p = cfg.parallel
    if p.engine == "deepspeed":
        setting = pm.Setting(f"ZeRO-{p.zero_stage}", "zero", degrees.dp, zero_stage=p.zero_stage,
                             offload_optimizer=p.offload_optimizer, offload_params=p.offload_params)
    else:
        if degrees.tp > 1:
            engine, name = "tp", "FSDP x TP" if degrees.dp > 1 else "TP"
        elif p.data_parallel == "fsdp":
            engine, name = "fsdp", "FSDP2"
        else:
            engine, name = "ddp", "DDP" if degrees.dp > 1 else "single process"
        setting = pm.Setting(name, engine, degrees.dp, degrees.tp,
                             reshard_after_forward=p.fsdp_reshard_after_forward,
                             sequence_parallel=p.sequence_parallel and degrees.tp > 1)
    workload = pm.Workload(cfg.trainer.micro_batch_size, cfg.data.seq_len,
                           distributed.check_batch(cfg, degrees.dp), is_bf16(cfg, cluster),
                           p.activation_checkpointing == "full")
    return Option(setting, workload)


def make_plan(cfg: Config, cluster: ClusterConfig, option: Option) -> Plan:
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    s, w = option.setting, option.workload
    return Plan(option, pm.memory(cfg.model, s, w, cfg.plan, cluster.nodes),
                pm.step_time(cfg.model, s, w, cluster, cfg.plan, fpt), cluster.memory_bytes)


def _accum(cfg: Config, dp: int, micro_batch_size: int) -> int | None:
    """Accumulation steps when the global batch splits evenly, else None."""
    samples = cfg.trainer.global_batch_tokens // cfg.data.seq_len
    per_step = micro_batch_size * dp
    return samples // per_step if samples % per_step == 0 and samples >= per_step else None


def _tp_ok(cfg: Config, cluster: ClusterConfig, tp: int) -> bool:
    world = cluster.nodes * cluster.procs_per_node
    if tp > cluster.procs_per_node or world % tp:
        return False
    try:
        validate_tp(cfg.model, tp)
    except ValueError:
        return False
    return True


def compare_options(cfg: Config, cluster: ClusterConfig, current: Option) -> list[Option]:
    """Every engine setting for this model, layout, micro-batch and checkpointing."""
    world, ppn = cluster.nodes * cluster.procs_per_node, cluster.procs_per_node
    w = current.workload
    if world == 1:
        return [current]
    tp2 = current.setting.tp if 1 < current.setting.tp < world else 2
    rows = [pm.Setting("DDP", "ddp", world), pm.Setting("FSDP2", "fsdp", world)]
    if _tp_ok(cfg, cluster, ppn) and ppn > 1:
        rows.append(pm.Setting("TP" if cluster.nodes == 1 else "TP (FSDP over nodes)", "tp", world // ppn, ppn))
    if _tp_ok(cfg, cluster, tp2) and tp2 != ppn and world // tp2 > 1:
        rows.append(pm.Setting(f"FSDP x TP{tp2}", "tp", world // tp2, tp2))
    rows += [
        pm.Setting("ZeRO-1", "zero", world, zero_stage=1),
        pm.Setting("ZeRO-2", "zero", world, zero_stage=2),
        pm.Setting("ZeRO-3", "zero", world, zero_stage=3),
        pm.Setting("ZeRO-2 + offload optimizer", "zero", world, zero_stage=2, offload_optimizer=True),
        pm.Setting("ZeRO-3 + offload optimizer, params", "zero", world, zero_stage=3,
                   offload_optimizer=True, offload_params=True),
    ]
    options = []
    for s in rows:
        accum = _accum(cfg, s.dp, w.micro_batch_size)
        if accum is not None:
            options.append(Option(s, replace(w, accum_steps=accum)))
    return options


def fixes(cfg: Config, cluster: ClusterConfig, current: Option) -> tuple[list[Plan], Plan | None]:
    """Single changes that shrink memory (each with its plan), and the fastest fitting combination.

    The changes the native engine offers: shard everything with FSDP2, checkpoint
    activations, more tensor parallel inside the node, a smaller micro-batch (more
    accumulation steps for the same global batch).
    """
    s, w = current.setting, current.workload
    world = cluster.nodes * cluster.procs_per_node
    engines = [(s, ())]
    if s.engine == "ddp" and s.dp > 1:
        engines.append((replace(s, name="FSDP2", engine="fsdp"), ("parallel.data_parallel=fsdp",)))
    checkpointing = [(w.activation_checkpointing, ())]
    if not w.activation_checkpointing:
        checkpointing.append((True, ("parallel.activation_checkpointing=full",)))
    tps = [(s.tp, ())] + [(t, (f"parallel.tp={t}", "parallel.data_parallel=fsdp"))
                          for t in range(s.tp + 1, cluster.procs_per_node + 1) if _tp_ok(cfg, cluster, t)]
    batches = [(b, (f"trainer.micro_batch_size={b}",) if b != w.micro_batch_size else ())
               for b in range(w.micro_batch_size, 0, -1) if w.micro_batch_size % b == 0]
    plans = []
    for (es, eo), (ac, ao), (tp, to), (mbs, bo) in itertools.product(engines, checkpointing, tps, batches):
        dp = world // tp
        accum = _accum(cfg, dp, mbs)
        if accum is None or not (eo or ao or to or bo):
            continue
        setting = es if tp == s.tp else replace(es, name="FSDP x TP" if dp > 1 else "TP", engine="tp", dp=dp, tp=tp)
        workload = replace(w, micro_batch_size=mbs, accum_steps=accum, activation_checkpointing=ac)
        overrides = tuple(dict.fromkeys(eo + ao + to + bo))
        plans.append(make_plan(cfg, cluster, Option(setting, workload, overrides)))
    singles = [p for p in plans if len(p.option.overrides) == 1
               or p.option.overrides[0].startswith("parallel.tp=") and len(p.option.overrides) == 2]
    fitting = [p for p in plans if p.fits]
    best = min(fitting, key=lambda p: (p.time.step_s or 0.0, p.memory.total)) if fitting else None
    return singles, best


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def _row(label: str, n: float) -> str:
    return f"  {label:<48}{_gib(n)}"


def _seconds(t: float | None) -> str:
    return "       ?" if t is None else f"{t * 1e3:8.1f}"


def _cost(p: Plan) -> str:
    t = p.time
    speed = "time unknown" if t.step_s is None else f"{t.step_s:.2f} s/step, {t.tokens_per_s:,.0f} tokens/s, MFU {t.mfu:.0%}"
    return f"{p.memory.total / GiB:.1f} GiB/GPU, {speed}"


def describe(cfg: Config, cluster: ClusterConfig, plan: Plan) -> list[str]:
    """The full report for one plan, as lines."""
    s, w, m, t = plan.option.setting, plan.option.workload, plan.memory, plan.time
    world = cluster.nodes * cluster.procs_per_node
    peak = f"{cluster.peak_flops_bf16 / 1e12:.0f} TFLOP/s bf16" if cluster.peak_flops_bf16 else "peak unknown"
    capacity = f"{cluster.memory_bytes / GiB:.1f} GiB" if cluster.memory_bytes else "memory unknown"
    lines = [
        f"plan: model {cfg.model.name} ({pm.total_params(cfg.model) / 1e9:.2f}B parameters) on cluster {cluster.name}: "
        f"{cluster.nodes} node(s) x {cluster.procs_per_node} {cluster.accelerator} ({capacity}, {peak})",
        f"setting: {s.name}, dp {s.dp} x tp {s.tp}{' (sequence parallel)' if s.sequence_parallel else ''} | "
        f"{'bf16 mixed precision' if w.bf16 else 'fp32'} | micro-batch {w.micro_batch_size} x {w.seq_len} tokens, "
        f"{w.accum_steps} accumulation step(s), {w.micro_tokens * w.accum_steps * s.dp:,} tokens/step | "
        f"activation checkpointing {'full' if w.activation_checkpointing else 'none'}",
        "",
        f"{'memory per GPU':<50}{'GiB':>8}",
        _row("parameters", m.params),
        _row("gradients", m.grads),
        _row("optimizer state (AdamW moments, fp32 master)", m.optimizer),
        _row("engine working set (gathers, buckets, casts)", m.working),
        _row(f"activations, checkpointing {'full' if w.activation_checkpointing else 'none'}", m.activations)
        + f"   ({'none' if w.activation_checkpointing else 'full'}: {m.activations_other / GiB:.2f})",
        _row(f"margin ({cfg.plan.reserved_bytes / GiB:.1f} GiB + {cfg.plan.fragmentation_fraction:.0%} fragmentation)", m.margin),
        _row("total", m.total) + f"   of {capacity}",
    ]
    if m.host_bytes_per_node:
        lines.append(_row("host memory per node (offloaded state)", m.host_bytes_per_node))
    lines += ["", "communication per step                calls   payload GiB  NVLink GiB/GPU  network GiB/node  time ms"]
    for coll, tr in t.traffic:
        lines.append(f"  {coll.kind:<15} {coll.group:<3} {coll.calls:>12}  {_gib(coll.payload_bytes)}      {_gib(tr.nvlink_bytes_per_gpu)}"
                     f"        {_gib(tr.network_bytes_per_node)}  {_seconds(tr.seconds)}")
    if not t.traffic:
        lines.append("  none (a single process)")
    nvlink = sum(tr.nvlink_bytes_per_gpu for _, tr in t.traffic)
    network = sum(tr.network_bytes_per_node for _, tr in t.traffic)
    inter = (f"{cluster.inter_node_link} {network / GiB:.2f} GiB per node at "
             f"{cluster.inter_node_bandwidth_bytes_per_s / 1e9:.0f} GB/s" if cluster.nodes > 1 else "one node: no network")
    lines.append(f"  by link: {cluster.intra_node_link} {nvlink / GiB:.2f} GiB per GPU at "
                 f"{cluster.intra_node_bandwidth_bytes_per_s / 1e9:.0f} GB/s; {inter}")
    lines += ["", "step time (T = compute / n + exposed communication)"]
    if t.compute_s is None:
        lines.append(f"  compute: {t.flops_per_step:.3g} FLOPs per step; the accelerator's peak is unknown, so no time or MFU")
    else:
        recompute = " x 4/3 (recompute)" if w.activation_checkpointing else ""
        lines.append(f"  compute: {t.flops_per_step:.3g} FLOPs{recompute} / ({world} x {cluster.peak_flops_bf16 / 1e12:.0f} "
                     f"TFLOP/s x {cfg.plan.matmul_efficiency:.0%} sustained) = {t.compute_s * 1e3:.1f} ms")
    lines.append(f"  tensor-parallel communication (on the critical path): {_seconds(t.tp_comm_s).strip()} ms")
    lines.append(f"  data-parallel communication (own stream, overlaps compute): {_seconds(t.dp_comm_s).strip()} ms, "
                 f"exposed {_seconds(t.exposed_dp_s).strip()} ms")
    if t.offload_s:
        lines.append(f"  host offload transfers: {t.offload_s * 1e3:.1f} ms")
    if t.step_s is not None:
        lines.append(f"  step {t.step_s:.3f} s | {t.tokens_per_s:,.0f} tokens/s | MFU {t.mfu:.1%}")
    return lines


def compare_table(cfg: Config, cluster: ClusterConfig, plans: list[Plan]) -> list[str]:
    head = (f"{'setting':<36} {'dp x tp':>8} {'params':>7} {'grads':>7} {'optim':>7} {'working':>8} "
            f"{'activ.':>7} {'total':>7}  {'fits':<5} {'step s':>7} {'tokens/s':>10} {'MFU':>6}")
    lines = ["", "every engine setting (GiB per GPU; activations with the configured checkpointing)", head]
    for p in plans:
        s, m, t = p.option.setting, p.memory, p.time
        fits = "?" if p.fits is None else ("yes" if p.fits else "no")
        speed = (f"{t.step_s:7.3f} {t.tokens_per_s:10,.0f} {t.mfu:6.1%}" if t.step_s is not None
                 else f"{'?':>7} {'?':>10} {'?':>6}")
        lines.append(f"{s.name:<36} {f'{s.dp}x{s.tp}':>8} {m.params / GiB:7.2f} {m.grads / GiB:7.2f} "
                     f"{m.optimizer / GiB:7.2f} {m.working / GiB:8.2f} {m.activations / GiB:7.2f} "
                     f"{m.total / GiB:7.2f}  {fits:<5} {speed}")
    return lines


def verdict(cfg: Config, cluster: ClusterConfig, plan: Plan) -> tuple[bool, list[str]]:
    """(fits or unknown, lines): where it does not fit, the cheapest changes that make it fit."""
    if plan.fits is None:
        return True, [f"verdict: unknown: cluster {cluster.name} does not give the accelerator's memory "
                      "(memory_bytes: 0); nothing to check against"]
    if plan.fits:
        return True, [f"verdict: fits: {plan.memory.total / GiB:.1f} of {cluster.memory_bytes / GiB:.1f} GiB per GPU"]
    lines = [f"verdict: does not fit: {plan.memory.total / GiB:.1f} GiB per GPU needed, "
             f"{cluster.memory_bytes / GiB:.1f} GiB available"]
    singles, best = fixes(cfg, cluster, plan.option)
    for p in sorted(singles, key=lambda p: p.memory.total):
        lines.append(f"  {' '.join(p.option.overrides):<55} -> {_cost(p)}{'' if p.fits else '  (still too big)'}")
    if best is None:
        lines.append("  no combination of these changes fits: more GPUs or a smaller model/sequence")
    else:
        lines.append(f"  cheapest that fits: {' '.join(best.option.overrides)} -> {_cost(best)}")
    return False, lines


def check_fits(cfg: Config, cluster: ClusterConfig, degrees: distributed.Degrees) -> None:
    """Raise PlanError, with the plan's figures and the cheapest fix, if the layout cannot fit."""
    if cluster.memory_bytes <= 0:
        return
    plan = make_plan(cfg, cluster, current_option(cfg, cluster, degrees))
    if plan.fits:
        return
    m = plan.memory
    _, best = fixes(cfg, cluster, plan.option)
    fix = (f"cheapest fix: {' '.join(best.option.overrides)} ({_cost(best)})" if best
           else "no change of engine, checkpointing, tp or micro-batch fits: use more GPUs")
    raise PlanError(
        f"plan: model {cfg.model.name} with {plan.option.setting.name} (dp {degrees.dp} x tp {degrees.tp}) on "
        f"cluster {cluster.name} needs {m.total / GiB:.1f} GiB per GPU (parameters {m.params / GiB:.1f}, gradients "
        f"{m.grads / GiB:.1f}, optimizer {m.optimizer / GiB:.1f}, working {m.working / GiB:.1f}, activations "
        f"{m.activations / GiB:.1f}, margin {m.margin / GiB:.1f}) but {cluster.accelerator} has "
        f"{cluster.memory_bytes / GiB:.1f} GiB; {fix}. Details: python -m launch.plan with the same arguments; "
        f"plan.enforce_memory=false starts anyway")


def run_plan(cfg: Config, compare: bool) -> tuple[int, list[str]]:
    """(exit status, report lines) for a config."""
    world = distributed.World.from_env()
    cluster = cfg.cluster or distributed.local_layout(world)
    world_size = cluster.nodes * cluster.procs_per_node
    try:
        degrees = distributed.resolve_degrees(cfg.parallel, cluster, world_size, cfg.model.n_heads, cfg.model.n_kv_heads)
        validate_tp(cfg.model, degrees.tp)
        current = current_option(cfg, cluster, degrees)
    except ValueError as exc:
        return 2, [f"plan: {exc}"]
    plan = make_plan(cfg, cluster, current)
    lines = describe(cfg, cluster, plan)
    if compare:
        lines += compare_table(cfg, cluster, [make_plan(cfg, cluster, o) for o in compare_options(cfg, cluster, current)])
    ok, tail = verdict(cfg, cluster, plan)
    return (0 if ok else 1), lines + [""] + tail


_compare = False


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dcfg: DictConfig) -> None:
    status, lines = run_plan(config.to_object(dcfg), _compare)
    print("\n".join(lines), flush=True)  # the report is this command's output
    sys.exit(status)


config.register()

if __name__ == "__main__":
    if COMPARE_FLAG in sys.argv:  # ours, not Hydra's: take it out before Hydra parses
        sys.argv.remove(COMPARE_FLAG)
        _compare = True
    main()
