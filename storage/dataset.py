"""The streaming dataset: which tokens each rank trains on at each step, resumable anywhere.

A sample is a window of seq_len+1 tokens (seq_len inputs, seq_len shifted targets) at stride
seq_len inside one shard; windows never cross shards. The global order is a pure function of
(seed, epoch, position), never of the world size: epoch e visits the shards in a permutation
seeded by (seed, e), and each shard's windows in a permutation seeded by (seed, e, shard).
`position` counts samples consumed since the start of training over all ranks, so a run
resumed from a checkpoint on any number of ranks continues at the same sample, with none lost
or repeated.

Remote shards go through a node cache when one is given (storage/cache.py): while a rank reads
one shard, background threads fetch the next `prefetch_shards` of the order into it.

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
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage.cache import NodeCache
from storage.fs import is_local, url_to_fs
from storage.prefetch import Prefetcher
from storage.shards import (CorruptShardError, DatasetError, DatasetIndex, MissingShardError, read_index,
                            read_shard)

log = logging.getLogger(__name__)

ON_CORRUPT_SHARD = ("error", "skip")
EVAL_SEED = 0  # eval_batches uses one fixed order, whatever the training seed
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


@dataclass
class _StepPlan:
    """What one data-parallel rank reads for the step that starts at a global position."""

    order: SampleOrder
    global_batch_samples: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    @property
    def accum_steps(self) -> int:
        return self.global_batch_samples // (self.micro_batch_size * self.dp_size)

    def step(self, position: int) -> list[torch.Tensor]:
        """Micro-batch k gets positions P + (k*dp_size + dp_rank)*micro_batch_size + [0, mbs)."""
        return as_micro_batches(self.step_tokens(position))

    def step_tokens(self, position: int) -> np.ndarray:
        """The step's micro-batches as one array [accum_steps, micro_batch_size, seq_len+1] of
        the shards' dtype: what a DataLoader worker sends, one small shared-memory tensor a step."""
        order = self.order
        out = np.empty((self.accum_steps, self.micro_batch_size, order.seq_len + 1), dtype=np.dtype(order.index.dtype))
        for k in range(self.accum_steps):
            order.fill(position + (k * self.dp_size + self.dp_rank) * self.micro_batch_size, out[k])
        return out


def as_micro_batches(tokens: np.ndarray) -> list[torch.Tensor]:
    """[accum, mbs, seq_len+1] token ids of the shards' dtype -> accum int32 micro-batches.

    int32, not int64: the consumer widens after its copy to the device (`.long()`, which
    cross_entropy and the embedding want), so the loader writes and copies half the bytes,
    and numpy's uint16 -> int32 cast runs ~8x faster than its uint16 -> int64 one on x86.
    Token ids fit: SampleOrder refuses a vocabulary over 2**31. (torch's own cast from
    uint16/uint32, dtypes of limited support there, is ~50x slower than numpy's.)
    """
    return list(torch.from_numpy(tokens.astype(np.int32)).unbind(0))


class _StepDataset(IterableDataset):
    """DataLoader worker w of W yields steps w, w+W, ... from `start`; the loader's in-order
    round-robin over workers then gives the steps in exactly the inline order."""

    def __init__(self, plan: _StepPlan, start: int) -> None:
        self.plan, self.start = plan, start

    def __iter__(self) -> Iterator[tuple[torch.Tensor, list[str]]]:
        """(the step's tokens, see _StepPlan.step_tokens; shards this worker has skipped so far):
        skips happen in the worker, and the count must reach the rank's process for its metrics."""
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        step = worker
        while True:
            tokens = self.plan.step_tokens(self.start + step * self.plan.global_batch_samples)
            yield torch.from_numpy(tokens), list(self.plan.order.skipped)
            step += workers


def _worker_error_message(exc: Exception) -> str:
    """The error's own message, without the worker traceback DataLoader pastes into it."""
    text = str(exc)
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return text.rsplit(marker, 1)[1].strip() if marker in text else text


