"""The streaming dataset: which tokens each rank trains on at each step, resumable anywhere.

The global order of samples (storage/order.py) is a pure function of (seed, epoch, position),
never of the world size. `position` counts samples consumed since the start of training over
all ranks, so a run resumed from a checkpoint on any number of ranks continues at the same
sample, with none lost or repeated. Here: each step's global batch is split over the
data-parallel ranks and into micro-batches, optionally by DataLoader worker processes.

The data is one dataset or a weighted mixture of several (`Source`, data.sources): the order
deals global positions to them by weight, each through its own block-shuffled order and
epochs. The checkpointed state holds the global position and each source's own position, so a
resume continues every source where it was, on any number of ranks, also with new weights.

Remote shards go through a node cache when one is given (storage/cache.py): while a rank reads
a block of shards, background threads fetch the rest of the block and the next
`prefetch_shards` shards of the order into it.

DataLoader workers. With W workers, worker w makes the rank's steps w, w+W, w+2W, ..., so at
any time the workers of a rank (and the ranks of a node, which the gradient all-reduce keeps
in step) read neighbouring positions, hence the same shards: each shard is still fetched once
per node, and the cache holds what its limit allows for. A worker sends k of its steps in one
item, and the rank's process puts them back in order; the batches are exactly those read
inline. Measured on 2 vCPUs (docs/benchmarks.md), what made workers slow was less the number
of items than fresh shared memory: DataLoader puts every item into new shared memory and
passes its file descriptor over a socket, and on this VM a page fault per 4 KiB on both sides
cost ~1.5-2 ms per 128 KiB step, more than reading the step. So each worker writes into a few
shared buffers made once (BUFFERS), hands each buffer over once, and later items only name
it; the rank's process copies a step out (the int32 widening it needed anyway) and hands the
buffer back through a semaphore. k then only spreads DataLoader's per-item cost (pickling,
queues, waking processes: ~0.1-0.2 ms of CPU here): k = ITEM_BYTES of steps, at most
MAX_STEPS_PER_ITEM. Its price is run-ahead: the workers make up to (BUFFERS + 1) * k * W steps
past the loop's position. Where a source goes through the node cache, k is lowered until that
run-ahead stays within RUN_AHEAD_BLOCK_FRACTION of the source's block, so that a node's readers
still hold at most two blocks, what the cache is sized for (storage/mixture.py:
check_cache_room); a run of consecutive steps per worker, tried before, broke exactly this.
"""

from __future__ import annotations

import itertools
import json
import logging
import multiprocessing
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage.cache import NodeCache
from storage.mixture import MixedOrder, Source, mixed_order
from storage.order import DEFAULT_BLOCK_SHARDS
from storage.shards import DatasetError, DatasetIndex

log = logging.getLogger(__name__)

EVAL_SEED = 0  # eval_batches uses one fixed order, whatever the training seed
ITEM_BYTES = 1 << 20  # a DataLoader worker sends its steps about this many bytes to an item (module docstring)
MAX_STEPS_PER_ITEM = 32  # ... and at most this many (small steps: the first item's wait, the run-ahead)
BUFFERS = 3  # shared-memory buffers per worker: DataLoader's prefetch_factor items ahead, plus the one being made
RUN_AHEAD_BLOCK_FRACTION = 0.5  # the workers' run-ahead stays within this much of a cached source's block


