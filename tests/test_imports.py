"""Heavy optional packages are imported only by the features that need them."""

from __future__ import annotations

import subprocess
import sys

from tests.distributed import base_env


def test_entry_point_imports_neither_deepspeed_nor_s3fs() -> None:
    code = "import sys, train.run, launch.plan; print(sorted({'deepspeed', 's3fs'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=base_env(), check=True).stdout.strip()
    assert out == "[]"
