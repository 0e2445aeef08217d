"""Does a layout fit its accelerators? The capacity plan of one setting, the cheapest fixes,
and the start-up memory check.

`check_fits` is what the start-up checks call before any weight is allocated; `launch.plan`
renders the same plans as a report. The formulas are in `train.capacity` and docs/planning.md.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace

from train import capacity as pm
from train.config import ClusterConfig, Config
from train.distributed import Degrees
from train.model import flops_per_token
from train.parallelize import validate_tp

GiB = 1024**3


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


def current_option(cfg: Config, cluster: ClusterConfig, degrees: Degrees, accum_steps: int) -> Option:
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
        name = f"PP{degrees.pp} x {name}" if degrees.pp > 1 else name
        setting = pm.Setting(name, engine, degrees.dp, degrees.tp,
                             reshard_after_forward=p.fsdp_reshard_after_forward,
                             sequence_parallel=p.sequence_parallel and degrees.tp > 1,
                             fsdp_reduce_per_micro_batch=p.fsdp_reduce_per_micro_batch, float8=str(p.float8),
                             pp=degrees.pp, pp_schedule=str(p.pp_schedule), pp_stages_per_rank=p.pp_stages_per_rank,
                             pp_split=tuple(p.pp_split))
    workload = pm.Workload(cfg.trainer.micro_batch_size, cfg.data.seq_len,
                           accum_steps, is_bf16(cfg, cluster),
                           p.activation_checkpointing == "full",
                           selective_checkpointing=p.activation_checkpointing == "selective")
    return Option(setting, workload)


def make_plan(cfg: Config, cluster: ClusterConfig, option: Option) -> Plan:
    fpt = flops_per_token(cfg.model, cfg.data.seq_len)
    s, w = option.setting, option.workload
    return Plan(option, pm.memory(cfg.model, s, w, cfg.plan, cluster.nodes),
                pm.step_time(cfg.model, s, w, cluster, cfg.plan, fpt), cluster.memory_bytes)


def _accum(current: Option, dp: int, micro_batch_size: int) -> int | None:
    """Accumulation steps that keep the current setting's global batch (tokens per optimizer
    step) with another dp or micro-batch, when it splits evenly; else None. Alternatives are
    compared at the same global batch, whether it was set or derived."""
    w = current.workload
    tokens = w.micro_tokens * w.accum_steps * current.setting.dp
    per_micro_step = micro_batch_size * w.seq_len * dp
    return tokens // per_micro_step if tokens % per_micro_step == 0 and tokens >= per_micro_step else None


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
    rows += _pipeline_rows(cfg, cluster, current)
    options = []
    for s in rows:
        accum = _accum(current, s.dp, w.micro_batch_size)
        if accum is not None and accum >= s.pp:  # a pipeline needs a micro-batch per rank
            options.append(Option(s, replace(w, accum_steps=accum)))
    return options


def _pipeline_rows(cfg: Config, cluster: ClusterConfig, current: Option) -> list[pm.Setting]:
    """With several nodes, tp over the node and pipelines of 2 ranks up to one per node (1F1B),
    the rest data parallel (FSDP2); and the current pipeline, if it has one."""
    ppn, nodes = cluster.procs_per_node, cluster.nodes
    rows = []
    if current.setting.pp > 1:
        rows.append(current.setting)
    if nodes > 1 and _tp_ok(cfg, cluster, ppn):
        pp = 2
        while pp <= nodes and pp <= cfg.model.n_layers:
            if nodes % pp == 0:
                dp = nodes // pp
                name = f"PP{pp} x TP{ppn}" + (f" x FSDP{dp}" if dp > 1 else "")
                if (pp, dp, ppn) != (current.setting.pp, current.setting.dp, current.setting.tp):
                    rows.append(pm.Setting(name, "tp", dp, ppn, pp=pp))
            pp *= 2
    return rows


def fixes(cfg: Config, cluster: ClusterConfig, current: Option) -> tuple[list[Plan], Plan | None]:
    """Single changes that shrink memory (each with its plan), and the fastest fitting combination.

    The changes the native engine offers: shard everything with FSDP2 (reduce-scattering
    every micro-batch's gradients), checkpoint activations (selective or full), more tensor
    parallel inside the node, a smaller micro-batch (more accumulation steps for the same
    global batch).
    """
    s, w = current.setting, current.workload
    world = cluster.nodes * cluster.procs_per_node
    engines = [(s, ())]
    if s.engine == "ddp" and s.dp > 1:
        engines.append((replace(s, name="FSDP2", engine="fsdp", fsdp_reduce_per_micro_batch=True),
                        ("parallel.data_parallel=fsdp",)))
    if s.fsdp and not s.fsdp_reduce_per_micro_batch:
        engines.append((replace(s, fsdp_reduce_per_micro_batch=True), ("parallel.fsdp_reduce_per_micro_batch=true",)))
    checkpointing = [((w.activation_checkpointing, w.selective_checkpointing), ())]
    if w.checkpointing == "none":
        checkpointing.append(((False, True), ("parallel.activation_checkpointing=selective",)))
    if w.checkpointing != "full":
        checkpointing.append(((True, False), ("parallel.activation_checkpointing=full",)))
    tps = [(s.tp, ())] + [(t, (f"parallel.tp={t}", "parallel.data_parallel=fsdp"))
                          for t in range(s.tp + 1, cluster.procs_per_node + 1) if _tp_ok(cfg, cluster, t)]
    batches = [(b, (f"trainer.micro_batch_size={b}",) if b != w.micro_batch_size else ())
               for b in range(w.micro_batch_size, 0, -1) if w.micro_batch_size % b == 0]
    plans = []
    for (es, eo), (ac, ao), (tp, to), (mbs, bo) in itertools.product(engines, checkpointing, tps, batches):
        dp = world // (tp * s.pp)
        if dp * tp * s.pp != world:
            continue
        accum = _accum(current, dp, mbs)
        if accum is None or not (eo or ao or to or bo):
            continue
        setting = es if tp == s.tp else replace(es, name="FSDP x TP" if dp > 1 else "TP", engine="tp", dp=dp, tp=tp)
        workload = replace(w, micro_batch_size=mbs, accum_steps=accum, activation_checkpointing=ac[0],
                           selective_checkpointing=ac[1])
        overrides = tuple(dict.fromkeys(eo + ao + to + bo))
        plans.append(make_plan(cfg, cluster, Option(setting, workload, overrides)))
    singles = [p for p in plans if len(p.option.overrides) == 1
               or p.option.overrides[0].startswith("parallel.tp=") and len(p.option.overrides) == 2]
    fitting = [p for p in plans if p.fits]
    best = min(fitting, key=lambda p: (p.time.step_s or 0.0, p.memory.total)) if fitting else None
    return singles, best


def cost(p: Plan) -> str:
    t = p.time
    speed = "time unknown" if t.step_s is None else f"{t.step_s:.2f} s/step, {t.tokens_per_s:,.0f} tokens/s, MFU {t.mfu:.0%}"
    return f"{p.memory.total / GiB:.1f} GiB/GPU, {speed}"


def layout(s: pm.Setting) -> str:
    """"dp 4 x tp 8", or "pp 4 x dp 1 x tp 8" under a pipeline."""
    return (f"pp {s.pp} x " if s.pp > 1 else "") + f"dp {s.dp} x tp {s.tp}"


def _on_rank(plan: Plan) -> str:
    return f" on pipeline rank {plan.memory.pp_rank}" if plan.option.setting.pp > 1 else ""


def check_fits(cfg: Config, cluster: ClusterConfig, degrees: Degrees, accum_steps: int) -> None:
    """Raise PlanError, with the plan's figures and the cheapest fix, if the layout cannot fit."""
    if cluster.memory_bytes <= 0:
        return
    plan = make_plan(cfg, cluster, current_option(cfg, cluster, degrees, accum_steps))
    if plan.fits:
        return
    m = plan.memory
    _, best = fixes(cfg, cluster, plan.option)
    fix = (f"cheapest fix: {' '.join(best.option.overrides)} ({cost(best)})" if best
           else "no change of engine, checkpointing, tp or micro-batch fits: use more GPUs")
    raise PlanError(
        f"plan: model {cfg.model.name} with {plan.option.setting.name} ({layout(plan.option.setting)}) on "
        f"cluster {cluster.name} needs {m.total / GiB:.1f} GiB per GPU{_on_rank(plan)} (parameters {m.params / GiB:.1f}, gradients "
        f"{m.grads / GiB:.1f}, optimizer {m.optimizer / GiB:.1f}, working {m.working / GiB:.1f}, activations "
        f"{m.activations / GiB:.1f}, margin {m.margin / GiB:.1f}) but {cluster.accelerator} has "
        f"{cluster.memory_bytes / GiB:.1f} GiB; {fix}. Details: python -m launch.plan with the same arguments; "
        f"plan.enforce_memory=false starts anyway")
