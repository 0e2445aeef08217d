"""DCP's FileSystemReader for local disk, reading each whole saved tensor straight into the run's
own tensor (storage/checkpoint.py uses it for local checkpoint URLs; docs/benchmarks.md "Local
checkpoints" has the measurements). The files are DCP's own: the stock reader reads them too."""

from __future__ import annotations

import io
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.utils import _create_file_view
from torch.futures import Future


class LocalReader(dcp.FileSystemReader):
    """DCP's FileSystemReader, reading each whole saved tensor straight into its destination, and
    each file (DCP's writer makes `thread_count` of them per rank) in a thread of its own.

    The stock reader torch.loads every tensor into a new one and copies that over: a second pass
    over memory the size of the checkpoint, on pages that must be faulted in first (the copy alone
    was 0.7 s of a 1.7 s load of 512 MiB; docs/benchmarks.md). Here a request for a whole saved tensor whose
    destination is a contiguous CPU tensor of its dtype and shape reads the bytes from where
    torch.save put them into the destination; the rest (objects, slices of a resharded load, GPU
    destinations) goes the stock way. The files are the same; the stock reader reads them too.
    """

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        if any(self.storage_data[req.storage_index].transform_descriptors for req in plan.items):
            return super().read_data(plan, planner)
        per_file: dict[str, list[tuple[ReadItem, torch.Tensor | None]]] = {}
        for req in plan.items:  # the planner is asked here, in one thread, as the stock reader does
            target = None if req.type == LoadItemType.BYTE_IO else planner.resolve_tensor(req).detach()
            per_file.setdefault(self.storage_data[req.storage_index].relative_path, []).append((req, target))
        with ThreadPoolExecutor(max(1, min(len(per_file), _READ_THREADS))) as pool:
            read = list(pool.map(self._read_file, per_file.items()))
        for req, value in (item for items in read for item in items):
            if req.type == LoadItemType.BYTE_IO:
                planner.load_bytes(req, value)
            else:
                planner.commit_tensor(req, value)
        done: Future[None] = Future()
        done.set_result(None)
        return done

    def _read_file(self, job: tuple[str, list[tuple[ReadItem, torch.Tensor | None]]]) -> list[tuple[ReadItem, Any]]:
        relative_path, items = job
        read: list[tuple[ReadItem, Any]] = []
        with open(os.path.join(self.path, relative_path), "rb") as f:
            for req, target in sorted(items, key=lambda item: self.storage_data[item[0].storage_index].offset):
                where = self.storage_data[req.storage_index]
                view = _create_file_view(f, where.offset, where.length)
                if target is None:
                    read.append((req, io.BytesIO(view.read())))
                    continue
                if not _read_in_place(f, where.offset, view, req, target):
                    view.seek(0)
                    saved = torch.load(view, map_location="cpu", weights_only=True)
                    saved = narrow_tensor_by_index(saved, req.storage_offsets, req.lengths)
                    if saved.size() != target.size():
                        raise ValueError(f"{relative_path}: {req.storage_index.fqn} holds {tuple(saved.size())}, "
                                              f"the destination is {tuple(target.size())}")
                    target.copy_(saved)
                read.append((req, target))
        return read


_READ_THREADS = 8  # at most, one per file


def _read_in_place(f: io.BufferedReader, start: int, view: io.IOBase, req: ReadItem, target: torch.Tensor) -> bool:
    """Read the torch.save'd tensor at `view` (which begins at byte `start` of `f`) into `target`,
    if it is all of it and laid out as `target` is; False (nothing read into it) otherwise.

    Its layout (dtype, shape, strides) comes from loading its pickle onto the meta device, which
    reads no data; its bytes are the archive's one data record, in this machine's byte order."""
    if (target.device.type != "cpu" or target.is_quantized or not target.is_contiguous()
            or any(req.storage_offsets)):
        return False
    archive = torch._C.PyTorchFileReader(view)
    if ([r for r in archive.get_all_records() if r.startswith("data/")] != ["data/0"]
            or (archive.has_record("byteorder") and archive.get_record("byteorder").decode() != sys.byteorder)):
        return False
    view.seek(0)
    saved = torch.load(view, map_location="meta", weights_only=True)
    if (not isinstance(saved, torch.Tensor) or saved.dtype != target.dtype or saved.shape != target.shape
            or not saved.is_contiguous() or saved.storage_offset() != 0
            or archive.get_record_size("data/0") != target.nbytes):
        return False
    buf = memoryview(target.reshape(-1).view(torch.uint8).numpy())
    offset = start + archive.get_record_offset("data/0")
    while buf:
        n = os.preadv(f.fileno(), [buf], offset)
        if n == 0:
            raise ValueError(f"{f.name} ends at byte {offset}, inside {req.storage_index.fqn}")
        buf, offset = buf[n:], offset + n
    return True
