"""Hugging Face Llama checkpoints in and out: the one module that knows their config.json, their
parameter names and their query/key layout.

In (`model.path=URL`, any fsspec URL):
- `resolve_pretrained(cfg)`, a start-up check, makes cfg.model the architecture of
  `URL/config.json`, or refuses in one line naming the field the harness cannot represent;
- `load_weights(model, cfg.model)` copies into every parameter (plain, or the FSDP / TP shard a
  DTensor holds) exactly the slice of the safetensors files it holds, read lazily through
  safetensors' `get_slice`: no rank reads or holds the whole model unless its layout does.
Out (train.export): `hf_name`, `to_hf` and `hf_config` give the names, tensors and config.json
transformers loads.

The RoPE layout. transformers' Llama rotates the two halves of each head (`rotate_half`:
dimension i pairs with i + head_dim/2); the harness rotates adjacent pairs (2i, 2i+1), as Meta's
original code does (train.model.apply_rope). The same model in the two layouts differs only by one
fixed permutation of the rows of wq and wk inside each head (the one transformers' own
convert_llama_weights_to_hf.py applies): q.k does not change when q and k are permuted alike, and
no other weight is affected. So the rows are permuted here, on the way in and back on the way
out, rather than giving the model a second RoPE mode: the model, its checkpoints and every layout
stay in one convention, the training step pays nothing, and a round trip is exact (a gather, no
arithmetic). The permutation stays inside a head, so a rank holding rows [a, b) of wq reads the
rows of the heads that cover [a, b) and picks its own: no collective, whatever the sharding.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from storage import fs as storage_fs
from storage.fs import has_protocol, retrying, url_to_fs
from storage.shards import DatasetIndex
from train.config import Config, ModelConfig, RopeScaling
from train.model import Transformer, ffn_hidden_dim, rope_tables

log = logging.getLogger(__name__)

ARCHITECTURE = "LlamaForCausalLM"
CONFIG, INDEX, SINGLE, TOKENIZER = "config.json", "model.safetensors.index.json", "model.safetensors", "tokenizer.json"
# Tensors some checkpoints carry that hold nothing to load (RoPE tables of old transformers versions).
_DERIVED = re.compile(r"\.rotary_emb\.inv_freq$")
# ModelConfig field -> the config.json field it comes from (for the messages).
ARCH_FIELDS = {
    "vocab_size": "vocab_size", "dim": "hidden_size", "n_layers": "num_hidden_layers",
    "n_heads": "num_attention_heads", "n_kv_heads": "num_key_value_heads",
    "ffn_hidden_dim": "intermediate_size", "max_seq_len": "max_position_embeddings",
    "rope_theta": "rope_theta", "norm_eps": "rms_norm_eps", "tie_embeddings": "tie_word_embeddings",
    "rope_scaling": "rope_scaling.rope_type", "rope_scaling_factor": "rope_scaling.factor",
    "rope_low_freq_factor": "rope_scaling.low_freq_factor",
    "rope_high_freq_factor": "rope_scaling.high_freq_factor",
    "rope_original_max_seq_len": "rope_scaling.original_max_position_embeddings",
}
_BLOCK = {"attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj",
          "attention.wv": "self_attn.v_proj", "attention.wo": "self_attn.o_proj",
          "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj",
          "feed_forward.w2": "mlp.down_proj", "attention_norm": "input_layernorm",
          "ffn_norm": "post_attention_layernorm"}
_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
# Parts of parameter names that wrappers add (DDP, activation checkpointing, torch.compile).
_WRAPPERS = re.compile(r"(^|\.)(module|_checkpoint_wrapped_module|_orig_mod|_fsdp_wrapped_module)(?=\.)")


class HFError(ValueError):
    """A Hugging Face model the harness cannot use as given: the message says which file or field."""


# -- config.json ---------------------------------------------------------------------------------
def read_config(path: str) -> dict[str, Any]:
    """`path`/config.json as a dict."""
    fs, root = url_to_fs(path)
    where = f"{path.rstrip('/')}/{CONFIG}"
    try:
        text = retrying(lambda: fs.cat_file(f"{root.rstrip('/')}/{CONFIG}"), what=f"read {where}")
    except FileNotFoundError:
        raise HFError(f"model.path={path} has no {CONFIG}: give the directory of a Hugging Face model "
                      f"({CONFIG} and model.safetensors, or {INDEX} and its shards)") from None
    try:
        hf = json.loads(text)
    except ValueError as exc:
        raise HFError(f"{where} is not JSON ({exc}); copy the model's {CONFIG} again") from None
    if not isinstance(hf, dict):
        raise HFError(f"{where} is not a JSON object; copy the model's {CONFIG} again")
    return hf


def model_config(hf: dict[str, Any], where: str) -> ModelConfig:
    """The harness's ModelConfig for a transformers LlamaConfig (`hf`, config.json's content;
    `where`, its URL for the messages). Refuses what the harness's model cannot represent."""

    def refuse(field: str, value: Any, why: str) -> HFError:
        return HFError(f"{where}: {field}={json.dumps(value)} cannot be trained here: {why}")

    if hf.get("model_type") != "llama":
        raise refuse("model_type", hf.get("model_type"), f"the harness builds Llama models ({ARCHITECTURE}, "
                     "model_type llama) only")
    if ARCHITECTURE not in (hf.get("architectures") or [ARCHITECTURE]):
        raise refuse("architectures", hf.get("architectures"), f"the harness builds {ARCHITECTURE} only")
    for flag in ("attention_bias", "mlp_bias"):
        if hf.get(flag):
            raise refuse(flag, hf[flag], "the harness's linear layers have no bias")
    if hf.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", hf["hidden_act"], "the harness's feed-forward is SwiGLU (silu)")
    if hf.get("quantization_config"):
        raise refuse("quantization_config", hf["quantization_config"].get("quant_method", "?"),
                     "quantized weights cannot be trained; use the model's bf16 or fp32 release")
    missing = [f for f in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if not isinstance(hf.get(f), int)]
    if missing:
        raise HFError(f"{where}: no integer {', '.join(missing)}: not a complete LlamaConfig")
    dim, heads = hf["hidden_size"], hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or dim // heads
    if head_dim * heads != dim:
        raise refuse("head_dim", head_dim, f"the harness's heads are hidden_size / num_attention_heads = "
                     f"{dim}/{heads} wide")
    max_seq_len = int(hf.get("max_position_embeddings", 2048))
    return ModelConfig(
        name=where, vocab_size=hf["vocab_size"], dim=dim, n_layers=hf["num_hidden_layers"], n_heads=heads,
        n_kv_heads=int(hf.get("num_key_value_heads") or heads), ffn_hidden_dim=hf["intermediate_size"],
        max_seq_len=max_seq_len, norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)), **_rope(hf, max_seq_len, refuse))


