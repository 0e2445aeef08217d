"""The global sample order: a pure function of (seed, epoch, position), never of the world size.

A sample is a window of seq_len+1 tokens (seq_len inputs, seq_len shifted targets) at stride
seq_len inside one shard; windows never cross shards. `SampleOrder` maps a position of one
dataset to a window and reads it (through the node cache when one is given); `MixedOrder`
deals the positions of a run to several datasets by weight; storage/dataset.py splits
positions over ranks and steps.

Block shuffle. Epoch e visits the shards in a permutation seeded by (seed, e) and cuts it into
blocks of `block_shards` consecutive shards; all windows of a block are permuted together,
seeded by (seed, e, the block's first shard). So every global batch draws on ~min(block, batch
size) shards, not one, and the order needs no global index: a position's block is a
searchsorted over the epoch's block sizes, and only the permutation of the block in use
(8 bytes a window) is ever built. Why blocks rather than one permutation of the whole epoch:
a remote shard is read whole and verified before any of its samples is used (storage/cache.py),
so a reader needs its block's shards on local disk at once. The node cache therefore holds
the block being read and the next one, which the node's ranks and DataLoader workers enter a
few steps apart: two blocks of each remote dataset (`cache_bytes_needed`), refused up front
when they exceed the cache limit. The reader pins the shards of its block and lets go of them
when it moves on; prefetch fetches the rest of the block and the first shards after it, so
each shard is still downloaded once per node per epoch. Local data (memory-mapped, no cache)
uses the same scheme: the order must not change when a dataset is copied from S3 to NVMe
(a run from either gives the same losses), and a block keeps the permutation in memory small
for datasets of billions of samples; raise the block there (it costs nothing but that memory)
up to the number of shards for one permutation of the whole epoch. A block of one shard is
the order of the harness before blocks (shards in a permutation, each shard's windows
permuted), kept for data shuffled when it was prepared.

A corrupt or missing shard stops the run, naming it, unless `on_corrupt_shard="skip"`. Then a
sample whose position falls in a bad shard is replaced by the sample at the same window index
(modulo its length) of the next readable shard of its block (in the block's shard order,
wrapping around inside the block), or, if the whole block is bad, of the next readable shard
after it in that epoch's shard order. Staying inside the block keeps the cache's need at two
blocks; with a block of one shard this is the rule as it was. Positions in good shards keep
their samples, every batch keeps its size, and the rule needs no communication: each rank
that meets the bad shard substitutes the same way. The substitutes are seen twice in that epoch.
"""

from __future__ import annotations

import itertools
import logging
import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from storage.cache import NodeCache, Pin
from storage.fs import is_local, url_to_fs
from storage.prefetch import Prefetcher
from storage.shards import CorruptShardError, DatasetError, DatasetIndex, MissingShardError, read_shard

log = logging.getLogger(__name__)

ON_CORRUPT_SHARD = ("error", "skip")
# Shards whose windows are permuted together: at the shipped 4M-token (8 MiB) shards a block is
# 512 MiB and the cache's two blocks 1 GiB of the presets' 100 GiB; a block holds 6.4 times
# mosaicml-streaming's recommended minimum (ten shards' samples); the builtin corpus (~22
# shards) is one block, a permutation of the whole epoch.
DEFAULT_BLOCK_SHARDS = 64
_EPOCH_CACHE = 2  # epochs whose shard order is kept (the current one and the one resumed from)
_BLOCK_CACHE = 3  # (epoch, block) window permutations kept


def _rng(*key: int) -> np.random.Generator:
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))


@dataclass(frozen=True)
class _Epoch:
    perm: np.ndarray  # shard indices in the order the epoch visits them (its slots)
    cum: np.ndarray  # samples up to and including each slot
    block_cum: np.ndarray  # samples up to and including each block


