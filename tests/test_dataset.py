"""The streaming dataset: order independent of world size, exact resume, workers equal inline."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

from storage.dataset import BatchStream, check_vocab, eval_batches
from storage.mixture import Source
from storage.order import DEFAULT_BLOCK_SHARDS, SampleOrder
from storage.shards import CorruptShardError, DatasetError, ShardWriter, TokenizerInfo, read_index, read_shard
from storage.tokenizer import ByteTokenizer

SEQ = 16
BYTE = TokenizerInfo.of(ByteTokenizer())


def _make(url: str, train_tokens: int, val_tokens: int = 0, shard_tokens: int = 1000) -> str:
    """A dataset whose token at each place is distinct enough that windows can be told apart."""
    writer = ShardWriter(url, BYTE, shard_tokens=shard_tokens)
    rng = np.random.default_rng(0)
    writer.add(rng.integers(1, 256, train_tokens), "train")
    if val_tokens:
        writer.add(rng.integers(1, 256, val_tokens), "val")
    writer.close()
    return url


@pytest.fixture(scope="module")
def ds(tmp_path_factory) -> str:
    # shards of 1000, 1000, 1000, 500 tokens: 62, 62, 62, 31 windows of SEQ+1 at stride SEQ
    return _make(str(tmp_path_factory.mktemp("data") / "ds"), 3500, val_tokens=400)


def _steps(url: str, steps: int, dp_size: int, *, G: int = 16, mbs: int = 2, seed: int = 7,
           workers: int = 0, start: dict | None = None) -> list[torch.Tensor]:
    """Samples of `steps` global steps in position order, gathered from every rank's stream."""
    streams = [BatchStream(url, "train", SEQ, seed, G, mbs, r, dp_size, num_workers=workers)
               for r in range(dp_size)]
    for s in streams:
        if start is not None:
            s.load_state_dict(start)
    out = []
    for _ in range(steps):
        per_rank = [s.next_step() for s in streams]
        accum = len(per_rank[0])
        # micro step k of rank r holds positions P + (k*dp_size + r)*mbs + [0, mbs)
        out.extend(per_rank[r][k] for k in range(accum) for r in range(dp_size))
    return [row for batch in out for row in batch]


def _at(url: str, position: int, seed: int = 7) -> dict:
    """A checkpointed data state at `position` of the order _steps reads."""
    return BatchStream(url, "train", SEQ, seed, 16, 2, 0, 1).state_dict() | {"position": position}