def _rope(hf: dict[str, Any], max_seq_len: int, refuse) -> dict[str, Any]:
    """The RoPE fields, from transformers 5's `rope_parameters` or the `rope_theta` and
    `rope_scaling` of the config.json files on the Hub (both name the type `rope_type`, older
    files `type`)."""
    key = "rope_parameters" if hf.get("rope_parameters") else "rope_scaling"
    params = hf.get(key) or {}
    if not isinstance(params, dict) or any(isinstance(v, dict) for v in params.values()):
        raise refuse(key, params, "the harness has one RoPE for every layer")
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise refuse("partial_rotary_factor", partial, "the harness rotates every dimension of a head")
    fields: dict[str, Any] = {"rope_theta": float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind == "default":
        return {**fields, "rope_scaling": RopeScaling.none}
    if kind != "llama3":
        raise refuse(f"{key}.rope_type", kind, "the harness implements RoPE scaling llama3 (Llama 3.1 and "
                     "later) or none")
    try:
        return {**fields, "rope_scaling": RopeScaling.llama3, "rope_scaling_factor": float(params["factor"]),
                "rope_low_freq_factor": float(params["low_freq_factor"]),
                "rope_high_freq_factor": float(params["high_freq_factor"]),
                "rope_original_max_seq_len": int(params.get("original_max_position_embeddings", max_seq_len))}
    except KeyError as exc:
        raise refuse(key, params, f"rope_type llama3 needs {exc.args[0]}") from None


def hf_config(cfg: ModelConfig, *, bos_id: int | None, eos_id: int | None, dtype: torch.dtype) -> dict[str, Any]:
    """config.json for `cfg`, as the Llama 3.x releases write it (`rope_theta` and `rope_scaling`,
    which transformers 4.43+ and 5, and vLLM, read)."""
    scaling = None
    if cfg.rope_scaling == RopeScaling.llama3:
        scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor,
                   "low_freq_factor": cfg.rope_low_freq_factor, "high_freq_factor": cfg.rope_high_freq_factor,
                   "original_max_position_embeddings": cfg.rope_original_max_seq_len}
    return {
        "architectures": [ARCHITECTURE], "model_type": "llama", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim, "intermediate_size": ffn_hidden_dim(cfg), "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.dim // cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "mlp_bias": False, "initializer_range": cfg.init_std,
        "bos_token_id": bos_id, "eos_token_id": eos_id, "use_cache": True,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def resolve_pretrained(cfg: Config) -> None:
    """With model.path set, make cfg.model the architecture of its config.json (resolved against
    storage.root), so that every check, the planner and the run see the real shape. A model field
    set otherwise that disagrees with config.json is refused: the weights fix the shape."""
    m = cfg.model
    if not m.path:
        if m.name == "hf":
            raise HFError("model=hf needs model.path=URL: the directory of a Hugging Face Llama model "
                          f"({CONFIG} and *.safetensors), local, on NVMe or s3://")
        return
    path = storage_fs.resolve(m.path, cfg.storage.root).rstrip("/")
    if has_protocol(path):
        storage_fs.configure(cfg.storage)  # s3:// needs the endpoint and TLS settings to read config.json
        storage_fs.check_reachable(path)
    arch = model_config(read_config(path), f"{path}/{CONFIG}")
    default = ModelConfig()
    for field, hf_field in ARCH_FIELDS.items():
        given, wanted = getattr(m, field), getattr(arch, field)
        if given != getattr(default, field) and given != wanted:
            raise HFError(f"model.{field}={given} disagrees with {path}/{CONFIG} ({hf_field}: {wanted}): with "
                          f"model.path the architecture is the checkpoint's; remove the model.{field} override")
    name = m.name if m.name not in ("hf", default.name) else path.rsplit("/", 1)[-1]
    cfg.model = dataclasses.replace(arch, name=name, path=path)


# -- parameter names and the RoPE permutation ----------------------------------------------------
def canonical(name: str) -> str:
    """A parameter's name without the parts wrappers add: `module.layers.0._orig_mod.x` -> `layers.0.x`."""
    return _WRAPPERS.sub("", name).lstrip(".")


def hf_name(name: str) -> str:
    """transformers' name of the harness's parameter `name` (wrapped or not)."""
    module, _, leaf = canonical(name).rpartition(".")
    if module.startswith("layers."):
        _, index, part = module.split(".", 2)
        return f"model.layers.{index}.{_BLOCK[part]}.{leaf}"
    return f"{_TOP[module]}.{leaf}"


def rope_heads(name: str, cfg: ModelConfig) -> int:
    """Heads whose rows the RoPE permutation reorders in parameter `name`: n_heads for wq,
    n_kv_heads for wk, 0 for every other parameter."""
    part = canonical(name)
    return cfg.n_heads if part.endswith("attention.wq.weight") else (
        cfg.n_kv_heads if part.endswith("attention.wk.weight") else 0)


def rope_permutation(heads: int, head_dim: int) -> torch.Tensor:
    """perm[r] = the transformers row of the harness's row r of wq/wk: per head, the harness's
    row 2i + j (pair i, member j) is transformers' row j * head_dim/2 + i."""
    return torch.arange(heads * head_dim).view(heads, 2, head_dim // 2).transpose(1, 2).reshape(-1)


def to_hf(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> torch.Tensor:
    """The harness's whole parameter `name` in transformers' layout (wq/wk rows permuted back)."""
    heads = rope_heads(name, cfg)
    if not heads:
        return tensor
    return tensor[torch.argsort(rope_permutation(heads, cfg.dim // cfg.n_heads))]


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """{transformers name: shape} of every tensor a LlamaForCausalLM checkpoint of `cfg` holds (a
    tied lm_head is the embedding, not a tensor of its own). From the config alone: no module is
    built (under DeepSpeed's zero.Init every module built would be partitioned)."""
    head_dim, ffn = cfg.dim // cfg.n_heads, ffn_hidden_dim(cfg)
    shapes = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.dim)}
    for i in range(cfg.n_layers):
        block = {"self_attn.q_proj": (cfg.n_heads * head_dim, cfg.dim),
                 "self_attn.k_proj": (cfg.n_kv_heads * head_dim, cfg.dim),
                 "self_attn.v_proj": (cfg.n_kv_heads * head_dim, cfg.dim),
                 "self_attn.o_proj": (cfg.dim, cfg.n_heads * head_dim),
                 "mlp.gate_proj": (ffn, cfg.dim), "mlp.up_proj": (ffn, cfg.dim), "mlp.down_proj": (cfg.dim, ffn),
                 "input_layernorm": (cfg.dim,), "post_attention_layernorm": (cfg.dim,)}
        shapes.update({f"model.layers.{i}.{part}.weight": shape for part, shape in block.items()})
    shapes["model.norm.weight"] = (cfg.dim,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.dim)
    return shapes


# -- weights in -----------------------------------------------------------------------------------
class SafetensorsWeights:
    """The safetensors files of a model directory, opened lazily (headers only) and checked
    against the shapes `cfg` implies before anything is copied: a missing or cut file, a missing,
    extra or misshapen tensor is refused in one line naming the file and the tensor."""

    def __init__(self, directory: str, url: str, cfg: ModelConfig, stack: contextlib.ExitStack) -> None:
        from safetensors import SafetensorError, safe_open

        self.url = url
        index = os.path.join(directory, INDEX)
        if os.path.exists(index):
            with open(index) as f:
                self.files: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(os.path.join(directory, SINGLE)):
            self.files = {}
        else:
            raise HFError(f"model.path={url} holds no weights: neither {SINGLE} nor {INDEX}")
        self.handles: dict[str, Any] = {}
        for file in sorted(set(self.files.values()) or {SINGLE}):
            path = os.path.join(directory, file)
            if not os.path.exists(path):
                raise HFError(f"{url}/{file} is missing ({INDEX} names it): copy the whole model directory")
            try:
                self.handles[file] = stack.enter_context(safe_open(path, framework="pt"))
            except SafetensorError as exc:
                raise HFError(f"{url}/{file} is not a whole safetensors file ({exc}): it was cut short or "
                              f"damaged; copy it again") from None
        held = {file: set(handle.keys()) for file, handle in self.handles.items()}
        self.files = self.files or dict.fromkeys(sorted(held[SINGLE]), SINGLE)
        self._check(expected_shapes(cfg), cfg, held)

    def _check(self, expected: dict[str, tuple[int, ...]], cfg: ModelConfig, held: dict[str, set[str]]) -> None:
        for name, file in self.files.items():
            if name not in held[file]:
                raise HFError(f"{self.url}/{file} has no tensor {name}, which {INDEX} places there: copy "
                              f"the model directory again")
        ignored = {n for n in self.files if _DERIVED.search(n)}
        if cfg.tie_embeddings:
            ignored.add("lm_head.weight")  # some tied checkpoints store the shared matrix twice
        extra = sorted(set(self.files) - set(expected) - ignored)
        if extra:
            raise HFError(f"{self.url}/{self.files[extra[0]]}: tensor {extra[0]} has no place in the model "
                          f"config.json describes ({len(extra)} such tensors): not a plain {ARCHITECTURE}")
        for name, shape in expected.items():
            if name not in self.files:
                raise HFError(f"{self.url}: no tensor {name} in the safetensors files, but config.json's model "
                              f"has it (tie_word_embeddings={str(cfg.tie_embeddings).lower()})")
            found = tuple(self.handles[self.files[name]].get_slice(name).get_shape())
            if found != shape:
                raise HFError(f"{self.url}/{self.files[name]}: tensor {name} is {list(found)}, but config.json "
                              f"makes it {list(shape)}: the weights and config.json are of different models")

    def read(self, name: str, index: tuple[slice, ...]) -> torch.Tensor:
        return self.handles[self.files[name]].get_slice(name)[index]


def load_weights(model: nn.Module, cfg: ModelConfig) -> float:
    """Copy cfg.path's weights into `model`, each parameter reading only the slice this rank
    holds (a DTensor's local shard; a plain parameter whole), and fill the RoPE tables (the
    model may come from `to_empty`). Returns the share of the model's elements this rank read.
    A pipeline stage (parallel.pp > 1) holds only its blocks (and the embedding or the output
    projection): it reads those, by their names, which are the whole model's.

    Under DeepSpeed's ZeRO-3 build (train.deepspeed_engine.partitioned_build) each write is handed
    its parameter whole, so a plain parameter's full copy is the right write there too.
    """
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shapes = expected_shapes(cfg)
    read, total = 0, sum(torch.Size(s).numel() for s in shapes.values())
    head_dim, loaded = cfg.dim // cfg.n_heads, set()
    with _local_copy(cfg.path) as directory, contextlib.ExitStack() as stack, torch.no_grad():
        weights = SafetensorsWeights(directory, cfg.path, cfg, stack)
        for name, param in model.named_parameters():
            source = hf_name(name)
            loaded.add(source)
            target, full = param, shapes[source]
            shape, offset = full, (0,) * len(full)
            if isinstance(param, DTensor):
                target = param.to_local()
                shape, offset = compute_local_shape_and_global_offset(full, param.device_mesh, param.placements)
            if not torch.Size(shape).numel():
                continue
            index = tuple(slice(o, o + s) for o, s in zip(offset, shape))
            heads = rope_heads(name, cfg)
            if heads:  # this rank's rows, gathered from the rows of the heads that hold them
                rows = rope_permutation(heads, head_dim)[index[0]]
                low = int(rows.min())
                tensor = weights.read(source, (slice(low, int(rows.max()) + 1), *index[1:]))[rows - low]
            else:
                tensor = weights.read(source, index)
            target.copy_(tensor)
            read += tensor.numel()
    if loaded != set(shapes) and not _is_stage(model):  # the model and expected_shapes disagree: a bug, not bad input
        raise RuntimeError(f"loaded {sorted(loaded ^ set(shapes))[:3]}...: the model's parameters are not "
                           f"the checkpoint's tensors")
    fill_rope(model)
    log.info("model %s: %.1fM parameters from %s; this rank read %.1f%% of them (the slices it holds)",
             cfg.name, total / 1e6, cfg.path, 100 * read / total)
    return read / total


def _is_stage(model: nn.Module) -> bool:
    """Whether `model` is a pipeline stage (`train.pipeline.cut`), which holds only some of the tensors."""
    return any(isinstance(m, Transformer) and (m.tok_embeddings is None or m.output is None
                                               or len(m.layers) < m.cfg.n_layers) for m in model.modules())


def materialise(model: nn.Module, device: torch.device | str) -> None:
    """`to_empty` on `device`, keeping a tied output projection tied: a plain module's shared
    parameter would come back as two (DTensor parameters made by FSDP or TP stay one)."""
    model.to_empty(device=device)
    tied = isinstance(model, Transformer) and model.cfg.tie_embeddings
    if tied and model.output.weight is not model.tok_embeddings.weight:
        model.output.weight = model.tok_embeddings.weight


def pretrained_model(cfg: ModelConfig, device: torch.device | str = "cpu") -> Transformer:
    """cfg.path's model whole in this one process (train.generate, tests)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    materialise(model, device)
    load_weights(model, cfg)
    return model


def fill_rope(model: nn.Module) -> None:
    """Recompute every Transformer's RoPE buffers (not in checkpoints; garbage after `to_empty`)."""
    for module in model.modules():
        if isinstance(module, Transformer):
            cos, sin = rope_tables(module.cfg, device=module.rope_cos.device)
            module.rope_cos.copy_(cos)
            module.rope_sin.copy_(sin)


@contextlib.contextmanager
def _local_copy(url: str) -> Iterator[str]:
    """A local directory holding `url`'s weights: `url` itself when it is local, else a copy on
    this node's disk ($TMPDIR), fetched once per node by its local rank 0 (safetensors reads
    slices from local files only) and removed when every rank has read its slices."""
    if not has_protocol(url) or url.startswith("file://"):
        yield os.path.expanduser(url.removeprefix("file://"))
        return
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    launcher = os.getppid() if "LOCAL_RANK" in os.environ else os.getpid()  # one per node and job
    key = hashlib.sha1(f"{url}|{launcher}".encode()).hexdigest()[:12]
    directory = Path(tempfile.gettempdir()) / "train-harness-hf" / key
    error = None
    if local_rank == 0:
        try:
            _download(url, directory)
        except Exception as exc:  # noqa: BLE001 - every rank raises it, after the barrier
            error = exc
    _barrier()
    try:
        if error is not None:
            raise error
        if not directory.exists():
            raise HFError(f"model.path={url}: the node's copy in {directory} is missing (local rank 0 failed)")
        yield str(directory)
    finally:
        _barrier()
        if local_rank == 0:
            shutil.rmtree(directory, ignore_errors=True)


def _download(url: str, directory: Path) -> None:
    """The index and the safetensors files of `url` into `directory`, each checked for its size."""
    fs, root = url_to_fs(url)
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir(parents=True)
    listing = {e["name"].rsplit("/", 1)[-1]: e["size"] for e in retrying(
        lambda: fs.ls(root, detail=True), what=f"list {url}")}
    names = [n for n in listing if n == INDEX or n.endswith(".safetensors")]
    if INDEX in listing:
        retrying(lambda: fs.get_file(f"{root}/{INDEX}", str(directory / INDEX)), what=f"download {url}/{INDEX}")
        with open(directory / INDEX) as f:
            names = [INDEX, *sorted(set(json.load(f)["weight_map"].values()) & set(listing))]
    for name in names:
        target = directory / name
        retrying(lambda name=name, target=target: fs.get_file(f"{root}/{name}", str(target)),
                 what=f"download {url}/{name}")
        if target.stat().st_size != listing[name]:
            raise HFError(f"{url}/{name}: downloaded {target.stat().st_size} of its {listing[name]} bytes")
    log.info("model.path %s: copied %d files to %s to read slices from", url, len(names), directory)


def _barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


# -- tokenizer ---------------------------------------------------------------------------------
def tokenizer_url(path: str) -> str:
    return f"{path.rstrip('/')}/{TOKENIZER}"


def check_dataset(cfg: ModelConfig, indexes: list[DatasetIndex]) -> None:
    """Refuse datasets the model would misread: made with another tokenizer than the model's own
    tokenizer.json, or with more token ids than its embedding has rows."""
    url = tokenizer_url(cfg.path)
    fs, path = url_to_fs(url)
    data = retrying(lambda: fs.cat_file(path) if fs.exists(path) else None, what=f"read {url}")
    fingerprint = hashlib.sha256(data).hexdigest() if data is not None else None
    if fingerprint is None:
        log.warning("model.path %s has no %s: the datasets' tokenizer cannot be checked against the model's",
                    cfg.path, TOKENIZER)
    for index in indexes:
        tok = index.tokenizer
        if fingerprint is not None and tok.fingerprint != fingerprint:
            raise HFError(
                f"dataset {index.url} was made with tokenizer {tok.name} (fingerprint {tok.fingerprint[:12]}), "
                f"not with the model's {url} (fingerprint {fingerprint[:12]}): its token ids mean other text to "
                f"this model. Prepare it with the model's tokenizer: python -m storage.prepare --tokenizer {url} "
                f"--input ... --output ...")
        if tok.vocab_size > cfg.vocab_size:
            raise HFError(f"dataset {index.url} was made with tokenizer {tok.name} of {tok.vocab_size} ids, but "
                          f"the model at {cfg.path} embeds {cfg.vocab_size}: prepare it with the model's "
                          f"tokenizer ({url})")
