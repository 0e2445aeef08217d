"""A real Slurm for the tests: `launch/dev/slurm.sh` started once per session (two fake nodes).

Without Slurm's packages the tests that need it are skipped with the reason on a developer's
machine, and fail in CI (CI=true), where `.ci/run` installs them.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed import REPO

SCRIPT = REPO / "launch" / "dev" / "slurm.sh"
TOOLS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "scancel", "squeue")


@dataclass(frozen=True)
class Slurm:
    conf: Path
    dir: Path

    @property
    def controller_log(self) -> Path:
        return self.dir / "log" / "slurmctld.log"

    def submissions(self) -> int:
        """Batch jobs the controller has accepted so far."""
        return self.controller_log.read_text().count("_slurm_rpc_submit_batch_job")


def _unavailable(reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"Slurm is required in CI: {reason}", pytrace=False)
    pytest.skip(f"no Slurm on this machine: {reason}")


def _free_port_pair() -> int:
    """A port p with p and p + 1 free (the two fake nodes' slurmd)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def slurm(tmp_path_factory: pytest.TempPathFactory):
    """Start munged, slurmctld and slurmd n1, n2; stop them after the session."""
    missing = [tool for tool in TOOLS if not shutil.which(tool)]
    if missing:
        _unavailable(f"{', '.join(missing)} not found (apt-get install slurmctld slurmd "
                     f"slurm-client munge)")
    if os.geteuid() != 0:
        _unavailable("launch/dev/slurm.sh needs root")
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURM_DEV_CTLD_PORT": str(_free_port()),
           "SLURM_DEV_NODE_PORT": str(_free_port_pair())}
    up = subprocess.run(["bash", str(SCRIPT), "up", str(state)], capture_output=True, text=True,
                        env=env, timeout=120)
    if up.returncode:
        pytest.fail(f"launch/dev/slurm.sh up failed:\n{up.stdout}{up.stderr}", pytrace=False)
    saved = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = str(state / "slurm.conf")
    try:
        yield Slurm(conf=state / "slurm.conf", dir=state)
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(state)], timeout=60)
        if saved is None:
            os.environ.pop("SLURM_CONF", None)
        else:
            os.environ["SLURM_CONF"] = saved
