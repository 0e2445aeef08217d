"""The global sample order: a pure function of (seed, epoch, position), never of the world size.

A sample is a window of seq_len+1 tokens (seq_len inputs, seq_len shifted targets) at stride
seq_len inside one shard; windows never cross shards. Epoch e visits the shards in a
permutation seeded by (seed, e), and each shard's windows in a permutation seeded by
(seed, e, shard). `SampleOrder` reads the shards (through the node cache when one is given)
and turns positions into tokens; storage/dataset.py splits positions over ranks and steps.

A corrupt or missing shard stops the run, naming it, unless `on_corrupt_shard="skip"`. Then a
sample whose position falls in a bad shard is replaced by the sample at the same window index
(modulo its length) of the next readable shard in that epoch's shard order. Positions in
good shards keep their samples, every batch keeps its size, and the rule needs no
communication: each rank that meets the bad shard substitutes the same way, so the ranks
still agree on what each position means. The substitutes are seen twice in that epoch.
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import numpy as np
import torch

from storage.cache import NodeCache
from storage.fs import is_local, url_to_fs
from storage.prefetch import Prefetcher
from storage.shards import CorruptShardError, DatasetError, DatasetIndex, MissingShardError, read_shard

log = logging.getLogger(__name__)

ON_CORRUPT_SHARD = ("error", "skip")
_EPOCH_CACHE = 2  # epochs whose shard order is kept (the current one and the one resumed from)
_SHARD_CACHE = 8  # (epoch, shard) window permutations kept


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


class SampleOrder:
    """Maps a position (samples since the start of training) to (shard index, window index),
    and reads the samples: through `cache` for remote shards, fetching `prefetch_shards` ahead."""

    def __init__(self, index: DatasetIndex, split: str, seq_len: int, seed: int, *,
                 cache: NodeCache | None = None, prefetch_shards: int = 0, fetch_workers: int = 2,
                 on_corrupt_shard: str = "error") -> None:
        if seq_len < 1:
            raise DatasetError(f"seq_len must be positive, got {seq_len}")
        if seed < 0:
            raise DatasetError(f"the data seed must be non-negative, got {seed}")
        if on_corrupt_shard not in ON_CORRUPT_SHARD:
            raise DatasetError(f"on_corrupt_shard must be one of {ON_CORRUPT_SHARD}, got {on_corrupt_shard!r}")
        if index.tokenizer.vocab_size > 1 << 31:
            raise DatasetError(f"dataset {index.url} has vocab_size {index.tokenizer.vocab_size}; the loader "
                               f"yields int32 token ids, so at most 2**31 fit")
        self.index, self.split, self.seq_len, self.seed = index, split, seq_len, seed
        if cache is not None and is_local(url_to_fs(index.url)[0]):
            cache = None  # local shards are memory-mapped where they are, never copied
        self.cache, self.on_corrupt_shard = cache, on_corrupt_shard
        self.prefetch_shards = prefetch_shards if cache is not None else 0
        self.prefetcher = Prefetcher(cache, fetch_workers) if self.prefetch_shards > 0 else None
        self.skipped: dict[str, str] = {}  # shard URL -> why, for the shards this process skipped
        self.shards = index.shards(split)
        # A window needs seq_len+1 tokens starting at a multiple of seq_len.
        self.counts = np.array([max(0, (e.tokens - 1) // seq_len) for e in self.shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        if self.num_samples == 0:
            raise DatasetError(
                f"split {split!r} of dataset {index.url} holds no sample of seq_len+1 = {seq_len + 1} "
                f"tokens (largest shard: {max(e.tokens for e in self.shards)} tokens); "
                f"lower data.seq_len or prepare bigger shards (--shard-tokens)"
            )
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._prefetched_for: tuple[int, int] | None = None  # (epoch, slot) prefetch was last asked for
        self._view: tuple[np.ndarray, np.ndarray] | None = None  # (tokens, their windows), see _window_view

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard permutation, cumulative sample counts along it) for `epoch`."""
        if epoch not in self._epochs:
            perm = _rng(self.seed, epoch, 0).permutation(len(self.shards))
            self._epochs[epoch] = (perm, np.cumsum(self.counts[perm]))
            if len(self._epochs) > _EPOCH_CACHE:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _window_perm(self, epoch: int, shard: int) -> np.ndarray:
        key = (epoch, shard)
        if key not in self._windows:
            self._windows[key] = _rng(self.seed, epoch, 1, shard).permutation(int(self.counts[shard]))
            if len(self._windows) > _SHARD_CACHE:
                self._windows.popitem(last=False)
        else:
            self._windows.move_to_end(key)
        return self._windows[key]

    def _slot(self, position: int) -> tuple[int, int, int]:
        """(epoch, slot in that epoch's shard order, sample offset inside the shard)."""
        if position < 0:
            raise ValueError(f"position must be non-negative, got {position}")
        epoch, k = divmod(position, self.num_samples)
        perm, cum = self._epoch(epoch)
        i = int(np.searchsorted(cum, k, side="right"))
        return epoch, i, k - (int(cum[i - 1]) if i else 0)

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index into index.splits[split], window index in that shard) of `position`."""
        epoch, i, offset = self._slot(position)
        shard = int(self._epoch(epoch)[0][i])
        return shard, int(self._window_perm(epoch, shard)[offset])

    def upcoming_shards(self, position: int, count: int) -> list[int]:
        """The `count` shards the order visits after the one holding `position` (into later epochs)."""
        epoch, i, _ = self._slot(position)
        want = min(count, len(self.shards))
        out: list[int] = []
        while len(out) < want:
            for s in self._epoch(epoch)[0][i + 1:]:
                if self.counts[s] > 0:
                    out.append(int(s))
                    if len(out) == want:
                        return out
            epoch, i = epoch + 1, -1
        return out

    def _read(self, shard: int) -> np.ndarray | None:
        """The shard's tokens; None if it is bad and on_corrupt_shard is skip (remembered)."""
        entry = self.shards[shard]
        if entry.file in self.skipped:
            return None
        try:
            return read_shard(self.index, entry, cache=self.cache)
        except (CorruptShardError, MissingShardError) as e:
            if self.on_corrupt_shard == "error":
                raise
            log.warning("skipping shard (storage.on_corrupt_shard=skip): %s", e)
            self.skipped[entry.file] = str(e)
            return None

    def sample(self, position: int) -> np.ndarray:
        """The seq_len+1 token ids at `position` (a substitute if its shard is skipped)."""
        shard, window = self.locate(position)
        tokens = self._read(shard)
        if tokens is None:
            shard, window, tokens = self._substitute(position, window)
        start = window * self.seq_len
        return tokens[start:start + self.seq_len + 1]

    def _substitute(self, position: int, window: int) -> tuple[int, int, np.ndarray]:
        """The same window index (modulo its length) of the next readable shard in this epoch's order."""
        epoch, i, _ = self._slot(position)
        perm = self._epoch(epoch)[0]
        for j in range(1, len(perm)):
            shard = int(perm[(i + j) % len(perm)])
            if self.counts[shard] == 0:
                continue
            tokens = self._read(shard)
            if tokens is not None:
                return shard, window % int(self.counts[shard]), tokens
        raise DatasetError(f"every shard of split {self.split!r} of {self.index.url} is corrupt or missing: "
                           + "; ".join(self.skipped.values()))

    def _window_view(self, shard: int, tokens: np.ndarray) -> np.ndarray:
        """A view of `tokens` whose row w is window w: tokens[w*seq_len : w*seq_len + seq_len+1]
        (kept for the shard last asked for: a step asks for it a few times)."""
        if self._view is None or self._view[0] is not tokens:
            windows = np.lib.stride_tricks.as_strided(
                tokens, shape=(int(self.counts[shard]), self.seq_len + 1),
                strides=(self.seq_len * tokens.itemsize, tokens.itemsize), writeable=False)
            self._view = (tokens, windows)
        return self._view[1]

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Samples start .. start+size-1 as an int64 tensor [size, seq_len+1] (eval batches:
        made once, so the training path's int32 saving does not matter here)."""
        out = np.empty((size, self.seq_len + 1), dtype=np.dtype(self.index.dtype))
        self.fill(start, out)
        return torch.from_numpy(out.astype(np.int64))

    def fill(self, start: int, out: np.ndarray) -> None:
        """Write samples start .. start+len(out)-1 into `out` [n, seq_len+1], a run of positions
        in one shard at a time: one gather per run instead of Python work per sample."""
        size = len(out)
        if self.prefetcher is not None:
            slot = self._slot(start + size - 1)[:2]
            if slot != self._prefetched_for:  # the shards ahead change only with the shard
                self._prefetched_for = slot
                ahead = self.upcoming_shards(start + size - 1, self.prefetch_shards)
                self.prefetcher.ahead(self.index, [self.shards[s] for s in ahead])
        row = 0
        while row < size:
            position = start + row
            epoch, i, offset = self._slot(position)
            shard = int(self._epoch(epoch)[0][i])
            n = min(size - row, int(self.counts[shard]) - offset)
            tokens = self._read(shard)
            if tokens is None:  # skipped shard: substitutes, sample by sample
                for k in range(n):
                    out[row + k] = self.sample(position + k)
            else:
                windows = self._window_view(shard, tokens)
                out[row:row + n] = windows[self._window_perm(epoch, shard)[offset:offset + n]]
            row += n
