"""DeepSpeed ZeRO as the second engine: the same model, loop, schedule and storage.

Imported only when `parallel.engine=deepspeed` (parallel=zero1, zero2, zero3), and `deepspeed`
itself only inside the functions that need it, so a native run never pays for it and a machine
without it is told which extra to install.

- The DeepSpeed config is generated from the run's config (`deepspeed_config`): micro-batch,
  accumulation, clipping, bf16 or fp32, AdamW with the native engine's betas, eps and
  weight-decay groups, the ZeRO stage and offload. `parallel.deepspeed_extra` is merged last,
  so its keys win, except the few the harness owns (batch sizes, the schedule), which it
  refuses. Rank 0 writes the result to `<run dir>/ds_config.json`.
- The model is the native engine's, with the same initial weights. Under ZeRO-3 it is built
  inside `partitioned_build` (DeepSpeed's zero.Init), so no rank ever holds the whole model.
- The learning rate stays the harness's pure function of the step: no DeepSpeed scheduler,
  the optimizer's param groups are set every step, as the native engine does.
- Checkpoints are DeepSpeed's own format (`save_checkpoint`), written by every rank into a
  node-local staging directory; `storage.engine_files` uploads, checks and commits them like
  native checkpoints (COMMITTED marker, `latest`, pruning), and on resume downloads the latest
  committed one to each node for `load_checkpoint`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.checkpoint.stateful import Stateful
from torch.overrides import TorchFunctionMode

from storage.checkpoint import Checkpointer, CheckpointError, CheckpointInfo
from storage.engine_files import EngineFiles
from storage.secrets import redacted
from train.config import Config
from train.distributed import World
from train.engine import DEEPSPEED, Engine, EngineUnavailable
from train.optim import param_groups
from train.precision import resolve_mixed_precision

log = logging.getLogger(__name__)

# Keys of the DeepSpeed config the harness derives and the data pipeline and schedule rely on;
# `parallel.deepspeed_extra` may not set them (what to set instead is in the message). The batch
# keys follow from trainer.global_batch_tokens, tokens per optimizer step (0 = one micro-batch
# per rank: trainer.micro_batch_size x data.seq_len x data-parallel size; train/batch.py).
OWNED_KEYS = {
    "train_batch_size": "trainer.global_batch_tokens (tokens per optimizer step)",
    "train_micro_batch_size_per_gpu": "trainer.micro_batch_size",
    "gradient_accumulation_steps": "trainer.global_batch_tokens or trainer.micro_batch_size (micro-batches "
                                   "per step = global_batch_tokens / (micro_batch_size x data.seq_len x "
                                   "data-parallel size))",
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

    Under bf16, gradients accumulate over micro-batches and are reduced in fp32
    (`data_types.grad_accum_dtype`, `communication_data_type`), as the native engine does
    (FSDP2's reduce_dtype, DDP's fp32 gradients); DeepSpeed's default is bf16 for both. ZeRO-2
    reduce-scatters every micro-batch's gradients: `overlap_comm` runs those on their own stream
    behind the backward pass instead of after it (ZeRO-3 has it on by default).
    """
    p, o, t = cfg.parallel, cfg.optim, cfg.trainer
    bf16 = resolve_mixed_precision(p, device) == "bf16"
    zero: dict[str, Any] = {"stage": p.zero_stage}
    if p.zero_stage == 2:
        zero["overlap_comm"] = True
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
        "bf16": {"enabled": bf16},
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"} if bf16 else {}),
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


def _import_deepspeed(device: torch.device):
    if device.type == "cpu":
        # DeepSpeed picks its accelerator at import; a CPU layout on a machine with GPUs must
        # still get the CPU one. The user's own setting wins.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    # DeepSpeed reads the local rank from LOCAL_RANK, which every launcher sets; a process
    # started without a launcher is local rank 0, as train.distributed reads it too.
    os.environ.setdefault("LOCAL_RANK", "0")
    try:
        import deepspeed
    except ImportError as exc:
        raise EngineUnavailable(
            f"parallel.engine=deepspeed needs the deepspeed package ({exc.name or exc}): "
            f"pip install -e '.[deepspeed]', or choose a native preset (parallel=ddp or fsdp)"
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)  # its INFO lines have no rank prefix
    return deepspeed