def _equal(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_every_sample_seen_once_per_epoch(ds):
    order = SampleOrder(read_index(ds), "train", SEQ, seed=3)
    assert order.num_samples == 62 * 3 + 31
    all_windows = {(s, w) for s, n in enumerate([62, 62, 62, 31]) for w in range(n)}
    epoch0 = [order.locate(p) for p in range(order.num_samples)]
    epoch1 = [order.locate(p) for p in range(order.num_samples, 2 * order.num_samples)]
    assert set(epoch0) == all_windows and len(epoch0) == len(all_windows)
    assert set(epoch1) == all_windows and epoch1 != epoch0


def test_samples_are_windows_of_seq_len_plus_one_at_stride_seq_len(ds):
    index = read_index(ds)
    order = SampleOrder(index, "train", SEQ, seed=3)
    shard, window = order.locate(5)
    tokens = np.asarray(read_shard(index, index.splits["train"][shard]))
    assert np.array_equal(order.sample(5), tokens[window * SEQ: window * SEQ + SEQ + 1])
    batch = order.batch(0, 4)
    assert batch.dtype == torch.int64 and batch.shape == (4, SEQ + 1)


def test_order_is_seeded(ds):
    index = read_index(ds)
    a, b, c = (SampleOrder(index, "train", SEQ, seed) for seed in (1, 1, 2))
    first = [a.locate(p) for p in range(50)]
    assert first == [b.locate(p) for p in range(50)] and first != [c.locate(p) for p in range(50)]


def test_order_does_not_depend_on_world_size(ds):
    one = _steps(ds, 5, dp_size=1)
    assert _equal(one, _steps(ds, 5, dp_size=2)) and _equal(one, _steps(ds, 5, dp_size=4))
    assert len(one) == 5 * 16


def test_accumulation_steps_follow_from_the_batch(ds):
    s = BatchStream(ds, "train", SEQ, 7, global_batch_samples=16, micro_batch_size=2, dp_rank=1, dp_size=2)
    batches = s.next_step()
    assert s.accum_steps == 4 and len(batches) == 4 and batches[0].shape == (2, SEQ + 1)
    assert s.state_dict()["position"] == 16


def test_resume_continues_at_same_position(ds):
    uninterrupted = _steps(ds, 6, dp_size=1)
    first = BatchStream(ds, "train", SEQ, 7, 16, 2, 0, 1)
    for _ in range(3):
        first.next_step()
    state = first.state_dict()
    assert {k: state[k] for k in ("position", "seed", "seq_len", "split")} == {
        "position": 48, "seed": 7, "seq_len": SEQ, "split": "train"}
    assert json.loads(state["order"]) == {"block_shards": DEFAULT_BLOCK_SHARDS, "start": 0, "sources": [
        {"name": "ds", "weight": 1.0, "max_epochs": 0, "base": 0, "taken": 48}]}
    assert _equal(_steps(ds, 3, dp_size=1, start=state), uninterrupted[48:])


def test_resume_on_more_ranks_continues_data(ds):
    """A checkpoint written by 2 ranks resumes on 4 with no sample lost or repeated."""
    uninterrupted = _steps(ds, 20, dp_size=1)  # 320 samples: crosses the 217-sample epoch
    assert _equal(_steps(ds, 16, dp_size=4, start=_at(ds, 64)), uninterrupted[64:])


def test_resume_refuses_other_seq_len_or_seed(ds):
    s = BatchStream(ds, "train", SEQ, 7, 16, 2, 0, 1)
    with pytest.raises(DatasetError, match=r"made with seq_len 32 \(now 16\); .*same seq_len, seed, split"):
        s.load_state_dict(_at(ds, 16) | {"seq_len": 32})
    with pytest.raises(DatasetError, match=r"made with seed 8 \(now 7\);"):
        s.load_state_dict(_at(ds, 16) | {"seed": 8})


def test_workers_give_same_batches_as_inline(ds):
    assert _equal(_steps(ds, 7, dp_size=2, workers=2), _steps(ds, 7, dp_size=2))
    state = _at(ds, 32)
    assert _equal(_steps(ds, 5, dp_size=1, workers=2, start=state), _steps(ds, 5, dp_size=1, start=state))


@pytest.mark.filterwarnings("ignore:This DataLoader will create 3 worker processes")
def test_workers_give_the_inline_batches_over_many_items(ds):
    """Each worker sends 32 of its steps per item here (small steps); 150 steps on 1 and 3
    workers cross several items of every worker and several epochs."""
    inline = _steps(ds, 150, dp_size=1)
    assert _equal(_steps(ds, 150, dp_size=1, workers=2), inline)
    assert _equal(_steps(ds, 150, dp_size=1, workers=3), inline)


def _until_error(data, workers: int, **kw) -> tuple[list[torch.Tensor], int, DatasetError]:
    """Every step's micro-batches until next_step raises; (batches, steps served, the error)."""
    stream = BatchStream(data, "train", SEQ, 7, 16, 2, 0, 1, num_workers=workers, **kw)
    batches = []
    with pytest.raises(DatasetError) as err:
        for _ in range(1000):
            batches.extend(stream.next_step())
    stream.close()
    return batches, len(batches) // stream.accum_steps, err.value


def test_workers_serve_a_capped_source_to_its_last_step_then_stop_as_inline(ds):
    """The data ends inside a worker's item: the steps before the end still arrive, and the
    end is reported at the same step, with the same message, as without workers."""
    capped = [Source("ds", ds, max_epochs=1)]  # 217 samples: 13 whole steps of 16
    inline, steps, error = _until_error(capped, workers=0)
    batches, worker_steps, worker_error = _until_error(capped, workers=2)
    assert steps == worker_steps == 13 and _equal(batches, inline)
    assert str(worker_error) == str(error) and "served its max_epochs" in str(error)


def test_a_workers_corrupt_shard_stops_at_its_step_with_the_inline_message(tmp_path):
    url = _make(str(tmp_path / "ds"), 3500)
    index = read_index(url)
    shard, _ = SampleOrder(index, "train", SEQ, 7, block_shards=1).locate(100)  # one shard at a time
    path = tmp_path / "ds" / index.splits["train"][shard].file
    path.write_bytes(b"\xff" * path.stat().st_size)
    inline, steps, error = _until_error(url, workers=0, block_shards=1)
    batches, worker_steps, worker_error = _until_error(url, workers=2, block_shards=1)
    assert steps == worker_steps > 1 and _equal(batches, inline)
    assert type(worker_error) is CorruptShardError and str(worker_error) == str(error)
    assert len(str(error).splitlines()) == 1 and str(error).startswith("corrupt shard ")


def test_workers_restart_from_loaded_state(ds):
    stream = BatchStream(ds, "train", SEQ, 7, 16, 2, 0, 1, num_workers=2)
    for _ in range(4):  # workers have prefetched steps beyond this
        stream.next_step()
    stream.load_state_dict(_at(ds, 16))
    expected = _steps(ds, 1, dp_size=1, start=_at(ds, 16))
    assert _equal([row for b in stream.next_step() for row in b], expected)


def test_indivisible_global_batch_names_the_numbers(ds):
    with pytest.raises(DatasetError, match="global batch of 12 samples is not a positive multiple of "
                                           "micro_batch_size 2 x data-parallel size 4 = 8"):
        BatchStream(ds, "train", SEQ, 7, 12, 2, 0, 4)


def test_seq_len_longer_than_every_shard_is_explained(ds):
    with pytest.raises(DatasetError, match="holds no sample of seq_len\\+1 = 2049 tokens.*lower data.seq_len"):
        BatchStream(ds, "train", 2048, 7, 16, 2, 0, 1)


def test_eval_batches_are_fixed_val_samples(ds):
    a = eval_batches(ds, SEQ, micro_batch_size=2, dp_rank=0, dp_size=2, num_batches=3)
    b = eval_batches(ds, SEQ, micro_batch_size=2, dp_rank=0, dp_size=2, num_batches=3)
    other_rank = eval_batches(ds, SEQ, micro_batch_size=2, dp_rank=1, dp_size=2, num_batches=3)
    assert _equal(a, b) and len(a) == 3 and a[0].shape == (2, SEQ + 1)
    assert not torch.equal(a[0], other_rank[0])
    index = read_index(ds)
    val = np.asarray(read_shard(index, index.splits["val"][0]))
    windows = {tuple(val[w * SEQ: w * SEQ + SEQ + 1]) for w in range((len(val) - 1) // SEQ)}
    assert all(tuple(row.tolist()) in windows for batch in a for row in batch)


def test_eval_without_val_split_warns_and_uses_train(tmp_path, caplog):
    url = _make(str(tmp_path / "ds"), 500)
    with caplog.at_level(logging.WARNING):
        batches = eval_batches(url, SEQ, 2, 0, 1, 2)
    assert len(batches) == 2 and "has no val split; evaluating on train samples" in caplog.text


def test_check_vocab_refuses_small_model(ds):
    check_vocab(read_index(ds), 256)
    with pytest.raises(DatasetError, match=r"made with tokenizer byte \(vocab 256\); model.vocab_size is 128"):
        check_vocab(read_index(ds), 128)
