"""The streaming dataset: which tokens each rank trains on at each step, resumable anywhere.

The global order of samples (storage/order.py) is a pure function of (seed, epoch, position),
never of the world size. `position` counts samples consumed since the start of training over
all ranks, so a run resumed from a checkpoint on any number of ranks continues at the same
sample, with none lost or repeated. Here: each step's global batch is split over the
data-parallel ranks and into micro-batches, optionally by DataLoader worker processes.

Remote shards go through a node cache when one is given (storage/cache.py): while a rank reads
one shard, background threads fetch the next `prefetch_shards` of the order into it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from storage.cache import NodeCache
from storage.order import SampleOrder
from storage.shards import DatasetError, DatasetIndex, read_index

log = logging.getLogger(__name__)

EVAL_SEED = 0  # eval_batches uses one fixed order, whatever the training seed


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
