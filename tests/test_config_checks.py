"""The defaults fit every shipped layout, one set of start-up checks decides for every tool, and
every number and mode of the schema is checked when the config is composed."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from omegaconf import DictConfig

from launch.__main__ import main as launch_main
from launch.compose import CONFIG_DIR, LaunchError, check, load
from tests.distributed import base_env
from train import config as schema
from train.checks import startup_checks
from train.distributed import LayoutError
from train.fits import current_option, make_plan

CLUSTERS = sorted(p.stem for p in (CONFIG_DIR / "cluster").glob("*.yaml"))
MODELS = sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))
PARALLEL = sorted(p.stem for p in (CONFIG_DIR / "parallel").glob("*.yaml"))


def _planner_verdict(cfg: schema.Config) -> bool | None:
    """What `launch.plan` says: None if it refuses the layout itself, else fits (unknown = True)."""
    try:
        startup = startup_checks(cfg, cfg.cluster, memory=False)
    except LayoutError:
        return None
    plan = make_plan(cfg, cfg.cluster, current_option(cfg, cfg.cluster, startup.degrees, startup.accum_steps))
    return plan.fits is not False


@pytest.fixture(scope="module")
def presets() -> dict[str, dict[str, DictConfig]]:
    """Each model and parallel preset composed once (with no cluster): the groups are separate
    packages with no interpolation, so a preset's node is the same whatever else is chosen, and a
    cluster x model x parallel config is the cluster's with the two nodes put in. Composing all 560
    combinations through Hydra took 90 s."""
    return {"model": {m: load([f"model={m}"])[0].model for m in MODELS},
            "parallel": {p: load([f"parallel={p}"])[0].parallel for p in PARALLEL}}


def _combination(base: DictConfig, presets: dict[str, dict[str, DictConfig]], model: str,
                 parallel: str) -> schema.Config:
    dcfg = base.copy()
    dcfg.model, dcfg.parallel = presets["model"][model], presets["parallel"][parallel]
    return schema.to_object(dcfg)


def test_a_combination_equals_its_composition(presets: dict[str, dict[str, DictConfig]]) -> None:
    """What `presets` relies on: putting the preset nodes into a cluster's config gives what Hydra
    composes from the three overrides."""
    base, _ = load(["+cluster=4x8xA100"])
    composed = load(["+cluster=4x8xA100", "model=llama_70b", "parallel=fsdp_tp"])[1]
    assert _combination(base, presets, "llama_70b", "fsdp_tp") == composed


@pytest.mark.parametrize("cluster", CLUSTERS)
def test_every_preset_the_planner_says_fits_passes_the_start_up_checks(
        cluster: str, presets: dict[str, dict[str, DictConfig]]) -> None:
    """Shipped cluster x model x parallel preset, with no override at all: where the planner says
    it fits, the run's own start-up checks (what train.run, launch and launch.slurm call) pass."""
    base, _ = load([f"+cluster={cluster}"])
    fitting = []
    for model in MODELS:
        for parallel in PARALLEL:
            cfg = _combination(base, presets, model, parallel)
            if _planner_verdict(cfg):
                startup_checks(cfg, cfg.cluster)  # raises with the reason if a default does not fit
                check(cfg, cfg.cluster)  # the launchers' entry point: the same function
                fitting.append((model, parallel))
    # the defaults themselves always fit, and so does the tiny model under every preset that
    # the layout's width allows
    assert ("tiny", "ddp") in fitting and ("tiny", "fsdp") in fitting, fitting


def test_launch_prints_a_command_for_every_shipped_layout(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """`python -m launch +cluster=NAME` as typed for the first layout; the others through the
    same entry point in this process (a Python start each cost 5 s)."""
    first, *others = CLUSTERS
    out = subprocess.run([sys.executable, "-m", "launch", f"+cluster={first}"], cwd=tmp_path,
                         capture_output=True, text=True, env=base_env(), timeout=120)
    assert out.returncode == 0, (first, out.stderr)
    assert f"-m train.run +cluster={first}" in out.stdout, out.stdout
    for cluster in others:
        assert launch_main([f"+cluster={cluster}"]) == 0, (cluster, capsys.readouterr().err)
        printed = capsys.readouterr().out
        assert f"-m train.run +cluster={cluster}" in printed, printed


def test_plan_answers_with_the_memory_verdict_not_a_batch_error(tmp_path: Path) -> None:
    def plan(parallel: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "launch.plan", "+cluster=8xA100", "model=llama_8b",
                               f"parallel={parallel}"], cwd=tmp_path, capture_output=True, text=True,
                              env=base_env(), timeout=120)
    ddp, fsdp = plan("ddp"), plan("fsdp")
    assert ddp.returncode == 1 and "verdict: does not fit" in ddp.stdout, ddp.stdout + ddp.stderr
    assert fsdp.returncode == 0 and "verdict: fits" in fsdp.stdout, fsdp.stdout + fsdp.stderr
    assert not list(tmp_path.iterdir())  # no plan.log (or anything else) in the working directory


