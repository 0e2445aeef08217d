"""`python -m storage.prepare`: turn text or JSONL files into a token-shard dataset.

    python -m storage.prepare --input corpus/ more.jsonl --output s3://bucket/ds [--tokenizer byte]

Each text file is one document; each JSONL line is one document (its `--jsonl-key` field).
A document goes to the val split when a hash of its content falls under --val-fraction: no
RNG, so the same inputs always give the same dataset, and identical documents (duplicates)
always land in the same split, so val never holds a copy of a train document.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Iterable, Iterator

import numpy as np

from storage.fs import StorageError, check_reachable, configure, join, no_world_writable_files, url_to_fs
from storage.shards import (DEFAULT_SHARD_TOKENS, INDEX_FILE, SPLITS, DatasetError, DatasetIndex,
                            ShardWriter, TokenizerInfo)
from storage.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("storage.prepare")

DEFAULT_GLOB = "*.txt,*.md,*.rst,*.py,*.jsonl"
_PROGRESS_INTERVAL_S = 2.0


class PrepareError(DatasetError):
    """Bad input or output for prepare: reported as one line, exit code 1."""


@dataclass(frozen=True)
class InputFile:
    """One input file: its filesystem, path inside it, and the name shown to the user."""

    fs: object
    path: str
    name: str


@dataclass
class Stats:
    documents: int = 0
    val_documents: int = 0
    empty_documents: int = 0


def document_hash(document: bytes) -> int:
    """A 64-bit hash of a document's bytes: the document's identity for the split."""
    return int.from_bytes(hashlib.blake2b(document, digest_size=8).digest(), "little")


def split_of(document: bytes, val_fraction: float) -> str:
    """"val" or "train" from a hash of the document's bytes: deterministic, duplicates agree."""
    return "val" if document_hash(document) < val_fraction * 2**64 else "train"


def find_inputs(inputs: list[str], patterns: list[str]) -> list[InputFile]:
    """Files named by `inputs`: files as given, directories recursed (names matching
    `patterns`), globs expanded. Sorted within each input, so the dataset is reproducible."""
    found: list[InputFile] = []
    for spec in inputs:
        fs, path = url_to_fs(spec)
        name = (lambda p, fs=fs: p) if "://" not in spec else (lambda p, fs=fs: fs.unstrip_protocol(p))
        if any(c in spec for c in "*?["):
            paths = sorted(p for p in fs.glob(path) if fs.isfile(p))
            if not paths:
                raise PrepareError(f"input glob {spec} matches no files")
        elif fs.isdir(path):
            paths = sorted(
                p for p in fs.find(path)
                if any(fnmatch.fnmatch(p.rsplit("/", 1)[-1], pat) for pat in patterns)
            )
            if not paths:
                raise PrepareError(
                    f"input directory {spec} holds no files matching {','.join(patterns)} (set --glob)"
                )
        elif fs.isfile(path):
            paths = [path]
        else:
            raise PrepareError(f"input not found: {spec}")
        found.extend(InputFile(fs, p, name(p)) for p in paths)
    return found


def _is_jsonl(f: InputFile, fmt: str) -> bool:
    return fmt == "jsonl" or (fmt == "auto" and f.path.endswith(".jsonl"))


def iter_documents(files: list[InputFile], fmt: str, jsonl_key: str) -> Iterator[str]:
    """The documents of `files` in order, with a progress line on stderr every few seconds."""
    start = last = time.monotonic()
    read_bytes = 0
    for i, f in enumerate(files):
        if _is_jsonl(f, fmt):
            with f.fs.open(f.path, "rb") as fh:
                for lineno, line in enumerate(fh, 1):
                    read_bytes += len(line)
                    if line.strip():
                        yield _jsonl_text(line, jsonl_key, f"{f.name}:{lineno}")
        else:
            with f.fs.open(f.path, "rb") as fh:
                data = fh.read()
            read_bytes += len(data)
            try:
                yield data.decode("utf-8")
            except UnicodeDecodeError:
                log.warning("%s is not valid UTF-8; invalid bytes replaced with U+FFFD", f.name)
                yield data.decode("utf-8", errors="replace")
        now = time.monotonic()
        if now - last >= _PROGRESS_INTERVAL_S:
            last = now
            log.info("%d/%d files, %.1f MB read, %.1f MB/s", i + 1, len(files), read_bytes / 1e6,
                     read_bytes / 1e6 / (now - start))


