"""Build what the training loop needs from the config: engine (model and optimizer), data,
checkpointer.

Every builder takes the typed config and returns an object the loop uses through a small
interface; nothing here trains.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torch import nn
from torch.distributed.device_mesh import DeviceMesh

from storage.builtin import ensure_builtin_dataset
from storage.cache import cache_from_config
from storage.checkpoint import Checkpointer
from storage.secrets import redacted
from storage.dataset import BatchStream, check_vocab, eval_batches
from storage.mixture import Source
from storage.shards import DatasetError, DatasetIndex, read_index
from train import hf, pipeline, stages
from train.config import ClusterConfig, Config, RopeScaling
from train.distributed import Degrees, World
from train.engine import DEEPSPEED, Engine, NativeEngine
from train.model import Transformer, num_params
from train.optim import build_optimizer
from train.parallelize import apply_ac, parallelize
from train.trainer import resume_target

log = logging.getLogger(__name__)

# Below this many parameters every rank builds the whole model from the seed before sharding
# it, so the initial weights are the same whatever the layout (the equivalence tests rely on
# it). Above it, weights are materialised already sharded.
FULL_INIT_MAX_PARAMS = 2_000_000_000


def resolved_config(dcfg: DictConfig, cluster: ClusterConfig, degrees: Degrees, world: World,
                    global_batch_tokens: int) -> dict[str, Any]:
    """The config as the run uses it: with the layout, degrees and global batch actually used,
    secrets redacted (what config.yaml and the experiment trackers record)."""
    resolved = OmegaConf.to_container(dcfg, resolve=True)
    resolved["cluster"] = dataclasses.asdict(cluster)
    resolved["parallel"]["dp"], resolved["parallel"]["tp"] = degrees.dp, degrees.tp
    resolved["trainer"]["global_batch_tokens"] = global_batch_tokens
    resolved["world_size"] = world.world_size
    if resolved["parallel"].get("deepspeed_extra"):
        resolved["parallel"]["deepspeed_extra"] = redacted(resolved["parallel"]["deepspeed_extra"])
    return resolved


def write_run_files(run_dir: Path, resolved: dict[str, Any]) -> None:
    """Rank 0: the resolved config (`resolved_config`) as config.yaml in the run directory."""
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))


def dataset_url(cfg: Config, world: World) -> str:
    """The dataset the run reads: `data.url`, or the builtin corpus built once per node ("" when
    data.sources names the datasets instead)."""
    if cfg.data.url or cfg.data.sources:
        return cfg.data.url
    cache_dir = str(Path(cfg.data.cache_dir).expanduser())
    # Local rank 0 builds, the others wait and then find it done: one build per node.
    if world.local_rank == 0:
        url = ensure_builtin_dataset(cfg.data.builtin, cache_dir, cfg.data.builtin_max_bytes)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
    if world.local_rank != 0:
        url = ensure_builtin_dataset(cfg.data.builtin, cache_dir, cfg.data.builtin_max_bytes)
    return url


def build_data(cfg: Config, url: str, degrees: Degrees, mesh: DeviceMesh) -> tuple[BatchStream, list]:
    """This rank's training stream and its fixed held-out batches.

    The data is `url` (data.url or the builtin corpus) as one source named data.name, or the
    datasets of data.sources mixed by weight. Ranks of one tensor-parallel group see the same
    data, so the data-parallel coordinate of this rank, not its global rank, picks its slice.
    With storage.cache_dir set, remote shards are read through the node cache that every rank
    and worker on this node shares.
    """
    d, t, s = cfg.data, cfg.trainer, cfg.storage
    if d.sources:  # resolved against storage.root and checked at start-up (train.run.setup_storage)
        sources = [Source(src.name, read_index(src.url), src.weight, src.max_epochs) for src in d.sources]
    else:
        sources = [Source(d.name, read_index(url))]  # read once: the stream and the held-out batches share it
    for source in sources:
        check_vocab(source.dataset, cfg.model.vocab_size)
    dp_rank = mesh["dp"].get_local_rank()
    cache = cache_from_config(s)
    block = d.shuffle_block_shards if d.shuffle else 1  # a block of one shard: the order before blocks
    global_batch_samples = t.global_batch_tokens // d.seq_len
    stream = BatchStream(
        sources, split="train", seq_len=d.seq_len, seed=t.seed,
        global_batch_samples=global_batch_samples, micro_batch_size=t.micro_batch_size, dp_rank=dp_rank,
        dp_size=degrees.dp, num_workers=d.num_workers, block_shards=block, cache=cache,
        prefetch_shards=s.prefetch_shards, fetch_workers=s.fetch_workers, on_corrupt_shard=s.on_corrupt_shard,
    )
    end = stream.end_position
    if end is not None and t.max_steps * global_batch_samples > end:
        raise DatasetError(
            f"every source of data.sources is capped by max_epochs ({stream.order.describe_caps()}): together "
            f"they hold {end} samples, {end // global_batch_samples} steps of {global_batch_samples}, and "
            f"trainer.max_steps is {t.max_steps}; lower trainer.max_steps or raise (or remove, 0) a max_epochs")
    held_out = eval_batches(sources, d.seq_len, t.micro_batch_size, dp_rank, degrees.dp, t.eval_batches,
                            cache=cache, on_corrupt_shard=s.on_corrupt_shard, block_shards=block)
    return stream, held_out


def _seeded_model(cfg: Config, device: torch.device) -> Transformer:
    """The whole model on `device`, its weights drawn from trainer.seed: the same on every
    rank and for every engine and layout."""
    torch.manual_seed(cfg.trainer.seed)
    with torch.device(device):
        model = Transformer(cfg.model)
    model.init_weights()
    return model


def _whole_model(cfg: Config, device: torch.device) -> Transformer:
    """The whole model on `device`: `_seeded_model`, with model.path's weights copied in when the
    run starts from them (`starts_from_pretrained`). (Inside DeepSpeed's `partitioned_build` the
    same draws and copies land in ZeRO-3 partitions, and no rank holds the whole model.)"""
    model = _seeded_model(cfg, device)
    if starts_from_pretrained(cfg):
        hf.load_weights(model, cfg.model)
    return model


def starts_from_pretrained(cfg: Config) -> bool:
    """True when the run starts from model.path's weights: model.path is set and there is no
    checkpoint to resume (checkpoint.resume=never, or auto with none committed under
    checkpoint.url). A resume loads its own weights, so model.path's are not read."""
    if not cfg.model.path:
        return False
    rank, world_size = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    checkpointer = Checkpointer(cfg.checkpoint.url, keep_last=0, rank=rank, world_size=world_size)
    resume = resume_target(checkpointer, cfg.checkpoint.resume)
    if resume is not None:
        log.info("model.path %s is not read: the run resumes from %s", cfg.model.path, resume.url)
    return resume is None


