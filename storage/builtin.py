"""Builtin datasets: real text every machine already has, so the default run needs no download.

"stdlib" is the .py files of this Python's standard library, byte-tokenized. It is built on
first use into `<cache_dir>/datasets/` and reused. Every rank may call `ensure_builtin_dataset`
at once: one builds (under a file lock) into a temporary sibling directory and renames it into
place atomically; the others wait and reuse it. The rename alone keeps this correct where the
lock does not work (some network filesystems): a loser of the race discards its own copy.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import shutil
import sys
import sysconfig
import time
import uuid
from storage.fs import is_local, url_to_fs
from storage.prepare import document_hash, write_dataset
from storage.shards import INDEX_FILE, DatasetError, ShardWriter, TokenizerInfo
from storage.tokenizer import ByteTokenizer

log = logging.getLogger(__name__)

BUILTINS = ("stdlib",)
VAL_FRACTION = 0.02  # of the files, and at least one, so that evaluation is always held out
SHARD_TOKENS = 1 << 20  # small shards: more shards to shuffle across in a ~24 MB corpus
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def stdlib_files(max_bytes: int) -> list[tuple[str, int]]:
    """(path, size) of the standard library's .py files in sorted order, up to max_bytes in all."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS]
        for f in filenames:
            path = os.path.join(dirpath, f)
            if f.endswith(".py") and os.path.isfile(path) and os.access(path, os.R_OK):
                found.append((os.path.relpath(path, root), path))
    files, total = [], 0
    for _, path in sorted(found):
        size = os.path.getsize(path)
        if total + size > max_bytes:
            break
        files.append((path, size))
        total += size
    return files


def _read_documents(files: list[tuple[str, int]]) -> list[tuple[str, str]]:
    """(text, split) per readable non-empty file; val = the VAL_FRACTION of files with the
    smallest content hashes, so even a small corpus gets a deterministic held-out split."""
    texts = []
    for path, _ in files:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:
            log.debug("skipping unreadable %s: %s", path, e)
            continue
        if data:
            texts.append(data.decode("utf-8", errors="replace"))
    hashes = [document_hash(t.encode("utf-8", errors="replace")) for t in texts]
    n_val = max(1, round(VAL_FRACTION * len(texts))) if len(texts) > 1 else 0
    val = set(sorted(range(len(texts)), key=hashes.__getitem__)[:n_val])
    return [(t, "val" if i in val else "train") for i, t in enumerate(texts)]


def ensure_builtin_dataset(name: str, cache_dir: str, max_bytes: int) -> str:
    """The local path of builtin dataset `name`, building it first if no complete copy exists."""
    if name not in BUILTINS:
        raise DatasetError(f"unknown builtin dataset {name!r}; known: {', '.join(BUILTINS)} "
                           f"(or set data.url to a dataset made by python -m storage.prepare)")
    fs, root = url_to_fs(cache_dir)
    if not is_local(fs):
        raise DatasetError(f"builtin datasets are built on a local disk; cache_dir {cache_dir} is not local")
    files = stdlib_files(max_bytes)
    if not files:
        raise DatasetError(f"no readable .py files under {sysconfig.get_paths()['stdlib']} fit in "
                           f"{max_bytes} bytes (data.builtin_max_bytes)")
    stdlib = sysconfig.get_paths()["stdlib"]
    listing = "\n".join(f"{os.path.relpath(p, stdlib)}:{s}" for p, s in files) + f"\nmax_bytes={max_bytes}"
    key = hashlib.sha256(listing.encode()).hexdigest()[:12]
    datasets = os.path.join(root, "datasets")
    final = os.path.join(datasets, f"stdlib-py{sys.version_info.major}{sys.version_info.minor}-{key}")
    if os.path.exists(os.path.join(final, INDEX_FILE)):
        return final
    os.makedirs(datasets, exist_ok=True)
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if we die
        if not os.path.exists(os.path.join(final, INDEX_FILE)):
            _build(files, final)
    return final


def _build(files: list[tuple[str, int]], final: str) -> None:
    """Write the dataset to a temporary sibling of `final`, then rename it into place."""
    start = time.monotonic()
    tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    log.info("building builtin dataset stdlib: %d files, %.1f MB -> %s",
             len(files), sum(s for _, s in files) / 1e6, final)
    tokenizer = ByteTokenizer()
    try:
        writer = ShardWriter(tmp, TokenizerInfo.of(tokenizer), shard_tokens=SHARD_TOKENS)
        index, stats = write_dataset(_read_documents(files), writer, tokenizer)
        if os.path.isdir(final) and not os.path.exists(os.path.join(final, INDEX_FILE)):
            shutil.rmtree(final)  # incomplete leftover of something else; ours replaces it
        try:
            os.rename(tmp, final)
        except OSError:
            if not os.path.exists(os.path.join(final, INDEX_FILE)):
                raise
            log.info("another process built %s first; using it", final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built %s in %.1f s: %d documents (%d val), %s tokens", final, time.monotonic() - start,
             stats.documents, stats.val_documents, index.total_tokens)
