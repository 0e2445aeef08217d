"""Pipeline parallel (parallel.pp > 1) trains the same model as one process: the same losses,
gradient norms and held-out loss step by step, under 1F1B and the interleaved schedule, with FSDP
over dp and with tensor parallel; its checkpoints resume without the pipeline; and what it cannot
run is refused at start-up in one line.

Every run is the real `train.run` (the builtin corpus, the tiny model untied, 6 AdamW steps with
4 micro-batches each and clipping on: the gradient norms are 3 to 7, the clip norm 1). The runs
start together: each spends most of its time starting up, which overlaps.

Tolerance: the loss, gradient norm and held-out loss within rel 2e-4 of one process. The pipeline
changes only the order of floating-point sums (the gradient divided by the micro-batches after
accumulating instead of each loss before; FSDP and TP reductions), about 1e-6 here. A wrong
gradient scale shows in the gradient norm only (clipping and AdamW take the update's scale away:
gradients not divided by the 4 micro-batches leave the losses as they are and the norm 4 times
larger); a stage missing from the norm changes the norm, a stage's update lost or a micro-batch
seen twice the losses, by 1e-2 or more within the 6 steps.
"""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from launch.compose import load
from tests.conftest import FAST
from tests.distributed import Run, finish, start
from tests.test_faults import _last_step, _wait, _workers
from tests.test_hot_path import QUIET, STEPS
from tests.test_hot_path import _reads as count_reads
from train import stages
from train.checks import startup_checks
from train.config import ModelConfig, ParallelConfig
from train.distributed import RESTART_STORE_FIX, LayoutError

REL = 2e-4
# 1024 tokens per step = 16 samples of 64 tokens: 4 micro-batches of 4 on one data-parallel rank,
# or of 2 on each of two; a checkpoint after step 3 (and at the end), held-out loss at the end.
PIPE = [*FAST, "trainer.global_batch_tokens=1024", "model.tie_embeddings=false", "checkpoint.interval=3"]
PP2 = ["parallel.pp=2"]
LAYOUTS = {  # name: (processes, overrides)
    "1F1B": (2, PP2),
    "Interleaved1F1B": (2, [*PP2, "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=2"]),
    "pp2 x fsdp2": (4, [*PP2, "parallel=fsdp", "trainer.micro_batch_size=2"]),
    "pp2 x tp2": (4, [*PP2, "parallel=fsdp_tp", "parallel.sequence_parallel=true"]),
}


def _ok(run: Run) -> Run:
    assert run.returncode == 0, run.output[-4000:]
    return run


def _kill_mid_step(proc: subprocess.Popen, run_dir: Path) -> int:
    """Once step 3's checkpoint is committed, freeze the last stage (SIGSTOP: the job cannot finish
    the step it is in) and SIGKILL it frozen, so the kill always falls inside a step; returns the
    last step the job had logged."""
    try:
        workers = _wait("both stages", lambda: (w := _workers(proc.pid)) and len(w) == 2 and w, proc)
        _wait("step 3's checkpoint", lambda: (run_dir / "checkpoints" / "step-00000003" / "COMMITTED").exists(), proc)
        os.kill(workers[1], signal.SIGSTOP)
        frozen_after = _last_step(run_dir)
        os.kill(workers[1], signal.SIGKILL)
    except BaseException:
        proc.kill()
        raise
    return frozen_after


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path) -> dict:
    """The one-process reference, every layout of LAYOUTS, and one process resuming the 1F1B run's
    checkpoint of step 3 (written by 2 pipeline stages); meanwhile, a 1F1B run counting its device
    reads per step (`reads`), and a 1F1B run killed mid-step under torchrun (`killed`: the run and
    the last step it had logged when killed)."""
    cwd = tmp_path_factory.mktemp("pipeline")
    killed = start([*PIPE, *PP2, f"run.dir={cwd}/killed"], cwd=cwd, nproc=2, cache_dir=harness_cache,
                   torchrun_args=["--max-restarts=1"], env={RESTART_STORE_FIX: "1"})
    started = {"reference": start([*PIPE, f"run.dir={cwd}/reference"], cwd=cwd, cache_dir=harness_cache)}
    for name, (nproc, overrides) in LAYOUTS.items():
        started[name] = start([*PIPE, *overrides, f"run.dir={cwd}/{name.replace(' ', '')}"], cwd=cwd, nproc=nproc,
                              cache_dir=harness_cache)
    frozen_after = _kill_mid_step(killed, cwd / "killed")
    counted = cwd / "counted"
    counted.mkdir()
    quiet = [*QUIET, "trainer.global_batch_tokens=1024", "model.tie_embeddings=false", *PP2]
    first, last, _ = count_reads(counted, quiet, harness_cache, 2)
    done: dict = {"reads": (first, last), "1F1B": _ok(finish(started.pop("1F1B"))),
                  "killed": (_ok(finish(killed)), frozen_after)}
    step3 = done["1F1B"].run_dir / "checkpoints" / "step-00000003"
    started["resumed"] = start([*PIPE, f"checkpoint.resume={step3}", f"run.dir={cwd}/resumed"], cwd=cwd,
                               cache_dir=harness_cache)
    return done | {name: _ok(finish(proc)) for name, proc in started.items()}