@dataclass
class _StepPlan:
    """What one data-parallel rank reads for the step that starts at a global position."""

    order: MixedOrder
    global_batch_samples: int
    micro_batch_size: int
    dp_rank: int
    dp_size: int

    @property
    def accum_steps(self) -> int:
        return self.global_batch_samples // (self.micro_batch_size * self.dp_size)

    @property
    def shape(self) -> tuple[int, int, int]:
        """[accum_steps, micro_batch_size, seq_len+1]: one step's micro-batches."""
        return self.accum_steps, self.micro_batch_size, self.order.seq_len + 1

    def fill(self, position: int, out: np.ndarray) -> None:
        """Micro-batch k gets positions P + (k*dp_size + dp_rank)*micro_batch_size + [0, mbs),
        written into `out` [accum_steps, micro_batch_size, seq_len+1] (int32: cast on the copy)."""
        for k in range(self.accum_steps):
            self.order.fill(position + (k * self.dp_size + self.dp_rank) * self.micro_batch_size, out[k])

    def step(self, position: int) -> list[torch.Tensor]:
        """The step's micro-batches, int32 [micro_batch_size, seq_len+1] each.

        int32, not int64: the consumer widens after its copy to the device (`.long()`, which
        cross_entropy and the embedding want), so the loader writes and copies half the bytes,
        and numpy's uint16 -> int32 cast runs ~8x faster than its uint16 -> int64 one on x86.
        Token ids fit: SampleOrder refuses a vocabulary over 2**31. (torch's own cast from
        uint16/uint32, dtypes of limited support there, is ~50x slower than numpy's.)
        """
        out = np.empty(self.shape, dtype=np.int32)
        self.fill(position, out)
        return list(torch.from_numpy(out).unbind(0))

    def steps_per_item(self, workers: int) -> int:
        """How many of its steps a DataLoader worker sends in one item (see the module docstring):
        ITEM_BYTES' worth (at most MAX_STEPS_PER_ITEM), fewer where the steps the workers make
        ahead of the loop would not stay well inside a shuffle block of a source read through
        the node cache."""
        step_bytes = int(np.prod(self.shape)) * self.order.dtype.itemsize
        k = min(MAX_STEPS_PER_ITEM, -(-ITEM_BYTES // step_bytes))
        blocks = [o.block_samples for o in self.order.orders if o.cache is not None]
        if blocks:
            # Each worker holds up to BUFFERS items of k steps (made, queued or being made) past
            # the loop's round, which is k*W steps: (BUFFERS + 1)*k*W steps of the global batch.
            ahead = (BUFFERS + 1) * workers * self.global_batch_samples
            k = min(k, int(RUN_AHEAD_BLOCK_FRACTION * min(blocks)) // ahead)
        return max(1, k)


class _StepDataset(IterableDataset):
    """DataLoader worker w of W makes steps w, w+W, w+2W, ... from `start`, k to an item: item
    i holds its steps (i*k + j)*W + w, j = 0..k-1, as [k, accum_steps, micro_batch_size,
    seq_len+1] token ids of the shards' dtype. So round i (item i of every worker) holds steps
    i*k*W .. (i+1)*k*W - 1, which _WorkerSteps puts back in order.

    Items are written into the worker's BUFFERS shared-memory buffers, made once and reused,
    and a buffer goes to the rank's process with its first item only (later items name it):
    DataLoader's own way, fresh shared memory for every item and its file descriptor passed
    over a socket, was most of the per-item cost measured (a page fault per 4 KiB on both
    sides). `free[w]` counts worker w's buffers that the rank's process has copied out of, so
    a buffer is never rewritten while it is read.
    """

    def __init__(self, plan: _StepPlan, start: int, k: int, free: list[Any]) -> None:
        self.plan, self.start, self.k, self.free = plan, start, k, free

    def __iter__(self) -> Iterator[tuple[int, int, torch.Tensor | None, int, list[str]]]:
        """(worker, buffer, the buffer itself the first time, steps in the item, shards this
        worker has skipped so far): skips happen in the worker, and the count must reach the
        rank's process for its metrics.

        A step that fails after the item's first ends the item there; the error is raised by
        the worker's next item, which _WorkerSteps asks for at that step (so the error comes at
        the step it belongs to, as inline; and a capped mixture's last steps still arrive).
        """
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        plan, k, parent = self.plan, self.k, os.getppid()
        dtype = torch.from_numpy(np.empty(0, dtype=plan.order.dtype)).dtype
        buffers: list[torch.Tensor] = []
        for item in itertools.count():
            while not self.free[worker].acquire(timeout=1.0):
                if os.getppid() != parent:
                    return  # the rank's process is gone; DataLoader's own watchdog ends this worker
            slot = item % BUFFERS
            new = slot == len(buffers)
            if new:
                buffers.append(torch.empty((k, *plan.shape), dtype=dtype).share_memory_())
            out = buffers[slot].numpy()
            for j in range(k):
                step = (item * k + j) * workers + worker
                try:
                    plan.fill(self.start + step * plan.global_batch_samples, out[j])
                except Exception:
                    if j == 0:
                        raise
                    yield worker, slot, buffers[slot] if new else None, j, list(plan.order.skipped)
                    raise
            yield worker, slot, buffers[slot] if new else None, k, list(plan.order.skipped)


class _WorkerSteps:
    """The steps from `start` made by `workers` DataLoader workers, in order. The loader gives
    items in order (round i: worker 0's item i, worker 1's, ...), so step r is row
    r % (k*W) // W of item r // (k*W) * W + r % W."""

    def __init__(self, plan: _StepPlan, start: int, workers: int) -> None:
        self.k, self.workers = plan.steps_per_item(workers), workers
        self._free = [multiprocessing.Semaphore(BUFFERS) for _ in range(workers)]
        self._loader = iter(DataLoader(_StepDataset(plan, start, self.k, self._free), batch_size=None,
                                       num_workers=workers, prefetch_factor=BUFFERS - 1))
        self._items: dict[int, np.ndarray] = {}  # item number -> its steps as int32, this round's and later
        self._buffers: dict[tuple[int, int], np.ndarray] = {}  # (worker, slot) -> that shared buffer
        self._pulled = 0  # items taken from the loader so far
        self.skipped: set[str] = set()

    def step(self, r: int) -> list[torch.Tensor]:
        """Step r (counted from `start`), int32 micro-batches; steps are asked for in order."""
        round_, rest = divmod(r, self.k * self.workers)
        row, worker = divmod(rest, self.workers)
        n = round_ * self.workers + worker
        for old in [m for m in self._items if m < round_ * self.workers]:
            del self._items[old]  # an earlier round's: every step of it is taken
        tokens = self._item(n)
        if row >= len(tokens):  # that worker failed at this step: its next item raises the error
            self._item(n + self.workers)
            raise RuntimeError(f"DataLoader worker {worker} ended item {n} at step {r} without an error")
        return list(torch.from_numpy(tokens[row]).unbind(0))

    def close(self) -> None:
        """Stop the workers now. Only dropping DataLoader's iterator would stop them later, or
        after an error badly: a traceback that holds it leaves it to the cyclic garbage
        collector, which finalizes its queues first, so the workers never get the stop signal
        and DataLoader waits 5 s for each before it kills them."""
        self._loader._shutdown_workers()

    def _item(self, n: int) -> np.ndarray:
        while self._pulled <= n:
            try:
                worker, slot, buffer, steps, skipped = next(self._loader)
            except DatasetError as exc:
                raise type(exc)(_worker_error_message(exc)) from None
            if buffer is not None:
                self._buffers[worker, slot] = buffer.numpy()
            # The copy to int32 (see _StepPlan.step) frees the buffer for the worker's next item.
            self._items[self._pulled] = self._buffers[worker, slot][:steps].astype(np.int32)
            self._free[worker].release()
            self._pulled += 1
            self.skipped.update(skipped)
        return self._items[n]


def _worker_error_message(exc: Exception) -> str:
    """The error's own message, without the worker traceback DataLoader pastes into it."""
    text = str(exc)
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    return text.rsplit(marker, 1)[1].strip() if marker in text else text


class BatchStream:
    """The training batches of one data-parallel rank: a Stateful, endless iterator of steps.

    `next_step()` returns the `accum_steps` micro-batches ([micro_batch_size, seq_len+1] int32
    each; widen with `.long()` after the device copy) of one optimizer step. `data` is a
    dataset (URL or index) or a list of `Source`s mixed by weight. `state_dict()` holds the
    global position (the same on every rank) and each source's own position, so a checkpoint
    resumes on any number of ranks.

    `block_shards` is data.shuffle_block_shards (1: one shard at a time, data.shuffle=false);
    `cache`, `prefetch_shards`, `fetch_workers` and `on_corrupt_shard` mean what the storage
    config's fields of those names say; `skipped_shards` counts the shards skipped so far.
    """

    optional_state_keys = ("order",)  # checkpoints written before the block shuffle lack it

    def __init__(self, data: "str | DatasetIndex | Sequence[Source]", split: str, seq_len: int, seed: int,
                 global_batch_samples: int, micro_batch_size: int, dp_rank: int, dp_size: int,
                 num_workers: int = 0, *, block_shards: int = DEFAULT_BLOCK_SHARDS, cache: NodeCache | None = None,
                 prefetch_shards: int = 0, fetch_workers: int = 2, on_corrupt_shard: str = "error") -> None:
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
        self.split, self.seq_len, self.seed, self.block_shards = split, seq_len, seed, block_shards
        self.num_workers = num_workers
        order = mixed_order(data, split, seq_len, seed, block_shards=block_shards, cache=cache,
                            prefetch_shards=prefetch_shards, fetch_workers=fetch_workers,
                            on_corrupt_shard=on_corrupt_shard)
        self.index = order.index  # the first source's: every source has its tokenizer
        self._plan = _StepPlan(order, global_batch_samples, micro_batch_size, dp_rank, dp_size)
        self.position = 0
        self._workers: _WorkerSteps | None = None  # started at the first step, stopped by close()
        self._workers_start = 0  # the position they started at
        self._skipped: set[str] = set()  # shards skipped by the workers of earlier starts

    @property
    def order(self) -> MixedOrder:
        return self._plan.order

    @property
    def accum_steps(self) -> int:
        """Micro-batches per optimizer step on this rank (gradient accumulation)."""
        return self._plan.accum_steps

    @property
    def samples_per_epoch(self) -> int:
        """Samples of one epoch of every source together (of the one dataset, without a mixture)."""
        return self.order.num_samples

    @property
    def end_position(self) -> int | None:
        """Where the data ends (every source capped by max_epochs and used up); None: endless."""
        return self.order.end

    @property
    def skipped_shard_files(self) -> list[str]:
        """Shards (files of index.json) this rank skipped as corrupt or missing, in any worker."""
        workers = self._workers.skipped if self._workers is not None else set()
        return sorted(self._skipped | workers | set(self.order.skipped))

    @property
    def skipped_shards(self) -> int:
        """How many distinct shards this rank has skipped (on_corrupt_shard=skip), for metrics."""
        return len(self.skipped_shard_files)

    @property
    def epoch(self) -> float:
        """Fractional epochs consumed, for logs."""
        return self.position / self.samples_per_epoch

    def source_tokens(self) -> dict[str, int]:
        """Tokens each source has given the steps so far ({name: tokens}); they add up to the
        position x seq_len, the tokens trained on."""
        return {n: t * self.seq_len for n, t in zip(self.order.names, self.order.taken(self.position))}

    def next_step(self) -> list[torch.Tensor]:
        """This rank's micro-batches for the next optimizer step; advances the position."""
        if self.num_workers == 0:
            batches = self._plan.step(self.position)
        else:
            if self._workers is None:
                self._workers = _WorkerSteps(self._plan, self.position, self.num_workers)
                self._workers_start = self.position
            batches = self._workers.step((self.position - self._workers_start) // self._plan.global_batch_samples)
        before, self.position = self.position, self.position + self._plan.global_batch_samples
        for name in self.order.left_between(before, self.position):
            log.info("data source %s has served its max_epochs by sample %d; the other sources take its "
                     "place in their relative weights", name, self.position)
        return batches

    def __iter__(self) -> "BatchStream":
        return self

    def __next__(self) -> list[torch.Tensor]:
        return self.next_step()

    def state_dict(self) -> dict[str, Any]:
        """The global position and what it means: seed, seq_len, split, and (as one JSON string,
        so that the checkpoint's keys do not depend on the sources) the block size, where the
        current weights took over and each source's own position."""
        order = self.order
        sources = [{"name": n, "weight": w, "max_epochs": m, "base": b, "taken": t} for n, w, m, b, t in
                   zip(order.names, order.weights, order.max_epochs, order.bases, order.taken(self.position))]
        mix = {"block_shards": self.block_shards, "start": order.start, "sources": sources}
        return {"position": self.position, "seed": self.seed, "seq_len": self.seq_len, "split": self.split,
                "order": json.dumps(mix, sort_keys=True)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue at the saved position, every source at its own; refuse a state whose
        positions mean other samples (another seed, seq_len, split or block size)."""
        saved = {k: state[k] for k in ("seed", "seq_len", "split")}
        ours = {"seed": self.seed, "seq_len": self.seq_len, "split": self.split}
        # A state without "order" was saved before blocks: its order is that of one-shard blocks.
        mix = json.loads(state["order"]) if state.get("order") else {"block_shards": 1}
        saved["shuffle_block_shards"] = int(mix["block_shards"])
        ours["shuffle_block_shards"] = self.block_shards
        if saved != ours:
            diff = ", ".join(f"{k} {saved[k]!r} (now {ours[k]!r})" for k in ours if saved[k] != ours[k])
            raise DatasetError(
                f"the checkpoint's data position was made with {diff}; a position only names the "
                f"same samples under the same seq_len, seed, split and block shuffle. Resume with the "
                f"checkpoint's values (data.seq_len, trainer.seed, data.shuffle_block_shards; "
                f"shuffle_block_shards 1 is data.shuffle=false) or start a new run"
            )
        self.close()
        self.position = int(state["position"])
        self._resume_mixture(mix.get("sources"), int(mix.get("start", 0)))

    def _resume_mixture(self, saved: list[dict[str, Any]] | None, start: int) -> None:
        """The same sources and weights continue the saved pattern; changed ones start a new
        pattern here, each source at its own saved position (a new source at its start)."""
        order = self.order
        ours = [{"name": n, "weight": w, "max_epochs": m}
                for n, w, m in zip(order.names, order.weights, order.max_epochs)]
        if saved is None:  # one dataset, saved before mixtures: its own position is the global one
            saved = [{**ours[0], "base": 0, "taken": self.position}] if len(ours) == 1 else []
            start = 0
        same = [{k: s[k] for k in ("name", "weight", "max_epochs")} for s in saved] == ours
        if same:
            bases, where = [s["base"] for s in saved], start
        else:
            taken = {s["name"]: int(s["taken"]) for s in saved}
            bases, where = [taken.get(n, 0) for n in order.names], self.position
            log.info("data.sources changed since the checkpoint (%s -> %s): from sample %d every source "
                     "continues at its own position (%s) with the new weights", _describe(saved),
                     _describe(ours), self.position, ", ".join(f"{n} {b}" for n, b in zip(order.names, bases)))
        self._plan.order = MixedOrder(order.orders, order.names, order.weights, order.max_epochs,
                                      start=where, bases=bases)

    def close(self) -> None:
        """Stop the DataLoader workers, if any (they restart from `position` on the next step),
        and let go of the shards this process holds."""
        if self._workers is not None:
            self._skipped |= self._workers.skipped
            self._workers.close()
            self._workers = None
        self.order.close()


def _describe(sources: list[dict[str, Any]]) -> str:
    return ", ".join(f"{s['name']} {s['weight']:g}" + (f" (max_epochs {s['max_epochs']})" if s["max_epochs"] else "")
                     for s in sources) or "none"


@dataclass
class HeldOut(Sequence[torch.Tensor]):
    """A rank's fixed held-out micro-batches ([micro_batch_size, seq_len+1] int64 each), and
    which source each of their samples came from (`sources[b][i]` indexes `names`), so that a
    mixture's evaluation can report every source's own loss."""

    batches: list[torch.Tensor]
    sources: list[torch.Tensor]
    names: list[str]

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i):
        return self.batches[i]

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.batches)


def eval_batches(data: "str | DatasetIndex | Sequence[Source]", seq_len: int, micro_batch_size: int, dp_rank: int,
                 dp_size: int, num_batches: int, cache: NodeCache | None = None, on_corrupt_shard: str = "error",
                 block_shards: int = DEFAULT_BLOCK_SHARDS) -> HeldOut:
    """A fixed held-out slice of the "val" split: the same micro-batches on every call.

    Rank r gets batches b = 0..num_batches-1 at positions (b*dp_size + r)*micro_batch_size of
    one fixed order, so the ranks together cover num_batches*dp_size*micro_batch_size samples.
    A mixture's held-out samples are its sources' val splits dealt by the same weights (no
    epoch caps), so the eval loss is that of the mixture the run trains on.
    """
    order = mixed_order(data, "val", seq_len, EVAL_SEED, block_shards=block_shards, cache=cache,
                        on_corrupt_shard=on_corrupt_shard, caps=False)
    needed = num_batches * dp_size * micro_batch_size
    for name, own, taken in zip(order.names, order.orders, order.taken(needed)):
        if taken > own.num_samples:
            log.warning("evaluation asks for %d samples of %s but split %r holds %d; some repeat",
                        taken, name, own.split, own.num_samples)
    starts = [(b * dp_size + dp_rank) * micro_batch_size for b in range(num_batches)]
    held_out = HeldOut([order.batch(p, micro_batch_size) for p in starts],
                       [torch.from_numpy(order.sources_of(p, micro_batch_size)) for p in starts], list(order.names))
    order.close()  # made once: its shards need not stay pinned in the node cache
    return held_out


def check_vocab(index: DatasetIndex, model_vocab_size: int) -> None:
    """Refuse a model whose embedding cannot hold every token id of the dataset."""
    tok = index.tokenizer
    if tok.vocab_size > model_vocab_size:
        raise DatasetError(
            f"dataset {index.url} was made with tokenizer {tok.name} (vocab {tok.vocab_size}); "
            f"model.vocab_size is {model_vocab_size}. Set model.vocab_size={tok.vocab_size} or more"
        )
