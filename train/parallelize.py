"""Apply the native engine's parallelism to a `train.model.Transformer` (or to a pipeline stage
of one, `train.pipeline.cut`), over the mesh's "dp" and "tp" dimensions.

`parallelize(model, mesh, cfg, device)` runs, in this order:

1. `apply_float8`   float8 matmuls (torchao) in place of the blocks' linears, if asked;
2. `apply_tp`       tensor parallel over mesh["tp"] (DTensor plans on the raw module names);
3. `apply_ac`       activation checkpointing (full or selective), one wrapper per block;
4. `apply_compile`  torch.compile, one per block;
5. `apply_fsdp`     FSDP2 over mesh["dp"], per block then the root, or
   `apply_ddp`      DDP over mesh["dp"].

Each later step wraps what the earlier one produced, so the order is fixed: float8 swaps the
linears TP then shards (its own TP styles); TP plans name the blocks' own submodules, which
wrapping would hide; checkpointing a compiled block would recompute outside the compiled
graph; and FSDP must see the final parameters (the DTensors TP made) and the final per-block
modules to group its all-gathers by block.

Also here, for the training loop: `cross_entropy` (vocabulary-parallel under TP), `grad_sync`
(gradient accumulation) and `clip_grad_norm_` (any mix of plain and DTensor gradients).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections import defaultdict
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.nn.parallel import DistributedDataParallel

from train.config import ModelConfig, ParallelConfig
from train.model import Transformer, ffn_hidden_dim
from train.precision import resolve_mixed_precision

log = logging.getLogger(__name__)


def parallelize(model: Transformer, mesh: DeviceMesh, cfg: ParallelConfig, device: torch.device) -> nn.Module:
    """Return `model` tensor-parallel over mesh["tp"] and data-parallel over mesh["dp"].

    The mesh's sizes are the truth (cfg.dp and cfg.tp may still read -1). The model may be
    on the meta device; FSDP and TP leave it there, DDP needs real parameters.
    """
    dp, tp = mesh["dp"].size(), mesh["tp"].size()
    if cfg.float8 != "off":
        apply_float8(model, str(cfg.float8), fsdp=cfg.data_parallel == "fsdp" and dp > 1)
    if tp > 1:
        apply_tp(model, mesh["tp"], cfg.sequence_parallel, float8=cfg.float8 != "off")
    elif cfg.sequence_parallel:
        log.warning("sequence_parallel has no effect without tensor parallel (tp=1)")
    if cfg.activation_checkpointing != "none":
        apply_ac(model, str(cfg.activation_checkpointing))
    if cfg.compile:
        apply_compile(model)
    if dp == 1:
        return model
    if cfg.data_parallel == "fsdp":
        apply_fsdp(model, mesh["dp"], resolve_mixed_precision(cfg, device), cfg.fsdp_reshard_after_forward)
        return model
    return apply_ddp(model, mesh["dp"], device)


def apply_float8(model: Transformer, recipe: str, fsdp: bool) -> None:
    """Swap every block's linears for torchao's Float8Linear: their matmuls run on the float8
    tensor cores (twice bf16's peak on Hopper), with dynamic scales: "rowwise" one per row
    (the more accurate recipe), "tensorwise" one per tensor, and then under FSDP2 the block
    weights are all-gathered in float8 (half the bytes of bf16). The embedding and the output
    projection stay in the compute dtype, as torchtitan keeps them: the loss is sensitive to the
    logits' precision, and the vocabulary projection is a small share of the FLOPs.

    torchao is imported only here, when parallel.float8 asks for it; the start-up check
    (train.checks.check_float8) has refused a CPU or pre-Hopper layout and a missing torchao.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(recipe)
    if recipe == "tensorwise" and fsdp:
        config = dataclasses.replace(config, enable_fsdp_float8_all_gather=True)
    convert_to_float8_training(model.layers, config=config,
                               module_filter_fn=lambda module, fqn: isinstance(module, nn.Linear))


def validate_tp(cfg: ModelConfig, tp: int) -> None:
    """Raise ValueError unless every dimension TP splits divides evenly by `tp`."""
    splits = {
        "n_heads": cfg.n_heads,
        "n_kv_heads": cfg.n_kv_heads,
        "ffn hidden size": ffn_hidden_dim(cfg),
        "vocab_size": cfg.vocab_size,
    }
    for what, size in splits.items():
        if size % tp:
            raise ValueError(
                f"tensor parallel degree tp={tp} must divide {what}={size} of model {cfg.name} "
                f"(each rank holds {what}/tp); pick a tp that divides "
                f"n_heads={cfg.n_heads}, n_kv_heads={cfg.n_kv_heads}, "
                f"ffn hidden size={ffn_hidden_dim(cfg)} and vocab_size={cfg.vocab_size}"
            )


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool, float8: bool = False) -> None:
    """Megatron-style tensor parallel: shard the matmuls of every block over tp_mesh.

    wq/wk/wv and w1/w3 are split by output column (each rank gets whole heads / a slice of
    the hidden units), wo and w2 by input row, so each block needs one all-reduce forward
    (attention) and one (feed-forward). The embedding is split over the vocabulary, the
    output projection too, and its logits stay split over the vocabulary (a DTensor sharded on
    its last dimension): `cross_entropy` reduces them where they are (loss parallel), so no rank
    holds the full [tokens, vocab] logits or their fp32 copy. Both are sharded Shard(0) over
    vocab, so a tied weight stays one DTensor (re-tied below). With `float8`, the blocks'
    linears (torchao's Float8Linear, `apply_float8`) get torchao's float8 TP styles, which cast
    to float8 before the collectives.

    With sequence_parallel, the norms and the residual stream are sharded over the sequence
    (Shard(1)) between the blocks' matmuls: the all-reduces become reduce-scatter/all-gather
    pairs and norm activations take 1/tp of the memory.

    Runs first: the plans address the blocks' own submodules, which later wrappers would hide.
    """
    validate_tp(model.cfg, tp_mesh.size())
    residual = Shard(1) if sequence_parallel else Replicate()
    # A pipeline stage holds the embedding only if it is the first, norm and output only if last.
    root_plan = {
        "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=residual),
        "output": ColwiseParallel(input_layouts=residual, output_layouts=Shard(-1), use_local_output=False),
        **({"norm": SequenceParallel()} if sequence_parallel else {}),
    }
    root_plan = {name: style for name, style in root_plan.items() if getattr(model, name) is not None}
    if root_plan:
        parallelize_module(model, tp_mesh, root_plan)
    colwise, rowwise = ColwiseParallel, RowwiseParallel
    if float8:
        from torchao.float8.float8_tensor_parallel import Float8ColwiseParallel, Float8RowwiseParallel

        colwise, rowwise = Float8ColwiseParallel, Float8RowwiseParallel
    for block in model.layers.values():
        plan = {
            "attention.wq": colwise(),
            "attention.wk": colwise(),
            "attention.wv": colwise(),
            "attention.wo": rowwise(output_layouts=residual),
            "feed_forward.w1": colwise(),
            "feed_forward.w3": colwise(),
            "feed_forward.w2": rowwise(output_layouts=residual),
        }
        if sequence_parallel:
            plan.update({
                "attention_norm": SequenceParallel(),
                "ffn_norm": SequenceParallel(),
                # Attention and feed-forward see the whole sequence: gather it at their entry.
                # (x, cos, sin, mask): the document mask is per sample, the same on every TP rank.
                "attention": PrepareModuleInput(
                    input_layouts=(Shard(1), None, None, None), desired_input_layouts=(Replicate(), None, None, None)
                ),
                "feed_forward": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            })
        parallelize_module(block, tp_mesh, plan)
    if model.cfg.tie_embeddings:
        # Each plan replaced its module's weight with its own new DTensor; share one again.
        model.output.weight = model.tok_embeddings.weight


