"""The start-up checks: one function that `train.run`, `launch`, `launch.slurm` and
`launch.plan` all call, so a launcher never accepts what the run would refuse.

Everything here needs only the config and the layout (and, with model=hf, model.path's
config.json): no process group, no device, no model. Each failure is a LayoutError (a
ValueError) whose message says what, where and what to do.
"""

from __future__ import annotations

import errno
import importlib.util
import socket
from dataclasses import dataclass

from storage.fs import StorageError
from train.config import ClusterConfig, Config, ParallelConfig
from train.batch import accumulation_steps
from train.distributed import (Degrees, LayoutError, NetworkError, NodeNetwork, choose_network,
                               interface_addresses, resolve, resolve_degrees)
from train.fits import PlanError, check_fits
from train.hf import resolve_pretrained
from train.model import rope_tables, validate as validate_model
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
    batch split, and (when `memory` and the accelerator's memory is known) the capacity plan
    against the accelerator. `launch.plan`
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
    check_float8(cfg, cluster)
    startup = Startup(degrees, accumulation_steps(cfg, degrees.dp))
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
