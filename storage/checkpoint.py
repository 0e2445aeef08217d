"""Checkpoints: torch.distributed.checkpoint (DCP) at any fsspec URL, committed last.

Layout under `checkpoint.url`:

    step-00000100/            DCP files of every rank and DCP's own .metadata
    step-00000100/rng/        one small file per rank: this rank's RNG states
    step-00000100/COMMITTED   written by rank 0 after every rank finished: the checkpoint counts
    latest                    name of the newest committed step (a hint; COMMITTED decides)

A directory without COMMITTED is a save that was interrupted: it is never loaded, and a save
of the same step later replaces it. With `async_save`, `save` returns once the state is copied
to host memory; the files are written and the checkpoint committed by a background thread,
which the next `save` (and `wait`) waits for. The host copy goes into buffers allocated at the
first save and reused by every later one (pinned where a GPU is there, so the copy runs at the
link's speed): a save blocks the loop only for the copy, never for allocating and faulting in
a model-sized buffer. Because DCP saves by fully-qualified name and shards on
load, a checkpoint written by N ranks loads on M ranks, with any engine of the native family.
From local disk, `load` reads each whole saved tensor straight into the run's own
(`storage.dcp_local.LocalReader`).

An engine that writes files of its own (DeepSpeed) saves and loads through `storage.engine_files`,
under the same protocol: `begin`, `verify_whole`, `commit` and `check_meta` are shared.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed._state_dict_utils import CompanionMismatch, _copy_state_dict, _create_cpu_state_dict
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from storage.dcp_local import LocalReader
from storage.fs import has_protocol, join, retrying, url_to_fs

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d{8})$")
COMMITTED = "COMMITTED"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: says which and why."""


@dataclass(frozen=True)
class CheckpointInfo:
    url: str
    step: int
    meta: dict[str, Any]


def _is_local(url: str) -> bool:
    return "://" not in url or url.startswith("file://")


def _writer(url: str):
    """DCP's writer for `url`. Both kinds stage a copy of the state in host memory when used
    with dcp.async_save, so training may change the weights while the files are written."""
    if _is_local(url):
        return dcp.FileSystemWriter(url.removeprefix("file://"), thread_count=2)
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

    # Object stores: durability comes from the PUT completing; fsync falls back to os.sync().
    return FsspecWriter(url, sync_files=False, thread_count=4)


def _reader(url: str):
    if _is_local(url):
        return LocalReader(url.removeprefix("file://"))
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(url)


def _barrier(group: dist.ProcessGroup | None = None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=group)


