"""Filesystems from URLs: every path the harness takes is an fsspec URL.

A plain path (`data/x`, `~/x`), `file://...`, `s3://...` or any other fsspec protocol all
resolve to an `(fs, path)` pair here, so the rest of the storage layer never branches on
where bytes live. Protocol packages (s3fs, ...) are imported by fsspec on first use of
their protocol, never by us at import time. Credentials and the node-local prefetch cache
will slot in behind `url_to_fs` without changing its callers.
"""

from __future__ import annotations

import os
import posixpath

import fsspec
import fsspec.core


def has_protocol(url: str) -> bool:
    """True for `proto://...` URLs, False for plain local paths."""
    return "://" in url


def url_to_fs(url: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for `url`; `~` is expanded for local paths."""
    if not has_protocol(url):
        url = os.path.expanduser(url)
    return fsspec.core.url_to_fs(url)


def is_local(fs: fsspec.AbstractFileSystem) -> bool:
    """True when `fs` is the local disk (so np.memmap and os.rename apply)."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return "file" in protocols or "local" in protocols


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL, with `/` for URLs and os.sep for paths."""
    if has_protocol(url):
        return posixpath.join(url.rstrip("/"), *(p.strip("/") for p in parts))
    return os.path.join(os.path.expanduser(url), *parts)
