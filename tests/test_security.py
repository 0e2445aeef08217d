"""What a run leaves is safe to leave: TLS to the S3 endpoint with the site's own CA, a warning
for plain HTTP across the network, and no world-writable file even under a careless umask.
(Credentials in nothing a run writes: tests/test_ceph.py; tracker credentials (MLflow, W&B) in
nothing a run or its trackers write: test_trackers.py; in no sbatch script: test_slurm.py.)
"""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import subprocess
import threading
from pathlib import Path

import pytest

from tests.ceph_fixture import Ceph
from tests.conftest import FAST
from tests.distributed import train

SHARDS = [*FAST, "data=shards", "model.vocab_size=256", "data.seq_len=64", "trainer.max_steps=2",
          "storage=ceph"]


def _openssl(*args: str, cwd: Path) -> None:
    proc = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.fixture(scope="module")
def site_ca(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private CA and a certificate for 127.0.0.1 signed by it, as a site's own PKI would issue."""
    d = tmp_path_factory.mktemp("pki")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem",
             "-days", "1", "-subj", "/CN=train-harness test CA", cwd=d)
    _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=d)
    (d / "ext.cnf").write_text("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
             "-out", "server.pem", "-days", "1", "-extfile", "ext.cnf", cwd=d)
    return d


class TlsFront:
    """TLS in front of RGW, as a site's load balancer would terminate it: bytes are passed
    through to the plain-HTTP RGW port unchanged."""

    def __init__(self, backend_port: int, pki: Path) -> None:
        import ssl

        self.backend_port = backend_port
        self.context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.context.load_cert_chain(pki / "server.pem", pki / "server.key")
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self.context))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.backend_port)
        except OSError:
            writer.close()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def tls_endpoint(ceph: Ceph, site_ca: Path):
    front = TlsFront(int(ceph.endpoint.rsplit(":", 1)[1]), site_ca)
    yield f"https://127.0.0.1:{front.port}", front
    front.close()


@pytest.fixture(scope="module")
def s3_dataset(ceph: Ceph, tmp_path_factory: pytest.TempPathFactory) -> str:
    import sys

    from tests.distributed import REPO, base_env

    url = ceph.unique("datasets/tls")
    corpus = Path(logging.__file__).parent
    proc = subprocess.run([sys.executable, "-m", "storage.prepare", "--input", str(corpus), "--output", url,
                           "--shard-tokens", "16384", "--val-fraction", "0.3"],
                          capture_output=True, text=True, env=base_env(), cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return url


def test_tls_endpoint_with_the_sites_ca_bundle(tmp_path: Path, tls_endpoint, site_ca: Path,
                                               s3_dataset: str) -> None:
    endpoint, front = tls_endpoint
    run = train([*SHARDS, f"data.url={s3_dataset}", f"storage.endpoint_url={endpoint}",
                 f"storage.ca_bundle={site_ca / 'ca.pem'}", f"run.dir={tmp_path}/run"], cwd=tmp_path)
    assert run.returncode == 0, run.output[-3000:]
    assert sorted(run.losses) == [1, 2] and front.connections > 0


def test_tls_endpoint_without_its_ca_is_refused_naming_the_fix(tmp_path: Path, tls_endpoint,
                                                               s3_dataset: str) -> None:
    endpoint, _ = tls_endpoint
    run = train([*SHARDS, f"data.url={s3_dataset}", f"storage.endpoint_url={endpoint}",
                 f"run.dir={tmp_path}/run"], cwd=tmp_path, timeout_s=120)
    assert run.returncode == 2, run.output[-3000:]
    assert "TLS failed" in run.output and "storage.ca_bundle" in run.output
    assert "CERTIFICATE_VERIFY_FAILED" in run.output or "certificate verify failed" in run.output


def test_plain_http_to_another_host_warns(caplog: pytest.LogCaptureFixture,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import fsspec.config

    from storage import fs as storage_fs
    from train.config import StorageConfig

    # configure() sets process-wide S3 defaults: put back what was there afterwards
    monkeypatch.setattr(fsspec.config, "conf", dict(fsspec.config.conf))
    monkeypatch.setenv("FSSPEC_S3", "{}")
    monkeypatch.setattr(storage_fs, "_settings", dict(storage_fs._settings))
    caplog.set_level(logging.WARNING, logger="storage.fs")
    storage_fs.configure(StorageConfig(endpoint_url="http://10.20.30.40:7480"))
    assert "plain HTTP to another host" in caplog.text
    caplog.clear()
    storage_fs.configure(StorageConfig(endpoint_url="http://127.0.0.1:7480"))
    assert "plain HTTP" not in caplog.text


def test_nothing_the_run_writes_is_world_writable_even_under_umask_0(tmp_path: Path) -> None:
    env = {"TRAIN_HARNESS_CACHE": str(tmp_path / "cache")}
    run = train([*FAST, "trainer.max_steps=2", "data.builtin_max_bytes=300000",
                 f"run.dir={tmp_path}/run"], cwd=tmp_path, env=env, umask=0)
    assert run.returncode == 0, run.output[-3000:]
    written = [p for root in (tmp_path / "run", tmp_path / "cache") for p in [root, *root.rglob("*")]]
    assert len(written) > 10 and any(p.name == "COMMITTED" for p in written)
    loose = [str(p) for p in written if os.lstat(p).st_mode & stat.S_IWOTH]
    assert loose == []