class Checkpointer:
    """Save, find and load committed checkpoints under one URL."""

    def __init__(self, url: str, *, keep_last: int, rank: int, world_size: int,
                 async_save: bool = False, collective_timeout_s: float = 600) -> None:
        if not has_protocol(url):
            url = os.path.abspath(os.path.expanduser(url))  # logs and markers name a full path
        self.url = url.rstrip("/")
        self.keep_last = keep_last
        self.rank = rank
        self.world_size = world_size
        self.async_save = async_save
        self.fs, self.root = url_to_fs(self.url)
        self._pending: threading.Thread | None = None
        self._pending_error: BaseException | None = None
        self._staging: dict[str, Any] | None = None  # async_save's host copy, reused save after save
        self._group: dist.ProcessGroup | None = None
        self._begun: dict[int, float] = {}  # step -> when its save began (perf_counter)
        # Rank 0: checkpoints committed and not yet taken by `take_commits`, by step; the
        # background writer adds to it too (one dict assignment: atomic under the GIL).
        self._commits: dict[int, dict[str, Any]] = {}
        if async_save and dist.is_initialized():
            # The background writer's collectives (DCP's plan exchange, the commit barrier)
            # run while the loop all-reduces gradients: they need a process group of their
            # own. Created here, when every rank builds its Checkpointer.
            self._group = dist.new_group(backend="gloo", timeout=timedelta(seconds=collective_timeout_s))

    def step_url(self, step: int) -> str:
        return join(self.url, f"step-{step:08d}")

    # -- finding -------------------------------------------------------------------------
    def committed(self) -> list[CheckpointInfo]:
        """Every committed checkpoint, oldest first; half-written ones are left out."""
        return retrying(self._committed, what=f"list checkpoints under {self.url}")

    def _committed(self) -> list[CheckpointInfo]:
        try:
            entries = self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return []
        found = []
        for entry in entries:
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            match = STEP_DIR.match(name)
            if not match:
                continue
            marker = f"{entry.rstrip('/')}/{COMMITTED}"
            if not self.fs.exists(marker):
                log.debug("ignoring uncommitted checkpoint %s", entry)
                continue
            meta = json.loads(self.fs.cat_file(marker))
            found.append(CheckpointInfo(self.step_url(int(match.group(1))), int(match.group(1)), meta))
        return sorted(found, key=lambda c: c.step)

    def latest(self) -> CheckpointInfo | None:
        found = self.committed()
        return found[-1] if found else None

    def info(self, url: str) -> CheckpointInfo:
        """The checkpoint at an explicit URL, which must be committed."""
        fs, path = url_to_fs(url)
        marker = f"{path.rstrip('/')}/{COMMITTED}"
        if not fs.exists(path):
            raise CheckpointError(f"checkpoint not found: {url} (checkpoint.resume)")
        if not fs.exists(marker):
            raise CheckpointError(
                f"checkpoint {url} is not committed (no {COMMITTED} marker): it was interrupted "
                f"while saving and may be incomplete; resume from an earlier one or set "
                f"checkpoint.resume=auto")
        meta = json.loads(fs.cat_file(marker))
        return CheckpointInfo(url.rstrip("/"), int(meta["step"]), meta)

    # -- saving --------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], meta: dict[str, Any]) -> str:
        """Write every rank's shard, then commit; returns the checkpoint URL.

        `state` maps names to Stateful objects or tensors/dicts (what dcp.save takes).
        """
        self.wait()  # one save at a time, committed in step order
        started = time.perf_counter()
        url = self.begin(step)
        retrying(lambda: self._save_rng(url), what=f"save RNG states to {url}")
        if not self.async_save:
            self._write(state, url)
            self._commit_when_written(step, url, meta, started)
            return url
        # What dcp.async_save does, with the write in our own thread so that it is retried
        # like a synchronous one: a copy of the state in host memory, then the files.
        state = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}
        staged = self._stage(state)
        log.info("checkpoint step %d staged in host memory in %.2f s; writing it in the background",
                 step, time.perf_counter() - started)
        self._pending_error = None
        self._pending = threading.Thread(target=self._finish_async, args=(staged, step, url, meta, started),
                                         name=f"checkpoint-step-{step}", daemon=True)
        self._pending.start()
        return url

    def _stage(self, state: dict[str, Any]) -> dict[str, Any]:
        """`state` copied into host memory: into the buffers of the previous save (the last
        background write has finished: `save` waited for it), made anew only at the first save
        or if the state's structure changed. DTensors keep their local shards."""
        if self._staging is not None:
            try:
                return _copy_state_dict(state, self._staging)
            except (CompanionMismatch, RuntimeError):  # another structure or shape: stage afresh
                self._staging = None
        self._staging = _create_cpu_state_dict(state, pin_memory=torch.cuda.is_available())
        return _copy_state_dict(state, self._staging)

    def begin(self, step: int) -> str:
        """Every rank, before writing `step`: rank 0 removes what an interrupted save of it
        left (a committed one is never saved again: resume starts after it); returns its URL."""
        url = self.step_url(step)
        if self.rank == 0:
            self._begun[step] = time.perf_counter()
        _, path = url_to_fs(url)
        if self.rank == 0 and retrying(lambda: self.fs.exists(path), what=f"look for {url}"):
            log.warning("removing interrupted checkpoint %s before saving it again", url)
            retrying(lambda: self.fs.rm(path, recursive=True), what=f"remove {url}")
        _barrier()
        return url

    def _write(self, state: dict[str, Any], url: str) -> None:
        """Every rank's files. DCP reports a failure on any rank to all ranks, so all retry a
        transient one (RGW restarting) together; a retry rewrites the same file names."""
        retrying(lambda: dcp.save(state, storage_writer=_writer(url), process_group=self._group),
                 what=f"save checkpoint {url}")

    def _commit_when_written(self, step: int, url: str, meta: dict[str, Any], started: float) -> None:
        _barrier(self._group)  # every rank's files are written before anyone commits
        if self.rank == 0:
            retrying(lambda: self._verify_written(url), what=f"check checkpoint {url}")
            retrying(lambda: self.commit(step, meta), what=f"commit checkpoint {url}")
        _barrier(self._group)
        log.info("checkpoint step %d committed at %s in %.1f s", step, url,
                 time.perf_counter() - started)

    def _finish_async(self, staged: dict[str, Any], step: int, url: str, meta: dict[str, Any],
                      started: float) -> None:
        try:
            self._write(staged, url)
            self._commit_when_written(step, url, meta, started)
        except BaseException as exc:  # noqa: BLE001 - raised by wait(), in the loop's thread
            self._pending_error = CheckpointError(
                f"background save of checkpoint step {step} to {url} failed, so it is not "
                f"committed: {exc}")

    def take_commits(self) -> list[dict[str, Any]]:
        """Rank 0: the checkpoints committed since the last call, oldest first, each with its
        step, save_s (from `begin` to the commit), time (of the commit) and url; others: []."""
        return [self._commits.pop(step) for step in sorted(self._commits)]

    def wait(self) -> None:
        """Block until the background save (if any) is written and committed; raise its error."""
        if self._pending is None:
            return
        self._pending.join()
        self._pending = None
        if self._pending_error is not None:
            error, self._pending_error = self._pending_error, None
            raise error

    def commit(self, step: int, meta: dict[str, Any]) -> None:
        """Rank 0, once every rank's files of `step` are written: mark it committed, point
        `latest` at it, and prune old ones. Until the marker exists, nobody loads it."""
        _, path = url_to_fs(self.step_url(step))
        marker = {"step": step, "world_size": self.world_size, "time": time.time(), **meta}
        self.fs.pipe_file(f"{path}/{COMMITTED}", json.dumps(marker, indent=1).encode())
        self.fs.pipe_file(f"{self.root}/latest", f"step-{step:08d}\n".encode())
        begun = self._begun.pop(step, None)
        self._commits[step] = {"step": step, "time": marker["time"], "url": self.step_url(step),
                               "save_s": time.perf_counter() - begun if begun is not None else 0.0}
        self._prune()

    def _verify_written(self, url: str) -> None:
        """Refuse to commit unless every file DCP's metadata points at is there, whole (at least
        as long as the byte ranges recorded for it)."""
        metadata = _reader(url).read_metadata()
        needed: dict[str, int] = {}
        for info in (metadata.storage_data or {}).values():
            needed[info.relative_path] = max(needed.get(info.relative_path, 0), info.offset + info.length)
        verify_whole(url, needed)

    def _prune(self) -> None:
        if self.keep_last <= 0:
            return
        for old in self.committed()[: -self.keep_last]:
            _, path = url_to_fs(old.url)
            # Un-commit first, so a crash half-way through the delete leaves no
            # committed checkpoint with missing files.
            self.fs.rm(f"{path}/{COMMITTED}")
            self.fs.rm(path, recursive=True)

    def _save_rng(self, url: str) -> None:
        _, path = url_to_fs(url)
        self.fs.makedirs(f"{path}/rng", exist_ok=True)
        self.fs.pipe_file(f"{path}/{rng_file(self.rank)}", rng_state_bytes())

    # -- loading -------------------------------------------------------------------------
    def load(self, info: CheckpointInfo, state: dict[str, Any], meta: dict[str, Any]) -> None:
        """Load `info` into `state` in place; `meta` must match what was saved with it."""
        check_meta(info, meta)
        saved = set(_reader(info.url).read_metadata().state_dict_metadata)
        for name, value in state.items():  # a Stateful that reads older formats of its own state
            if hasattr(value, "match_checkpoint"):
                value.match_checkpoint(name, saved, info.url)
        state = {name: _without_absent(name, value, saved) for name, value in state.items()}
        try:
            dcp.load(state, storage_reader=_reader(info.url))
        except (Exception, CheckpointException) as exc:  # DCP's wraps per-rank failures (a BaseException)
            # its text holds the traceback too, source lines included: the last match is the key
            missing = re.findall(r"Missing key in checkpoint state_dict: ([^\s{}]+?)\.?(?:\s|$)", str(exc))
            if missing:
                raise CheckpointError(
                    f"checkpoint {info.url} holds no {missing[-1]}, which this run needs: it was written "
                    f"by another version or configuration of the harness. Resume it with the version and "
                    f"config that wrote it, or start a new checkpoint.url") from None
            raise CheckpointError(f"cannot load checkpoint {info.url}: {exc}") from exc
        self._load_rng(info)
        log.info("resumed from %s (step %d, written by %s ranks)", info.url, info.step,
                 info.meta.get("world_size", "?"))

    def _load_rng(self, info: CheckpointInfo) -> None:
        _, path = url_to_fs(info.url)
        own = f"{path}/{rng_file(self.rank)}"
        if info.meta.get("world_size") != self.world_size or not self.fs.exists(own):
            log.info("RNG states not restored: the checkpoint was written by %s ranks, this run "
                     "has %d (data order does not depend on them)", info.meta.get("world_size"),
                     self.world_size)
            return
        restore_rng_state(self.fs.cat_file(own))


