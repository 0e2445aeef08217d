"""The on-disk token format: shard files of raw token ids plus an index.json written last.

A dataset is a directory at any fsspec URL:

    index.json               written last: its presence means the dataset is complete
    train/shard-00000.bin    little-endian token ids (uint16 if vocab <= 65536, else uint32);
    train/shard-00001.bin    documents concatenated, each followed by the tokenizer's eos id
    val/shard-00000.bin

index.json records the format, dtype, the tokenizer (name, vocab_size, eos_id, fingerprint),
and per split each shard's file, token count and sha256. Every read of shard bytes goes
through `read_shard`, which verifies size and checksum once per shard per process. With a
`NodeCache` (storage/cache.py), remote shards are read from its verified local copy through
a memory map, or straight from the bytes when this process's own download just verified them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from storage.fs import is_local, join, retrying, url_to_fs

FORMAT = "train-harness.tokens/1"
INDEX_FILE = "index.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 4 * 1024 * 1024
_REMOTE_CACHE_SHARDS = 4  # remote shards read whole (no node cache) kept in process memory
_PINNED_SHARDS = 2  # node-cache shards each process keeps mapped (and so pinned against eviction)


class DatasetError(ValueError):
    """A dataset is missing, incomplete, of another format, or unusable as asked."""


class CorruptShardError(DatasetError):
    """A shard's bytes do not match the size or sha256 that index.json recorded."""


class MissingShardError(DatasetError):
    """A shard listed in index.json does not exist."""


def missing_shard_error(where: str) -> MissingShardError:
    return MissingShardError(
        f"shard missing: {where} is listed in {INDEX_FILE} but does not exist; "
        f"restore it or re-make the dataset with python -m storage.prepare --overwrite"
    )


def corrupt_size_error(where: str, size: int, entry: "ShardEntry", dtype: np.dtype) -> CorruptShardError:
    return CorruptShardError(
        f"corrupt shard {where}: {size} bytes, expected {entry.tokens * dtype.itemsize} "
        f"({entry.tokens} tokens of {dtype}); re-make the dataset with python -m storage.prepare --overwrite"
    )


def corrupt_sha_error(where: str, digest: str, entry: "ShardEntry") -> CorruptShardError:
    return CorruptShardError(
        f"corrupt shard {where}: sha256 {digest}, but {INDEX_FILE} records {entry.sha256}; "
        f"re-make the dataset with python -m storage.prepare --overwrite"
    )


@dataclass(frozen=True)
class TokenizerInfo:
    """Which tokenizer made a dataset: enough to refuse a model whose vocabulary is too small,
    and the ids that bound its documents (data.document_mask). bos_id None: documents are
    separated by eos alone (datasets made before bos was recorded read as such)."""

    name: str
    vocab_size: int
    eos_id: int
    fingerprint: str
    bos_id: int | None = None

    @classmethod
    def of(cls, tokenizer: Any) -> "TokenizerInfo":
        bos = getattr(tokenizer, "bos_id", None)
        return cls(tokenizer.name, int(tokenizer.vocab_size), int(tokenizer.eos_id), tokenizer.fingerprint,
                   None if bos is None else int(bos))


@dataclass(frozen=True)
class ShardEntry:
    """One shard file, relative to the dataset directory."""

    file: str
    tokens: int
    sha256: str


@dataclass
class DatasetIndex:
    """The parsed index.json of a complete dataset at `url`."""

    url: str
    dtype: str
    tokenizer: TokenizerInfo
    splits: dict[str, list[ShardEntry]]
    created_at: str
    total_tokens: dict[str, int] = field(default_factory=dict)

    def has_split(self, split: str) -> bool:
        return sum(e.tokens for e in self.splits.get(split, [])) > 0

    def shards(self, split: str) -> list[ShardEntry]:
        """The shards of `split`; DatasetError if it is absent or holds no tokens."""
        if not self.has_split(split):
            present = ", ".join(s for s in self.splits if self.has_split(s)) or "none"
            raise DatasetError(
                f"dataset {self.url} has no tokens in split {split!r} (splits with tokens: {present}); "
                f"re-make it with python -m storage.prepare (--val-fraction sets the val share)"
            )
        return self.splits[split]


def dtype_for_vocab(vocab_size: int) -> str:
    """The smallest little-endian unsigned dtype that holds every token id."""
    return "<u2" if vocab_size <= 1 << 16 else "<u4"


