"""The arithmetic of a capacity plan: memory, communication and step time of one layout.

Pure functions of the model shape, the layout and an engine setting: nothing here starts a
process group or allocates a tensor. `launch.plan` turns them into a report and a verdict;
`docs/planning.md` states every formula and assumption, and `tests/test_plan.py` checks them
against the real engines on gloo and against DeepSpeed's own estimators.

Conventions: bytes are per GPU (per rank) unless a name says otherwise; a collective's
`payload_bytes` is the size of the tensor handed to it (all-reduce: the tensor; all-gather:
the gathered output; reduce-scatter: the full input), summed over one optimizer step.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from train.config import ClusterConfig, ModelConfig, PlanConfig
from train.model import ffn_hidden_dim

FP32 = 4
ADAM_MOMENTS = 2 * FP32  # exp_avg and exp_avg_sq, fp32
AC_RECOMPUTE = 8 / 6  # full checkpointing runs every block's forward twice: (2 + 2 + 4) / (2 + 4)
# parallel.float8: the blocks' linears on float8 tensor cores (twice the bf16 peak on Hopper), less
# the dynamic-scaling casts around them; bench/gpu_check.py measures the end-to-end gain.
FLOAT8_LINEAR_SPEEDUP = 1.5


@dataclass(frozen=True)
class Setting:
    """One way to run the model: engine, degrees, and what is sharded or offloaded."""

    name: str
    engine: str  # ddp | fsdp | tp (TP, FSDP over dp if dp > 1) | zero (DeepSpeed)
    dp: int
    tp: int = 1
    zero_stage: int = 0  # 1 | 2 | 3 for engine=zero
    offload_optimizer: bool = False
    offload_params: bool = False
    reshard_after_forward: bool = True
    sequence_parallel: bool = False
    fsdp_reduce_per_micro_batch: bool = True  # FSDP accumulation: reduce-scatter each micro-batch (else unsharded fp32 grads)
    float8: str = "off"  # off | rowwise | tensorwise (parallel.float8)
    pp: int = 1  # pipeline ranks (parallel.pp), outermost on the mesh: pp x dp x tp
    pp_schedule: str = "1F1B"  # torch's schedule name (parallel.pp_schedule)
    pp_stages_per_rank: int = 1  # v (parallel.pp_stages_per_rank)
    pp_split: tuple[int, ...] = ()  # parallel.pp_split; () = balanced by parameter count

    @property
    def world(self) -> int:
        return self.pp * self.dp * self.tp

    @property
    def fsdp(self) -> bool:
        """FSDP2 shards over dp: the native engine with data_parallel=fsdp and dp > 1."""
        return self.engine in ("fsdp", "tp") and self.dp > 1


@dataclass(frozen=True)
class Workload:
    """What one optimizer step does on every rank."""

    micro_batch_size: int  # sequences per rank per forward
    seq_len: int
    accum_steps: int  # micro-batches per optimizer step
    bf16: bool  # mixed precision: bf16 compute, fp32 master weights
    activation_checkpointing: bool  # full checkpointing
    selective_checkpointing: bool = False  # per op: matmul and attention outputs kept (when not full)

    @property
    def checkpointing(self) -> str:
        """none | full | selective (parallel.activation_checkpointing)."""
        return "full" if self.activation_checkpointing else "selective" if self.selective_checkpointing else "none"

    @property
    def act_bytes(self) -> int:
        return 2 if self.bf16 else FP32

    @property
    def micro_tokens(self) -> int:
        return self.micro_batch_size * self.seq_len


@dataclass(frozen=True)
class Param:
    name: str
    shape: tuple[int, ...]
    tp_dim: int | None  # dimension tensor parallel splits; None = replicated


def block_params(cfg: ModelConfig) -> list[Param]:
    """One transformer block's parameters, with the dimension `train.parallelize.apply_tp` splits."""
    d, hd, f = cfg.dim, cfg.dim // cfg.n_heads, ffn_hidden_dim(cfg)
    q, kv = cfg.n_heads * hd, cfg.n_kv_heads * hd
    return [
        Param("attention_norm", (d,), None),
        Param("wq", (q, d), 0), Param("wk", (kv, d), 0), Param("wv", (kv, d), 0),  # colwise
        Param("wo", (d, q), 1),  # rowwise
        Param("ffn_norm", (d,), None),
        Param("w1", (f, d), 0), Param("w3", (f, d), 0), Param("w2", (d, f), 1),
    ]