class _Without(Stateful):
    """A Stateful's state without the keys the checkpoint lacks; loading passes the rest on."""

    def __init__(self, inner: Stateful, absent: set[str]) -> None:
        self.inner, self.absent = inner, absent

    def state_dict(self) -> dict[str, Any]:
        return {k: v for k, v in self.inner.state_dict().items() if k not in self.absent}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.inner.load_state_dict(state_dict)


def _without_absent(name: str, value: Any, saved: set[str]) -> Any:
    """`value`, less the keys of its `optional_state_keys` (fields added to a Stateful's state
    after checkpoints were written without them; its load_state_dict reads such a state) that
    the checkpoint does not hold under `name`."""
    absent = {k for k in getattr(value, "optional_state_keys", ()) if f"{name}.{k}" not in saved}
    return _Without(value, absent) if absent else value


def check_meta(info: CheckpointInfo, meta: dict[str, Any], hints: dict[str, str] | None = None) -> None:
    """Refuse a checkpoint whose COMMITTED marker disagrees with `meta`, what this run needs of
    it (model shape, tokenizer, engine, ...); a key the marker lacks is not checked.

    The one check for every engine and format. `hints` says, per key, what to do instead of
    starting a new checkpoint.url ("{saved}" stands for the saved value); by default, resume
    with the same value.
    """
    for key, expected in meta.items():
        saved = info.meta.get(key)
        if saved is not None and saved != expected:
            hint = (hints or {}).get(key, "resume with the same {key}").format(saved=saved, key=key)
            raise CheckpointError(
                f"checkpoint {info.url} was written for {key}={saved}, but this run has "
                f"{key}={expected}; start a new checkpoint.url, or {hint}")