# Selective checkpointing keeps the outputs of these ops and recomputes the rest of a block
# (norms, RoPE, SwiGLU's elementwise ops): the matmuls and attention are most of the FLOPs,
# the elementwise ops most of the bytes. As torchtitan's _op_sac_save_list.
_SAC_SAVE = {
    torch.ops.aten.mm.default,
    torch.ops.aten._scaled_dot_product_efficient_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention.default,
    torch.ops.aten._scaled_dot_product_cudnn_attention.default,
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default,
    torch.ops.aten._scaled_mm.default,  # float8 matmuls
    torch.ops.aten.max.default,  # float8's amax
    torch.ops._c10d_functional.reduce_scatter_tensor.default,  # TP's collectives, not run twice
    torch.ops._c10d_functional.all_gather_into_tensor.default,
    torch.ops._c10d_functional.all_reduce.default,
}


def _sac_policy():
    """A fresh per-op policy for one block: save the outputs of `_SAC_SAVE` ops, except every
    second matmul (torchtitan's balance of memory and recompute: about half the matmul outputs
    kept), recompute the rest. Counted separately in forward and in the recompute, so both
    passes make the same choices."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    mm_count: dict[bool, int] = defaultdict(int)

    def policy(ctx, func, *args, **kwargs):
        if func == torch.ops.aten.mm.default:
            mm_count[ctx.is_recompute] += 1
            if mm_count[ctx.is_recompute] % 2 == 0:
                return CheckpointPolicy.PREFER_RECOMPUTE
        return CheckpointPolicy.MUST_SAVE if func in _SAC_SAVE else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_ac(model: Transformer, mode: str = "full") -> None:
    """Activation checkpointing of every block: "full" keeps only each block's input and
    recomputes the whole block in backward; "selective" keeps the outputs of the matmuls
    (every second one) and attention and recomputes the rest (`_sac_policy`, per op).

    Wraps every block in place inside `model.layers`, so parameter names gain a
    `_checkpoint_wrapped_module.` part that `state_dict()` and DCP strip again. Runs after
    TP (whose plans need the unwrapped names) and before compile and FSDP, so the compiled
    graph and FSDP's per-block hooks contain the recomputation.
    """
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    if mode not in ("full", "selective"):
        raise ValueError(f"parallel.activation_checkpointing={mode!r}: expected none, full or selective")
    for name, block in model.layers.items():
        if mode == "full":
            model.layers[name] = checkpoint_wrapper(block)
        else:
            model.layers[name] = checkpoint_wrapper(block, context_fn=_sac_policy, preserve_rng_state=False)


def apply_compile(model: Transformer) -> None:
    """torch.compile each block separately: blocks share one shape, so they share one graph.

    Runs after AC (the checkpoint then lives inside the compiled graph) and before FSDP,
    whose all-gather and reduce-scatter hooks stay outside the compiled regions.
    """
    for name, block in model.layers.items():
        model.layers[name] = torch.compile(block)


def apply_fsdp(model: Transformer, dp_mesh: DeviceMesh, mixed_precision: str, reshard_after_forward: bool) -> None:
    """FSDP2: shard parameters, gradients and optimizer state over dp_mesh.

    One `fully_shard` per block, so each block's parameters are all-gathered just before it
    runs and freed after, then one on the root for the embedding, final norm and output.
    Runs last: it must see the DTensors TP made (it shards them further, 2-D) and the final
    per-block modules. Under bf16, parameters are gathered in bf16 and gradients reduced in
    fp32 (the sharded master weights stay fp32).

    The blocks do not cast their inputs (cast_forward_inputs=False): a block's arguments are
    the residual stream, already bf16 (the embedding ran with bf16 weights), and the RoPE
    tables, which must stay fp32 as under DDP and DeepSpeed (a bf16 angle table is off by up
    to a radian at position 2048 and beyond). The root casts nothing that is floating point
    either: its inputs are token ids.
    """
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        policy = MixedPrecisionPolicy()
    block_policy = MixedPrecisionPolicy(policy.param_dtype, policy.reduce_dtype, cast_forward_inputs=False)
    last = list(model.layers)[-1]  # a pipeline stage's blocks keep the whole model's numbers
    for name, block in model.layers.items():
        # Backward starts with the last block, so freeing its gathered parameters after
        # forward would only gather them again at once.
        fully_shard(block, mesh=dp_mesh, mp_policy=block_policy,
                    reshard_after_forward=reshard_after_forward and name != last)
    fully_shard(model, mesh=dp_mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)


def apply_ddp(model: nn.Module, dp_mesh: DeviceMesh, device: torch.device) -> nn.Module:
    """Wrap in DDP over dp_mesh's process group: every rank keeps all parameters.

    DDP broadcasts rank 0's parameters at construction, so ranks start equal. Buffers are
    not broadcast each step: the only ones are the RoPE tables, computed alike everywhere.
    Parameter names gain a `module.` prefix, which DCP's state-dict helpers strip. The
    gradients are views into DDP's all-reduce buckets (gradient_as_bucket_view), not a
    second copy of them.
    """
    if any(p.is_meta for p in model.parameters()):
        raise ValueError(
            "data_parallel=ddp needs materialised parameters (DDP broadcasts rank 0's weights at "
            "construction); build the model on the device and init_weights() before parallelize, "
            "or use data_parallel=fsdp to build it on the meta device"
        )
    return DistributedDataParallel(
        model,
        process_group=dp_mesh.get_group(),
        device_ids=[device.index] if device.type == "cuda" else None,
        broadcast_buffers=False,
        gradient_as_bucket_view=True,
    )


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Next-token loss of `logits` [B, T, V] against `targets` [B, T], in fp32: the mean, or
    per token [B, T] (reduction "none"); always a plain tensor.

    Logits that tensor parallel left sharded over the vocabulary (a DTensor, `apply_tp`) are
    reduced where they are, under torch's loss_parallel: each rank takes the log-softmax of
    its slice, and only per-token statistics cross the ranks. The backward of such a loss
    must run under `loss_parallel` too: `backward_context`.
    """
    flat = logits.flatten(0, 1).float()
    if isinstance(logits, DTensor):
        with backward_context():
            loss = F.cross_entropy(flat, targets.flatten(), reduction=reduction).to_local()
    else:
        loss = F.cross_entropy(flat, targets.flatten(), reduction=reduction)
    return loss if reduction == "mean" else loss.view_as(targets)


