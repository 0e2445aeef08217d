"""Entry point: `python -m train.run [overrides]`, or under torchrun / Slurm.

Parse the config, check the layout against the world, build, train. The last line printed
is `run_dir: <path>`; scripts rely on it.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from storage import fs as storage_fs
from storage.checkpoint import CheckpointError
from storage.shards import DatasetError, read_index
from train import build, config, distributed, hf, prometheus, sweep, trackers
from train.engine import EngineUnavailable
from train.metrics import MetricsLogger
from train.batch import global_batch_tokens
from train.checks import startup_checks
from train.model import flops_per_token
from train.heartbeat import RankFailure
from train.preemption import EXIT_PREEMPTED, StopRequest
from train.trainer import NonFiniteLossError, Trainer

log = logging.getLogger("train")

# Another rank stopped answering: the launcher should restart the job from its last checkpoint.
EXIT_RANK_FAILURE = 3

# Errors a user can fix from the message alone: one line, no traceback, exit status 2.
USER_ERRORS = (config.ConfigError, distributed.LayoutError, DatasetError, CheckpointError, NonFiniteLossError,
               storage_fs.StorageError, EngineUnavailable, hf.HFError)


def setup_logging(rank: int) -> None:
    """A rank prefix on every line; run-level INFO lines from rank 0 only."""
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING, force=True, stream=sys.stderr,
        format=f"[rank{rank}] %(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


def setup_storage(cfg: config.Config) -> None:
    """Resolve relative data/checkpoint URLs against storage.root, apply the S3 settings, and
    check every remote URL the run uses, so a dead endpoint or bad credentials stop it in
    seconds, before any process group or model exists."""
    root = cfg.storage.root
    cfg.data.url = storage_fs.resolve(cfg.data.url, root)
    for source in cfg.data.sources:
        source.url = storage_fs.resolve(source.url, root)
    cfg.checkpoint.url = storage_fs.resolve(cfg.checkpoint.url, root)
    if cfg.checkpoint.resume not in ("auto", "never"):
        cfg.checkpoint.resume = storage_fs.resolve(cfg.checkpoint.resume, root)
    storage_fs.configure(cfg.storage)
    for url in (cfg.data.url, *(source.url for source in cfg.data.sources), cfg.checkpoint.url):
        storage_fs.check_reachable(url)


def train(dcfg: DictConfig) -> tuple[Path, bool]:
    """Run one training job; returns its run directory and whether a stop request ended it."""
    world = distributed.World.from_env()
    setup_logging(world.rank)
    sweep_warnings = sweep.place_sweep_job(dcfg)
    cfg = config.to_object(dcfg)
    layout = cfg.cluster or distributed.local_layout(world)
    cluster = distributed.started_layout(layout, world)  # fewer nodes than the layout after a loss
    distributed.apply_env(cluster)  # before anything initialises CUDA (the checks may)
    for line in sweep_warnings:
        log.warning("%s", line)
    if cluster.nodes < layout.nodes and not cfg.trainer.global_batch_tokens:  # keep the layout's global batch
        cfg.trainer.global_batch_tokens = global_batch_tokens(cfg, startup_checks(cfg, layout).degrees.dp)
    startup = startup_checks(cfg, cluster)  # the same checks launch, launch.slurm and launch.plan make
    degrees, accum_steps = startup.degrees, startup.accum_steps
    if cfg.model.path:  # the architecture came from model.path's config.json: config.yaml records it
        dcfg.model = OmegaConf.structured(cfg.model)
    cfg.trainer.global_batch_tokens = global_batch_tokens(cfg, degrees.dp)
    device = distributed.check_device(cluster, world)
    setup_storage(cfg)
    run_dir = Path(cfg.run.dir).expanduser().resolve()
    # NCCL's flight recorder (the GPU layouts turn it on) dumps a timed-out collective's record here
    os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", f"{run_dir}/nccl_trace_rank_")
    distributed.init_process_group(cluster, world, timeout_s=cfg.trainer.collective_timeout_s)
    resolved = build.resolved_config(dcfg, cluster, degrees, world, cfg.trainer.global_batch_tokens)
    if world.rank == 0:
        build.write_run_files(run_dir, resolved)
    p = cfg.parallel
    dims = ("" if degrees.pp == 1 else f"pp {degrees.pp} x ") + f"dp {degrees.dp} x tp {degrees.tp}"
    log.info("run %s | cluster %s | world %d = %s | %s engine, %s | global batch %d tokens, "
             "accum %d | %s", cfg.run.name, cluster.name, world.world_size, dims, p.engine,
             f"ZeRO-{p.zero_stage}" if p.engine == "deepspeed" else p.data_parallel,
             cfg.trainer.global_batch_tokens, accum_steps, run_dir)

    mesh = distributed.build_mesh(device, degrees, timeout_s=cfg.trainer.collective_timeout_s)
    url = build.dataset_url(cfg, world)
    if cfg.model.path:  # the model's own tokenizer must have made the data
        hf.check_dataset(cfg.model, [read_index(u) for u in [s.url for s in cfg.data.sources] or [url]])
    data, held_out = build.build_data(cfg, url, degrees, mesh)
    engine = build.build_engine(cfg, mesh, device, accum_steps=accum_steps, world=world,
                                run_dir=run_dir)
    metrics = MetricsLogger(
        run_dir, enabled=world.rank == 0, device=device,
        flops_per_token=flops_per_token(cfg.model, cfg.data.seq_len),
        peak_flops_total=cluster.peak_flops_bf16 * world.world_size,
    )
    stop = StopRequest(run_dir, device, world.rank, timeout_s=cfg.trainer.collective_timeout_s)
    stop.install()
    trainer = Trainer(
        cfg=cfg, engine=engine, data=data,
        eval_data=held_out, checkpointer=build.build_checkpointer(cfg, world), metrics=metrics,
        device=device, accum_steps=accum_steps, checkpoint_meta=build.checkpoint_meta(cfg, data.index),
        stop=stop,
    )
    trainer.resume()
    run = trackers.RunInfo(
        run_id=trackers.run_id_of(run_dir), run_dir=run_dir, name=cfg.run.name, config=resolved,
        labels={"cluster": cluster.name, "model": cfg.model.name, "parallel": cfg.parallel.name},
        first_step=trainer.progress.step)
    # each node's /metrics (local rank 0); rank 0's is fed the metrics rows like a tracker
    exporter = prometheus.serve(cfg.monitor, world, run, heartbeat_interval_s=cfg.trainer.heartbeat_interval_s)
    # after resuming: a tracker continues the run it began at step 0 (rank 0 opens them; a failure stops every rank)
    metrics.trackers = trackers.start_trackers(cfg.monitor, run, world.rank)
    if exporter is not None and world.rank == 0:
        metrics.trackers.append(exporter)
    try:
        trainer.fit()
    finally:
        metrics.close()
        if exporter is not None:
            exporter.close()
        stop.restore()
    return run_dir, trainer.stopped_by is not None


@hydra.main(version_base=None, config_path="../configs", config_name="config")
def main(dcfg: DictConfig) -> None:
    storage_fs.no_world_writable_files()
    try:
        run_dir, preempted = train(dcfg)
    except USER_ERRORS as exc:
        log.error("%s", exc)
        distributed.shutdown()
        sys.exit(2)
    except RankFailure as exc:
        # Another rank is frozen or gone: tearing the process group down would wait for it.
        log.error("%s", exc)
        logging.shutdown()
        os._exit(EXIT_RANK_FAILURE)
    distributed.shutdown()
    if distributed.World.from_env().rank == 0:
        print(f"run_dir: {run_dir}", flush=True)
    if preempted:
        sys.exit(EXIT_PREEMPTED)  # checkpointed: the launcher or Slurm restarts / requeues it


config.register()

if __name__ == "__main__":
    main()
