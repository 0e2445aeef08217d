"""DeepSpeed ZeRO as the second engine: same config, same loop, same storage, same numbers.

Every run is the real entry point on 2 gloo ranks (torchrun, and once the `deepspeed`
launcher) with the same seed and global batch as the native DDP reference; only
`parallel=` changes. Six steps with gradient accumulation 4 (32 sequences per step, 4 per
micro-batch, 2 ranks) and clipping active (the gradient norm is above 1 throughout).

Tolerance against DDP: relative 2e-4 on the loss, as in test_engines. Both engines run fp32
on the CPU with torch's AdamW and the harness's schedule; ZeRO reduces the gradients in
flat buckets (stage 2 and 3 by reduce-scatter) and sums the gradient norm over partitions,
so only the order of fp32 sums differs (about 1e-7 relative per reduction, carried through
6 AdamW steps; observed: 2e-7). A real difference (loss scaled twice by the accumulation,
a micro-batch lost, clipping or weight decay on other tensors, the schedule not applied)
moves the loss in the second or third digit from step 2 on.

Resume is compared with an uninterrupted run of the same engine and stage: bitwise, since
the same ranks do the same reductions on the same data from the same restored state.
ZeRO-1 runs under the `deepspeed` launcher, ZeRO-2 and -3 under torchrun.
"""

from __future__ import annotations

import gc
import json
import math
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from tests.ceph_fixture import Ceph
from tests.conftest import FAST
from tests.distributed import Run, base_env, command, free_port, spawn, torchrun, train
from train.config import Config, ModelConfig, OptimConfig, ParallelConfig, PlanConfig, TrainerConfig

pytestmark = pytest.mark.skipif(
    find_spec("deepspeed") is None and os.environ.get("CI") != "true",
    reason="deepspeed is not installed (pip install -e '.[test]')")

RTOL = 2e-4
SIX = [*FAST, "checkpoint.interval=3"]


def _ok(run: Run, steps: int = 6) -> Run:
    assert run.returncode == 0, run.output[-4000:]
    assert run.run_dir is not None and len(run.losses) == steps, run.output[-4000:]
    return run


def _marker(checkpoint_dir: Path, step: int) -> dict:
    return json.loads((checkpoint_dir / f"step-{step:08d}" / "COMMITTED").read_text())


def deepspeed_launcher(cluster: str, overrides: list[str], *, cwd: Path, cache_dir: Path) -> Run:
    """`python -m launch +cluster=C --launcher deepspeed --run ...`: the DeepSpeed launcher as
    a user starts it, with the command and environment launch/ derives from the layout."""
    cmd = [sys.executable, "-m", "launch", "--launcher=deepspeed", "--run", f"--master-port={free_port()}",
           f"+cluster={cluster}", *overrides]
    return command(cmd, cwd=cwd, cache_dir=cache_dir)


@pytest.fixture(scope="module")
def ddp(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path) -> Run:
    cwd = tmp_path_factory.mktemp("ddp")
    return _ok(torchrun(2, [*SIX, "parallel=ddp", f"run.dir={cwd}/run"], cwd=cwd,
                        cache_dir=harness_cache))


@pytest.fixture(scope="module")
def zero(tmp_path_factory: pytest.TempPathFactory, harness_cache: Path) -> dict[int, Run]:
    """Uninterrupted 6-step runs of ZeRO-1 (through the deepspeed launcher), -2 and -3."""
    runs = {}
    for stage in (1, 2, 3):
        cwd = tmp_path_factory.mktemp(f"zero{stage}")
        overrides = [*SIX, f"parallel=zero{stage}", f"run.dir={cwd}/run"]
        if stage == 1:
            runs[stage] = _ok(deepspeed_launcher("2xCPU", overrides, cwd=cwd, cache_dir=harness_cache))
        else:
            runs[stage] = _ok(torchrun(2, overrides, cwd=cwd, cache_dir=harness_cache))
    return runs