def root_params(cfg: ModelConfig) -> list[Param]:
    """Embedding (vocab-sharded under TP), final norm, and the output projection if untied."""
    params = [Param("tok_embeddings", (cfg.vocab_size, cfg.dim), 0), Param("norm", (cfg.dim,), None)]
    if not cfg.tie_embeddings:
        params.append(Param("output", (cfg.vocab_size, cfg.dim), 0))
    return params


def embedding_params(cfg: ModelConfig) -> list[Param]:
    """What the first pipeline stage holds besides its blocks."""
    return root_params(cfg)[:1]


def head_params(cfg: ModelConfig) -> list[Param]:
    """What the last pipeline stage holds besides its blocks: the final norm and the output
    projection (tied to the embedding: only the norm, as `train.stages` counts it)."""
    return root_params(cfg)[1:]


@dataclass(frozen=True)
class StagePart:
    """One pipeline stage: how many blocks, and whether it holds the embedding / norm and output."""

    layers: int
    first: bool
    last: bool

    def root(self, cfg: ModelConfig) -> list[Param]:
        return (embedding_params(cfg) if self.first else []) + (head_params(cfg) if self.last else [])


@dataclass(frozen=True)
class RankPart:
    """What one pipeline rank runs: its stages, and how many stage forwards (one micro-batch
    through one of its stages) it holds the activations of at once (`in_flight`)."""

    pp_rank: int
    stages: tuple[StagePart, ...]
    in_flight: int

    @property
    def layers(self) -> int:
        return sum(st.layers for st in self.stages)

    def root(self, cfg: ModelConfig) -> list[Param]:
        return [p for st in self.stages for p in st.root(cfg)]


def _parallel(s: Setting):
    from train.config import ParallelConfig, PipelineSchedule

    return ParallelConfig(pp=s.pp, pp_schedule=PipelineSchedule[s.pp_schedule],
                          pp_stages_per_rank=s.pp_stages_per_rank, pp_split=list(s.pp_split))


def in_flight(s: Setting, micro_batches: int, pp_rank: int) -> int:
    """Stage forwards whose activations pipeline rank r holds at its peak (docs/planning.md), as
    torch.distributed.pipelining orders them (tests/test_plan.py reads torch's own orders):

    - 1F1B: min(m, pp - 1 - r) forwards before the first backward, then backward-forward
      pairs: min(m, pp - r) (pp on the first rank);
    - GPipe: every forward first: m;
    - Interleaved1F1B: (v - 1) pp + 2 (pp - 1 - r) warm-up forwards and one more before the first
      backward: min(v m, (v - 1) pp + 2 (pp - 1 - r) + 1);
    - ZBVZeroBubble: 2 pp - r - 1 forwards of the rank's first stage and r + 1 of its second
      before the first input-gradient backward: min(m, 2 pp - r - 1) + min(m, r + 1).
    """
    p, v, m, r = s.pp, s.pp_stages_per_rank, micro_batches, pp_rank
    if s.pp_schedule == "GPipe":
        return v * m
    if s.pp_schedule == "1F1B":
        return min(m, p - r)
    if s.pp_schedule == "ZBVZeroBubble":
        return min(m, 2 * p - r - 1) + min(m, r + 1)
    return min(v * m, (v - 1) * p + 2 * (p - 1 - r) + 1)


def rank_parts(cfg: ModelConfig, s: Setting, micro_batches: int) -> list[RankPart]:
    """Every pipeline rank's stages, by `train.stages` (the split the run uses); one rank holding
    the whole model without a pipeline."""
    if s.pp == 1:
        return [RankPart(0, (StagePart(cfg.n_layers, True, True),), 1)]
    from train import stages  # here: train.stages imports this module

    parallel = _parallel(s)
    layers, last = stages.stage_layers(cfg, parallel), stages.num_stages(parallel) - 1
    return [RankPart(r, tuple(StagePart(len(layers[i]), i == 0, i == last) for i in stages.local_stages(parallel, r)),
                     in_flight(s, micro_batches, r))
            for r in range(s.pp)]


