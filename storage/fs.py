"""Filesystems from URLs: every path the harness takes is an fsspec URL.

A plain path (`data/x`, `~/x`), `file://...`, `s3://...` or any other fsspec protocol all
resolve to an `(fs, path)` pair here, so the rest of the storage layer never branches on
where bytes live. Protocol packages (s3fs, botocore) are imported on first use of their
protocol, never at import time.

For `s3://` (Ceph's RGW or AWS), `configure(storage_cfg)` sets the endpoint, TLS, timeouts
and botocore retries once per process as fsspec defaults, so every `url_to_fs` and DCP's
FsspecWriter/Reader use them. Credentials are never part of it: botocore finds them in the
environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the standard AWS files.
`check_reachable(url)` turns an endpoint that is down, bad credentials or a missing bucket
into one clear error at start-up, and `retrying(fn, what=...)` retries transient errors
(connection reset, timeouts, 5xx) with exponential backoff and jitter.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import posixpath
import random
import time
from typing import Any, Callable, TypeVar
from urllib.parse import urlparse

import fsspec
import fsspec.config
import fsspec.core

log = logging.getLogger(__name__)

T = TypeVar("T")

# Exported to the environment too, so processes started from this one (spawned DataLoader
# workers) get the same S3 settings when they import fsspec. It never holds a credential.
_FSSPEC_ENV = "FSSPEC_S3"
_S3_PROTOCOLS = ("s3", "s3a")
_THROTTLE_CODES = {"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                   "RequestTimeTooSkewed", "ServiceUnavailable", "InternalError"}


class StorageError(RuntimeError):
    """Storage that cannot be used as configured: endpoint down, access denied, bucket missing."""


# What configure() set: the retry budget for retrying(), and the S3 client settings that
# check_reachable() builds its own short-lived client from.
_settings: dict[str, Any] = {"max_retries": 5, "endpoint_url": "", "verify": None,
                             "connect_timeout_s": 5.0, "read_timeout_s": 60.0}


def no_world_writable_files() -> None:
    """Mask the world-write bit from everything this process creates (run directories, logs,
    checkpoints, the node cache), whatever umask it was started with; group bits are kept,
    for teams that share a run directory through a group."""
    os.umask(os.umask(0) | 0o002)


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


def resolve(url: str, root: str) -> str:
    """`url` resolved against `storage.root`: URLs and absolute paths stay as they are."""
    if not url or not root or has_protocol(url) or os.path.isabs(os.path.expanduser(url)):
        return url
    return join(root, url)


def join(url: str, *parts: str) -> str:
    """Join path parts onto a local path or a URL, with `/` for URLs and os.sep for paths."""
    if has_protocol(url):
        return posixpath.join(url.rstrip("/"), *(p.strip("/") for p in parts))
    return os.path.join(os.path.expanduser(url), *parts)


# -- S3: settings, start-up check, retries -------------------------------------------------
def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def configure(storage_cfg: Any) -> None:
    """Make `storage_cfg` (a StorageConfig) the S3 settings of every s3:// filesystem.

    Sets fsspec's defaults for the s3 protocol (endpoint, TLS verification or CA bundle,
    connect/read timeouts, botocore's `standard` retries: exponential backoff with jitter on
    connection errors, throttling and 5xx) in this process and, through FSSPEC_S3, in the
    processes it starts. No region name: RGW rejects one it does not know when a bucket is
    made. Credentials are left to botocore's own chain (environment, AWS files).
    """
    endpoint = storage_cfg.endpoint_url or ""
    if storage_cfg.verify_tls:
        verify: bool | str | None = storage_cfg.ca_bundle or None
        if storage_cfg.ca_bundle and not os.path.isfile(os.path.expanduser(storage_cfg.ca_bundle)):
            raise StorageError(f"storage.ca_bundle {storage_cfg.ca_bundle} is not a file; give the "
                               f"PEM file of the CA that signed the endpoint's certificate")
        if verify:
            verify = os.path.expanduser(verify)
    else:
        verify = False
        log.warning("storage.verify_tls=false: the S3 endpoint's certificate is not checked")
    if endpoint:
        parsed = urlparse(endpoint)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise StorageError(f"storage.endpoint_url {endpoint!r} is not an http(s) URL "
                               f"(e.g. https://rgw.example.org or http://127.0.0.1:7480)")
        if parsed.scheme == "http" and not _is_loopback(parsed.hostname):
            log.warning("S3 endpoint %s is plain HTTP to another host: data and signed requests "
                        "cross the network unencrypted; use https:// where you can", endpoint)
    s3: dict[str, Any] = {
        "config_kwargs": {
            "connect_timeout": storage_cfg.connect_timeout_s,
            "read_timeout": storage_cfg.read_timeout_s,
            "retries": {"max_attempts": storage_cfg.max_retries, "mode": "standard"},
            # RGW (pacific) has no trailing checksums; send them only where S3 requires them.
            "request_checksum_calculation": "when_required",
            "response_checksum_validation": "when_required",
        },
    }
    if endpoint:
        s3["endpoint_url"] = endpoint
    if verify is not None:
        s3["client_kwargs"] = {"verify": verify}
    for name in ("botocore.credentials", "aiobotocore.credentials"):
        logging.getLogger(name).setLevel(logging.WARNING)  # "found credentials in ...", per client
    for proto in _S3_PROTOCOLS:
        fsspec.config.conf[proto] = dict(s3)
    os.environ[_FSSPEC_ENV] = json.dumps(s3)
    _settings.update(max_retries=storage_cfg.max_retries, endpoint_url=endpoint, verify=verify,
                     connect_timeout_s=storage_cfg.connect_timeout_s,
                     read_timeout_s=storage_cfg.read_timeout_s)


def is_s3(url: str) -> bool:
    return url.split("://", 1)[0] in _S3_PROTOCOLS if has_protocol(url) else False


def check_reachable(url: str) -> None:
    """Fail in seconds, with a message that says which, when `url` (s3://bucket/prefix) cannot
    be used: endpoint down, no or bad credentials, access denied, or bucket missing.

    One LIST request, with no retries, from a client built with configure()'s settings.
    Other protocols are not checked here (a missing local dataset has its own message).
    """
    if not is_s3(url):
        return
    import botocore.config
    import botocore.exceptions
    import botocore.session

    bucket, _, prefix = url.split("://", 1)[1].partition("/")
    endpoint = _settings["endpoint_url"]
    where = f"S3 endpoint {endpoint or 'AWS (no storage.endpoint_url / S3_ENDPOINT_URL set)'}"
    client = botocore.session.get_session().create_client(
        "s3", endpoint_url=endpoint or None, verify=_settings["verify"],
        config=botocore.config.Config(
            connect_timeout=min(_settings["connect_timeout_s"], 10.0),
            read_timeout=min(_settings["read_timeout_s"], 15.0),
            retries={"total_max_attempts": 1}),
    )
    try:
        client.list_objects_v2(Bucket=bucket, Prefix=prefix, MaxKeys=1)
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(
            f"no S3 credentials for {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY in the "
            f"environment (or use ~/.aws/credentials); they are never read from the config") from None
    except (botocore.exceptions.EndpointConnectionError, botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ConnectionClosedError, botocore.exceptions.ReadTimeoutError) as exc:
        raise StorageError(
            f"{where} is unreachable ({type(exc).__name__}) while checking {url}: is RGW running "
            f"and is storage.endpoint_url (default $S3_ENDPOINT_URL) right?") from None
    except botocore.exceptions.SSLError as exc:
        raise StorageError(f"{where}: TLS failed while checking {url} ({exc}); set storage.ca_bundle "
                           f"to the CA's PEM file") from None
    except botocore.exceptions.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        # The server's own message text is left out: it may echo request details.
        if code == "InvalidAccessKeyId":
            why = "access denied: the access key is not known there; check AWS_ACCESS_KEY_ID"
        elif code == "SignatureDoesNotMatch":
            why = "access denied: the secret key does not match the access key; check AWS_SECRET_ACCESS_KEY"
        elif code == "NoSuchBucket" or status == 404:
            why = (f"bucket {bucket!r} does not exist; create it first (e.g. "
                   f"aws s3 mb s3://{bucket} --endpoint-url {endpoint or '...'})")
        elif code in ("AccessDenied", "AllAccessDisabled") or status == 403:
            why = f"access denied to bucket {bucket!r} ({code or status}): the credentials lack permission"
        else:
            why = f"the endpoint answered {code or 'an error'} (HTTP {status})"
        raise StorageError(f"{where}, {url}: {why}") from None
    finally:
        client.close()


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: connection reset or refused, timeouts, an endpoint that
    is restarting, throttling and 5xx answers. Never for 4xx (403 denied, 404 missing)."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        failures = getattr(exc, "failures", None)
        if isinstance(failures, dict) and failures:  # DCP's CheckpointException: rank -> (error, trace)
            return all(is_transient(f[0] if isinstance(f, tuple) else f) for f in failures.values())
        response = getattr(exc, "response", None)
        if isinstance(response, dict) and "Error" in response:  # a botocore ClientError
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0
            return status >= 500 or response["Error"].get("Code") in _THROTTLE_CODES
        if isinstance(exc, (PermissionError, FileNotFoundError, FileExistsError, IsADirectoryError,
                            NotADirectoryError)):
            return False
        if isinstance(exc, (ConnectionError, TimeoutError)):
            return True
        names = {c.__name__ for c in type(exc).__mro__}
        if names & {"HTTPClientError", "FSTimeoutError", "IncompleteRead", "ResponseStreamingError",
                    "ClientConnectionError", "ClientPayloadError", "ServerDisconnectedError"}:
            return True  # botocore, urllib3, fsspec and aiohttp connection-level errors
        exc = exc.__cause__ or exc.__context__
    return False


def retrying(fn: Callable[[], T], *, what: str, max_retries: int | None = None,
             base_delay_s: float = 0.5, max_delay_s: float = 20.0) -> T:
    """`fn()`, retried on transient errors (see is_transient) with exponential backoff and full
    jitter: attempt k waits uniform(0, min(max_delay_s, base_delay_s * 2**k)) seconds.

    `what` names the operation in the warning logged per retry (e.g. "read s3://b/ds/x.bin").
    `max_retries` defaults to storage.max_retries as given to configure(). Other errors, and
    the last transient one, propagate unchanged.
    """
    retries = _settings["max_retries"] if max_retries is None else max_retries
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - classified, then re-raised or retried
            if attempt >= retries or not is_transient(exc):
                raise
            delay = random.uniform(0, min(max_delay_s, base_delay_s * 2 ** attempt))
            attempt += 1
            log.warning("%s failed (%s: %s); retry %d/%d in %.1f s", what, type(exc).__name__,
                        exc, attempt, retries, delay)
            time.sleep(delay)
