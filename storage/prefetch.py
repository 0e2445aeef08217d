"""Background fetching of the shards a reader will need next, into the node cache.

The dataset knows its own order, so it tells a `Prefetcher` which shards it needs next: on
entering a block of the block shuffle (storage/order.py), the block's shards and the first
shards after it; daemon threads then ask the `NodeCache` for them while the reader works. Every process on the node may ask for the same shards: the cache's lock
files make sure each is downloaded once, and a prefetch never waits on another process's
download or pushes the cache over its limit.

A prefetched shard stays pinned by the process that asked for it until that process has
moved past it (it is no longer among the shards asked for next). Otherwise one process's
prefetch could evict, as least recently used, a shard another process fetched ahead but has
not read yet, and the node would download it twice.

Threads are started lazily in the process that first asks, so an object built before
DataLoader forks its workers starts fresh threads in each worker instead of carrying dead
ones across the fork.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any

from storage.cache import NodeCache, Pin
from storage.shards import DatasetIndex, ShardEntry

log = logging.getLogger(__name__)


class Prefetcher:
    """`ahead(index, entries)` has `workers` background threads fetch and pin those shards."""

    def __init__(self, cache: NodeCache, workers: int = 2) -> None:
        if workers < 1:
            raise ValueError(f"fetch_workers must be >= 1, got {workers}")
        self.cache, self.workers = cache, workers
        self._pid = -1
        self._queue: queue.Queue | None = None
        self._lock = threading.Lock()
        self._wanted: set[tuple[str, str]] = set()
        self._pins: dict[tuple[str, str], Pin] = {}

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned DataLoader workers without its threads, queue and pins."""
        return {"cache": self.cache, "workers": self.workers}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["cache"], state["workers"])

    def _start(self) -> queue.Queue:
        if self._pid != os.getpid():  # first use in this process (maybe a forked worker)
            for pin in self._pins.values():  # the parent's fds, copied by fork: the parent keeps its own
                pin.release()
            self._pid, self._queue, self._lock = os.getpid(), queue.Queue(), threading.Lock()
            self._wanted, self._pins = set(), {}
            for i in range(self.workers):
                threading.Thread(target=self._run, args=(self._queue,), name=f"shard-prefetch-{i}",
                                 daemon=True).start()
        return self._queue

    def ahead(self, index: DatasetIndex, entries: list[ShardEntry]) -> None:
        """Fetch `entries` (nearest first) into the cache in the background; let go of the
        shards asked for before that are no longer among them."""
        q = self._start()
        wanted = {(index.url, e.file) for e in entries}
        with self._lock:
            for key in self._wanted - wanted:
                pin = self._pins.pop(key, None)
                if pin is not None:
                    pin.release()
            new = [e for e in entries if (index.url, e.file) not in self._wanted]
            self._wanted = wanted
        for entry in new:
            q.put((index, entry))

    def _run(self, q: queue.Queue) -> None:
        while True:
            index, entry = q.get()
            key = (index.url, entry.file)
            with self._lock:
                if key not in self._wanted:
                    continue
            try:
                pin = self.cache.pin(index, entry, prefetch=True)
            except Exception as e:  # noqa: BLE001 - the reader meets the same error when it reads
                log.debug("prefetch of %s failed (the read will report it): %s", entry.file, e)
                continue
            if pin is None:
                continue
            with self._lock:
                if key in self._wanted and key not in self._pins:
                    self._pins[key] = pin
                    continue
            pin.release()