def _pretrained_model(cfg: Config, mesh: DeviceMesh, device: torch.device) -> list[nn.Module]:
    """The model with model.path's weights: built on the meta device, cut into this rank's pipeline
    stages (the whole model without a pipeline), parallelized, then materialised empty, and every
    rank copies in the slices of the safetensors files it holds (`hf.load_weights`), so none holds
    the whole model unless its layout does. DDP, which keeps every weight on every rank and
    broadcasts them as it wraps, loads them whole first."""
    with torch.device("meta"):
        model = Transformer(cfg.model)
    built = []
    for part in pipeline.parts(model, cfg.parallel, mesh["pp"].get_local_rank()):
        if cfg.parallel.data_parallel == "ddp" and mesh["dp"].size() > 1:
            hf.materialise(part, device)
            hf.load_weights(part, cfg.model)
            built.append(parallelize(part, mesh, cfg.parallel, device))
            continue
        part = parallelize(part, mesh, cfg.parallel, device)
        hf.materialise(part, device)
        hf.load_weights(part, cfg.model)
        built.append(part)
    return built


def build_model(cfg: Config, mesh: DeviceMesh, device: torch.device) -> list[nn.Module]:
    """The model, initialised from trainer.seed (or from model.path) and parallelized over the mesh:
    [the whole model], or with a pipeline (parallel.pp > 1) the stages this rank runs, in order
    (`train.pipeline.parts`), each parallelized over dp and tp as a whole model is.

    Small models (and DDP, where every rank holds all weights anyway) are built whole on the
    device, then cut into stages and sharded, so the initial weights do not depend on the layout,
    pipeline included. Large sharded models are built on the meta device, cut, sharded, and only
    then materialised, so no rank ever holds the whole model. Weights from model.path are always
    read that way (`_pretrained_model`).
    """
    if starts_from_pretrained(cfg):
        return _pretrained_model(cfg, mesh, device)
    torch.manual_seed(cfg.trainer.seed)
    total = num_params(cfg.model)
    whole = total <= FULL_INIT_MAX_PARAMS or cfg.parallel.data_parallel == "ddp"
    pp_rank = mesh["pp"].get_local_rank()
    if whole:
        parts = [parallelize(part, mesh, cfg.parallel, device)
                 for part in pipeline.parts(_seeded_model(cfg, device), cfg.parallel, pp_rank)]
    else:
        with torch.device("meta"):
            model = Transformer(cfg.model)
        parts = [parallelize(part, mesh, cfg.parallel, device)
                 for part in pipeline.parts(model, cfg.parallel, pp_rank)]
        for part in parts:
            part.to_empty(device=device)
            with torch.no_grad():
                part.init_weights()
    log.info("model %s: %.1fM parameters, %s%s", cfg.model.name, total / 1e6,
             "initialised whole, then parallelized" if whole else "materialised sharded",
             f"; pipeline {stages.describe(cfg.model, cfg.parallel)}" if cfg.parallel.pp > 1 else "")
    return parts


