"""`python -m launch.slurm +cluster=NAME [overrides] [--dry-run] [--wait]`: a Slurm batch job.

Renders an sbatch script from the layout (`+cluster`) and the `slurm` config group: one srun
task per node, each starting its node as `python -m launch --run` does (the node's training
interface chosen and checked, then torchrun with c10d rendezvous on the first node of the
allocation), and the Hydra overrides passed through unchanged to `train.run`. Submits it with sbatch,
prints the job id and run directory, and keeps the submitted script there as `sbatch.sh`.
`--dry-run` prints the script and submits nothing; `--wait` waits for the job and exits with
its exit code.

Preemption and time limits: Slurm sends USR1 to the batch shell `slurm.signal_lead_s` before
the limit; the shell writes the run's STOP file, the trainer checkpoints at the next step
boundary and exits, and the job requeues itself (at most `slurm.max_requeues` times). The
requeued job keeps its id, hence its run directory, and resumes from that checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from launch import commands
from launch.compose import LaunchError, check, load, require_cluster
from train.config import ClusterConfig, Config

JOB_ID = "%j"  # Slurm's filename pattern for the job id; stands for it until sbatch gives one
SCRIPT_NAME = "sbatch.sh"


@dataclass(frozen=True)
class Job:
    """What the script needs beyond the config: paths with %j for the job id."""

    run_dir: str  # absolute
    output: str  # absolute, sbatch --output pattern
    workdir: str  # sbatch --chdir: where relative paths of the config resolve, as at submission


def job_paths(cfg: Config, workdir: Path) -> Job:
    run_dir = str((workdir / Path(cfg.run.dir).expanduser()).resolve())
    output = cfg.slurm.output or f"{run_dir}.out"
    return Job(run_dir=run_dir, output=str(workdir / Path(output).expanduser()), workdir=str(workdir))


def _shell_path(path: str) -> str:
    """A path for a shell assignment, with %j turned into the job id variable."""
    return "${SLURM_JOB_ID}".join(shlex.quote(part) if part else "" for part in path.split(JOB_ID))


def _sbatch_lines(cfg: Config, cluster: ClusterConfig, job: Job) -> list[str]:
    s = cfg.slurm
    lines = [
        f"--job-name={s.job_name or cfg.run.name}",
        f"--nodes={cluster.nodes}",
        "--ntasks-per-node=1",  # one torchrun per node; it starts the node's processes
    ]
    if cluster.device == "cuda":
        lines.append(f"--gpus-per-node={cluster.procs_per_node}")
    if s.cpus_per_task or not s.exclusive:
        lines.append(f"--cpus-per-task={s.cpus_per_task or cluster.procs_per_node}")
    if s.exclusive:
        lines.append("--exclusive")
    lines.append(f"--time={s.time_limit}")
    for flag, value in (("partition", s.partition), ("account", s.account), ("qos", s.qos)):
        if value:
            lines.append(f"--{flag}={value}")
    lines += [
        f"--signal=B:USR1@{s.signal_lead_s}",  # B: to this shell only; see the trap below
        "--requeue",
        "--open-mode=append",  # a requeued job adds to the same log
        f"--output={job.output}",
    ]
    if s.error:
        lines.append(f"--error={Path(job.workdir) / s.error}")
    lines += [f"--chdir={job.workdir}", "--export=ALL"]
    return [*lines, *s.extra_sbatch]


def render(cfg: Config, cluster: ClusterConfig, overrides: list[str], job: Job) -> str:
    """The batch script for this config; `overrides` are passed to train.run as they are."""
    s = cfg.slurm
    sbatch = "\n".join(f"#SBATCH {line}" for line in _sbatch_lines(cfg, cluster, job))
    setup = "".join(f"{line}\n" for line in s.setup)
    cpus = ""
    if s.exclusive and not s.cpus_per_task:
        cpus = ' --cpus-per-task="$SLURM_CPUS_ON_NODE"'  # the whole node to torchrun's workers
    passed = " ".join(shlex.quote(o) for o in overrides)
    torchrun = " ".join(commands.torchrun(cluster, overrides, rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT",
                                          rdzv_id="$SLURM_JOB_ID", local_addr="<its address>"))
    torchrun = torchrun.replace("is_host=1", "is_host=<1 on node 0>").replace("\n", " ")
    again = shlex.join(["python", "-m", "launch.slurm", *overrides])
    return f"""#!/bin/bash
