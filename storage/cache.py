"""The node-local prefetch cache: remote shards copied once per node to local disk.

Every rank and every DataLoader worker on a node opens the same `NodeCache(cache_dir)`; they
coordinate only through files in that directory, so no process has to be the owner:

    <sha256>.bin             a verified shard, named by the sha256 index.json records for it
    <sha256>.bin.lock        "I am downloading it": created with O_EXCL, holds pid, host, time,
                             and the bytes it reserved under the limit
    <sha256>.bin.tmp.*       the download in progress; renamed into place only once verified
    .cache.lock              flock'd while the byte budget is counted and shards are evicted
    downloads.log            one JSON line per download, so a test (or a person) can see that
                             each shard was fetched once per node

A reader holds a shard with a shared `flock` on it (a `Pin`); eviction takes the exclusive
lock without blocking and skips what it cannot lock, so a shard in use is never removed, and
the kernel drops the pins of a process that dies. Least-recently-used is judged by mtime,
which every `get` and every pin release touches.

Naming cached files by their checksum means a cached file is trusted without hashing it
again: it was verified before it got that name.

No ranged reads of parts of a shard: a sample is only ever served from bytes whose sha256
was checked, so the first sample of a cold shard waits for the whole shard. The cache hides
that wait by fetching whole shards ahead of need (storage/prefetch.py); keep shards medium
sized (the default 4M tokens, 8 MiB) so that one fetch is short and many run in parallel.
A disk-full error while writing evicts every unpinned shard and retries once.

A download streams the GET once: each chunk is written to the temporary file and fed to
sha256 as it arrives, and the verified bytes stay in this process's memory (the last
`_FRESH_SHARDS` downloads), so the reader here that asked for the shard, or waited for this
process's prefetch of it, takes them (`take_fresh`) instead of mapping the file back. A reader
waiting on a download in its own process is woken when it ends, not at the next poll.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections import Counter, OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np

from storage.fs import join, retrying, url_to_fs
from storage.shards import DatasetIndex, ShardEntry, corrupt_sha_error, corrupt_size_error, missing_shard_error

log = logging.getLogger(__name__)

CHUNK_BYTES = 8 << 20  # read size of a download; the lock's mtime is refreshed after each chunk
DOWNLOADS_LOG = "downloads.log"
_FRESH_SHARDS = 4  # verified downloads kept in process memory until this process's reader takes them
_HOST = socket.gethostname()


def _touch(path: str) -> None:
    """Mark `path` used now (the LRU clock); it may have been evicted meanwhile."""
    try:
        os.utime(path)
    except FileNotFoundError:
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _FileLock:
    """An exclusive flock on one file, held for a `with` block (threads included: one fd each)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> "_FileLock":
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self.fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)


@dataclass
class Pin:
    """A reader's hold on a cached shard: a shared flock on an open fd of the file.

    Release it by `release()`, never by LOCK_UN: a DataLoader worker forked with the fd
    shares the lock with its parent, and only closing every copy ends the hold.
    """

    path: str
    fd: int

    def release(self) -> None:
        if self.fd >= 0:
            _touch(self.path)
            os.close(self.fd)
            self.fd = -1