def _local_numel(p: Param, tp: int, dp: int) -> int:
    """Elements one rank holds: split by tp along tp_dim, then FSDP's dim-0 chunk (padded) over dp."""
    shape = list(p.shape)
    if p.tp_dim is not None:
        shape[p.tp_dim] //= tp
    shape[0] = math.ceil(shape[0] / dp)
    return math.prod(shape)


def group_numel(params: list[Param], tp: int = 1, dp: int = 1) -> int:
    return sum(_local_numel(p, tp, dp) for p in params)


def total_params(cfg: ModelConfig) -> int:
    return cfg.n_layers * group_numel(block_params(cfg)) + group_numel(root_params(cfg))


def largest_layer_params(cfg: ModelConfig) -> int:
    """The most parameters one module holds directly (what ZeRO-3 gathers at once)."""
    return max(math.prod(p.shape) for p in block_params(cfg) + root_params(cfg))


def local_params(cfg: ModelConfig, s: Setting, part: RankPart | None = None) -> int:
    """Parameters one rank keeps between steps (the largest shard where shards differ), of the
    stages `part` (default: the whole model, pp = 1)."""
    if s.engine == "zero":
        return math.ceil(total_params(cfg) / s.dp) if s.zero_stage == 3 else total_params(cfg)
    dp = s.dp if s.fsdp else 1
    layers, root = (cfg.n_layers, root_params(cfg)) if part is None else (part.layers, part.root(cfg))
    return layers * group_numel(block_params(cfg), s.tp, dp) + group_numel(root, s.tp, dp)


@dataclass
class Memory:
    """Bytes per GPU. `working` is transient state of the engine (gathered parameters, buckets)."""

    params: int
    grads: int
    optimizer: int
    working: int
    activations: int  # with the workload's activation checkpointing setting
    activations_other: int  # with the opposite setting (full for none and selective, none for full), for the report
    host_bytes_per_node: int = 0  # optimizer / parameter offload
    margin: int = 0
    pp_rank: int = 0  # the pipeline rank these bytes are of: the fullest one

    @property
    def model_states(self) -> int:
        return self.params + self.grads + self.optimizer

    @property
    def total(self) -> int:
        return self.model_states + self.working + self.activations + self.margin