def test_pipeline_steps_do_not_wait_on_the_host(runs: dict) -> None:
    """No device read on a step that neither logs, evaluates nor saves, on the first stage nor on the
    last (which computes the loss): the step's loss reaches every stage by an all-reduce."""
    for reads in runs["reads"]:
        quiet = {step: reads.get(step, []) for step in range(2, STEPS)}
        assert all(not where for where in quiet.values()), quiet
        assert reads.get(1) and reads.get(STEPS)  # the first step (the schedule's set-up, a log row) reads: counted


def _rows(run: Run) -> dict[int, dict]:
    return {row["step"]: row for row in run.metrics if "loss" in row}


def _assert_same_steps(run: Run, reference: Run, steps: range) -> None:
    ours, theirs = _rows(run), _rows(reference)
    assert sorted(ours) == list(steps), sorted(ours)
    for step in steps:
        for key in ("loss", "grad_norm"):
            assert ours[step][key] == pytest.approx(theirs[step][key], rel=REL), (step, key, ours[step], theirs[step])
    last = steps[-1]  # the held-out loss at the end, forward only through the stages
    assert ours[last]["val_loss"] == pytest.approx(theirs[last]["val_loss"], rel=REL)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_pipeline_trains_the_steps_of_one_process(runs: dict[str, Run], layout: str) -> None:
    """Losses, gradient norms (clipping: the norm over every stage) and the held-out loss of 6 steps."""
    _assert_same_steps(runs[layout], runs["reference"], range(1, 7))
    rows = _rows(runs["reference"])
    assert all(rows[s]["grad_norm"] > 1.0 for s in rows)  # above optim.grad_clip_norm: clipping is exercised


def test_stages_hold_their_layers_and_the_schedule_its_micro_batches(runs: dict[str, Run]) -> None:
    assert ("pipeline stage 0: layers 0-1 (pp rank 0), stage 1: layers 2-3 (pp rank 1)"
            in runs["1F1B"].output)
    assert ("stage 0: layers 0-0 (pp rank 0), stage 1: layers 1-1 (pp rank 1), stage 2: layers 2-2 (pp rank 0), "
            "stage 3: layers 3-3 (pp rank 1)" in runs["Interleaved1F1B"].output)
    line = "world 2 = pp 2 x dp 1 x tp 1 | native engine, ddp | global batch 1024 tokens, accum 4"
    assert line in runs["1F1B"].output
    assert "world 4 = pp 2 x dp 2 x tp 1" in runs["pp2 x fsdp2"].output
    assert "world 4 = pp 2 x dp 1 x tp 2" in runs["pp2 x tp2"].output


def test_pipeline_checkpoint_resumes_without_the_pipeline(runs: dict[str, Run]) -> None:
    """The 1F1B run's step-3 checkpoint (each stage wrote its own layers and optimizer state, under
    the whole model's names) loads into one process, which continues with the reference's steps 4
    to 6: weights, AdamW moments, step and data position all came back."""
    resumed = runs["resumed"]
    assert "resumed from" in resumed.output and "step 3" in resumed.output
    _assert_same_steps(resumed, runs["reference"], range(4, 7))


