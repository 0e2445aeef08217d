"""A local checkpoint loads back exactly, read straight into the run's own tensors where it can.

`storage.dcp_local.LocalReader` (storage.checkpoint's reader for local URLs) reads a whole saved
tensor into its destination from where torch.save put it in the file, and everything else
(objects, non-contiguous tensors, slices of a resharded load) the way DCP's stock reader does. These tests load each kind and check every
value, and that the fast path is the one taken where it applies (a torch that moved the bytes
would otherwise send every tensor down the slow path unnoticed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata
from torch.distributed.checkpoint.planner import LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from storage import checkpoint, dcp_local
from storage.checkpoint import Checkpointer


def _kinds() -> dict:
    gen = torch.Generator().manual_seed(0)
    return {
        "f32": torch.randn(64, 32, generator=gen),
        "bf16": torch.randn(33, 7, generator=gen).bfloat16(),
        "i64": torch.arange(1000),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 4),
        "transposed": torch.randn(8, 4, generator=gen).t(),  # saved with its strides: not in place
        "into_transposed": torch.randn(5, 3, generator=gen),  # loaded into a non-contiguous tensor
        "step": 7,
        "names": ["a", "b"],
    }


def test_every_kind_loads_exactly_whole_tensors_in_place(tmp_path: Path, monkeypatch) -> None:
    saved = _kinds()
    ckpt = Checkpointer(str(tmp_path), keep_last=0, rank=0, world_size=1)
    ckpt.save(1, {"app": saved}, {})

    # contiguous destinations (as a model's are), but one
    into = {k: torch.full(v.shape, -1, dtype=v.dtype) if isinstance(v, torch.Tensor) else None
            for k, v in saved.items()}
    into["into_transposed"] = torch.zeros(3, 5).t()
    before = {k: v.data_ptr() for k, v in into.items() if isinstance(v, torch.Tensor)}
    in_place: dict[str, bool] = {}
    read_in_place = dcp_local._read_in_place

    def spy(f, start, view, req, target):
        in_place[req.storage_index.fqn] = read_in_place(f, start, view, req, target)
        return in_place[req.storage_index.fqn]

    monkeypatch.setattr(dcp_local, "_read_in_place", spy)
    ckpt.load(ckpt.latest(), {"app": into}, {})

    for key, value in saved.items():
        if isinstance(value, torch.Tensor):
            assert into[key].dtype == value.dtype and torch.equal(into[key], value), key
            assert into[key].data_ptr() == before[key], f"{key} was replaced, not loaded into"
        else:
            assert into[key] == value, key
    # (DCP reads nothing for the empty tensor)
    assert in_place == {"app.f32": True, "app.bf16": True, "app.i64": True, "app.scalar": True,
                        "app.transposed": False, "app.into_transposed": False}


class _Into:
    """The part of a DCP LoadPlanner that a reader calls for tensors: each request's destination
    is its region of `local`, the rank's part of the tensor (as a resharded load's planner does)."""

    def __init__(self, local: torch.Tensor) -> None:
        self.local = local

    def resolve_tensor(self, req: ReadItem) -> torch.Tensor:
        return narrow_tensor_by_index(self.local, req.dest_offsets, req.lengths)

    def commit_tensor(self, req: ReadItem, tensor: torch.Tensor) -> None:
        pass


@pytest.mark.parametrize("offsets, sizes", [((0, 3), (7, 3)), ((2, 0), (3, 6)), ((0, 0), (4, 6))],
                         ids=["columns", "middle rows", "first rows"])
def test_a_part_of_a_saved_tensor_reads_exactly_that_part(tmp_path: Path, offsets, sizes) -> None:
    """What a rank of another layout asks for: the reads DCP plans for its part of the tensor."""
    full = torch.arange(7 * 6, dtype=torch.float32).reshape(7, 6)
    ckpt = Checkpointer(str(tmp_path), keep_last=0, rank=0, world_size=1)
    url = ckpt.save(1, {"app": {"w": full}}, {})
    reader = checkpoint._reader(url)
    metadata = reader.read_metadata()
    reader.set_up_storage_reader(metadata, is_coordinator=True)
    part = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
    plan = LoadPlan(create_read_items_for_chunk_list("app.w", metadata.state_dict_metadata["app.w"], [part]))
    local = torch.full(sizes, -1.0)
    reader.read_data(plan, _Into(local)).wait()
    rows, columns = (slice(o, o + n) for o, n in zip(offsets, sizes))
    assert torch.equal(local, full[rows, columns])