def activation_bytes(cfg: ModelConfig, s: Setting, w: Workload, checkpointing: str, part: RankPart | None = None) -> int:
    """Activations kept for backward by one rank at its peak (flash attention): of one micro-batch
    without a pipeline; under one, `part.in_flight` stage forwards of its largest stage.

    Per token and block: each RMSNorm keeps its fp32 input and normalised output and the
    block keeps its output (4d + 2ad); attention keeps fp32 RoPE inputs of q and k, rotated q,
    k and v (grouped-query attention in the kernel: no repeated k, v), its output and wo's input
    (4d + 4d_kv + 3ad + 2ad_kv); SwiGLU keeps w1 and w3
    outputs, the silu and the product (4af). TP splits attention and SwiGLU by tp, sequence
    parallel the norms too. Full checkpointing keeps only each block's input (ad) plus one
    block recomputed. Selective checkpointing (`train.parallelize._sac_policy`) keeps each
    block's input and the outputs of every second matmul (wq, wv, w1, w2) and of attention
    (ad + a(2d + d_kv + f)/tp + ad), plus one block recomputed. Logits: bf16 output, fp32
    copy and log-softmax ((a + 8) V; under TP each rank holds its vocabulary slice, V/tp: loss
    parallel); the flash/memory-efficient attention kernel saves no s x s scores. A pipeline
    stage keeps its own blocks' share, the logits only on the last and the embedding output only
    on the first; the block recomputed under checkpointing once per rank.
    """
    a, d, tp = w.act_bytes, cfg.dim, s.tp
    d_kv, f = cfg.n_kv_heads * (d // cfg.n_heads), ffn_hidden_dim(cfg)
    norms = 2 * (4 * d + 2 * a * d)
    per_block = (norms / tp if s.sequence_parallel else norms) + (4 * d + 4 * d_kv + 3 * a * d + 2 * a * d_kv + 4 * a * f) / tp
    if checkpointing == "full":
        kept_per_block, recomputed = a * d, per_block
    elif checkpointing == "selective":
        kept_per_block, recomputed = 2 * a * d + a * (2 * d + d_kv + f) / tp, per_block
    else:
        kept_per_block, recomputed = per_block, 0

    def stage(st: StagePart) -> float:
        head = (4 * d + 2 * a * d + (a + 8) * cfg.vocab_size / tp if st.last else 0)  # final norm, logits
        return st.layers * kept_per_block + head + (a * d if st.first else 0)  # embedding output

    part = part or RankPart(0, (StagePart(cfg.n_layers, True, True),), 1)
    return int(w.micro_tokens * (part.in_flight * max(stage(st) for st in part.stages) + recomputed))


def recompute_factor(cfg: ModelConfig, w: Workload, flops_per_token: float) -> float:
    """Step FLOPs with activation checkpointing over those without: full recomputes every
    block's forward (AC_RECOMPUTE); selective only the matmuls it does not keep (wk, wo, w3:
    2 FLOPs per weight per token), the elementwise ops being negligible FLOPs."""
    if w.checkpointing == "full":
        return AC_RECOMPUTE
    if w.checkpointing == "selective":
        d, hd = cfg.dim, cfg.dim // cfg.n_heads
        recomputed = cfg.n_layers * (d * cfg.n_kv_heads * hd + cfg.n_heads * hd * d + d * ffn_hidden_dim(cfg))
        return 1.0 + 2 * recomputed / flops_per_token
    return 1.0


def memory(cfg: ModelConfig, s: Setting, w: Workload, plan: PlanConfig, nodes: int = 1) -> Memory:
    """Per-GPU memory of a setting; see docs/planning.md for each term. Under a pipeline, of the
    pipeline rank that needs the most (its stages' weights, gradients and optimizer state, and
    the activations of the stage forwards it holds)."""
    mems = [_rank_memory(cfg, s, w, plan, nodes, part) for part in rank_parts(cfg, s, w.accum_steps)]
    return max(mems, key=lambda m: m.total)


def _rank_memory(cfg: ModelConfig, s: Setting, w: Workload, plan: PlanConfig, nodes: int, part: RankPart) -> Memory:
    n, c = local_params(cfg, s, part), (2 if w.bf16 else FP32)
    P, L = total_params(cfg), largest_layer_params(cfg)
    if s.engine == "zero":
        mem = _zero_memory(P, L, s, w.bf16, nodes)
    elif s.fsdp:
        block = group_numel(block_params(cfg), s.tp)
        root = group_numel(part.root(cfg), s.tp)
        # Gathered in compute dtype (tensorwise float8: the blocks in one byte): the root
        # (embedding, output) for all of forward and its unsharded gradient through backward,
        # the running and the prefetched block, and one block's gradient before it is
        # reduce-scattered in fp32.
        gathered = 1 if s.float8 == "tensorwise" else c
        working = c * 2 * root + gathered * 2 * block + (c + FP32) * block
        grads = FP32 * n
        if w.accum_steps > 1 and not s.fsdp_reduce_per_micro_batch:
            # micro-batches without sync accumulate unsharded fp32 gradients for the whole step
            grads += FP32 * (part.layers * block + root)
        mem = Memory(FP32 * n, grads, ADAM_MOMENTS * n, working, 0, 0)
    else:
        # fp32 weights trained under autocast: bf16 copies of every weight live through backward.
        working = (2 * n if w.bf16 else 0) + (FP32 * n if s.engine == "ddp" and s.dp > 1 else 0)
        mem = Memory(FP32 * n, FP32 * n, ADAM_MOMENTS * n, working, 0, 0)
    mem.pp_rank = part.pp_rank
    mem.activations = activation_bytes(cfg, s, w, w.checkpointing, part)
    mem.activations_other = activation_bytes(cfg, s, w, "none" if w.checkpointing == "full" else "full", part)
    mem.margin = plan.reserved_bytes + int(plan.fragmentation_fraction * (mem.total - mem.margin))
    return mem


def _zero_memory(P: int, L: int, s: Setting, bf16: bool, nodes: int) -> Memory:
    """DeepSpeed ZeRO model states, term by term as DeepSpeed's estimators count them.

    bf16: 16-bit parameters (2), 16-bit gradients (2), fp32 gradient partition (4), fp32
    master weights (4) and Adam moments (8). Stage 1 shards the fp32 optimizer state; with
    bf16 it accumulates gradients in fp32 (`data_types.grad_accum_dtype`, DeepSpeed's
    BF16_Optimizer), whole on every rank (2P + 4P + 12P/n). Stage 2 shards the gradients too
    (2P + 16P/n), stage 3 the parameters too (18P/n, plus 4 bytes per parameter of the largest
    layer gathered). Offload moves the sharded state to the host.

    Building the model adds nothing at stage 3: it is built under zero.Init
    (`train.deepspeed_engine.partitioned_build`), so while it is built a rank holds its
    parameter partitions (`params` here: cP/n, or 0 on the device with parameter offload) and
    one whole parameter at a time (at most L elements), never the whole model; that is below
    the states it trains with. tests/test_deepspeed.py measures it: partitions equal `params`
    to the byte, peak growth about 0.53 x the fp32 model on each of 2 ranks. Stages 1 and 2
    build the whole model in fp32 on every rank first (4P for a moment), not counted here.
    """
    n = s.dp
    c = 2 if bf16 else FP32
    master, grad32 = (FP32, FP32) if bf16 else (0, 0)
    optimizer = master + ADAM_MOMENTS
    shard = lambda per_param: math.ceil(per_param * P / n)  # noqa: E731
    host = 0
    if s.zero_stage == 1:
        params, grads, opt, working = c * P, (c + grad32) * P, shard(optimizer), 0
    elif s.zero_stage == 2:
        params, grads, opt, working = c * P, shard(c + grad32), shard(optimizer), 0
        if s.offload_optimizer:
            grads, opt, host = 0, 0, (c + grad32 + optimizer) * P // nodes
    else:
        params, grads, opt, working = shard(c), shard(grad32 or c), shard(optimizer), 2 * c * L
        if s.offload_optimizer:
            host = (grad32 + optimizer) * P // nodes
            grads, opt = 0, 0
        if s.offload_params:
            host += c * P // nodes
            params = 0
    return Memory(params, grads, opt, working, 0, 0, host_bytes_per_node=host)


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter | send_recv (pipeline point to point)
    group: str  # tp | dp | pp
    payload_bytes: int  # summed over the step (send_recv: over every stage boundary of one pipeline)
    calls: int  # send_recv: sends (each with its matching receive)
    per_gpu_bytes: int = 0  # send_recv: what the busiest pipeline rank sends


def hidden_bytes(s: Setting, w: Workload) -> int:
    """Bytes of one micro-batch's hidden state crossing a stage boundary, per tp rank.

    The residual stream is in the parameters' dtype: bf16 where FSDP2 casts them (param_dtype),
    fp32 where autocast runs over fp32 weights (its bf16 outputs are added to the fp32 residual).
    Every tp rank sends to its counterpart on the next stage; without sequence parallel the hidden
    state is replicated over tp (each sends all of it), with it sharded along the sequence.
    """
    b = w.act_bytes if s.fsdp else FP32
    tokens = w.micro_tokens // s.tp if s.sequence_parallel else w.micro_tokens
    return tokens * b


def point_to_point(cfg: ModelConfig, s: Setting, w: Workload) -> Collective | None:
    """The pipeline's sends in one step: every stage boundary between two pipeline ranks carries
    each micro-batch's hidden state forward and its gradient back (2 m sends of `hidden_bytes` x
    dim). pp v - 1 boundaries, less those inside a rank (ZBVZeroBubble's V turns on the last
    rank); a rank sends m on each boundary it is on (`per_gpu_bytes`: the busiest)."""
    if s.pp == 1:
        return None
    from train import stages  # here: train.stages imports this module

    m, one = w.accum_steps, hidden_bytes(s, w) * cfg.dim
    rank_of = stages.stage_ranks(_parallel(s))
    crossing = [(a, b) for a, b in itertools.pairwise(rank_of) if a != b]
    busiest = max(sum(r in pair for pair in crossing) for r in range(s.pp))
    return Collective("send_recv", "pp", len(crossing) * 2 * m * one, len(crossing) * 2 * m, busiest * m * one)


def collectives(cfg: ModelConfig, s: Setting, w: Workload) -> list[Collective]:
    """Every collective of one optimizer step (forward and backward of all micro-batches); under
    a pipeline, those of the rank with the most parameters, and the pipeline's point to point.

    Not counted: the gradient-norm all-reduce of clipping (one fp32 per parameter group) and
    the logged loss, a few hundred bytes per step.
    """
    out: list[Collective] = []
    m, c = w.accum_steps, (2 if w.bf16 else FP32)
    p2p = point_to_point(cfg, s, w)
    if p2p is not None:
        out.append(p2p)
    part = max(rank_parts(cfg, s, m), key=lambda r: local_params(cfg, s, r))
    L, root_list = part.layers, part.root(cfg)
    first, last = any(st.first for st in part.stages), any(st.last for st in part.stages)
    ends = int(first) + int(last)  # the embedding's forward and the output projection's backward
    if s.tp > 1:
        act = w.micro_tokens * cfg.dim * w.act_bytes
        # loss parallel: the logits stay sharded over the vocabulary; per token, the max, the sum
        # of exponentials and the target's logit cross the ranks (three fp32 all-reduces)
        loss = [Collective("all_reduce", "tp", m * 3 * FP32 * w.micro_tokens, m * 3)] if last else []
        if s.sequence_parallel:
            out += [Collective("reduce_scatter", "tp", m * (4 * L + ends) * act, m * (4 * L + ends)),
                    Collective("all_gather", "tp", m * (4 * L + ends) * act, m * (4 * L + ends)), *loss]
        else:
            # forward: the embedding and every wo and w2; backward: the input gradient of every
            # column-parallel linear (wq, wk, wv, w1, w3) and of the output projection.
            out += [Collective("all_reduce", "tp", m * (7 * L + ends) * act, m * (7 * L + ends)), *loss]
    if s.dp == 1:
        return out
    if s.engine == "ddp":
        out.append(Collective("all_reduce", "dp", FP32 * local_params(cfg, s, part), 1))
    elif s.fsdp:
        block = s.dp * group_numel(block_params(cfg), s.tp, s.dp)
        root = s.dp * group_numel(root_list, s.tp, s.dp)
        # forward gathers every block and the root; backward again all but the last block
        # (kept after forward: backward starts there) and the root; tensorwise float8 gathers
        # the blocks in one byte
        gathers = m * (L + 1 + (L if s.reshard_after_forward else 0))
        b = 1 if s.float8 == "tensorwise" else c
        gathered = m * (b * L * block + c * root + ((b * (L - 1) * block + c * root) if s.reshard_after_forward else 0))
        reduces = m if s.fsdp_reduce_per_micro_batch else 1  # gradients reduce-scattered per micro-batch or per step
        out += [Collective("all_gather", "dp", gathered, gathers),
                Collective("reduce_scatter", "dp", reduces * FP32 * (L * block + root), reduces * (L + 1))]
    elif s.engine == "zero":
        # gradients reduced in fp32 (train.deepspeed_engine: communication_data_type); ZeRO-2 and 3
        # reduce-scatter every micro-batch (their gradients are partitioned), ZeRO-1 once per step
        P = total_params(cfg)
        if s.zero_stage == 3:
            out += [Collective("all_gather", "dp", m * 2 * c * P, m * 2 * (L + 1)),
                    Collective("reduce_scatter", "dp", m * FP32 * P, m * (L + 1))]
        else:
            reduces = m if s.zero_stage == 2 else 1
            out += [Collective("reduce_scatter", "dp", reduces * FP32 * P, reduces),
                    Collective("all_gather", "dp", c * P, 1)]
    return out


_BUS_FACTOR = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1, "send_recv": 1}


