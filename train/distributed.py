"""The world a run starts in: layout, checks, process group and device mesh.

The cluster layout (from `+cluster=NAME` or derived from this machine) is checked against the
world the launcher started *before* any process group or model exists, so a wrong command
fails in a second with the command that would have been right.
"""

from __future__ import annotations

import dataclasses
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


class NetworkError(LayoutError):
    """This node cannot train over the network the layout names: a missing interface, a
    rendezvous host that does not resolve or answer."""


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
    """Parallel degrees after resolving -1 (auto): pp x dp x tp == world size."""

    dp: int
    tp: int
    pp: int = 1


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
    return (f"python -m launch {args} --rdzv-endpoint=<first node>:29500 --rdzv-id=<job id> --run "
            f"--node-rank=<K>   (on node K of {cluster.nodes}: it chooses the node's training interface "
            f"and starts torchrun; or python -m launch.slurm)")


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


def node_range(cluster: ClusterConfig) -> tuple[int, int]:
    """The fewest and most nodes the layout runs on: (nodes, nodes), or under elasticity
    (`cluster.min_nodes` below `nodes`) from min_nodes up."""
    low = cluster.min_nodes or cluster.nodes
    if low > cluster.nodes:
        raise LayoutError(f"cluster.min_nodes={cluster.min_nodes} is more than cluster.nodes={cluster.nodes} "
                          f"(cluster {cluster.name}); use 1 to {cluster.nodes}, or 0 for no elasticity")
    return low, cluster.nodes


def started_layout(cluster: ClusterConfig, world: World) -> ClusterConfig:
    """The layout of the nodes torchrun actually started: `cluster` itself, or, when nodes were
    lost under elasticity (min_nodes <= started nodes < nodes), the same layout on those nodes.
    Anything else is the LayoutError of `check_world`."""
    low, high = node_range(cluster)
    started = world.world_size // cluster.procs_per_node
    if (low <= started < high and world.local_world_size == cluster.procs_per_node
            and world.world_size % cluster.procs_per_node == 0):
        if world.rank == 0:
            log.warning("cluster %s: %d of its %d nodes started (cluster.min_nodes=%d): training on %d",
                        cluster.name, started, high, low, started)
        return dataclasses.replace(cluster, nodes=started)
    check_world(cluster, world)
    return cluster


def resolve_degrees(parallel: ParallelConfig, cluster: ClusterConfig, world_size: int,
                    n_heads: int, n_kv_heads: int) -> Degrees:
    """Turn -1 into numbers and check pp x dp x tp == world, tp inside a node, tp | heads."""
    tp, pp = cluster.procs_per_node if parallel.tp == -1 else parallel.tp, parallel.pp
    if tp < 1 or world_size % tp:
        raise LayoutError(
            f"parallel.tp={tp} does not divide the world size {world_size} "
            f"(cluster {cluster.name}); choose a divisor of {world_size}")
    if tp > cluster.procs_per_node:
        raise LayoutError(
            f"parallel.tp={tp} is larger than the {cluster.procs_per_node} processes per node of "
            f"cluster {cluster.name}: tensor parallel must stay inside a node (NVLink); "
            f"use parallel.tp<={cluster.procs_per_node} and data parallel across nodes")
    if world_size % (pp * tp):
        raise LayoutError(
            f"parallel.pp={pp} x parallel.tp={tp} = {pp * tp} does not divide the world size {world_size} "
            f"(cluster {cluster.name}): every pipeline stage needs the same ranks; choose pp and tp whose "
            f"product divides {world_size}")
    dp = world_size // (pp * tp) if parallel.dp == -1 else parallel.dp
    if pp * dp * tp != world_size:
        raise LayoutError(
            f"parallel.pp={pp} x parallel.dp={dp} x parallel.tp={tp} = {pp * dp * tp}, but the world has "
            f"{world_size} processes (cluster {cluster.name}); set parallel.dp=-1 to derive it")
    if n_heads % tp or n_kv_heads % tp:
        raise LayoutError(
            f"parallel.tp={tp} must divide model.n_heads={n_heads} and "
            f"model.n_kv_heads={n_kv_heads}; choose tp from the common divisors")
    return Degrees(dp=dp, tp=tp, pp=pp)


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


AUTO = "auto"
# Not contacted: a connected UDP socket only asks the kernel which route (and source address)
# a packet there would take. TEST-NET-3, so no real host is named.
_SOME_REMOTE_ADDRESS = "203.0.113.1"


