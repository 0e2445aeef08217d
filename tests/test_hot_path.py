"""The step never waits on the host: no read of a device tensor on a step that does not log,
evaluate or save, and what used to need one per step is still exact.

A read is `aten._local_scalar_dense` (`.item()`, `float()`, `int()` and `bool()` of a tensor
all dispatch it) or `.tolist()` (which copies a device tensor to the host without dispatching
it on the CPU). On a GPU each one stalls the host until the device has drained, so the next
step cannot be queued. On the CPU they happen all the same, so a TorchDispatchMode (and a
wrapped `Tensor.tolist`) counts them here: the real entry point (`python -m train.run` under
torchrun) runs inside it, and every read is charged to the step that was training when it
happened (reads for a log row, an evaluation or a save count towards the step they follow).
`.numpy()` is not counted: it works on host tensors only, so it can never be a device read
(the stop request's flag, a host tensor all-reduced over gloo, is read with it).
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests.conftest import FAST
from tests.distributed import REPO, command, free_port, train

# Runs `train.run` with every read counted per step; writes {step: [where, ...]} to READS_OUT.
COUNTING_MAIN = textwrap.dedent('''
    import collections, json, os, sys, traceback
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    import train.trainer
    from train import run

    reads = collections.defaultdict(list)
    current = [0]  # the step being trained (0: start-up)
    train_step = train.trainer.Trainer.train_step

    def counted_train_step(self):
        current[0] = self.progress.step + 1
        return train_step(self)

    def record():
        frames = [f for f in traceback.extract_stack() if "/train/" in f.filename or "/storage/" in f.filename]
        where = frames[-1] if frames else traceback.extract_stack()[-3]
        reads[current[0]].append(f"{os.path.basename(where.filename)}:{where.lineno} {where.name}")

    class CountReads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                record()
            return func(*args, **(kwargs or {}))

    tolist = torch.Tensor.tolist

    def counted_tolist(self):
        record()
        return tolist(self)

    train.trainer.Trainer.train_step = counted_train_step
    torch.Tensor.tolist = counted_tolist
    with CountReads():
        try:
            run.main()
        finally:
            out = os.environ["READS_OUT"] + f".rank{os.environ.get('RANK', '0')}"
            with open(out, "w") as f:
                json.dump(reads, f)
''')

STEPS = 6
# Rows at the first and the last step only, the evaluation and the save at the end only: steps
# 2..5 neither log, evaluate nor save.
QUIET = [*FAST, f"trainer.max_steps={STEPS}", "trainer.log_interval_steps=1000", "trainer.eval_interval_steps=0",
         "checkpoint.interval=0"]


def _reads(tmp_path: Path, overrides: list[str], harness_cache: Path, nproc: int) -> tuple[dict, dict, str]:
    """Run train.run counting reads; returns rank 0's and rank 1's {step: [where, ...]}, and its output."""
    script = tmp_path / "counting_main.py"
    script.write_text(COUNTING_MAIN)
    out = tmp_path / "reads.json"
    torchrun = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--rdzv-backend=c10d",
                f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    run = command([*torchrun, str(script), *overrides, f"run.dir={tmp_path}/run"],
                  cwd=tmp_path, cache_dir=harness_cache, env={"READS_OUT": str(out)})
    assert run.returncode == 0, run.output[-4000:]
    per_rank = [{int(k): v for k, v in json.loads(Path(f"{out}.rank{r}").read_text()).items()} for r in range(nproc)]
    return per_rank[0], per_rank[-1], run.output


def test_no_device_reads_on_steps_that_neither_log_evaluate_nor_save(tmp_path: Path, harness_cache: Path) -> None:
    """FSDP on 2 ranks, 4 micro-batches per step, skip mode: a step that only trains reads
    nothing (the loss, the gradient norm, the non-finite gate, the memory peaks, the stop
    request, the data); the steps that log, evaluate and save still do (so the count is real).
    The same run traces steps 2-3 with trainer.profile_steps (which reads nothing either) and
    asks for a CUDA memory snapshot, which a CPU run declines in one line."""
    rank0, rank1, output = _reads(tmp_path, [*QUIET, "parallel=fsdp", "trainer.on_nonfinite_loss=skip",
                                             "trainer.profile_steps=[2,3]", "trainer.memory_snapshot=true"],
                                  harness_cache, 2)
    for reads in (rank0, rank1):
        quiet = {step: reads.get(step, []) for step in range(2, STEPS)}
        assert all(not where for where in quiet.values()), quiet
    assert rank0.get(1) and rank0.get(STEPS), rank0  # the logging steps read: the counting works
    for rank in (0, 1):  # one Chrome/Perfetto trace per rank, with the steps' ops in it
        trace = json.loads((tmp_path / "run" / "profile" / f"rank-{rank:05d}.json").read_text())
        assert any(event.get("name") == "aten::mm" for event in trace["traceEvents"])
    assert "trainer.memory_snapshot=true records the CUDA allocator; this run is on the cpu: nothing recorded" \
        in output
    assert not (tmp_path / "run" / "memory").exists()


def test_float8_is_refused_on_cpu_and_pre_hopper_layouts_and_bad_profile_steps_too() -> None:
    import yaml

    from train.checks import check_float8
    from train.config import ClusterConfig, Config, ConfigError, ParallelConfig, TrainerConfig
    from train.distributed import LayoutError
    from train.metrics import StepProfiler

    a100 = ClusterConfig(**yaml.safe_load((REPO / "configs" / "cluster" / "8xA100.yaml").read_text()))
    cpu = ClusterConfig(**yaml.safe_load((REPO / "configs" / "cluster" / "2xCPU.yaml").read_text()))
    for cluster, has in ((a100, "A100-SXM-80GB"), (cpu, "cpu")):
        with pytest.raises(LayoutError, match=rf"parallel.float8=rowwise needs GPUs with float8 tensor cores "
                                              rf"\(H100, H200 or later\); cluster {cluster.name} has {has}: "
                                              rf"set parallel.float8=off$"):
            check_float8(Config(parallel=ParallelConfig(float8="rowwise")), cluster)
    check_float8(Config(), cpu)  # off: nothing to refuse
    with pytest.raises(ConfigError, match=r"trainer.profile_steps=\[5, 2\] must be \[first, last\]"):
        StepProfiler(TrainerConfig(profile_steps=[5, 2]), Path("."), 0, torch.device("cpu"))


def test_nonfinite_steps_are_checked_exactly_when_read_late(tmp_path: Path, harness_cache: Path) -> None:
    """A learning rate of 1e20 breaks the model at step 1; every later gradient is NaN. Rows
    only at steps 1 and 6: the steps in between are read at step 6, and each is still
    accounted for at its own step: 2 and 3 skipped, and the run stops naming step 4. (One
    micro-batch a step: NaN arithmetic is slow on the CPU.)"""
    run = train([*QUIET, "trainer.global_batch_tokens=256", "optim.lr=1e20", "optim.warmup_steps=1",
                 "trainer.on_nonfinite_loss=skip", "trainer.max_skipped_steps=2", f"run.dir={tmp_path}/run"],
                cwd=tmp_path, cache_dir=harness_cache)
    assert run.returncode == 2, run.output[-3000:]
    for step in (2, 3):
        assert f"gradient norm nan at step {step} (non-finite gradients): step skipped" in run.output
    assert "at step 4 (non-finite gradients): 3 non-finite steps in a row (more than " \
           "trainer.max_skipped_steps=2)" in run.output
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1]  # step 6's row never came: the run stopped first
    assert not list((tmp_path / "run" / "checkpoints").glob("step-*"))  # nothing saved after the failure
