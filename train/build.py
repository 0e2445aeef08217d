"""Build what the training loop needs from the config: model, optimizer, data, checkpointer.

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
from storage.dataset import BatchStream, check_vocab, eval_batches
from storage.shards import read_index
from train.config import ClusterConfig, Config
from train.distributed import Degrees, World
from train.model import Transformer, num_params
from train.parallelize import parallelize

log = logging.getLogger(__name__)

# Below this many parameters every rank builds the whole model from the seed before sharding
# it, so the initial weights are the same whatever the layout (the equivalence tests rely on
# it). Above it, weights are materialised already sharded.
FULL_INIT_MAX_PARAMS = 2_000_000_000


def write_run_files(run_dir: Path, dcfg: DictConfig, cluster: ClusterConfig,
                    degrees: Degrees, world: World) -> None:
    """Rank 0: the resolved config (with the layout actually used) and the command line."""
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(dcfg, resolve=True)
    resolved["cluster"] = dataclasses.asdict(cluster)
    resolved["parallel"]["dp"], resolved["parallel"]["tp"] = degrees.dp, degrees.tp
    resolved["world_size"] = world.world_size
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))


def dataset_url(cfg: Config, world: World) -> str:
    """The dataset the run reads: `data.url`, or the builtin corpus built once per node."""
    if cfg.data.url:
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

    Ranks of one tensor-parallel group see the same data, so the data-parallel coordinate of
    this rank, not its global rank, picks its slice. With storage.cache_dir set, remote shards
    are read through the node cache that every rank and worker on this node shares.
    """
    index = read_index(url)  # once: the stream and the held-out batches share it
    check_vocab(index, cfg.model.vocab_size)
    dp_rank = mesh["dp"].get_local_rank()
    t, s = cfg.trainer, cfg.storage
    cache = cache_from_config(s)
    stream = BatchStream(
        index, split="train", seq_len=cfg.data.seq_len, seed=t.seed,
        global_batch_samples=t.global_batch_tokens // cfg.data.seq_len,
        micro_batch_size=t.micro_batch_size, dp_rank=dp_rank, dp_size=degrees.dp,
        num_workers=cfg.data.num_workers, cache=cache, prefetch_shards=s.prefetch_shards,
        fetch_workers=s.fetch_workers, on_corrupt_shard=s.on_corrupt_shard,
    )
    held_out = eval_batches(index, cfg.data.seq_len, t.micro_batch_size, dp_rank, degrees.dp,
                            t.eval_batches, cache=cache, on_corrupt_shard=s.on_corrupt_shard)
    return stream, held_out


def build_model(cfg: Config, mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """The model, initialised from trainer.seed and parallelized over the mesh.

    Small models (and DDP, where every rank holds all weights anyway) are built whole on the
    device and then sharded, so the initial weights do not depend on the layout. Large sharded
    models are built on the meta device, sharded, and only then materialised, so no rank ever
    holds the whole model.
    """
    torch.manual_seed(cfg.trainer.seed)
    total = num_params(cfg.model)
    whole = total <= FULL_INIT_MAX_PARAMS or cfg.parallel.data_parallel == "ddp"
    if whole:
        with torch.device(device):
            model = Transformer(cfg.model)
        model.init_weights()
        model = parallelize(model, mesh, cfg.parallel, device)
    else:
        with torch.device("meta"):
            model = Transformer(cfg.model)
        model = parallelize(model, mesh, cfg.parallel, device)
        model.to_empty(device=device)
        with torch.no_grad():
            model.init_weights()
    log.info("model %s: %.1fM parameters, %s", cfg.model.name, total / 1e6,
             "initialised whole, then parallelized" if whole else "materialised sharded")
    return model


def build_checkpointer(cfg: Config, world: World) -> Checkpointer:
    return Checkpointer(cfg.checkpoint.url, keep_last=cfg.checkpoint.keep_last,
                        rank=world.rank, world_size=world.world_size)


def checkpoint_meta(cfg: Config) -> dict[str, Any]:
    """What a checkpoint must match to be loaded into this run: the model's shape."""
    shape = dataclasses.asdict(cfg.model)
    shape.pop("name")
    return {"model": shape}
