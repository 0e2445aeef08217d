"""A real Slurm for the tests: `launch/dev/slurm.sh` started once per session: two nodes, each a
slurmd in its own test host (launch/dev/hosts.sh), so a job's ranks meet over a network.

Without Slurm's packages the tests that need it are skipped with the reason on a developer's
machine, and fail in CI (CI=true), where `.ci/run` installs them.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed import REPO, free_port
from tests.services import environment, require, run_script

SCRIPT = REPO / "launch" / "dev" / "slurm.sh"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel", "squeue", "ip", "nsenter")


@dataclass(frozen=True)
class Slurm:
    conf: Path
    dir: Path
    nodes: dict[str, str]  # node (host) name -> its address

    @property
    def controller_log(self) -> Path:
        return self.dir / "log" / "slurmctld.log"

    def submissions(self) -> int:
        """Batch jobs the controller has accepted so far."""
        return self.controller_log.read_text().count("_slurm_rpc_submit_batch_job")


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the two fake nodes' slurmd)."""
    for _ in range(50):
        port = free_port()
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """Start munged, slurmctld and the two nodes' slurmd; stop them after the session."""
    require("Slurm", TOOLS, "apt-get install slurmctld slurmd slurm-client munge iproute2", SCRIPT)
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_DEV_CTLD_PORT": str(free_port()),
           "SLURM_DEV_NODE_PORT": str(_free_port_pair())}
    up = run_script(SCRIPT, "up", state, env)
    nodes = dict(re.findall(r"(\S+) \((\d+\.\d+\.\d+\.\d+)\)", up.stdout.split("nodes: ", 1)[1].splitlines()[0]))
    try:
        with environment({"SLURM_CONF": str(state / "slurm.conf")}):
            yield Slurm(conf=state / "slurm.conf", dir=state, nodes=nodes)
    finally:
        run_script(SCRIPT, "down", state, check=False)  # a throw-away cluster