@contextlib.contextmanager
def partitioned_build(config: dict[str, Any], device: torch.device) -> Iterator[None]:
    """Around building the model: under ZeRO-3, DeepSpeed's zero.Init, so no rank ever holds the
    whole model; other stages keep every parameter on every rank anyway, and get nothing.

    zero.Init partitions a module's parameters over the ranks as soon as the module's own
    `__init__` returns: a Linear's default init runs on the whole tensor, then each rank keeps
    its shard. The model's `init_weights` runs later, when its children are already
    partitioned, and would write into their empty tensors; `_GatherOnWrite` hands each such
    write its parameter whole for as long as the write takes. So every rank draws the native
    engine's values from the same RNG stream in the same order, and a rank's peak while
    building is its shards plus one whole parameter. In fp32 the weights are the native
    engine's for the same seed, bit for bit (tests/test_deepspeed.py checks them); with bf16,
    zero.Init creates the parameters in bf16, so the same draws are made in bf16.
    """
    if config["zero_optimization"]["stage"] != 3:
        yield
        return
    deepspeed = _import_deepspeed(device)
    from deepspeed.accelerator import get_accelerator

    # zero.Init sizes its partitions from deepspeed.comm, which wraps the process group that
    # train.distributed started (as deepspeed.initialize would, later).
    deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name(),
                               dist_init_required=False)
    with deepspeed.zero.Init(config_dict_or_path=config), _GatherOnWrite(deepspeed):
        yield


class _GatherOnWrite(TorchFunctionMode):
    """Runs every in-place op (normal_, fill_, copy_, ...) that touches a partitioned ZeRO-3
    parameter with that parameter gathered whole; rank 0's result is what every rank keeps."""

    def __init__(self, deepspeed: Any) -> None:
        super().__init__()
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self.deepspeed, self.partitioned = deepspeed, ZeroParamStatus.NOT_AVAILABLE

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        if name.endswith("_") and not name.endswith("__"):  # in place; not a dunder (__get__, __set__)
            params = [a for a in (*args, *kwargs.values())
                      if getattr(a, "ds_status", None) == self.partitioned]
            if params:
                with self.deepspeed.zero.GatheredParameters(params, modifier_rank=0):
                    return func(*args, **kwargs)
        return func(*args, **kwargs)


# What to do instead when a DeepSpeed checkpoint's marker disagrees with the run (see
# storage.checkpoint.check_meta): its files are partitioned by ZeRO stage and by rank.
LOAD_HINTS = {
    "zero_stage": "resume with parallel=zero{saved}",
    "world_size": "resume on {saved} ranks (DeepSpeed's checkpoint is partitioned by rank; its "
                  "ds_to_universal script converts one for another number of ranks)",
}


