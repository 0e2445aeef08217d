"""Every step mixes many shards and, with several datasets, each in its weight; the order stays
a pure function of (seed, epoch, position), so any world size and any resume read it alike.

The datasets here are small and local: two sources whose token values do not overlap (source
"a" uses ids 1..127, "b" 128..255), so a sample says by its first token which source it came
from, and every window of a dataset is distinct, so a sample says which window it is.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from storage.cache import NodeCache
from storage.dataset import BatchStream, eval_batches
from storage.mixture import Interleave, Source, mixed_order, shares
from storage.order import SampleOrder
from storage.shards import DatasetError, ShardWriter, TokenizerInfo, read_index
from storage.tokenizer import ByteTokenizer
from tests.conftest import FAST
from tests.distributed import base_env, train

SEQ = 16
BYTE = TokenizerInfo.of(ByteTokenizer())


def _make(url: str, low: int, high: int, train_tokens: int, val_tokens: int = 0, shard_tokens: int = 1000,
          tokenizer: TokenizerInfo = BYTE, seed: int = 0) -> str:
    writer = ShardWriter(url, tokenizer, shard_tokens=shard_tokens)
    rng = np.random.default_rng(seed)
    writer.add(rng.integers(low, high, train_tokens), "train")
    if val_tokens:
        writer.add(rng.integers(low, high, val_tokens), "val")
    writer.close()
    return url


@pytest.fixture(scope="module")
def two(tmp_path_factory) -> tuple[str, str]:
    """Source a: 12 shards of 62 windows and one of 31 (775 samples); source b: 4 shards of 62
    (248 samples), so that b repeats while a is in its first epoch."""
    root = tmp_path_factory.mktemp("mix")
    return (_make(str(root / "a"), 1, 128, 12_500, val_tokens=400),
            _make(str(root / "b"), 128, 256, 4_000, val_tokens=400, seed=1))


def _source(row) -> str:
    return "a" if int(row[0]) < 128 else "b"


def _rows(streams: list[BatchStream], steps: int) -> list[tuple]:
    """Samples of `steps` global steps in position order, gathered from every rank's stream."""
    out = []
    for _ in range(steps):
        per_rank = [s.next_step() for s in streams]
        dp = len(streams)
        # micro step k of rank r holds positions P + (k*dp + r)*mbs + [0, mbs)
        for k in range(len(per_rank[0])):
            for r in range(dp):
                out.extend(tuple(row.tolist()) for row in per_rank[r][k])
    return out


def _streams(data, dp: int, *, block: int = 4, G: int = 16, mbs: int = 2, seed: int = 7,
             state: dict | None = None, workers: int = 0) -> list[BatchStream]:
    streams = [BatchStream(data, "train", SEQ, seed, G, mbs, r, dp, num_workers=workers, block_shards=block)
               for r in range(dp)]
    for s in streams:
        if state is not None:
            s.load_state_dict(state)
    return streams


def _windows(url: str) -> list[tuple]:
    order = SampleOrder(read_index(url), "train", SEQ, seed=0)
    return sorted(tuple(order.sample(p).tolist()) for p in range(order.num_samples))


def _mix(two, wa: float = 0.75, wb: float = 0.25, **caps) -> list[Source]:
    a, b = two
    return [Source("a", a, wa, caps.get("a", 0)), Source("b", b, wb, caps.get("b", 0))]


# -- one dataset: the block shuffle ---------------------------------------------------------


def test_every_global_batch_draws_on_many_shards(two):
    """Steps of 32 samples with blocks of 8 of the 13 shards: each step takes from most of its
    block; one shard at a time (data.shuffle=false), a step takes from one or two."""
    index = read_index(two[0])
    mixed, before = (SampleOrder(index, "train", SEQ, seed=7, block_shards=b) for b in (8, 1))
    steps = mixed.num_samples // 32
    mixed_shards = [len({mixed.locate(p)[0] for p in range(s * 32, s * 32 + 32)}) for s in range(steps)]
    before_shards = [len({before.locate(p)[0] for p in range(s * 32, s * 32 + 32)}) for s in range(steps)]
    assert min(mixed_shards) >= 4 and np.mean(mixed_shards) >= 6, mixed_shards
    assert max(before_shards) <= 2, before_shards


