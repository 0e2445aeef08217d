"""The capacity plan against reality: real collectives, real tensors, DeepSpeed's estimators.

Communication: every layout takes one optimizer step of two micro-batches (the first under
grad_sync(enabled=False), as the trainer accumulates) on gloo ranks, and a TorchDispatchMode
records each collective the engines issue: DDP's bucket all-reduce (its C++ reducer goes
through the c10d dispatcher ops), FSDP2's all-gather and reduce-scatter, and the DTensor
functional collectives of tensor parallel. The recorded bytes must equal the plan's exactly:
the tiny model's dimensions divide by every degree used, so FSDP2 pads nothing, and DDP's
single bucket holds exactly the gradients (CPU buckets are not padded). Gradient-norm
clipping and the logged loss are outside the counted window and outside the plan (a vector
of one fp32 norm per parameter group: < 200 bytes).

Memory: parameter, gradient and AdamW state bytes of every rank, summed over the local
tensors (to_local() of DTensors), after the step, must equal the plan's, exactly. (What FSDP's
accumulation without sync holds during the step, unsharded fp32 gradients, is measured in
docs/planning.md.)

Pipeline: the real PipelineEngine (pp=2 on 2 ranks; 1F1B, Interleaved1F1B, ZBVZeroBubble) sends
and receives exactly the plan's point-to-point bytes and calls in a step, its stages hold the
plan's parameters per rank, and the plan's stage forwards in flight equal torch's own schedule.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import subprocess
import sys
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from train import capacity as pm
from tests.distributed import REPO, base_env, spawn
from train.config import ModelConfig, OptimConfig, ParallelConfig, PlanConfig
from train.model import Transformer, num_params
from train.optim import build_optimizer
from train.parallelize import backward_context, cross_entropy, grad_sync, parallelize

# kv heads = heads so that tp=4 divides them; every dimension divides by 2 and 4.
MODEL = ModelConfig(n_kv_heads=4)
MICRO_BATCH, SEQ_LEN, ACCUM = 2, 32, 2
WORKLOAD = pm.Workload(MICRO_BATCH, SEQ_LEN, ACCUM, bf16=False, activation_checkpointing=False)

# name: (dp, tp, ParallelConfig fields, plan setting)
TWO_RANKS = {
    "ddp": (2, 1, dict(data_parallel="ddp"), pm.Setting("DDP", "ddp", 2)),
    "fsdp": (2, 1, dict(data_parallel="fsdp"), pm.Setting("FSDP2", "fsdp", 2)),
    "fsdp_unsharded_accumulation": (2, 1, dict(data_parallel="fsdp", fsdp_reduce_per_micro_batch=False),
                                    pm.Setting("FSDP2", "fsdp", 2, fsdp_reduce_per_micro_batch=False)),
    "tp": (1, 2, dict(data_parallel="fsdp", tp=2), pm.Setting("TP", "tp", 1, 2)),
}
FOUR_RANKS = {
    "ddp": (4, 1, dict(data_parallel="ddp"), pm.Setting("DDP", "ddp", 4)),
    "fsdp": (4, 1, dict(data_parallel="fsdp"), pm.Setting("FSDP2", "fsdp", 4)),
    "tp": (1, 4, dict(data_parallel="fsdp", tp=4), pm.Setting("TP", "tp", 1, 4)),
    "fsdp_tp": (2, 2, dict(data_parallel="fsdp", dp=2, tp=2), pm.Setting("FSDP x TP", "tp", 2, 2)),
}

# dispatcher op -> (collective, bytes it moves by the plan's convention)
_MEASURE = {
    "c10d.allreduce_": ("all_reduce", lambda a: sum(t.nbytes for t in a[0])),
    "c10d._allgather_base_": ("all_gather", lambda a: a[0].nbytes),  # (output, input, ...)
    "c10d._reduce_scatter_base_": ("reduce_scatter", lambda a: a[1].nbytes),  # (output, input, ...)
    "_c10d_functional.all_reduce": ("all_reduce", lambda a: a[0].nbytes),
    "_c10d_functional.all_gather_into_tensor": ("all_gather", lambda a: a[0].nbytes * a[1]),
    "_c10d_functional.reduce_scatter_tensor": ("reduce_scatter", lambda a: a[0].nbytes),
}
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


class CollectiveCounter(TorchDispatchMode):
    """Bytes and calls of every collective dispatched while active."""

    def __init__(self):
        super().__init__()
        self.bytes: Counter = Counter()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor dispatch, so its own collectives pass through here
        name = str(func.overloadpacket)
        if ("c10d" in name) and not name.endswith(_NOT_COLLECTIVES):
            if name not in _MEASURE:
                raise AssertionError(f"collective {name} is not known to the test")
            kind, size = _MEASURE[name]
            self.bytes[kind] += size(args)
            self.calls[kind] += 1
        return func(*args, **(kwargs or {}))


def _local_bytes(tensors) -> int:
    return sum((t.to_local() if isinstance(t, DTensor) else t).nbytes for t in tensors)


def _layout_step(rank: int, world_size: int, dp: int, tp: int, parallel: dict) -> dict:
    """One optimizer step as the native engine takes it (its loss, backward and accumulation)."""
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    torch.manual_seed(0)
    config = ParallelConfig(**parallel)
    model = parallelize(Transformer(MODEL), mesh, config, torch.device("cpu"))
    optimizer = build_optimizer(model, OptimConfig())
    tokens = torch.randint(0, MODEL.vocab_size, (ACCUM, MICRO_BATCH, SEQ_LEN + 1),
                           generator=torch.Generator().manual_seed(mesh["dp"].get_local_rank()))
    counter = CollectiveCounter()
    with counter:
        for i in range(ACCUM):
            with grad_sync(model, enabled=i == ACCUM - 1, fsdp_reduce_per_micro_batch=config.fsdp_reduce_per_micro_batch):
                loss = cross_entropy(model(tokens[i, :, :-1]), tokens[i, :, 1:]) / ACCUM
                with backward_context():
                    loss.backward()
    optimizer.step()
    params = list({id(p): p for p in model.parameters()}.values())
    moments = [state[key] for state in optimizer.state.values() for key in ("exp_avg", "exp_avg_sq")]
    return {
        "bytes": dict(counter.bytes), "calls": dict(counter.calls),
        "params": _local_bytes(params), "grads": _local_bytes(p.grad for p in params),
        "optimizer": _local_bytes(moments),
    }


def _layouts(rank: int, world_size: int, layouts: dict) -> dict:
    return {name: _layout_step(rank, world_size, dp, tp, par) for name, (dp, tp, par, _) in layouts.items()}


@pytest.fixture(scope="module")
def measured() -> dict:
    """{world size: {layout: [per-rank results]}}: one set of processes per world size."""
    out = {}
    for world, layouts in ((2, TWO_RANKS), (4, FOUR_RANKS)):
        per_rank = spawn(_layouts, world, layouts)
        out[world] = {name: [r[name] for r in per_rank] for name in layouts}
    return out


CASES = [(2, name) for name in TWO_RANKS] + [(4, name) for name in FOUR_RANKS]


def _setting(world: int, name: str) -> pm.Setting:
    return (TWO_RANKS if world == 2 else FOUR_RANKS)[name][3]


@pytest.mark.parametrize("world, name", CASES)
def test_bytes_per_collective_equal_the_plan(measured: dict, world: int, name: str) -> None:
    predicted, calls = Counter(), Counter()
    for coll in pm.collectives(MODEL, _setting(world, name), WORKLOAD):
        predicted[coll.kind] += coll.payload_bytes
        calls[coll.kind] += coll.calls
    for rank_result in measured[world][name]:
        assert rank_result["bytes"] == dict(predicted), name
        assert rank_result["calls"] == dict(calls), name


@pytest.mark.parametrize("world, name", CASES)
def test_sharded_state_bytes_per_rank_equal_the_plan(measured: dict, world: int, name: str) -> None:
    mem = pm.memory(MODEL, _setting(world, name), WORKLOAD, PlanConfig())
    # after the step only the sharded gradients remain; the plan adds the unsharded ones of
    # accumulation without sync, alive during the step (docs/planning.md)
    grads = mem.grads - (pm.FP32 * pm.total_params(MODEL) if name == "fsdp_unsharded_accumulation" else 0)
    for rank_result in measured[world][name]:
        assert (rank_result["params"], rank_result["grads"], rank_result["optimizer"]) == \
            (mem.params, grads, mem.optimizer), name


def _preset(name: str) -> ModelConfig:
    import yaml

    return ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text()))


@pytest.mark.parametrize("name", ["tiny", "llama_124m", "llama_1b", "llama_8b", "llama_70b"])
def test_plan_counts_the_parameters_the_model_has(name: str) -> None:
    cfg = _preset(name)
    assert pm.total_params(cfg) == num_params(cfg)



# ---- pipeline parallel -----------------------------------------------------------------------

PIPE_MICRO_BATCHES = 4
PIPELINES = {  # name: (ParallelConfig overrides, plan setting); the tiny model untied, on 2 ranks
    "1F1B": (["parallel.pp=2"], pm.Setting("PP2", "ddp", 1, pp=2)),
    "Interleaved1F1B": (["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B", "parallel.pp_stages_per_rank=2"],
                        pm.Setting("PP2", "ddp", 1, pp=2, pp_schedule="Interleaved1F1B", pp_stages_per_rank=2)),
    "ZBVZeroBubble": (["parallel.pp=2", "parallel.pp_schedule=ZBVZeroBubble", "parallel.pp_stages_per_rank=2"],
                      pm.Setting("PP2", "ddp", 1, pp=2, pp_schedule="ZBVZeroBubble", pp_stages_per_rank=2)),
}
_POINT_TO_POINT = ("c10d.send", "c10d.recv_")


class PointToPointCounter(TorchDispatchMode):
    """Bytes and calls of every send and receive dispatched while active (torch's pipeline stages
    post them as isend / irecv, alone or in batch_isend_irecv: each reaches c10d.send / c10d.recv_)."""

    def __init__(self):
        super().__init__()
        self.bytes: Counter = Counter()
        self.calls: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name in _POINT_TO_POINT:
            self.bytes[name] += sum(t.nbytes for t in args[0])
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def _pipeline_steps(rank: int, world_size: int) -> dict:
    """Per schedule: the sends and receives of the second step of the real PipelineEngine (the first
    also carries torch's shape inference: metadata once per stage, not per step)."""
    from launch.compose import load
    from train import pipeline

    out = {}
    for name, (overrides, _) in PIPELINES.items():
        _, cfg = load(["+cluster=2xCPU", "model.tie_embeddings=false", f"data.seq_len={SEQ_LEN}",
                       f"trainer.micro_batch_size={MICRO_BATCH}", *overrides])
        mesh = init_device_mesh("cpu", (2, 1, 1), mesh_dim_names=("pp", "dp", "tp"))
        torch.manual_seed(0)
        parts = pipeline.parts(Transformer(cfg.model), cfg.parallel, mesh["pp"].get_local_rank())
        engine = pipeline.PipelineEngine(parts, cfg, mesh, torch.device("cpu"), PIPE_MICRO_BATCHES)
        tokens = torch.randint(0, cfg.model.vocab_size, (PIPE_MICRO_BATCHES * MICRO_BATCH, SEQ_LEN + 1),
                               generator=torch.Generator().manual_seed(0))
        engine.train_step(tokens[:, :-1], tokens[:, 1:], None)
        counter = PointToPointCounter()
        with counter:
            engine.train_step(tokens[:, :-1], tokens[:, 1:], None)
        out[name] = {"bytes": dict(counter.bytes), "calls": dict(counter.calls),
                     "in_flight": _peak_in_flight(getattr(engine.schedule, "pipeline_order", None))}
    return out


def _peak_in_flight(order: dict | None) -> list[int] | None:
    """Per pipeline rank, the most stage forwards run and not yet backward (input gradient) in
    torch's own order of a multi-stage schedule; None for 1F1B and GPipe, which have no order."""
    from torch.distributed.pipelining.schedules import _ComputationType as Op

    if order is None:
        return None
    peaks = []
    for rank in sorted(order):
        held = peak = 0
        for action in filter(None, order[rank]):
            kind = action.computation_type
            held += 1 if kind == Op.FORWARD else -1 if kind in (Op.FULL_BACKWARD, Op.BACKWARD_INPUT) else 0
            peak = max(peak, held)
        peaks.append(peak)
    return peaks


@pytest.fixture(scope="module")
def pipeline_measured() -> list[dict]:
    return spawn(_pipeline_steps, 2)


@pytest.mark.parametrize("name", list(PIPELINES))
def test_pipeline_point_to_point_bytes_and_calls_equal_the_plan(pipeline_measured: list[dict], name: str) -> None:
    model = replace(MODEL, tie_embeddings=False)
    workload = replace(WORKLOAD, accum_steps=PIPE_MICRO_BATCHES)
    [p2p] = [c for c in pm.collectives(model, PIPELINES[name][1], workload) if c.kind == "send_recv"]
    sent = [rank[name]["bytes"]["c10d.send"] for rank in pipeline_measured]
    sends = [rank[name]["calls"]["c10d.send"] for rank in pipeline_measured]
    assert (sum(sent), sum(sends)) == (p2p.payload_bytes, p2p.calls)
    assert max(sent) == p2p.per_gpu_bytes
    # every send has its receive, of the same bytes
    assert sum(rank[name]["bytes"]["c10d.recv_"] for rank in pipeline_measured) == sum(sent)
    assert sum(rank[name]["calls"]["c10d.recv_"] for rank in pipeline_measured) == sum(sends)


@pytest.mark.parametrize("name", ["Interleaved1F1B", "ZBVZeroBubble"])
def test_stage_forwards_in_flight_equal_torchs_schedule(pipeline_measured: list[dict], name: str) -> None:
    """The activations a rank holds at its peak: the plan's count of stage forwards in flight
    equals the one in torch's own order of the schedule (the same on every rank)."""
    setting = PIPELINES[name][1]
    assert pipeline_measured[0][name]["in_flight"] == [pm.in_flight(setting, PIPE_MICRO_BATCHES, r) for r in range(2)]


PIPELINE_SPLITS = [  # (model, ParallelConfig fields)
    ("tiny", {"pp": 2}),
    ("tiny", {"pp": 2, "pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2}),
    ("tiny", {"pp": 2, "pp_split": [3]}),
    ("llama_70b", {"pp": 4}),
    ("llama_70b", {"pp": 4, "pp_schedule": "Interleaved1F1B", "pp_stages_per_rank": 2}),
    ("llama_70b", {"pp": 2, "pp_schedule": "ZBVZeroBubble", "pp_stages_per_rank": 2}),
]


@pytest.mark.parametrize("model, fields", PIPELINE_SPLITS,
                         ids=[f"{m}-" + "-".join(map(str, f.values())) for m, f in PIPELINE_SPLITS])
def test_stage_parameters_equal_the_stages_the_pipeline_cuts(model: str, fields: dict) -> None:
    """Each pipeline rank's planned parameters (and so its weights, gradients and AdamW state)
    equal those of the modules `train.pipeline` cuts for it, and the plan's memory is the fullest
    rank's."""
    from train import pipeline
    from train.config import PipelineSchedule

    cfg = replace(_preset(model), tie_embeddings=False)
    parallel = ParallelConfig(**{**fields, "pp_schedule": PipelineSchedule[fields.get("pp_schedule", "1F1B")]})
    setting = pm.Setting("PP", "ddp", 1, pp=parallel.pp, pp_schedule=str(parallel.pp_schedule),
                         pp_stages_per_rank=parallel.pp_stages_per_rank, pp_split=tuple(parallel.pp_split))
    with torch.device("meta"):
        whole = Transformer(cfg)
    planned = pm.rank_parts(cfg, setting, micro_batches=2 * parallel.pp)
    real = [sum(p.numel() for part in pipeline.parts(whole, parallel, r) for p in part.parameters())
            for r in range(parallel.pp)]
    assert [pm.local_params(cfg, setting, part) for part in planned] == real
    assert sum(real) == num_params(cfg)
    workload = replace(WORKLOAD, accum_steps=2 * parallel.pp)
    mem = pm.memory(cfg, setting, workload, PlanConfig())
    assert mem.params == pm.FP32 * real[mem.pp_rank]
    assert mem.total == max(pm._rank_memory(cfg, setting, workload, PlanConfig(), 1, part).total for part in planned)

# ---- DeepSpeed's own estimators --------------------------------------------------------------

def _deepspeed():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if os.environ.get("CI"):  # CI installs the test extra: a missing deepspeed is a failure there
        import deepspeed.runtime.zero.stage3 as stage3
        return stage3
    return pytest.importorskip("deepspeed.runtime.zero.stage3", reason="deepspeed is in the test extra")


def _zero(stage: int, nodes: int, gpus: int, offload: bool = False) -> pm.Setting:
    return pm.Setting("ZeRO", "zero", nodes * gpus, zero_stage=stage, offload_optimizer=offload,
                      offload_params=offload and stage == 3)


BF16 = pm.Workload(1, 2048, 1, bf16=True, activation_checkpointing=True)


@pytest.mark.parametrize("name", ["llama_1b", "llama_8b", "llama_70b"])
@pytest.mark.parametrize("nodes, gpus", [(1, 8), (4, 8)])
def test_zero_model_states_agree_with_deepspeed_estimators(name: str, nodes: int, gpus: int) -> None:
    stage3 = _deepspeed()
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

    cfg = _preset(name)
    P, L = pm.total_params(cfg), pm.largest_layer_params(cfg)
    plan = lambda s: pm.memory(cfg, s, BF16, PlanConfig(), nodes)  # noqa: E731
    # DeepSpeed truncates 18P/n to an int; the plan rounds each sharded term up: <= 3 bytes apart.
    for offload in (False, True):
        _, ds_gpu = estimate_zero2_model_states_mem_needs(P, gpus, nodes, cpu_offload=offload)
        mem = plan(_zero(2, nodes, gpus, offload))
        assert abs(mem.model_states + mem.working - ds_gpu) <= 3
        _, ds_gpu, largest = stage3.estimate_zero3_model_states_mem_needs(
            P, L, gpus, nodes, cpu_offload=offload, cpu_offload_params=offload)
        mem = plan(_zero(3, nodes, gpus, offload))
        assert abs(mem.model_states + mem.working - ds_gpu) <= 3
        assert mem.working == largest


def test_deepspeed_all_live_estimators_print_the_plans_figures() -> None:
    """The `_all_live` entry points, on a real model: same parameter counts, same per-GPU GiB
    (ZeRO-3: the zero_init=1 row, as the harness builds ZeRO-3 models under zero.Init)."""
    stage3 = _deepspeed()
    from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_live

    cfg = ModelConfig(vocab_size=32000, dim=512, n_layers=8, n_heads=8, n_kv_heads=4, tie_embeddings=False)
    model = Transformer(cfg)
    assert stage3.model_to_params(model) == (pm.total_params(cfg), pm.largest_layer_params(cfg))
    for fn, stage, options in ((estimate_zero2_model_states_mem_needs_all_live, 2, "offload_optimizer=none"),
                               (stage3.estimate_zero3_model_states_mem_needs_all_live, 3,
                                "offload_param=none, offload_optimizer=none, zero_init=1")):
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            fn(model, num_gpus_per_node=2, num_nodes=1)
        row = next(line for line in printed.getvalue().splitlines() if line.strip().endswith(options))
        ds_gib = float(re.findall(r"([\d.]+)GB", row)[1])
        mem = pm.memory(cfg, _zero(stage, 1, 2), BF16, PlanConfig())
        assert round((mem.model_states + mem.working) / 2**30, 2) == ds_gib


# ---- the command and the run -----------------------------------------------------------------

def _plan(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "launch.plan", *args], cwd=REPO, env=base_env(),
                          capture_output=True, text=True, timeout=120)


LONG = ["data.seq_len=8192", "trainer.global_batch_tokens=262144", "trainer.micro_batch_size=1"]


def test_plan_command_says_a_fitting_layout_fits_and_compares_every_setting() -> None:
    run = _plan("+cluster=8xA100", "model=llama_8b", "parallel=fsdp_tp", *LONG, "--compare")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verdict: fits" in run.stdout
    for row in ("DDP", "FSDP2", "TP", "FSDP x TP2", "ZeRO-1", "ZeRO-2", "ZeRO-3", "ZeRO-2 + offload optimizer"):
        assert f"\n{row}" in run.stdout
    for what in ("all_gather", "reduce_scatter", "all_reduce", "NVLink3", "tokens/s", "MFU"):
        assert what in run.stdout


def test_plan_command_names_the_cheapest_fix_and_exits_1() -> None:
    run = _plan("+cluster=8xA100", "model=llama_8b", "parallel=ddp", *LONG)
    assert run.returncode == 1, run.stdout + run.stderr
    assert "verdict: does not fit" in run.stdout
    cheapest = next(line for line in run.stdout.splitlines() if "cheapest that fits:" in line)
    assert "parallel.data_parallel=fsdp" in cheapest and "GiB/GPU" in cheapest


PP70B = ["+cluster=4x8xA100", "model=llama_70b", "parallel=fsdp_tp", "parallel.tp=8", "data.seq_len=4096",
         "trainer.global_batch_tokens=262144", "trainer.micro_batch_size=1"]


def test_plan_command_compares_pipelines_across_nodes_with_their_bubble_and_sends() -> None:
    run = _plan(*PP70B, "parallel.pp=4", "parallel.activation_checkpointing=full", "--compare")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "setting: PP4 x TP, pp 4 x dp 1 x tp 8 (1F1B" in run.stdout
    # 64 micro-batches of 4096 tokens: bubble 3 / 67; 3 boundaries x 2 x 64 sends of 4096 x 8192 fp32
    assert "pipeline bubble: 4.5% of the step idle" in run.stdout
    sends = next(line for line in run.stdout.splitlines() if line.strip().startswith("send_recv"))
    assert sends.split()[:4] == ["send_recv", "pp", "384", "48.00"]
    rows = {line.split()[0] + line.split()[1]: line for line in run.stdout.splitlines()
            if line.startswith(("PP2 x TP8 x FSDP2", "PP4 x TP", "TP (FSDP over nodes)"))}
    assert len(rows) == 3, run.stdout


def test_plan_refuses_a_pipeline_whose_first_rank_does_not_fit() -> None:
    """1F1B's first rank holds pp micro-batches' activations of its layers: as many as the whole
    model's without checkpointing; the start-up check names the rank and a fix."""
    from launch.compose import load
    from train.checks import startup_checks
    from train.distributed import LayoutError

    _, cfg = load([*PP70B, "parallel.pp=4"])
    with pytest.raises(LayoutError, match=r"pp 4 x dp 1 x tp 8\) on cluster 4x8xA100 needs [0-9.]+ GiB per GPU on "
                                        r"pipeline rank 0 .* cheapest fix: parallel.activation_checkpointing="):
        startup_checks(cfg, cfg.cluster)


def test_plan_command_on_a_cpu_layout_says_memory_is_unknown() -> None:
    run = _plan("+cluster=2xCPU")
    assert run.returncode == 0, run.stdout + run.stderr
    assert "verdict: unknown" in run.stdout


def test_run_refuses_a_layout_that_does_not_fit_before_allocating(tmp_path: Path) -> None:
    args = [sys.executable, "-m", "train.run", "+cluster=1xH100", "model=llama_8b",
            "data.seq_len=2048", "trainer.micro_batch_size=8", f"run.dir={tmp_path}/r"]
    run = subprocess.run(args, cwd=tmp_path, env=base_env(), capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    assert "needs" in run.stderr and "GiB per GPU" in run.stderr and "plan.enforce_memory=false" in run.stderr
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "r").exists()
    # the override skips the check: the next one (no GPU here) is what stops it
    run = subprocess.run([*args, "plan.enforce_memory=false"], cwd=tmp_path, env=base_env(),
                         capture_output=True, text=True, timeout=120)
    assert "GiB per GPU" not in run.stderr and "visible GPU" in run.stderr
