"""Hydra sweeps (`python -m train.run -m trainer.max_steps=2,3`): one run directory per job.

Hydra runs a sweep's jobs one after another in one process. The default run directory,
`runs/${run_id:}`, names the launch, not the job, so every job of a sweep would share it, and
the second job would resume from the first one's checkpoints. Under `-m` each job therefore
runs in `runs/<run id>/<job number>` (Hydra's own sweep layout: `hydra.sweep.dir` is
`runs/${run_id:}`, where Hydra also keeps the sweep's `multirun.yaml`), and its checkpoints
follow it. A run directory or checkpoint URL set explicitly is the user's choice: it is kept,
and the job says at start-up that the jobs of the sweep share it.
"""

from __future__ import annotations

import sys

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, open_dict

SWEEP_SYNTAX = (",", "glob(", "range(", "choice(", "interval(")
DEFAULT_RUN_DIR = "runs/${run_id:}"


def _swept(key: str) -> bool:
    """Whether the command line sweeps over `key` itself (`run.dir=a,b`): then jobs differ anyway."""
    for arg in sys.argv[1:]:
        name, sep, value = arg.lstrip("+~").partition("=")
        if sep and name == key and any(s in value for s in SWEEP_SYNTAX):
            return True
    return False


def is_sweep_job() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def place_sweep_job(dcfg: DictConfig) -> list[str]:
    """Give this sweep job its own run directory; return the warnings to log once logging is set.

    Outside a sweep nothing changes. Must run before the config is resolved.
    """
    if not is_sweep_job():
        return []
    hc = HydraConfig.get()
    job = f"sweep job {hc.job.num}"
    raw = OmegaConf.to_container(dcfg, resolve=False)
    warnings = []
    run_dir, ckpt = raw["run"]["dir"], raw["checkpoint"]["url"]
    if run_dir == DEFAULT_RUN_DIR:
        with open_dict(dcfg):
            dcfg.run.dir = hc.runtime.output_dir  # runs/<run id>/<job number>
    elif "job.num" not in run_dir and not _swept("run.dir"):
        warnings.append(f"{job}: run.dir={run_dir} is set explicitly, so every job of this sweep "
                        f"writes into it and resumes from the others' checkpoints; leave run.dir "
                        f"unset for one directory per job (runs/<run id>/<job number>)")
    if "${run.dir}" not in ckpt and "job.num" not in ckpt and not _swept("checkpoint.url"):
        warnings.append(f"{job}: checkpoint.url={ckpt} is set explicitly, so every job of this "
                        f"sweep saves to it and resumes from the latest checkpoint committed there "
                        f"by any job; leave checkpoint.url unset for checkpoints per job")
    return warnings
