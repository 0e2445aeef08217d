"""The world a run starts in: layout, checks, process group and device mesh.

The cluster layout (from `+cluster=NAME` or derived from this machine) is checked against the
world the launcher started *before* any process group or model exists, so a wrong command
fails in a second with the command that would have been right.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from train.config import ClusterConfig, ParallelConfig

log = logging.getLogger(__name__)


class LayoutError(ValueError):
    """The layout, the parallel degrees and the started world do not agree."""


@dataclass(frozen=True)
class World:
    """What the launcher started: ranks and where this process sits among them."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    launched_by: str  # torchrun | deepspeed | single

    @classmethod
    def from_env(cls) -> World:
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            # torchrun sets LOCAL_WORLD_SIZE; the deepspeed launcher sets LOCAL_SIZE instead.
            local = env.get("LOCAL_WORLD_SIZE") or env.get("LOCAL_SIZE") or env["WORLD_SIZE"]
            return cls(
                rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env.get("LOCAL_RANK", 0)), local_world_size=int(local),
                launched_by="deepspeed" if "LOCAL_SIZE" in env and "LOCAL_WORLD_SIZE" not in env
                else "torchrun",
            )
        return cls(rank=0, world_size=1, local_rank=0, local_world_size=1, launched_by="single")

    @property
    def nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))


@dataclass(frozen=True)
class Degrees:
    """Parallel degrees after resolving -1 (auto): dp x tp == world size."""

    dp: int
    tp: int


def local_layout(world: World) -> ClusterConfig:
    """The layout of this machine when no `+cluster` is given.

    One process per visible GPU with NCCL, else gloo on the CPU; the node count is what the
    launcher started, so a plain `torchrun --nproc_per_node=2` on a laptop just works.
    """
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if gpus:
        name = torch.cuda.get_device_name(0)
        return ClusterConfig(
            name=f"local-{world.local_world_size}x{name.replace(' ', '-')}", nodes=world.nodes,
            procs_per_node=world.local_world_size, device="cuda", accelerator=name,
            backend="nccl", intra_node_link="local",
        )
    return ClusterConfig(
        name=f"local-{world.local_world_size}xCPU", nodes=world.nodes,
        procs_per_node=world.local_world_size, device="cpu", accelerator="cpu", backend="gloo",
    )


def _launch_hint(cluster: ClusterConfig) -> str:
    args = " ".join(a for a in sys.argv[1:])
    if cluster.nodes == 1:
        return f"torchrun --nproc_per_node={cluster.procs_per_node} -m train.run {args}".rstrip()
    return (
        f"torchrun --nnodes={cluster.nodes} --nproc_per_node={cluster.procs_per_node} "
        f"--rdzv-backend=c10d --rdzv-endpoint=<first node>:29500 --rdzv-id=<job id> "
        f"-m train.run {args}"
    ).rstrip() + "   (on every node; or python -m launch.slurm)"


def check_world(cluster: ClusterConfig, world: World) -> None:
    """nodes x processes per node must be the world the launcher started."""
    expected = cluster.nodes * cluster.procs_per_node
    if expected == world.world_size and cluster.procs_per_node == world.local_world_size:
        return
    plural = "es" if world.world_size != 1 else ""
    if world.launched_by == "single":
        started = "this is a single process (python -m train.run, not under torchrun)"
    else:
        started = (f"{world.launched_by} started {world.world_size} process{plural} "
                   f"({world.local_world_size} on this node)")
    raise LayoutError(
        f"cluster {cluster.name} expects {cluster.nodes} node(s) x {cluster.procs_per_node} "
        f"processes per node = {expected}; {started}. Run: {_launch_hint(cluster)}"
    )