# Rendered by: {shlex.join(["python", "-m", "launch.slurm", *overrides])}
# Change the config and render it again rather than editing this file.
{sbatch}

set -uo pipefail
{setup}RUN_DIR={_shell_path(job.run_dir)}
MAX_REQUEUES={s.max_requeues}
# torchrun from the Python that rendered this script (its environment has the harness).
export TRAIN_PYTHON={shlex.quote(sys.executable)}
# c10d rendezvous on the first node of the allocation; the port follows the job id so that
# jobs sharing a node do not collide.
export MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
export MASTER_PORT=$(( 20000 + SLURM_JOB_ID % 20000 ))
# A fresh store per torchrun attempt, so a restarted worker group never reads the previous
# attempt's addresses (pytorch/pytorch#135712).
export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1
mkdir -p "$RUN_DIR"
rm -f "$RUN_DIR/{EXIT_FILE}"
echo "launch.slurm: job $SLURM_JOB_ID, attempt $(( ${{SLURM_RESTART_COUNT:-0}} + 1 )), on $SLURM_JOB_NODELIST;" \\
     "rendezvous $MASTER_ADDR:$MASTER_PORT; run dir $RUN_DIR"

# Slurm signals this shell, not the workers, and torchrun would not pass USR1 on: ask the
# trainer through its stop file. It checkpoints at the next step boundary and exits (75).
stop_requested=0
trap 'stop_requested=1; touch "$RUN_DIR/STOP"
      echo "launch.slurm: USR1: stop requested; checkpointing at the next step" >&2' USR1

# One task per node, each starting its node as `python -m launch --run` does: it picks the node's
# training interface (cluster.network_interface={cluster.network_interface}), checks the rendezvous,
# logs both, and runs with GLOO_SOCKET_IFNAME and NCCL_SOCKET_IFNAME set to it (unless set):
#   {torchrun}
# Node 0 (the first of the allocation) hosts the rendezvous: said explicitly, as names can alias.
srun --nodes={cluster.nodes} --ntasks-per-node=1{cpus} --kill-on-bad-exit=1 --export=ALL \\
    bash -c 'exec "$TRAIN_PYTHON" -m launch "$@" --run --node-rank="$SLURM_NODEID" \\
        --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID"' launch {passed} &
srun_pid=$!
# `wait` returns early when the trap runs: wait again until srun has exited.
wait "$srun_pid"; rc=$?
while kill -0 "$srun_pid" 2>/dev/null; do wait "$srun_pid"; rc=$?; done

if [[ $stop_requested == 1 && $rc != 0 ]]; then
    if (( ${{SLURM_RESTART_COUNT:-0}} < MAX_REQUEUES )); then
        echo "launch.slurm: checkpointed; requeueing job $SLURM_JOB_ID" \\
             "($(( ${{SLURM_RESTART_COUNT:-0}} + 1 )) of $MAX_REQUEUES); it resumes in $RUN_DIR" >&2
        scontrol requeue "$SLURM_JOB_ID" && exit 0
    fi
    echo "launch.slurm: checkpointed and stopped after $MAX_REQUEUES requeue(s). To continue:" \\
         {shlex.quote(again)} "run.dir=$RUN_DIR" >&2
    rc=75
