"""A Llama-style decoder-only transformer, and the arithmetic about it (parameters, FLOPs).

The model knows nothing about devices, meshes or parallelism: `train.parallelize` applies
those from outside. Two things make that possible:

- blocks live in an `nn.ModuleDict` keyed "0".."n-1", so a block can be swapped for a
  wrapped one (activation checkpointing, compile, FSDP) without renumbering anything;
- attention derives its number of heads from the weights it actually holds at run time,
  so tensor parallel, which hands each rank a column slice of wq/wk/wv, just works;
- a pipeline stage is the same class with parts removed (`train.pipeline.cut`): without
  `tok_embeddings` it takes hidden states instead of tokens, without `norm` and `output` it
  returns hidden states, and its parameters keep the whole model's names.

Big models are built on the meta device, parallelized, materialised with `to_empty`, then
`init_weights()` fills every parameter and recomputes the RoPE tables.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention

from train.config import ModelConfig


def validate(cfg: ModelConfig) -> None:
    """Raise ValueError naming the field and the numbers when the shape cannot be built."""
    for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "multiple_of", "max_seq_len"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"model {cfg.name}: {name} must be >= 1; found {getattr(cfg, name)}")
    if cfg.ffn_hidden_dim < 0:
        raise ValueError(f"model {cfg.name}: ffn_hidden_dim must be >= 0 (0 = derived); found {cfg.ffn_hidden_dim}")
    if cfg.dim % cfg.n_heads:
        raise ValueError(f"model {cfg.name}: dim={cfg.dim} must be divisible by n_heads={cfg.n_heads}")
    if cfg.n_heads % cfg.n_kv_heads:
        raise ValueError(
            f"model {cfg.name}: n_heads={cfg.n_heads} must be divisible by n_kv_heads={cfg.n_kv_heads} "
            "(grouped-query attention shares each key/value head between n_heads/n_kv_heads query heads)"
        )
    head_dim = cfg.dim // cfg.n_heads
    if head_dim % 2:
        raise ValueError(f"model {cfg.name}: head_dim = dim/n_heads = {head_dim} must be even for RoPE")
    if cfg.init_std <= 0 or cfg.norm_eps <= 0 or cfg.rope_theta <= 0:
        raise ValueError(
            f"model {cfg.name}: init_std, norm_eps and rope_theta must be > 0; found "
            f"{cfg.init_std}, {cfg.norm_eps}, {cfg.rope_theta}"
        )


def ffn_hidden_dim(cfg: ModelConfig) -> int:
    """SwiGLU hidden size: cfg.ffn_hidden_dim, or Llama's 2/3 * 4 * dim rounded up to multiple_of."""
    if cfg.ffn_hidden_dim:
        return cfg.ffn_hidden_dim
    hidden = int(2 * 4 * cfg.dim / 3)
    return cfg.multiple_of * math.ceil(hidden / cfg.multiple_of)


