"""Mixtures of datasets: which dataset each position of the run's order belongs to.

Mixtures. `MixedOrder` deals global positions to datasets by a fixed pattern: with the
weights as integer shares c_s of a period T (the smallest that states them exactly), source s's
i-th position in a period sits at (i + 1/2) T / c_s, ties to the earlier source. Every run of n
consecutive positions then holds n w_s samples of source s to within about one, so each
micro-batch and each step has the configured proportions, and every period of T holds them
exactly. Sample k of the global order belongs to source f(k), a pure function of k and the
weights, at that source's own position (how many of the positions before k it was dealt):
each source runs through its own epochs. A source capped at `max_epochs` leaves the mixture
once it has served that many epochs, and the others share its place in their relative weights
(a new segment of the pattern starts there), since a cap limits how often data repeats, not
how long the run is; with every source capped, the data ends when the last one is used up.

`Source` names one dataset of data.sources with its weight and epoch cap; `mixed_order` checks
the sources (one tokenizer, room in the node cache for their blocks) and builds their orders.
"""

from __future__ import annotations

import bisect
import logging
import math
import posixpath
from dataclasses import dataclass
from fractions import Fraction
from typing import Sequence

import numpy as np
import torch

from storage.cache import NodeCache
from storage.order import DEFAULT_BLOCK_SHARDS, SampleOrder
from storage.shards import DatasetError, DatasetIndex, read_index

log = logging.getLogger(__name__)

MAX_PERIOD = 1_000_000  # positions of the mixing pattern; weights that need more are rounded to it


def as_index(dataset: str | DatasetIndex) -> DatasetIndex:
    """A dataset URL or its index already read: callers that hold the index pass it, so
    index.json is fetched once per process, not once per reader."""
    return dataset if isinstance(dataset, DatasetIndex) else read_index(dataset)


@dataclass(frozen=True)
class Source:
    """One dataset of a weighted mixture: `name` (metrics, logs, checkpoints), a prepared
    dataset's URL or index, its `weight` (any positive scale) and a cap on the epochs it
    serves (0 = none: it repeats as long as the run goes)."""

    name: str
    dataset: str | DatasetIndex
    weight: float = 1.0
    max_epochs: int = 0


def as_sources(data: "str | DatasetIndex | Sequence[Source]") -> list[Source]:
    """A dataset URL or index is a mixture of one source, named after its directory."""
    if isinstance(data, (str, DatasetIndex)):
        url = data if isinstance(data, str) else data.url
        return [Source(posixpath.basename(url.rstrip("/")) or url, data)]
    return list(data)


def check_sources(sources: list[Source], indexes: list[DatasetIndex]) -> None:
    """Refuse a mixture that cannot be one token stream: unnamed, duplicate or unweighted
    sources, or datasets made with different tokenizers."""
    if not sources:
        raise DatasetError("data.sources is empty: give at least one {name, url, weight}, or set data.url")
    seen: dict[str, int] = {}
    for i, s in enumerate(sources):
        where = f"data.sources[{i}] ({s.name})"
        if not s.name:
            raise DatasetError(f"data.sources[{i}] has no name: give every source one (source_tokens in "
                               f"metrics.jsonl, the logs and checkpoints know it by its name)")
        if s.name in seen:
            raise DatasetError(f"data.sources[{seen[s.name]}] and [{i}] are both named {s.name!r}: give "
                               f"every source its own name")
        seen[s.name] = i
        if not (isinstance(s.weight, (int, float)) and math.isfinite(s.weight) and s.weight > 0):
            raise DatasetError(f"{where}: weight must be a positive number, got {s.weight!r}")
        if int(s.max_epochs) < 0:
            raise DatasetError(f"{where}: max_epochs must be >= 0 (0 = no cap), got {s.max_epochs}")
    first, tok = sources[0], indexes[0].tokenizer
    for s, index in zip(sources[1:], indexes[1:]):
        other = index.tokenizer
        if other.fingerprint != tok.fingerprint:
            raise DatasetError(
                f"data.sources mixes tokenizers: {first.name} ({indexes[0].url}) was made with tokenizer "
                f"{tok.name} (fingerprint {tok.fingerprint[:12]}), {s.name} ({index.url}) with tokenizer "
                f"{other.name} (fingerprint {other.fingerprint[:12]}); the same token ids would mean other "
                f"text. Prepare every source with the same --tokenizer")


def check_cache_room(orders: list[SampleOrder], names: list[str], cache: NodeCache | None) -> None:
    """Refuse a block shuffle whose blocks do not fit the node cache: it holds two blocks of
    every remote source at once (the one being read and the next, which the node's readers
    enter a few steps apart) and the shards prefetched after them."""
    need = sum(o.cache_bytes_needed for o in orders)
    if cache is None or not cache.limit_bytes or need <= cache.limit_bytes:
        return
    parts = ", ".join(f"{n} ({o.index.url}) {_size(o.cache_bytes_needed)}"
                      for n, o in zip(names, orders) if o.cache_bytes_needed)
    block = orders[0].block_shards
    raise DatasetError(
        f"data.shuffle_block_shards={block} needs two blocks of {block} shards of every remote source, and "
        f"the storage.prefetch_shards after them, in the node cache at once: {parts}; {_size(need)} in all, more than "
        f"storage.cache_limit_bytes={cache.limit_bytes} ({_size(cache.limit_bytes)}). Lower "
        f"data.shuffle_block_shards or raise storage.cache_limit_bytes")


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} B"


