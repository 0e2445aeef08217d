"""Heavy optional packages are imported only by the features that need them."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from tests.distributed import base_env


def test_entry_point_imports_no_optional_package() -> None:
    """DeepSpeed, s3fs, the trackers, prometheus-client and plotly are imported only when chosen
    (the start-up check of the default trackers included)."""
    code = ("import sys, train.run, train.build, train.engine, train.trainer, launch.plan; "
            "from train.config import MonitorConfig; from train.trackers import check_trackers; "
            "check_trackers(MonitorConfig()); "
            "print(sorted({'deepspeed', 's3fs', 'mlflow', 'wandb', 'prometheus_client', 'plotly'} & set(sys.modules)))")
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


REPO = Path(__file__).resolve().parent.parent
LAYERS = ("train", "storage", "launch", "bench")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def test_dependencies_point_one_way() -> None:
    """launch/ and bench/ use train/ and storage/; train/ uses storage/; storage/ uses neither;
    the two engines do not import each other, and nothing takes a helper from an engine module
    that it could get from a shared one."""
    wrong = []
    allowed = {"storage": {"storage"}, "train": {"train", "storage"}}
    for layer, may_use in allowed.items():
        for path in sorted((REPO / layer).rglob("*.py")):
            for module in _imports(path):
                top = module.split(".")[0]
                if top in LAYERS and top not in may_use:
                    wrong.append(f"{path.relative_to(REPO)} imports {module}")
    engines = {"train/parallelize.py": "train.deepspeed_engine", "train/deepspeed_engine.py": "train.parallelize"}
    for path, other in engines.items():
        if any(m == other or m.startswith(other + ".") for m in _imports(REPO / path)):
            wrong.append(f"{path} imports {other}")
    for path in sorted(REPO.rglob("*.py")):
        if ".venv" in path.parts or path.name == "deepspeed_engine.py":
            continue
        if "train.deepspeed_engine.redacted" in _imports(path):
            wrong.append(f"{path.relative_to(REPO)} takes redaction from the DeepSpeed engine")
    assert not wrong, "\n".join(wrong)