def test_shuffle_false_is_the_order_before_blocks(two):
    """A block of one shard: shards in the permutation seeded by (seed, epoch), each shard's
    windows in the one seeded by (seed, epoch, shard): the harness's order before blocks."""
    index = read_index(two[0])
    order = SampleOrder(index, "train", SEQ, seed=7, block_shards=1)

    def rng(*key):
        return np.random.Generator(np.random.PCG64(np.random.SeedSequence(list(key))))

    expected = []
    for epoch in (0, 1):
        for shard in rng(7, epoch, 0).permutation(len(order.counts)):
            expected += [(int(shard), int(w)) for w in rng(7, epoch, 1, shard).permutation(order.counts[shard])]
    assert [order.locate(p) for p in range(2 * order.num_samples)] == expected


@pytest.mark.parametrize("block", [1, 4, 64])
def test_epoch_seen_exactly_once_on_1_2_and_4_ranks(two, block):
    a = two[0]
    one = _rows(_streams(a, 1, block=block), 48)  # 768 of the epoch's 775 samples
    assert one == _rows(_streams(a, 2, block=block), 48) == _rows(_streams(a, 4, block=block), 48)
    epoch = _windows(a)
    assert len(set(one)) == len(one) and set(one) <= set(epoch) and len(epoch) - len(one) == 775 - 768


def test_resume_from_4_ranks_on_2_continues_the_block_shuffle(two):
    a = two[0]
    uninterrupted = _rows(_streams(a, 1), 60)  # crosses into epoch 1
    four = _streams(a, 4)
    first = _rows(four, 20)
    state = four[0].state_dict()
    assert all(s.state_dict() == state for s in four)
    rest = _rows(_streams(a, 2, state=state), 40)
    assert first + rest == uninterrupted
    assert sorted(uninterrupted[:775]) == _windows(a)  # the first 775 samples: the epoch, once each


def test_corrupt_shard_is_replaced_from_its_own_block(tmp_path):
    """on_corrupt_shard=skip with blocks: the bad shard's samples come from the next readable
    shard of the same block, so the epoch keeps its size and the cache's need stays two blocks."""
    url = _make(str(tmp_path / "ds"), 1, 256, 8_000)  # 8 shards of 62 windows
    order = SampleOrder(read_index(url), "train", SEQ, seed=3, block_shards=4)
    bad = order.locate(0)[0]
    block = order.block_at(0)
    shard = tmp_path / "ds" / order.shards[bad].file
    data = bytearray(shard.read_bytes())
    data[10] ^= 0xFF
    shard.write_bytes(bytes(data))
    skipping = SampleOrder(read_index(url), "train", SEQ, seed=3, block_shards=4, on_corrupt_shard="skip")
    out = np.empty((skipping.num_samples, SEQ + 1), dtype=skipping.dtype)
    skipping.fill(0, out)
    assert list(skipping.skipped) == [order.shards[bad].file]
    positions = [p for p in range(order.num_samples) if order.locate(p)[0] == bad]
    substitutes = {tuple(out[p]) for p in positions}
    from_block = {tuple(skipping.sample(p).tolist()) for p in range(order.num_samples)
                  if order.locate(p)[0] in set(block) - {bad}}
    assert substitutes <= from_block and len(positions) == 62


def test_legacy_state_resumes_only_the_order_before_blocks(two):
    legacy = {"position": 32, "seed": 7, "seq_len": SEQ, "split": "train"}  # saved before blocks
    before = _streams(two[0], 1, block=1, state=legacy)
    assert _rows(before, 2) == _rows(_streams(two[0], 1, block=1), 4)[32:]
    with pytest.raises(DatasetError, match=r"shuffle_block_shards 1 \(now 4\).*data.shuffle=false"):
        _streams(two[0], 1, block=4, state=legacy)


