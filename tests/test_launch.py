"""Launch commands come from the cluster layout: torchrun and deepspeed lines from
`python -m launch`, and the sbatch scripts `python -m launch.slurm --dry-run` renders (no Slurm
needed). Bad overrides fail here as they would in the run."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import FAST
from tests.distributed import base_env

# A realistic large-model run: 1M tokens per step splits over every layout below, and FSDP2
# fits it in memory (the launchers refuse what the run's memory check would).
BIG = ["model=llama_8b", "parallel=fsdp", "trainer.global_batch_tokens=1048576", "trainer.micro_batch_size=1"]


def _launch(module: str, args: list[str], cwd: Path, env: dict[str, str] | None = None,
            cache: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=600, env={**base_env(cache), **(env or {})})


def _sbatch_options(script: str) -> dict[str, str]:
    options = {}
    for line in script.splitlines():
        if line.startswith("#SBATCH "):
            key, _, value = line.removeprefix("#SBATCH ").partition("=")
            options[key] = value
    return options


def _node_command(script: str) -> str:
    """What each srun task runs: its node's `python -m launch --run`."""
    return re.search(r"srun (.*?) &\n", script, re.DOTALL).group(1)


@pytest.mark.parametrize(("cluster", "nodes", "gpus"),
                         [("8xA100", 1, 8), ("2x8xH100", 2, 8), ("4x8xA100", 4, 8)])
def test_sbatch_script_follows_the_layout(tmp_path: Path, cluster: str, nodes: int, gpus: int) -> None:
    overrides = [f"+cluster={cluster}", *BIG, "slurm.partition=gpu",
                 "slurm.time_limit=2-00:00:00", "slurm.account=llm", "slurm.signal_lead_s=300"]
    job = _launch("launch.slurm", [*overrides, "--dry-run"], tmp_path,
                  env={"AWS_SECRET_ACCESS_KEY": "s3cr3t-value"})
    assert job.returncode == 0, job.stderr
    script = job.stdout
    options = _sbatch_options(script)
    assert options["--nodes"] == str(nodes)
    assert options["--ntasks-per-node"] == "1"  # one torchrun per node
    assert options["--gpus-per-node"] == str(gpus)
    assert options["--time"] == "2-00:00:00"
    assert options["--partition"] == "gpu" and options["--account"] == "llm"
    assert options["--signal"] == "B:USR1@300"
    assert "--requeue" in options and "--exclusive" in options
    assert options["--output"] == f"{tmp_path}/runs/slurm-%j.out"
    assert options["--export"] == "ALL"  # the environment travels; the script holds no secret
    assert "s3cr3t-value" not in script and "AWS_" not in script
    node = _node_command(script)
    assert node.startswith(f"--nodes={nodes} --ntasks-per-node=1"), node
    # each node is started as `python -m launch --run` starts it: the same network checks
    assert '-m launch "$@" --run --node-rank="$SLURM_NODEID"' in node
    assert '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"' in node
    assert 'MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in script
    # the overrides reach launch, and through it train.run, unchanged
    assert node.endswith(f"' launch {shlex.join(overrides)}"), node
    assert f"#   torchrun --nnodes={nodes} --nproc_per_node={gpus} --rdzv-backend=c10d" in script
    assert not (tmp_path / "runs").exists()  # a dry run writes nothing


def test_extra_sbatch_lines_and_setup(tmp_path: Path) -> None:
    job = _launch("launch.slurm", ["+cluster=8xH100", *BIG, "slurm.extra_sbatch=['--mem=0','--constraint=ib']",
                                   "slurm.setup=['module load cuda/12.4']", "--dry-run"], tmp_path)
    assert job.returncode == 0, job.stderr
    options = _sbatch_options(job.stdout)
    assert options["--mem"] == "0" and options["--constraint"] == "ib"
    assert "\nmodule load cuda/12.4\n" in job.stdout


