"""Test hosts for multi-node tests: `launch/dev/hosts.sh` (network namespaces on a bridge), made
once per session, with two hosts.

Each node of a multi-node test runs inside its own host (`Host.command`), so the nodes talk over
a network, each from its own address, as on a cluster. Without root or iproute2, or where the
kernel refuses network namespaces, the tests that need hosts are skipped with the reason on a
developer's machine and fail in CI (CI=true).
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed import REPO
from tests.services import require, unavailable

SCRIPT = REPO / "launch" / "dev" / "hosts.sh"
COUNT = 2


@dataclass(frozen=True)
class Host:
    name: str  # its host name (and network namespace)
    address: str  # on eth0, its only interface besides loopback
    link: str  # its cable on this machine's side: `ip link set LINK down` cuts it off

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run on this host."""
        return ["ip", "netns", "exec", self.name, *argv]

    def set_link(self, up: bool) -> None:
        subprocess.run(["ip", "link", "set", self.link, "up" if up else "down"], check=True)


@dataclass(frozen=True)
class Hosts:
    hosts: list[Host]
    bridge: str  # the bridge's address: this machine, as every host reaches it
    dir: Path


def _parse(stdout: str, state: Path) -> Hosts:
    hosts, bridge = [], ""
    for line in stdout.splitlines():
        kind, *fields = line.split()
        if kind == "host":
            hosts.append(Host(*fields))
        elif kind == "bridge":
            bridge = fields[1]
    return Hosts(hosts, bridge, state)


@pytest.fixture(scope="session", name="hosts")
def hosts_fixture(tmp_path_factory: pytest.TempPathFactory):
    """Two test hosts; removed after the session."""
    require("test hosts", ("ip", "flock"), "apt-get install iproute2 util-linux", SCRIPT)
    state = tmp_path_factory.mktemp("hosts")
    up = subprocess.run(["bash", str(SCRIPT), "up", str(state), str(COUNT)], check=False,
                        capture_output=True, text=True, timeout=60)
    if up.returncode:
        unavailable("test hosts", f"launch/dev/hosts.sh up failed: {(up.stdout + up.stderr).strip()}")
    try:
        made = _parse(up.stdout, state)
        assert len(made.hosts) == COUNT and made.bridge, up.stdout
        yield made
    finally:
        subprocess.run(["bash", str(SCRIPT), "down", str(state)], check=False, capture_output=True, timeout=60)


def python_path() -> str:
    """PATH with this interpreter's bin first, so `python` in a printed command is this one."""
    return os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
