"""Settings the layout and trainer config promise take effect where they act: the layout's
environment in each worker, and trainer.collective_timeout_s on every process group."""

from __future__ import annotations

import os

import pytest
import torch

from storage.checkpoint import Checkpointer
from tests.distributed import spawn
from train.config import ClusterConfig
from train.distributed import HARNESS_OWNED_ENV, Degrees, apply_env, build_mesh


def test_layout_env_wins_where_torchrun_sets_the_variable_and_defaults_elsewhere(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What a torchrun worker sees: the agent set TORCH_NCCL_ASYNC_ERROR_HANDLING=1 itself; the
    # user exported NCCL_DEBUG=INFO on purpose; PYTORCH_CUDA_ALLOC_CONF is not set.
    monkeypatch.setenv("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    layout = ClusterConfig(env={"TORCH_NCCL_ASYNC_ERROR_HANDLING": "3", "NCCL_DEBUG": "WARN",
                                "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"})
    apply_env(layout)
    assert "TORCH_NCCL_ASYNC_ERROR_HANDLING" in HARNESS_OWNED_ENV
    assert os.environ["TORCH_NCCL_ASYNC_ERROR_HANDLING"] == "3"  # the layout's, not torchrun's
    assert os.environ["NCCL_DEBUG"] == "INFO"  # the user's own export
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"


def _timeouts(rank: int, world_size: int, ckpt_dir: str) -> dict[str, float]:
    mesh = build_mesh(torch.device("cpu"), Degrees(dp=1, tp=2), timeout_s=7)
    checkpointer = Checkpointer(ckpt_dir, keep_last=1, rank=rank, world_size=world_size, async_save=True,
                                collective_timeout_s=9)
    groups = {"pp": mesh.get_group("pp"), "dp": mesh.get_group("dp"), "tp": mesh.get_group("tp"),
              "checkpoint": checkpointer._group}
    return {name: group._get_backend(torch.device("cpu")).options._timeout.total_seconds()
            for name, group in groups.items()}


def test_every_process_group_gets_the_collective_timeout(tmp_path) -> None:
    # torch makes a mesh dimension's groups (here pp and dp: one group per rank) with the backend's
    # default timeout (30 minutes for gloo) unless told otherwise; the async checkpoint writer's
    # group likewise.
    for timeouts in spawn(_timeouts, 2, str(tmp_path / "ckpt")):
        assert timeouts == {"pp": 7.0, "dp": 7.0, "tp": 7.0, "checkpoint": 9.0}