def test_zero_stages_match_ddp(ddp: Run, zero: dict[int, Run]) -> None:
    for stage, run in zero.items():
        for step, loss in ddp.losses.items():
            assert run.losses[step] == pytest.approx(loss, rel=RTOL), (stage, step, ddp.losses, run.losses)
        assert "deepspeed engine, ZeRO-%d" % stage in run.output
    assert ddp.losses[6] < ddp.losses[1] - 0.3  # and it learns: not two equally broken runs


def test_deepspeed_launcher_trains_and_commits(zero: dict[int, Run]) -> None:
    run = zero[1]  # started by the deepspeed launcher, which sets LOCAL_SIZE, not LOCAL_WORLD_SIZE
    assert "cluster 2xCPU | world 2" in run.output
    marker = _marker(run.run_dir / "checkpoints", 6)
    assert (marker["engine"], marker["zero_stage"], marker["world_size"]) == ("deepspeed", 1, 2)
    assert (run.run_dir / "checkpoints" / "latest").read_text().strip() == "step-00000006"


def test_generated_config_is_written_to_the_run_dir(zero: dict[int, Run]) -> None:
    written = json.loads((zero[3].run_dir / "ds_config.json").read_text())
    assert written["zero_optimization"] == {"stage": 3}
    assert (written["train_micro_batch_size_per_gpu"], written["gradient_accumulation_steps"],
            written["train_batch_size"]) == (4, 4, 32)
    assert written["gradient_clipping"] == 1.0 and written["bf16"] == {"enabled": False}
    assert written["optimizer"]["params"]["betas"] == [0.9, 0.95]
    assert "scheduler" not in written  # the harness's schedule drives the optimizer's lr


def test_deepspeed_config_comes_from_the_harness_config_and_extra_keys_win() -> None:
    import torch

    from storage.secrets import redacted
    from train.deepspeed_engine import deepspeed_config

    cfg = Config(parallel=ParallelConfig(
        name="zero3", engine="deepspeed", zero_stage=3, offload_optimizer=True, offload_params=True,
        mixed_precision="bf16",
        deepspeed_extra={"zero_optimization": {"overlap_comm": True}, "gradient_clipping": 0.5,
                         "comet": {"enabled": True, "api_key": "sekrit"}}),
        optim=OptimConfig(weight_decay=0.05), trainer=TrainerConfig(micro_batch_size=2))
    ds = deepspeed_config(cfg, accum_steps=8, dp=4, device=torch.device("cpu"))
    assert ds["train_batch_size"] == 2 * 8 * 4
    assert ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"] == {  # merged key by key: the generated keys stay
        "stage": 3, "overlap_comm": True, "offload_optimizer": {"device": "cpu", "pin_memory": False},
        "offload_param": {"device": "cpu", "pin_memory": False}}
    assert ds["gradient_clipping"] == 0.5  # extra keys win
    assert ds["optimizer"]["params"]["weight_decay"] == 0.05
    assert ds["optimizer"]["params"]["torch_adam"] is False  # offload: DeepSpeed's CPU Adam
    assert redacted(ds)["comet"] == {"enabled": True, "api_key": "<redacted>"}
    # bf16: gradients accumulated and reduced in fp32, as the native engine does
    assert ds["data_types"] == {"grad_accum_dtype": "fp32"} and ds["communication_data_type"] == "fp32"
    # ZeRO-2 reduce-scatters every micro-batch: overlapped with the backward pass
    zero2 = Config(parallel=ParallelConfig(name="zero2", engine="deepspeed", zero_stage=2))
    assert deepspeed_config(zero2, accum_steps=8, dp=4, device=torch.device("cpu"))["zero_optimization"] == {
        "stage": 2, "overlap_comm": True}


