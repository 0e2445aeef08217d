"""Capacity plan: `python -m launch.plan +cluster=8xA100 model=llama_8b parallel=fsdp_tp [--compare]`.

From the same config as a run, and without starting anything, prints per GPU the memory of
the layout (parameters, gradients, optimizer state, activations with and without
checkpointing, a working margin), the bytes each collective moves on each link, the
predicted step time, tokens/s and MFU, and a verdict. Where the layout does not fit, it names
the cheapest changes that make it fit, each with its predicted cost. `--compare` adds a table
over every engine setting (with several nodes, pipelines too). With parallel.pp > 1 the memory
is the fullest pipeline rank's, and the report adds the bubble and the point-to-point sends.
Exit status: 0 fits (or the accelerator's memory is unknown), 1 does not fit, 2 the layout
itself is wrong.

The plans and the memory check the run makes at start-up are in `train.fits`; the formulas in
`train.capacity` and docs/planning.md.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from train import capacity as pm
from train import config, distributed
from train.checks import startup_checks
from train.config import ClusterConfig, Config
from train.fits import Plan, compare_options, cost, current_option, fixes, layout, make_plan

GiB = 1024**3
COMPARE_FLAG = "--compare"


def _gib(n: float) -> str:
    return f"{n / GiB:8.2f}"


def _row(label: str, n: float) -> str:
    return f"  {label:<48}{_gib(n)}"


def _seconds(t: float | None) -> str:
    return "       ?" if t is None else f"{t * 1e3:8.1f}"


def describe(cfg: Config, cluster: ClusterConfig, plan: Plan) -> list[str]:
    """The full report for one plan, as lines."""
    s, w, m, t = plan.option.setting, plan.option.workload, plan.memory, plan.time
    world = cluster.nodes * cluster.procs_per_node
    peak = f"{cluster.peak_flops_bf16 / 1e12:.0f} TFLOP/s bf16" if cluster.peak_flops_bf16 else "peak unknown"
    capacity = f"{cluster.memory_bytes / GiB:.1f} GiB" if cluster.memory_bytes else "memory unknown"
    pipeline = (f" ({s.pp_schedule}, {s.pp_stages_per_rank} stage(s) per rank; memory of pipeline rank {m.pp_rank}, "
                f"the fullest)" if s.pp > 1 else "")
    lines = [
        f"plan: model {cfg.model.name} ({pm.total_params(cfg.model) / 1e9:.2f}B parameters) on cluster {cluster.name}: "
        f"{cluster.nodes} node(s) x {cluster.procs_per_node} {cluster.accelerator} ({capacity}, {peak})",
        f"setting: {s.name}, {layout(s)}{pipeline}{' (sequence parallel)' if s.sequence_parallel else ''} | "
        f"{'bf16 mixed precision' if w.bf16 else 'fp32'} | micro-batch {w.micro_batch_size} x {w.seq_len} tokens, "
        f"{w.accum_steps} accumulation step(s), {w.micro_tokens * w.accum_steps * s.dp:,} tokens/step | "
        f"activation checkpointing {w.checkpointing}",
        "",
        f"{'memory per GPU':<50}{'GiB':>8}",
        _row("parameters", m.params),
        _row("gradients", m.grads),
        _row("optimizer state (AdamW moments, fp32 master)", m.optimizer),
        _row("engine working set (gathers, buckets, casts)", m.working),
        _row(f"activations, checkpointing {w.checkpointing}", m.activations)
        + f"   ({'none' if w.checkpointing == 'full' else 'full'}: {m.activations_other / GiB:.2f})",
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
    if s.pp > 1:
        lines.append(f"  pipeline bubble: {t.bubble:.1%} of the step idle (compute above divided by 1 - bubble); "
                     f"point to point {_seconds(t.pp_comm_s).strip()} ms, exposed {_seconds(t.exposed_pp_s).strip()} ms")
    if t.offload_s:
        lines.append(f"  host offload transfers: {t.offload_s * 1e3:.1f} ms")
    if t.step_s is not None:
        lines.append(f"  step {t.step_s:.3f} s | {t.tokens_per_s:,.0f} tokens/s | MFU {t.mfu:.1%}")
    return lines


def compare_table(cfg: Config, cluster: ClusterConfig, plans: list[Plan]) -> list[str]:
    head = (f"{'setting':<36} {'pp x dp x tp':>12} {'params':>7} {'grads':>7} {'optim':>7} {'working':>8} "
            f"{'activ.':>7} {'total':>7}  {'fits':<5} {'step s':>7} {'tokens/s':>10} {'MFU':>6} {'bubble':>6} {'p2p GiB':>8}")
    lines = ["", "every engine setting (GiB per GPU; activations with the configured checkpointing)", head]
    for p in plans:
        s, m, t = p.option.setting, p.memory, p.time
        fits = "?" if p.fits is None else ("yes" if p.fits else "no")
        speed = (f"{t.step_s:7.3f} {t.tokens_per_s:10,.0f} {t.mfu:6.1%}" if t.step_s is not None
                 else f"{'?':>7} {'?':>10} {'?':>6}")
        p2p = sum(c.payload_bytes for c, _ in t.traffic if c.kind == "send_recv")
        lines.append(f"{s.name:<36} {f'{s.pp}x{s.dp}x{s.tp}':>12} {m.params / GiB:7.2f} {m.grads / GiB:7.2f} "
                     f"{m.optimizer / GiB:7.2f} {m.working / GiB:8.2f} {m.activations / GiB:7.2f} "
                     f"{m.total / GiB:7.2f}  {fits:<5} {speed} {t.bubble:6.1%} {p2p / GiB:8.2f}")
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
        lines.append(f"  {' '.join(p.option.overrides):<55} -> {cost(p)}{'' if p.fits else '  (still too big)'}")
    if best is None:
        lines.append("  no combination of these changes fits: more GPUs or a smaller model/sequence")
    else:
        lines.append(f"  cheapest that fits: {' '.join(best.option.overrides)} -> {cost(best)}")
    return False, lines


def run_plan(cfg: Config, compare: bool) -> tuple[int, list[str]]:
    """(exit status, report lines) for a config."""
    world = distributed.World.from_env()
    cluster = cfg.cluster or distributed.local_layout(world)
    try:
        startup = startup_checks(cfg, cluster, memory=False)  # the memory verdict is this report
    except ValueError as exc:
        return 2, [f"plan: {exc}"]
    current = current_option(cfg, cluster, startup.degrees, startup.accum_steps)
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