class SampleOrder:
    """Maps a position (samples since the start of training) to (shard index, window index),
    and reads the samples: through `cache` for remote shards, fetching ahead `prefetch_shards`
    shards past the current block (and the rest of that block)."""

    def __init__(self, index: DatasetIndex, split: str, seq_len: int, seed: int, *,
                 block_shards: int = DEFAULT_BLOCK_SHARDS, cache: NodeCache | None = None,
                 prefetch_shards: int = 0, fetch_workers: int = 2, on_corrupt_shard: str = "error") -> None:
        if seq_len < 1:
            raise DatasetError(f"seq_len must be positive, got {seq_len}")
        if seed < 0:
            raise DatasetError(f"the data seed must be non-negative, got {seed}")
        if block_shards < 1:
            raise DatasetError(f"block_shards (data.shuffle_block_shards) must be >= 1, got {block_shards}")
        if on_corrupt_shard not in ON_CORRUPT_SHARD:
            raise DatasetError(f"on_corrupt_shard must be one of {ON_CORRUPT_SHARD}, got {on_corrupt_shard!r}")
        if index.tokenizer.vocab_size > 1 << 31:
            raise DatasetError(f"dataset {index.url} has vocab_size {index.tokenizer.vocab_size}; the loader "
                               f"yields int32 token ids, so at most 2**31 fit")
        self.index, self.split, self.seq_len, self.seed = index, split, seq_len, seed
        self.block_shards = block_shards
        if cache is not None and is_local(url_to_fs(index.url)[0]):
            cache = None  # local shards are memory-mapped where they are, never copied
        self.cache, self.on_corrupt_shard = cache, on_corrupt_shard
        self.prefetch_shards = prefetch_shards if cache is not None else 0
        self.prefetcher = Prefetcher(cache, fetch_workers) if self.prefetch_shards > 0 else None
        self.skipped: dict[str, str] = {}  # shard file -> why, for the shards this process skipped
        self.shards = index.shards(split)
        self.dtype = np.dtype(index.dtype)
        # A window needs seq_len+1 tokens starting at a multiple of seq_len.
        self.counts = np.array([max(0, (e.tokens - 1) // seq_len) for e in self.shards], dtype=np.int64)
        self.num_samples = int(self.counts.sum())
        if self.num_samples == 0:
            raise DatasetError(
                f"split {split!r} of dataset {index.url} holds no sample of seq_len+1 = {seq_len + 1} "
                f"tokens (largest shard: {max(e.tokens for e in self.shards)} tokens); "
                f"lower data.seq_len or prepare bigger shards (--shard-tokens)"
            )
        self._epochs: OrderedDict[int, _Epoch] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._prefetched_for: tuple[int, int] | None = None  # (epoch, block) prefetch was last asked for
        self._held_block: tuple[int, int] | None = None  # (epoch, block) whose shards _held keeps
        self._held: dict[int, tuple[np.ndarray, Pin | None]] = {}  # shard -> (tokens, its pin in the cache)
        self._views: dict[int, np.ndarray] = {}  # shard -> its windows, see _windows
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        """Pickled for spawned DataLoader workers without this process's shards and pins."""
        skip = ("_held", "_views", "_epochs", "_blocks")
        state = {k: v for k, v in self.__dict__.items() if k not in skip}
        return state | {"_held": {}, "_views": {}, "_epochs": OrderedDict(), "_blocks": OrderedDict(),
                        "_held_block": None, "_prefetched_for": None, "_pid": -1}

    @property
    def cache_bytes_needed(self) -> int:
        """Node-cache bytes this order's readers on a node hold at once (0 when it reads no
        remote shards through a cache): two blocks (the readers' current one and the next, which
        some enter before others have left the current one) and the `prefetch_shards` after
        them, which the prefetch holds once they are there; counted with the largest shards."""
        if self.cache is None:
            return 0
        held = 2 * self.block_shards + self.prefetch_shards
        largest = sorted((e.tokens for e in self.shards), reverse=True)[:held]
        return sum(largest) * self.dtype.itemsize

    @property
    def block_samples(self) -> int:
        """Samples of a typical block (its shards' mean samples x shards per block): how far
        the readers of a node may spread over the order before they hold more than two blocks."""
        full = int((self.counts > 0).sum())
        return self.num_samples * min(self.block_shards, full) // full

    # -- positions ---------------------------------------------------------------------------

    def _epoch(self, epoch: int) -> _Epoch:
        if epoch not in self._epochs:
            n, b = len(self.shards), self.block_shards
            perm = _rng(self.seed, epoch, 0).permutation(n)
            cum = np.cumsum(self.counts[perm])
            ends = np.minimum(np.arange(1, (n + b - 1) // b + 1) * b, n) - 1
            self._epochs[epoch] = _Epoch(perm, cum, cum[ends])
            if len(self._epochs) > _EPOCH_CACHE:
                self._epochs.popitem(last=False)
        return self._epochs[epoch]

    def _block_at(self, position: int) -> tuple[int, int, int]:
        """(epoch, block of that epoch, sample offset inside the block)."""
        if position < 0:
            raise ValueError(f"position must be non-negative, got {position}")
        epoch, k = divmod(position, self.num_samples)
        block_cum = self._epoch(epoch).block_cum
        b = int(np.searchsorted(block_cum, k, side="right"))
        return epoch, b, k - (int(block_cum[b - 1]) if b else 0)

    def _block_perm(self, epoch: int, b: int) -> np.ndarray:
        """The permutation of block b's windows, numbered along the block's slots."""
        key = (epoch, b)
        if key not in self._blocks:
            ep = self._epoch(epoch)
            size = int(ep.block_cum[b]) - (int(ep.block_cum[b - 1]) if b else 0)
            first = int(ep.perm[b * self.block_shards])
            self._blocks[key] = _rng(self.seed, epoch, 1, first).permutation(size)
            if len(self._blocks) > _BLOCK_CACHE:
                self._blocks.popitem(last=False)
        else:
            self._blocks.move_to_end(key)
        return self._blocks[key]

    def _run(self, position: int, limit: int) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
        """Up to `limit` positions from `position` inside one block: (epoch, block, slots,
        shards, windows), the last three one entry per position."""
        epoch, b, offset = self._block_at(position)
        ep = self._epoch(epoch)
        perm = self._block_perm(epoch, b)
        n = min(limit, len(perm) - offset)
        flat = perm[offset:offset + n] + (int(ep.block_cum[b - 1]) if b else 0)  # index along the epoch's slots
        slots = np.searchsorted(ep.cum, flat, side="right")
        shards = ep.perm[slots]
        return epoch, b, slots, shards, flat - (ep.cum[slots] - self.counts[shards])

    def locate(self, position: int) -> tuple[int, int]:
        """(shard index into index.splits[split], window index in that shard) of `position`."""
        _, _, _, shards, windows = self._run(position, 1)
        return int(shards[0]), int(windows[0])

    def _block_slots(self, epoch: int, b: int) -> range:
        return range(b * self.block_shards, min((b + 1) * self.block_shards, len(self.shards)))

    def block_at(self, position: int) -> list[int]:
        """The shards (with samples) of the block holding `position`, in the epoch's order."""
        epoch, b, _ = self._block_at(position)
        perm = self._epoch(epoch).perm
        return [int(perm[i]) for i in self._block_slots(epoch, b) if self.counts[perm[i]] > 0]

    def upcoming_shards(self, position: int, count: int) -> list[int]:
        """The first `count` shards the order visits after the block holding `position` (into
        later epochs)."""
        epoch, b, _ = self._block_at(position)
        want = min(count, int((self.counts > 0).sum()))
        start = self._block_slots(epoch, b).stop
        out: list[int] = []
        while len(out) < want:
            for s in self._epoch(epoch).perm[start:]:
                if self.counts[s] > 0:
                    out.append(int(s))
                    if len(out) == want:
                        return out
            epoch, start = epoch + 1, 0
        return out

    # -- reading -----------------------------------------------------------------------------

    def _own_process(self) -> None:
        """A forked DataLoader worker drops its copies of the parent's pins (the parent keeps its own)."""
        if self._pid != os.getpid():
            for _, pin in self._held.values():
                if pin is not None:
                    pin.release()
            self._held, self._views, self._held_block = {}, {}, None
            self._prefetched_for, self._pid = None, os.getpid()

    def _hold_block(self, epoch: int, b: int) -> None:
        """Let go of the shards of every block but (epoch, b): the reader has moved on."""
        if self._held_block == (epoch, b):
            return
        self._held_block = (epoch, b)
        perm = self._epoch(epoch).perm
        keep = {int(perm[i]) for i in self._block_slots(epoch, b)}
        for shard in [s for s in self._held if s not in keep]:
            _, pin = self._held.pop(shard)
            self._views.pop(shard, None)
            if pin is not None:
                pin.release()

    def close(self) -> None:
        """Let go of every shard this order holds (they are read again if asked for)."""
        self._own_process()
        for _, pin in self._held.values():
            if pin is not None:
                pin.release()
        self._held, self._views, self._held_block = {}, {}, None

    def _read(self, shard: int) -> np.ndarray | None:
        """The shard's tokens, held (and pinned in the cache) while the reader is in its block;
        None if it is bad and on_corrupt_shard is skip (remembered)."""
        self._own_process()
        if shard in self._held:
            return self._held[shard][0]
        entry = self.shards[shard]
        if entry.file in self.skipped:
            return None
        pin = None
        try:
            if self.cache is not None:
                pin = self.cache.pin(self.index, entry)  # ours until the reader leaves the block
            tokens = read_shard(self.index, entry, cache=self.cache, pin=pin)
        except (CorruptShardError, MissingShardError) as e:
            if pin is not None:
                pin.release()
            if self.on_corrupt_shard == "error":
                raise
            log.warning("skipping shard (storage.on_corrupt_shard=skip): %s", e)
            self.skipped[entry.file] = str(e)
            return None
        self._held[shard] = (tokens, pin)
        return tokens

    def _windows(self, shard: int, tokens: np.ndarray) -> np.ndarray:
        """A view of `tokens` whose row w is window w: tokens[w*seq_len : w*seq_len + seq_len+1]."""
        if shard not in self._views:
            self._views[shard] = np.lib.stride_tricks.as_strided(
                tokens, shape=(int(self.counts[shard]), self.seq_len + 1),
                strides=(self.seq_len * tokens.itemsize, tokens.itemsize), writeable=False)
        return self._views[shard]

    def sample(self, position: int) -> np.ndarray:
        """The seq_len+1 token ids at `position` (a substitute if its shard is skipped)."""
        epoch, _, slots, shards, windows = self._run(position, 1)
        shard, window = int(shards[0]), int(windows[0])
        tokens = self._read(shard)
        if tokens is None:
            shard, window, tokens = self._substitute(epoch, int(slots[0]), window)
        start = window * self.seq_len
        return tokens[start:start + self.seq_len + 1]

    def _substitute(self, epoch: int, slot: int, window: int) -> tuple[int, int, np.ndarray]:
        """The same window index (modulo its length) of the next readable shard of the block,
        else of the next readable shard after the block in this epoch's order."""
        perm = self._epoch(epoch).perm
        block = self._block_slots(epoch, slot // self.block_shards)
        n, size = len(perm), len(block)
        inside = (block.start + (slot - block.start + j) % size for j in range(1, size))
        after = ((block.stop + j) % n for j in range(n - size))
        for i in itertools.chain(inside, after):
            shard = int(perm[i])
            if self.counts[shard] == 0:
                continue
            tokens = self._read(shard)
            if tokens is not None:
                return shard, window % int(self.counts[shard]), tokens
        raise DatasetError(f"every shard of split {self.split!r} of {self.index.url} is corrupt or missing: "
                           + "; ".join(self.skipped.values()))

    def batch(self, start: int, size: int) -> torch.Tensor:
        """Samples start .. start+size-1 as an int64 tensor [size, seq_len+1] (eval batches:
        made once, so the training path's int32 saving does not matter here)."""
        out = np.empty((size, self.seq_len + 1), dtype=self.dtype)
        self.fill(start, out)
        return torch.from_numpy(out.astype(np.int64))

    def _prefetch(self, position: int) -> None:
        """On entering a block: fetch its shards and the first `prefetch_shards` after it."""
        epoch, b, _ = self._block_at(position)
        if (epoch, b) == self._prefetched_for:
            return
        self._prefetched_for = (epoch, b)
        ahead = self.block_at(position) + self.upcoming_shards(position, self.prefetch_shards)
        self.prefetcher.ahead(self.index, [self.shards[s] for s in dict.fromkeys(ahead)])

    def fill(self, start: int, out: np.ndarray) -> None:
        """Write samples start .. start+len(out)-1 into `out` [n, seq_len+1]: per block, one
        gather per shard of the block that the positions fall in."""
        size = len(out)
        self._own_process()
        if self.prefetcher is not None:
            self._prefetch(start + size - 1)
        row = 0
        while row < size:
            epoch, b, slots, shards, windows = self._run(start + row, size - row)
            self._hold_block(epoch, b)
            n = len(shards)
            for shard in np.unique(shards):
                rows = np.flatnonzero(shards == shard)
                tokens = self._read(int(shard))
                if tokens is None:  # skipped shard: substitutes, sample by sample
                    for r in rows:
                        s, w, t = self._substitute(epoch, int(slots[r]), int(windows[r]))
                        out[row + r] = t[w * self.seq_len:(w + 1) * self.seq_len + 1]
                else:
                    out[row + rows] = self._windows(int(shard), tokens)[windows[rows]]
            row += n