def test_default_global_batch_is_one_micro_batch_per_rank() -> None:
    _, cfg = load(["+cluster=8xA100"])
    startup = startup_checks(cfg, cfg.cluster)
    assert (startup.degrees.dp, startup.accum_steps) == (8, 1)


def test_explicit_global_batch_that_does_not_split_names_the_nearest_valid_values() -> None:
    _, cfg = load(["+cluster=8xA100", "trainer.global_batch_tokens=100000", "trainer.micro_batch_size=2"])
    with pytest.raises(LayoutError) as err:
        startup_checks(cfg, cfg.cluster)
    # one micro-step = 2 x 256 x 8 = 4096 tokens; 100000 lies between 24 and 25 of them
    assert "use trainer.global_batch_tokens=98304 or 102400" in str(err.value)
    _, cfg = load(["+cluster=8xA100", "trainer.global_batch_tokens=98304", "trainer.micro_batch_size=2"])
    assert startup_checks(cfg, cfg.cluster).accum_steps == 24


def test_launchers_refuse_what_the_run_refuses() -> None:
    """The memory check is part of the one start-up check: launch.slurm cannot queue a job that
    train.run would refuse once its allocation starts."""
    _, cfg = load(["+cluster=8xA100", "model=llama_8b", "parallel=ddp"])
    with pytest.raises(LaunchError, match="needs .* GiB per GPU"):
        check(cfg, cfg.cluster)


def _numeric_fields(cls: type, prefix: str = "") -> list[tuple[str, dataclasses.Field]]:
    hints = typing.get_type_hints(cls)
    found = []
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(hint) or inner:
            found += _numeric_fields(inner[0] if inner else hint, f"{prefix}{f.name}.")
        elif hint in (int, float):
            found.append((f"{prefix}{f.name}", f))
    return found


def test_every_numeric_field_of_the_schema_has_a_range() -> None:
    fields = _numeric_fields(schema.Config)
    assert len(fields) > 50  # the walk reached every group, the cluster included
    missing = [key for key, f in fields if "range" not in f.metadata]
    assert not missing, f"numeric fields without a range: {missing}"
    for key, f in fields:  # and each default is inside its own range
        assert f.default in f.metadata["range"], (key, f.default, str(f.metadata["range"]))


RANGE_CASES = [
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 is out of range: it must be >= 1"),
    ("data.seq_len=0", "data.seq_len=0 is out of range: it must be >= 1"),
    ("optim.lr=-1", "optim.lr=-1.0 is out of range: it must be > 0"),
    ("trainer.max_steps=-5", "trainer.max_steps=-5 is out of range: it must be >= 1"),
    ("checkpoint.keep_last=-1", "checkpoint.keep_last=-1 is out of range: it must be >= 0"),
    ("optim.warmup_steps=-3", "optim.warmup_steps=-3 is out of range"),
    ("parallel.tp=0", "parallel.tp=0 is out of range: it must be -1 or >= 1"),
    ("optim.beta2=1.0", "optim.beta2=1.0 is out of range: it must be >= 0 and < 1"),
    ("trainer.eval_batches=0", "trainer.eval_batches=0 is out of range"),
    ("storage.max_retries=-1", "storage.max_retries=-1 is out of range"),
    ("optim.lr=nan", "optim.lr=nan is out of range"),
]


@pytest.mark.parametrize(("override", "expected"), RANGE_CASES)
def test_out_of_range_number_is_refused_when_the_config_is_composed(override: str, expected: str) -> None:
    with pytest.raises(LaunchError, match="^bad config: ") as err:
        load([override])
    assert expected in str(err.value)


def _run(tmp_path: Path, override: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "train.run", override, f"run.dir={tmp_path}/run"],
                          cwd=tmp_path, capture_output=True, text=True, env=base_env(), timeout=120)


def test_the_run_refuses_an_out_of_range_number_in_one_line_before_anything_is_created(tmp_path: Path) -> None:
    run = _run(tmp_path, "trainer.max_steps=-5")
    assert run.returncode == 2, run.stderr
    errors = [line for line in run.stderr.splitlines() if "ERROR" in line]
    assert len(errors) == 1 and "trainer.max_steps=-5 is out of range: it must be >= 1" in errors[0], run.stderr
    assert "Traceback" not in run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no run directory, no run.log


ENUM_CASES = ["parallel.data_parallel=zero", "trainer.on_nonfinite_loss=ignore", "storage.on_corrupt_shard=warn",
              "parallel.mixed_precision=fp16", "parallel.activation_checkpointing=some", "parallel.engine=megatron"]


@pytest.mark.parametrize("override", ENUM_CASES)
def test_a_mode_outside_its_enum_is_refused_naming_the_choices(override: str) -> None:
    key, _, value = override.partition("=")
    with pytest.raises(LaunchError) as err:
        load([override])
    assert f"Invalid value '{value}', expected one of" in str(err.value) and key in str(err.value)


def test_the_run_refuses_a_mode_outside_its_enum_with_hydras_message(tmp_path: Path) -> None:
    run = _run(tmp_path, "parallel.data_parallel=zero")
    assert run.returncode != 0
    assert "Invalid value 'zero', expected one of [ddp, fsdp]" in run.stderr, run.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == []
