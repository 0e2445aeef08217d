"""`python -m storage.prepare` and the builtin dataset: what a user runs to make data."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from storage import builtin
from storage.builtin import ensure_builtin_dataset
from storage.prepare import main, split_of
from storage.shards import INDEX_FILE, DatasetError, read_index, read_shard
from tests.distributed import REPO, base_env, spawn

SMALL_STDLIB = 400_000  # bytes of stdlib source: enough for a few shards, fast to build


def _corpus(root: Path) -> Path:
    root.mkdir()
    (root / "a.py").write_text("print('a')\n")
    (root / "sub").mkdir()
    (root / "sub" / "b.txt").write_text("bé text\n")
    (root / "sub" / "skip.bin").write_bytes(b"\x00\x01")
    (root / "empty.md").write_text("")
    return root


def _text(index, split: str) -> bytes:
    return b"".join(bytes(np.asarray(read_shard(index, e)).astype(np.uint8)) for e in index.splits.get(split, []))


def test_prepare_text_directory(tmp_path, capsys):
    out = str(tmp_path / "ds")
    assert main(["--input", str(_corpus(tmp_path / "in")), "--output", out, "--val-fraction", "0"]) == 0
    index = read_index(out)
    # sorted files, each one document followed by eos (0); empty files and non-matching names skipped
    assert _text(index, "train") == "print('a')\n\0bé text\n\0".encode()
    assert index.tokenizer.name == "byte" and index.tokenizer.eos_id == 0
    stdout = capsys.readouterr().out
    assert f"wrote {out}: 2 documents (0 val)" in stdout and f"data.url={out}" in stdout


def test_prepare_jsonl_one_document_per_line(tmp_path):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"body": "one"}\n\n{"body": "two", "id": 2}\n')
    out = str(tmp_path / "ds")
    assert main(["--input", str(src), "--output", out, "--jsonl-key", "body", "--val-fraction", "0"]) == 0
    assert _text(read_index(out), "train") == b"one\0two\0"


def test_split_is_decided_by_content_hash(tmp_path):
    docs = [f"document number {i}\n" for i in range(400)]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs + docs[:50]))
    for name in ("a", "b"):
        assert main(["--input", str(src), "--output", str(tmp_path / name), "--val-fraction", "0.1"]) == 0
    a, b = read_index(str(tmp_path / "a")), read_index(str(tmp_path / "b"))
    assert a.splits == b.splits  # same inputs, same shards (sha256 included)
    val_docs = _text(a, "val").split(b"\0")[:-1]
    assert 15 <= len(set(val_docs)) <= 70  # about 10% of 400
    # duplicates land with their original: val holds both copies or none
    assert all(val_docs.count(d) == (2 if int(d.split()[2]) < 50 else 1) for d in val_docs)
    assert set(val_docs) == {d.encode() for d in docs if split_of(d.encode(), 0.1) == "val"}


def test_prepare_refuses_existing_output_without_overwrite(tmp_path, caplog):
    corpus, out = _corpus(tmp_path / "in"), tmp_path / "ds"
    assert main(["--input", str(corpus), "--output", str(out)]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    (corpus / "new.txt").write_text("more text")
    assert main(["--input", str(corpus), "--output", str(out)]) == 1
    assert "already holds a dataset (index.json exists); pass --overwrite" in caplog.text
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert main(["--input", str(corpus), "--output", str(out), "--overwrite"]) == 0
    assert b"more text" in _text(read_index(str(out)), "train")


def test_prepare_refuses_output_of_an_interrupted_run(tmp_path, caplog):
    out = tmp_path / "ds"
    (out / "train").mkdir(parents=True)
    (out / "train" / "shard-00000.bin").write_bytes(b"\x01\x00" * 8)
    args = ["--input", str(_corpus(tmp_path / "in")), "--output", str(out)]
    assert main(args) == 1
    assert "holds shards but no index.json: an earlier prepare was interrupted" in caplog.text
    assert main([*args, "--overwrite"]) == 0 and read_index(str(out)).total_tokens["train"] > 0


def test_prepare_jsonl_bad_line_names_file_and_line(tmp_path, caplog):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"text": "fine"}\n{"text": "fine too"}\n{"text": oops}\n')
    out = tmp_path / "ds"
    assert main(["--input", str(src), "--output", str(out)]) == 1
    assert f"{src}:3: not valid JSON" in caplog.text
    assert not out.exists()  # nothing half-made left behind, so a fixed input needs no --overwrite
    src.write_text('{"text": "fine"}\n')
    assert main(["--input", str(src), "--output", str(out)]) == 0


def test_prepare_jsonl_missing_key_lists_the_keys(tmp_path, caplog):
    src = tmp_path / "docs.jsonl"
    src.write_text('{"content": "x", "id": 1}\n')
    assert main(["--input", str(src), "--output", str(tmp_path / "ds")]) == 1
    assert f"{src}:1: no 'text' key (keys: content, id); choose one with --jsonl-key" in caplog.text


def test_prepare_missing_input_is_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "storage.prepare", "--input", str(tmp_path / "missing.txt"),
         "--output", str(tmp_path / "ds")],
        cwd=REPO, capture_output=True, text=True, env=base_env(), timeout=60,
    )
    assert proc.returncode == 1 and proc.stdout == ""
    assert proc.stderr.strip() == f"storage.prepare: error: input not found: {tmp_path / 'missing.txt'}"
    assert not (tmp_path / "ds").exists()


def test_builtin_dataset_is_built_once_and_reused(tmp_path, monkeypatch):
    url = ensure_builtin_dataset("stdlib", str(tmp_path), SMALL_STDLIB)
    index = read_index(url)
    assert Path(url).parent == tmp_path / "datasets" and Path(url).name.startswith("stdlib-py3")
    assert index.has_split("train") and index.has_split("val") and index.tokenizer.vocab_size == 256
    assert sum(index.total_tokens.values()) <= SMALL_STDLIB + len(builtin.stdlib_files(SMALL_STDLIB))
    monkeypatch.setattr(builtin, "_build", lambda *a: pytest.fail("rebuilt a complete dataset"))
    assert ensure_builtin_dataset("stdlib", str(tmp_path), SMALL_STDLIB) == url
    assert [p.name for p in (tmp_path / "datasets").iterdir() if p.is_dir()] == [Path(url).name]


def test_builtin_dataset_depends_on_max_bytes(tmp_path):
    assert (ensure_builtin_dataset("stdlib", str(tmp_path), SMALL_STDLIB)
            != ensure_builtin_dataset("stdlib", str(tmp_path), SMALL_STDLIB // 2))


def test_unknown_builtin_is_refused(tmp_path):
    with pytest.raises(DatasetError, match="unknown builtin dataset 'wiki'; known: stdlib"):
        ensure_builtin_dataset("wiki", str(tmp_path), SMALL_STDLIB)


def _build_on_rank(rank: int, world_size: int, cache_dir: str) -> tuple[str, dict]:
    url = ensure_builtin_dataset("stdlib", cache_dir, SMALL_STDLIB)
    return url, {e.file: e.sha256 for e in read_index(url).splits["train"]}


def test_concurrent_builtin_build(tmp_path):
    results = spawn(_build_on_rank, 2, str(tmp_path))
    assert results[0] == results[1]
    entries = sorted(os.listdir(tmp_path / "datasets"))
    assert [e for e in entries if not e.endswith(".lock")] == [Path(results[0][0]).name]  # no temp dirs left
    assert (Path(results[0][0]) / INDEX_FILE).exists()