fi
# The job's last word, for `launch.slurm --wait`: written only when it is not requeued.
echo "$rc" > "$RUN_DIR/{EXIT_FILE}"
exit "$rc"
"""


def _sinfo(partition: str) -> tuple[str, list[tuple[str, int, int]]]:
    """The partition (its default if "") and its nodes as (name, CPUs, GPUs)."""
    def run(*args: str) -> str:
        proc = subprocess.run(["sinfo", "-h", *args], capture_output=True, text=True)
        if proc.returncode:
            raise LaunchError(f"sinfo failed, so the job was not submitted: {proc.stderr.strip()}")
        return proc.stdout
    partitions = run("-o", "%P").split()
    if not partition:
        defaults = [p.rstrip("*") for p in partitions if p.endswith("*")]
        if not defaults:
            raise LaunchError(f"Slurm has no default partition; set slurm.partition= "
                              f"(one of {', '.join(partitions)})")
        partition = defaults[0]
    elif partition not in [p.rstrip("*") for p in partitions]:
        raise LaunchError(f"slurm.partition={partition}: no such partition; Slurm has "
                          f"{', '.join(p.rstrip('*') for p in partitions)}")
    nodes = {}
    for line in run("-N", "-p", partition, "-o", "%N|%c|%G").splitlines():
        name, cpus, gres = line.split("|")
        nodes[name] = (name, int(cpus), _gpus(gres))
    return partition, sorted(nodes.values())


def _gpus(gres: str) -> int:
    """GPUs in a sinfo %G field, e.g. `gpu:8`, `gpu:h100:8(S:0-1)`, `(null)`."""
    total = 0
    for item in gres.split(","):
        fields = item.split("(")[0].split(":")
        if fields[0] == "gpu" and len(fields) > 1 and fields[-1].isdigit():
            total += int(fields[-1])
    return total


def validate(cfg: Config, cluster: ClusterConfig) -> str:
    """Refuse a layout the partition cannot hold; return the partition's name."""
    partition, nodes = _sinfo(cfg.slurm.partition)
    if cluster.device == "cuda":
        need, have = cluster.procs_per_node, "GPUs"
        fits = [n for n in nodes if n[2] >= need]
        sizes = ", ".join(f"{n[0]} ({n[2]} GPUs)" for n in nodes)
    else:
        need, have = max(cluster.procs_per_node, cfg.slurm.cpus_per_task), "CPUs"
        fits = [n for n in nodes if n[1] >= need]
        sizes = ", ".join(f"{n[0]} ({n[1]} CPUs)" for n in nodes)
    if len(fits) < cluster.nodes:
        raise LaunchError(
            f"cluster {cluster.name} needs {cluster.nodes} node(s) with {need} {have} each; "
            f"partition {partition} has {len(fits)} such node(s) of {len(nodes)}: {sizes or 'none'}. "
            f"Not submitted: choose a layout that fits, or another partition (slurm.partition=)")
    return partition


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m launch.slurm",
                                     description=__doc__.split("\n\n")[1])
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for train.run")
    parser.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    parser.add_argument("--wait", action="store_true",
                        help="wait for the job; exit with its exit code")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        _, cfg = load(args.overrides, slurm_job_id=JOB_ID)
        cluster = require_cluster(cfg, "python -m launch.slurm")
        check(cfg, cluster)
        job = job_paths(cfg, Path.cwd())
        script = render(cfg, cluster, args.overrides, job)
        if args.dry_run:
            print(script, end="")
            return 0
        if not shutil.which("sbatch"):
            raise LaunchError("sbatch not found on PATH: run this on a Slurm login node "
                              "(or --dry-run to print the script)")
        partition = validate(cfg, cluster)
    except LaunchError as exc:
        print(f"launch.slurm: not submitted: {exc}", file=sys.stderr)
        return 2
    if JOB_ID not in os.path.dirname(job.output):
        Path(job.output).parent.mkdir(parents=True, exist_ok=True)  # Slurm does not create it
    return _submit_and_report(script, job, partition, cluster, wait=args.wait)


