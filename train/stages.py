"""The arithmetic of a pipeline (parallel.pp > 1), from the config alone: which layers each stage
holds, which stages each pipeline rank runs, how many micro-batches a schedule needs, and the
bubble it leaves. No process group, no device, no model: the start-up checks, the batch split
and the planner use it before anything is built; `train.pipeline` runs what it describes.

A pipeline of `pp` ranks runs pp x pp_stages_per_rank stages. Stage s holds a contiguous run of
blocks; the first also holds the embedding, the last the final norm and output projection.
Which rank runs stage s follows torch.distributed.pipelining: round robin ("loop": s % pp) for
1F1B, GPipe and Interleaved1F1B; a V for ZBVZeroBubble (rank r runs stages r and 2pp - 1 - r).
"""

from __future__ import annotations

import math

from train.capacity import block_params, group_numel
from train.config import ModelConfig, ParallelConfig

SINGLE_STAGE = ("1F1B", "GPipe")  # one stage per rank
V_SHAPED = ("ZBVZeroBubble",)
BUBBLE_WARN = 0.25  # the start-up checks warn above this idle fraction


def num_stages(parallel: ParallelConfig) -> int:
    return parallel.pp * parallel.pp_stages_per_rank


def stage_ranks(parallel: ParallelConfig) -> list[int]:
    """rank_of[s]: the pipeline rank (coordinate on the mesh's "pp" dimension) that runs stage s."""
    pp, stages = parallel.pp, num_stages(parallel)
    if str(parallel.pp_schedule) in V_SHAPED:
        return [s if s < pp else 2 * pp - 1 - s for s in range(stages)]
    return [s % pp for s in range(stages)]


def local_stages(parallel: ParallelConfig, pp_rank: int) -> list[int]:
    """The stages pipeline rank `pp_rank` runs, in increasing order."""
    return [s for s, rank in enumerate(stage_ranks(parallel)) if rank == pp_rank]


def _layer_cost(cfg: ModelConfig) -> tuple[int, int, int]:
    """Parameters of one block, of what the first stage adds (embedding) and of what the last adds
    (final norm, and the output projection unless it is the embedding's)."""
    block = group_numel(block_params(cfg))  # the planner's own count of each tensor
    embedding = cfg.vocab_size * cfg.dim
    head = cfg.dim + (0 if cfg.tie_embeddings else cfg.vocab_size * cfg.dim)
    return block, embedding, head


def balanced_split(cfg: ModelConfig, stages: int) -> list[int]:
    """The first layer of each stage after the first, so that the largest stage (by parameters,
    the embedding counted on the first and norm and output on the last) is as small as it can be
    with at least one block per stage. Ties go to the split that gives later stages fewer layers."""
    block, embedding, head = _layer_cost(cfg)
    layers = cfg.n_layers

    def cost(stage: int, first: int, end: int) -> int:
        return (end - first) * block + (embedding if stage == 0 else 0) + (head if stage == stages - 1 else 0)

    # best[s][i]: the smallest largest-stage cost of layers [0, i) over stages [0, s]; by dynamic programming
    best = [[math.inf] * (layers + 1) for _ in range(stages)]
    start: list[list[int]] = [[0] * (layers + 1) for _ in range(stages)]
    for i in range(1, layers + 1):
        best[0][i] = cost(0, 0, i)
    for s in range(1, stages):
        for i in range(s + 1, layers + 1):
            for j in range(s, i):  # stage s holds layers [j, i)
                candidate = max(best[s - 1][j], cost(s, j, i))
                if candidate < best[s][i] or (candidate == best[s][i] and j > start[s][i]):
                    best[s][i], start[s][i] = candidate, j
    split, end = [], layers
    for s in range(stages - 1, 0, -1):
        end = start[s][end]
        split.append(end)
    return split[::-1]


def stage_layers(cfg: ModelConfig, parallel: ParallelConfig) -> list[range]:
    """The blocks of every stage: parallel.pp_split, or `balanced_split` when it is []."""
    stages = num_stages(parallel)
    split = list(parallel.pp_split) or balanced_split(cfg, stages)
    bounds = [0, *split, cfg.n_layers]
    return [range(bounds[s], bounds[s + 1]) for s in range(stages)]


def describe(cfg: ModelConfig, parallel: ParallelConfig) -> str:
    """The stages for a log line: "stage 0: layers 0-1 (pp rank 0), stage 1: layers 2-3 (pp rank 1)"."""
    ranks = stage_ranks(parallel)
    return ", ".join(f"stage {s}: layers {r.start}-{r.stop - 1} (pp rank {ranks[s]})"
                     for s, r in enumerate(stage_layers(cfg, parallel)))


def min_micro_batches(parallel: ParallelConfig) -> int:
    """The fewest micro-batches per step: one per pipeline rank. Fewer leaves a rank with nothing
    to do in the steady state; torch refuses it for 1F1B, and the harness for every schedule."""
    return parallel.pp


def bubble_fraction(parallel: ParallelConfig, micro_batches: int) -> float:
    """The share of a step a pipeline rank idles, with forward and backward of every stage taking
    equal time: (p - 1) / (m + p - 1) for one stage per rank, (p - 1) / (v m + p - 1) with v
    stages per rank (Interleaved1F1B; also taken for ZBVZeroBubble, whose zero bubble needs equal
    forward, input- and weight-gradient times and is an upper bound otherwise)."""
    p, v, m = parallel.pp, parallel.pp_stages_per_rank, micro_batches
    return (p - 1) / (v * m + p - 1)


def micro_batches_for_bubble(parallel: ParallelConfig, fraction: float = BUBBLE_WARN) -> int:
    """The fewest micro-batches (a multiple of pp, which every schedule accepts) whose bubble is
    at most `fraction`."""
    p, v = parallel.pp, parallel.pp_stages_per_rank
    needed = math.ceil((p - 1) * (1 - fraction) / (fraction * v))
    return max(p, math.ceil(needed / p) * p)
