"""Every benchmark runs as printed: each bench/ script's `--smoke` mode, typed as a user would.

`--smoke` is the same code at tiny sizes with one repeat: it measures nothing, but goes through
every run the benchmark makes (the harness and the plain alternative it is compared with) and
prints the same report. Each test checks the report's figures and ratio lines, not only the
exit status. The storage benchmark uses the session's Ceph (`--endpoint`, credentials from the
environment, as for any S3 that is already up); its mosaicml-streaming comparison is left out
only when pip cannot install mosaicml-streaming, which the report then says.

The three scripts are mostly start-up (interpreters, torchrun, DeepSpeed's import), so the
throughput and engine benchmarks are started together in the background and the storage one
runs meanwhile; each test waits for its own.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ceph_fixture import Ceph
from tests.distributed import REPO

BACKGROUND = {"throughput": "bench/throughput.py", "engines": "bench/engines.py",
              "document_mask": "bench/document_mask.py", "mixing": "bench/mixing.py",
              "data_wait": "bench/data_wait.py", "gpu_check": "bench/gpu_check.py",
              "loader_items": "bench/loader_items.py", "pipeline_bubble": "bench/pipeline_bubble.py",
              "trackers": "bench/trackers.py"}
TIMEOUT_S = 600  # a safety net against a hang, not a speed requirement
NUMBER = r"[\d,]+(?:\.\d+)?"


def _env(harness_cache: Path) -> dict[str, str]:
    # The builtin corpus in the session's cache rather than the user's ~/.cache.
    return {**os.environ, "TRAIN_HARNESS_CACHE": str(harness_cache)}


@pytest.fixture(scope="module")
def background(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path) -> Iterator[dict]:
    """`python bench/NAME.py --smoke` for each BACKGROUND script, started at once, output to files."""
    out = tmp_path_factory.mktemp("bench-smoke")
    started = {}
    for name, script in BACKGROUND.items():
        with open(out / f"{name}.out", "w") as stdout, open(out / f"{name}.err", "w") as stderr:
            proc = subprocess.Popen([sys.executable, script, "--smoke"], cwd=REPO, env=_env(harness_cache),
                                    stdout=stdout, stderr=stderr, text=True)
        started[name] = (proc, out / f"{name}.out", out / f"{name}.err")
    yield started
    for proc, _, _ in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _finished(background: dict, name: str) -> str:
    """The script's stdout once it has exited 0 (else the test fails with its output)."""
    proc, stdout, stderr = background[name]
    proc.wait(timeout=TIMEOUT_S)
    assert proc.returncode == 0, f"{BACKGROUND[name]} --smoke exited {proc.returncode}:\n" \
                                 f"{stdout.read_text()[-3000:]}\n{stderr.read_text()[-3000:]}"
    return stdout.read_text()


def _number(text: str) -> float:
    return float(text.replace(",", ""))


def _half_unit(text: str) -> float:
    """Half a unit in the last place printed: how far a rounded figure may be from its value."""
    decimals = len(text.split(".")[1]) if "." in text else 0
    return 0.5 * 10 ** -decimals


def _is_ratio_of(ratio: str, numerator: str, denominator: str) -> bool:
    """Whether the printed `ratio` can be the ratio of the unrounded values behind the printed
    `numerator` and `denominator` (each rounded in its last place, the ratio in its own). On a
    loaded machine the figures are small (tens of tokens/s), so a fixed relative tolerance
    would not do."""
    n, d = _number(numerator), _number(denominator)
    dn, dd, dr = _half_unit(numerator), _half_unit(denominator), _half_unit(ratio)
    low, high = (n - dn) / (d + dd), (n + dn) / max(d - dd, 1e-12)
    return low - dr - 1e-9 <= float(ratio) <= high + dr + 1e-9


def _line(pattern: str, out: str) -> re.Match | None:
    return re.search(pattern, out, re.MULTILINE)


def _lines(pattern: str, out: str) -> list:
    return re.findall(pattern, out, re.MULTILINE)


