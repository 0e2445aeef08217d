"""Every native layout computes the same step as one process: same loss, gradient norm, weights.

One fixed tiny model (fp32, tied embeddings) and one fixed batch. The reference is the plain
model on the whole batch, computed in the test process. Each layout runs on gloo ranks, each
data-parallel rank on its share of the batch, and takes one clipped SGD step. SGD rather
than AdamW because Adam's update is nearly blind to a wrong gradient scale (a sum where a
mean belongs); clipping is on (max norm below the actual norm) so the clip path is
exercised, and the returned norm is compared too, which catches a scale error on its own.

Tolerances, fp32 on the CPU. Splitting the batch over ranks or a matmul over TP shards
reorders floating-point sums: about 1e-7 relative per reduction, a few reductions deep.
- loss and gradient norm: rtol 1e-5, atol 1e-6 (5.5 nats; a norm of order 1);
- weights after the step: rtol 1e-4, atol 1e-6; the step moves them by about 1e-3, so a
  wrong or unsynchronised gradient shows up three orders of magnitude above that.
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tests.distributed import REPO, spawn
from train.config import ModelConfig, ParallelConfig
from train.model import Transformer, document_ids, flops_per_token, num_params, validate
from train.parallelize import backward_context, clip_grad_norm_, cross_entropy, grad_sync, parallelize, validate_tp

LOSS_TOL = dict(rtol=1e-5, atol=1e-6)
PARAM_TOL = dict(rtol=1e-4, atol=1e-6)
BATCH, SEQ_LEN, LR, MAX_NORM = 4, 32, 1.0, 0.1
CPU = torch.device("cpu")


def _model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig())


def _batch(documents: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Random tokens; with `documents`, eos (0) at a few places, so that each row packs documents."""
    tokens = torch.randint(1, 256, (BATCH, SEQ_LEN + 1), generator=torch.Generator().manual_seed(1))
    if documents:
        tokens[0, [5, 6, 20]] = tokens[1, 11] = tokens[3, [2, 30]] = 0
    return tokens[:, :-1], tokens[:, 1:]


