"""`python -m train.report RUN_DIR [RUN_DIR ...] --output report.html`: one HTML page that
compares runs.

    python -m train.report runs/20261202-065954-29668 --output sweep.html   # a `-m` sweep: every job
    python -m train.report runs/a runs/b --output a-vs-b.html

Per run directory it reads `metrics.jsonl`, `config.yaml` and `checkpoints.jsonl` (runs made
before that file existed have no checkpoint plot, and the page says so). A sweep directory (no
metrics.jsonl of its own, numbered job directories that have one) stands for its jobs. The page
has a summary table, plots (plotly, its JavaScript inline: the page opens offline, on a login
node) of the loss and held-out loss against steps and tokens, tokens/s, MFU, data wait, memory,
learning rate, gradient norm, checkpoint times and per-source held-out loss, and the configs
side by side, the keys that differ first. Each run has one colour on every plot. The output is
replaced as a whole or not at all.
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import math
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("train.report")

INSTALL = "pip install 'train-harness[report]'  (or: pip install plotly)"
RUN_DIR_TOKEN = "<run dir>"  # stands for each run's own directory in config values that contain it
LABEL_KEYS = 3  # differing config keys shown in a run's label
NO_CKPT = "runs made before the harness wrote one"
NO_MFU = "MFU: n/a. MFU needs the accelerator's peak FLOP/s, unknown where these runs ran (the CPU)."
GIB = 2**30


class ReportError(ValueError):
    """An input the report cannot use: the message says which file or directory and what is expected."""


@dataclass
class Run:
    path: Path
    rows: list[dict[str, Any]]
    config: dict[str, str] | None  # flattened: "optim.lr" -> "0.001"; None without config.yaml
    checkpoints: list[dict[str, Any]] | None  # None without checkpoints.jsonl
    notes: list[str] = field(default_factory=list)
    label: str = ""


# -- reading ---------------------------------------------------------------------------------------
def read_jsonl(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    """The JSON objects of `path`, one a line.

    A crash can leave a half-written last row; a resumed run then appends its first row to it
    on the same line. Both are normal: the fragment is skipped with a note. Any other line that
    is not a JSON object is an error naming file:line.
    """
    text = path.read_text()
    lines = text.split("\n")
    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            if number == len(lines):  # no newline after it: the write was cut off
                notes.append(f"{path}:{number}: skipped a half-written last line")
                continue
            start = line.rfind('{"step"', 1)
            try:
                row = json.loads(line[start:]) if start > 0 else None
            except json.JSONDecodeError:
                row = None
            if row is None:
                raise ReportError(f"{path}:{number}: not a JSON object ({exc.msg}); expected one row a line "
                                  f"as the harness writes it") from None
            notes.append(f"{path}:{number}: skipped a half-written row (a crash) before the resumed run's row")
        if not isinstance(row, dict) or not isinstance(row.get("step"), int):
            raise ReportError(f"{path}:{number}: expected a JSON object with an integer 'step', found {line[:80]!r}")
        rows.append(row)
    return rows


def training_rows(rows: list[dict[str, Any]], notes: list[str], path: Path) -> list[dict[str, Any]]:
    """The rows of the run's final history. Steps only rise within one attempt; a resumed run
    starts again after its checkpoint, so a step at or below the last one kept marks a restart:
    the last row for a step wins, and the rows of the abandoned attempt after it go with it."""
    kept: list[dict[str, Any]] = []
    replaced = 0
    for row in rows:
        while kept and kept[-1]["step"] >= row["step"]:
            kept.pop()
            replaced += 1
        kept.append(row)
    if replaced:
        notes.append(f"{path}: resumed; {replaced} rows of an earlier attempt replaced by the later ones")
    return kept


def flatten(value: Any, prefix: str = "") -> dict[str, str]:
    """Nested config -> {"a.b": text}; lists and empty mappings are one value."""
    if isinstance(value, dict) and value:
        out: dict[str, str] = {}
        for key, sub in value.items():
            out |= flatten(sub, f"{prefix}{key}.")
        return out
    text = value if isinstance(value, str) else json.dumps(value)
    return {prefix[:-1]: text}


def read_config(path: Path) -> dict[str, str] | None:
    if not path.exists():
        return None
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        config = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except (yaml.YAMLError, OmegaConfBaseException) as exc:
        raise ReportError(f"{path}: not a config as the harness writes it: {' '.join(str(exc).split())}") from None
    if not isinstance(config, dict):
        raise ReportError(f"{path}: expected a mapping of config keys, found {type(config).__name__}")
    flat = flatten(config) if config else {}
    # Paths under the run's own directory (run.dir, checkpoint.url) differ between any two runs;
    # written relative to it they compare as what they are: the same setting.
    own = flat.get("run.dir")
    if own:
        flat = {key: value.replace(own, RUN_DIR_TOKEN) for key, value in flat.items()}
    return flat


def expand(run_dir: Path) -> list[Path]:
    """A run directory is itself; a sweep directory is its numbered jobs that have metrics."""
    if (run_dir / "metrics.jsonl").is_file():
        return [run_dir]
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a directory; expected a run directory (with metrics.jsonl) "
                          f"or a sweep directory (numbered job directories with metrics.jsonl)")
    children = sorted((p for p in run_dir.iterdir() if (p / "metrics.jsonl").is_file()), key=lambda p: p.name)
    jobs = sorted((p for p in children if p.name.isdigit()), key=lambda p: int(p.name))
    if jobs:
        for path in sorted(p for p in run_dir.iterdir() if p.name.isdigit() and p not in jobs):
            log.warning("%s: no metrics.jsonl (the job stopped before its first step?): left out", path)
        return jobs
    hint = f"; these directories in it have one: {', '.join(p.name for p in children[:3])}" if children else ""
    raise ReportError(f"{run_dir}: no metrics.jsonl; expected a run directory (with metrics.jsonl) or a sweep "
                      f"directory (numbered job directories with metrics.jsonl){hint}")


def load_run(path: Path) -> Run:
    notes: list[str] = []
    rows = training_rows(read_jsonl(path / "metrics.jsonl", notes), notes, path / "metrics.jsonl")
    if not rows:
        notes.append(f"{path}: metrics.jsonl has no rows yet")
    config = read_config(path / "config.yaml")
    if config is None:
        notes.append(f"{path}: no config.yaml")
    checkpoints = None  # no checkpoints.jsonl: the checkpoint panel says so
    if (path / "checkpoints.jsonl").is_file():
        by_step = {row["step"]: row for row in read_jsonl(path / "checkpoints.jsonl", notes)}  # last one wins
        checkpoints = [by_step[step] for step in sorted(by_step)]
    return Run(path, rows, config, checkpoints, notes)


def load_runs(run_dirs: list[Path]) -> list[Run]:
    paths: list[Path] = []
    for run_dir in run_dirs:
        for path in expand(run_dir):
            if path.resolve() not in [p.resolve() for p in paths]:
                paths.append(path)
    runs = [load_run(path) for path in paths]
    differing, _ = compare_configs(runs)
    # a label names first what varies most (the swept keys before what a preset changed alongside)
    distinct = {key: len({(run.config or {}).get(key) for run in runs}) for key in differing}
    differing.sort(key=lambda key: -distinct[key])
    common = common_parent(paths)
    for run in runs:
        settings = [f"{key}={run.config[key]}" for key in differing if run.config and key in run.config]
        more = ", ..." if len(settings) > LABEL_KEYS else ""
        name = str(run.path.resolve().relative_to(common))
        run.label = f"{name}: {', '.join(settings[:LABEL_KEYS])}{more}" if settings else name
    return runs


def common_parent(paths: list[Path]) -> Path:
    """The directory that run labels are relative to: the runs' common parent."""
    common = Path(os.path.commonpath([p.resolve() for p in paths]))
    return common.parent if len(paths) == 1 else common


