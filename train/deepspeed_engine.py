"""DeepSpeed ZeRO as the second engine: the same model, loop, schedule and storage.

Imported only when `parallel.engine=deepspeed` (parallel=zero1, zero2, zero3), and `deepspeed`
itself only inside `DeepSpeedEngine.create`, so a native run never pays for it and a machine
without it is told which extra to install.

- The DeepSpeed config is generated from the run's config (`deepspeed_config`): micro-batch,
  accumulation, clipping, bf16 or fp32, AdamW with the native engine's betas, eps and
  weight-decay groups, the ZeRO stage and offload. `parallel.deepspeed_extra` is merged last,
  so its keys win, except the few the harness owns (batch sizes, the schedule), which it
  refuses. Rank 0 writes the result to `<run dir>/ds_config.json`.
- The learning rate stays the harness's pure function of the step: no DeepSpeed scheduler,
  the optimizer's param groups are set every step, as the native engine does.
- Checkpoints are DeepSpeed's own format (`save_checkpoint`), written by every rank into a
  node-local staging directory, uploaded through fsspec to `checkpoint.url/step-NNNNNNNN/`,
  checked by size on rank 0 and only then committed with the same COMMITTED marker, `latest`
  hint and pruning as native checkpoints. Resume downloads the latest committed one to each
  node's staging directory and loads it there.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful

from storage.checkpoint import (COMMITTED, Checkpointer, CheckpointError, CheckpointInfo, restore_rng_state,
                                rng_file, rng_state_bytes)
from storage.fs import retrying, url_to_fs
from storage.secrets import redacted
from train.config import Config
from train.distributed import World
from train.engine import DEEPSPEED, Engine, EngineUnavailable
from train.optim import param_groups
from train.precision import resolve_mixed_precision

log = logging.getLogger(__name__)

# Keys of the DeepSpeed config the harness derives and the data pipeline and schedule rely on;
# `parallel.deepspeed_extra` may not set them (what to set instead is in the message).
OWNED_KEYS = {
    "train_batch_size": "trainer.global_batch_tokens",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_tokens / trainer.micro_batch_size",
    "scheduler": "optim.warmup_steps, optim.decay_steps and optim.min_lr_ratio (the harness's schedule)",
}
def deepspeed_config(cfg: Config, accum_steps: int, dp: int, device: torch.device) -> dict[str, Any]:
    """The DeepSpeed config of this run, from the Hydra config alone (never written by hand).

    AdamW is DeepSpeed's own config entry, built over the harness's parameter groups (passed
    to `deepspeed.initialize`), so decay skips norms as in the native engine. `torch_adam`
    picks torch.optim.AdamW, the native engine's optimizer: it runs anywhere (DeepSpeed's
    FusedAdam needs CUDA and a kernel build); with offload, DeepSpeed's CPU Adam is used
    instead, as DeepSpeed requires. `lr` here is only the initial value: the loop sets it
    from train/optim.py every step.
    """
    p, o, t = cfg.parallel, cfg.optim, cfg.trainer
    zero: dict[str, Any] = {"stage": p.zero_stage}
    pin = device.type == "cuda"  # pinned host buffers speed up copies to and from a GPU
    if p.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": pin}
    if p.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": pin}
    base = {
        "train_batch_size": t.micro_batch_size * accum_steps * dp,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum_steps,
        "gradient_clipping": o.grad_clip_norm,
        "bf16": {"enabled": resolve_mixed_precision(p, device) == "bf16"},
        "optimizer": {"type": "AdamW", "params": {
            "lr": o.lr, "betas": [o.beta1, o.beta2], "eps": o.eps, "weight_decay": o.weight_decay,
            "torch_adam": not p.offload_optimizer}},
        "zero_optimization": zero,
        "steps_per_print": 2**31 - 1,  # the harness logs steps itself
        "wall_clock_breakdown": False,
    }
    check_extra(p.deepspeed_extra)
    return merge(base, dict(p.deepspeed_extra))


def check_extra(extra: dict[str, Any]) -> None:
    """Refuse extra DeepSpeed keys that would contradict the data pipeline or the schedule."""
    for key, instead in OWNED_KEYS.items():
        if key in extra:
            raise ValueError(f"parallel.deepspeed_extra.{key} cannot be set: the harness derives it "
                             f"from its own config; set {instead} instead")


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """`base` with `extra` merged in recursively: dicts merge key by key, anything else in
    `extra` replaces what `base` had."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _all_gather(value: Any) -> list[Any]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [value]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, value)
    return gathered