def test_a_pipeline_killed_mid_step_restarts_and_trains_the_steps_of_one_never_killed(runs: dict) -> None:
    """The 1F1B job under `torchrun --max-restarts=1` lost its last stage to SIGKILL in the middle
    of a step after the step-3 checkpoint (`_kill_mid_step`): torchrun restarted both stages, they
    resumed from step 3, and every step's loss, the ones trained twice included, is the
    never-killed 1F1B run's, bit for bit (the same layout: the same sums in the same order)."""
    job, frozen_after = runs["killed"]
    assert 3 <= frozen_after < 6, f"the job had logged step {frozen_after} when its last stage was frozen"
    assert f"resumed from {job.run_dir}/checkpoints/step-00000003" in job.output
    steps = [row["step"] for row in job.metrics if "loss" in row]
    assert steps == [*range(1, frozen_after + 1), 4, 5, 6], steps  # from step 4 on, trained twice
    reference = _rows(runs["1F1B"])
    for row in job.metrics:
        assert row["loss"] == reference[row["step"]]["loss"], (row, reference[row["step"]])


# -- refused at start-up, before any process group --------------------------------------------------
def _checks(*overrides: str) -> None:
    _, cfg = load(["+cluster=4xCPU", "model.tie_embeddings=false", *overrides])
    startup_checks(cfg, cfg.cluster)


REFUSALS = {  # what: (overrides on 4 CPU ranks, the message)
    "pp not dividing the world": (["parallel.pp=3"], (r"parallel.pp=3 x parallel.tp=1 = 3 does not divide the world "
                                                     r"size 4 \(cluster 4xCPU\)")),
    "more stages than layers": (
        ["parallel.pp=4", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=2",
         "trainer.global_batch_tokens=16384"],
        (r"parallel.pp=4 x parallel.pp_stages_per_rank=2 = 8 stages, but model tiny has 4 layers \(model.n_layers\): "
        r"every stage needs at least one")),
    "too few micro-batches": (
        ["parallel.pp=4", "trainer.global_batch_tokens=3072", "trainer.micro_batch_size=4", "data.seq_len=256"],
        (r"parallel.pp=4 needs at least 4 micro-batches per step, one per pipeline rank, but the step has 3 .*: set "
        r"trainer.global_batch_tokens=4096")),
    "interleaved rounds": (
        ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=2",
         "trainer.global_batch_tokens=2560", "data.seq_len=256", "trainer.micro_batch_size=1"],
        (r"Interleaved1F1B runs micro-batches in rounds of about pp=2: 5 micro-batches per step .* is not a multiple "
        r"of its 2 rounds")),
    "deepspeed": (["parallel=zero2", "parallel.pp=2"],
                  r"parallel.pp=2 needs the native engine: DeepSpeed's pipeline engine is another model API"),
    "split not increasing": (
        ["parallel.pp=2", "parallel.pp_split=[3,1]"],
        (r"parallel.pp_split=\[3, 1\]: expected the first layer of each of the 1 stages after the first, increasing, "
        r"between 1 and 3 \(model tiny has 4 layers\), e.g. \[2\]")),
    "split out of range": (["parallel.pp=2", "parallel.pp_split=[4]"],
                           r"parallel.pp_split=\[4\]: expected .* between 1 and 3"),
    "tied embeddings": (["parallel.pp=2", "model.tie_embeddings=true"], r"ties its output projection to the embedding"),
    "V schedule with data parallel": (
        ["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "parallel.pp_stages_per_rank=2"],
        r"ZBVZeroBubble splits each backward .* wrong with data or tensor parallel \(dp=2, tp=1\)"),
    "V schedule with one stage per rank": (["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble"],
                                           r"parallel.pp_schedule=ZBVZeroBubble runs exactly 2 stages per rank"),
}


@pytest.mark.parametrize("what", REFUSALS)
def test_what_a_pipeline_cannot_run_is_refused_in_one_line(what: str) -> None:
    overrides, message = REFUSALS[what]
    with pytest.raises(LayoutError, match=message) as refused:
        _checks(*overrides)
    assert "\n" not in str(refused.value)


def test_a_pipeline_that_fits_passes_and_its_bubble_is_warned_with_the_fix(caplog: pytest.LogCaptureFixture) -> None:
    _checks("parallel.pp=2", "trainer.global_batch_tokens=32768")  # 4 micro-batches of 16 x 256 over dp 2: 20%
    assert "bubble" not in caplog.text
    _checks("parallel.pp=4")  # global_batch_tokens=0: one micro-batch per pipeline rank, (4-1)/(4+4-1) = 43%
    assert ("parallel.pp=4: pipeline bubble 43% of each step with 4 micro-batches per step (1F1B idles "
            "(p-1)/(m+p-1) of it); for m >= 12 (bubble <= 25%) raise the global batch: "
            "trainer.global_batch_tokens=49152") in caplog.text