class ShardWriter:
    """Writes token shards to a dataset directory, then index.json last.

    Use as a context manager: on an exception the shards written so far are deleted and no
    index is written, so a failed run never leaves something that looks like a dataset.
    """

    def __init__(self, url: str, tokenizer: TokenizerInfo, shard_tokens: int = DEFAULT_SHARD_TOKENS,
                 dtype: str | None = None) -> None:
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
        self.url = url
        self.tokenizer = tokenizer
        self.shard_tokens = shard_tokens
        self.dtype = np.dtype(dtype or dtype_for_vocab(tokenizer.vocab_size)).newbyteorder("<")
        if tokenizer.vocab_size - 1 > np.iinfo(self.dtype).max:
            raise ValueError(f"dtype {self.dtype} cannot hold vocab_size {tokenizer.vocab_size}")
        self.fs, self.path = url_to_fs(url)
        if self.fs.exists(join(self.path, INDEX_FILE)):
            raise DatasetError(f"{url} already holds a dataset ({INDEX_FILE} exists); delete it first")
        self._root_existed = self.fs.exists(self.path)
        self._pending: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
        self._pending_tokens: dict[str, int] = {s: 0 for s in SPLITS}
        self._entries: dict[str, list[ShardEntry]] = {s: [] for s in SPLITS}
        self._closed = False

    def add(self, tokens: np.ndarray, split: str) -> None:
        """Append token ids (one document with its eos, or several) to `split`."""
        if split not in self._pending:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        tokens = np.asarray(tokens)
        if tokens.size == 0:
            return
        self._pending[split].append(tokens.astype(self.dtype, copy=False))
        self._pending_tokens[split] += tokens.size
        if self._pending_tokens[split] >= self.shard_tokens:
            buf = np.concatenate(self._pending[split])
            n_full = buf.size // self.shard_tokens * self.shard_tokens
            for start in range(0, n_full, self.shard_tokens):
                self._write_shard(split, buf[start:start + self.shard_tokens])
            rest = buf[n_full:]
            self._pending[split] = [rest] if rest.size else []
            self._pending_tokens[split] = rest.size

    def _write_shard(self, split: str, tokens: np.ndarray) -> None:
        rel = f"{split}/shard-{len(self._entries[split]):05d}.bin"
        data = tokens.tobytes()
        self.fs.makedirs(join(self.path, split), exist_ok=True)
        with self.fs.open(join(self.path, rel), "wb") as f:
            f.write(data)
        self._entries[split].append(ShardEntry(rel, int(tokens.size), hashlib.sha256(data).hexdigest()))

    def close(self) -> DatasetIndex:
        """Flush the last partial shard of each split and write index.json; returns the index."""
        if self._closed:
            raise RuntimeError("ShardWriter already closed")
        for split in SPLITS:
            if self._pending_tokens[split]:
                self._write_shard(split, np.concatenate(self._pending[split]))
                self._pending[split], self._pending_tokens[split] = [], 0
        splits = {s: e for s, e in self._entries.items() if e}
        if not splits:
            raise DatasetError(f"no tokens were written to {self.url}: the input held no text")
        index = DatasetIndex(
            url=self.url, dtype=self.dtype.str, tokenizer=self.tokenizer, splits=splits,
            created_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            total_tokens={s: sum(e.tokens for e in es) for s, es in splits.items()},
        )
        body = {
            "format": FORMAT, "dtype": index.dtype, "tokenizer": asdict(self.tokenizer),
            "splits": {s: [asdict(e) for e in es] for s, es in splits.items()},
            "total_tokens": index.total_tokens, "created_at": index.created_at,
        }
        with self.fs.open(join(self.path, INDEX_FILE), "w") as f:
            json.dump(body, f, indent=1)
        self._closed = True
        return index

    def abort(self) -> None:
        """Delete what was written so far (the directory too, if this writer made it); no index."""
        self._closed = True
        if not self._root_existed:
            if self.fs.exists(self.path):
                self.fs.rm(self.path, recursive=True)
            return
        for split, entries in self._entries.items():
            for e in entries:
                self.fs.rm(join(self.path, e.file))
            if entries and not self.fs.ls(join(self.path, split)):
                self.fs.rm(join(self.path, split), recursive=True)

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed:
            self.abort()


def read_index(url: str) -> DatasetIndex:
    """Parse `<url>/index.json`, with one clear DatasetError for each way a dataset is unusable."""
    fs, path = url_to_fs(url)
    if not fs.exists(path):
        raise DatasetError(
            f"dataset not found: {url} does not exist. Make one with: "
            f"python -m storage.prepare --input FILES_OR_DIRS --output {url}"
        )
    index_path = join(path, INDEX_FILE)
    if not fs.exists(index_path):
        has_shards = any(fs.exists(join(path, s)) for s in SPLITS)
        what = ("it holds shards but no index.json: an earlier storage.prepare was interrupted"
                if has_shards else "it has no index.json, so it is not a prepared dataset")
        raise DatasetError(
            f"dataset {url} is incomplete: {what}. Re-make it with: "
            f"python -m storage.prepare --input FILES_OR_DIRS --output {url} --overwrite"
        )
    try:
        with fs.open(index_path, "r") as f:
            body = json.load(f)
    except json.JSONDecodeError as e:
        raise DatasetError(f"dataset {url}: {INDEX_FILE} is not valid JSON ({e})") from e
    if not isinstance(body, dict) or body.get("format") != FORMAT:
        found = body.get("format") if isinstance(body, dict) else type(body).__name__
        raise DatasetError(
            f"dataset {url}: unknown format {found!r} in {INDEX_FILE}, expected {FORMAT!r}; "
            f"re-make it with python -m storage.prepare"
        )
    splits = {s: [ShardEntry(**e) for e in es] for s, es in body["splits"].items()}
    index = DatasetIndex(
        url=url, dtype=body["dtype"], tokenizer=TokenizerInfo(**body["tokenizer"]), splits=splits,
        created_at=body.get("created_at", ""),
        total_tokens={s: sum(e.tokens for e in es) for s, es in splits.items()},
    )
    if not any(index.has_split(s) for s in splits):
        raise DatasetError(f"dataset {url} is empty: {INDEX_FILE} lists no tokens in any split")
    return index