@dataclass(frozen=True)
class NodeNetwork:
    """The interface and address one node trains over, and why that interface."""

    interface: str
    address: str
    reason: str  # e.g. "cluster.network_interface=ib0", "auto: the route to node1 (10.0.0.1)"


def interface_addresses() -> dict[str, str]:
    """The IPv4 address of every interface that has one (Linux: SIOCGIFADDR)."""
    import fcntl
    import struct

    addresses = {}
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        for _, name in socket.if_nameindex():
            try:
                raw = fcntl.ioctl(sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15]))
            except OSError:  # down, or no IPv4 address
                continue
            addresses[name] = socket.inet_ntoa(raw[20:24])
    return addresses


def _source_address(target: str) -> str:
    """The local address a packet to `target` leaves from, by the kernel's routing table."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.connect((target, 9))
        return sock.getsockname()[0]


def resolve(host: str, port: int, interface: str = AUTO, what: str = "rendezvous host",
            fix: str = "give its address or a name this node resolves (--rdzv-endpoint=HOST:PORT)") -> str:
    """The IPv4 address of `host`; a name that does not resolve is a NetworkError naming the
    endpoint and the interface."""
    try:
        return socket.getaddrinfo(host, port, socket.AF_INET, socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError) as exc:
        raise NetworkError(f"{what} {host}:{port} does not resolve on {socket.gethostname()} "
                           f"(interface {interface}): {exc}; {fix}") from None


def choose_network(cluster: ClusterConfig, host: str, port: int) -> NodeNetwork:
    """The interface this node trains over and its address: `cluster.network_interface`, or
    (auto) the interface whose address routes to the rendezvous host `host`.

    On the node that hosts the rendezvous under a name that resolves to a loopback address
    (Debian maps a machine's own name to 127.0.1.1), the route says nothing about the network
    the other nodes come from: auto then takes the interface of the default route, or the only
    interface besides loopback.
    """
    addresses = interface_addresses()
    interface = cluster.network_interface
    if interface != AUTO:
        if interface not in addresses:
            raise NetworkError(
                f"cluster.network_interface={interface}: {socket.gethostname()} has no such interface "
                f"with an IPv4 address (it has {', '.join(f'{n} {a}' for n, a in addresses.items())}); "
                f"rendezvous {host}:{port}. Set cluster.network_interface to one of them, or auto")
        return NodeNetwork(interface, addresses[interface], f"cluster.network_interface={interface}")
    target = resolve(host, port)
    try:
        source = _source_address(target)
    except OSError as exc:
        raise NetworkError(f"no route from {socket.gethostname()} to the rendezvous host {host}:{port} "
                           f"({target}) (interface auto): {exc.strerror}; set "
                           f"cluster.network_interface to the interface of the training network") from None
    owners = [name for name, address in addresses.items() if address == source]
    if owners and not source.startswith("127."):
        to = host if host == target else f"{host} ({target})"
        return NodeNetwork(owners[0], source, f"auto: the route to {to}")
    others = {name: address for name, address in addresses.items() if not address.startswith("127.")}
    try:
        default = _source_address(_SOME_REMOTE_ADDRESS)
    except OSError:  # no default route
        default = ""
    named = [name for name, address in others.items() if address == default] or list(others)
    if len(named) == 1:
        return NodeNetwork(named[0], others[named[0]], f"auto: {host} is this node ({target}); "
                           f"{'the default route' if default else 'its only interface besides loopback'}")
    if not others:  # a single machine: the "nodes" share its loopback
        name = owners[0] if owners else "lo"
        return NodeNetwork(name, source, f"auto: {host} is this node ({target}), which has only loopback")
    raise NetworkError(
        f"rendezvous host {host}:{port} is this node ({target}, interface auto) and it has several "
        f"interfaces ({', '.join(f'{n} {a}' for n, a in others.items())}) and no default route: set "
        f"cluster.network_interface to the one the other nodes reach")


def network_env(cluster: ClusterConfig, net: NodeNetwork) -> dict[str, str]:
    """The variables that make gloo and NCCL use the node's training interface."""
    env = {"GLOO_SOCKET_IFNAME": net.interface, "NCCL_SOCKET_IFNAME": net.interface}
    if cluster.ib_hcas:
        env["NCCL_IB_HCA"] = cluster.ib_hcas
    return env


def node_address() -> str:
    """This node's address on the training network: that of the interface gloo and NCCL use
    (GLOO_SOCKET_IFNAME, NCCL_SOCKET_IFNAME), else the one its host name resolves to."""
    addresses = interface_addresses()
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        if os.environ.get(key) in addresses:
            return addresses[os.environ[key]]
    try:
        return socket.gethostbyname(socket.gethostname())
    except OSError:
        return "unknown"


def use_network(cluster: ClusterConfig, world: World) -> None:
    """Point gloo and NCCL at the training interface in a worker, where the launcher has not.

    Without GLOO_SOCKET_IFNAME gloo binds the address its host name resolves to, and falls back
    to 127.0.0.1 when that is not usable: a multi-node job then hangs until its timeout. Under
    `python -m launch --run` and launch.slurm the variables are already set (a user's own
    value always wins); under a plain torchrun this chooses the interface from MASTER_ADDR, the
    address torchrun's first node published.
    """
    if cluster.nodes == 1 or world.launched_by == "single" or "MASTER_ADDR" not in os.environ:
        return
    host, port = os.environ["MASTER_ADDR"], int(os.environ.get("MASTER_PORT", "0"))
    resolve(host, port, cluster.network_interface, what="MASTER_ADDR",
            fix="torchrun's first node published a name the others cannot resolve: start torchrun with "
                "--local-addr=<the node's training address> on every node (python -m launch --run does)")
    net = choose_network(cluster, host, port)
    for key, value in network_env(cluster, net).items():
        os.environ.setdefault(key, value)


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


# cluster.env keys whose layout value wins over the process environment: torchrun's agent sets
# them in every worker whatever the user asked for (TORCH_NCCL_ASYNC_ERROR_HANDLING=1 unless its
# own environment had one), so "the environment wins" would mean "torchrun wins". Change them in
# the layout (cluster.env.KEY=VALUE). Every other key is only a default: an exported value wins.
HARNESS_OWNED_ENV = ("TORCH_NCCL_ASYNC_ERROR_HANDLING",)


def apply_env(cluster: ClusterConfig) -> None:
    """Set the layout's `cluster.env` in this process. Called first thing in a worker, before
    anything initialises CUDA: the allocator (PYTORCH_CUDA_ALLOC_CONF) and NCCL read theirs once,
    at initialisation, and ignore later changes."""
    if torch.cuda.is_initialized():  # a bug in the harness, not in the user's input
        log.warning("CUDA was initialised before cluster.env was applied: allocator settings in it "
                    "(PYTORCH_CUDA_ALLOC_CONF) do not take effect")
    for key, value in cluster.env.items():
        value = str(value)
        if key in HARNESS_OWNED_ENV:
            if os.environ.get(key, value) != value:
                log.info("%s=%s from the layout's cluster.env (the environment had %s; torchrun sets "
                         "it in every worker): change it with cluster.env.%s=...", key, value,
                         os.environ[key], key)
            os.environ[key] = value
        else:
            os.environ.setdefault(key, value)  # the user's own setting wins


def init_process_group(cluster: ClusterConfig, world: World, timeout_s: float = 600) -> None:
    """Start the process group (NCCL or gloo from the layout) for any world size, 1 included."""
    apply_env(cluster)  # already done by train.run; a caller that skipped it gets it here
    if dist.is_initialized():
        return
    use_network(cluster, world)
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


def build_mesh(device: torch.device, degrees: Degrees, timeout_s: float = 600) -> DeviceMesh:
    """A 3-D ("pp", "dp", "tp") mesh. Ranks are numbered node by node, so tp, the innermost
    dimension, is a group of neighbouring ranks inside a node (NVLink), and pp, the outermost,
    spans the nodes first: a pipeline's stages talk point to point over the network, only once
    per micro-batch and stage. With pp=1 the "pp" dimension has size 1 and "dp" and "tp" are
    the 2-D mesh as before.

    Its groups get `timeout_s` (trainer.collective_timeout_s) like the default group: torch
    creates a mesh dimension's groups with the backend's default timeout (30 minutes for gloo,
    10 for NCCL), whatever the default group was given."""
    mesh = init_device_mesh(device.type, (degrees.pp, degrees.dp, degrees.tp), mesh_dim_names=("pp", "dp", "tp"))
    set_timeout([mesh.get_group(name) for name in ("pp", "dp", "tp")], timeout_s)
    return mesh


def set_timeout(groups: list[dist.ProcessGroup], timeout_s: float) -> None:
    """Give each process group this timeout for its collectives."""
    from torch.distributed.distributed_c10d import _set_pg_timeout  # no public way to change it

    for group in groups:
        _set_pg_timeout(timedelta(seconds=timeout_s), group)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
