"""mosaicml-streaming beside the harness: its own environment, the same tokens, the same RGW.

    python bench/storage_mosaic.py setup VENV            # make VENV (once), with the harness's python
    VENV/bin/python bench/storage_mosaic.py convert --dataset DIR --out MDS_DIR --seq-len 2048
    VENV/bin/python bench/storage_mosaic.py read --remote s3://bucket/mds --local CACHE --workers 2

mosaicml-streaming is not a dependency of the harness: it lives in a separate virtual
environment made by `setup`, which shares the CPU torch, numpy and boto3 of the Python that runs
`setup` (the harness's). `--system-site-packages` alone shares only the base interpreter's
packages, and where the harness is installed in a virtual environment, as the README does, torch
is not there; so the new environment also gets a .pth file naming the running Python's own
site-packages directories, read after its own. Two things keep pip from touching torch (pip does
not uninstall what lies outside the environment it installs into either): mosaicml-streaming
itself is installed with `--no-deps` and its other needs are installed under a constraint that pins torch
to the version already here; and `import streaming` imports torchvision (for its image
datasets), whose PyPI builds are CUDA builds that fail to import next to a CPU torch
("operator torchvision::nms does not exist"), so the environment gets a stub `torchvision`
that only defines the two names streaming imports. Nothing here reads images.

`convert` writes the same samples the harness reads (windows of seq_len+1 tokens at stride
seq_len inside each train shard) as MDS shards with one `bytes` column, no compression, one
MDS shard per token shard. `read` iterates one epoch of `StreamingDataset` (shuffled, cold
local cache) through a `DataLoader` whose collate turns the samples into the same int64
tensor the harness delivers, and prints one JSON object: `samples`, `bytes`, `seconds`.
"""

from __future__ import annotations

import argparse
import json
import os
import site
import subprocess
import sys
import time
from pathlib import Path

STREAMING_VERSION = "0.13.0"
PIP_FAILED = 3  # setup's exit status when pip cannot install the packages (offline, no index)
# What `import streaming` needs at import time besides what the system site already has.
NEEDS = ["xxhash>=3,<4", "zstd", "python-snappy", "brotli", "catalogue", "transformers>=4.21.3,<5"]
STUB = {
    "torchvision/__init__.py": '"""Stub for the storage benchmark: streaming imports torchvision; nothing here reads images."""\n',
    "torchvision/datasets/__init__.py": (
        "import torch.utils.data\n\n\nclass VisionDataset(torch.utils.data.Dataset):\n"
        "    def __init__(self, *args, **kwargs):\n"
        "        raise NotImplementedError('torchvision is a stub in the storage benchmark environment')\n\n\n"
        "CIFAR10 = VisionDataset\n"),
    "torchvision/transforms/__init__.py": "",
    "torchvision/transforms/functional.py": (
        "def to_tensor(*args, **kwargs):\n"
        "    raise NotImplementedError('torchvision is a stub in the storage benchmark environment')\n"),
}


def running_site_dirs() -> list[str]:
    """Where the running Python finds its packages: a venv's own site-packages (and the base's,
    if it has them), and the user site if it is used."""
    dirs = list(site.getsitepackages())
    if site.ENABLE_USER_SITE and os.path.isdir(site.getusersitepackages()):
        dirs.append(site.getusersitepackages())
    return dirs


def pip_install(py: Path, *args: str) -> None:
    """pip install ARGS into `py`'s environment; if pip fails, exit PIP_FAILED with its error last."""
    cmd = [str(py), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR")] or [f"exit {proc.returncode}"]
        print(proc.stdout + proc.stderr, file=sys.stderr)
        print(f"pip could not install {' '.join(a for a in args if not a.startswith('-') and '/' not in a)}: "
              f"{errors[-1]}", file=sys.stderr)
        sys.exit(PIP_FAILED)


def setup(venv: Path) -> None:
    """Create `venv` with mosaicml-streaming, leaving the shared torch untouched."""
    import torch

    py = venv / "bin" / "python"
    if not py.exists():
        made = subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=False)
        if made.returncode != 0:  # e.g. Debian's python without python3-venv: no pip to install with
            print(f"cannot create a virtual environment with pip at {venv}", file=sys.stderr)
            sys.exit(PIP_FAILED)
    site_dir = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                   check=True, capture_output=True, text=True).stdout.strip())
    # Read after bench_torchvision_stub.pth (.pth files are read in name order), so the stub
    # wins over a torchvision the harness's environment may have.
    (site_dir / "bench_zz_harness_site.pth").write_text("".join(f"{d}\n" for d in running_site_dirs()))
    constraints = venv / "constraints.txt"
    constraints.write_text(f"torch=={torch.__version__}\n")
    pip_install(py, "--no-deps", f"mosaicml-streaming=={STREAMING_VERSION}")
    pip_install(py, "-c", str(constraints), *NEEDS)
    stubs = venv / "stubs"
    for rel, text in STUB.items():
        (stubs / rel).parent.mkdir(parents=True, exist_ok=True)
        (stubs / rel).write_text(text)
    (site_dir / "bench_torchvision_stub.pth").write_text(f"{stubs}\n")
    check = subprocess.run([str(py), "-c", "import streaming, torch; print(streaming.__version__, torch.__version__)"],
                           check=True, capture_output=True, text=True).stdout.split()
    if check[1] != torch.__version__:
        sys.exit(f"{venv}: torch is {check[1]}, expected {torch.__version__}")
    print(f"{venv}: mosaicml-streaming {check[0]}, torch {check[1]}")


