"""The README's commands are the ones CI runs."""

from __future__ import annotations

import re

from tests.distributed import REPO


def _quick_start_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert block, "README.md has no '## Quick start' code block"
    return [line for line in block.group(1).splitlines() if line and not line.startswith("#")]


def test_ci_runs_the_readme_test_command() -> None:
    commands = _quick_start_commands()
    assert len(commands) == 2, commands
    assert commands[0].endswith("python -m train.run")
    assert commands[1] in (REPO / ".ci" / "run").read_text().splitlines()