@pytest.mark.parametrize("overrides, message", [
    ({"tp": 2}, "the DeepSpeed engine has no tensor parallel (tp=2); use parallel.tp=1, or the "
                "native engine's parallel=fsdp_tp"),
    ({"compile": True}, "parallel.compile=true is not supported with the DeepSpeed engine"),
    ({"zero_stage": 2, "offload_params": True}, "offload_params needs zero_stage=3"),
    ({"deepspeed_extra": {"train_micro_batch_size_per_gpu": 8}},
     "deepspeed_extra.train_micro_batch_size_per_gpu cannot be set: the harness derives it from "
     "its own config; set trainer.micro_batch_size instead"),
    ({"deepspeed_extra": {"scheduler": {"type": "WarmupLR"}}}, "cannot be set"),
    ({"engine": "native"}, "are DeepSpeed settings, but engine=native; use parallel=zero1"),
])
def test_what_deepspeed_cannot_do_is_refused_at_start(overrides: dict, message: str) -> None:
    from train.checks import check_parallel

    fields = {"name": "zero3", "engine": "deepspeed", "zero_stage": 3, **overrides}
    with pytest.raises(ValueError) as err:
        check_parallel(ParallelConfig(**fields), dp=2 if fields.get("tp", 1) == 1 else 1,
                       tp=fields.get("tp", 1))
    assert message in str(err.value)


def test_checkpoint_with_a_short_file_is_not_committed(tmp_path: Path) -> None:
    from storage.checkpoint import CheckpointError, verify_whole

    (tmp_path / "rng").mkdir()
    (tmp_path / "mp_rank_00_model_states.pt").write_bytes(b"x" * 10)
    (tmp_path / "rng" / "rank-00000.pt").write_bytes(b"x" * 4)
    verify_whole(str(tmp_path), {"mp_rank_00_model_states.pt": 10, "rng/rank-00000.pt": 4})
    with pytest.raises(CheckpointError) as err:  # what the ranks uploaded vs what arrived
        verify_whole(str(tmp_path), {"mp_rank_00_model_states.pt": 20, "rng/rank-00000.pt": 4,
                                     "zero_pp_rank_1_mp_rank_00_optim_states.pt": 8})
    assert str(err.value) == (
        f"checkpoint {tmp_path} was not written whole, so it is not committed: "
        f"mp_rank_00_model_states.pt (10 of 20 bytes), zero_pp_rank_1_mp_rank_00_optim_states.pt "
        f"(missing of 8 bytes)")


def _engine_files(rank: int, world_size: int, url: str, staging: str) -> dict:
    """Two saves through storage.engine_files (the first fails on rank 1), then a load."""
    import torch.distributed

    from storage.checkpoint import Checkpointer, CheckpointError
    from storage.engine_files import EngineFiles

    checkpointer = Checkpointer(url, keep_last=0, rank=rank, world_size=world_size)
    files = EngineFiles(checkpointer, staging, local_rank=rank, local_world_size=world_size)

    def write(directory: Path) -> None:
        directory.mkdir(parents=True)
        (directory / f"shard-{rank}.bin").write_bytes(bytes([rank]) * (rank + 1))

    def write_then_fail(directory: Path) -> None:
        write(directory)
        if rank == 1:
            raise OSError("No space left on device")

    try:
        files.save(1, write_then_fail, {"engine": "own-files"})
        failed = ""
    except CheckpointError as exc:
        failed = str(exc)
    files.save(2, write, {"engine": "own-files"})
    read: dict[str, bytes] = {}
    latest = checkpointer.latest()
    files.load(latest, lambda d: read.update({f.name: f.read_bytes() for f in d.iterdir() if f.is_file()}),
               {"engine": "own-files"})
    torch.distributed.barrier()  # local rank 0 clears the staging directory after the load
    return {"failed": failed, "committed": [c.step for c in checkpointer.committed()], "read": read,
            "staging_left": Path(staging).exists() and any(Path(staging).rglob("*"))}


def test_engine_files_commit_only_when_every_rank_uploaded(tmp_path: Path) -> None:
    url = str(tmp_path / "checkpoints")
    for result in spawn(_engine_files, 2, url, str(tmp_path / "staging")):
        assert result["failed"] == (f"checkpoint {url}/step-00000001 is not committed: rank 1: OSError: "
                                    f"No space left on device")
        assert result["committed"] == [2]  # the failed save left nothing that counts
        assert result["read"] == {"shard-0.bin": b"\x00", "shard-1.bin": b"\x01\x01"}  # every rank's files
        assert not result["staging_left"]
    assert not (tmp_path / "checkpoints" / "step-00000001" / "COMMITTED").exists()