def mixed_order(data: "str | DatasetIndex | Sequence[Source]", split: str, seq_len: int, seed: int, *,
                block_shards: int = DEFAULT_BLOCK_SHARDS, cache: NodeCache | None = None,
                prefetch_shards: int = 0, fetch_workers: int = 2, on_corrupt_shard: str = "error",
                caps: bool = True) -> MixedOrder:
    """The order of `split` over every source (a split a source lacks: see eval_batches);
    `caps=False` ignores max_epochs (held-out batches)."""
    sources = as_sources(data)
    indexes = [as_index(s.dataset) for s in sources]
    check_sources(sources, indexes)
    orders = []
    for s, index in zip(sources, indexes):
        own = split
        if split == "val" and not index.has_split("val"):
            log.warning("dataset %s has no val split; evaluating on train samples, so the eval loss "
                        "is not held out (prepare with --val-fraction > 0)", index.url)
            own = "train"
        orders.append(SampleOrder(index, own, seq_len, seed, block_shards=block_shards, cache=cache,
                                  prefetch_shards=prefetch_shards, fetch_workers=fetch_workers,
                                  on_corrupt_shard=on_corrupt_shard))
    names = [s.name for s in sources]
    check_cache_room(orders, names, cache)
    return MixedOrder(orders, names, [s.weight for s in sources],
                      [s.max_epochs if caps else 0 for s in sources])


def shares(weights: list[float]) -> list[int]:
    """Integer shares of one period of the mixing pattern, in the proportions of `weights`:
    exact for weights as written (decimals: 0.7, 0.2, 0.1 -> 7, 2, 1); where that takes more
    than MAX_PERIOD positions, rounded to MAX_PERIOD (largest remainders, each at least 1)."""
    exact = [Fraction(repr(float(w))) for w in weights]
    total = sum(exact)
    parts = [w / total for w in exact]
    period = math.lcm(*(p.denominator for p in parts))
    if period <= MAX_PERIOD:
        return [int(p * period) for p in parts]
    scaled = [p * MAX_PERIOD for p in parts]
    out = [max(1, math.floor(s)) for s in scaled]
    by_remainder = sorted(range(len(parts)), key=lambda i: scaled[i] - math.floor(scaled[i]), reverse=True)
    for i in by_remainder[:max(0, MAX_PERIOD - sum(out))]:
        out[i] += 1
    log.info("data.sources weights %s need a mixing period over %d samples; rounded to shares %s of %d",
             list(weights), MAX_PERIOD, out, sum(out))
    return out


