"""Every command the README documents, and every command line the tools print, works as printed.

README commands that need no GPU and no cluster run here (train.run with a small
trainer.max_steps added; the placeholders of the README, such as /nvme/datasets or mybucket,
replaced by a temporary directory and a fresh bucket of the test Ceph). Commands for GPU nodes
or several nodes are composed and given the run's own start-up checks (the function
`python -m launch` calls), launchers print their commands, `launch.slurm` renders its script
(--dry-run). A README command that this file cannot classify fails the test: a new example must
say here how it is checked.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from launch.compose import check, load
from tests.distributed import REPO, base_env, free_port

CORPUS = Path(json.__file__).parent  # a small directory of text every Python has
MAX_STEPS = "trainer.max_steps=2"

# What covers the commands that are not run here.
NOT_RUN_HERE = {
    "pip install": "installs packages: CI runs the README's two commands (.ci/run)",
    "python -m pytest": "the test suite itself",
    "apt-get install": "CI installs the Debian packages (.ci/run)",
    "launch/dev/ceph.sh": "the session Ceph fixture (tests/ceph_fixture.py) runs this script",
    ". /tmp/ceph/s3.env": "the Ceph fixture exports the same three variables",
    "export TRAIN_HARNESS_CACHE": "an environment variable; every test run sets its own",
    "hf download": "downloads from the Hub: _make_inputs builds a small model of the same files with transformers",
    "rsync": "copies between hosts",
}
# A GPU command whose result a later README command reads (a checkpoint to export) is also run
# on the CPU, without its +cluster, when it holds one of these.
ALSO_RUN_ON_THE_CPU = ("model=hf",)


def _readme() -> str:
    return (REPO / "README.md").read_text()


def documented_commands() -> list[str]:
    """Each command of the README's code blocks (continuation lines joined, trailing comments
    dropped), in order, plus inline `python -m launch +cluster=...` examples of the prose."""
    commands = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", _readme(), re.S):
        block = re.sub(r"\\\n\s*", " ", block)
        for line in block.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(line)
    commands += re.findall(r"`(python -m launch \+cluster=[^`]*)`", _readme())
    return commands


@dataclass
class Context:
    tmp: Path
    env: dict[str, str]
    bucket: str = ""


def _argv(words: list[str]) -> list[str]:
    """`python` and `torchrun` as this interpreter has them."""
    if words[0] == "python":
        return [sys.executable, *words[1:]]
    if words[0] == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", *words[1:]]
    return words


def _run(words: list[str], ctx: Context, timeout_s: float = 600,
         env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {**ctx.env, "PET_MASTER_PORT": str(free_port()), **(env or {})}  # torchrun's default port may be taken
    proc = subprocess.run(_argv(words), cwd=ctx.tmp, capture_output=True, text=True, env=env,
                          timeout=timeout_s)
    assert proc.returncode == 0, f"{shlex.join(words)} exited {proc.returncode}:\n{proc.stderr[-3000:]}"
    return proc


def _train_overrides(words: list[str]) -> list[str]:
    """The train.run overrides of a torchrun / python -m train.run command line."""
    return words[words.index("train.run") + 1:]


def _gpu_or_nodes(overrides: list[str]) -> bool:
    cluster = next((o.split("=", 1)[1] for o in overrides if o.startswith("+cluster=")), None)
    if cluster is None:
        return False
    _, cfg = load([f"+cluster={cluster}"])
    return cfg.cluster.device == "cuda" or cfg.cluster.nodes > 1


def _substitute(command: str, ctx: Context, request: pytest.FixtureRequest) -> str:
    """README placeholders -> this test's files and bucket."""
    if "mybucket" in command:
        if not ctx.bucket:
            ceph = request.getfixturevalue("ceph")
            ctx.env.update(ceph.env)
            ctx.bucket = f"readme-{uuid.uuid4().hex[:8]}"
        command = command.replace("mybucket", ctx.bucket)
    return (command.replace("--input corpus/", f"--input {CORPUS}")
            .replace("/nvme/datasets/", f"{ctx.tmp}/datasets/")
            .replace("/nvme/models/", f"{ctx.tmp}/models/")
            .replace("/nvme/checkpoints/", f"{ctx.tmp}/checkpoints/")
            .replace("--input data.jsonl", f"--input {ctx.tmp}/data.jsonl")
            .replace("--tokenizer tokenizer.json", f"--tokenizer {ctx.tmp}/tokenizer.json"))