def verify_whole(url: str, needed: dict[str, int]) -> None:
    """Refuse to commit unless every file of `needed` ({path relative to url: size}) is under
    `url` at least at that size.

    Writers to object stores have dropped data without an error; one listing of the
    checkpoint directory checks every file, in whichever format an engine wrote it.
    """
    fs, root = url_to_fs(url)
    fs.invalidate_cache(root)
    prefix = root.rstrip("/") + "/"
    sizes = {entry["name"].removeprefix(prefix): entry["size"]
             for entry in fs.find(root, detail=True).values()}
    bad = [f"{name} ({sizes.get(name, 'missing')} of {size} bytes)"
           for name, size in sorted(needed.items()) if sizes.get(name, -1) < size]
    if bad:
        raise CheckpointError(f"checkpoint {url} was not written whole, so it is not committed: "
                              f"{', '.join(bad[:5])}")


def rng_file(rank: int) -> str:
    """Where a rank's RNG states live inside a checkpoint directory (both engines)."""
    return f"rng/rank-{rank:05d}.pt"


def rng_state_bytes() -> bytes:
    """This process's torch (and CUDA) RNG states, serialised."""
    states = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    buf = io.BytesIO()
    torch.save(states, buf)
    return buf.getvalue()


def restore_rng_state(data: bytes) -> None:
    """Set this process's RNG states from `rng_state_bytes()` output."""
    states = torch.load(io.BytesIO(data), weights_only=True)
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
