"""Launcher command lines derived from a cluster layout: torchrun and the DeepSpeed launcher.

The layout says how many nodes and processes per node; these functions only spell that out
for one launcher, with the run's Hydra overrides passed through unchanged to `train.run`.
"""

from __future__ import annotations

from train.config import ClusterConfig
from train.distributed import node_range

DEFAULT_PORT = 29500


def torchrun(cluster: ClusterConfig, overrides: list[str], *, rdzv_endpoint: str = "",
             rdzv_id: str = "", node_rank: int = 0, local_addr: str = "",
             program: tuple[str, ...] = ("torchrun",)) -> list[str]:
    """The torchrun command one node runs.

    One node: `torchrun --nproc_per_node=P -m train.run ...`. With `rdzv_endpoint` (always for
    several nodes): c10d rendezvous there, hosted by node 0. Which node hosts is said explicitly
    (`is_host`) rather than guessed from host names, which fails behind aliases or when nodes
    share a host. `local_addr` is the node's address on the training network: torchrun
    publishes it to the other nodes (the first node's becomes the workers' MASTER_ADDR), where
    it would otherwise publish its host name, which may resolve to another network or nowhere.
    With `cluster.min_nodes` below `nodes`, `--nnodes=MIN:MAX`: torchrun restarts the worker group
    on the nodes left when one fails (up to `cluster.max_restarts` times) and again when one joins.
    """
    args = [*program]
    low, high = node_range(cluster)
    if low < high:  # elastic: the job goes on with fewer nodes after a failure, grows when they return
        args += [f"--nnodes={low}:{high}", f"--max-restarts={cluster.max_restarts}"]
    elif cluster.nodes > 1 or rdzv_endpoint:
        args += [f"--nnodes={cluster.nodes}"]
    args += [f"--nproc_per_node={cluster.procs_per_node}"]
    if cluster.nodes > 1 or rdzv_endpoint:
        args += ["--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
                 f"--rdzv-conf=is_host={1 if node_rank == 0 else 0}"]
    if local_addr:
        args += [f"--local-addr={local_addr}"]
    return [*args, "-m", "train.run", *overrides]


def hostfile(hosts: list[str], cluster: ClusterConfig) -> str:
    """A DeepSpeed hostfile: one `HOST slots=P` line per node of the layout."""
    return "".join(f"{host} slots={cluster.procs_per_node}\n" for host in hosts)


def deepspeed(cluster: ClusterConfig, overrides: list[str], *, hostfile_path: str = "",
              master_addr: str = "", master_port: int = DEFAULT_PORT,
              program: tuple[str, ...] = ("deepspeed",)) -> list[str]:
    """The DeepSpeed launcher command, run once on the first node (it starts the others).

    One node: no hostfile, so the launcher starts the processes itself instead of over ssh to
    `localhost` (which it insists on when a hostfile names it). `--no_local_rank` because the
    launcher would otherwise append `--local_rank=N` to the module's arguments, which Hydra
    rejects; the rank comes from the environment as under torchrun.
    """
    if cluster.nodes == 1:
        return [*program, f"--num_gpus={cluster.procs_per_node}", f"--master_port={master_port}",
                "--no_local_rank", "--module", "train.run", *overrides]
    return [
        *program, f"--hostfile={hostfile_path}", f"--num_nodes={cluster.nodes}",
        f"--num_gpus={cluster.procs_per_node}", f"--master_addr={master_addr}",
        f"--master_port={master_port}", "--no_local_rank", "--module", "train.run", *overrides,
    ]


def launcher_env(cluster: ClusterConfig) -> dict[str, str]:
    """Environment the launcher itself needs (the user's own values win).

    - TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1: a fresh rendezvous store per torchrun attempt, so a
      restarted worker group never reads the previous attempt's addresses (pytorch#135712).
    - OMP_NUM_THREADS=1 with several processes per node, as torchrun does and the DeepSpeed
      launcher does not: otherwise every process starts a thread per core.
    """
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}
    if cluster.procs_per_node > 1:
        env["OMP_NUM_THREADS"] = "1"
    return env
