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
import json
import logging
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("train.report")

INSTALL = "pip install 'train-harness[report]'  (or: pip install plotly)"
RUN_DIR_TOKEN = "<run dir>"  # stands for each run's own directory in config values that contain it
LABEL_KEYS = 3  # differing config keys shown in a run's label


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
        from train.report_page import render  # plotly: imported once it is known to be there

        page = render(runs)
        write_atomically(args.output, page)
    except (ReportError, OSError) as exc:
        log.error("error: %s", exc)
        return 2
    print(f"wrote {args.output}: {len(runs)} run{'s' if len(runs) > 1 else ''} ({', '.join(r.label for r in runs)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
