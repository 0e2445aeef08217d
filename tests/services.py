"""What the service fixtures (Ceph, Slurm) share: the availability rule and running the
project's `launch/dev/*.sh` scripts.

Rule: without the service's packages (or root) a test that needs it is skipped with the reason
on a developer's machine, and fails in CI (CI=true), where `.ci/run` installs them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Iterator

import pytest


def unavailable(service: str, reason: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(f"{service} is required in CI: {reason}", pytrace=False)
    pytest.skip(f"no {service} on this machine: {reason}")


def require(service: str, tools: tuple[str, ...], install: str, script: Path) -> None:
    """The service's commands are on PATH and we are root (the dev scripts need it)."""
    missing = [tool for tool in tools if not shutil.which(tool)]
    if missing:
        unavailable(service, f"{', '.join(missing)} not found ({install})")
    if os.geteuid() != 0:
        unavailable(service, f"{script.relative_to(script.parents[2])} needs root")


def run_script(script: Path, action: str, state: Path, env: dict[str, str] | None = None,
               *, check: bool = True) -> subprocess.CompletedProcess:
    """`bash SCRIPT ACTION STATE`; with `check`, a failure fails the test with its output."""
    proc = subprocess.run(["bash", str(script), action, str(state)], capture_output=True,
                          text=True, env=env or dict(os.environ), timeout=120)
    if check and proc.returncode:
        pytest.fail(f"{script.relative_to(script.parents[2])} {action} failed:\n"
                    f"{proc.stdout}{proc.stderr}", pytrace=False)
    return proc


@contextlib.contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set variables in this process's environment (runs the tests start inherit them), then
    restore what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
