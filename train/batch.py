"""The global batch: tokens per optimizer step, and how it splits into micro-batches per rank."""

from __future__ import annotations

from train.config import Config
from train.distributed import LayoutError
from train.stages import min_micro_batches


def default_micro_batches(cfg: Config) -> int:
    """Micro-batches per rank per step when trainer.global_batch_tokens is 0: one, or under a
    pipeline the fewest its schedule runs (`train.stages.min_micro_batches`)."""
    return min_micro_batches(cfg.parallel) if cfg.parallel.pp > 1 else 1


def global_batch_tokens(cfg: Config, dp: int) -> int:
    """Tokens per optimizer step: the configured value, or (0) `default_micro_batches` per data-parallel rank."""
    t = cfg.trainer
    return t.global_batch_tokens or t.micro_batch_size * cfg.data.seq_len * dp * default_micro_batches(cfg)


def accumulation_steps(cfg: Config, dp: int, micro_batch_size: int | None = None) -> int:
    """Micro-batches each rank runs per optimizer step; LayoutError (with the nearest valid global
    batch sizes) when the global batch does not split evenly over micro-batches and ranks."""
    t = cfg.trainer
    micro = micro_batch_size or t.micro_batch_size
    unit = micro * cfg.data.seq_len * dp  # tokens of one micro-batch on every data-parallel rank
    if t.global_batch_tokens == 0:
        return default_micro_batches(cfg)
    if t.global_batch_tokens % unit == 0:
        return t.global_batch_tokens // unit
    below = t.global_batch_tokens // unit * unit
    nearest = f"{below} or {below + unit}" if below else f"{unit}"
    raise LayoutError(
        f"trainer.global_batch_tokens={t.global_batch_tokens} does not split into micro-batches: one "
        f"micro-step is trainer.micro_batch_size={micro} x data.seq_len={cfg.data.seq_len} x "
        f"data-parallel size {dp} = {unit} tokens, so the global batch must be a multiple of {unit}; "
        f"use trainer.global_batch_tokens={nearest}, or leave it at 0 (one micro-batch per rank, "
        f"no accumulation)")
