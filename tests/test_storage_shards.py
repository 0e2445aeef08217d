"""The shard format: what is written is read back exactly, and every broken dataset says what and where."""

from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest

from storage.fs import join, url_to_fs
from storage.shards import (INDEX_FILE, CorruptShardError, DatasetError, ShardWriter, TokenizerInfo,
                            read_index, read_shard)
from storage.tokenizer import ByteTokenizer, load_tokenizer

BYTE = TokenizerInfo.of(ByteTokenizer())


def _write(url: str, docs: list[bytes], shard_tokens: int = 100, split: str = "train"):
    writer = ShardWriter(url, BYTE, shard_tokens=shard_tokens)
    for d in docs:
        writer.add(np.frombuffer(d + b"\0", dtype=np.uint8), split)
    return writer.close()


def _all_tokens(index, split="train") -> np.ndarray:
    return np.concatenate([read_shard(index, e) for e in index.splits[split]])


def test_written_tokens_read_back_exactly_with_eos_after_each_document(tmp_path):
    docs = [b"hello world", b"x" * 250, b"last one"]
    _write(str(tmp_path / "ds"), docs, shard_tokens=100)
    index = read_index(str(tmp_path / "ds"))
    assert index.dtype == "<u2" and index.tokenizer == BYTE
    assert [e.tokens for e in index.splits["train"]] == [100, 100, 72]
    assert bytes(_all_tokens(index).astype(np.uint8)) == b"".join(d + b"\0" for d in docs)
    assert index.total_tokens == {"train": 272}
    body = json.loads((tmp_path / "ds" / INDEX_FILE).read_text())
    assert body["format"] == "train-harness.tokens/1" and "val" not in body["splits"]


def test_index_is_written_last(tmp_path):
    url = str(tmp_path / "ds")
    writer = ShardWriter(url, BYTE, shard_tokens=10)
    writer.add(np.arange(1, 50) % 256, "train")
    assert (tmp_path / "ds" / "train" / "shard-00000.bin").exists()
    with pytest.raises(DatasetError, match="incomplete: it holds shards but no index.json"):
        read_index(url)
    writer.close()
    assert read_index(url).total_tokens["train"] == 49


def test_failed_write_leaves_no_shards(tmp_path):
    url = str(tmp_path / "ds")
    with pytest.raises(RuntimeError):
        with ShardWriter(url, BYTE, shard_tokens=10) as writer:
            writer.add(np.ones(35, dtype=np.uint8), "train")
            raise RuntimeError("input broke")
    assert not (tmp_path / "ds").exists()
    (tmp_path / "keep").mkdir()
    (tmp_path / "keep" / "notes.txt").write_text("mine")
    with pytest.raises(RuntimeError):
        with ShardWriter(str(tmp_path / "keep"), BYTE, shard_tokens=10) as writer:
            writer.add(np.ones(35, dtype=np.uint8), "train")
            raise RuntimeError("input broke")
    assert [p.name for p in (tmp_path / "keep").iterdir()] == ["notes.txt"]


def test_large_vocab_uses_uint32(tmp_path):
    info = TokenizerInfo("big", 100_000, 99_999, "f")
    writer = ShardWriter(str(tmp_path / "ds"), info)
    writer.add(np.array([70_000, 99_999]), "train")
    index = writer.close()
    assert index.dtype == "<u4" and list(_all_tokens(index)) == [70_000, 99_999]


def test_corrupt_shard_names_the_shard(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, [b"a" * 150])
    shard = tmp_path / "ds" / "train" / "shard-00001.bin"
    data = bytearray(shard.read_bytes())
    data[3] ^= 0xFF
    shard.write_bytes(bytes(data))
    index = read_index(url)
    read_shard(index, index.splits["train"][0])  # the intact one still reads
    with pytest.raises(CorruptShardError) as e:
        read_shard(index, index.splits["train"][1])
    message = str(e.value)
    assert "train/shard-00001.bin" in message and index.splits["train"][1].sha256 in message
    assert "--overwrite" in message