def resolve_degrees(parallel: ParallelConfig, cluster: ClusterConfig, world_size: int,
                    n_heads: int, n_kv_heads: int) -> Degrees:
    """Turn -1 into numbers and check dp x tp == world, tp inside a node, tp | heads."""
    tp = cluster.procs_per_node if parallel.tp == -1 else parallel.tp
    if tp < 1 or world_size % tp:
        raise LayoutError(
            f"parallel.tp={tp} does not divide the world size {world_size} "
            f"(cluster {cluster.name}); choose a divisor of {world_size}")
    if tp > cluster.procs_per_node:
        raise LayoutError(
            f"parallel.tp={tp} is larger than the {cluster.procs_per_node} processes per node of "
            f"cluster {cluster.name}: tensor parallel must stay inside a node (NVLink); "
            f"use parallel.tp<={cluster.procs_per_node} and data parallel across nodes")
    dp = world_size // tp if parallel.dp == -1 else parallel.dp
    if dp * tp != world_size:
        raise LayoutError(
            f"parallel.dp={dp} x parallel.tp={tp} = {dp * tp}, but the world has {world_size} "
            f"processes (cluster {cluster.name}); set parallel.dp=-1 to derive it")
    if n_heads % tp or n_kv_heads % tp:
        raise LayoutError(
            f"parallel.tp={tp} must divide model.n_heads={n_heads} and "
            f"model.n_kv_heads={n_kv_heads}; choose tp from the common divisors")
    return Degrees(dp=dp, tp=tp)


def check_device(cluster: ClusterConfig, world: World) -> torch.device:
    """The device this rank uses; a CUDA layout on a machine without enough GPUs is an error."""
    if cluster.device == "cpu":
        return torch.device("cpu")
    available = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if available < world.local_world_size:
        raise LayoutError(
            f"cluster {cluster.name} runs {cluster.procs_per_node} process(es) per node, one per "
            f"{cluster.accelerator} GPU, but {socket.gethostname()} has {available} visible GPU(s) "
            f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); "
            f"run it on a GPU node, or drop +cluster to use the local layout")
    torch.cuda.set_device(world.local_rank)
    return torch.device("cuda", world.local_rank)


RESTART_STORE_FIX = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def warn_if_restarts_share_the_store(world: World) -> None:
    """torchrun --max-restarts with the rendezvous store shared with the workers (torchrun's
    default): a restarted worker group finds the previous attempt's gloo/NCCL addresses in the
    store and fails to connect (pytorch/pytorch#135712), so the restart is lost. Setting
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 for torchrun gives each attempt a fresh store; the
    harness's own launchers (launch, launch.slurm) set it."""
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0") or 0)
    if world.rank == 0 and restarts > 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        log.warning("torchrun --max-restarts=%d with its shared rendezvous store: a restart may fail "
                    "to connect to the previous attempt's ranks; run torchrun with %s=1 in its "
                    "environment", restarts, RESTART_STORE_FIX)


def init_process_group(cluster: ClusterConfig, world: World, timeout_s: float = 600) -> None:
    """Start the process group (NCCL or gloo from the layout) for any world size, 1 included."""
    for key, value in cluster.env.items():
        os.environ.setdefault(key, str(value))  # the user's own setting wins
    if dist.is_initialized():
        return
    warn_if_restarts_share_the_store(world)
    timeout = timedelta(seconds=timeout_s)
    if world.launched_by == "single":
        dist.init_process_group(cluster.backend, store=dist.HashStore(), rank=0, world_size=1,
                                timeout=timeout)
        return
    kwargs = {}
    if cluster.backend == "nccl":
        kwargs["device_id"] = torch.device("cuda", world.local_rank)
    dist.init_process_group(cluster.backend, timeout=timeout, **kwargs)


def build_mesh(device: torch.device, degrees: Degrees) -> DeviceMesh:
    """A 2-D ("dp", "tp") mesh; tp is the inner dimension so a TP group is inside a node."""
    return init_device_mesh(device.type, (degrees.dp, degrees.tp), mesh_dim_names=("dp", "tp"))


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
