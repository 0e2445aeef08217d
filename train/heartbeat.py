"""Heartbeats: which rank stopped answering, and after which step.

A collective that waits for a rank that is frozen, dead or stuck fails on the other ranks
after the process group's timeout (`trainer.collective_timeout_s`), with an error that names
no rank. To say which one, every rank publishes a beat to the process group's key-value store
from a daemon thread every `trainer.heartbeat_interval_s`: a counter, its host, its pid and its
node's address on the training network (host names may all read alike, or point elsewhere).
When a collective fails, `Heartbeat.stalled()` reads every rank's beat twice, a few intervals
apart: a rank whose counter did not move is not answering. Counters, not clocks, so the nodes'
clocks need not agree.

What the report guarantees about the step, and why it comes from the collective, not the beat.
The report says "rank R stopped answering after step P (every rank had finished step P ...)",
where P is the last step the reporting rank finished (`Trainer.progress.step`) when its
collective failed. That is exact: every rank issues the same collectives in the same order, and
a collective completes on one rank only with every member's part; the reporting rank finished
step P by getting through the step's memory-peaks all-reduce (`Trainer._peaks_over_ranks`), which
every rank joins only after its optimizer step, so every rank had finished step P. It is also the most the report can
promise: R may have got further into step P+1 before it froze. A step published in the beat
could not say this: the beat thread publishes after the step finishes, so a rank frozen in
between is reported one step behind (it happened in CI: "2" for a rank whose step 3 the
metrics already showed). Publishing it from the training thread before the next collective
would make it exact only at the price of one store round-trip per step (to the rendezvous host,
across the network on a cluster) on the training thread, which is what the beat thread exists
to avoid. So the beat carries only liveness and identity, and the step comes from where the
reporting rank stands, which the loop already knows.

The beat costs one small store write per rank per `trainer.heartbeat_interval_s`, made by the
daemon thread. It also carries the rank's own time per step over its last metrics window, which
rank 0 reads at log steps (one store read) to name stragglers (train/stragglers.py); apart from
that, and the Prometheus exporters' poller threads (train/prometheus.py: each node's own ranks
and rank 0, a few keys every half interval), nothing is read until something has already gone wrong.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist

from train.distributed import node_address

log = logging.getLogger(__name__)

KEY = "train-harness/heartbeat/{rank}"


class RankFailure(RuntimeError):
    """A collective failed because another rank stopped answering (or died)."""


@dataclass(frozen=True)
class Beat:
    rank: int
    count: int
    host: str
    pid: int
    address: str
    own_step_s: float | None = None  # its own time per step over its last metrics window (train/stragglers.py)
    through_step: int = 0  # the last step of that window


def rendezvous_store() -> Any | None:
    """The default process group's store, if this torch exposes it (a private accessor)."""
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        return _get_default_store()
    except Exception:  # noqa: BLE001 - no store, no heartbeat: the timeout still applies
        return None


class Heartbeat:
    def __init__(self, rank: int, world_size: int, interval_s: float) -> None:
        self.rank, self.world_size, self.interval_s = rank, world_size, interval_s
        self._count = 0
        self._who = {"host": socket.gethostname(), "pid": os.getpid(), "address": node_address()}
        self._store = rendezvous_store() if dist.is_initialized() and world_size > 1 and interval_s > 0 else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._own: dict[str, Any] = {}

    @property
    def active(self) -> bool:
        """Whether beats are sent (several processes, an interval, a store)."""
        return self._store is not None

    def report(self, own_step_s: float, through_step: int) -> None:
        """This rank's own time per step up to `through_step`, sent with the next beat."""
        self._own = {"own_step_s": own_step_s, "through_step": through_step}

    def start(self) -> Heartbeat:
        if self._store is not None:
            self._beat()  # one at once, so every rank has a beat before the first collective
            self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _beat(self) -> None:
        """Called by start() before the thread exists, then only by the thread."""
        self._count += 1
        value = {"count": self._count, **self._who, **self._own}
        self._store.set(KEY.format(rank=self.rank), json.dumps(value))

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._beat()
            except Exception as exc:  # noqa: BLE001 - the store's host is gone: the loop will say so
                log.debug("heartbeat not sent: %s", exc)

    def read(self) -> dict[int, Beat]:
        """Every rank's latest beat (one store read)."""
        return self._read()

    def _read(self) -> dict[int, Beat]:
        return read_beats(self._store, range(self.world_size))

    def stalled(self) -> list[Beat]:
        """The ranks whose beat did not move over about three intervals (their last beat)."""
        before = self._read()
        time.sleep(3 * self.interval_s)
        after = self._read()
        return [after[r] for r in sorted(after) if r != self.rank and after[r].count == before[r].count]

    def explain(self, error: BaseException, finished_step: int, timeout_s: float) -> RankFailure:
        """A RankFailure naming the ranks that stopped answering, for a collective's `error`
        raised after this rank finished step `finished_step`."""
        where = f"rank {self.rank} gave up waiting in a collective after step {finished_step}"
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
        names = "; ".join(f"rank {b.rank} (host {b.host}, pid {b.pid}) at {b.address}" for b in stalled)
        return RankFailure(f"{names} stopped answering after step {finished_step} (every rank had "
                           f"finished step {finished_step}). {where}: no answer within "
                           f"trainer.collective_timeout_s={timeout_s:g} ({type(error).__name__}). "
                           f"Restart from the last checkpoint; check that node if it happens again")


def read_beats(store: Any, ranks: Iterable[int]) -> dict[int, Beat]:
    """The latest beats of `ranks` (one store read; it waits for a rank that has sent none yet:
    `store.check` first where that matters, as train/prometheus.py does)."""
    ranks = list(ranks)
    beats = {}
    for rank, raw in zip(ranks, store.multi_get([KEY.format(rank=r) for r in ranks]), strict=True):
        v = json.loads(raw)
        beats[rank] = Beat(rank, v["count"], v["host"], v["pid"], v.get("address", "?"),
                           v.get("own_step_s"), v.get("through_step", 0))
    return beats


def is_collective_failure(exc: BaseException) -> bool:
    """A failed or timed-out collective (gloo or NCCL), as opposed to a bug in the step."""
    names = {c.__name__ for c in type(exc).__mro__}
    if names & {"DistError", "DistBackendError", "DistNetworkError", "DistStoreError"}:
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Timed out", "timed out", "Connection closed by peer", "Connection reset",
                            "ProcessGroupGloo", "NCCL"))