def test_truncated_shard_reports_sizes(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, [b"a" * 150])
    shard = tmp_path / "ds" / "train" / "shard-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-2])
    index = read_index(url)
    with pytest.raises(CorruptShardError, match=r"shard-00000.bin: 198 bytes, expected 200"):
        read_shard(index, index.splits["train"][0])


def test_missing_shard_names_it(tmp_path):
    url = str(tmp_path / "ds")
    _write(url, [b"a" * 150])
    (tmp_path / "ds" / "train" / "shard-00001.bin").unlink()
    index = read_index(url)
    with pytest.raises(DatasetError, match="shard missing: .*train/shard-00001.bin"):
        read_shard(index, index.splits["train"][1])


def test_shard_is_hashed_once_per_process(tmp_path, monkeypatch):
    url = str(tmp_path / "ds")
    _write(url, [b"abc"])
    index = read_index(url)
    import storage.shards as shards

    calls = []
    real = shards.hashlib.sha256
    monkeypatch.setattr(shards.hashlib, "sha256", lambda *a: calls.append(1) or real(*a))
    first = read_shard(index, index.splits["train"][0])
    second = read_shard(index, index.splits["train"][0])
    assert len(calls) == 1 and first is second


def test_missing_dataset_message(tmp_path):
    url = str(tmp_path / "nope")
    with pytest.raises(DatasetError) as e:
        read_index(url)
    assert str(e.value).startswith(f"dataset not found: {url}")
    assert f"python -m storage.prepare --input FILES_OR_DIRS --output {url}" in str(e.value)


def test_directory_without_index_is_not_a_dataset(tmp_path):
    with pytest.raises(DatasetError, match="has no index.json, so it is not a prepared dataset"):
        read_index(str(tmp_path))


def test_unknown_format_is_refused(tmp_path):
    (tmp_path / INDEX_FILE).write_text(json.dumps({"format": "mosaic/2"}))
    with pytest.raises(DatasetError, match="unknown format 'mosaic/2'.*expected 'train-harness.tokens/1'"):
        read_index(str(tmp_path))


def test_empty_split_is_named(tmp_path):
    index = _write(str(tmp_path / "ds"), [b"abc"])
    with pytest.raises(DatasetError, match="no tokens in split 'val' \\(splits with tokens: train\\)"):
        index.shards("val")


def test_dataset_at_a_url_reads_back(tmp_path):
    """Any fsspec URL works, and non-local shards are read as bytes (memory:// stands in for S3)."""
    url = f"memory://{tmp_path.name}/ds"
    _write(url, [b"remote text"], shard_tokens=5)
    index = read_index(url)
    assert bytes(_all_tokens(index).astype(np.uint8)) == b"remote text\0"
    fs, path = url_to_fs(url)
    fs.rm(path, recursive=True)


def test_join_and_url_to_fs_take_paths_and_urls():
    assert join("s3://bucket/ds/", "train", "shard-00000.bin") == "s3://bucket/ds/train/shard-00000.bin"
    assert join("/data/ds", "index.json") == os.path.join("/data/ds", "index.json")
    assert join("~/ds", "x") == os.path.join(os.path.expanduser("~"), "ds", "x")
    fs, path = url_to_fs("~/ds")
    assert path == os.path.join(os.path.expanduser("~"), "ds")
    assert url_to_fs("file:///tmp/ds")[1] == "/tmp/ds"


def test_byte_tokenizer_round_trips_and_reserves_nul():
    tok = load_tokenizer("byte")
    ids = tok.encode("héllo\0!")
    assert ids.dtype == np.uint8 and tok.eos_id not in ids
    assert tok.decode(ids) == "héllo!" and tok.vocab_size == 256 and tok.fingerprint == "byte-v1"


def test_hf_tokenizer_without_package_says_how_to_install(tmp_path, monkeypatch):
    (tmp_path / "tokenizer.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)
    with pytest.raises(ImportError, match="pip install tokenizers"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))


def test_hf_tokenizer_reads_eos_and_fingerprint(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"hello": 0, "world": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    hf = load_tokenizer(str(tmp_path / "tokenizer.json"))
    assert hf.eos_id == 3 and hf.vocab_size == 4 and len(hf.fingerprint) == 64
    assert list(hf.encode("hello world hello")) == [0, 1, 0]
