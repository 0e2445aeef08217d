"""`python -m launch +cluster=NAME [overrides] [--run] [--launcher torchrun|deepspeed]`.

Prints the command that starts the run on the layout `+cluster=NAME`: torchrun (one line per
node for several nodes, with c10d rendezvous on the first) or the DeepSpeed launcher with a
hostfile made from the layout. `--run` runs this node's command instead. The config is
composed and checked first, so a bad override fails here as it would in the run.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shlex
import shutil
import socket
import sys
import time
from pathlib import Path

from launch import commands
from launch.compose import LaunchError, check, load, require_cluster
from train.checks import check_network
from train.distributed import network_env


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m launch", description=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.run")
    parser.add_argument("--launcher", choices=("torchrun", "deepspeed"), default="torchrun")
    parser.add_argument("--run", action="store_true", help="run this node's command")
    parser.add_argument("--node-rank", type=int, default=0,
                        help="which node this is, with --run on several nodes (0 hosts the rendezvous)")
    parser.add_argument("--rdzv-endpoint", default="",
                        help=f"HOST[:PORT] of node 0 (default: this machine, port {commands.DEFAULT_PORT})")
    parser.add_argument("--rdzv-id", default="",
                        help="the same on every node; torchrun's run dir is runs/torchrun-<id>")
    parser.add_argument("--hosts", default="",
                        help="deepspeed: comma-separated node names for the hostfile")
    parser.add_argument("--hostfile", default="hostfile", help="deepspeed: where --run writes it")
    parser.add_argument("--master-port", type=int, default=commands.DEFAULT_PORT,
                        help="deepspeed: the port of the first node's rendezvous")
    return parser.parse_intermixed_args(argv)


def _endpoint(value: str) -> tuple[str, int]:
    host, _, port = (value or socket.gethostname()).partition(":")
    return host, int(port or commands.DEFAULT_PORT)


def _torchrun(args: argparse.Namespace, cluster, name: str) -> None:
    overrides = args.overrides
    if cluster.nodes == 1 and not args.rdzv_endpoint:
        cmd = commands.torchrun(cluster, overrides)
        if args.run:
            _exec(commands.torchrun(cluster, overrides, program=_python("torch.distributed.run")), cmd,
                  commands.launcher_env(cluster))
        print(shlex.join(cmd))
        return
    if args.run and cluster.nodes > 1 and not (args.rdzv_endpoint and args.rdzv_id):
        raise LaunchError(
            f"cluster {name} has {cluster.nodes} nodes: --run starts one of them and needs the "
            f"same --rdzv-endpoint=NODE0:PORT and --rdzv-id=ID on every node, and --node-rank")
    host, port = _endpoint(args.rdzv_endpoint)
    rdzv_id = args.rdzv_id or time.strftime("run-%Y%m%d-%H%M%S")
    if args.run:
        _run_node(args, cluster, host, port, rdzv_id)
    torchrun = commands.torchrun(cluster, overrides, rdzv_endpoint=f"{host}:{port}", rdzv_id=rdzv_id,
                                 local_addr="ADDRESS")
    print(f"# cluster {name}: {cluster.nodes} nodes; node 0 ({host}) hosts the c10d rendezvous on port {port}.\n"
          f"# Run one line on each node. It picks the node's training interface (cluster.network_interface="
          f"{cluster.network_interface}),\n# checks that {host}:{port} answers through it, sets GLOO_SOCKET_IFNAME "
          f"and NCCL_SOCKET_IFNAME to it (unless set)\n# and runs torchrun with the node's address "
          f"(is_host=1 on node 0 only):\n#   {shlex.join(torchrun)}")
    for rank in range(cluster.nodes):
        print(f"# node {rank}")
        print(shlex.join(["python", "-m", "launch", *overrides, f"--rdzv-endpoint={host}:{port}",
                          f"--rdzv-id={rdzv_id}", "--run", f"--node-rank={rank}"]))


def _run_node(args: argparse.Namespace, cluster, host: str, port: int, rdzv_id: str) -> None:
    """Start this node: its training interface and address checked and logged, then torchrun."""
    rank = args.node_rank
    if not 0 <= rank < cluster.nodes:
        raise LaunchError(f"--node-rank={rank}: cluster {cluster.name} has nodes 0 to {cluster.nodes - 1}")
    env = commands.launcher_env(cluster)
    local_addr = ""
    if cluster.nodes > 1:
        try:
            net = check_network(cluster, host, port, hosts_rendezvous=rank == 0)
        except ValueError as exc:  # NetworkError: one line naming the host, port and interface
            raise LaunchError(str(exc)) from None
        local_addr = net.address
        net_env = network_env(cluster, net)
        yours = [f"{key}={os.environ[key]}" for key in net_env if os.environ.get(key, net_env[key]) != net_env[key]]
        env.update(net_env)
        print(f"launch: node {rank} of {cluster.nodes} ({socket.gethostname()}): address {net.address} on "
              f"interface {net.interface} ({net.reason}); rendezvous {host}:{port} "
              f"{'hosted here' if rank == 0 else 'reachable'}"
              + (f"; your {', '.join(yours)} kept" if yours else ""), file=sys.stderr, flush=True)
    kwargs = {"rdzv_endpoint": f"{host}:{port}", "rdzv_id": rdzv_id, "node_rank": rank, "local_addr": local_addr}
    _exec(commands.torchrun(cluster, args.overrides, program=_python("torch.distributed.run"), **kwargs),
          commands.torchrun(cluster, args.overrides, **kwargs), env)


def _deepspeed(args: argparse.Namespace, cluster, name: str) -> None:
    hosts = [h for h in args.hosts.split(",") if h]
    if not hosts:
        if cluster.nodes > 1 and args.run:
            raise LaunchError(f"cluster {name} has {cluster.nodes} nodes: --run needs their names, "
                              f"--hosts=NODE0,NODE1,...")
        hosts = ["localhost"] if cluster.nodes == 1 else [f"node{i}" for i in range(cluster.nodes)]
    if len(hosts) != cluster.nodes:
        raise LaunchError(f"--hosts names {len(hosts)} node(s); cluster {name} has {cluster.nodes}")
    text = commands.hostfile(hosts, cluster)
    cmd = commands.deepspeed(cluster, args.overrides, hostfile_path=args.hostfile,
                             master_addr=hosts[0], master_port=args.master_port)
    if args.run:
        if importlib.util.find_spec("deepspeed") is None:
            raise LaunchError("deepspeed is not installed: pip install -e '.[deepspeed]'")
        if cluster.nodes > 1:
            Path(args.hostfile).write_text(text)
        # The launcher of this Python (the `deepspeed` script may be another environment's).
        _exec(commands.deepspeed(cluster, args.overrides, hostfile_path=args.hostfile,
                                 master_addr=hosts[0], master_port=args.master_port,
                                 program=_python("deepspeed.launcher.runner")),
              cmd, commands.launcher_env(cluster))
    if cluster.nodes == 1:
        print("# one node: the launcher starts its processes itself (no hostfile, no ssh):")
    else:
        print(f"# {args.hostfile} (written by --run):")
        print("".join(f"#   {line}\n" for line in text.splitlines()), end="")
        print("# run on the first node; the launcher starts the others over ssh (pdsh):")
    print(shlex.join(cmd))


def _python(module: str) -> tuple[str, ...]:
    return (sys.executable, "-m", module)


def _exec(argv: list[str], shown: list[str], env: dict[str, str]) -> None:
    """Replace this process with the launcher, so signals reach it directly; `env` is added
    where the user has not set those variables."""
    for key, value in env.items():
        os.environ.setdefault(key, value)
    print(f"+ {shlex.join(shown)}", file=sys.stderr, flush=True)
    os.execv(argv[0] if os.path.isabs(argv[0]) else shutil.which(argv[0]) or argv[0], argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _, cfg = load(args.overrides)
        cluster = require_cluster(cfg, "python -m launch")
        check(cfg, cluster)
        if args.launcher == "deepspeed":
            _deepspeed(args, cluster, cluster.name)
        else:
            _torchrun(args, cluster, cluster.name)
    except LaunchError as exc:
        print(f"launch: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