_loss_parallel_depth = 0  # backward_context blocks entered and not yet left


@contextlib.contextmanager
def backward_context() -> Iterator[None]:
    """Around backward: loss_parallel, which a loss from vocabulary-sharded logits needs
    (`cross_entropy`); it changes nothing for plain tensors.

    Reentrant, unlike torch's loss_parallel, whose exit switches it off however many are open: a
    pipeline runs the loss's forward (`cross_entropy`) inside the block its backward needs."""
    global _loss_parallel_depth
    if _loss_parallel_depth:
        _loss_parallel_depth += 1
        try:
            yield
        finally:
            _loss_parallel_depth -= 1
        return
    with loss_parallel():
        _loss_parallel_depth = 1
        try:
            yield
        finally:
            _loss_parallel_depth = 0


@contextlib.contextmanager
def grad_sync(model: nn.Module, enabled: bool, fsdp_reduce_per_micro_batch: bool = False) -> Iterator[None]:
    """Within the block, reduce gradients across data-parallel ranks only if `enabled`.

    For gradient accumulation: run all micro-batches but the last with enabled=False (the
    forward and backward both inside the block, as DDP's no_sync requires), so gradients
    accumulate locally and are reduced once. A plain or TP-only model has nothing to skip.

    FSDP accumulates skipped micro-batches' gradients unsharded, in fp32: 4 bytes per
    parameter / tp on every rank for the whole step. With `fsdp_reduce_per_micro_batch`
    (parallel.fsdp_reduce_per_micro_batch) it reduce-scatters every micro-batch instead, as
    torchtitan does, and accumulates the sharded result: no unsharded gradients, at the price
    of a gradient reduce-scatter per micro-batch (the planner counts either way).
    """
    if enabled or (fsdp_reduce_per_micro_batch and isinstance(model, FSDPModule)):
        yield
    elif isinstance(model, DistributedDataParallel):
        with model.no_sync():
            yield
    elif isinstance(model, FSDPModule):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


