"""Storage benchmarks: the harness's data loader and checkpoints against the raw limit, in one run.

    python bench/storage_bench.py --json storage.json                          # full: 64 x 8 MiB shards, 512 MiB checkpoint
    python bench/storage_bench.py --quick --json storage-quick.json            # a minute or two: 16 x 2 MiB, 64 MiB
    python bench/storage_bench.py --endpoint http://host:7480 --bucket b ...   # an S3 that is already up (credentials
                                                                         # from AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)
    python bench/storage_bench.py --smoke                                      # seconds (plus Ceph's start): every part
                                                                         # once at tiny sizes; checks it runs

Without --endpoint it starts its own single-node Ceph (`launch/dev/ceph.sh up`, stopped by
`down` at the end) and takes the S3 user's keys from the env file ceph.sh writes, into this
process's environment only: no file this benchmark leaves holds a credential. It writes a
dataset of random uint16 tokens (`storage.shards.ShardWriter`: shards plus index.json) to local
disk and uploads it to s3://BUCKET/PREFIX/ds, then measures, repeats alternating, medians:

  read   RGW: s3fs `cat_file` loop (1 and 4 threads) vs the harness's BatchStream (node cache,
         cold; each of --workers x --block-shards: num_workers 0, 2 and 4, the block shuffle and
         one shard at a time, data.shuffle=false; and without a cache) vs mosaicml-streaming
  local  local disk, page cache dropped: plain read of the shard files vs BatchStream (the same
         workers x orders)
  wait   `python -m train.run` on the RGW dataset (storage=ceph, node cache), cold then warm
         cache: the time each step waits in BatchStream.next_step (bench/storage_wait.py)
  ckpt   Checkpointer save/load vs raw write/read, local and RGW; async save (bench/storage_ckpt.py)

Every measurement runs in a fresh process (bench/storage_read.py, storage_mosaic.py,
storage_wait.py, storage_ckpt.py). Prints markdown tables; --json writes every run. With
--endpoint, the objects it wrote under s3://BUCKET/run-XXXXXXXX are removed at the end.

mosaicml-streaming's environment (--mosaic-python) is made by `storage_mosaic.py setup` when that
Python does not find streaming and torch. If pip cannot install it (no index reachable), the full
benchmark stops and says so; --smoke leaves mosaicml-streaming out with the reason printed.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.storage_mosaic import PIP_FAILED, is_ready
from storage.order import DEFAULT_BLOCK_SHARDS
from storage.shards import ShardWriter, TokenizerInfo

BENCH = REPO / "bench"
CEPH = REPO / "launch" / "dev" / "ceph.sh"
PARTS = ("read", "local", "wait", "ckpt")
# --smoke: every part, every kind of variant and both sides of every comparison, once, at sizes
# that take seconds (one DataLoader setting); flags given beside it still win.
SMOKE = {"shards": 4, "shard_mib": 1, "ckpt_mib": 8, "ckpt_tensors": 8, "workers": "0", "repeats": 1,
         "mosaic_repeats": 1, "wait_repeats": 1, "wait_steps": 3, "wait_seq_len": 64, "wait_micro_batch": 4,
         "wait_accum": 1}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False, **kw)
    if proc.returncode != 0:
        raise RuntimeError(f"{shlex.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc


def last_json(proc: subprocess.CompletedProcess) -> dict:
    return json.loads(proc.stdout.strip().splitlines()[-1])


def ceph_up(state: Path) -> None:
    """Start Ceph; export its endpoint and keys into this process's environment (never to a file)."""
    out = sh(["bash", str(CEPH), "up", str(state)]).stdout
    env_file = Path(next(line for line in out.splitlines() if line.startswith("env: "))[5:])
    for line in env_file.read_text().splitlines():
        key, _, value = line.removeprefix("export ").partition("=")
        os.environ[key] = shlex.split(value)[0]


def s3fs_fs():
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": os.environ["S3_ENDPOINT_URL"]},
                             skip_instance_cache=True)