def _submit_and_report(script: str, job: Job, partition: str, cluster: ClusterConfig, *,
                       wait: bool) -> int:
    if JOB_ID not in job.run_dir:  # a fixed run.dir: no exit status of an earlier job counts
        (Path(job.run_dir) / EXIT_FILE).unlink(missing_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / SCRIPT_NAME
        path.write_text(script)
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True, text=True)
    job_id = proc.stdout.strip().split(";")[0]
    if proc.returncode or not job_id.isdigit():
        print(f"launch.slurm: sbatch refused the job: {(proc.stdout + ' ' + proc.stderr).strip()}",
              file=sys.stderr)
        return proc.returncode or 1
    run_dir = Path(job.run_dir.replace(JOB_ID, job_id))
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / SCRIPT_NAME).write_text(script)
    print(f"Submitted batch job {job_id}")
    print(f"partition {partition}: {cluster.nodes} node(s) x {cluster.procs_per_node} process(es) "
          f"({cluster.name})")
    print(f"log: {job.output.replace(JOB_ID, job_id)}")
    print(f"run_dir: {run_dir}", flush=True)
    if not wait:
        return 0
    code = wait_for_job(job_id, run_dir)
    if code:
        print(f"launch.slurm: job {job_id} exited with {code}", file=sys.stderr)
    return code


EXIT_FILE = "slurm-exit-status"

FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


class _ControllerBusy(Exception):
    """scontrol could not get an answer from slurmctld this time (timeout, restart)."""


def _job_fields(job_id: str) -> dict[str, str] | None:
    """`scontrol show job` as a dict; None once Slurm has forgotten the job."""
    proc = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
    if proc.returncode:
        if "Invalid job id" in proc.stderr:
            return None
        raise _ControllerBusy(proc.stderr.strip())
    return dict(item.split("=", 1) for item in proc.stdout.split() if "=" in item)


def wait_for_job(job_id: str, run_dir: Path, poll_s: float = 2.0, settle_s: float = 20.0) -> int:
    """Wait until the job has really ended, through any requeues; return its exit code.

    Not `sbatch --wait`: when a job requeues itself, sbatch (and `scontrol show job`) can
    show the attempt that was killed for the requeue as ended. The batch script writes its
    exit status into the run directory only when it ends without requeueing, so that file
    is the answer. A job killed from outside (scancel, time limit, node failure) never
    writes it: then a final Slurm state counts once it has stayed unchanged for `settle_s`.
    """
    exit_file = run_dir / EXIT_FILE
    last: tuple[str, str, str] | None = None
    last_since = 0.0
    gone_since: float | None = None
    busy_since: float | None = None
    while True:
        if exit_file.exists() and exit_file.read_text().strip().isdigit():
            return int(exit_file.read_text().strip())
        try:
            fields = _job_fields(job_id)
            busy_since = None
        except _ControllerBusy as exc:  # a loaded slurmctld times out now and then: ask again
            busy_since = busy_since or time.monotonic()
            if time.monotonic() - busy_since > 600:
                print(f"launch.slurm: no answer about job {job_id} for 10 minutes: {exc}",
                      file=sys.stderr)
                return 1
            time.sleep(poll_s)
            continue
        if fields is None:  # purged (MinJobAge) after it ended: give its exit file time to show
            gone_since = gone_since or time.monotonic()
            if time.monotonic() - gone_since < settle_s:
                time.sleep(poll_s)
                continue
            if last is None:
                print(f"launch.slurm: Slurm no longer knows job {job_id} and its end was not "
                      f"seen; look at its log for the exit status", file=sys.stderr)
            return _exit_code(last[2]) if last else 1
        gone_since = None
        state = fields.get("JobState", "")
        seen = (state, fields.get("Restarts", "0"), fields.get("ExitCode", "1:0"))
        if state in FINAL_STATES and seen == last:
            if time.monotonic() - last_since >= settle_s:
                return _exit_code(seen[2])
        elif state in FINAL_STATES:
            last, last_since = seen, time.monotonic()
        else:
            last = None
        time.sleep(poll_s)


def _exit_code(field: str) -> int:
    """Slurm's ExitCode=RC:SIGNAL as a shell exit status."""
    rc, _, sig = field.partition(":")
    return 128 + int(sig) if sig.isdigit() and int(sig) else int(rc or 1)


if __name__ == "__main__":
    sys.exit(main())