def test_the_documented_70b_layout_passes_the_start_up_checks() -> None:
    layout = ["+cluster=4x8xA100", "model=llama_70b", "parallel=fsdp_tp", "parallel.tp=8", "parallel.pp=4"]
    _, cfg = load([*layout, "parallel.activation_checkpointing=full"])
    startup = startup_checks(cfg, cfg.cluster)
    assert (startup.degrees.pp, startup.degrees.dp, startup.degrees.tp, startup.accum_steps) == (4, 1, 8, 4)
    # without checkpointing the first stage's 4 micro-batches of activations do not fit in 80 GB
    _, cfg = load(layout)
    with pytest.raises(LayoutError, match=r"needs 96.7 GiB per GPU on pipeline rank 0 .* cheapest fix"):
        startup_checks(cfg, cfg.cluster)


def test_stages_are_balanced_by_parameters_and_placed_as_torch_places_them() -> None:
    import yaml

    from launch.compose import CONFIG_DIR

    llama_70b = ModelConfig(**yaml.safe_load((CONFIG_DIR / "model" / "llama_70b.yaml").read_text()))
    # the embedding (1.05B) and the output projection (1.05B) weigh about a block (0.86B) and a quarter
    split = stages.stage_layers(llama_70b, ParallelConfig(pp=4))
    assert [len(layers) for layers in split] == [19, 21, 21, 19]
    assert stages.stage_layers(llama_70b, ParallelConfig(pp=2, pp_split=[30])) == [range(30), range(30, 80)]
    loop = ParallelConfig(pp=4, pp_stages_per_rank=2, pp_schedule="Interleaved1F1B")
    v_shape = ParallelConfig(pp=4, pp_stages_per_rank=2, pp_schedule="ZBVZeroBubble")
    assert stages.stage_ranks(loop) == [0, 1, 2, 3, 0, 1, 2, 3]
    assert stages.stage_ranks(v_shape) == [0, 1, 2, 3, 3, 2, 1, 0]
    assert stages.bubble_fraction(ParallelConfig(pp=4), 12) == pytest.approx(3 / 15)
    assert stages.bubble_fraction(loop, 8) == pytest.approx(3 / 19)


def test_a_checkpoint_from_before_pipelines_resumes_without_one_and_is_refused_with_one(tmp_path: Path) -> None:
    """Checkpoints written before this change keep the optimizer state per parameter group. One
    module holding the whole model reads them as they are (weights and Adam moments restored);
    pipeline stages cannot take their share of them, which is refused in one line that says how
    to convert."""
    import torch

    from storage.checkpoint import Checkpointer, CheckpointError
    from train.engine import ModelAndOptimizer
    from train.model import Transformer

    def model_and_optimizer(seed: int) -> tuple[Transformer, torch.optim.Optimizer]:
        torch.manual_seed(seed)
        model = Transformer(ModelConfig(dim=32, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=64))
        model.init_weights()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2)

    model, optimizer = model_and_optimizer(0)
    model(torch.randint(0, 64, (2, 8))).sum().backward()
    optimizer.step()
    old = ModelAndOptimizer(model, optimizer)
    old.flatten = False  # the format every native checkpoint had before pipeline parallel
    ckpt = Checkpointer(str(tmp_path), keep_last=0, rank=0, world_size=1)
    ckpt.save(1, {"app": old}, {"model": "x"})

    fresh, fresh_optimizer = model_and_optimizer(1)
    ckpt.load(ckpt.latest(), {"app": ModelAndOptimizer(fresh, fresh_optimizer)}, {"model": "x"})
    for (name, p), q in zip(model.named_parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q), name
        assert torch.equal(optimizer.state[p]["exp_avg"], fresh_optimizer.state[q]["exp_avg"]), name

    halves = [model_and_optimizer(2), model_and_optimizer(3)]  # stand-ins for two stages of one rank
    with pytest.raises(CheckpointError, match=r"written before pipeline parallel .* resume it once with "
                                              r"parallel.pp=1 and save"):
        ckpt.load(ckpt.latest(), {"app": ModelAndOptimizer([m for m, _ in halves], [o for _, o in halves])},
                  {"model": "x"})