def test_deepspeed_checkpoint_of_another_stage_or_world_size_is_refused() -> None:
    from storage.checkpoint import CheckpointError, CheckpointInfo, check_meta
    from train.deepspeed_engine import LOAD_HINTS

    info = CheckpointInfo("/ckpt/step-00000006", 6, {"engine": "deepspeed", "zero_stage": 3, "world_size": 4})
    check_meta(info, {"engine": "deepspeed", "zero_stage": 3, "world_size": 4}, LOAD_HINTS)
    with pytest.raises(CheckpointError) as err:
        check_meta(info, {"engine": "deepspeed", "zero_stage": 2, "world_size": 4}, LOAD_HINTS)
    assert str(err.value) == ("checkpoint /ckpt/step-00000006 was written for zero_stage=3, but this run "
                              "has zero_stage=2; start a new checkpoint.url, or resume with parallel=zero3")
    with pytest.raises(CheckpointError) as err:
        check_meta(info, {"engine": "deepspeed", "zero_stage": 3, "world_size": 2}, LOAD_HINTS)
    assert str(err.value).startswith(
        "checkpoint /ckpt/step-00000006 was written for world_size=4, but this run has world_size=2; "
        "start a new checkpoint.url, or resume on 4 ranks (DeepSpeed's checkpoint is partitioned by rank")