class Interleave:
    """Positions 0, 1, 2, ... dealt to sources with integer `shares` of each period, evenly:
    source s's i-th position of a period sits at (i + 1/2) / shares[s] of it (ties: lower s)."""

    def __init__(self, share: list[int]) -> None:
        self.share = np.array(share, dtype=np.int64)
        self.period = int(self.share.sum())
        when = np.concatenate([(2 * np.arange(c) + 1) / (2 * c) for c in share])
        source = np.repeat(np.arange(len(share)), share)
        rank = np.concatenate([np.arange(c) for c in share])
        by_time = np.lexsort((source, when))
        self.pattern, self.rank = source[by_time], rank[by_time]
        self.slots = [np.flatnonzero(self.pattern == s) for s in range(len(share))]

    def deal(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(source, that source's index) of each position in `k`."""
        q, r = np.divmod(k, self.period)
        source = self.pattern[r]
        return source, q * self.share[source] + self.rank[r]

    def taken(self, source: int, k: int) -> int:
        """How many of positions 0 .. k-1 go to `source`."""
        q, r = divmod(k, self.period)
        return q * int(self.share[source]) + int(np.searchsorted(self.slots[source], r))

    def position_of(self, source: int, i: int) -> int:
        """The position of `source`'s i-th sample."""
        q, r = divmod(i, int(self.share[source]))
        return q * self.period + int(self.slots[source][r])


@dataclass(frozen=True)
class _Segment:
    """Positions start .. end-1 (end None: for ever) dealt to the `active` sources by `deal`."""

    start: int
    end: int | None
    bases: tuple[int, ...]  # every source's own position at `start`
    active: tuple[int, ...]
    deal: Interleave


class MixedOrder:
    """Several datasets' SampleOrders as one order of global positions (see the module docstring).

    `start` and `bases` place the first segment: the global position where these weights took
    over and each source's own position there (a run that changed its weights on resume).
    """

    def __init__(self, orders: list[SampleOrder], names: list[str], weights: list[float],
                 max_epochs: list[int], *, start: int = 0, bases: list[int] | None = None) -> None:
        self.orders, self.names = orders, names
        self.weights, self.max_epochs = [float(w) for w in weights], [int(m) for m in max_epochs]
        self.seq_len = orders[0].seq_len
        self.dtype = np.result_type(*(o.dtype for o in orders))
        self.index = orders[0].index
        self.num_samples = sum(o.num_samples for o in orders)
        self.start, self.bases = start, list(bases or [0] * len(orders))
        self._plan(self.start, self.bases)

    def _plan(self, start: int, bases: list[int]) -> None:
        caps = [m * o.num_samples if m else None for m, o in zip(self.max_epochs, self.orders)]
        self.segments: list[_Segment] = []
        while True:
            active = [i for i, cap in enumerate(caps) if cap is None or bases[i] < cap]
            if not active:
                break
            deal = Interleave(shares([self.weights[i] for i in active]))
            ends = [start + deal.position_of(j, caps[i] - bases[i] - 1) + 1
                    for j, i in enumerate(active) if caps[i] is not None]
            end = min(ends) if ends else None
            self.segments.append(_Segment(start, end, tuple(bases), tuple(active), deal))
            if end is None:
                break
            bases = [bases[i] + (deal.taken(active.index(i), end - start) if i in active else 0)
                     for i in range(len(bases))]
            start = end
        self.end = None if self.segments and self.segments[-1].end is None else start
        self._starts = [s.start for s in self.segments]

    def _segment(self, position: int) -> _Segment:
        if self.end is not None and position >= self.end:
            raise DatasetError(
                f"every source of data.sources has served its max_epochs ({self.describe_caps()}) "
                f"after {self.end} samples; raise a max_epochs (0 = no cap) or lower trainer.max_steps")
        if position < self.start:
            raise ValueError(f"position {position} is before {self.start}, where this order starts")
        return self.segments[bisect.bisect_right(self._starts, position) - 1]

    def describe_caps(self) -> str:
        return ", ".join(f"{n} {m}" for n, m in zip(self.names, self.max_epochs) if m)

    def taken(self, position: int) -> list[int]:
        """Each source's own position at global `position`: the samples it served before it."""
        if self.end is not None and position >= self.end:
            if not self.segments:
                return list(self.bases)
            position, seg = self.end, self.segments[-1]
        else:
            seg = self._segment(position)
        within = position - seg.start
        out = list(seg.bases)
        for j, i in enumerate(seg.active):
            out[i] += seg.deal.taken(j, within)
        return out

    def left_between(self, a: int, b: int) -> list[str]:
        """Sources whose cap ended their part in the mixture at a position in (a, b]."""
        names = []
        for seg, after in zip(self.segments, self.segments[1:] + [None]):
            if seg.end is not None and a < seg.end <= b:
                still = set(after.active) if after else set()
                names += [self.names[i] for i in seg.active if i not in still]
        return names

    def fill(self, start: int, out: np.ndarray) -> None:
        """Write global samples start .. start+len(out)-1 into `out` [n, seq_len+1]."""
        if len(self.orders) == 1 and self.end is None and self.bases[0] == self.start:
            self.orders[0].fill(start, out)  # one source: its positions are the global ones
            return
        row, size = 0, len(out)
        while row < size:
            seg = self._segment(start + row)
            n = size - row if seg.end is None else min(size - row, seg.end - start - row)
            k = np.arange(start + row - seg.start, start + row - seg.start + n)
            source, index = seg.deal.deal(k)
            for j, i in enumerate(seg.active):
                rows = np.flatnonzero(source == j)
                if rows.size:  # a source's indices over consecutive positions are consecutive
                    part = np.empty((rows.size, self.seq_len + 1), dtype=self.orders[i].dtype)
                    self.orders[i].fill(seg.bases[i] + int(index[rows[0]]), part)
                    out[row + rows] = part
            row += n

    def sources_of(self, start: int, size: int) -> np.ndarray:
        """The source (an index into `names`) of global samples start .. start+size-1."""
        out = np.empty(size, dtype=np.int64)
        row = 0
        while row < size:
            seg = self._segment(start + row)
            n = size - row if seg.end is None else min(size - row, seg.end - start - row)
            source, _ = seg.deal.deal(np.arange(start + row - seg.start, start + row - seg.start + n))
            out[row:row + n] = np.asarray(seg.active)[source]
            row += n
        return out

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Samples start .. start+size-1 as an int64 tensor [size, seq_len+1]."""
        out = np.empty((size, self.seq_len + 1), dtype=self.dtype)
        self.fill(start, out)
        return torch.from_numpy(out.astype(np.int64))

    @property
    def skipped(self) -> dict[str, str]:
        """Skipped shard files (prefixed by the source's name when there are several) -> why."""
        if len(self.orders) == 1:
            return dict(self.orders[0].skipped)
        return {f"{n}/{f}": why for n, o in zip(self.names, self.orders) for f, why in o.skipped.items()}

    def close(self) -> None:
        for o in self.orders:
            o.close()