def test_bad_override_is_refused_like_the_run(tmp_path: Path) -> None:
    for module in ("launch", "launch.slurm"):
        job = _launch(module, ["+cluster=8xA100", "trainer.max_stpes=5", "--dry-run"
                               if module == "launch.slurm" else "--launcher=torchrun"], tmp_path)
        assert job.returncode == 2
        assert "Key 'max_stpes' not in 'TrainerConfig'" in job.stderr
        assert "Traceback" not in job.stderr
    no_layout = _launch("launch.slurm", ["--dry-run"], tmp_path)
    assert no_layout.returncode == 2 and "add +cluster=NAME (one of 1xH100," in no_layout.stderr
    unsplittable = _launch("launch.slurm", ["+cluster=8xA100", "trainer.global_batch_tokens=8192", "--dry-run"],
                           tmp_path)
    assert unsplittable.returncode == 2
    assert "trainer.global_batch_tokens=8192 does not split into micro-batches" in unsplittable.stderr
    too_big = _launch("launch.slurm", ["+cluster=8xA100", "model=llama_8b", "parallel=ddp", "--dry-run"], tmp_path)
    assert too_big.returncode == 2  # the run's memory check: nothing is queued that would be refused
    assert "needs" in too_big.stderr and "GiB per GPU" in too_big.stderr and "not submitted" in too_big.stderr


def test_missing_sbatch_is_named(tmp_path: Path) -> None:
    path = os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep)
                           if not (Path(p) / "sbatch").exists())
    job = _launch("launch.slurm", ["+cluster=8xA100", *BIG], tmp_path, env={"PATH": path})
    assert job.returncode == 2
    assert "sbatch not found on PATH" in job.stderr and "not submitted" in job.stderr


def test_torchrun_command_for_one_node(tmp_path: Path) -> None:
    job = _launch("launch", ["+cluster=8xA100", *BIG], tmp_path)
    assert job.returncode == 0, job.stderr
    assert job.stdout.strip() == f"torchrun --nproc_per_node=8 -m train.run +cluster=8xA100 {shlex.join(BIG)}"


def test_a_command_for_each_node(tmp_path: Path) -> None:
    job = _launch("launch", ["+cluster=4x8xA100", *BIG, "--rdzv-endpoint=gpu001:29400",
                             "--rdzv-id=llama"], tmp_path)
    assert job.returncode == 0, job.stderr
    lines = [line for line in job.stdout.splitlines() if not line.startswith("#")]
    assert lines == [f"python -m launch +cluster=4x8xA100 {shlex.join(BIG)} --rdzv-endpoint=gpu001:29400 "
                     f"--rdzv-id=llama --run --node-rank={rank}" for rank in range(4)]
    # what each of them runs once it knows its node's address
    assert ("#   torchrun --nnodes=4 --nproc_per_node=8 --rdzv-backend=c10d --rdzv-endpoint=gpu001:29400 "
            "--rdzv-id=llama --rdzv-conf=is_host=1 --local-addr=ADDRESS -m train.run +cluster=4x8xA100 "
            f"{shlex.join(BIG)}\n") in job.stdout


def test_deepspeed_command_and_hostfile(tmp_path: Path) -> None:
    job = _launch("launch", ["+cluster=2x8xH100", *BIG, "--launcher=deepspeed",
                             "--hosts=gpu001,gpu002"], tmp_path)
    assert job.returncode == 0, job.stderr
    assert "#   gpu001 slots=8\n#   gpu002 slots=8\n" in job.stdout
    assert job.stdout.splitlines()[-1] == (
        "deepspeed --hostfile=hostfile --num_nodes=2 --num_gpus=8 --master_addr=gpu001 "
        f"--master_port=29500 --no_local_rank --module train.run +cluster=2x8xH100 {shlex.join(BIG)}")


def test_run_starts_the_printed_command(tmp_path: Path, harness_cache: Path) -> None:
    job = _launch("launch", ["+cluster=2xCPU", *FAST, f"run.dir={tmp_path}/r", "--run"], tmp_path,
                  cache=harness_cache)
    assert job.returncode == 0, job.stderr[-3000:]
    assert "+ torchrun --nproc_per_node=2 -m train.run +cluster=2xCPU" in job.stderr
    assert job.stdout.splitlines()[-1] == f"run_dir: {tmp_path}/r"
    assert (tmp_path / "r" / "checkpoints" / "step-00000006" / "COMMITTED").exists()