@pytest.mark.usefixtures("background")  # started first, so that they run while this one does
def test_storage_benchmark_smoke_reports_every_comparison(ceph: Ceph) -> None:
    fs = ceph.fs()
    before = set(fs.ls(ceph.bucket))
    run = subprocess.run([sys.executable, "bench/storage_bench.py", "--smoke", "--endpoint", ceph.endpoint,
                          "--bucket", ceph.bucket], cwd=REPO, capture_output=True, text=True, timeout=TIMEOUT_S,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = run.stdout

    # Reads: each way against the plain loop on the same storage (1.00 for the loop itself).
    rows = dict(_lines(rf"^\| ((?:s3|local) [^|]+?) \| {NUMBER} \({NUMBER}–{NUMBER}\) \| (\d+\.\d\d) \|", out))
    harness = {f"{where}, workers 0, {order}" for where in ("s3 harness, node cache cold", "local harness, cold")
               for order in ("block shuffle 64", "one shard at a time")}
    expected = {"s3 plain cat_file, 1 thread", "s3 plain cat_file, 4 threads", "s3 harness, no cache, workers 0",
                "local plain read, cold", *harness}
    skipped = _line(r"^mosaicml-streaming: not measured, (.*)$", out)
    if skipped:  # the one reason the smoke run may leave it out
        assert skipped.group(1).startswith("pip could not install mosaicml-streaming"), skipped.group(0)
    else:
        expected.add("s3 mosaicml-streaming, cold, workers 0")
    assert set(rows) == expected, out
    assert rows["s3 plain cat_file, 1 thread"] == rows["local plain read, cold"] == "1.00"
    assert all(float(ratio) > 0 for ratio in rows.values()), rows
    # The harness's time per step: its first step apart, then per step once it runs.
    steps = {name: (first, after) for name, first, after in _lines(
        rf"^\| ((?:s3|local) harness[^|]+?) \| [^|]+ \| [^|]+ \| {NUMBER} \| ({NUMBER}) \| ({NUMBER}) \| {NUMBER} \|$", out)}
    assert harness | {"s3 harness, no cache, workers 0"} == set(steps), out
    assert all(_number(after) > 0 for _, after in steps.values()), steps

    # Data wait in the trainer, cold and warm node cache.
    assert _line(rf"^\| cold \| {NUMBER} ", out) and _line(rf"^\| warm \| {NUMBER} ", out), out

    # Checkpoints against raw transfers of the same bytes, locally and to RGW; async save.
    ratios = dict(_lines(r"^\| ((?:local|RGW) (?:save|load) vs [^|]+?) \| .+ \| (\d+\.\d\d) \|$", out))
    assert len(ratios) == 6 and all(float(r) > 0 for r in ratios.values()), out
    assert _line(rf"^\| local \| {NUMBER} ", out) and _line(rf"^\| RGW \| {NUMBER} ", out), out

    # Someone else's S3 (--endpoint): the benchmark removed what it wrote there.
    fs.invalidate_cache()
    assert set(fs.ls(ceph.bucket)) == before


def test_throughput_benchmark_smoke_reports_harness_against_plain_loop(background: dict) -> None:
    out = _finished(background, "throughput")
    harness = _line(rf"^harness +({NUMBER}) +({NUMBER}) ", out)
    plain = _line(rf"^plain +({NUMBER}) +({NUMBER}) ", out)
    ratio = _line(r"^harness / plain = (\d+\.\d{3})$", out)
    assert harness and plain and ratio, out
    assert _number(harness.group(1)) > 0 and _number(plain.group(1)) > 0
    assert _is_ratio_of(ratio.group(1), harness.group(1), plain.group(1)), (ratio.group(0), harness.group(0))


def test_engines_benchmark_smoke_reports_zero_against_fsdp(background: dict) -> None:
    out = _finished(background, "engines")
    rows = {engine: (tps, ratio, loss) for engine, tps, ratio, loss in _lines(
        rf"^\| (\w+) \| ({NUMBER}) \| (\d+\.\d\d) \| {NUMBER} \| (\d+\.\d{{4}}) \|$", out)}
    assert set(rows) == {"fsdp", "zero2", "zero3"}, out
    assert rows["fsdp"][1] == "1.00"
    assert all(_number(tps) > 0 for tps, _, _ in rows.values()), rows
    # Same model, data and seed under each engine: they trained the same thing.
    losses = [float(loss) for _, _, loss in rows.values()]
    assert max(losses) - min(losses) <= 1e-3 * max(losses), rows


def test_document_mask_benchmark_smoke_reports_masked_against_causal(background: dict) -> None:
    out = _finished(background, "document_mask")
    step = _line(rf"^tiny 2x64 \(({NUMBER}) documents a sample\): causal ({NUMBER}) ms \(1.0x\), "
                 rf"document mask \(sdpa\) ({NUMBER}) ms \(({NUMBER})x\)$", out)
    run = _line(rf"^python -m train.run, 2 steps: causal ({NUMBER}) tokens/s, document mask ({NUMBER}) "
                rf"tokens/s \(({NUMBER})x\)$", out)
    assert step and run, out
    assert _number(step.group(1)) > 1  # the batch packs several documents, so the mask masks
    # the ratios are of the unrounded medians
    assert _is_ratio_of(step.group(4), step.group(3), step.group(2)), step.group(0)
    assert _is_ratio_of(run.group(3), run.group(2), run.group(1)), run.group(0)


def test_mixing_benchmark_smoke_reports_both_orders(background: dict) -> None:
    out = _finished(background, "mixing")
    runs = _lines(rf"^seed 1234, (one shard at a time|block shuffle): held-out loss \{{3: ({NUMBER}), "
                  rf"6: ({NUMBER})\}}$", out)
    assert [order for order, _, _ in runs] == ["one shard at a time", "block shuffle"], out
    rows = _lines(rf"^\| 6 \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \|$", out)
    assert len(rows) == 2, out  # held-out and training loss at step 6, both orders
    assert [float(x) for x in rows[0][:2]] == pytest.approx([float(runs[0][2]), float(runs[1][2])], abs=5e-4)
    waits = _lines(rf"^  (one shard at a time|block shuffle), seed 1234: ({NUMBER}) ms, ({NUMBER}) tokens/s$", out)
    assert len(waits) == 2 and all(_number(tps) > 0 for _, _, tps in waits), out


def test_data_wait_benchmark_smoke_reports_the_wait_with_and_without_workers(background: dict) -> None:
    out = _finished(background, "data_wait")
    rows = {workers: (wait, step, percent) for workers, wait, step, percent in _lines(
        rf"^\| default run \| (\d) \| {NUMBER} / {NUMBER} \| ({NUMBER}) \({NUMBER}\) \| ({NUMBER}) \| ({NUMBER}) % \|$",
        out)}
    assert set(rows) == {"0", "2"}, out
    for wait, step, percent in rows.values():  # the wait as a share of the step it belongs to
        assert float(percent) == pytest.approx(100 * _number(wait) / _number(step), rel=0.05, abs=2e-3)


def test_loader_items_benchmark_smoke_reports_workers_against_inline(background: dict) -> None:
    out = _finished(background, "loader_items")
    memory = dict(_lines(rf"^\| ((?:fresh|buffer) [^|]+?) \| ({NUMBER}) \|$", out))
    assert set(memory) == {"fresh shared memory (DataLoader's way)", "fresh anonymous memory",
                           "buffer written again"}, out
    rows = _lines(rf"^\| 4x2x256 \(4\) \| (\d) \| ([^|]*) \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \|$", out)
    assert [(workers, k.strip()) for workers, k, *_ in rows] == [("0", ""), ("2", "1"), ("2", "32 (auto)")], out
    assert all(_number(ms) > 0 for _, _, ms, _, _ in rows), rows


def test_gpu_check_smoke_reports_harness_plain_and_plan_and_refuses_float8(background: dict) -> None:
    out = _finished(background, "gpu_check")
    row = _line(rf"^\| tiny \| eager \| ({NUMBER}) \| ({NUMBER}) \| (\d+\.\d{{3}}) \| n/a \| ({NUMBER}) \(({NUMBER})\) "
                rf"\| n/a \(({NUMBER})\) \| ({NUMBER}) \(n/a\) \|$", out)
    assert row, out
    harness, plain, ratio, peak, planned, planned_total, step_s = (_number(x) for x in row.groups())
    assert harness > 0 and plain > 0 and peak > 0 and step_s > 0
    assert _is_ratio_of(row.group(3), row.group(1), row.group(2)), row.group(0)
    assert planned_total > planned > 0  # the plan's estimate, and with its margin
    # float8 on a CPU layout: refused by the start-up check, in its one line
    assert _line(r"^\| tiny \| float8 \| not run: LayoutError: parallel.float8=tensorwise needs GPUs with float8 "
                 r"tensor cores \(H100, H200 or later\); cluster \S+ has cpu: set parallel.float8=off \|$", out), out
    assert "device syncs on steps that neither log, evaluate nor save: n/a (no GPU)" in out


def test_pipeline_bubble_benchmark_smoke_reports_measured_against_the_formula(background: dict) -> None:
    out = _finished(background, "pipeline_bubble")
    rows = {m.group(1): m for m in re.finditer(
        rf"^\| (1F1B|Interleaved1F1B) \| 2 \| ({NUMBER}) \| ({NUMBER})% \| ({NUMBER})% \| ({NUMBER}) \| ({NUMBER}) \|$",
        out, re.M)}
    assert set(rows) == {"1F1B", "Interleaved1F1B"}, out
    assert (rows["1F1B"].group(4), rows["Interleaved1F1B"].group(4)) == ("33.3", "20.0")  # (p-1)/(vm+p-1) at m=2


def test_trackers_benchmark_smoke_reports_each_tracker_against_the_metrics_file(background: dict) -> None:
    out = _finished(background, "trackers")
    rows = {name.strip(): (median, mean, ratio) for name, median, mean, ratio in _lines(
        rf"^([A-Za-z&][^\d\n]*?) +({NUMBER}) +({NUMBER}) +({NUMBER})$", out)}
    assert set(rows) == {"metrics.jsonl (baseline)", "TensorBoard", "MLflow (harness: queued)",
                         "MLflow log_batch, same thread", "MLflow log_batch(synchronous=False)", "W&B offline"}, out
    assert rows["metrics.jsonl (baseline)"][2] == "1.0"
    assert all(_number(mean) > 0 for _, mean, _ in rows.values()), rows
    assert _line(r"^MLflow close \(flushing the queue of 20 rows\): \d+\.\d\d s$", out), out