def build_engine(cfg: Config, mesh: DeviceMesh, device: torch.device, *, accum_steps: int,
                 world: World, run_dir: Path) -> Engine:
    """The engine `parallel.engine` names, over the model built from trainer.seed.

    DeepSpeed gets the native engine's model with the same initial weights (`deepspeed_model`)
    and the DeepSpeed config generated from the run's; `deepspeed.initialize` shards the rest.
    """
    if cfg.parallel.engine != DEEPSPEED:
        parts = build_model(cfg, mesh, device)
        if cfg.parallel.pp > 1:
            return pipeline.PipelineEngine(parts, cfg, mesh, device, accum_steps)
        return NativeEngine(parts[0], build_optimizer(parts[0], cfg.optim), cfg.parallel, device,
                            cfg.optim.grad_clip_norm)
    from train.deepspeed_engine import DeepSpeedEngine, deepspeed_config  # deepspeed is optional

    config = deepspeed_config(cfg, accum_steps, mesh["dp"].size(), device)
    model = deepspeed_model(cfg, device, config)
    log.info("model %s: %.1fM parameters, DeepSpeed ZeRO-%d%s", cfg.model.name,
             num_params(cfg.model) / 1e6, cfg.parallel.zero_stage,
             ", built partitioned (zero.Init)" if config["zero_optimization"]["stage"] == 3 else "")
    return DeepSpeedEngine.create(cfg, model, config, device=device, world=world, run_dir=run_dir)


def deepspeed_model(cfg: Config, device: torch.device, ds_config: dict[str, Any]) -> nn.Module:
    """The DeepSpeed engine's model: the native engine's, with the same initial weights, and
    activation checkpointing applied if asked.

    ZeRO-1/2 keep every parameter on every rank, so it is built whole. ZeRO-3 builds it inside
    `partitioned_build` (DeepSpeed's zero.Init): each parameter is partitioned over the ranks as
    its module is built, so a rank holds its shards and at most one whole parameter at a time,
    never the whole model.
    """
    from train.deepspeed_engine import partitioned_build

    with partitioned_build(ds_config, device):
        model = _whole_model(cfg, device)
    if cfg.parallel.activation_checkpointing != "none":
        apply_ac(model, str(cfg.parallel.activation_checkpointing))
    return model


def build_checkpointer(cfg: Config, world: World) -> Checkpointer:
    return Checkpointer(cfg.checkpoint.url, keep_last=cfg.checkpoint.keep_last,
                        rank=world.rank, world_size=world.world_size,
                        async_save=cfg.checkpoint.async_save,
                        collective_timeout_s=cfg.trainer.collective_timeout_s)


def checkpoint_meta(cfg: Config, index: DatasetIndex | None = None) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this run: the model's shape, the
    tokenizer its data was made with (the same token ids must mean the same text), and the
    engine whose format it is in (with DeepSpeed, also the ZeRO stage, which fixes how its
    files are partitioned)."""
    shape = dataclasses.asdict(cfg.model)
    shape.pop("name")
    shape.pop("path")  # where the step-0 weights came from: the same model may be read from elsewhere
    if shape["rope_scaling"] == RopeScaling.none:  # as checkpoints from before RoPE scaling record it
        for key in [k for k in shape if k.startswith("rope_") and k != "rope_theta"]:
            shape.pop(key)
    meta: dict[str, Any] = {"model": shape}
    if index is not None:
        meta["tokenizer"] = {"name": index.tokenizer.name, "fingerprint": index.tokenizer.fingerprint}
    if cfg.parallel.engine == DEEPSPEED:
        return {**meta, "engine": DEEPSPEED, "zero_stage": cfg.parallel.zero_stage}
    return {**meta, "engine": cfg.parallel.engine}