class BatchStream:
    """The training batches of one data-parallel rank: a Stateful, endless iterator of steps.

    `next_step()` returns the `accum_steps` micro-batches ([micro_batch_size, seq_len+1] int32
    each; widen with `.long()` after the device copy) of one optimizer step. `state_dict()` holds the global position (the same on every
    rank), so a checkpoint resumes on any number of ranks.

    `cache`, `prefetch_shards`, `fetch_workers` and `on_corrupt_shard` mean what the storage
    config's fields of those names say; `skipped_shards` counts the shards skipped so far.
    """

    def __init__(self, dataset_url: str | DatasetIndex, split: str, seq_len: int, seed: int, global_batch_samples: int,
                 micro_batch_size: int, dp_rank: int, dp_size: int, num_workers: int = 0, *,
                 cache: NodeCache | None = None, prefetch_shards: int = 0, fetch_workers: int = 2,
                 on_corrupt_shard: str = "error") -> None:
        if not 0 <= dp_rank < dp_size:
            raise DatasetError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1} (dp_size {dp_size})")
        per_micro = micro_batch_size * dp_size
        if micro_batch_size < 1 or global_batch_samples < per_micro or global_batch_samples % per_micro:
            raise DatasetError(
                f"global batch of {global_batch_samples} samples is not a positive multiple of "
                f"micro_batch_size {micro_batch_size} x data-parallel size {dp_size} = {per_micro}; "
                f"change trainer.global_batch_tokens (= samples x seq_len {seq_len}) or trainer.micro_batch_size"
            )
        if num_workers < 0:
            raise DatasetError(f"num_workers must be >= 0, got {num_workers}")
        self.index = as_index(dataset_url)
        self.split, self.seq_len, self.seed = split, seq_len, seed
        self.num_workers = num_workers
        order = SampleOrder(self.index, split, seq_len, seed, cache=cache, prefetch_shards=prefetch_shards,
                            fetch_workers=fetch_workers, on_corrupt_shard=on_corrupt_shard)
        self._plan = _StepPlan(order, global_batch_samples, micro_batch_size, dp_rank, dp_size)
        self.position = 0
        self._loader: Iterator[tuple[torch.Tensor, list[str]]] | None = None
        self._skipped: set[str] = set()

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step on this rank (gradient accumulation)."""
        return self._plan.accum_steps

    @property
    def samples_per_epoch(self) -> int:
        return self._plan.order.num_samples

    @property
    def skipped_shard_files(self) -> list[str]:
        """Shards (files of index.json) this rank skipped as corrupt or missing, in any worker."""
        return sorted(self._skipped | set(self._plan.order.skipped))

    @property
    def skipped_shards(self) -> int:
        """How many distinct shards this rank has skipped (on_corrupt_shard=skip), for metrics."""
        return len(self.skipped_shard_files)

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed, for logs."""
        return self.position / self.samples_per_epoch

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches for the next optimizer step; advances the position."""
        if self.num_workers == 0:
            batches = self._plan.step(self.position)
        else:
            if self._loader is None:
                self._loader = iter(DataLoader(_StepDataset(self._plan, self.position), batch_size=None,
                                               num_workers=self.num_workers))
            try:
                tokens, skipped = next(self._loader)
            except DatasetError as exc:
                raise type(exc)(_worker_error_message(exc)) from None
            batches = as_micro_batches(tokens.numpy())
            self._skipped.update(skipped)
        self.position += self._plan.global_batch_samples
        return batches

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> list[torch.Tensor]:
        return self.next_step()

    def state_dict(self) -> dict[str, Any]:
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "split": self.split}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position; refuse a state whose positions mean other samples."""
        saved = {k: state[k] for k in ("seed", "seq_len", "split")}
        ours = {"seed": self.seed, "seq_len": self.seq_len, "split": self.split}
        if saved != ours:
            diff = ", ".join(f"{k} {saved[k]!r} (now {ours[k]!r})" for k in ours if saved[k] != ours[k])
            raise DatasetError(
                f"the checkpoint's data position was made with {diff}; a position only names the "
                f"same samples under the same seq_len, seed and split. Resume with the checkpoint's "
                f"values (data.seq_len, trainer.seed) or start a new run"
            )
        self.close()
        self.position = int(state["position"])

    def close(self) -> None:
        """Stop the DataLoader workers, if any (they restart from `position` on the next step)."""
        self._loader = None


def as_index(dataset: str | DatasetIndex) -> DatasetIndex:
    """A dataset URL or its index already read: callers that hold the index pass it, so
    index.json is fetched once per process, not once per reader."""
    return dataset if isinstance(dataset, DatasetIndex) else read_index(dataset)


def eval_batches(dataset_url: str | DatasetIndex, seq_len: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_batches: int, cache: NodeCache | None = None,
                 on_corrupt_shard: str = "error") -> list[torch.Tensor]:
    """A fixed held-out slice of the "val" split: the same micro-batches on every call.

    Rank r gets batches b = 0..num_batches-1 at positions (b*dp_size + r)*micro_batch_size of
    one fixed order, so the ranks together cover num_batches*dp_size*micro_batch_size samples.
    """
    index = as_index(dataset_url)
    split = "val"
    if not index.has_split("val"):
        log.warning("dataset %s has no val split; evaluating on train samples, so the eval loss "
                    "is not held out (prepare with --val-fraction > 0)", index.url)
        split = "train"
    order = SampleOrder(index, split, seq_len, EVAL_SEED, cache=cache, on_corrupt_shard=on_corrupt_shard)
    needed = num_batches * dp_size * micro_batch_size
    if needed > order.num_samples:
        log.warning("evaluation asks for %d samples but split %r holds %d; some repeat",
                    needed, split, order.num_samples)
    return [order.batch((b * dp_size + dp_rank) * micro_batch_size, micro_batch_size)
            for b in range(num_batches)]


def check_vocab(index: DatasetIndex, model_vocab_size: int) -> None:
    """Refuse a model whose embedding cannot hold every token id of the dataset."""
    tok = index.tokenizer
    if tok.vocab_size > model_vocab_size:
        raise DatasetError(
            f"dataset {index.url} was made with tokenizer {tok.name} (vocab {tok.vocab_size}); "
            f"model.vocab_size is {model_vocab_size}. Set model.vocab_size={tok.vocab_size} or more"
        )