def compare_configs(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(keys whose values differ between the runs that have a config, keys that are the same), in
    config order; a key missing from a run differs."""
    configs = [run.config for run in runs if run.config is not None]
    keys = list(dict.fromkeys(key for config in configs for key in config))
    differing = [key for key in keys if len({config.get(key) for config in configs}) > 1]
    return differing, [key for key in keys if key not in differing]


# -- numbers ---------------------------------------------------------------------------------------
def summary(run: Run) -> dict[str, Any]:
    rows = run.rows
    vals = [row["val_loss"] for row in rows if row.get("val_loss") is not None]
    timed = rows[1:] or rows  # the first window includes start-up
    tps = [row["tokens_per_s"] for row in timed if row.get("tokens_per_s")]
    memory = [row["memory_bytes"] for row in rows if row.get("memory_bytes") is not None]
    reserved = [row["memory_reserved_bytes"] for row in rows if row.get("memory_reserved_bytes") is not None]
    return {
        "steps": rows[-1]["step"] if rows else None,
        "final loss": rows[-1].get("loss") if rows else None,
        "final val loss": vals[-1] if vals else None,
        "median tokens/s": statistics.median(tps) if tps else None,
        "peak memory": max(memory) if memory else None,
        "peak reserved": max(reserved) if reserved else None,
        "wall time": rows[-1]["time"] - rows[0]["time"] if len(rows) > 1 and rows[0].get("time")
        and rows[-1].get("time") else None,
        "checkpoints": len(run.checkpoints) if run.checkpoints is not None else None,
    }


def _fmt(key: str, value: Any) -> str:
    if value is None:
        return "n/a"
    if key in ("final loss", "final val loss"):
        return f"{value:.4f}"
    if key == "median tokens/s":
        return f"{value:,.0f}"
    if key in ("peak memory", "peak reserved"):
        return f"{value / GIB:.2f} GiB"
    if key == "wall time":
        minutes, seconds = divmod(round(value), 60)
        return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}"
    return str(value)


# -- plots -----------------------------------------------------------------------------------------
def colours(n: int) -> list[str]:
    from plotly.colors import qualitative

    palette = qualitative.Plotly if n <= len(qualitative.Plotly) else qualitative.Dark24 + qualitative.Light24
    return [palette[i % len(palette)] for i in range(n)]


def _points(rows: list[dict[str, Any]], x: str, y: str, scale: float = 1.0) -> tuple[list, list]:
    pairs = [(row[x], row[y] * scale) for row in rows
             if row.get(x) is not None and isinstance(row.get(y), (int, float)) and math.isfinite(row[y])]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _trace(go: Any, run: Run, colour: str, xs: list, ys: list, *, what: str, dash: str = "solid",
           markers: bool = False) -> Any:
    return go.Scatter(x=xs, y=ys, name=run.label, legendgroup=run.label, showlegend=False,
                      mode="lines+markers" if markers else "lines",
                      line={"color": colour, "dash": dash, "width": 2}, marker={"color": colour, "size": 6},
                      hovertemplate=f"{html.escape(what)}: %{{y:.4g}} at %{{x:,}}<extra>{html.escape(run.label)}</extra>")


def _figure(go: Any, title: str, xtitle: str, ytitle: str, traces: list, note: str = "") -> Any:
    fig = go.Figure(traces)
    fig.update_layout(title={"text": title + (f"<br><sup>{html.escape(note)}</sup>" if note else "")},
                      template="plotly_white", height=360, margin={"l": 60, "r": 20, "t": 70, "b": 50},
                      hovermode="closest", xaxis_title=xtitle, yaxis_title=ytitle)
    return fig


def _grid(make_subplots: Any, title: str, titles: list[str], cols: int, xtitle: str, note: str = "") -> Any:
    rows = math.ceil(len(titles) / cols)
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=titles)
    fig.update_xaxes(title_text=xtitle)
    fig.update_layout(title={"text": title + (f"<br><sup>{html.escape(note)}</sup>" if note else "")},
                      template="plotly_white", height=60 + 300 * rows, margin={"l": 60, "r": 20, "t": 90, "b": 50})
    return fig


def figures(runs: list[Run], palette: list[str]) -> list[tuple[str, Any]]:
    """(panel id, a plotly figure or the text that stands in its place), in page order."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    coloured = list(zip(runs, palette))

    def lines(y: str, x: str = "step", scale: float = 1.0, dash: str = "solid") -> list:
        return [_trace(go, run, c, *_points(run.rows, x, y, scale), what=y, dash=dash) for run, c in coloured]

    def with_val(x: str) -> list:
        return lines("loss", x) + [_trace(go, run, c, *_points(run.rows, x, "val_loss"), what="val_loss",
                                          dash="dot", markers=True) for run, c in coloured]

    panels: list[tuple[str, Any]] = [
        ("loss-steps", _figure(go, "Loss against steps", "step", "loss", with_val("step"),
                               "solid: training loss (mean since the previous row); dotted: held-out loss")),
        ("loss-tokens", _figure(go, "Loss against tokens seen", "tokens seen", "loss", with_val("tokens_seen"),
                                "solid: training loss; dotted: held-out loss")),
        ("tokens-per-s", _figure(go, "Throughput", "step", "tokens/s (all ranks)", lines("tokens_per_s"))),
    ]
    no_mfu = [run.label for run in runs if all(row.get("mfu") is None for row in run.rows)]
    if len(no_mfu) == len(runs):
        panels.append(("mfu", NO_MFU))
    else:
        traces = [t for t in lines("mfu", scale=100) if t.name not in no_mfu]
        note = f"n/a (no known peak FLOP/s): {', '.join(no_mfu)}" if no_mfu else ""
        panels.append(("mfu", _figure(go, "Model FLOPs utilisation", "step", "MFU (%)", traces, note)))
    reserved = [t for t in lines("memory_reserved_bytes", scale=1 / GIB, dash="dash") if len(t.x)]
    panels += [
        ("data-wait", _figure(go, "Data wait", "step", "seconds per step waiting for batches", lines("data_wait_s"))),
        ("memory", _figure(go, "Peak memory of each logging window", "step", "GiB",
                           lines("memory_bytes", scale=1 / GIB) + reserved,
                           "solid: allocated (peak RSS on the CPU); dashed: reserved by the CUDA allocator")),
        ("lr", _figure(go, "Learning rate", "step", "learning rate", lines("lr"))),
        ("grad-norm", _figure(go, "Gradient norm (before clipping)", "step", "gradient norm", lines("grad_norm"))),
    ]

    without = [run.label for run in runs if run.checkpoints is None]
    if len(without) == len(runs):
        panels.append(("checkpoints", f"Checkpoint times: none of these runs has a checkpoints.jsonl ({NO_CKPT})."))
    else:
        note = f"no checkpoints.jsonl ({NO_CKPT}): {', '.join(without)}" if without else ""
        fig = _grid(make_subplots, "Checkpoint times", ["save: start to commit (s)",
                                                        "training loop blocked by the save (s)"], 2, "step", note)
        for col, key in ((1, "save_s"), (2, "blocked_s")):
            for run, c in coloured:
                if run.checkpoints is not None:
                    fig.add_trace(_trace(go, run, c, *_points(run.checkpoints, "step", key), what=key, markers=True),
                                  row=1, col=col)
        panels.append(("checkpoints", fig))

    by_source = [row.get("val_loss_by_source") or {} for run in runs for row in run.rows]
    sources = list(dict.fromkeys(name for values in by_source for name in values))
    if sources:
        cols = min(len(sources), 3)
        fig = _grid(make_subplots, "Held-out loss per data source", [f"source {s}" for s in sources], cols, "step")
        for i, source in enumerate(sources):
            for run, c in coloured:
                rows = [row for row in run.rows if source in (row.get("val_loss_by_source") or {})]
                if rows:
                    xs, ys = [r["step"] for r in rows], [r["val_loss_by_source"][source] for r in rows]
                    fig.add_trace(_trace(go, run, c, xs, ys, what=f"val_loss {source}", markers=True),
                                  row=i // cols + 1, col=i % cols + 1)
        panels.append(("val-by-source", fig))
    return panels


# -- the page --------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 14px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 12px; height: 12px; border-radius: 2px; margin-right: 6px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(560px, 1fr)); gap: 12px; }
.panel { border: 1px solid #eee; min-height: 360px; }
.panel.wide { grid-column: 1 / -1; }
.panel.na { min-height: 0; padding: 2em; color: #666; }
.notes { color: #666; font-size: 13px; }
"""


def _run_head(run: Run, colour: str) -> str:
    return f'<span class="swatch" style="background:{colour}"></span>{html.escape(run.label)}'


def render(runs: list[Run]) -> str:
    """The whole page: plotly.js inline, each figure's JSON in a script element that a small
    script hands to Plotly.newPlot (the same JSON the tests read back)."""
    from plotly.offline import get_plotlyjs

    palette = colours(len(runs))
    stats = [summary(run) for run in runs]
    keys = list(stats[0])
    head = "".join(f"<th>{k}</th>" for k in ["run", *keys])
    body = "".join("<tr><td>" + _run_head(run, c) + "</td>" + "".join(f'<td class="num">{_fmt(k, s[k])}</td>'
                                                                       for k in keys) + "</tr>"
                   for run, c, s in zip(runs, palette, stats))
    out = [f'<h2>Runs</h2><table id="summary"><tr>{head}</tr>{body}</table>',
           ('<p class="notes">wall time: first to last logged step; median tokens/s: without the first row '
           '(start-up); peak memory: allocated (peak RSS on the CPU)</p>')]
    notes = [note for run in runs for note in run.notes]
    if notes:
        out.append('<ul class="notes">' + "".join(f"<li>{html.escape(n)}</li>" for n in notes) + "</ul>")

    out.append('<h2>Plots</h2><div class="grid">')
    for panel_id, fig in figures(runs, palette):
        wide = " wide" if panel_id in ("checkpoints", "val-by-source") else ""
        if isinstance(fig, str):
            out.append(f'<div class="panel na{wide}" id="{panel_id}">{html.escape(fig)}</div>')
            continue
        data = fig.to_json().replace("<", "\\u003c")  # nothing in it can end the script element
        out.append(f'<div class="panel plot{wide}" id="{panel_id}"></div>'
                   f'<script type="application/json" class="figure" data-for="{panel_id}">{data}</script>')
    out.append("</div>")

    differing, same = compare_configs(runs)
    cols = "".join(f"<th>{_run_head(run, c)}</th>" for run, c in zip(runs, palette))

    def value(run: Run, key: str) -> str:
        return html.escape(run.config.get(key, "(absent)")) if run.config else "(no config.yaml)"

    rows = "".join(f"<tr><td>{html.escape(k)}</td>" + "".join(f"<td>{value(r, k)}</td>" for r in runs) + "</tr>"
                   for k in differing)
    out.append(f'<h2>Config</h2><h3>Keys that differ ({len(differing)})</h3>'
               f'<table id="config-differing"><tr><th>key</th>{cols}</tr>{rows}</table>')
    first = next((run for run in runs if run.config is not None), runs[0])
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{value(first, k)}</td></tr>" for k in same)
    out.append(f"<details><summary>The other {len(same)} keys, the same in every run</summary>"
               f'<table id="config-same"><tr><th>key</th><th>value</th></tr>{rows}</table></details>')
    out.append(f'<p class="notes">{html.escape(RUN_DIR_TOKEN)}: each run\'s own directory.</p>')

    title = f"Training report: {len(runs)} run{'s' if len(runs) > 1 else ''}"
    common = str(common_parent([run.path for run in runs]))
    draw = ("for (const el of document.querySelectorAll('script.figure')) {"
            " const fig = JSON.parse(el.textContent);"
            " Plotly.newPlot(el.dataset.for, fig.data, fig.layout, {responsive: true, displaylogo: false}); }")
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{title}</title><style>{CSS}</style>'
            f"<script>{get_plotlyjs()}</script></head><body><h1>{title}</h1>"
            f'<p class="notes">under {html.escape(common)}; made {time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}'
            f"</p>{''.join(out)}<script>{draw}</script></body></html>")


def write_atomically(path: Path, text: str) -> None:
    """Write to a temporary file next to `path`, then rename it over: `path` is whole or untouched."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as open() would have made it (mkstemp makes 0600)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.report", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="run directories or sweep directories")
    p.add_argument("--output", type=Path, default=Path("report.html"), help="the HTML page to write")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        import plotly  # noqa: F401
    except ImportError:
        log.error("error: the report draws its plots with plotly, which is not installed: %s", INSTALL)
        return 2
    try:
        if args.output.is_dir() or not args.output.parent.is_dir():
            raise ReportError(f"--output {args.output}: expected a file in an existing directory")
        runs = load_runs(args.run_dirs)
        for note in (note for run in runs for note in run.notes):
            log.warning("%s", note)
        page = render(runs)
        write_atomically(args.output, page)
    except (ReportError, OSError) as exc:
        log.error("error: %s", exc)
        return 2
    print(f"wrote {args.output}: {len(runs)} run{'s' if len(runs) > 1 else ''} ({', '.join(r.label for r in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
