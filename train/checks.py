"""The start-up checks: one function that `train.run`, `launch`, `launch.slurm` and
`launch.plan` all call, so a launcher never accepts what the run would refuse.

Everything here needs only the config and the layout (and, with model=hf, model.path's
config.json): no process group, no device, no model. Each failure is a LayoutError (a
ValueError) whose message says what, where and what to do.
"""

from __future__ import annotations

import errno
import importlib.util
import logging
import os
import socket
from dataclasses import dataclass

from storage.fs import StorageError
from train import stages
from train.config import ClusterConfig, Config, ParallelConfig
from train.batch import accumulation_steps
from train.distributed import (Degrees, LayoutError, NetworkError, NodeNetwork, choose_network,
                               interface_addresses, resolve, resolve_degrees)
from train.fits import PlanError, check_fits
from train.hf import resolve_pretrained
from train.model import rope_tables, validate as validate_model
from train.deepspeed_engine import check_extra  # the harness's module; deepspeed itself stays unimported
from train.parallelize import validate_tp
from train.prometheus import check as check_prometheus
from train.trackers import check_trackers

log = logging.getLogger(__name__)

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


def check_pipeline(cfg: Config, degrees: Degrees, accum_steps: int) -> None:
    """parallel.pp > 1: what the schedule, the model and the batch must allow, refused before
    torch.distributed.pipelining would; a bubble above 25 % is warned about, with the fix."""
    p, m = cfg.parallel, cfg.model
    if p.pp == 1:
        if p.pp_stages_per_rank != 1 or p.pp_split:
            raise LayoutError(f"parallel.pp_stages_per_rank={p.pp_stages_per_rank} and parallel.pp_split="
                              f"{list(p.pp_split)} describe a pipeline, but parallel.pp=1: set parallel.pp>1 "
                              f"or leave them at 1 and []")
        return
    where, schedule, v = f"parallel.pp={p.pp}", str(p.pp_schedule), p.pp_stages_per_rank
    if p.engine == "deepspeed":
        raise LayoutError(f"{where} needs the native engine: DeepSpeed's pipeline engine is another model API; "
                          f"use parallel=fsdp_tp (or fsdp, ddp) with parallel.pp, or parallel.pp=1 with "
                          f"parallel={p.name}")
    if m.tie_embeddings:
        raise LayoutError(f"{where}: model {m.name} ties its output projection to the embedding "
                          f"(model.tie_embeddings=true), which a pipeline puts on its last and first stage: "
                          f"set model.tie_embeddings=false, or parallel.pp=1")
    if schedule in stages.SINGLE_STAGE and v != 1:
        raise LayoutError(f"parallel.pp_schedule={schedule} runs one stage per rank, but parallel.pp_stages_per_rank"
                          f"={v}: set it to 1, or use parallel.pp_schedule=Interleaved1F1B")
    if schedule == "Interleaved1F1B" and v < 2:
        raise LayoutError("parallel.pp_schedule=Interleaved1F1B interleaves several stages per rank, but "
                          "parallel.pp_stages_per_rank=1: set it to 2 or more, or use parallel.pp_schedule=1F1B")
    if schedule in stages.V_SHAPED and v != 2:
        raise LayoutError(f"parallel.pp_schedule={schedule} runs exactly 2 stages per rank (a V), but "
                          f"parallel.pp_stages_per_rank={v}: set it to 2")
    if schedule in stages.V_SHAPED and (degrees.dp > 1 or degrees.tp > 1):
        # measured on torch 2.13: wrong gradients under FSDP, DDP's reducer and TP fail
        raise LayoutError(f"parallel.pp_schedule={schedule} splits each backward into input and weight gradients, "
                          f"which torch's pipelining gets wrong with data or tensor parallel (dp={degrees.dp}, "
                          f"tp={degrees.tp}): use parallel.pp_schedule=Interleaved1F1B, or pp alone (dp=tp=1)")
    if schedule in stages.V_SHAPED and p.compile:
        raise LayoutError(f"parallel.pp_schedule={schedule} splits each backward into input and weight "
                          f"gradients, which torch.compile'd blocks cannot: set parallel.compile=false or use "
                          f"parallel.pp_schedule=Interleaved1F1B")
    n = stages.num_stages(p)
    if m.n_layers < n:
        raise LayoutError(f"{where} x parallel.pp_stages_per_rank={v} = {n} stages, but model {m.name} has "
                          f"{m.n_layers} layers (model.n_layers): every stage needs at least one; lower "
                          f"parallel.pp or parallel.pp_stages_per_rank")
    split = list(p.pp_split)
    if split and (len(split) != n - 1 or split != sorted(set(split)) or split[0] < 1 or split[-1] >= m.n_layers):
        raise LayoutError(f"parallel.pp_split={split}: expected the first layer of each of the {n - 1} stages after "
                          f"the first, increasing, between 1 and {m.n_layers - 1} (model {m.name} has "
                          f"{m.n_layers} layers), e.g. {stages.balanced_split(m, n)}; or [] to balance them "
                          f"by parameter count")
    fewest, t, dp = stages.min_micro_batches(p), cfg.trainer, degrees.dp
    micro_tokens = t.micro_batch_size * cfg.data.seq_len * dp  # one micro-batch on every data-parallel rank

    def batch_for(micro_batches: int) -> str:
        return f"trainer.global_batch_tokens={micro_batches * micro_tokens} (or a smaller trainer.micro_batch_size)"

    per_step = (f"trainer.global_batch_tokens / (trainer.micro_batch_size={t.micro_batch_size} x "
                f"data.seq_len={cfg.data.seq_len} x dp={dp})")
    if accum_steps < fewest:
        raise LayoutError(f"{where} needs at least {fewest} micro-batches per step, one per pipeline rank, but the "
                          f"step has {accum_steps} ({per_step}): set {batch_for(fewest)}")
    rounds = max(1, accum_steps // p.pp)
    if schedule == "Interleaved1F1B" and accum_steps % rounds:
        raise LayoutError(f"parallel.pp_schedule=Interleaved1F1B runs micro-batches in rounds of about pp={p.pp}: "
                          f"{accum_steps} micro-batches per step ({per_step}) is not a multiple of its {rounds} "
                          f"rounds; use a multiple of {p.pp}: {batch_for(-(-accum_steps // p.pp) * p.pp)}")
    bubble = stages.bubble_fraction(p, accum_steps)
    if bubble > stages.BUBBLE_WARN and int(os.environ.get("RANK", "0")) == 0:
        log.warning("%s: pipeline bubble %.0f%% of each step with %d micro-batches per step (%s idles (p-1)/"
                    "(%sm+p-1) of it); for m >= %d (bubble <= 25%%) raise the global batch: %s", where,
                    100 * bubble, accum_steps, schedule, "" if v == 1 else f"{v}",
                    stages.micro_batches_for_bubble(p), batch_for(stages.micro_batches_for_bubble(p)))


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


# Accelerators without float8 tensor cores (float8 needs compute capability 8.9: Ada, Hopper, later).
PRE_FLOAT8 = ("V100", "T4", "A100", "A10", "A30", "A40", "A6000", "P100")


def check_float8(cfg: Config, cluster: ClusterConfig) -> None:
    """parallel.float8 needs CUDA GPUs with float8 tensor cores (H100 and later) and torchao."""
    recipe = cfg.parallel.float8
    if recipe == "off":
        return
    where = f"parallel.float8={recipe}"
    if cfg.parallel.engine != "native":
        raise LayoutError(f"{where} needs the native engine; parallel={cfg.parallel.name} is DeepSpeed: set "
                          f"parallel.float8=off or use parallel=fsdp")
    if cluster.device != "cuda" or any(name in cluster.accelerator.upper() for name in PRE_FLOAT8):
        raise LayoutError(f"{where} needs GPUs with float8 tensor cores (H100, H200 or later); cluster "
                          f"{cluster.name} has {cluster.accelerator}: set parallel.float8=off")
    import torch

    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        raise LayoutError(f"{where} needs float8 tensor cores (compute capability 8.9 or later); this "
                          f"machine's {torch.cuda.get_device_name()} has {torch.cuda.get_device_capability()}: "
                          f"set parallel.float8=off")
    if importlib.util.find_spec("torchao") is None:
        raise LayoutError(f"{where} needs the torchao package: pip install torchao, or set parallel.float8=off")


def check_pretrained(cfg: Config) -> None:
    """model.path (model=hf): cfg.model becomes the architecture of its config.json, before any
    other check reads the model's shape, or a model the harness cannot represent (another
    model_type, biases, another RoPE scaling, a field overridden against config.json) is refused."""
    try:
        resolve_pretrained(cfg)
    except (ValueError, StorageError) as exc:
        raise LayoutError(str(exc)) from None


def startup_checks(cfg: Config, cluster: ClusterConfig, *, memory: bool = True) -> Startup:
    """Every check a run makes before it starts anything: the architecture of model.path, degrees
    against the layout, the model's shape against tensor parallel, the engine's settings, the
    batch split, the pipeline's stages and micro-batches, and (when `memory` and the
    accelerator's memory is known) the capacity plan against the accelerator. `launch.plan`
    passes memory=False because reporting the memory verdict is its job."""
    check_pretrained(cfg)
    world_size = cluster.nodes * cluster.procs_per_node
    degrees = resolve_degrees(cfg.parallel, cluster, world_size, cfg.model.n_heads, cfg.model.n_kv_heads)
    try:
        validate_model(cfg.model)
        rope_tables(cfg.model, device="meta")  # llama3 RoPE scaling's factors
        validate_tp(cfg.model, degrees.tp)
        check_parallel(cfg.parallel, degrees.dp, degrees.tp)
    except ValueError as exc:  # the model's and the engine's own checks
        raise LayoutError(str(exc)) from None
    check_trainer(cfg)
    check_trackers(cfg.monitor)  # a chosen tracker's package must import, before anything is built
    check_prometheus(cfg.monitor)  # the port range, and prometheus-client when a port is set
    check_float8(cfg, cluster)
    startup = Startup(degrees, accumulation_steps(cfg, degrees.dp))
    check_pipeline(cfg, degrees, startup.accum_steps)
    if memory and cfg.plan.enforce_memory and cluster.memory_bytes > 0:
        try:
            check_fits(cfg, cluster, startup.degrees, startup.accum_steps)
        except PlanError as exc:
            raise LayoutError(str(exc)) from None
    return startup


def check_network(cluster: ClusterConfig, host: str, port: int, *, hosts_rendezvous: bool,
                  timeout_s: float = 5.0) -> NodeNetwork:
    """This node's training interface and address (`cluster.network_interface`), and the
    rendezvous endpoint `host:port` usable from it: hosted here (`hosts_rendezvous`: the name
    must be one of this node's addresses) or answering from another node. A connection refused
    counts as an answer, since the first node may start its rendezvous later; a name that does
    not resolve, no route or no answer within `timeout_s` fails now, in one line, instead of in
    torchrun's rendezvous timeout with a stack trace."""
    net = choose_network(cluster, host, port)
    target = resolve(host, port, net.interface)
    where = f"rendezvous {host}:{port} ({target})"
    if hosts_rendezvous:
        mine = interface_addresses().values()
        if target not in mine and not target.startswith("127."):
            raise NetworkError(f"{where}: this node hosts the rendezvous (node 0), but {target} is not one "
                               f"of its addresses ({', '.join(mine)}; interface {net.interface}); run node 0's "
                               f"command on {host}, or give --rdzv-endpoint=<this node>:{port}")
        return net
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout_s)
        try:
            sock.bind((net.address, 0))
            sock.connect((target, port))
        except ConnectionRefusedError:
            pass  # the host answered; its rendezvous is not up yet, and torchrun waits for it
        except (TimeoutError, OSError) as exc:
            why = (f"no answer within {timeout_s:g} s" if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT
                   else exc.strerror or str(exc))
            raise NetworkError(f"{where} is unreachable from {socket.gethostname()} through interface "
                               f"{net.interface} ({net.address}, {net.reason}): {why}. Check that node 0 is up "
                               f"and on this network, or set cluster.network_interface") from None
    return net
