"""`python -m train.report`: one self-contained HTML page comparing the runs of a sweep, checked
against the runs' own files and rendered in headless Chromium.

The runs are real: a Hydra sweep over the learning rate (two jobs) on a two-source mixture, so
held-out loss per source is there too; one of its jobs resumed after a save that never committed
(its steps after the checkpoint are logged twice).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from storage.shards import ShardWriter, TokenizerInfo
from storage.tokenizer import ByteTokenizer
from tests.conftest import FAST
from tests.distributed import base_env
from tests.services import unavailable

RUN = [o for o in FAST if not o.startswith(("trainer.eval_interval_steps=", "checkpoint.interval="))] + [
    "trainer.eval_interval_steps=3", "checkpoint.interval=3", "data=mixture", "data.num_workers=0",
    "trainer.eval_batches=2"]
LRS = ("0.001", "0.003")
CHROMIUM = "chromium"


def _dataset(url: Path, low: int, high: int, seed: int) -> str:
    writer = ShardWriter(str(url), TokenizerInfo.of(ByteTokenizer()), shard_tokens=1000)
    rng = np.random.default_rng(seed)
    writer.add(rng.integers(low, high, 8000), "train")
    writer.add(rng.integers(low, high, 1000), "val")
    writer.close()
    return str(url)


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@dataclass
class Sweep:
    dir: Path
    rows: list[list[dict]]  # per job, the metrics rows of its final history
    checkpoints: list[list[dict]]  # per job, its committed checkpoints (the last save of a step)
    first_attempt: list[dict]  # job 1's rows before it was resumed


FRAGMENT = '{"step": 7, "loss": 3.9'  # a row cut off by a crash


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path) -> Sweep:
    """A sweep over the learning rate whose job 1 then crashed as it saved step 6 and in the
    middle of a metrics row, and was resumed (from step 3: steps 4 to 6 are logged twice)."""
    root = tmp_path_factory.mktemp("report")
    a, b = _dataset(root / "a", 1, 128, 0), _dataset(root / "b", 128, 256, 1)
    overrides = [*RUN, f"data.sources=[{{name: a, url: {a}, weight: 3}}, {{name: b, url: {b}, weight: 1}}]"]

    def train(*args: str, sweep: bool = False) -> str:
        cmd = [sys.executable, "-m", "train.run", *(["-m"] if sweep else []), *overrides, *args]
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, env=base_env(harness_cache),
                              timeout=600, check=False)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return proc.stderr

    train(f"optim.lr={','.join(LRS)}", sweep=True)
    (sweep_dir,) = (root / "runs").iterdir()
    job = sweep_dir / "1"
    first, first_saves = _rows(job / "metrics.jsonl"), _rows(job / "checkpoints.jsonl")
    written = (job / "metrics.jsonl").read_text()
    (job / "checkpoints" / "step-00000006" / "COMMITTED").unlink()  # the save of step 6 never finished
    with open(job / "metrics.jsonl", "a") as f:
        f.write(FRAGMENT)
    assert "resumed from" in train(f"run.dir={job}", f"optim.lr={LRS[1]}")
    second = [json.loads(line) for line in (job / "metrics.jsonl").read_text()[len(written + FRAGMENT):].splitlines()]
    second_saves = _rows(job / "checkpoints.jsonl")[len(first_saves):]
    assert [r["step"] for r in first] == [1, 2, 3, 4, 5, 6] and [r["step"] for r in second] == [4, 5, 6]
    assert [r["step"] for r in first_saves] == [3, 6] and [r["step"] for r in second_saves] == [6]
    job0 = sweep_dir / "0"
    return Sweep(sweep_dir, [_rows(job0 / "metrics.jsonl"), first[:3] + second],
                 [_rows(job0 / "checkpoints.jsonl"), first_saves[:1] + second_saves], first)


def _report(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.report", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, env=base_env(), timeout=300, check=False)


def _figures(page: str) -> dict[str, dict]:
    """The plotly figures the page draws, by panel id (the JSON handed to Plotly.newPlot)."""
    found = re.findall(r'<script type="application/json" class="figure" data-for="([\w-]+)">(.*?)</script>', page, re.DOTALL)
    return {panel: json.loads(text) for panel, text in found}


class _Tables(HTMLParser):
    """Cell texts of every table with an id: {id: [[cell, ...], ...]}."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: dict[str, list[list[str]]] = {}
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "table" and attrs.get("id"):
            self._table = attrs["id"]
            self.tables[self._table] = []
        elif tag == "tr" and self._table:
            self.tables[self._table].append([])
        elif tag in ("td", "th") and self._table:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag in ("td", "th") and self._cell is not None:
            self.tables[self._table][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def _tables(page: str) -> dict[str, list[list[str]]]:
    parser = _Tables()
    parser.feed(page)
    return parser.tables


@pytest.fixture(scope="module")
def sweep_page(sweep: Sweep, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("page") / "sweep.html"
    proc = _report(sweep.dir, "--output", out, cwd=out.parent)
    assert proc.returncode == 0, proc.stderr
    return out, proc


def test_report_of_a_sweep_plots_every_job_from_its_own_files(sweep: Sweep, sweep_page) -> None:
    out, proc = sweep_page
    page = out.read_text()
    labels = [f"0: optim.lr={LRS[0]}", f"1: optim.lr={LRS[1]}"]  # the job number and what differs
    assert proc.stdout.strip() == f"wrote {out}: 2 runs ({', '.join(labels)})"
    assert not re.search(r'src="https?:', page)  # opens offline: plotly.js is inline
    figures = _figures(page)
    assert list(figures) == ["loss-steps", "loss-tokens", "tokens-per-s", "data-wait", "memory", "lr",
                             "grad-norm", "checkpoints", "val-by-source"]

    def trace(panel: str, label: str, i: int = 0) -> dict:
        return [t for t in figures[panel]["data"] if t["name"] == label][i]

    for label, rows, saves in zip(labels, sweep.rows, sweep.checkpoints):
        assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
        val = [r for r in rows if "val_loss" in r]
        assert [r["step"] for r in val] == [3, 6]
        for panel, x in (("loss-steps", "step"), ("loss-tokens", "tokens_seen")):
            assert trace(panel, label, 0)["x"] == [r[x] for r in rows]
            assert trace(panel, label, 0)["y"] == [r["loss"] for r in rows]
            assert trace(panel, label, 1)["x"] == [r[x] for r in val]
            assert trace(panel, label, 1)["y"] == [r["val_loss"] for r in val]
        for panel, key in (("tokens-per-s", "tokens_per_s"), ("data-wait", "data_wait_s"), ("lr", "lr"),
                           ("grad-norm", "grad_norm")):
            assert trace(panel, label)["x"] == [r["step"] for r in rows]
            assert trace(panel, label)["y"] == [r[key] for r in rows]
        assert trace("memory", label)["y"] == pytest.approx([r["memory_bytes"] / 2**30 for r in rows])
        assert trace("checkpoints", label, 0)["x"] == [3, 6]
        assert trace("checkpoints", label, 0)["y"] == [r["save_s"] for r in saves]
        assert trace("checkpoints", label, 1)["y"] == [r["blocked_s"] for r in saves]
        for source, i in (("a", 0), ("b", 1)):
            assert trace("val-by-source", label, i)["y"] == [r["val_loss_by_source"][source] for r in val]
    # one trace per run on each plot (two where the plot has two series: loss and held-out loss,
    # save and blocked, one per source), and each run in one colour everywhere
    for panel, fig in figures.items():
        per_run = {"loss-steps": 2, "loss-tokens": 2, "checkpoints": 2, "val-by-source": 2}.get(panel, 1)
        assert [t["name"] for t in fig["data"]] == labels * per_run, panel
    for label in labels:
        assert len({t["line"]["color"] for fig in figures.values() for t in fig["data"] if t["name"] == label}) == 1
    # MFU is n/a on the CPU, said in words where the plot would be
    assert re.search(r'<div class="panel na" id="mfu">MFU: n/a', page)

    tables = _tables(page)
    summary = {row[0]: row[1:] for row in tables["summary"][1:]}
    for label, rows in zip(labels, sweep.rows):
        steps, final_loss, final_val = summary[label][:3]
        assert (steps, final_loss, final_val) == ("6", f"{rows[-1]['loss']:.4f}", f"{rows[-1]['val_loss']:.4f}")
        assert summary[label][-1] == "2"  # checkpoints
    # the configs side by side: what the sweep varied first, with each job's value; the rest folded
    differing = tables["config-differing"]
    assert differing[0] == ["key", *labels] and differing[1:] == [["optim.lr", *LRS]]
    same = dict(row for row in tables["config-same"][1:])
    assert same["run.dir"] == "<run dir>" and same["checkpoint.url"] == "<run dir>/checkpoints"
    assert same["model.dim"] == "128"
    assert re.search(r'<details><summary>The other \d+ keys, the same in every run</summary><table id="config-same">',
                     page)


def test_a_resumed_job_shows_the_rows_of_its_final_attempt(sweep: Sweep, sweep_page) -> None:
    """Job 1 logged steps 1 to 6, crashed in a row, and its resumed run logged 4 to 6 again: the
    page shows 1 to 3 of the first attempt and 4 to 6 of the second, and says so."""
    out, proc = sweep_page
    page = out.read_text()
    (speed,) = [t for t in _figures(page)["tokens-per-s"]["data"] if t["name"].startswith("1:")]
    # the losses of both attempts are the same (bit for bit on the CPU); their measured speeds are not
    assert speed["y"] == [r["tokens_per_s"] for r in sweep.rows[1]] != [r["tokens_per_s"] for r in sweep.first_attempt]
    assert f"{sweep.dir / '1' / 'metrics.jsonl'}:7: skipped a half-written row" in proc.stderr
    assert f"{sweep.dir / '1' / 'metrics.jsonl'}: resumed; 3 rows of an earlier attempt replaced" in page


class _Drawn(HTMLParser):
    """What plotly drew in each panel of a rendered page: its SVGs, and per scatter trace the
    markers drawn."""

    def __init__(self) -> None:
        super().__init__()
        self.svgs: dict[str, int] = {}
        self.traces: dict[str, list[int]] = {}
        self._divs: list[str | None] = []  # the panel each open div belongs to
        self._gs: list[bool] = []  # open <g>: is it a scatter trace

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        classes = (attrs.get("class") or "").split()
        panel = self._divs[-1] if self._divs else None
        if tag == "div":
            if "panel" in classes:
                panel = attrs["id"]
                self.svgs[panel], self.traces[panel] = 0, []
            self._divs.append(panel)
        elif tag == "g":
            is_trace = panel is not None and {"trace", "scatter"} <= set(classes)
            if is_trace:
                self.traces[panel].append(0)
            self._gs.append(is_trace)
        elif panel is not None and tag == "svg" and "main-svg" in classes:
            self.svgs[panel] += 1
        elif panel is not None and tag == "path" and "point" in classes and any(self._gs):
            self.traces[panel][-1] += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "div" and self._divs:
            self._divs.pop()
        elif tag == "g" and self._gs:
            self._gs.pop()


def _chromium() -> str:
    path = shutil.which(CHROMIUM)
    if path is None:
        unavailable("chromium", "no chromium on PATH (apt-get install chromium)")
    return path


def test_report_draws_its_plots_in_a_browser(sweep_page, tmp_path: Path) -> None:
    browser = _chromium()
    out, _ = sweep_page
    dom = subprocess.run([browser, "--headless", "--disable-gpu", "--no-sandbox", "--disable-dev-shm-usage",
                          f"--user-data-dir={tmp_path}", "--virtual-time-budget=30000", "--dump-dom", out.as_uri()],
                         capture_output=True, text=True, timeout=180, check=False)
    assert dom.returncode == 0, dom.stderr[-2000:]
    drawn = _Drawn()
    drawn.feed(dom.stdout)
    figures = _figures(out.read_text())
    assert set(drawn.svgs) == {*figures, "mfu"}
    assert drawn.svgs["mfu"] == 0 and drawn.traces["mfu"] == []  # n/a, not an empty axis
    for panel, fig in figures.items():
        assert drawn.svgs[panel] >= 1, panel  # plotly drew it
        assert len(drawn.traces[panel]) == len(fig["data"]), panel  # every trace, none lost
    # markers as many as the points of the traces drawn with markers (held-out losses, checkpoints)
    for panel in ("loss-steps", "checkpoints", "val-by-source"):
        expected = [len(t["x"]) if "markers" in t["mode"] else 0 for t in figures[panel]["data"]]
        assert sorted(drawn.traces[panel]) == sorted(expected), panel


def test_a_run_made_before_checkpoints_jsonl_is_said_to_have_no_checkpoint_times(sweep: Sweep,
                                                                                   tmp_path: Path) -> None:
    old = tmp_path / "old-run"
    shutil.copytree(sweep.dir / "0", old, ignore=shutil.ignore_patterns("checkpoints*"))
    out = tmp_path / "r.html"
    proc = _report(sweep.dir / "1", old, "--output", out, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    page = out.read_text()
    ckpt = _figures(page)["checkpoints"]
    (name,) = {t["name"] for t in ckpt["data"]}
    assert name.endswith(f"{sweep.dir.name}/1: optim.lr={LRS[1]}")
    note = ckpt["layout"]["title"]["text"]
    assert "no checkpoints.jsonl (runs made before the harness wrote one): " in note and f"old-run: optim.lr={LRS[0]}" in note
    alone = tmp_path / "alone.html"
    assert _report(old, "--output", alone, cwd=tmp_path).returncode == 0
    assert '<div class="panel na wide" id="checkpoints">Checkpoint times: none of these runs' in alone.read_text()


def test_bad_input_is_one_line_exit_2_and_the_old_report_stays(sweep: Sweep, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    out.write_text("the report of yesterday")
    empty = tmp_path / "not-a-run"
    empty.mkdir()
    proc = _report(sweep.dir, empty, "--output", out, cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [(f"train.report: error: {empty}: no metrics.jsonl; expected a run directory "
                                         f"(with metrics.jsonl) or a sweep directory (numbered job directories "
                                         f"with metrics.jsonl)")]
    # a row broken in the middle of the file is not a crash's cut-off: name the line
    broken = tmp_path / "broken"
    shutil.copytree(sweep.dir / "0", broken, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    lines = (broken / "metrics.jsonl").read_text().splitlines(keepends=True)
    lines[1] = lines[1].replace('"loss"', '"loss', 1)
    (broken / "metrics.jsonl").write_text("".join(lines))
    proc = _report(broken, "--output", out, cwd=tmp_path)
    assert proc.returncode == 2
    (line,) = proc.stderr.splitlines()
    assert line.startswith(f"train.report: error: {broken / 'metrics.jsonl'}:2: not a JSON object"), line
    # no plotly: what to install
    stub = tmp_path / "no-plotly"
    (stub / "plotly").mkdir(parents=True)
    (stub / "plotly" / "__init__.py").write_text("raise ImportError('no plotly here')\n")
    env = base_env()
    env["PYTHONPATH"] = f"{stub}:{env['PYTHONPATH']}"
    proc = subprocess.run([sys.executable, "-m", "train.report", str(sweep.dir), "--output", str(out)],
                          cwd=tmp_path, capture_output=True, text=True, env=env, timeout=120, check=False)
    assert proc.returncode == 2 and "pip install 'train-harness[report]'" in proc.stderr
    assert len(proc.stderr.splitlines()) == 1
    assert out.read_text() == "the report of yesterday"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "no-plotly", "not-a-run", "report.html"]
    # good input replaces it, whole
    assert _report(sweep.dir / "0", "--output", out, cwd=tmp_path).returncode == 0
    assert out.read_text().startswith("<!DOCTYPE html>") and out.read_text().endswith("</html>")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "no-plotly", "not-a-run", "report.html"]