def check_documented(command: str, ctx: Context, request: pytest.FixtureRequest) -> str:
    """Check one README command the way its kind allows; return how it was checked."""
    for prefix, reason in NOT_RUN_HERE.items():
        if command.startswith(prefix) or f"&& {prefix}" in command:
            return f"not run: {reason}"
    command = _substitute(command, ctx, request)
    words = shlex.split(command)
    prefixes = []
    while "=" in words[0] and not words[0].startswith(("python", "torchrun")):  # VAR=value prefix
        prefixes.append(words.pop(0).split("=", 1)[0])
    # The tracker servers of the examples are not here: without MLFLOW_TRACKING_URI MLflow logs to
    # the run directory's store; W&B, given a placeholder key, runs offline.
    env = {"WANDB_MODE": "offline"} if "WANDB_API_KEY" in prefixes else {}
    words = [w for w in words if w != "..."]  # "and your other overrides"
    if "train.run" in words:
        overrides = _train_overrides(words)
        if _gpu_or_nodes(overrides):
            _, cfg = load(overrides)
            check(cfg, cfg.cluster)  # what `python -m launch` and train.run check before starting
            if any(marker in overrides for marker in ALSO_RUN_ON_THE_CPU):
                _run(["python", "-m", "train.run", *[o for o in overrides if not o.startswith("+cluster=")],
                      MAX_STEPS], ctx)
                return "composed, checked, ran on the CPU"
            return "composed and checked"
        _run([*words, MAX_STEPS], ctx, env=env)
        return "ran with trainer.max_steps=2" + (" (W&B offline)" if env else "")
    if words[:3] == ["python", "-m", "launch.slurm"]:
        if "--dry-run" not in words:
            words.append("--dry-run")  # submitting needs a Slurm with GPU nodes
        assert "#SBATCH" in _run(words, ctx).stdout
        return "rendered with --dry-run"
    if words[:3] == ["python", "-m", "launch"]:
        if "--run" in words and _gpu_or_nodes(words[3:]):
            words.remove("--run")  # starting it needs the GPUs; the command is printed instead
        assert "train.run" in _run(words, ctx).stdout
        return "printed its command"
    if words[:2] == ["python", "-m"] or words[:2] == ["python", "-c"]:
        _run(words, ctx)
        return "ran as printed"
    raise AssertionError(f"README command not classified by tests/test_commands.py: {command}")


def _make_inputs(tmp: Path) -> None:
    tokenizers = pytest.importorskip("tokenizers")
    words = {w: i for i, w in enumerate(sorted(set(re.findall(r"\w+", (CORPUS / "decoder.py").read_text()))))}
    words["[UNK]"] = len(words)
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp / "tokenizer.json"))
    with open(tmp / "data.jsonl", "w") as f:
        for path in sorted(CORPUS.glob("*.py")):
            f.write(json.dumps({"text": path.read_text()}) + "\n")
    # "Starting from a Hugging Face model": a small random Llama where the README downloads one
    pytest.importorskip("transformers")
    from tests.test_hf import SHAPE, _llama, _tokenizer

    model = tmp / "models" / "Llama-3.2-1B"
    _llama(model, shape={**SHAPE, "max_position_embeddings": 2048})  # data=shards' 2048-token samples
    _tokenizer(model)


def test_every_readme_command_works_as_printed(tmp_path: Path, harness_cache: Path,
                                               request: pytest.FixtureRequest) -> None:
    _make_inputs(tmp_path)
    ctx = Context(tmp_path, base_env(harness_cache))
    commands = documented_commands()
    assert len(commands) > 15, commands  # the parser found the README's examples
    checked = {command: check_documented(command, ctx, request) for command in commands}
    print("\n".join(f"{how:<32} {command}" for command, how in checked.items()))
    assert sum(how.startswith("ran with trainer.max_steps=2") for how in checked.values()) >= 2


def _hint(text: str, marker: str) -> list[str]:
    line = next(line for line in text.splitlines() if marker in line)
    return shlex.split(line.split(marker, 1)[1].split("   (")[0])


def test_the_command_storage_prepare_prints_trains(tmp_path: Path, harness_cache: Path) -> None:
    ctx = Context(tmp_path, base_env(harness_cache))
    out = _run(["python", "-m", "storage.prepare", "--input", str(CORPUS), "--output", str(tmp_path / "ds")], ctx)
    hint = _hint(out.stdout, "train on it: ")
    assert hint[:3] == ["python", "-m", "train.run"], out.stdout
    run = _run([*hint, MAX_STEPS], ctx)
    assert run.stdout.splitlines()[-1].startswith("run_dir: ")


def test_the_layout_hint_and_the_launcher_print_the_same_command_and_it_trains(tmp_path: Path,
                                                                               harness_cache: Path) -> None:
    ctx = Context(tmp_path, base_env(harness_cache))
    wrong = subprocess.run([sys.executable, "-m", "train.run", "+cluster=2xCPU", MAX_STEPS], cwd=tmp_path,
                           capture_output=True, text=True, env=ctx.env, timeout=300)
    assert wrong.returncode == 2, wrong.stderr
    hint = _hint(wrong.stderr, "Run: ")
    printed = _run(["python", "-m", "launch", "+cluster=2xCPU", MAX_STEPS], ctx).stdout.strip().splitlines()[-1]
    assert shlex.split(printed) == hint
    run = _run(hint, ctx)
    rows = [json.loads(line) for line in (Path(run.stdout.splitlines()[-1].split(": ", 1)[1]) / "metrics.jsonl").open()]
    assert [row["step"] for row in rows if "loss" in row][-1] == 2


def test_the_fix_the_planner_names_fits(tmp_path: Path) -> None:
    ctx = Context(tmp_path, base_env())
    args = ["python", "-m", "launch.plan", "+cluster=8xA100", "model=llama_8b", "parallel=ddp"]
    plan = subprocess.run(_argv(args), cwd=tmp_path, capture_output=True, text=True, env=ctx.env, timeout=300)
    assert plan.returncode == 1, plan.stdout
    fix = _hint(plan.stdout, "cheapest that fits: ")
    fix = fix[:fix.index("->")]
    fixed = _run([*args, *fix], ctx)
    assert "verdict: fits" in fixed.stdout
