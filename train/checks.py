"""The start-up checks: one function that `train.run`, `launch`, `launch.slurm` and
`launch.plan` all call, so a launcher never accepts what the run would refuse.

Everything here needs only the config and the layout: no process group, no device, no model.
Each failure is a LayoutError (a ValueError) whose message says what, where and what to do.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

from train.config import ClusterConfig, Config, ParallelConfig
from train.batch import accumulation_steps
from train.distributed import Degrees, LayoutError, resolve_degrees
from train.fits import PlanError, check_fits
from train.model import validate as validate_model
from train.deepspeed_engine import check_extra  # the harness's module; deepspeed itself stays unimported
from train.parallelize import validate_tp


@dataclass(frozen=True)
class Startup:
    """What the checks derived: parallel degrees and gradient-accumulation steps."""

    degrees: Degrees
    accum_steps: int


def check_parallel(cfg: ParallelConfig, dp: int, tp: int) -> None:
    """Refuse a parallel config that the chosen engine cannot run, before anything is built."""
    if cfg.engine == "deepspeed":
        _check_deepspeed(cfg, tp)
    elif cfg.zero_stage or cfg.offload_optimizer or cfg.offload_params or cfg.deepspeed_extra:
        raise ValueError(
            f"parallel {cfg.name}: zero_stage, offload_optimizer, offload_params and deepspeed_extra "
            f"are DeepSpeed settings, but engine=native; use parallel=zero1, zero2 or zero3")
    if cfg.data_parallel == "ddp" and dp > 1 and tp > 1:
        # DDP buckets and all-reduces plain tensors; it cannot hold the DTensor parameters TP makes.
        raise ValueError(
            f"parallel {cfg.name}: data_parallel=ddp cannot be combined with tensor parallel "
            f"(dp={dp}, tp={tp}); use parallel=fsdp_tp (FSDP2 over dp, TP inside the node)"
        )


def _check_deepspeed(cfg: ParallelConfig, tp: int) -> None:
    """What the DeepSpeed engine does not do here: it is ZeRO data parallel over all ranks."""
    if cfg.zero_stage not in (1, 2, 3):
        raise ValueError(f"parallel {cfg.name}: engine=deepspeed needs zero_stage 1, 2 or 3; found "
                         f"{cfg.zero_stage} (or use parallel=zero1, zero2, zero3)")
    if tp > 1:
        raise ValueError(
            f"parallel {cfg.name}: the DeepSpeed engine has no tensor parallel (tp={tp}); use "
            f"parallel.tp=1, or the native engine's parallel=fsdp_tp for tensor parallel")
    if cfg.compile:
        raise ValueError(f"parallel {cfg.name}: parallel.compile=true is not supported with the "
                         f"DeepSpeed engine; set parallel.compile=false or use the native engine")
    if cfg.offload_params and cfg.zero_stage != 3:
        raise ValueError(f"parallel {cfg.name}: offload_params needs zero_stage=3 (parameters are "
                         f"sharded only at stage 3); found zero_stage={cfg.zero_stage}")
    check_extra(cfg.deepspeed_extra)
    if importlib.util.find_spec("deepspeed") is None:
        raise ValueError(f"parallel {cfg.name}: engine=deepspeed needs the deepspeed package: "
                         f"pip install -e '.[deepspeed]', or use a native preset (parallel=ddp, fsdp)")


def check_trainer(cfg: Config) -> None:
    """The loop's own settings that depend on other groups."""
    if cfg.trainer.on_nonfinite_loss == "skip" and cfg.parallel.engine != "native":
        raise LayoutError(
            "trainer.on_nonfinite_loss=skip needs the native engine (DeepSpeed steps its optimizer "
            f"itself); use stop with parallel={cfg.parallel.name}, or a native parallel group (ddp, fsdp, ...)")
    if cfg.data.sources and cfg.data.url:
        raise LayoutError(f"data.url={cfg.data.url} and data.sources are both set: give one dataset in "
                          f"data.url, or several (each with its url and weight) in data.sources")
    if cfg.data.seq_len > cfg.model.max_seq_len:
        raise LayoutError(
            f"data.seq_len={cfg.data.seq_len} exceeds model.max_seq_len={cfg.model.max_seq_len} of model "
            f"{cfg.model.name}; use data.seq_len<={cfg.model.max_seq_len} or raise model.max_seq_len")


def startup_checks(cfg: Config, cluster: ClusterConfig, *, memory: bool = True) -> Startup:
    """Every check a run makes before it starts anything: degrees against the layout, the model's
    shape against tensor parallel, the engine's settings, the batch split, and (when `memory` and
    the accelerator's memory is known) the capacity plan against the accelerator. `launch.plan`
    passes memory=False because reporting the memory verdict is its job."""
    world_size = cluster.nodes * cluster.procs_per_node
    degrees = resolve_degrees(cfg.parallel, cluster, world_size, cfg.model.n_heads, cfg.model.n_kv_heads)
    try:
        validate_model(cfg.model)
        validate_tp(cfg.model, degrees.tp)
        check_parallel(cfg.parallel, degrees.dp, degrees.tp)
    except ValueError as exc:  # the model's and the engine's own checks
        raise LayoutError(str(exc)) from None
    check_trainer(cfg)
    startup = Startup(degrees, accumulation_steps(cfg, degrees.dp))
    if memory and cfg.plan.enforce_memory and cluster.memory_bytes > 0:
        try:
            check_fits(cfg, cluster, startup.degrees, startup.accum_steps)
        except PlanError as exc:
            raise LayoutError(str(exc)) from None
    return startup