def rope_tables(cfg: ModelConfig, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the RoPE angles of `cfg`'s model, [max_seq_len, head_dim/2], always in fp32:
    frequency i of each head is theta ** (-2i / head_dim), rescaled as `cfg.rope_scaling` says."""
    head_dim = cfg.dim // cfg.n_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    if cfg.rope_scaling == "llama3":
        inv_freq = llama3_frequencies(inv_freq, cfg)
    positions = torch.arange(cfg.max_seq_len, device=device, dtype=torch.float32)
    angles = torch.outer(positions, inv_freq)
    return angles.cos(), angles.sin()


def llama3_frequencies(inv_freq: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """Llama 3.1's RoPE scaling (Meta's `apply_scaling`; transformers' rope_type "llama3"), in the
    same fp32 operations as transformers, so both compute the same tables bit for bit.

    Wavelengths shorter than rope_original_max_seq_len / rope_high_freq_factor are kept, longer
    than rope_original_max_seq_len / rope_low_freq_factor are stretched by rope_scaling_factor,
    and the band between is interpolated smoothly: positions beyond the original context then
    rotate the slow dimensions no further than training did.
    """
    factor, low, high = cfg.rope_scaling_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    if high <= low:
        raise ValueError(f"model {cfg.name}: rope_high_freq_factor={high} must be greater than "
                         f"rope_low_freq_factor={low} (rope_scaling=llama3)")
    original = cfg.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > original / low, inv_freq / factor, inv_freq)
    smooth = (original / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    between = ~(wavelen < original / high) * ~(wavelen > original / low)
    return torch.where(between, smoothed, scaled)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive pairs of x [B, T, H, D] by the angles of its positions (Llama layout)."""
    seq_len = x.shape[1]
    cos = cos[:seq_len].view(1, seq_len, 1, -1)
    sin = sin[:seq_len].view(1, seq_len, 1, -1)
    pairs = x.float().unflatten(-1, (-1, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1)
    return rotated.flatten(-2).type_as(x)


AttentionMask = torch.Tensor | BlockMask | None  # see attention_mask: None is plain causal


def document_ids(tokens: torch.Tensor, eos_id: int, bos_id: int | None = None) -> torch.Tensor:
    """Which document each position of packed `tokens` [B, T] belongs to: [B, T] ids that step
    up by one at each document start (only equality between them means anything).

    A document ends with eos (the eos is its last token) and, where the tokenizer has one,
    starts with bos: a new document starts after every eos and at every bos (eos then bos
    starts one document, not two). The first document of a row may have begun in an earlier
    sample; attention cannot reach it anyway.
    """
    starts = tokens == bos_id if bos_id is not None else torch.zeros_like(tokens, dtype=torch.bool)
    starts[:, 1:] |= tokens[:, :-1] == eos_id
    return starts.cumsum(1)


def attention_mask(documents: torch.Tensor, kernel: str | None = None) -> torch.Tensor | BlockMask:
    """The block-causal mask of `documents` [B, T] (query q sees key k iff k <= q in the same
    document), for every block's attention, made once per forward.

    kernel "flex": a FlexAttention BlockMask, which skips the blocks that are all masked (the
    kernel for GPUs: the work falls with the documents' length). "sdpa": a dense boolean
    [B, 1, T, T] mask for scaled_dot_product_attention (T^2 bytes per sample; what the CPU
    runs, where FlexAttention would need a compile per shape). None: flex on CUDA, else sdpa.
    """
    kernel = kernel or ("flex" if documents.is_cuda else "sdpa")
    if kernel == "sdpa":
        same = documents[:, :, None] == documents[:, None, :]
        return same.tril_().unsqueeze(1)
    if kernel != "flex":
        raise ValueError(f"attention mask kernel must be 'flex' or 'sdpa', got {kernel!r}")

    def block_causal(batch, head, q_idx, kv_idx):
        return (kv_idx <= q_idx) & (documents[batch, q_idx] == documents[batch, kv_idx])

    batch, seq_len = documents.shape
    return _create_block_mask()(block_causal, batch, None, seq_len, seq_len, device=documents.device)


@functools.cache
def _flex_attention():
    """FlexAttention, compiled on CUDA (its fast kernel only exists compiled); eager elsewhere."""
    return torch.compile(flex_attention) if torch.cuda.is_available() else flex_attention


@functools.cache
def _create_block_mask():
    return torch.compile(create_block_mask) if torch.cuda.is_available() else create_block_mask


class RMSNorm(nn.Module):
    """Root-mean-square norm with a learned scale, computed in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Attention(nn.Module):
    """Causal grouped-query self-attention with RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.head_dim = cfg.dim // cfg.n_heads
        self.wq = nn.Linear(cfg.dim, cfg.n_heads * self.head_dim, bias=False)
        self.wk = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(cfg.dim, cfg.n_kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(cfg.n_heads * self.head_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask = None) -> torch.Tensor:
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        # Heads from the projections' widths, not the config: under tensor parallel each rank
        # holds n_heads/tp query heads and n_kv_heads/tp key/value heads.
        batch, seq_len = q.shape[0], q.shape[1]
        q = q.view(batch, seq_len, -1, self.head_dim)
        k = k.view(batch, seq_len, -1, self.head_dim)
        v = v.view(batch, seq_len, -1, self.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        # Grouped-query attention inside the kernels (enable_gqa): each key/value head serves
        # its n_heads/n_kv_heads query heads without copies of k and v.
        if isinstance(mask, BlockMask):
            out = _flex_attention()(q, k, v, block_mask=mask, enable_gqa=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None, enable_gqa=True)
        return self.wo(out.transpose(1, 2).reshape(batch, seq_len, -1))


class FeedForward(nn.Module):
    """SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = ffn_hidden_dim(cfg)
        self.w1 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w3 = nn.Linear(cfg.dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    """Pre-norm block: x + attention(norm(x)), then + feed_forward(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attention_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: AttentionMask = None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), cos, sin, mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Transformer(nn.Module):
    """Llama-style decoder: tokens [B, T] -> logits [B, T, vocab_size] (a pipeline stage: hidden
    states [B, T, dim] in where it has no embedding, out where it has no output projection)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        validate(cfg)
        self.cfg = cfg
        self.tok_embeddings: nn.Embedding | None = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleDict({str(i): TransformerBlock(cfg) for i in range(cfg.n_layers)})
        self.norm: RMSNorm | None = RMSNorm(cfg.dim, cfg.norm_eps)
        self.output: nn.Linear | None = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        # Derived from the config, so kept out of checkpoints (persistent=False).
        cos, sin = rope_tables(cfg)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.mask_kernel: str | None = None  # document masks: "flex" | "sdpa"; None = flex on CUDA, else sdpa
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Fill every parameter and buffer from torch's RNG; also valid after `to_empty`.

        Embedding and linears ~ N(0, init_std); the projections that write into the residual
        stream (wo, w2) are scaled by 1/sqrt(2 * n_layers) so the residual's variance does
        not grow with depth (GPT-2). Norm scales start at one.
        """
        cfg = self.cfg
        cos, sin = rope_tables(cfg, device=self.rope_cos.device)
        self.rope_cos.copy_(cos)
        self.rope_sin.copy_(sin)
        residual_std = cfg.init_std / math.sqrt(2 * cfg.n_layers)
        if self.tok_embeddings is not None:
            nn.init.normal_(self.tok_embeddings.weight, std=cfg.init_std)
        # By type, not through self.layers: blocks may be wrapped (checkpointing, compile).
        blocks = [m for m in self.modules() if isinstance(m, TransformerBlock)]
        for block in blocks:
            for linear in (block.attention.wq, block.attention.wk, block.attention.wv,
                           block.feed_forward.w1, block.feed_forward.w3):
                nn.init.normal_(linear.weight, std=cfg.init_std)
            nn.init.normal_(block.attention.wo.weight, std=residual_std)
            nn.init.normal_(block.feed_forward.w2.weight, std=residual_std)
            block.attention_norm.reset_parameters()
            block.ffn_norm.reset_parameters()
        if self.norm is not None:
            self.norm.reset_parameters()
        if self.output is not None and not cfg.tie_embeddings:
            nn.init.normal_(self.output.weight, std=cfg.init_std)

    def forward(self, tokens: torch.Tensor, documents: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for `tokens` [B, T]. With `documents` ([B, T] ids, see `document_ids`) each
        token attends only to earlier tokens of its own document (block-causal), as if every
        document of the packed sequence ran alone; without, to every earlier token (causal).

        A pipeline stage without the embedding takes the previous stage's hidden states as
        `tokens`; one without the output projection returns its hidden states."""
        mask = None if documents is None else attention_mask(documents, self.mask_kernel)
        h = tokens if self.tok_embeddings is None else self.tok_embeddings(tokens)
        for block in self.layers.values():
            h = block(h, self.rope_cos, self.rope_sin, mask)
        return h if self.output is None else self.output(self.norm(h))


def num_params(model_or_cfg: nn.Module | ModelConfig, exclude_embeddings: bool = False) -> int:
    """Parameters of a model (a tied matrix once; DTensors at their full size) or of a config.

    A config is counted by building its model on the meta device, so nothing is allocated.
    exclude_embeddings drops the input embedding table (vocab_size x dim); an untied output
    projection stays, since it is a matmul weight.
    """
    if isinstance(model_or_cfg, ModelConfig):
        with torch.device("meta"):
            model_or_cfg = Transformer(model_or_cfg)
    total = sum(p.numel() for p in model_or_cfg.parameters())  # parameters() visits shared ones once
    if exclude_embeddings:
        total -= sum(
            p.numel() for name, p in model_or_cfg.named_parameters() if name.endswith("tok_embeddings.weight")
        )
    return total


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * N_matmul + 12 * n_layers * dim * seq_len.

    N_matmul counts every weight used in a matmul per token: wq, wk, wv, wo, w1, w2, w3 of each
    block and the output projection (counted even when tied to the embedding, because the
    matmul happens either way); not the embedding lookup, not the norms. The factor 6 is
    forward (2) plus backward (4) FLOPs per weight per token; 12 * n_layers * dim * seq_len
    is the attention score and value matmuls (QK^T and AV, forward and backward), without the
    causal-mask saving. This is the convention of PaLM (Chowdhery et al. 2022, appendix B,
    "6N + 12LHQT") and Chinchilla (Hoffmann et al. 2022), which MFU figures are quoted in.
    """
    validate(cfg)
    head_dim = cfg.dim // cfg.n_heads
    attention = cfg.dim * head_dim * (2 * cfg.n_heads + 2 * cfg.n_kv_heads)  # wq, wo, wk, wv
    feed_forward = 3 * cfg.dim * ffn_hidden_dim(cfg)
    n_matmul = cfg.n_layers * (attention + feed_forward) + cfg.dim * cfg.vocab_size
    return float(6 * n_matmul + 12 * cfg.n_layers * cfg.dim * seq_len)
