"""The report's page (`python -m train.report`): the summary table, the plotly figures and the
configs side by side, as one self-contained HTML document (plotly's JavaScript inline). Each
figure's JSON sits in its own `<script type="application/json">` element that a short script hands
to `Plotly.newPlot`, so what the browser draws is exactly the data the page holds.
"""

from __future__ import annotations

import html
import math
import time
from typing import Any

from train.report import RUN_DIR_TOKEN, Run, common_parent, compare_configs, summary

NO_CKPT = "runs made before the harness wrote one"
NO_MFU = "MFU: n/a. MFU needs the accelerator's peak FLOP/s, unknown where these runs ran (the CPU)."
GIB = 2**30


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