@dataclass
class Traffic:
    """Bytes on each link for one collective, and the time it takes."""

    nvlink_bytes_per_gpu: float
    network_bytes_per_node: float
    seconds: float | None  # None where a bandwidth is unknown


def traffic(coll: Collective, s: Setting, cluster: ClusterConfig) -> Traffic:
    """Hierarchical ring model: inside the node over NVLink, between nodes over the NIC.

    A group of g ranks per node on k nodes moves, per GPU, f (g-1)/g of the payload over
    NVLink and, per node, f (k-1)/k of it times the ppn/g groups sharing the node's NICs,
    with f = 2 for all-reduce (reduce-scatter + all-gather) and 1 otherwise. TP groups stay
    inside a node; a dp group holds ppn/tp ranks of every node.
    """
    if coll.kind == "send_recv":
        return _p2p_traffic(coll, s, cluster)
    f, ppn = _BUS_FACTOR[coll.kind], cluster.procs_per_node
    size = s.tp if coll.group == "tp" else s.dp
    per_node = min(size, ppn // s.tp if coll.group == "dp" else ppn)
    nodes = max(1, size // per_node)
    nvlink = f * (per_node - 1) / per_node * coll.payload_bytes
    network = f * (nodes - 1) / nodes * coll.payload_bytes * (ppn // per_node) if nodes > 1 else 0.0
    return Traffic(nvlink, network, _link_seconds(nvlink, network, cluster, sum))


def _link_seconds(nvlink: float, network: float, cluster: ClusterConfig, combine) -> float | None:
    """Time of `nvlink` bytes per GPU and `network` bytes per node at the layout's bandwidths,
    combined (`sum`: one after the other, as a ring's phases; `max`: at once); None where a link
    that carries bytes has no known bandwidth."""
    times = []
    for moved, bw in ((nvlink, cluster.intra_node_bandwidth_bytes_per_s),
                      (network, cluster.inter_node_bandwidth_bytes_per_s)):
        if moved:
            if bw <= 0:
                return None
            times.append(moved / bw)
    return combine(times) if times else 0.0


def _p2p_traffic(coll: Collective, s: Setting, cluster: ClusterConfig) -> Traffic:
    """Pipeline sends: pp is outermost on the mesh, so a node holds ppn / (dp tp) consecutive
    pipeline ranks when dp tp < ppn, else none shares a node with its neighbours. The busiest rank
    sends `per_gpu_bytes` (and receives as much, the links being full duplex); over NVLink when
    its neighbours are on its node, else every GPU of the node sends it over the node's NICs."""
    ppn, group = cluster.procs_per_node, s.dp * s.tp
    ranks_per_node = max(1, ppn // group)
    if ranks_per_node >= s.pp:
        nvlink, network = float(coll.per_gpu_bytes), 0.0
    elif ranks_per_node == 1:
        nvlink, network = 0.0, float(coll.per_gpu_bytes) * ppn
    else:  # the node's first and last pipeline ranks talk to other nodes
        nvlink, network = float(coll.per_gpu_bytes), float(coll.per_gpu_bytes) * group
    return Traffic(nvlink, network, _link_seconds(nvlink, network, cluster, max))


@dataclass
class StepTime:
    compute_s: float | None
    tp_comm_s: float | None  # on the critical path
    dp_comm_s: float | None  # on its own stream, overlapping compute
    exposed_dp_s: float | None
    offload_s: float
    step_s: float | None
    tokens_per_s: float | None
    mfu: float | None
    flops_per_step: float = 0.0
    traffic: list[tuple[Collective, Traffic]] = field(default_factory=list)
    bubble: float = 0.0  # the pipeline's idle fraction; compute is divided by 1 - bubble
    pp_comm_s: float | None = 0.0  # the busiest pipeline rank's sends
    exposed_pp_s: float | None = 0.0  # of them on the critical path


def bubble_fraction(s: Setting, micro_batches: int) -> float:
    """(p - 1) / (v m + p - 1): 1F1B and GPipe (v = 1), Interleaved1F1B; ZBVZeroBubble taken at
    the interleaved bound (its zero bubble needs equal F, B and W times). `train.stages` states it."""
    if s.pp == 1:
        return 0.0
    from train import stages

    return stages.bubble_fraction(_parallel(s), micro_batches)


def step_time(cfg: ModelConfig, s: Setting, w: Workload, cluster: ClusterConfig, plan: PlanConfig,
              flops_per_token: float) -> StepTime:
    """T = compute / n + exposed communication, per collective and link (docs/planning.md)."""
    tokens = w.micro_tokens * w.accum_steps * s.dp
    flops = flops_per_token * tokens
    peak = cluster.peak_flops_bf16 * plan.matmul_efficiency
    work = flops * recompute_factor(cfg, w, flops_per_token)
    if s.float8 != "off":
        # the blocks' linears run FLOAT8_LINEAR_SPEEDUP times faster; attention and the output
        # projection stay in bf16
        linear = 6 * (total_params(cfg) - group_numel(root_params(cfg))) * tokens
        work -= linear * (1 - 1 / FLOAT8_LINEAR_SPEEDUP)
    compute = work / (s.world * peak) if peak > 0 else None
    moved = [(coll, traffic(coll, s, cluster)) for coll in collectives(cfg, s, w)]
    bubble = bubble_fraction(s, w.accum_steps)
    if compute is not None:
        compute /= 1 - bubble
    pp_s = _sum(t.seconds for coll, t in moved if coll.group == "pp")
    tp_s = _sum(t.seconds for coll, t in moved if coll.group == "tp")
    dp_s = _sum(t.seconds for coll, t in moved if coll.group == "dp")
    offload = 0.0
    if s.offload_optimizer or s.offload_params:
        c = 2 if w.bf16 else FP32
        shard = total_params(cfg) / s.dp
        # gradients down and updated parameters up once per step; offloaded parameters
        # also come up for forward and backward of every micro-batch
        moved_host = 2 * c * shard + (2 * w.accum_steps * c * shard if s.offload_params else 0)
        offload = moved_host / plan.offload_bandwidth_bytes_per_s
    if compute is None or tp_s is None or dp_s is None or pp_s is None:
        return StepTime(compute, tp_s, dp_s, None, offload, None, None, None, flops, moved, bubble, pp_s, None)
    # Pipeline sends are posted asynchronously (torch's schedules): in the steady state they hide
    # behind the next micro-batch's compute; the fill and the drain wait for one send per stage
    # boundary each way (calls / m of them, each taking the busiest rank's time per send); what
    # exceeds compute is exposed too.
    exposed_pp = 0.0
    for coll, t in moved:
        if coll.kind == "send_recv" and t.seconds:
            per_send = t.seconds * (coll.payload_bytes / coll.calls) / coll.per_gpu_bytes
            exposed_pp += per_send * coll.calls / w.accum_steps + max(0.0, t.seconds - compute)
    # Gradient all-reduce / reduce-scatter of DDP and ZeRO-1 can only hide behind the backward
    # of the last micro-batch; ZeRO-2 reduces behind every micro-batch's backward (overlap_comm);
    # FSDP / ZeRO-3 gathers prefetch behind every forward and backward.
    gathers_overlap = s.fsdp or (s.engine == "zero" and s.zero_stage == 3)
    if gathers_overlap:
        window = compute
    elif s.engine == "zero" and s.zero_stage == 2:
        window = compute * (2 / 3)
    else:
        window = compute * (2 / 3) / w.accum_steps
    exposed = max(0.0, dp_s - window)
    step = compute + tp_s + exposed + offload + exposed_pp
    mfu = flops / (step * s.world * cluster.peak_flops_bf16)
    return StepTime(compute, tp_s, dp_s, exposed, offload, step, tokens / step, mfu, flops, moved,
                    bubble, pp_s, exposed_pp)


def _sum(values) -> float | None:
    total = 0.0
    for v in values:
        if v is None:
            return None
        total += v
    return total