# Keys: (dataset url, shard file, sha256, verified). Local shards are memmaps, kept for the
# life of the process; remote ones are bytes in a small LRU, or memmaps of node-cache files
# in a smaller one whose entries hold a pin on the file until they leave it.
_local: dict[tuple[str, str, str, bool], np.ndarray] = {}
_remote: OrderedDict[tuple[str, str, str, bool], np.ndarray] = OrderedDict()
_pinned: OrderedDict[tuple[str, str, str, bool], tuple[np.ndarray, Any]] = OrderedDict()


def _cached(key: tuple[str, str, str, bool]) -> np.ndarray | None:
    if key in _local:
        return _local[key]
    if key in _remote:
        _remote.move_to_end(key)
        return _remote[key]
    if key in _pinned:
        _pinned.move_to_end(key)
        return _pinned[key][0]
    return None


def _read_cached(index: DatasetIndex, entry: ShardEntry, cache: Any, key: tuple[str, str, str, bool]) -> np.ndarray:
    """The node cache's verified copy, pinned while this process keeps it.

    The cache verified the bytes before giving the file its checksum name, so they are not
    hashed again here. When this process downloaded the shard (its reader or its prefetch
    threads), the bytes it verified are still in memory and are used as they are; otherwise
    the file is memory-mapped. Either way the file stays pinned, so another process on the
    node that needs the shard while this one holds it finds it in the cache.
    """
    pin = cache.pin(index, entry)
    data = cache.take_fresh(entry)
    if data is not None:
        tokens = np.frombuffer(data, dtype=np.dtype(index.dtype))
    else:
        tokens = np.memmap(pin.path, dtype=np.dtype(index.dtype), mode="r", shape=(entry.tokens,))
    _pinned[key] = (tokens, pin)
    while len(_pinned) > _PINNED_SHARDS:
        _, (_, old) = _pinned.popitem(last=False)
        old.release()  # a stray view of the old map stays valid: an evicted file lives while mapped
    return tokens


def read_shard(index: DatasetIndex, entry: ShardEntry, verify: bool = True, cache: Any = None,
               pin: Any = None) -> np.ndarray:
    """The token ids of one shard, checked against index.json; the one place shard bytes are read.

    Local shards are memory-mapped (the OS page cache holds them) and never copied into a
    cache. Remote ones come from `cache` (a storage.cache.NodeCache) when given, else are
    read whole into memory: a sample is only served from bytes whose sha256 was checked, so
    there is no ranged read of part of a shard. The sha256 is computed once per shard per
    process (per node, with the cache): later calls return the cached array. A caller that
    holds its own `pin` of the shard in `cache` (a reader that keeps a block of shards) gets
    the verified bytes or a map of the cached file, and nothing is pinned or kept here.
    """
    key = (index.url, entry.file, entry.sha256, verify)
    cached = _cached(key[:3] + (True,))
    if cached is None and not verify:
        cached = _cached(key)
    if cached is not None:
        return cached
    fs, root = url_to_fs(index.url)
    path = join(root, entry.file)
    dtype = np.dtype(index.dtype)
    where = join(index.url, entry.file)
    local = is_local(fs)
    if cache is not None and not local and pin is not None:
        data = cache.take_fresh(entry)
        if data is not None:
            return np.frombuffer(data, dtype=dtype)
        return np.memmap(pin.path, dtype=dtype, mode="r", shape=(entry.tokens,))
    if cache is not None and not local:
        return _read_cached(index, entry, cache, key[:3] + (True,))
    try:
        size = retrying(lambda: fs.size(path), what=f"size of {where}")
    except FileNotFoundError:
        raise missing_shard_error(where) from None
    if size != entry.tokens * dtype.itemsize:
        raise corrupt_size_error(where, size, entry, dtype)
    if local:
        tokens = np.memmap(path, dtype=dtype, mode="r", shape=(entry.tokens,))
        data = tokens
    else:
        data = retrying(lambda: fs.cat_file(path), what=f"read {where}")
        tokens = np.frombuffer(data, dtype=dtype)
    if verify:
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry.sha256:
            raise corrupt_sha_error(where, digest, entry)
    if local:
        _local[key] = tokens
    else:
        _remote[key] = tokens
        while len(_remote) > _REMOTE_CACHE_SHARDS:
            _remote.popitem(last=False)
    return tokens