def is_ready(python: str) -> bool:
    """Whether `python` finds both mosaicml-streaming and torch (without importing them)."""
    probe = "import importlib.util as u, sys; sys.exit(not (u.find_spec('streaming') and u.find_spec('torch')))"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, check=False).returncode == 0
    except OSError:  # no such interpreter
        return False


def convert(dataset: Path, out: Path, seq_len: int) -> None:
    import numpy as np
    from streaming import MDSWriter

    index = json.loads((dataset / "index.json").read_text())
    dtype = np.dtype(index["dtype"])
    entries = index["splits"]["train"]
    shard_bytes = max(e["tokens"] for e in entries) * dtype.itemsize
    samples = 0
    # size_limit a little over one token shard: one MDS shard per token shard, as many objects.
    with MDSWriter(out=str(out), columns={"tokens": "bytes"}, compression=None,
                   size_limit=shard_bytes + (shard_bytes >> 4)) as writer:
        for e in entries:
            tokens = np.fromfile(dataset / e["file"], dtype=dtype)
            for w in range((e["tokens"] - 1) // seq_len):
                writer.write({"tokens": tokens[w * seq_len:w * seq_len + seq_len + 1].tobytes()})
                samples += 1
    print(json.dumps({"samples": samples, "shards": len(list(out.glob("shard.*.mds")))}))


def read(remote: str, local: Path, batch: int, workers: int, seq_len: int, dtype: str) -> None:
    import numpy as np
    import torch
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()

    want = (seq_len + 1) * np.dtype(dtype).itemsize

    def collate(rows: list[dict]) -> torch.Tensor:
        # Counted, not stacked: with num_workers=2 streaming 0.13 has handed out samples of the
        # wrong length here (a cold shard read while another worker was still writing it?).
        good = [np.frombuffer(r["tokens"], dtype=dtype) for r in rows if len(r["tokens"]) == want]
        tokens = torch.from_numpy(np.stack(good).astype(np.int64)) if good else torch.empty(0, seq_len + 1)
        return tokens, len(rows) - len(good)

    ds = StreamingDataset(remote=remote, local=str(local), shuffle=True, shuffle_seed=1234, batch_size=batch)
    loader = DataLoader(ds, batch_size=batch, num_workers=workers, collate_fn=collate)
    samples = bad = 0
    start = time.perf_counter()
    for tokens, wrong in loader:
        samples += tokens.shape[0]
        bad += wrong
    seconds = time.perf_counter() - start
    print(json.dumps({"samples": samples, "bytes": samples * seq_len * np.dtype(dtype).itemsize,
                      "seconds": seconds, "wrong_length_samples": bad}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("setup")
    s.add_argument("venv", type=Path)
    c = sub.add_parser("convert")
    c.add_argument("--dataset", type=Path, required=True, help="local token dataset (index.json)")
    c.add_argument("--out", type=Path, required=True)
    c.add_argument("--seq-len", type=int, default=2048)
    r = sub.add_parser("read")
    r.add_argument("--remote", required=True)
    r.add_argument("--local", type=Path, required=True, help="streaming's local cache (empty: cold)")
    r.add_argument("--batch", type=int, default=8)
    r.add_argument("--workers", type=int, default=0)
    r.add_argument("--seq-len", type=int, default=2048)
    r.add_argument("--dtype", default="<u2")
    args = p.parse_args()
    if args.cmd == "setup":
        setup(args.venv)
    elif args.cmd == "convert":
        convert(args.dataset, args.out, args.seq_len)
    else:
        os.environ.setdefault("S3_ENDPOINT_URL", "")
        read(args.remote, args.local, args.batch, args.workers, args.seq_len, args.dtype)


if __name__ == "__main__":
    main()
