"""A real Ceph for the tests: `launch/dev/ceph.sh` (mon, memstore OSD, RGW) started once per session.

Without Ceph's packages the tests that need it are skipped with the reason on a developer's
machine, and fail in CI (CI=true), where `.ci/run` installs them. The fixture creates one
bucket and puts the S3 user's credentials and the endpoint into this process's environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_ENDPOINT_URL), from where every run the tests
start inherits them: the harness reads credentials from nowhere else.

RGW listens on every address of this machine (CEPH_DEV_RGW_ADDR=0.0.0.0), so the test hosts of
tests/hosts_fixture.py reach it at their bridge's address (`Ceph.endpoint_at`).

The `ceph` fixture is made available to every test module by tests/conftest.py.
"""

from __future__ import annotations

import os
import re
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.distributed import REPO
from tests.services import environment, require, run_script, unavailable

SCRIPT = REPO / "launch" / "dev" / "ceph.sh"
TOOLS = ("monmaptool", "ceph-mon", "ceph-osd", "radosgw", "radosgw-admin", "ceph")
ENV_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "S3_ENDPOINT_URL")


@dataclass(frozen=True)
class Ceph:
    dir: Path
    endpoint: str
    bucket: str
    env: dict[str, str]  # the three ENV_KEYS

    def url(self, *parts: str) -> str:
        """s3://BUCKET/part/part/..."""
        return "/".join([f"s3://{self.bucket}", *parts])

    def endpoint_at(self, address: str) -> str:
        """The S3 endpoint at another address of this machine (a test host's bridge)."""
        return re.sub(r"//[^:/]+:", f"//{address}:", self.endpoint)

    def unique(self, name: str) -> str:
        """s3://BUCKET/name-XXXXXXXX: a fresh prefix, so tests never see each other's objects."""
        return self.url(f"{name}-{uuid.uuid4().hex[:8]}")

    def fs(self):
        """An s3fs filesystem on the endpoint, credentials from the environment."""
        import s3fs

        # endpoint_url as an argument, so it wins over an s3 default that storage.fs.configure()
        # may have set in this process
        return s3fs.S3FileSystem(endpoint_url=self.endpoint, skip_instance_cache=True)

    @property
    def rgw_pid(self) -> int:
        return int((self.dir / "run" / "rgw.pid").read_text())

    def requests(self) -> RgwLog:
        """RGW's own access log from now on: what the service actually served."""
        return RgwLog(self.dir / "log" / "client.rgw.a.log")

    def stop_rgw(self) -> None:
        run_script(SCRIPT, "stop-rgw", self.dir)

    def start_rgw(self) -> None:
        run_script(SCRIPT, "start-rgw", self.dir)


class RgwLog:
    """RGW's access log (one `beast:` line per request) read from where it stood when made."""

    LINE = re.compile(r'beast: \S+ \S+ - \S+ \[[^]]+\] "(\w+) (\S+) HTTP/[\d.]+" (\d+) (\d+|-)')

    def __init__(self, path: Path) -> None:
        self.path = path
        self.start = path.stat().st_size if path.exists() else 0

    def _requests(self, method: str) -> list[tuple[str, int, int]]:
        """(path without the query, HTTP status, bytes sent) of every `method` request since then."""
        with open(self.path, "rb") as f:
            f.seek(self.start)
            text = f.read().decode(errors="replace")
        return [(m.group(2).split("?", 1)[0], int(m.group(3)), 0 if m.group(4) == "-" else int(m.group(4)))
                for m in self.LINE.finditer(text) if m.group(1) == method]

    def served(self, method: str = "GET") -> list[tuple[str, int]]:
        """(path without the query, HTTP status) of every `method` request since this log was made."""
        return [(path, status) for path, status, _ in self._requests(method)]

    def bytes_sent(self, method: str = "GET") -> Counter:
        """Bytes RGW sent per path (without the query) in successful `method` requests since then."""
        sent: Counter = Counter()
        for path, status, size in self._requests(method):
            if 200 <= status < 300:
                sent[path] += size
        return sent


def _read_env_file(path: Path) -> dict[str, str]:
    import shlex

    values = {}
    for line in path.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        values[key] = shlex.split(value)[0]
    return values


@pytest.fixture(scope="session")
def ceph(tmp_path_factory: pytest.TempPathFactory):
    """Start Ceph with RGW, create a bucket, export the credentials; stop it after the session."""
    require("Ceph", TOOLS, "apt-get install ceph-mon ceph-osd radosgw ceph-common", SCRIPT)
    try:
        import s3fs  # noqa: F401
    except ImportError:
        unavailable("Ceph", "s3fs is not installed (pip install -e '.[test]')")
    state = tmp_path_factory.mktemp("ceph")
    up = run_script(SCRIPT, "up", state, {**os.environ, "CEPH_DEV_RGW_ADDR": "0.0.0.0"})
    env_file = Path(next(line for line in up.stdout.splitlines() if line.startswith("env: "))[5:])
    assert oct(env_file.stat().st_mode & 0o777) == "0o600", "the credentials file must be private"
    env = _read_env_file(env_file)
    assert set(env) == set(ENV_KEYS), sorted(env)
    try:
        with environment(env):
            ceph = Ceph(dir=state, endpoint=env["S3_ENDPOINT_URL"], bucket="harness-test", env=env)
            ceph.fs().mkdir(ceph.bucket)  # no region: RGW refuses a LocationConstraint it does not know
            yield ceph
    finally:
        run_script(SCRIPT, "down", state, check=False)  # a throw-away cluster
