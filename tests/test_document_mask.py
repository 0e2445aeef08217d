"""data.document_mask: a packed sample trains as if each of its documents ran alone.

The fact users rely on: with the mask, the logits (and so the loss) of a sequence that packs
several documents equal those of each document run through the model on its own. Positions
are not reset per document; RoPE makes attention depend on relative positions only, so the
difference is floating-point rounding (fp32 on the CPU: ~1e-6).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from tests.conftest import FAST
from tests.distributed import train
from train.config import ModelConfig
from train.model import Transformer, attention_mask, document_ids

EOS = 0
TOL = dict(rtol=1e-5, atol=1e-5)


def _packed(lengths: list[int], seed: int) -> torch.Tensor:
    """One row of documents of the given lengths (each ending in eos except the last, which
    runs on past the row, as a window cut from the token stream does)."""
    gen = torch.Generator().manual_seed(seed)
    parts = []
    for i, n in enumerate(lengths):
        doc = torch.randint(1, 256, (n,), generator=gen)
        if i < len(lengths) - 1:
            doc[-1] = EOS
        parts.append(doc)
    return torch.cat(parts)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig()).eval()  # the tiny preset: GQA (4 heads, 2 kv heads), tied


ROWS = [[7, 20, 1, 12, 24], [64]]  # a one-token document; a row that is one document


def _alone(model: Transformer, row: torch.Tensor) -> torch.Tensor:
    """The row's logits with each document run through the model on its own."""
    ends = (row == EOS).nonzero().flatten().tolist()
    bounds = [0] + [e + 1 for e in ends if e + 1 < len(row)] + [len(row)]
    return torch.cat([model(row[a:b][None])[0] for a, b in zip(bounds, bounds[1:])])


@torch.no_grad()
def test_packed_logits_with_the_mask_equal_each_document_run_alone(model: Transformer) -> None:
    tokens = torch.stack([_packed(lengths, seed) for seed, lengths in enumerate(ROWS)])
    masked = model(tokens, document_ids(tokens, EOS))
    for row, logits in zip(tokens, masked):
        torch.testing.assert_close(logits, _alone(model, row), **TOL)
    # Without the mask the later documents see the earlier ones: the test can tell.
    plain = model(tokens)
    assert (plain[0, 30:] - masked[0, 30:]).abs().max() > 1e-2
    torch.testing.assert_close(plain[1], masked[1], **TOL)  # one document: the mask changes nothing


@torch.no_grad()
def test_masked_loss_equals_the_per_document_losses(model: Transformer) -> None:
    """The packed batch's mean loss is the token-weighted mean of its documents' own losses
    (each document's last token predicts the next document's first, as in the packed stream)."""
    row = _packed([9, 30, 26], seed=3)
    inputs, targets = row[:-1], row[1:]
    packed = F.cross_entropy(model(inputs[None], document_ids(inputs[None], EOS))[0], targets)
    per_token = F.cross_entropy(_alone(model, inputs), targets, reduction="none")
    torch.testing.assert_close(packed, per_token.mean(), **TOL)


@torch.no_grad()
def test_flex_attention_kernel_equals_the_sdpa_mask(model: Transformer) -> None:
    """The GPU's kernel (FlexAttention's block mask; eager here, forward only: torch has no
    FlexAttention backward on the CPU) gives the CPU's logits."""
    tokens = torch.stack([_packed([5, 40, 19], seed=4), _packed([33, 31], seed=5)])
    documents = document_ids(tokens, EOS)
    logits = {}
    for kernel in ("sdpa", "flex"):
        model.mask_kernel = kernel
        try:
            logits[kernel] = model(tokens, documents)
        finally:
            model.mask_kernel = None
    torch.testing.assert_close(logits["flex"], logits["sdpa"], **TOL)


