"""The run's config, composed and checked exactly as `python -m train.run` would at start-up.

Launchers compose the same `configs/` tree with the same overrides through Hydra's compose
API, so a mistyped key, a wrong type or a layout the parallel degrees do not fit is refused
here, with the run's own message, before any process is started or any job submitted.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import HydraException
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from train import config as train_config
from train.config import ClusterConfig, Config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class LaunchError(Exception):
    """A launch that cannot go ahead; the message says what, where and what to do."""


@contextmanager
def _slurm_job_id(value: str | None) -> Iterator[None]:
    """Resolve the config as if SLURM_JOB_ID were `value` (None: as this shell has it)."""
    saved = os.environ.get("SLURM_JOB_ID")
    if value is not None:
        os.environ["SLURM_JOB_ID"] = value
    try:
        yield
    finally:
        if value is not None:
            if saved is None:
                os.environ.pop("SLURM_JOB_ID", None)
            else:
                os.environ["SLURM_JOB_ID"] = saved


def load(overrides: list[str], slurm_job_id: str | None = None) -> tuple[DictConfig, Config]:
    """Compose `configs/config.yaml` with `overrides`; return it raw and as typed dataclasses.

    `slurm_job_id` stands in for the job id in `${run_id:}` (launch.slurm passes Slurm's own
    `%j` pattern, since the id is known only once sbatch accepts the job).
    """
    train_config.register()
    try:
        # Hydra resolves `${run_id:}` (and caches it) while composing: set the id first.
        with _slurm_job_id(slurm_job_id), \
                initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            dcfg = compose(config_name="config", overrides=list(overrides))
            OmegaConf.resolve(dcfg)
        return dcfg, train_config.to_object(dcfg)
    except (HydraException, OmegaConfBaseException, ValueError) as exc:
        raise LaunchError(_message(exc)) from None


def _message(exc: BaseException) -> str:
    """Hydra's message and the OmegaConf cause under it (the key and the expected type),
    as `python -m train.run` prints them, without the config search path."""
    parts: list[str] = []
    while exc is not None:
        text = str(exc).split("\nConfig search path:")[0].strip()
        if text and text != "None" and text not in parts:
            parts.append(text)
        if isinstance(exc, OmegaConfBaseException):  # names the key; what is under it does not
            break
        exc = exc.__cause__ or exc.__context__
    return "bad config: " + "\n".join(parts)


def require_cluster(cfg: Config, command: str) -> ClusterConfig:
    """Launchers start a layout, so it must be named: `+cluster=NAME`."""
    if cfg.cluster is None:
        names = sorted(p.stem for p in (CONFIG_DIR / "cluster").glob("*.yaml"))
        raise LaunchError(
            f"{command} needs a cluster layout: add +cluster=NAME (one of {', '.join(names)})")
    return cfg.cluster


def check(cfg: Config, cluster: ClusterConfig) -> None:
    """The run's own start-up checks (`train.checks.startup_checks`, memory included), so a
    launcher never starts or queues what `train.run` would refuse."""
    from train.checks import startup_checks
    from train.distributed import node_range

    try:
        node_range(cluster)
        startup_checks(cfg, cluster)
    except ValueError as exc:  # LayoutError is a ValueError too
        raise LaunchError(str(exc)) from None