def _jsonl_text(line: bytes, key: str, where: str) -> str:
    try:
        record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PrepareError(f"{where}: not valid JSON ({e})") from None
    if not isinstance(record, dict):
        raise PrepareError(f"{where}: expected a JSON object, found {type(record).__name__}")
    if key not in record:
        keys = ", ".join(sorted(record)) or "none"
        raise PrepareError(f"{where}: no {key!r} key (keys: {keys}); choose one with --jsonl-key")
    text = record[key]
    if not isinstance(text, str):
        raise PrepareError(f"{where}: {key!r} is a {type(text).__name__}, expected a string")
    return text


def write_dataset(documents: Iterable[tuple[str, str]], writer: ShardWriter,
                  tokenizer: Tokenizer) -> tuple[DatasetIndex, Stats]:
    """Tokenize each (text, split) document, bound it (bos first where the tokenizer has one,
    eos last), add it to its split; close the writer."""
    stats = Stats()
    bos_id = getattr(tokenizer, "bos_id", None)
    bos = np.array([] if bos_id is None else [bos_id], dtype=np.int64)
    eos = np.array([tokenizer.eos_id], dtype=np.int64)
    with writer:
        for text, split in documents:
            if not text:
                stats.empty_documents += 1
                continue
            writer.add(np.concatenate([bos, tokenizer.encode(text), eos]), split)
            stats.documents += 1
            stats.val_documents += split == "val"
        return writer.close(), stats


