"""Heartbeats: which rank stopped answering, and at which step.

A collective that waits for a rank that is frozen, dead or stuck fails on the other ranks
after the process group's timeout (`trainer.collective_timeout_s`), with an error that names
no rank. To say which one, every rank publishes a beat to the process group's key-value store
from a daemon thread: a counter, the last step it finished, its host and pid. When a
collective fails, `Heartbeat.stalled()` reads every rank's beat twice, a few intervals apart:
a rank whose counter did not move is not answering. Counters, not clocks, so the nodes'
clocks need not agree.

The beat costs one small store write per rank per step and per `trainer.heartbeat_interval_s`,
made by the daemon thread (the training step only sets a number and wakes it); nothing is read
until something has already gone wrong.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

log = logging.getLogger(__name__)

KEY = "train-harness/heartbeat/{rank}"


class RankFailure(RuntimeError):
    """A collective failed because another rank stopped answering (or died)."""


@dataclass(frozen=True)
class Beat:
    rank: int
    count: int
    step: int
    host: str
    pid: int


def _store() -> Any | None:
    """The default process group's store, if this torch exposes it (a private accessor)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store, no heartbeat: the timeout still applies
        return None


class Heartbeat:
    def __init__(self, rank: int, world_size: int, interval_s: float) -> None:
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self._step = 0
        self._count = 0
        self._who = {"host": socket.gethostname(), "pid": os.getpid()}
        self._store = _store() if dist.is_initialized() and world_size > 1 and interval_s > 0 else None
        self._stop = threading.Event()
        self._stepped = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "Heartbeat":
        if self._store is not None:
            self._beat()  # one at once, so every rank has a beat before the first collective
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._stepped.set()

    @property
    def step(self) -> int:
        return self._step

    @step.setter
    def step(self, step: int) -> None:
        """The step this rank just finished; the beat thread publishes it at once, so a
        report names it exactly."""
        self._step = step
        self._stepped.set()

    def _beat(self) -> None:
        """Called by start() before the thread exists, then only by the thread."""
        self._count += 1
        value = {"count": self._count, "step": self._step, **self._who}
        self._store.set(KEY.format(rank=self.rank), json.dumps(value))

    def _run(self) -> None:
        while True:
            self._stepped.wait(self.interval_s)  # a new step, or the interval passed
            self._stepped.clear()
            if self._stop.is_set():
                return
            try:
                self._beat()
            except Exception as exc:  # noqa: BLE001 - the store's host is gone: the loop will say so
                log.debug("heartbeat not sent: %s", exc)

    def _read(self) -> dict[int, Beat]:
        keys = [KEY.format(rank=r) for r in range(self.world_size)]
        values = self._store.multi_get(keys)
        beats = {}
        for rank, raw in enumerate(values):
            v = json.loads(raw)
            beats[rank] = Beat(rank, v["count"], v["step"], v["host"], v["pid"])
        return beats

    def stalled(self) -> list[Beat]:
        """The ranks whose beat did not move over about three intervals (their last beat)."""
        before = self._read()
        time.sleep(3 * self.interval_s)
        after = self._read()
        return [after[r] for r in sorted(after) if r != self.rank and after[r].count == before[r].count]

    def explain(self, error: BaseException, step: int, timeout_s: float) -> RankFailure:
        """A RankFailure naming the ranks that stopped answering, for a collective's `error`."""
        where = f"rank {self.rank} gave up waiting in a collective at step {step}"
        if self._store is None:
            return RankFailure(f"{where} ({error}); no heartbeats to say which rank stopped "
                               f"(trainer.heartbeat_interval_s=0 or one process)")
        try:
            stalled = self.stalled()
        except Exception as exc:  # noqa: BLE001 - the store lives with rank 0's node or torchrun
            return RankFailure(f"{where} ({error}); the heartbeat store is unreachable too "
                               f"({type(exc).__name__}: {exc}): the node that hosts it (torchrun's "
                               f"rendezvous host) has likely failed")
        if not stalled:
            return RankFailure(f"{where}: {error}; every rank still sends heartbeats, so one is "
                               f"stuck inside the program (e.g. waiting for data or a "
                               f"different collective), not frozen or dead")
        names = "; ".join(f"rank {b.rank} (host {b.host}, pid {b.pid}) stopped answering, its last "
                          f"finished step was {b.step}" for b in stalled)
        return RankFailure(f"{names}. {where} after trainer.collective_timeout_s={timeout_s:g} "
                           f"({type(error).__name__}). Restart from the last checkpoint; check that "
                           f"node if it happens again")


def is_collective_failure(exc: BaseException) -> bool:
    """A failed or timed-out collective (gloo or NCCL), as opposed to a bug in the step."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset",
                            "ProcessGroupGloo", "NCCL"))