def test_checkpoint_from_before_blocks_resumes_and_a_missing_tensor_is_named(two, tmp_path):
    """A checkpoint written before data states had "order" resumes its order; one that lacks
    what the run needs (here a weight) is refused in one line that says what to do."""
    import torch

    from storage.checkpoint import Checkpointer, CheckpointError

    ckpt = Checkpointer(str(tmp_path), keep_last=0, rank=0, world_size=1)
    legacy = {"position": 32, "seed": 7, "seq_len": SEQ, "split": "train"}
    ckpt.save(2, {"data": legacy, "app": {"w": torch.ones(3)}}, {"model": "x"})
    stream, weights = _streams(two[0], 1, block=1)[0], {"w": torch.zeros(3)}
    ckpt.load(ckpt.latest(), {"data": stream, "app": weights}, {"model": "x"})
    assert stream.position == 32 and torch.equal(weights["w"], torch.ones(3))
    assert _rows([stream], 2) == _rows(_streams(two[0], 1, block=1), 4)[32:]
    with pytest.raises(CheckpointError, match=r"holds no app.v, which this run needs: .* start a new checkpoint.url"):
        ckpt.load(ckpt.latest(), {"data": stream, "app": {"w": torch.zeros(3), "v": torch.zeros(2)}}, {"model": "x"})


# -- mixtures --------------------------------------------------------------------------------


def test_every_step_holds_both_sources_in_their_weights(two):
    """Read back from the samples themselves: 24 of every 32 from a, 8 from b, on 1 and 2 ranks."""
    for dp in (1, 2):
        rows = _rows(_streams(_mix(two), dp, G=32, mbs=4), 40)  # 1280 samples: b is in its 6th epoch
        for step in range(40):
            counts = Counter(_source(r) for r in rows[step * 32:(step + 1) * 32])
            assert counts == {"a": 24, "b": 8}, (step, counts)
        assert rows == _rows(_streams(_mix(two), 1, G=32, mbs=4), 40)


def test_workers_give_the_same_mixed_batches_as_inline(two):
    inline = _rows(_streams(_mix(two), 2, G=32, mbs=4), 12)
    assert _rows(_streams(_mix(two), 2, G=32, mbs=4, workers=2), 12) == inline
    state = _streams(_mix(two), 1, G=32, mbs=4)[0].state_dict() | {"position": 5 * 32}
    assert _rows(_streams(_mix(two), 1, G=32, mbs=4, workers=2, state=state), 7) == inline[5 * 32:]


def test_proportions_over_1000_steps_within_one_percent(two):
    stream = _streams(_mix(two, 0.7, 0.3), 1, G=32, mbs=32)[0]
    counts = Counter()
    for _ in range(1000):
        counts.update(_source(r) for r in stream.next_step()[0].tolist())
    assert abs(counts["a"] / 32_000 - 0.7) < 0.01 and abs(counts["b"] / 32_000 - 0.3) < 0.01
    assert stream.source_tokens() == {"a": counts["a"] * SEQ, "b": counts["b"] * SEQ}


def test_counts_are_exact_over_every_period():
    deal = Interleave(shares([0.7, 0.2, 0.1]))
    assert deal.period == 10 and list(deal.share) == [7, 2, 1]
    for start in range(0, 40, 3):  # any 10 consecutive positions
        source, _ = deal.deal(np.arange(start, start + 10))
        assert Counter(source.tolist()) == {0: 7, 1: 2, 2: 1}
    source, index = deal.deal(np.arange(10_000))
    for s, share in enumerate((7, 2, 1)):  # each source's own positions: 0, 1, 2, ... in order
        assert index[source == s].tolist() == list(range(1000 * share))
        assert deal.taken(s, 10_000) == 1000 * share == deal.taken(s, 9_999) + (source[-1] == s)
    assert shares([1, 1, 1]) == [1, 1, 1] and shares([3, 1]) == [3, 1]
    assert sum(shares([1 / 3, 0.123456789])) == 1_000_000  # rounded where the exact period is too long