def check_output(url: str, overwrite: bool) -> None:
    """Refuse an output that already holds a dataset (or an interrupted one) unless `overwrite`;
    with it, delete index.json first (so the old dataset stops counting as complete), then shards."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        return
    index_path = join(path, INDEX_FILE)
    has_index = fs.exists(index_path)
    shard_dirs = [join(path, s) for s in SPLITS if fs.exists(join(path, s)) and fs.find(join(path, s))]
    if not has_index and not shard_dirs:
        return
    if not overwrite:
        if has_index:
            raise PrepareError(f"{url} already holds a dataset ({INDEX_FILE} exists); "
                               f"pass --overwrite to replace it")
        raise PrepareError(f"{url} holds shards but no {INDEX_FILE}: an earlier prepare was interrupted; "
                           f"pass --overwrite to delete them and start again")
    log.warning("--overwrite: deleting the dataset at %s", url)
    if has_index:
        fs.rm(index_path)
    for d in shard_dirs:
        fs.rm(d, recursive=True)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m storage.prepare", description=__doc__.split("\n\n")[0])
    p.add_argument("--input", nargs="+", required=True, metavar="PATH",
                   help="files, directories (recursed) or globs; any fsspec URL")
    p.add_argument("--output", required=True, metavar="URL", help="dataset directory to create")
    p.add_argument("--tokenizer", default="byte", help="'byte' or the path/URL of a tokenizer.json")
    p.add_argument("--format", choices=("auto", "text", "jsonl"), default="auto",
                   help="auto: .jsonl files are JSONL (one document per line), others text (one per file)")
    p.add_argument("--jsonl-key", default="text", help="field of each JSONL object holding the text")
    p.add_argument("--glob", default=DEFAULT_GLOB,
                   help="comma-separated file name patterns taken from input directories")
    p.add_argument("--shard-tokens", type=int, default=DEFAULT_SHARD_TOKENS, help="tokens per shard file")
    p.add_argument("--val-fraction", type=float, default=0.005, help="share of documents held out for val")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already at --output")
    p.add_argument("--endpoint-url", default=os.environ.get("S3_ENDPOINT_URL", ""),
                   help="S3 endpoint for s3:// URLs (Ceph RGW); default $S3_ENDPOINT_URL. Credentials "
                        "come from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS files")
    p.add_argument("--ca-bundle", default="", help="PEM file of the CA of an https:// endpoint")
    p.add_argument("--no-verify-tls", action="store_true", help="do not check the endpoint's certificate")
    args = p.parse_args(argv)
    if not 0.0 <= args.val_fraction < 1.0:
        p.error(f"--val-fraction must be in [0, 1), got {args.val_fraction}")
    if args.shard_tokens < 1:
        p.error(f"--shard-tokens must be positive, got {args.shard_tokens}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    no_world_writable_files()
    try:
        configure(SimpleNamespace(endpoint_url=args.endpoint_url, verify_tls=not args.no_verify_tls,
                                  ca_bundle=args.ca_bundle, connect_timeout_s=5.0,
                                  read_timeout_s=60.0, max_retries=5))
        for url in (*args.input, args.output):
            check_reachable(url)
        files = find_inputs(args.input, [g.strip() for g in args.glob.split(",") if g.strip()])
        tokenizer = load_tokenizer(args.tokenizer)
        check_output(args.output, args.overwrite)
        log.info("%d input files -> %s (tokenizer %s)", len(files), args.output, tokenizer.name)
        writer = ShardWriter(args.output, TokenizerInfo.of(tokenizer), shard_tokens=args.shard_tokens)
        documents = ((text, split_of(text.encode("utf-8", errors="replace"), args.val_fraction))
                     for text in iter_documents(files, args.format, args.jsonl_key))
        index, stats = write_dataset(documents, writer, tokenizer)
    except (ValueError, ImportError, OSError, StorageError) as e:  # DatasetError is a ValueError
        log.error("error: %s", e)
        return 1
    if args.val_fraction > 0 and not stats.val_documents:
        log.warning("no document fell in the val split (%d documents x --val-fraction %g); training "
                    "will evaluate on train samples. Raise --val-fraction for a held-out split",
                    stats.documents, args.val_fraction)
    parts = [f"{s} {index.total_tokens[s]:,} tokens in {len(es)} shard{'s' * (len(es) != 1)}"
             for s, es in index.splits.items()]
    print(f"wrote {args.output}: {stats.documents:,} documents ({stats.val_documents:,} val), "
          f"{', '.join(parts)}; dtype {np.dtype(index.dtype).name}, tokenizer {tokenizer.name} "
          f"(vocab {tokenizer.vocab_size}, eos {tokenizer.eos_id}"
          + (f", bos {tokenizer.bos_id})" if tokenizer.bos_id is not None else ")"))
    print(f"train on it: {train_command(args.output, tokenizer.vocab_size, model_dir(args.tokenizer))}")
    return 0


def model_dir(tokenizer: str) -> str | None:
    """The Hugging Face model directory a tokenizer.json was taken from (a config.json beside it)."""
    if tokenizer == "byte":
        return None
    fs, path = url_to_fs(tokenizer)
    parent = path.rsplit("/", 1)[0] if "/" in path else "."
    if not fs.isfile(f"{parent}/config.json"):
        return None
    return tokenizer.rsplit("/", 1)[0] if "/" in tokenizer else "."


def train_command(url: str, vocab_size: int, model: str | None = None) -> str:
    """The command that trains on a dataset just written (tests run it as printed): the default
    model, or the Hugging Face model whose tokenizer made it (`model`). 256-token samples, as
    the builtin corpus uses, keep the tiny default model's run to minutes on a laptop (the
    shards preset's 2,048 would take several times longer); s3:// needs the ceph storage preset
    for its endpoint and credentials."""
    storage = " storage=ceph" if url.startswith("s3://") or (model or "").startswith("s3://") else ""
    shape = f"model=hf model.path={model}" if model else f"model.vocab_size={vocab_size}"
    return f"python -m train.run data=shards data.url={url} {shape} data.seq_len=256{storage}"


if __name__ == "__main__":
    sys.exit(main())