@torch.no_grad()
def clip_grad_norm_(model: nn.Module | list[nn.Module], max_norm: float,
                    pp_group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Scale all gradients so their global 2-norm is at most max_norm; return that norm (before
    clipping) as a 0-d fp32 tensor on the gradients' device, never read on the host.

    max_norm <= 0 only measures (clipping off, as optim.grad_clip_norm=0 means).

    `model` may be the pipeline stages this rank runs; then `pp_group` (the mesh's "pp"
    dimension) holds the other stages, and the squared norms of every stage are summed over it
    (one all-reduce of one number), so every stage clips by the norm of the whole model.

    Works for plain, DDP, FSDP2, TP and 2-D models: DTensor gradients are grouped by mesh and
    placements (one norm and one collective per group, as DTensor math cannot mix meshes),
    plain gradients are taken as identical on every rank (DDP all-reduced them; under TP
    they belong to replicated modules). The result is the same on every rank. The scale is a
    tensor too (clamped to 1, as torch.nn.utils.clip_grads_with_norm_ does), so clipping never
    waits for the device; a NaN/inf norm makes the gradients NaN, which the engine's gated
    optimizer step then ignores.
    """
    modules = model if isinstance(model, list) else [model]
    groups: dict[object, list[torch.Tensor]] = {}
    for p in (p for module in modules for p in module.parameters()):
        if p.grad is None:
            continue
        key = (p.grad.device_mesh, p.grad.placements) if isinstance(p.grad, DTensor) else None
        groups.setdefault(key, []).append(p.grad)
    device = next(modules[0].parameters()).device
    squares = [torch.zeros((), device=device)]
    for grads in groups.values():
        norm = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        squares.append(norm.float().pow(2).to(device))
    square = torch.stack(squares).sum()
    if pp_group is not None and dist.get_world_size(pp_group) > 1:
        dist.all_reduce(square, group=pp_group)
    total = square.sqrt()
    if max_norm > 0:
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for grads in groups.values():
            torch._foreach_mul_(grads, coef)
    return total
