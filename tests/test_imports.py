"""Heavy optional packages are imported only by the features that need them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.distributed import base_env


def test_entry_point_imports_neither_deepspeed_nor_s3fs() -> None:
    code = ("import sys, train.run, train.build, train.engine, train.trainer, launch.plan; "
            "print(sorted({'deepspeed', 's3fs'} & set(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=base_env(), check=True).stdout.strip()
    assert out == "[]"


def test_native_training_never_imports_deepspeed(tmp_path: Path, harness_cache: Path) -> None:
    """A whole native run (build, train, checkpoint) in one process, then a look at what it
    imported."""
    argv = ["train.run", "data.seq_len=64", "data.builtin_max_bytes=2000000",
            "trainer.global_batch_tokens=512", "trainer.micro_batch_size=4", "trainer.max_steps=2",
            "trainer.eval_batches=1", f"run.dir={tmp_path}/run"]
    code = (f"import runpy, sys; sys.argv = {argv!r}; "
            "runpy.run_module('train.run', run_name='__main__', alter_sys=True); "
            "print('deepspeed' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                          env=base_env(harness_cache), timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "checkpoint step 2 committed" in proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "False"