class NodeCache:
    """A byte-limited, verified, shared cache of remote shards in `cache_dir` (local disk).

    `limit_bytes=0` means no limit. `lock_timeout_s` bounds how long a download may go without
    progress before another process takes its lock over (a dead pid on this host is taken
    over at once).
    """

    def __init__(self, cache_dir: str, limit_bytes: int = 0, lock_timeout_s: float = 300.0,
                 poll_interval_s: float = 0.005) -> None:
        if limit_bytes < 0:
            raise ValueError(f"cache limit_bytes must be >= 0 (0 = no limit), got {limit_bytes}")
        self.cache_dir = os.path.abspath(os.path.expanduser(cache_dir))
        self.limit_bytes = limit_bytes
        self.lock_timeout_s = lock_timeout_s
        self.poll_interval_s = poll_interval_s
        os.makedirs(self.cache_dir, exist_ok=True)
        self._pid = -1

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned DataLoader workers without this process's downloads and lock."""
        return {k: v for k, v in self.__dict__.items() if k not in ("_fresh", "_cond")} | {"_pid": -1}

    def _local(self) -> threading.Condition:
        """This process's lock over `_fresh`, notified when one of its downloads ends. Made on
        first use in each process: a forked worker must not inherit a lock a parent thread held."""
        if self._pid != os.getpid():
            self._pid, self._fresh, self._cond = os.getpid(), OrderedDict(), threading.Condition()
        return self._cond

    def __repr__(self) -> str:
        return f"NodeCache({self.cache_dir!r}, limit_bytes={self.limit_bytes})"

    def path_for(self, entry: ShardEntry) -> str:
        return os.path.join(self.cache_dir, f"{entry.sha256}.bin")

    # -- reading ---------------------------------------------------------------------------

    def get(self, index: DatasetIndex, entry: ShardEntry, prefetch: bool = False) -> str | None:
        """The local path of a verified copy of `entry`, downloading it if no process has.

        With `prefetch=True` this never waits for another process's download and never goes
        over the limit; it returns None instead, since the reader will ask again when it needs it.
        """
        final = self.path_for(entry)
        lock = final + ".lock"
        while True:
            if os.path.exists(final):
                _touch(final)
                return final
            nonce = uuid.uuid4().hex
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if prefetch:
                    return None
                self._wait_or_recover(lock, final)
                continue
            try:
                os.write(fd, self._owner(nonce, 0))
                os.close(fd)
                if os.path.exists(final):  # finished by another process just before our lock
                    continue
                size = entry.tokens * np.dtype(index.dtype).itemsize
                if not self._reserve(lock, nonce, size, final, prefetch):
                    return None
                self._download(index, entry, size, final, lock)
                return final
            finally:
                self._release(lock, nonce)
                with (done := self._local()):
                    done.notify_all()  # readers of this process waiting on the lock look again

    def take_fresh(self, entry: ShardEntry) -> bytes | None:
        """The verified bytes of `entry` if this process downloaded it lately, handed over once
        (the caller keeps them): a reader that has them needs no map of the cached file."""
        with self._local():
            return self._fresh.pop(entry.sha256, None)

    def pin(self, index: DatasetIndex, entry: ShardEntry, prefetch: bool = False) -> Pin | None:
        """`get` the shard and hold it so that eviction leaves it alone until `Pin.release()`.

        With `prefetch=True`, None where `get` gives up (see there).
        """
        expected = entry.tokens * np.dtype(index.dtype).itemsize
        while True:
            path = self.get(index, entry, prefetch=prefetch)
            if path is None:
                return None
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue  # evicted between get and open: fetch again
            fcntl.flock(fd, fcntl.LOCK_SH)
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same and os.fstat(fd).st_size == expected:
                return Pin(path, fd)
            os.close(fd)
            if same:  # a cached file of the wrong size was damaged on this disk: drop it
                log.warning("cached shard %s has the wrong size; fetching it again", path)
                self._try_evict(path)

    # -- what tests and benchmarks look at ---------------------------------------------------

    def usage_bytes(self) -> int:
        """Bytes of verified shards plus downloads in progress."""
        total = sum(size for _, size, _ in self._shards())
        for name in os.listdir(self.cache_dir):
            if ".bin.tmp." in name:
                try:
                    total += os.stat(os.path.join(self.cache_dir, name)).st_size
                except FileNotFoundError:
                    pass
        return total

    def downloads(self) -> Counter:
        """How many times each source URL was downloaded into this cache."""
        path = os.path.join(self.cache_dir, DOWNLOADS_LOG)
        if not os.path.exists(path):
            return Counter()
        with open(path) as f:
            return Counter(json.loads(line)["source"] for line in f if line.strip())

    # -- locks -----------------------------------------------------------------------------

    def _owner(self, nonce: str, reserved: int) -> bytes:
        return json.dumps({"pid": os.getpid(), "host": _HOST, "time": time.time(), "nonce": nonce,
                           "bytes": reserved}).encode()

    @staticmethod
    def _read_lock(lock: str) -> dict[str, Any] | None:
        """The lock's owner record; None while its creator has not written it yet."""
        try:
            with open(lock) as f:
                return json.loads(f.read() or "null")
        except (FileNotFoundError, json.JSONDecodeError):
            return None

    def _stale(self, lock: str) -> bool:
        try:
            age = time.time() - os.stat(lock).st_mtime
        except FileNotFoundError:
            return False
        if age > self.lock_timeout_s:
            return True
        owner = self._read_lock(lock)
        return owner is not None and owner.get("host") == _HOST and not _pid_alive(int(owner["pid"]))

    def _wait_or_recover(self, lock: str, final: str) -> None:
        """Another process is downloading: wait a poll interval, or take over a dead one's lock."""
        if not self._stale(lock):
            # Short: a reader that catches up with the prefetch of its next shard waits here,
            # and an 8 MiB shard arrives in tens of ms; a stat and a read per poll cost ~30 us.
            # A download by this process's own prefetch threads wakes it at once (see get).
            with (done := self._local()):
                done.wait(self.poll_interval_s)
            return
        with _FileLock(os.path.join(self.cache_dir, ".cache.lock")):
            if not self._stale(lock):  # re-judged under the cache lock: another waiter may have won
                return
            owner = self._read_lock(lock)
            log.warning("recovering stale cache lock %s (owner %s)", lock, owner)
            prefix = os.path.basename(final) + ".tmp."
            for name in os.listdir(self.cache_dir):
                if name.startswith(prefix):
                    _unlink(os.path.join(self.cache_dir, name))
            _unlink(lock)

    def _release(self, lock: str, nonce: str) -> None:
        owner = self._read_lock(lock)
        if owner is None or owner.get("nonce") == nonce:
            _unlink(lock)

    # -- byte budget -----------------------------------------------------------------------

    def _shards(self) -> list[tuple[str, int, float]]:
        """(path, size, mtime) of every verified shard in the cache."""
        out = []
        for name in os.listdir(self.cache_dir):
            if name.endswith(".bin") and len(name) == 68:
                path = os.path.join(self.cache_dir, name)
                try:
                    st = os.stat(path)
                except FileNotFoundError:
                    continue
                out.append((path, st.st_size, st.st_mtime))
        return out

    def _reserved(self, own_lock: str) -> int:
        """Bytes other processes' downloads have reserved (their lock files)."""
        total = 0
        for name in os.listdir(self.cache_dir):
            path = os.path.join(self.cache_dir, name)
            if name.endswith(".bin.lock") and path != own_lock:
                total += int((self._read_lock(path) or {}).get("bytes", 0))
        return total

    def _reserve(self, lock: str, nonce: str, size: int, final: str, prefetch: bool) -> bool:
        """Evict least-recently-used unpinned shards until `size` more bytes fit; record them.

        Counting and evicting happen under the cache lock, so two downloads cannot both count
        the same free bytes. A prefetch that does not fit gives up; a read that does not fit
        because everything is pinned goes over the limit with a warning rather than deadlock.
        """
        if not self.limit_bytes:
            return True
        with _FileLock(os.path.join(self.cache_dir, ".cache.lock")):
            shards = sorted(self._shards(), key=lambda s: s[2])
            used = sum(s[1] for s in shards) + self._reserved(lock)
            for path, shard_size, _ in shards:
                if used + size <= self.limit_bytes:
                    break
                if self._try_evict(path):
                    used -= shard_size
            if used + size > self.limit_bytes:
                if prefetch:
                    return False
                log.warning("node cache %s: %d bytes in use by pinned shards and downloads, and %s "
                            "needs %d more; going over cache_limit_bytes=%d until readers let go",
                            self.cache_dir, used, os.path.basename(final), size, self.limit_bytes)
            with open(lock, "wb") as f:
                f.write(self._owner(nonce, size))
        return True

    def _try_evict(self, path: str) -> bool:
        """Remove `path` unless a reader holds it (a shared flock we cannot break)."""
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        try:
            os.unlink(path)
            log.debug("evicted %s", path)
            return True
        finally:
            os.close(fd)

    def _evict_all_unpinned(self) -> None:
        with _FileLock(os.path.join(self.cache_dir, ".cache.lock")):
            for path, _, _ in sorted(self._shards(), key=lambda s: s[2]):
                self._try_evict(path)

    # -- download --------------------------------------------------------------------------

    def _download(self, index: DatasetIndex, entry: ShardEntry, size: int, final: str, lock: str) -> None:
        """Fetch to a temporary name, verify size and sha256, rename into place, log it."""
        source = join(index.url, entry.file)
        tmp = f"{final}.tmp.{_HOST}.{os.getpid()}.{threading.get_ident()}"
        start = time.monotonic()
        for attempt in (1, 2):
            try:
                got, digest, data = retrying(lambda: self._fetch(source, tmp, lock), what=f"download {source}")
                break
            except FileNotFoundError:
                _unlink(tmp)
                raise missing_shard_error(source) from None
            except OSError as e:
                _unlink(tmp)
                if e.errno not in (errno.ENOSPC, errno.EDQUOT):  # disk full, or the user's quota
                    raise
                what = "out of disk space" if e.errno == errno.ENOSPC else "over the disk quota"
                if attempt == 2:
                    raise OSError(e.errno, (
                        f"node cache {self.cache_dir} is {what} fetching {source} ({size} bytes), "
                        f"even after evicting every shard no reader holds; free space on that disk, "
                        f"put the cache on the node's NVMe (TRAIN_HARNESS_CACHE or storage.cache_dir) or "
                        f"lower storage.cache_limit_bytes")) from None
                log.warning("node cache %s: %s fetching %s; evicting unpinned shards and retrying",
                            self.cache_dir, what, source)
                self._evict_all_unpinned()
        if got != size:
            _unlink(tmp)
            raise corrupt_size_error(source, got, entry, np.dtype(index.dtype))
        if digest != entry.sha256:
            _unlink(tmp)
            raise corrupt_sha_error(source, digest, entry)
        os.rename(tmp, final)
        with self._local():
            self._fresh[entry.sha256] = data
            while len(self._fresh) > _FRESH_SHARDS:  # downloads no reader of this process asked for
                self._fresh.popitem(last=False)
        record = {"source": source, "bytes": size, "host": _HOST, "pid": os.getpid(), "time": time.time(),
                  "seconds": round(time.monotonic() - start, 4)}
        fd = os.open(os.path.join(self.cache_dir, DOWNLOADS_LOG), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())  # one O_APPEND write: lines never interleave
        finally:
            os.close(fd)
        log.debug("cached %s (%d bytes) as %s", source, size, final)

    @staticmethod
    def _fetch(source: str, tmp: str, lock: str) -> tuple[int, str, bytes]:
        """Stream `source` into `tmp` from the start, hashing each chunk as it arrives:
        (bytes, sha256, the bytes themselves). Restartable by a retry."""
        fs, path = url_to_fs(source)
        digest = hashlib.sha256()
        chunks = []
        with fs.open(path, "rb") as src, open(tmp, "wb") as out:
            while chunk := src.read(CHUNK_BYTES):
                out.write(chunk)
                digest.update(chunk)  # hashlib lets go of the GIL on big buffers
                chunks.append(chunk)
                _touch(lock)  # progress: keeps the lock from looking stale to waiters
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        return len(data), digest.hexdigest(), data


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def cache_from_config(storage_cfg: Any) -> NodeCache | None:
    """The node cache a StorageConfig asks for, or None when `cache_dir` is empty."""
    if not storage_cfg.cache_dir:
        return None
    return NodeCache(storage_cfg.cache_dir, int(storage_cfg.cache_limit_bytes))