def test_missing_deepspeed_names_the_extra(tmp_path: Path) -> None:
    code = ("import runpy, sys; sys.modules['deepspeed'] = None; "
            "sys.argv = ['train.run', 'parallel=zero2', 'run.dir=" + str(tmp_path) + "/run']; "
            "runpy.run_module('train.run', run_name='__main__', alter_sys=True)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          env=base_env(), timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "engine=deepspeed needs the deepspeed package: pip install -e '.[deepspeed]'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_resume_from_local_then_from_ceph_continues_bitwise_identical(
        zero: dict[int, Run], ceph: Ceph, tmp_path: Path, harness_cache: Path) -> None:
    """ZeRO-3, one run in three pieces (three runs, not four, to keep the suite fast):

    1. steps 1-3, checkpoint at 3 to a local directory, stop;
    2. resume from it (checkpoint.resume=URL), steps 4-5 with checkpoints uploaded to a real
       Ceph bucket, stop at 5;
    3. resume from the bucket (checkpoint.resume=auto finds the latest committed), step 6.

    Every resumed step equals the uninterrupted ZeRO-3 run bitwise.
    """
    base = [*SIX, "parallel=zero3", "storage=ceph"]
    local = tmp_path / "checkpoints"
    first = _ok(torchrun(2, [*base, f"checkpoint.url={local}", "trainer.stop_after_steps=3",
                             f"run.dir={tmp_path}/one"], cwd=tmp_path, cache_dir=harness_cache), steps=3)
    assert sorted(p.name for p in local.glob("step-*")) == ["step-00000003"]
    assert sorted(p.name for p in (local / "step-00000003").iterdir()) == [
        "COMMITTED", "rng", "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    assert first.losses == {s: zero[3].losses[s] for s in (1, 2, 3)}

    url = ceph.unique("deepspeed-checkpoints")
    second = _ok(torchrun(2, [*base, f"checkpoint.url={url}", f"checkpoint.resume={local}/step-00000003",
                              "trainer.stop_after_steps=5", f"run.dir={tmp_path}/two"],
                          cwd=tmp_path, cache_dir=harness_cache), steps=2)
    assert "(step 3, DeepSpeed ZeRO-3, written by 2 ranks)" in second.output
    assert second.losses == {s: zero[3].losses[s] for s in (4, 5)}
    fs = ceph.fs()
    marker = json.loads(fs.cat_file(f"{url}/step-00000005/COMMITTED"))
    assert (marker["engine"], marker["zero_stage"], marker["step"]) == ("deepspeed", 3, 5)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.find(f"{url}/step-00000005")) == [
        "COMMITTED", "rank-00000.pt", "rank-00001.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt",
        "zero_pp_rank_1_mp_rank_00_optim_states.pt"]

    third = _ok(torchrun(2, [*base, f"checkpoint.url={url}", f"run.dir={tmp_path}/three"],
                         cwd=tmp_path, cache_dir=harness_cache), steps=1)
    assert f"resumed from {url}/step-00000005" in third.output
    assert third.losses == {6: zero[3].losses[6]}
    assert third.metrics[-1]["tokens_seen"] == 6 * 2048  # the data position came back too
    for secret in (ceph.env["AWS_ACCESS_KEY_ID"], ceph.env["AWS_SECRET_ACCESS_KEY"]):
        for name in ("config.yaml", "ds_config.json"):  # what the run wrote holds no credential
            assert secret not in (third.run_dir / name).read_text()


def test_checkpoint_of_the_other_engine_is_refused(ddp: Run, zero: dict[int, Run], tmp_path: Path,
                                                   harness_cache: Path) -> None:
    assert _marker(ddp.run_dir / "checkpoints", 6)["engine"] == "native"
    ds_checkpoints = zero[3].run_dir / "checkpoints"
    native = train([*FAST, "parallel=ddp", f"checkpoint.url={ds_checkpoints}",
                    f"run.dir={tmp_path}/native"], cwd=tmp_path, cache_dir=harness_cache)
    assert native.returncode == 2
    assert (f"checkpoint {ds_checkpoints}/step-00000006 was written by the DeepSpeed engine "
            f"(ZeRO-3); this run uses the native engine (parallel=ddp), which cannot read "
            f"DeepSpeed's format: resume with parallel=zero3, or start a new checkpoint.url") in native.output
    assert "Traceback" not in native.output


def test_native_checkpoint_is_refused_by_deepspeed(ddp: Run) -> None:
    from storage.checkpoint import CheckpointError, Checkpointer
    from train.engine import check_engine

    info = Checkpointer(str(ddp.run_dir / "checkpoints"), keep_last=0, rank=0, world_size=1).latest()
    with pytest.raises(CheckpointError) as err:
        check_engine(info, {"engine": "deepspeed", "zero_stage": 2}, "zero2")
    assert str(err.value) == (
        f"checkpoint {info.url} was written by the native engine (DCP); this run uses the "
        f"DeepSpeed engine (parallel=zero2), which cannot read it: resume with the native engine "
        f"(parallel=ddp, fsdp, tp or fsdp_tp), or start a new checkpoint.url")
    legacy = type(info)(info.url, info.step, {k: v for k, v in info.meta.items() if k != "engine"})
    with pytest.raises(CheckpointError, match="written by the native engine"):  # no key = native
        check_engine(legacy, {"engine": "deepspeed", "zero_stage": 2}, "zero2")


# ---- ZeRO-3 builds the model partitioned (zero.Init), with the native engine's weights ------------

def _zero3(model: ModelConfig | None = None) -> Config:
    return Config(model=model or ModelConfig(), parallel=ParallelConfig(name="zero3", engine="deepspeed",
                                                                       zero_stage=3))


def _build_zero3(cfg: Config, world_size: int):
    import torch

    from train.build import deepspeed_model
    from train.deepspeed_engine import deepspeed_config

    cpu = torch.device("cpu")
    return deepspeed_model(cfg, cpu, deepspeed_config(cfg, accum_steps=1, dp=world_size, device=cpu))


def _zero3_weights(rank: int, world_size: int) -> dict:
    """Per parameter: (elements held whole, elements of this rank's partition, full size, equal to
    the native engine's initial weights once gathered); and whether weight decay picks the same."""
    import deepspeed
    import torch

    from train.build import _whole_model
    from train.optim import param_groups

    cfg = _zero3()
    model = _build_zero3(cfg, world_size)
    native = _whole_model(cfg, torch.device("cpu"))
    params = {}
    for (name, p), ref in zip(model.named_parameters(), native.parameters(), strict=True):
        with deepspeed.zero.GatheredParameters([p]):
            same = torch.equal(p.data, ref.data)
        params[name] = (p.numel(), p.ds_tensor.numel(), ref.numel(), same)
    groups = {"zero3": (model, param_groups(model, cfg.optim)), "native": (native, param_groups(native, cfg.optim))}
    decayed = [[n for n, p in m.named_parameters() if any(p is q for q in g[0]["params"])]
               for m, g in groups.values()]
    return {"params": params, "same_decay": decayed[0] == decayed[1] and len(decayed[0]) > 0}


def test_zero3_model_is_built_partitioned_with_the_native_initial_weights() -> None:
    for rank, result in enumerate(spawn(_zero3_weights, 2)):
        for name, (whole, local, full, same) in result["params"].items():
            assert whole == 0 and local == math.ceil(full / 2), (rank, name, whole, local, full)
            assert same, (rank, name)  # bit for bit: the same draws in the same order
        assert result["same_decay"], rank  # weight decay on the same (full-shape) matrices


# 32 blocks of dim 512: 101M parameters (405 MB in fp32), the largest 0.7% of them, so one whole
# parameter at a time is small next to half the model.
BIG = ModelConfig(vocab_size=256, dim=512, n_layers=32, n_heads=8, n_kv_heads=8)


def _status_bytes(key: str) -> int:
    return int(re.search(rf"{key}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def _peak_rss_growth(build) -> tuple[Any, int]:
    """`build()` and how far this process's resident memory rose above where it started."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM, the peak, to the current RSS
    start = _status_bytes("VmRSS")
    built = build()
    return built, _status_bytes("VmHWM") - start


def _zero3_build_memory(rank: int, world_size: int) -> dict:
    """Peak resident memory added while building BIG under ZeRO-3, the bytes of this rank's
    partitions, and (to show the measure sees a whole model) the same for the native build.

    glibc otherwise keeps freed blocks below its adaptive mmap threshold (up to 32 MiB) for
    reuse, so the resident size would keep every transient whole parameter; with a fixed 64 KiB
    threshold every tensor is its own mapping, returned on free, and the resident size follows
    the bytes really allocated."""
    import ctypes

    import torch

    from train.build import _whole_model

    m_mmap_threshold = -3
    assert ctypes.CDLL("libc.so.6").mallopt(m_mmap_threshold, 64 * 1024) == 1
    _build_zero3(_zero3(), world_size)  # once small: imports, communicators, DeepSpeed's first-use state
    cfg = _zero3(BIG)
    model, zero3_peak = _peak_rss_growth(lambda: _build_zero3(cfg, world_size))
    partitions = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    del model
    _, native_peak = _peak_rss_growth(lambda: _whole_model(cfg, torch.device("cpu")))
    return {"zero3_peak": zero3_peak, "partitions": partitions, "native_peak": native_peak}


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="measures Linux's VmHWM")
def test_zero3_build_allocates_half_the_model_per_rank_as_the_plan_says() -> None:
    from train import capacity
    from train.model import num_params

    model_bytes = 4 * num_params(BIG)
    fp32 = capacity.Workload(1, 64, 1, bf16=False, activation_checkpointing=False)
    plan = capacity.memory(BIG, capacity.Setting("ZeRO-3", "zero", 2, zero_stage=3), fp32, PlanConfig())
    for rank, m in enumerate(spawn(_zero3_build_memory, 2)):
        figures = (rank, m, model_bytes)
        assert m["partitions"] == plan.params == model_bytes // 2, figures  # the plan's parameter row
        assert m["zero3_peak"] <= 0.55 * model_bytes, figures  # observed: 0.53
        assert m["native_peak"] >= model_bytes, figures  # the measure does see a whole model