def write_dataset(path: Path, shards: int, shard_tokens: int) -> list[str]:
    """`shards` train shards of random tokens (uint16, vocab 256: the tiny model trains on it),
    one small val shard; fsync'd so the page cache can be dropped. Returns the files, index last."""
    rng = np.random.default_rng(0)
    info = TokenizerInfo("bench-random", 256, 0, "bench")
    with ShardWriter(str(path), info, shard_tokens=shard_tokens, dtype="<u2") as writer:
        for _ in range(shards):
            writer.add(rng.integers(0, 256, shard_tokens, dtype=np.uint16), "train")
        writer.add(rng.integers(0, 256, shard_tokens // 8, dtype=np.uint16), "val")
        writer.close()
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*.bin")) + ["index.json"]
    for rel in files:
        fd = os.open(path / rel, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return files


def upload(fs, local: Path, remote: str, files: list[str]) -> None:
    for rel in files:  # index.json last, as the writer does
        fs.put_file(str(local / rel), f"{remote.removeprefix('s3://')}/{rel}")


def summary(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "runs": values}


def fmt(s: dict, digits: int = 0) -> str:
    return f"{s['median']:,.{digits}f} ({s['min']:,.{digits}f}–{s['max']:,.{digits}f})"


# -- parts -------------------------------------------------------------------------------
def order_name(block_shards: int) -> str:
    return "one shard at a time" if block_shards == 1 else f"block shuffle {block_shards}"


def read_variants(args, s3_url: str, local_url: str, mds_url: str | None, work: Path) -> dict[str, list]:
    """name -> (command maker, fresh dir or None): each run of a variant gets its own empty dir."""
    py = sys.executable
    common = ["--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch), "--accum", str(args.accum)]
    rd = [py, str(BENCH / "storage_read.py")]
    loaders = [(w, b) for b in args.block_shards for w in args.workers]  # harness: workers x sample order
    v: dict[str, list] = {}
    if "read" in args.parts:
        v["s3 plain cat_file, 1 thread"] = [lambda d: [*rd, "--mode", "plain", "--url", s3_url], False]
        v["s3 plain cat_file, 4 threads"] = [lambda d: [*rd, "--mode", "plain", "--threads", "4", "--url", s3_url], False]
        for w, b in loaders:
            v[f"s3 harness, node cache cold, workers {w}, {order_name(b)}"] = [
                lambda d, w=w, b=b: [*rd, "--mode", "harness", "--url", s3_url, "--workers", str(w),
                                     "--block-shards", str(b), "--cache-dir", str(d), *common], True]
        if not args.no_uncached:
            v["s3 harness, no cache, workers 0"] = [
                lambda d: [*rd, "--mode", "harness", "--url", s3_url, "--workers", "0", *common], False]
        if mds_url:
            for w in args.workers:
                v[f"s3 mosaicml-streaming, cold, workers {w}"] = [
                    lambda d, w=w: [args.mosaic_python, str(BENCH / "storage_mosaic.py"), "read", "--remote",
                                    mds_url, "--local", str(d), "--batch", str(args.micro_batch),
                                    "--workers", str(w), "--seq-len", str(args.seq_len)], True]
    if "local" in args.parts:
        v["local plain read, cold"] = [lambda d: [*rd, "--mode", "plain", "--url", local_url,
                                                  "--drop-page-cache"], False]
        for w, b in loaders:
            v[f"local harness, cold, workers {w}, {order_name(b)}"] = [
                lambda d, w=w, b=b: [*rd, "--mode", "harness", "--url", local_url, "--preset", "local",
                                     "--workers", str(w), "--block-shards", str(b), "--drop-page-cache", *common], False]
    return v


def run_reads(args, variants: dict[str, list], work: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {name: [] for name in variants}
    for r in range(args.repeats):
        for name, (cmd, fresh) in variants.items():  # alternating: one run of each per repeat
            if "mosaicml" in name and r >= args.mosaic_repeats:
                continue  # 10-30x slower than the rest: fewer repeats
            d = work / f"fresh-{uuid.uuid4().hex[:8]}"
            if fresh:
                d.mkdir()
            try:
                res = last_json(sh(cmd(d), timeout=900))
            finally:
                shutil.rmtree(d, ignore_errors=True)
            res.setdefault("mib_s", res["bytes"] / res["seconds"] / 2**20)
            runs[name].append(res)
            print(f"  [{r + 1}/{args.repeats}] {name}: {res['mib_s']:,.1f} MiB/s", file=sys.stderr, flush=True)
    return runs


def run_wait(args, s3_url: str, work: Path) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {"cold": [], "warm": []}
    gbt = args.wait_seq_len * args.wait_micro_batch * args.wait_accum
    for r in range(args.wait_repeats):
        cache = work / f"wait-cache-{r}"
        for state in ("cold", "warm"):  # warm: the same cache, filled by the cold run
            out = work / f"wait-{r}-{state}.json"
            run_dir = work / f"wait-run-{r}-{state}"
            cmd = [sys.executable, str(BENCH / "storage_wait.py"), str(out), "data=shards", f"data.url={s3_url}",
                   "storage=ceph", f"storage.cache_dir={cache}", f"data.seq_len={args.wait_seq_len}",
                   f"model.max_seq_len={max(256, args.wait_seq_len)}", f"trainer.max_steps={args.wait_steps}",
                   f"trainer.global_batch_tokens={gbt}", f"trainer.micro_batch_size={args.wait_micro_batch}",
                   "trainer.log_interval_steps=1", "trainer.eval_interval_steps=0", "trainer.eval_batches=1",
                   "checkpoint.interval=0", "checkpoint.resume=never", f"run.dir={run_dir}"]
            sh(cmd, timeout=900)
            calls = json.loads(out.read_text())["calls"]
            waits = [e - s for s, e in calls]
            periods = [b[0] - a[0] for a, b in itertools.pairwise(calls)]
            rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").open()]
            runs[state].append({"first_wait_s": waits[0], "wait_s_after_first": statistics.mean(waits[1:]),
                                "max_wait_s_after_first": max(waits[1:]), "step_s": statistics.median(periods),
                                "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows[1:]),
                                "waits_s": waits})
            print(f"  [{r + 1}/{args.wait_repeats}] wait {state}: first {waits[0] * 1e3:.0f} ms, then mean "
                  f"{runs[state][-1]['wait_s_after_first'] * 1e3:.2f} ms/step; step {runs[state][-1]['step_s']:.3f} s",
                  file=sys.stderr, flush=True)
            shutil.rmtree(run_dir, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
    return runs


# -- report ------------------------------------------------------------------------------
def report_reads(runs: dict[str, list[dict]]) -> str:
    """MiB/s against the plain loop of the same storage; for the harness also its time per step
    (the first step apart: workers starting, the first shards), and CPU seconds of each pass."""
    med = {name: summary([r["mib_s"] for r in rs]) for name, rs in runs.items()}
    base = {"s3": med.get("s3 plain cat_file, 1 thread"), "local": med.get("local plain read, cold")}
    header = "| how | MiB/s, median (min–max) | / plain loop | samples/s | first step, ms | ms/step after it | CPU s |"
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|"]
    for name, s in med.items():
        b = base[name.split()[0]]
        ratio = f"{s['median'] / b['median']:.2f}" if b else ""
        rs = runs[name]
        cpu = f"{statistics.median(r['cpu_s'] for r in rs):.2f}" if all("cpu_s" in r for r in rs) else ""
        if all("samples" in r for r in rs):
            sps = statistics.median(r["samples"] / r["seconds"] for r in rs)
            steps = [r for r in rs if "first_step_s" in r]
            first = f"{statistics.median(r['first_step_s'] for r in steps) * 1e3:,.0f}" if steps else ""
            after = f"{statistics.median(r['step_s_after_first'] for r in steps) * 1e3:.2f}" if steps else ""
            lines.append(f"| {name} | {fmt(s, 1)} | {ratio} | {sps:,.0f} | {first} | {after} | {cpu} |")
        else:
            lines.append(f"| {name} | {fmt(s, 1)} | {ratio} | | | | {cpu} |")
    return "\n".join(lines)


def report_wait(runs: dict[str, list[dict]]) -> str:
    lines = ["| cache | first step's wait, ms | wait per step after it, ms (max) | step, s | tok/s |",
             "|---|---:|---:|---:|---:|"]
    for state, rs in runs.items():
        first = summary([r["first_wait_s"] * 1e3 for r in rs])
        after = summary([r["wait_s_after_first"] * 1e3 for r in rs])
        worst = max(r["max_wait_s_after_first"] for r in rs) * 1e3
        step = summary([r["step_s"] for r in rs])
        tps = summary([r["tokens_per_s"] for r in rs])
        lines.append(f"| {state} | {fmt(first)} | {fmt(after, 2)} ({worst:.1f}) | {fmt(step, 3)} | {fmt(tps)} |")
    return "\n".join(lines)


def report_ckpt(res: dict) -> str:
    mib = res["bytes"] / 2**20
    s = {k: summary(v) for k, v in res["seconds"].items()}
    rate = {k: summary([mib / x for x in v]) for k, v in res["seconds"].items()}
    lines = [f"| what ({mib:,.0f} MiB, {res['tensors']} tensors) | harness MiB/s | raw MiB/s | harness / raw |",
             "|---|---:|---:|---:|"]
    pairs = [("local save vs write + fsync", "local_save", "local_raw_write"),
             ("local load vs read, cold", "local_load", "local_raw_read"),
             ("RGW save vs pipe_file, 4 objects x 4 threads", "s3_save", "s3_raw_put_4"),
             ("RGW save vs pipe_file, 1 object", "s3_save", "s3_raw_put_1"),
             ("RGW load vs cat_file, 4 objects x 4 threads", "s3_load", "s3_raw_get_4"),
             ("RGW load vs cat_file, 1 object", "s3_load", "s3_raw_get_1")]
    for label, h, raw in pairs:
        if h in rate and raw in rate:
            lines.append(f"| {label} | {fmt(rate[h])} | {fmt(rate[raw])} | "
                         f"{rate[h]['median'] / rate[raw]['median']:.2f} |")
    lines += ["", f"| async save ({res['async_api']}) | sync save, s | async call returns, s | async complete, s |",
              "|---|---:|---:|---:|"]
    for where in ("local", "s3"):
        if f"{where}_async_blocked" in s:
            lines.append(f"| {'RGW' if where == 's3' else 'local'} | {fmt(s[f'{where}_save'], 2)} | "
                         f"{fmt(s[f'{where}_async_blocked'], 2)} | {fmt(s[f'{where}_async_done'], 2)} |")
    return "\n".join(lines)


def mosaic_environment(args) -> str | None:
    """A reason to leave mosaicml-streaming out (--smoke only, pip could not install it), else None
    once args.mosaic_python finds streaming and torch (made by `storage_mosaic.py setup` if not)."""
    if is_ready(args.mosaic_python):
        return None
    setup = subprocess.run([sys.executable, str(BENCH / "storage_mosaic.py"), "setup",
                            str(Path(args.mosaic_python).parent.parent)], capture_output=True, text=True, cwd=REPO,
                           check=False)
    if setup.returncode == PIP_FAILED and args.smoke:
        return setup.stderr.strip().splitlines()[-1]  # "pip could not install ...: pip's error"
    if setup.returncode != 0:
        raise RuntimeError(f"making mosaicml-streaming's environment failed ({setup.returncode}); "
                           f"--mosaic-python none leaves it out:\n{setup.stderr[-3000:]}")
    return None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small sizes: 16 x 2 MiB shards, 64 MiB checkpoint, 1 repeat")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--shards", type=int, default=64)
    p.add_argument("--shard-mib", type=int, default=8, help="MiB per shard (uint16 tokens)")
    p.add_argument("--seq-len", type=int, default=2048, help="loader and mosaic sample length")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--accum", type=int, default=4)
    p.add_argument("--workers", default="0,2,4", help="DataLoader workers to measure")
    p.add_argument("--block-shards", default=f"{DEFAULT_BLOCK_SHARDS},1",
                   help="sample orders to measure: data.shuffle_block_shards values (1: data.shuffle=false)")
    p.add_argument("--no-uncached", action="store_true", help="skip the harness without a node cache")
    p.add_argument("--mosaic-python", default="/tmp/bench-streaming-venv/bin/python",
                   help="python of mosaicml-streaming's own environment (made if missing); 'none' to skip")
    p.add_argument("--mosaic-repeats", type=int, default=2, help="repeats that include mosaicml-streaming")
    p.add_argument("--wait-repeats", type=int, default=2, help="cold + warm trainer runs")
    p.add_argument("--wait-steps", type=int, default=20)
    p.add_argument("--wait-seq-len", type=int, default=256)
    p.add_argument("--wait-micro-batch", type=int, default=8)
    p.add_argument("--wait-accum", type=int, default=4)
    p.add_argument("--ckpt-mib", type=int, default=512)
    p.add_argument("--ckpt-tensors", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--endpoint", default="", help="use this S3 endpoint instead of starting Ceph")
    p.add_argument("--bucket", default="bench-storage")
    p.add_argument("--workdir", type=Path, default=None, help="local scratch (default: a temp dir, removed)")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--smoke", action="store_true", help="every part once at tiny sizes: to check it runs")
    if p.parse_known_args(argv)[0].smoke:
        p.set_defaults(**SMOKE)
    args = p.parse_args(argv)
    if args.quick:
        args.shards, args.shard_mib, args.ckpt_mib, args.wait_steps = 16, 2, 64, 8
        args.repeats = args.mosaic_repeats = args.wait_repeats = 1
    args.parts = [x for x in args.parts.split(",") if x]
    args.workers = [int(w) for w in args.workers.split(",")]
    args.block_shards = [int(b) for b in args.block_shards.split(",")]
    return args


def main() -> None:
    args = parse_args()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # so the finally below stops Ceph
    work = Path(tempfile.mkdtemp(prefix="bench-storage-", dir=args.workdir))
    ceph_dir = work / "ceph"
    started = time.time()
    fs = prefix = None
    try:
        if args.endpoint:
            os.environ["S3_ENDPOINT_URL"] = args.endpoint
        else:
            ceph_up(ceph_dir)
        fs = s3fs_fs()
        if not fs.exists(args.bucket):
            fs.mkdir(args.bucket)
        prefix = f"s3://{args.bucket}/run-{uuid.uuid4().hex[:8]}"
        ds, s3_ds = work / "ds", f"{prefix}/ds"
        files = write_dataset(ds, args.shards, args.shard_mib << 19)
        upload(fs, ds, s3_ds, files)
        mds_url = None
        mosaic = "read" in args.parts and args.mosaic_python != "none"
        if mosaic and (why := mosaic_environment(args)):
            print(f"mosaicml-streaming: not measured, {why}")
            mosaic = False
        if mosaic:
            mds = work / "mds"
            sh([args.mosaic_python, str(BENCH / "storage_mosaic.py"), "convert", "--dataset", str(ds), "--out",
                str(mds), "--seq-len", str(args.seq_len)])
            mds_url = f"{prefix}/mds"
            upload(fs, mds, mds_url, sorted(str(p.relative_to(mds)) for p in mds.iterdir()))
        result: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                                    "python": platform.python_version()},
                        "versions": versions(args.mosaic_python if mosaic else None),
                        "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                        "endpoint": os.environ["S3_ENDPOINT_URL"], "dataset_bytes": args.shards * (args.shard_mib << 20)}
        variants = read_variants(args, s3_ds, str(ds), mds_url, work)
        if variants:
            result["reads"] = run_reads(args, variants, work)
            print(report_reads(result["reads"]))
        if "wait" in args.parts:
            result["wait"] = run_wait(args, s3_ds, work)
            print(report_wait(result["wait"]))
        if "ckpt" in args.parts:
            out = work / "ckpt.json"
            sh([sys.executable, str(BENCH / "storage_ckpt.py"), "--local-dir", str(work / "ckpt"), "--s3-url",
                f"{prefix}/ckpt", "--mib", str(args.ckpt_mib), "--tensors", str(args.ckpt_tensors),
                "--repeats", str(args.repeats), "--json", str(out)], timeout=1800)
            result["ckpt"] = json.loads(out.read_text())
            print(report_ckpt(result["ckpt"]))
        result["wall_s"] = time.time() - started
        print(f"wall time {result['wall_s']:.0f} s", file=sys.stderr)
        if args.json:
            args.json.write_text(json.dumps(result, indent=1))
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second ^C must not leave Ceph running
        if not args.endpoint:
            subprocess.run(["bash", str(CEPH), "down", str(ceph_dir)], capture_output=True, check=False)
        elif fs is not None and prefix is not None and fs.exists(prefix):
            fs.rm(prefix, recursive=True)  # someone else's S3: leave nothing behind
        shutil.rmtree(work, ignore_errors=True)


def versions(mosaic_python: str | None) -> dict:
    import fsspec
    import s3fs
    import torch

    out = {"torch": torch.__version__, "s3fs": s3fs.__version__, "fsspec": fsspec.__version__, "numpy": np.__version__}
    ceph = subprocess.run(["ceph", "--version"], capture_output=True, text=True, check=False)
    out["ceph"] = ceph.stdout.split(" (")[0].removeprefix("ceph version ").strip() if ceph.returncode == 0 else None
    if mosaic_python:
        out["mosaicml-streaming"] = subprocess.run(
            [mosaic_python, "-c", "import importlib.metadata as m; print(m.version('mosaicml-streaming'))"],
            capture_output=True, text=True, check=False).stdout.strip()
    return out


if __name__ == "__main__":
    main()