def test_small_source_repeats_and_each_source_runs_its_own_epochs(two):
    order = mixed_order(_mix(two), "train", SEQ, 7, block_shards=4)
    a_n, b_n = (o.num_samples for o in order.orders)
    taken = order.taken(4 * b_n * 4)  # b served 4 epochs
    assert taken == [3 * 4 * b_n, 4 * b_n]
    stream = _streams(_mix(two), 1, G=32, mbs=32)[0]
    rows = [tuple(r) for _ in range(4 * b_n * 4 // 32) for r in stream.next_step()[0].tolist()]
    b_rows = [r for r in rows if _source(r) == "b"]
    epochs = [b_rows[i * b_n:(i + 1) * b_n] for i in range(4)]
    assert all(sorted(e) == _windows(two[1]) for e in epochs) and epochs[0] != epochs[1]


def test_resume_on_fewer_ranks_continues_every_source_at_its_own_position(two):
    uninterrupted = _rows(_streams(_mix(two), 1, G=32, mbs=4), 30)
    four = _streams(_mix(two), 4, G=32, mbs=4)
    first = _rows(four, 11)
    state = four[0].state_dict()
    saved = {s["name"]: s["taken"] for s in json.loads(state["order"])["sources"]}
    assert saved == {"a": 11 * 24, "b": 11 * 8}
    assert first + _rows(_streams(_mix(two), 2, G=32, mbs=4, state=state), 19) == uninterrupted


def test_new_weights_on_resume_continue_each_source_where_it_was(two):
    first = _streams(_mix(two), 1, G=32, mbs=4)[0]
    before = _rows([first], 10)
    resumed = _streams(_mix(two, 0.5, 0.5), 1, G=32, mbs=4, state=first.state_dict())[0]
    after = _rows([resumed], 10)
    assert all(Counter(_source(r) for r in after[i:i + 32]) == {"a": 16, "b": 16} for i in range(0, 320, 32))
    a_order = [r for r in _rows(_streams(two[0], 1, G=32, mbs=4), 20)]  # a alone: its own order
    assert [r for r in before + after if _source(r) == "a"] == a_order[:240 + 160]
    assert resumed.source_tokens() == {"a": (240 + 160) * SEQ, "b": (80 + 160) * SEQ}


def test_a_capped_source_leaves_and_the_others_take_its_place(two, caplog):
    stream = _streams(_mix(two, wa=0.5, wb=0.5, b=2), 1, G=32, mbs=32)[0]
    b_n = stream.order.orders[1].num_samples  # 248: b's 2 epochs end at global sample 991
    with caplog.at_level("INFO"):
        rows = [tuple(r) for _ in range(40) for r in stream.next_step()[0].tolist()]
    b_rows = [i for i, r in enumerate(rows) if _source(r) == "b"]
    assert len(b_rows) == 2 * b_n and b_rows[-1] < 2 * 2 * b_n
    assert all(_source(r) == "a" for r in rows[2 * 2 * b_n:])
    assert stream.source_tokens() == {"a": (1280 - 2 * b_n) * SEQ, "b": 2 * b_n * SEQ}
    assert "data source b has served its max_epochs" in caplog.text


def test_when_every_source_is_capped_the_data_ends_with_a_clear_message(two):
    stream = _streams(_mix(two, a=1, b=1), 1, G=32, mbs=32)[0]
    assert stream.end_position == 775 + 248  # every sample of each, once
    rows = [tuple(r) for _ in range(31) for r in stream.next_step()[0].tolist()]
    assert len(set(rows)) == len(rows) == 992
    with pytest.raises(DatasetError, match=r"every source of data.sources has served its max_epochs "
                                           r"\(a 1, b 1\) after 1023 samples"):
        stream.next_step()


def test_held_out_batches_mix_the_val_splits_by_weight(two):
    batches = eval_batches(_mix(two), SEQ, micro_batch_size=8, dp_rank=0, dp_size=1, num_batches=4)
    counts = Counter(_source(r) for b in batches for r in b.tolist())
    assert counts == {"a": 24, "b": 8}
    val = {tuple(int(t) for t in w) for url in two for w in _val_windows(url)}
    assert all(tuple(r) in val for b in batches for r in b.tolist())
    # each sample's recorded source (for the per-source held-out loss) is the one it came from
    assert [batches.names[int(i)] for s in batches.sources for i in s] == [_source(r) for b in batches for r in b]


def _val_windows(url: str) -> list[np.ndarray]:
    order = SampleOrder(read_index(url), "val", SEQ, seed=0)
    return [order.sample(p) for p in range(order.num_samples)]


# -- refusals --------------------------------------------------------------------------------


def test_sources_with_different_tokenizers_are_refused_naming_both(two, tmp_path):
    other = TokenizerInfo("llama3", 256, 0, "0123456789abcdef0123")
    c = _make(str(tmp_path / "c"), 128, 256, 2_000, tokenizer=other)
    with pytest.raises(DatasetError, match=r"data.sources mixes tokenizers: a \(.*/a\) was made with tokenizer "
                                           r"byte \(fingerprint byte-v1\), c \(.*/c\) with tokenizer llama3 "
                                           r"\(fingerprint 0123456789ab\)"):
        BatchStream([Source("a", two[0]), Source("c", c)], "train", SEQ, 7, 16, 2, 0, 1)


@pytest.mark.parametrize("bad, message", [
    ({"weight": 0.0}, r"data.sources\[1\] \(b\): weight must be a positive number, got 0.0"),
    ({"name": "a"}, r"data.sources\[0\] and \[1\] are both named 'a': give every source its own name"),
])
def test_bad_sources_are_refused(two, bad, message):
    sources = [Source("a", two[0]), Source(**{"name": "b", "dataset": two[1], **bad})]
    with pytest.raises(DatasetError, match=message):
        mixed_order(sources, "train", SEQ, 7)


def test_block_larger_than_the_cache_limit_is_refused(two, tmp_path):
    from tests.test_cache import RemoteDir  # noqa: F401 - registers cachetest://, a remote the cache must hold

    remote = f"cachetest://{two[0]}"
    fits = NodeCache(str(tmp_path / "cache"), limit_bytes=(2 * 4 + 2) * 1000 * 2)  # 2 blocks of 4 + 2 ahead
    BatchStream(remote, "train", SEQ, 7, 16, 2, 0, 1, block_shards=4, cache=fits, prefetch_shards=2)
    small = NodeCache(str(tmp_path / "cache"), limit_bytes=fits.limit_bytes - 1)
    with pytest.raises(DatasetError, match=r"data.shuffle_block_shards=4 needs two blocks of 4 shards of every "
                                           r"remote source.*a \(cachetest://.*\) 19.5 KiB.*more than "
                                           r"storage.cache_limit_bytes=19999.*Lower data.shuffle_block_shards"):
        BatchStream(remote, "train", SEQ, 7, 16, 2, 0, 1, block_shards=4, cache=small, prefetch_shards=2)
    assert NodeCache(str(tmp_path / "cache")).downloads() == Counter()  # refused before any download


def test_unknown_field_in_a_source_is_refused_at_start_up(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "train.run", "data=mixture", "data.sources=[{name: a, url: /x, wieght: 0.5}]"],
        cwd=tmp_path, capture_output=True, text=True, env=base_env(), timeout=120)
    assert proc.returncode != 0 and "Key 'wieght' not in 'DataSourceConfig'" in proc.stderr, proc.stderr[-2000:]


# -- a real run ------------------------------------------------------------------------------


def test_source_tokens_add_up_to_tokens_seen_in_a_run(two, tmp_path: Path, harness_cache: Path):
    a, b = two
    sources = f"data.sources=[{{name: a, url: {a}, weight: 3}}, {{name: b, url: {b}, weight: 1}}]"
    run = train([*FAST, "data=mixture", sources, "data.seq_len=16", "data.num_workers=0",
                 "trainer.eval_batches=2", f"run.dir={tmp_path}/run"], cwd=tmp_path, cache_dir=harness_cache)
    assert run.returncode == 0, run.output[-3000:]
    rows = [r for r in run.metrics if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    for row in rows:
        assert sum(row["source_tokens"].values()) == row["tokens_seen"] == row["step"] * 2048
        assert row["source_tokens"] == {"a": row["tokens_seen"] * 3 // 4, "b": row["tokens_seen"] // 4}
    # The held-out loss of each source, and the mixture's is theirs weighted by their held-out samples.
    last = rows[-1]
    assert set(last["val_loss_by_source"]) == {"a", "b"}
    held_out = eval_batches(_mix(two, 3, 1), 16, micro_batch_size=4, dp_rank=0, dp_size=1, num_batches=2)
    counts = Counter(int(s) for batch in held_out.sources for s in batch)
    assert counts == {0: 6, 1: 2}  # the 3:1 weights over 8 held-out samples
    mixed = (6 * last["val_loss_by_source"]["a"] + 2 * last["val_loss_by_source"]["b"]) / 8
    assert last["val_loss"] == pytest.approx(mixed, rel=1e-9)
    assert "(a " in run.output and ", b " in run.output  # the log line names them too
    resolved = (run.run_dir / "config.yaml").read_text()
    assert "name: a" in resolved and "weight: 3" in resolved