def test_documents_start_after_eos_and_at_bos() -> None:
    eos, bos = 0, 1
    tokens = torch.tensor([[5, 0, 1, 7, 0, 1, 8, 9], [1, 4, 0, 6, 6, 1, 3, 0]])
    assert document_ids(tokens, eos, bos).tolist() == [[0, 0, 1, 1, 1, 2, 2, 2], [1, 1, 1, 2, 2, 3, 3, 3]]
    assert document_ids(tokens, eos).tolist() == [[0, 0, 1, 1, 1, 2, 2, 2], [0, 0, 0, 1, 1, 1, 1, 1]]
    mask = attention_mask(document_ids(tokens[:1], eos, bos), "sdpa")[0, 0]
    assert mask[3].tolist() == [False, False, True, True, False, False, False, False]
    with pytest.raises(ValueError, match="'flex' or 'sdpa'"):
        attention_mask(document_ids(tokens, eos), "flash")


def test_run_with_document_mask_trains_on_the_masked_loss(tmp_path: Path) -> None:
    """`data.document_mask=true` reaches the model: the run's first loss is the one computed
    here from the same initial weights and first batch with each document alone, not the
    causal one."""
    from storage.dataset import BatchStream
    from storage.prepare import main as prepare
    from storage.shards import read_index
    from train.build import _whole_model
    from train.config import Config, to_object

    (tmp_path / "docs").mkdir()  # short documents: every sample packs several
    rng = np.random.default_rng(0)
    for i in range(300):
        words = rng.choice(["alpha", "beta", "gamma", "delta", "pi", "rho"], size=rng.integers(3, 30))
        (tmp_path / "docs" / f"{i}.txt").write_text(" ".join(words))
    assert prepare(["--input", str(tmp_path / "docs"), "--output", str(tmp_path / "ds"), "--val-fraction", "0.05"]) == 0
    run = train([*FAST, "data=shards", f"data.url={tmp_path / 'ds'}", "trainer.max_steps=1",
                 "data.document_mask=true", f"run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode == 0, run.output
    written = OmegaConf.load(tmp_path / "r" / "config.yaml")  # the resolved config and the run's facts
    cfg = to_object(OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.masked_copy(written, list(Config.__dataclass_fields__))))
    assert cfg.data.document_mask is True
    stream = BatchStream(read_index(str(tmp_path / "ds")), "train", cfg.data.seq_len, cfg.trainer.seed,
                         cfg.trainer.global_batch_tokens // cfg.data.seq_len, cfg.trainer.micro_batch_size, 0, 1)
    model = _whole_model(cfg, torch.device("cpu"))
    masked, causal = [], []
    with torch.no_grad():
        for batch in stream.next_step():
            batch = batch.long()
            inputs, targets = batch[:, :-1], batch[:, 1:]
            for mask, out in ((document_ids(inputs, EOS), masked), (None, causal)):
                out.append(F.cross_entropy(model(inputs, mask).flatten(0, 1), targets.flatten()))
    first = json.loads((tmp_path / "r" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(float(torch.stack(masked).mean()), rel=1e-4)
    assert first["loss"] != pytest.approx(float(torch.stack(causal).mean()), rel=1e-4)


def test_bos_starts_each_prepared_document(tmp_path: Path) -> None:
    """A tokenizer with a begin-of-text token: storage.prepare writes bos, text, eos for each
    document, and index.json records both ids."""
    tokenizers = pytest.importorskip("tokenizers")
    from storage.prepare import main as prepare
    from storage.shards import read_index

    vocab = {chr(c): c - 32 for c in range(32, 127)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="~"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    tok.add_special_tokens(["<|end_of_text|>", "<|begin_of_text|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "docs").mkdir()
    for name, text in (("a.txt", "abc"), ("b.txt", "de")):
        (tmp_path / "docs" / name).write_text(text)
    out = tmp_path / "ds"
    assert prepare(["--input", str(tmp_path / "docs"), "--output", str(out), "--tokenizer", str(tmp_path / "tokenizer.json"),
                    "--val-fraction", "0"]) == 0
    index = read_index(str(out))
    eos, bos = index.tokenizer.eos_id, index.tokenizer.bos_id
    assert (eos, bos) == (len(vocab), len(vocab) + 1)
    tokens = np.fromfile(out / index.splits["train"][0].file, dtype=index.dtype).tolist()
    assert tokens == [bos, *(vocab[c] for c in "abc"), eos, bos, *(vocab[c] for c in "de"), eos]