class DeepSpeedEngine(Engine):
    """A `deepspeed.DeepSpeedEngine` behind the loop's interface.

    Gradient accumulation is DeepSpeed's own (its micro-step counter decides when gradients
    are reduced and the optimizer steps); the loop already divides each micro-batch's loss,
    so `backward` passes scale_wrt_gas=False. Clipping happens inside DeepSpeed's step.
    """

    name = DEEPSPEED

    def __init__(self, ds_engine: Any, cfg: Config, world: World) -> None:
        self.ds = ds_engine
        self.model = ds_engine  # a Module: forward, train() and eval() reach the wrapped model
        self.cfg, self.world = cfg, world
        self._sync = True

    @classmethod
    def create(cls, cfg: Config, model: nn.Module, config: dict[str, Any], *, device: torch.device,
               world: World, run_dir: Path) -> DeepSpeedEngine:
        """`deepspeed.initialize` over `model` with `config` (`deepspeed_config`): the native
        engine's model from trainer.seed, whole on every rank (ZeRO-1/2; DeepSpeed then shards
        optimizer state and, at stage 2, gradients) or already partitioned (ZeRO-3, built in `partitioned_build`)."""
        deepspeed = _import_deepspeed(device)
        if world.rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "ds_config.json").write_text(json.dumps(redacted(config), indent=1) + "\n")
        ds_engine, _, _, _ = deepspeed.initialize(
            model=model, model_parameters=param_groups(model, cfg.optim), config=config,
            dist_init_required=False)  # train.distributed started the process group
        return cls(ds_engine, cfg, world)

    @property
    def forward_waits_for_peers(self) -> bool:
        return self.ds.zero_optimization_stage() == 3  # ZeRO-3 gathers parameters in the forward

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

    def step(self, loss_finite: torch.Tensor) -> torch.Tensor:
        # DeepSpeed steps its optimizer inside ds.step() and applies it whatever loss_finite
        # says: skipping is refused at start-up (train.checks.check_trainer). Its norm may be a
        # float or a device tensor (DeepSpeed reads it on the host itself, for clipping).
        self.ds.step()  # at the boundary: reduce, clip, optimizer step, zero gradients
        norm = self.ds.get_global_grad_norm()
        return torch.as_tensor(float("nan") if norm is None else norm, dtype=torch.float32,
                               device=loss_finite.device)

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    @property
    def lr(self) -> float:
        return self.ds.optimizer.param_groups[0]["lr"]

    # -- checkpoints ---------------------------------------------------------------------
    def _files(self, checkpointer: Checkpointer) -> EngineFiles:
        return EngineFiles(checkpointer, self.cfg.parallel.deepspeed_staging_dir,
                           local_rank=self.world.local_rank, local_world_size=self.world.local_world_size)

    def save(self, checkpointer: Checkpointer, step: int, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        """DeepSpeed's checkpoint files of this rank (rank 0 also the model states), with `extra`
        in them; storage uploads, checks and commits them."""
        started = time.perf_counter()
        client_state = {name: obj.state_dict() for name, obj in extra.items()}

        def write(directory: Path) -> None:  # DeepSpeed writes into <save_dir>/<tag>/
            self.ds.save_checkpoint(str(directory.parent), tag=directory.name, client_state=client_state,
                                    save_latest=False)

        url = self._files(checkpointer).save(step, write, meta)
        log.info("checkpoint step %d (DeepSpeed ZeRO-%d) committed at %s in %.1f s", step,
                 self.cfg.parallel.zero_stage, url, time.perf_counter() - started)

    def load(self, checkpointer: Checkpointer, info: CheckpointInfo, extra: dict[str, Stateful],
             meta: dict[str, Any]) -> None:
        """Load `info` with DeepSpeed from the copy storage downloads to this node; restore
        `extra`. DeepSpeed's checkpoint is partitioned by rank (ZeRO-1/2 ranks read every
        optimizer shard to find their own), so the world size must be the one that wrote it."""

        def read(directory: Path) -> None:
            try:
                path, client_state = self.ds.load_checkpoint(
                    str(directory.parent), tag=directory.name, load_optimizer_states=True,
                    load_lr_scheduler_states=False)
            except Exception as exc:  # keep DeepSpeed's text, name the checkpoint
                raise CheckpointError(f"cannot load DeepSpeed checkpoint {info.url}: {exc}") from exc
            if path is None:
                raise CheckpointError(f"cannot load DeepSpeed checkpoint {info.url}: DeepSpeed found "
                                      f"no checkpoint files in it")
            for name, obj in extra.items():
                obj.load_state_dict(client_state[name])

        required = {**meta, "world_size": self.world.world_size}
        self._files(checkpointer).load(info, read, required, LOAD_HINTS)
        log.info("resumed from %s (step %d, DeepSpeed ZeRO-%s, written by %s ranks)", info.url,
                 info.step, info.meta.get("zero_stage"), info.meta.get("world_size", "?"))