def _broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import; a CPU layout on a machine with GPUs must
        # still get the CPU one. The user's own setting wins.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as exc:
        raise EngineUnavailable(
            f"parallel.engine=deepspeed needs the deepspeed package ({exc.name or exc}): "
            f"pip install -e '.[deepspeed]', or choose a native preset (parallel=ddp or fsdp)"
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines have no rank prefix
    return deepspeed


class DeepSpeedEngine(Engine):
    """A `deepspeed.DeepSpeedEngine` behind the loop's interface.

    Gradient accumulation is DeepSpeed's own (its micro-step counter decides when gradients
    are reduced and the optimizer steps); the loop already divides each micro-batch's loss,
    so `backward` passes scale_wrt_gas=False. Clipping happens inside DeepSpeed's step.
    """

    name = DEEPSPEED

    def __init__(self, ds_engine: Any, cfg: Config, world: World, staging_dir: Path) -> None:
        self.ds = ds_engine
        self.model = ds_engine  # a Module: forward, train() and eval() reach the wrapped model
        self.cfg, self.world, self.staging_dir = cfg, world, staging_dir
        self._sync = True

    @classmethod
    def create(cls, cfg: Config, model: nn.Module, *, accum_steps: int, dp: int, device: torch.device,
               world: World, run_dir: Path) -> DeepSpeedEngine:
        """`deepspeed.initialize` over `model` (the native engine's model class, built whole
        from trainer.seed; DeepSpeed broadcasts rank 0's weights and shards them)."""
        config = deepspeed_config(cfg, accum_steps, dp, device)
        deepspeed = _import_deepspeed(device)
        if world.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "ds_config.json").write_text(json.dumps(redacted(config), indent=1) + "\n")
        ds_engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim), config=config,
            dist_init_required=False)  # train.distributed started the process group
        return cls(ds_engine, cfg, world, staging_root(cfg))

    # -- the step ------------------------------------------------------------------------
    def accumulate(self, sync: bool):
        self._sync = sync
        return super().accumulate(sync)

    def backward(self, loss: torch.Tensor) -> None:
        if self.ds.is_gradient_accumulation_boundary() != self._sync:
            raise RuntimeError(
                f"DeepSpeed's accumulation boundary disagrees with the loop (micro-step "
                f"{self.ds.micro_steps}, gradient_accumulation_steps="
                f"{self.ds.gradient_accumulation_steps()}): the loop's micro-batches per step must "
                f"equal the generated config's gradient_accumulation_steps")
        self.ds.backward(loss, scale_wrt_gas=False)
        if not self._sync:
            self.ds.step()  # between boundaries only advances DeepSpeed's micro-step counter

    def step(self, skip_nonfinite: bool = False) -> float:
        # DeepSpeed steps its optimizer inside ds.step(): skipping is refused at start-up
        # (train.trainer.check_trainer), so it is never asked for here.
        self.ds.step()  # at the boundary: reduce, clip, optimizer step, zero gradients
        norm = self.ds.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.ds.optimizer.param_groups[0]["lr"]

    # -- checkpoints ---------------------------------------------------------------------
    def save(self, checkpointer: Checkpointer, step: int, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        """DeepSpeed's checkpoint into this rank's staging directory, uploaded, then committed.

        Each rank stages into a directory of its own, so what it uploads is exactly the files
        it wrote (rank 0 the model states, every rank its optimizer shard and RNG state);
        rank 0 then checks every rank's files at their full size under the URL before the
        COMMITTED marker makes the checkpoint count.
        """
        started = time.perf_counter()
        tag = f"step-{step:08d}"
        staging = self.staging_dir / f"save-rank-{self.world.rank:05d}"
        shutil.rmtree(staging, ignore_errors=True)
        url = checkpointer.begin(step)
        client_state = {name: obj.state_dict() for name, obj in extra.items()}
        self.ds.save_checkpoint(str(staging), tag=tag, client_state=client_state, save_latest=False)
        # From here on a failure on one rank must reach all of them (or they would wait in the
        # next collective forever): each rank's outcome is gathered, the commit's broadcast.
        try:
            rng = staging / tag / rng_file(self.world.rank)
            rng.parent.mkdir(parents=True, exist_ok=True)
            rng.write_bytes(rng_state_bytes())
            outcome: dict[str, int] | str = _upload(staging / tag, url)
        except Exception as exc:  # noqa: BLE001 - reported by every rank below
            outcome = f"rank {self.world.rank}: {type(exc).__name__}: {exc}"
        shutil.rmtree(staging, ignore_errors=True)
        outcomes = _all_gather(outcome)
        problem = "; ".join(o for o in outcomes if isinstance(o, str)) or None
        if self.world.rank == 0 and problem is None:
            try:
                _verify_uploaded(url, {name: size for files in outcomes for name, size in files.items()})
                checkpointer.commit(step, meta)
            except Exception as exc:  # noqa: BLE001 - reported by every rank below
                problem = str(exc)
        problem = _broadcast(problem)
        _remove_if_empty(self.staging_dir)
        if problem:
            raise CheckpointError(f"checkpoint {url} is not committed: {problem}")
        log.info("checkpoint step %d (DeepSpeed ZeRO-%d) committed at %s in %.1f s", step,
                 self.cfg.parallel.zero_stage, url, time.perf_counter() - started)

    def load(self, checkpointer: Checkpointer, info: CheckpointInfo, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        """Download `info` once per node, load it with DeepSpeed, restore `extra` and the RNG.

        DeepSpeed's checkpoint is partitioned by rank (ZeRO-1/2 ranks read every optimizer
        shard to find their own), so each node fetches the whole checkpoint and the world
        size must be the one that wrote it.
        """
        _check_meta(info, meta, self.world.world_size, self.cfg.parallel.name)
        tag = info.url.rstrip("/").rsplit("/", 1)[-1]
        node = self.world.rank // max(1, self.world.local_world_size)
        local = self.staging_dir / f"load-node-{node:04d}"
        if self.world.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
            _download(info.url, local / tag)
        _barrier()
        try:
            path, client_state = self.ds.load_checkpoint(
                str(local), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=False)
        except Exception as exc:  # keep DeepSpeed's text, name the checkpoint
            raise CheckpointError(f"cannot load DeepSpeed checkpoint {info.url}: {exc}") from exc
        if path is None:
            raise CheckpointError(f"cannot load DeepSpeed checkpoint {info.url}: DeepSpeed found "
                                  f"no checkpoint files in it")
        for name, obj in extra.items():
            obj.load_state_dict(client_state[name])
        restore_rng_state((local / tag / rng_file(self.world.rank)).read_bytes())
        _barrier()
        if self.world.local_rank == 0:
            shutil.rmtree(local, ignore_errors=True)
            _remove_if_empty(self.staging_dir)
        log.info("resumed from %s (step %d, DeepSpeed ZeRO-%s, written by %s ranks)", info.url,
                 info.step, info.meta.get("zero_stage"), info.meta.get("world_size", "?"))


def staging_root(cfg: Config) -> Path:
    """This run's node-local staging directory: one per checkpoint URL, so two runs on one
    node never share files."""
    base = cfg.parallel.deepspeed_staging_dir or os.path.join(tempfile.gettempdir(), "train-harness-deepspeed")
    run = hashlib.sha1(cfg.checkpoint.url.encode()).hexdigest()[:12]
    return Path(base).expanduser() / run


def _remove_if_empty(path: Path) -> None:
    """Leave no empty staging directory behind (another rank of the node may be first)."""
    try:
        path.rmdir()
    except OSError:
        pass


def _check_meta(info: CheckpointInfo, meta: dict[str, Any], world_size: int, parallel_name: str) -> None:
    """The native Checkpointer's shape check, plus what DeepSpeed's format ties to the writer:
    the ZeRO stage and the number of ranks."""
    for key, expected in meta.items():
        saved = info.meta.get(key)
        if saved is not None and saved != expected:
            hint = f"resume with parallel=zero{saved}" if key == "zero_stage" else f"resume with the same {key}"
            raise CheckpointError(
                f"checkpoint {info.url} was written for {key}={saved}, but this run has "
                f"{key}={expected} (parallel={parallel_name}); start a new checkpoint.url, or {hint}")
    written_by = info.meta.get("world_size")
    if written_by != world_size:
        raise CheckpointError(
            f"checkpoint {info.url} was written by {written_by} DeepSpeed ranks, this run has "
            f"{world_size}: DeepSpeed's checkpoint is partitioned by rank; resume on {written_by} "
            f"ranks (or convert it with DeepSpeed's ds_to_universal and load it yourself)")


def _upload(local_dir: Path, url: str) -> dict[str, int]:
    """Put every file under `local_dir` at the same relative path under `url`; return
    {relative path: size}. Each file is retried on transient errors (storage.max_retries)."""
    fs, root = url_to_fs(url)
    written = {}
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        target = f"{root.rstrip('/')}/{rel}"
        fs.makedirs(target.rsplit("/", 1)[0], exist_ok=True)  # local targets; a no-op on S3
        retrying(lambda: fs.put_file(str(file), target), what=f"upload {url}/{rel}")
        written[rel] = file.stat().st_size
    return written


def _verify_uploaded(url: str, expected: dict[str, int]) -> None:
    """Refuse to commit unless every file of every rank is under `url` at its full size."""
    fs, root = url_to_fs(url)
    fs.invalidate_cache(root)
    prefix = root.rstrip("/") + "/"
    sizes = {info["name"].removeprefix(prefix): info["size"]
             for info in fs.find(root, detail=True).values()}
    bad = [f"{name} ({sizes.get(name, 'missing')} of {size} bytes)"
           for name, size in sorted(expected.items()) if sizes.get(name) != size]
    if bad:
        raise CheckpointError(f"not every file arrived whole: {', '.join(bad[:5])}")


def _download(url: str, local_dir: Path) -> None:
    """Every file under `url` (but the COMMITTED marker) to the same path under `local_dir`."""
    fs, root = url_to_fs(url)
    prefix = root.rstrip("/") + "/"
    for remote in sorted(fs.find(root)):
        rel = remote.removeprefix(prefix)
        if rel == COMMITTED:
            continue
        target = local_dir / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        retrying(lambda: fs.get_file(remote, str(target)), what=f"download {url}/{rel}")
