"""The one way tests start ranks: `spawn` for a function on N gloo ranks, `torchrun` for a run.

`spawn(fn, world_size, *args)` runs `fn(rank, world_size, *args)` in N fresh processes with a
gloo process group already initialised, and returns the values each rank returned (index = rank).
`torchrun(nproc, overrides)` runs `python -m train.run` under torchrun and returns a `Run`
with its exit code, output, run directory and metrics rows.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, fn: Callable, args: tuple, results) -> None:
    import torch
    import torch.distributed as dist

    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        results[rank] = ("ok", fn(rank, world_size, *args))
    except BaseException:  # noqa: BLE001 - carried back to the test process
        results[rank] = ("error", traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def spawn(fn: Callable, world_size: int, *args: Any) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` gloo ranks; return each rank's result."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        mp.start_processes(
            _worker, args=(world_size, free_port(), fn, args, results),
            nprocs=world_size, join=True, start_method="spawn",
        )
        out = []
        for rank in range(world_size):
            status, value = results[rank]
            if status != "ok":
                raise AssertionError(f"rank {rank} failed:\n{value}")
            out.append(value)
        return out


@dataclass
class Run:
    returncode: int
    output: str
    run_dir: Path | None
    stdout: str = ""
    metrics: list[dict] = field(default_factory=list)

    @property
    def losses(self) -> dict[int, float]:
        return {row["step"]: row["loss"] for row in self.metrics if "loss" in row}


def _parse(proc: subprocess.CompletedProcess) -> Run:
    output = proc.stdout + proc.stderr
    run_dir = None
    for line in proc.stdout.splitlines():
        if line.startswith("run_dir: "):
            run_dir = Path(line[len("run_dir: "):].strip())
    metrics = []
    if run_dir is not None and (run_dir / "metrics.jsonl").exists():
        metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line]
    return Run(proc.returncode, output, run_dir, proc.stdout, metrics)


def base_env(cache_dir: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HYDRA_FULL_ERROR", "0")
    if cache_dir is not None:
        env["TRAIN_HARNESS_CACHE"] = str(cache_dir)
    return env


def _train_cmd(overrides: list[str]) -> list[str]:
    return [sys.executable, "-m", "train.run", *overrides]


def _torchrun_cmd(nproc: int, overrides: list[str], torchrun_args: list[str] | None) -> list[str]:
    return [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}",
        *(torchrun_args or []), "-m", "train.run", *overrides,
    ]


def start(overrides: list[str], *, cwd: Path, nproc: int = 0, cache_dir: Path | None = None,
          torchrun_args: list[str] | None = None, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start a run in the background: `python -m train.run` (nproc=0) or under torchrun."""
    cmd = _torchrun_cmd(nproc, overrides, torchrun_args) if nproc else _train_cmd(overrides)
    return subprocess.Popen(cmd, cwd=cwd, env={**base_env(cache_dir), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout_s: float = 600) -> Run:
    """Wait for a run started with `start` and parse what it left."""
    stdout, stderr = proc.communicate(timeout=timeout_s)
    return _parse(subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr))


def command(cmd: list[str], *, cwd: Path, cache_dir: Path | None = None, timeout_s: float = 600,
            env: dict[str, str] | None = None) -> Run:
    """Any command that ends in train.run (a launcher), with the harness on PYTHONPATH."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
                          env={**base_env(cache_dir), **(env or {})})
    return _parse(proc)


def train(overrides: list[str], *, cwd: Path, cache_dir: Path | None = None,
          timeout_s: float = 600, env: dict[str, str] | None = None, umask: int = -1) -> Run:
    """`python -m train.run OVERRIDES` in one process (with `umask`, if given)."""
    proc = subprocess.run(
        _train_cmd(overrides), cwd=cwd, capture_output=True, text=True,
        timeout=timeout_s, env={**base_env(cache_dir), **(env or {})}, umask=umask,
    )
    return _parse(proc)


def torchrun(nproc: int, overrides: list[str], *, cwd: Path, cache_dir: Path | None = None,
             timeout_s: float = 600, env: dict[str, str] | None = None,
             torchrun_args: list[str] | None = None) -> Run:
    """`torchrun --nproc_per_node=N -m train.run OVERRIDES` on this machine."""
    proc = subprocess.run(
        _torchrun_cmd(nproc, overrides, torchrun_args), cwd=cwd, capture_output=True, text=True, timeout=timeout_s,
        env={**base_env(cache_dir), **(env or {})},
    )
    return _parse(proc)