def _unwrapped_name(name: str) -> str:
    name = name.replace("_checkpoint_wrapped_module.", "").replace("_orig_mod.", "")
    return name.removeprefix("module.")


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {
        _unwrapped_name(name): (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for name, p in model.named_parameters()
    }


def _step(model: torch.nn.Module, inputs: torch.Tensor, targets: torch.Tensor, micro_batches: int = 1,
          documents: bool = False, fsdp_reduce_per_micro_batch: bool = True):
    """Forward, backward (accumulating over micro_batches), clip, SGD step; return (loss, norm).
    With `documents`, attention is masked to the documents that eos (0) separates. The loss is
    the engines' (`cross_entropy`: vocabulary-parallel on TP's sharded logits)."""
    total = 0.0
    for i, (x, y) in enumerate(zip(inputs.chunk(micro_batches), targets.chunk(micro_batches))):
        with grad_sync(model, enabled=i == micro_batches - 1, fsdp_reduce_per_micro_batch=fsdp_reduce_per_micro_batch):
            logits = model(x, document_ids(x, 0) if documents else None)
            loss = cross_entropy(logits, y) / micro_batches
            with backward_context():
                loss.backward()
        total += loss.item()
    norm = clip_grad_norm_(model, MAX_NORM).item()
    torch.optim.SGD(model.parameters(), lr=LR).step()
    return total, norm


@pytest.fixture(scope="module")
def reference() -> dict:
    model = _model()
    loss, norm = _step(model, *_batch())
    assert norm > MAX_NORM, "the test must exercise clipping"
    return {"loss": loss, "norm": norm, "params": _full_params(model)}


@pytest.fixture(scope="module")
def reference_documents() -> dict:
    """The reference step on a batch of packed documents, with data.document_mask's masking."""
    model = _model()
    loss, norm = _step(model, *_batch(documents=True), documents=True)
    return {"loss": loss, "norm": norm, "params": _full_params(model)}


def _run_layout(rank: int, world_size: int, dp: int, tp: int, parallel: dict, micro_batches: int,
                documents: bool = False) -> dict:
    mesh = init_device_mesh("cpu", (dp, tp), mesh_dim_names=("dp", "tp"))
    config = ParallelConfig(**parallel)
    model = parallelize(_model(), mesh, config, CPU)
    inputs, targets = _batch(documents)
    dp_rank = mesh["dp"].get_local_rank()
    share = slice(dp_rank * BATCH // dp, (dp_rank + 1) * BATCH // dp)
    with torch.no_grad():
        logits = model(inputs[:1])
    logits_vocab = (logits.to_local() if isinstance(logits, DTensor) else logits).shape[-1]
    loss, norm = _step(model, inputs[share], targets[share], micro_batches, documents,
                       config.fsdp_reduce_per_micro_batch)
    loss_t = torch.tensor(loss)
    dist.all_reduce(loss_t)
    loss = loss_t.item() / world_size  # every tp rank of a dp group holds the same loss
    params = _full_params(model)  # collective for DTensors: every rank takes part
    return {"loss": loss, "norm": norm, "params": params if rank == 0 else None, "logits_vocab_per_rank": logits_vocab}


def _layouts_worker(rank: int, world_size: int, layouts: dict) -> dict:
    """Run every layout in one set of processes: starting ranks costs far more than a step."""
    special = {"meta_init": _meta_init, "fsdp_bf16_rope": _fsdp_bf16_rope}
    return {
        name: special[layout](rank, world_size) if isinstance(layout, str) else _run_layout(rank, world_size, *layout)
        for name, layout in layouts.items()
    }


# name: (dp, tp, ParallelConfig fields, micro-batches per rank[, document mask])
TWO_RANKS = {
    "ddp": (2, 1, dict(data_parallel="ddp"), 1),
    "fsdp": (2, 1, dict(data_parallel="fsdp"), 1),
    "ddp_accumulating": (2, 1, dict(data_parallel="ddp"), 2),
    "fsdp_accumulating": (2, 1, dict(data_parallel="fsdp"), 2),
    "fsdp_accumulating_unsharded": (2, 1, dict(data_parallel="fsdp", fsdp_reduce_per_micro_batch=False), 2),
    "fsdp_selective_checkpointing": (2, 1, dict(data_parallel="fsdp", activation_checkpointing="selective"), 1),
    "fsdp_bf16_rope": "fsdp_bf16_rope",
    "tp": (1, 2, dict(data_parallel="fsdp", tp=2), 1),
    "tp_sequence_parallel": (1, 2, dict(data_parallel="fsdp", tp=2, sequence_parallel=True), 1),
    "tp_sequence_parallel_documents": (1, 2, dict(data_parallel="fsdp", tp=2, sequence_parallel=True), 1, True),
}
FOUR_RANKS = {
    "fsdp_tp_checkpointed": (2, 2, dict(data_parallel="fsdp", dp=2, tp=2, activation_checkpointing="full"), 1),
    "fsdp_tp_checkpointed_documents": (2, 2, dict(data_parallel="fsdp", dp=2, tp=2, activation_checkpointing="full"),
                                       1, True),
    "meta_init": "meta_init",
}


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    return _by_layout(spawn(_layouts_worker, 2, TWO_RANKS))


@pytest.fixture(scope="module")
def four_ranks() -> dict:
    return _by_layout(spawn(_layouts_worker, 4, FOUR_RANKS))


def _by_layout(per_rank: list[dict]) -> dict[str, list[dict]]:
    return {name: [rank_results[name] for rank_results in per_rank] for name in per_rank[0]}


def _assert_matches(reference: dict, results: list[dict]) -> None:
    for result in results:
        torch.testing.assert_close(result["loss"], reference["loss"], **LOSS_TOL)
        torch.testing.assert_close(result["norm"], reference["norm"], **LOSS_TOL)
    params = results[0]["params"]
    assert params.keys() == reference["params"].keys()
    for name, expected in reference["params"].items():
        torch.testing.assert_close(params[name], expected, **PARAM_TOL, msg=lambda m: f"{name}: {m}")


def test_ddp_on_two_ranks_matches_one_process(reference: dict, two_ranks: dict) -> None:
    _assert_matches(reference, two_ranks["ddp"])


def test_fsdp_on_two_ranks_matches_one_process_and_ddp(reference: dict, two_ranks: dict) -> None:
    _assert_matches(reference, two_ranks["fsdp"])
    # and DDP directly, at the tolerance of either against the reference
    for name, param in two_ranks["ddp"][0]["params"].items():
        torch.testing.assert_close(two_ranks["fsdp"][0]["params"][name], param, **PARAM_TOL)


@pytest.mark.parametrize("layout", ["ddp_accumulating", "fsdp_accumulating", "fsdp_accumulating_unsharded"])
def test_gradient_accumulation_without_sync_matches_one_process(reference: dict, two_ranks: dict,
                                                                 layout: str) -> None:
    # Two micro-batches per rank, the first under grad_sync(enabled=False); FSDP reduce-scatters
    # each micro-batch (the default) or accumulates unsharded gradients and reduces once.
    _assert_matches(reference, two_ranks[layout])


def test_selective_activation_checkpointing_matches_one_process(reference: dict, two_ranks: dict) -> None:
    _assert_matches(reference, two_ranks["fsdp_selective_checkpointing"])


def _fsdp_bf16_rope(rank: int, world_size: int) -> dict:
    """The dtypes a block's attention receives under FSDP2 with bf16: the residual stream in
    bf16, the RoPE tables in fp32 (as DDP and DeepSpeed compute them)."""
    mesh = init_device_mesh("cpu", (2, 1), mesh_dim_names=("dp", "tp"))
    model = parallelize(_model(), mesh, ParallelConfig(data_parallel="fsdp", mixed_precision="bf16"), CPU)
    seen = {}
    attention = model.layers["1"].attention
    attention.register_forward_pre_hook(lambda module, args: seen.update(x=str(args[0].dtype), cos=str(args[1].dtype),
                                                                          sin=str(args[2].dtype)))
    model(_batch()[0])
    return seen  # dtypes as names: the results travel back through a manager process


def test_rope_tables_stay_fp32_under_fsdp_bf16(two_ranks: dict) -> None:
    for seen in two_ranks["fsdp_bf16_rope"]:
        assert seen == {"x": "torch.bfloat16", "cos": "torch.float32", "sin": "torch.float32"}, seen


def test_tensor_parallel_logits_stay_sharded_over_the_vocabulary(two_ranks: dict) -> None:
    """Loss parallel: under TP no rank holds the whole [tokens, vocabulary] logits (the loss
    still matches: test_tensor_parallel_on_two_ranks_matches_one_process)."""
    assert [r["logits_vocab_per_rank"] for r in two_ranks["tp"]] == [128, 128]  # of 256
    assert [r["logits_vocab_per_rank"] for r in two_ranks["fsdp"]] == [256, 256]


def test_tensor_parallel_on_two_ranks_matches_one_process(reference: dict, two_ranks: dict) -> None:
    _assert_matches(reference, two_ranks["tp"])


def test_sequence_parallel_on_two_ranks_matches_one_process(reference: dict, two_ranks: dict) -> None:
    _assert_matches(reference, two_ranks["tp_sequence_parallel"])


def test_2d_fsdp_tp_with_checkpointing_on_four_ranks_matches_one_process(reference: dict,
                                                                          four_ranks: dict) -> None:
    _assert_matches(reference, four_ranks["fsdp_tp_checkpointed"])


def test_document_mask_under_tp_and_fsdp_x_tp_matches_one_process(reference: dict, reference_documents: dict,
                                                                   two_ranks: dict, four_ranks: dict) -> None:
    """data.document_mask's mask reaches every block through the TP plans (sequence parallel
    gathers the sequence before attention) and activation checkpointing."""
    _assert_matches(reference_documents, two_ranks["tp_sequence_parallel_documents"])
    _assert_matches(reference_documents, four_ranks["fsdp_tp_checkpointed_documents"])
    assert abs(reference_documents["loss"] - _step(_model(), *_batch(documents=True))[0]) > 1e-4  # the mask matters


def _meta_init(rank: int, world_size: int) -> dict:
    """Build on meta, shard 2-D, materialise and initialise: what big models do."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    with torch.device("meta"):
        model = Transformer(ModelConfig())
    model = parallelize(model, mesh, ParallelConfig(data_parallel="fsdp", tp=2, activation_checkpointing="full"), CPU)
    model.to_empty(device=CPU)
    torch.manual_seed(0)
    model.init_weights()
    inputs, targets = _batch()
    loss = cross_entropy(model(inputs), targets).item()
    return {
        "tied": model.output.weight is model.tok_embeddings.weight,
        "embedding_std": model.tok_embeddings.weight.full_tensor().std().item(),
        "rope_cos_max_error": (model.rope_cos - Transformer(ModelConfig()).rope_cos).abs().max().item(),
        "loss": loss,
    }


def test_model_built_on_meta_materialises_sharded_with_tied_weight(four_ranks: dict) -> None:
    for result in four_ranks["meta_init"]:
        assert result["tied"]
        assert result["embedding_std"] == pytest.approx(0.02, rel=0.05)
        assert result["rope_cos_max_error"] == 0.0
        assert result["loss"] == pytest.approx(torch.log(torch.tensor(256.0)).item(), abs=0.1)


class _SizesOnlyMesh:
    """A stand-in for a DeviceMesh whose sizes are all `parallelize` reads before refusing."""

    def __init__(self, dp: int, tp: int):
        self.sizes = {"dp": dp, "tp": tp}

    def __getitem__(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(size=lambda: self.sizes[name])


def test_ddp_with_tensor_parallel_is_refused_with_the_fix() -> None:
    from train.checks import check_parallel  # the start-up check, before any model is built

    with pytest.raises(ValueError, match=r"data_parallel=ddp cannot be combined.*parallel=fsdp_tp"):
        check_parallel(ParallelConfig(data_parallel="ddp", tp=2), dp=2, tp=2)


def test_ddp_of_a_meta_model_is_refused() -> None:
    with torch.device("meta"):
        model = Transformer(ModelConfig())
    with pytest.raises(ValueError, match=r"ddp needs materialised parameters"):
        parallelize(model, _SizesOnlyMesh(2, 1), ParallelConfig(data_parallel="ddp"), CPU)


def test_tp_degree_must_divide_heads() -> None:
    with pytest.raises(ValueError, match=r"tp=4 must divide n_kv_heads=2"):
        validate_tp(ModelConfig(), 4)
    with pytest.raises(ValueError, match=r"tp=3 must divide n_heads=4"):
        validate_tp(ModelConfig(), 3)
    validate_tp(ModelConfig(), 2)


def test_bad_model_shapes_are_refused() -> None:
    with pytest.raises(ValueError, match=r"dim=130 must be divisible by n_heads=4"):
        validate(ModelConfig(dim=130))
    with pytest.raises(ValueError, match=r"n_heads=4 must be divisible by n_kv_heads=3"):
        validate(ModelConfig(n_kv_heads=3))


def test_flops_per_token_formula() -> None:
    # tiny: dim 128, 4 layers, 4 query / 2 kv heads of 32, SwiGLU hidden 8/3*128=341 -> 352, vocab 256.
    attention = 128 * 128 + 2 * (128 * 64) + 128 * 128  # wq, wk + wv, wo
    feed_forward = 3 * 128 * 352
    n_matmul = 4 * (attention + feed_forward) + 128 * 256  # + the (tied) output projection
    expected = 6 * n_matmul + 12 * 4 * 128 * 256
    assert flops_per_token(ModelConfig(), 256) == expected == 6 * 770_048 + 1_572_864


def _preset(name: str) -> ModelConfig:
    import yaml

    return ModelConfig(**yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text()))


@pytest.mark.parametrize("name, expected", [
    # Counted once when tied. tiny is 0.77M; llama_124m is 124.7M with its untied output
    # projection; llama_1b is Llama 3.2 1B's 1.24B (128k vocabulary, tied).
    ("tiny", 771_200),
    ("llama_124m", 124_668_672),
    ("llama_1b", 1_235_814_400),
    ("llama_8b", 8_030_261_248),
])
def test_preset_param_counts(name: str, expected: int) -> None:
    cfg = _preset(name)
    assert num_params(cfg) == expected  # built on the meta device: nothing allocated
    assert num_params(cfg, exclude_embeddings=True) == expected - cfg.vocab_size * cfg.dim
    if name == "tiny":
        assert num_params(Transformer(cfg)) == expected


def test_untied_output_projection_is_its_own_matrix() -> None:
    tied, untied = ModelConfig(), replace(ModelConfig(), tie_embeddings=False)
    assert num_params(untied) - num_params(tied) == 256 * 128
    model = Transformer(tied)
    assert model.output.weight is model.tok_embeddings.weight
    assert "rope_cos" not in model.state_dict()
