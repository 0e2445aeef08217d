"""Checkpoints that an engine writes as files of its own (DeepSpeed's), under the same protocol
as DCP ones.

The engine only writes and reads its files in a node-local staging directory; this module
moves them and keeps the Checkpointer's rules:

- save: every rank stages its own files (and its RNG state) and uploads them under
  `checkpoint.url/step-NNNNNNNN/`; rank 0 checks that every rank's files arrived whole and
  only then commits (COMMITTED marker, `latest`, pruning: `Checkpointer.commit`). A failure on
  any rank fails the save on every rank, uncommitted.
- load: the COMMITTED marker is checked against the run (`check_meta`, the one check every
  format goes through), the checkpoint is downloaded once per node, the engine reads it, and
  each rank's RNG state comes back.

Staging lives under `staging_dir` (node-local disk; "" = $TMPDIR), one directory per
checkpoint URL, so two runs on one node never share files; nothing is left there afterwards.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.distributed as dist

from storage.checkpoint import (COMMITTED, Checkpointer, CheckpointError, CheckpointInfo, check_meta,
                                restore_rng_state, rng_file, rng_state_bytes, verify_whole)
from storage.fs import retrying, url_to_fs


class EngineFiles:
    """Save and load checkpoints that an engine writes as files, through `checkpointer`."""

    def __init__(self, checkpointer: Checkpointer, staging_dir: str, *, local_rank: int,
                 local_world_size: int) -> None:
        self.checkpointer = checkpointer
        self.rank = checkpointer.rank
        self.local_rank = local_rank
        self.node = checkpointer.rank // max(1, local_world_size)
        base = staging_dir or os.path.join(tempfile.gettempdir(), "train-harness-staging")
        self.staging = Path(base).expanduser() / hashlib.sha1(checkpointer.url.encode()).hexdigest()[:12]

    def save(self, step: int, write: Callable[[Path], None], meta: dict[str, Any]) -> str:
        """Every rank: `write(directory)` puts this rank's files of checkpoint `step` into an
        empty staging directory; they are uploaded, checked and committed. Returns the URL.

        Each rank stages into a directory of its own, so what it uploads is exactly the files
        it wrote; rank 0 then finds every rank's files at their full size under the URL before
        the COMMITTED marker makes the checkpoint count.
        """
        url = self.checkpointer.begin(step)
        staging = self.staging / f"save-rank-{self.rank:05d}"
        shutil.rmtree(staging, ignore_errors=True)
        directory = staging / url.rstrip("/").rsplit("/", 1)[-1]
        # A failure on one rank must reach all of them (or they would wait in the next
        # collective forever): each rank's outcome is gathered, the commit's broadcast.
        try:
            write(directory)
            rng = directory / rng_file(self.rank)
            rng.parent.mkdir(parents=True, exist_ok=True)
            rng.write_bytes(rng_state_bytes())
            outcome: dict[str, int] | str = _upload(directory, url)
        except Exception as exc:  # noqa: BLE001 - reported by every rank below
            outcome = f"rank {self.rank}: {type(exc).__name__}: {exc}"
        shutil.rmtree(staging, ignore_errors=True)
        outcomes = _all_gather(outcome)
        failed = [o for o in outcomes if isinstance(o, str)]
        problem = f"checkpoint {url} is not committed: {'; '.join(failed)}" if failed else None
        if self.rank == 0 and problem is None:
            written = {name: size for files in outcomes for name, size in files.items()}
            try:
                retrying(lambda: verify_whole(url, written), what=f"check checkpoint {url}")
                retrying(lambda: self.checkpointer.commit(step, meta), what=f"commit checkpoint {url}")
            except CheckpointError as exc:  # names the files that did not arrive whole
                problem = str(exc)
            except Exception as exc:  # noqa: BLE001 - reported by every rank below
                problem = f"checkpoint {url} is not committed: {type(exc).__name__}: {exc}"
        problem = _broadcast(problem)
        _remove_if_empty(self.staging)
        if problem:
            raise CheckpointError(problem)
        return url

    def load(self, info: CheckpointInfo, read: Callable[[Path], None], meta: dict[str, Any],
             hints: dict[str, str] | None = None) -> None:
        """Check `info` against `meta` (see `check_meta`; `hints` say what to do instead),
        download it once per node, `read(directory)` on every rank, restore the RNG state.

        The engine's files are read whole by every rank (a partitioned format may need other
        ranks' files to find its own), so each node fetches the whole checkpoint.
        """
        check_meta(info, meta, hints)
        local = self.staging / f"load-node-{self.node:04d}"
        directory = local / info.url.rstrip("/").rsplit("/", 1)[-1]
        if self.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
            _download(info.url, directory)
        _barrier()
        read(directory)
        restore_rng_state((directory / rng_file(self.rank)).read_bytes())
        _barrier()
        if self.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
            _remove_if_empty(self.staging)


def _upload(local_dir: Path, url: str) -> dict[str, int]:
    """Put every file under `local_dir` at the same relative path under `url`; return
    {relative path: size}. Each file is retried on transient errors (storage.max_retries)."""
    fs, root = url_to_fs(url)
    written = {}
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        target = f"{root.rstrip('/')}/{rel}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # local targets; a no-op on S3
        retrying(lambda file=file, target=target: fs.put_file(str(file), target),
                 what=f"upload {url}/{rel}")
        written[rel] = file.stat().st_size
    return written


def _download(url: str, local_dir: Path) -> None:
    """Every file under `url` (but the COMMITTED marker) to the same path under `local_dir`."""
    fs, root = url_to_fs(url)
    prefix = root.rstrip("/") + "/"
    for remote in sorted(fs.find(root)):
        rel = remote.removeprefix(prefix)
        if rel == COMMITTED:
            continue
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        retrying(lambda remote=remote, target=target: fs.get_file(remote, str(target)),
                 what=f"download {url}/{rel}")


def _remove_if_empty(path: Path) -> None:
    """Leave no empty staging directory behind (another rank of the node may be first)."""
    try:
        path.rmdir()
    except OSError:
        pass


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_gather(value: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]
