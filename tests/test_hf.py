"""Hugging Face Llama models in and out: `model=hf model.path=URL`, `python -m train.export`,
`python -m train.generate`, with transformers as the reference (no download: small random
models from LlamaConfig and save_pretrained, a BPE tokenizer trained here).

Shared runs (module fixtures, one process tree each): the tiny model imported on 1 rank (2 steps,
a checkpoint after each), under FSDP on 2, TP on 2, FSDP x TP on 4 and DeepSpeed ZeRO-3 on 2 (1 step
each), all on the same dataset prepared with the model's own tokenizer.json.

Tolerances, fp32 on the CPU:
- logits against transformers: 1e-5 absolute (observed 2e-7 to 5e-7: the two compute the same
  products in another order; a wrong RoPE row order or frequency is off by O(1));
- first-step loss on other layouts: relative 1e-5 (only the order of fp32 sums differs);
- ZeRO-3's exported weights against the native engine's after the same step: 1e-5 absolute (the
  step moves them by about 2e-4, Adam's first step; observed 2e-6).
Import then export, and generate, are compared exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch

from tests.ceph_fixture import Ceph
from tests.conftest import FAST
from tests.distributed import REPO, Run, base_env, finish, start, train

if find_spec("transformers") is None and os.environ.get("CI") != "true":  # in CI: fail on the import
    pytest.skip("transformers is not installed (pip install -e '.[test]')", allow_module_level=True)
import transformers  # the test extra brings it, and safetensors
from safetensors.torch import load_file

from launch.compose import load
from launch.plan import run_plan
from storage.checkpoint import Checkpointer
from storage.shards import read_index
from storage.tokenizer import HFTokenizer
from train import export, generate, hf
from train.build import checkpoint_meta
from train.checks import startup_checks
from train.config import Config, OptimConfig
from train.distributed import LayoutError
from train.engine import ModelAndOptimizer
from train.model import Transformer, num_params
from train.optim import build_optimizer

# DCP in this one process (a checkpoint saved and read without a process group) says so; it is meant.
pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled")

CORPUS = Path(logging.__file__).parent  # ~180 kB of text that every Python has
SHAPE = {"vocab_size": 320, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
         "num_attention_heads": 4, "max_position_embeddings": 256, "bos_token_id": 0, "eos_token_id": 1}
# Llama 3.1's scaling on a short original context, so the 200-token inputs reach past it and the
# band between low and high frequencies is populated (head_dim 16, theta 5e5: wavelengths 6 to 1e5).
LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
PLAIN = {"rope_type": "default", "rope_theta": 10000.0}
RUN = [*FAST, "model=hf", "data=shards", "trainer.max_steps=1", "checkpoint.interval=1"]


def _llama(directory: Path, *, kv_heads: int = 2, tied: bool = False, rope: dict = LLAMA3,
           dtype: torch.dtype = torch.float32, shard: str = "60KB", shape: dict = SHAPE):
    """A random LlamaForCausalLM saved with save_pretrained (sharded, with an index)."""
    config = transformers.LlamaConfig(**shape, num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                                      rope_parameters=dict(rope))
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(dtype).eval()
    model.save_pretrained(directory, max_shard_size=shard)
    return model


def _tokenizer(directory: Path) -> None:
    """A byte-level BPE tokenizer of 320 ids with Llama 3's begin/end-of-text tokens, saved as a
    Hugging Face model directory has it (tokenizer.json, tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        [p.read_text() for p in sorted(CORPUS.glob("*.py"))],
        trainers.BpeTrainer(vocab_size=320, special_tokens=["<|begin_of_text|>", "<|end_of_text|>"],
                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>",
                                        eos_token="<|end_of_text|>").save_pretrained(directory)


def _model_cfg(directory: Path):
    cfg = hf.model_config(hf.read_config(str(directory)), str(directory))
    return dataclasses.replace(cfg, path=str(directory))


def _ok(run: Run) -> Run:
    assert run.returncode == 0, run.output[-4000:]
    return run


def _share_read(run: Run) -> float:
    """What rank 0 says it read of the model's weights, in percent."""
    line = next(line for line in run.output.splitlines() if "this rank read" in line)
    return float(line.split("this rank read ")[1].split("%")[0])


def _error_lines(run: Run) -> list[str]:
    return [line for line in run.output.splitlines() if " ERROR " in line]


def _prepare(tokenizer: str, output: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "storage.prepare", "--input", str(CORPUS), "--output", str(output),
                           "--tokenizer", tokenizer, "--shard-tokens", "16384", "--val-fraction", "0.3"],
                          capture_output=True, text=True, env=base_env(), cwd=REPO, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny Llama (GQA, untied, llama3 RoPE scaling) with its tokenizer, as downloaded."""
    directory = tmp_path_factory.mktemp("hf") / "tiny-llama"
    _llama(directory)
    _tokenizer(directory)
    return directory


@pytest.fixture(scope="module")
def dataset(model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The corpus prepared with the model's own tokenizer.json, straight from its directory."""
    output = tmp_path_factory.mktemp("data") / "ds"
    _prepare(str(model_dir / "tokenizer.json"), output)
    return output


@pytest.fixture(scope="module")
def runs(model_dir: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory,
         harness_cache: Path) -> dict[str, Run]:
    """model=hf on 1 rank (2 steps) and under every sharded layout (1 step), started together: each
    spends most of its time starting up, which overlaps."""
    cwd = tmp_path_factory.mktemp("runs")
    base = [*RUN, f"model.path={model_dir}", f"data.url={dataset}"]
    started = {"single": start([*base, "trainer.max_steps=2", f"run.dir={cwd}/single"], cwd=cwd,
                               cache_dir=harness_cache)}
    for name, nproc in (("fsdp", 2), ("tp", 2), ("fsdp_tp", 4), ("zero3", 2)):
        started[name] = start([*base, f"parallel={name}", f"run.dir={cwd}/{name}"], cwd=cwd, nproc=nproc,
                              cache_dir=harness_cache)
    return {name: _ok(finish(proc)) for name, proc in started.items()}


@pytest.fixture(scope="module")
def exported(runs: dict[str, Run], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 1-rank run's last checkpoint exported in fp32 (its checkpoint.url: the latest one)."""
    output = tmp_path_factory.mktemp("export") / "model"
    assert export.main(["--checkpoint", str(runs["single"].run_dir / "checkpoints"), "--output", str(output),
                        "--dtype", "fp32"]) == 0
    return output


# -- the mapping ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kv_heads, tied, rope", [(2, False, LLAMA3), (4, True, PLAIN), (4, False, LLAMA3),
                                                  (2, True, PLAIN)],
                         ids=["gqa-untied-llama3", "mha-tied-plain", "mha-untied-llama3", "gqa-tied-plain"])
def test_logits_equal_transformers(tmp_path: Path, kv_heads: int, tied: bool, rope: dict) -> None:
    reference = _llama(tmp_path, kv_heads=kv_heads, tied=tied, rope=rope)
    cfg = _model_cfg(tmp_path)
    assert (cfg.n_kv_heads, cfg.tie_embeddings, cfg.rope_scaling) == (kv_heads, tied, rope["rope_type"].replace(
        "default", "none"))
    ours = hf.pretrained_model(cfg)
    tokens = torch.randint(0, 320, (2, 200), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        theirs = reference(tokens).logits
        assert (ours(tokens) - theirs).abs().max() < 1e-5
        if rope is LLAMA3:  # the scaling is exercised: without it the logits differ
            unscaled = hf.pretrained_model(dataclasses.replace(cfg, rope_scaling="none"))
            assert (unscaled(tokens) - theirs).abs().max() > 1e-3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_import_then_export_gives_back_the_same_tensors(tmp_path: Path, dataset: Path, dtype: torch.dtype) -> None:
    """Imported into the harness's model, saved as a native checkpoint, exported: every tensor
    bit for bit, and the same config.json fields."""
    source = tmp_path / "source"
    _llama(source, dtype=dtype, shard="5GB")
    cfg = _model_cfg(source)
    model = hf.pretrained_model(cfg)
    meta = checkpoint_meta(Config(model=cfg), read_index(str(dataset)))
    Checkpointer(str(tmp_path / "ckpt"), keep_last=0, rank=0, world_size=1).save(
        1, {"app": ModelAndOptimizer(model, torch.optim.AdamW(model.parameters()))}, meta)
    dtype_name = "bf16" if dtype == torch.bfloat16 else "fp32"
    assert export.main(["--checkpoint", str(tmp_path / "ckpt"), "--output", str(tmp_path / "out"),
                        "--dtype", dtype_name]) == 0
    before, after = load_file(source / "model.safetensors"), load_file(tmp_path / "out" / "model.safetensors")
    assert sorted(before) == sorted(after)
    for name, tensor in before.items():
        assert after[name].dtype == dtype and torch.equal(after[name], tensor), name
    theirs, ours = (json.loads((d / "config.json").read_text()) for d in (source, tmp_path / "out"))
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "rms_norm_eps", "max_position_embeddings", "tie_word_embeddings"):
        assert ours[key] == theirs[key], key
    assert {**ours["rope_scaling"], "rope_theta": ours["rope_theta"]} == theirs["rope_parameters"]


# -- runs -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout, ranks", [("fsdp", 2), ("tp", 2), ("fsdp_tp", 4)])
def test_import_under_each_layout_gives_the_first_step_loss_of_one_rank(runs: dict[str, Run], layout: str,
                                                                       ranks: int) -> None:
    assert runs[layout].losses[1] == pytest.approx(runs["single"].losses[1], rel=1e-5)
    assert _share_read(runs["single"]) == 100.0
    # each rank read its own slices: about 1/ranks of the weights (norms are whole on every TP rank)
    assert _share_read(runs[layout]) < 100 / ranks + 1


def _trained_model(run: Run) -> torch.nn.Module:
    """The run's latest checkpoint loaded as a resume loads it (the engine's own DCP entry)."""
    import torch.distributed.checkpoint as dcp

    info = Checkpointer(str(run.run_dir / "checkpoints"), keep_last=0, rank=0, world_size=1).latest()
    model = Transformer(export.checkpoint_model(info))
    dcp.load({"app": ModelAndOptimizer(model, build_optimizer(model, OptimConfig()))}, checkpoint_id=info.url)
    return model


def test_trained_checkpoint_exports_to_transformers(runs: dict[str, Run], exported: Path, model_dir: Path,
                                                    tmp_path: Path) -> None:
    """The 1-rank run's checkpoint and the 4-rank FSDP x TP one (exported in shards with an index)
    load in transformers with no missing or unexpected weight, and give the harness's logits; the
    tokenizer files came along and tokenize as the data was tokenized."""
    sharded = tmp_path / "sharded"
    assert export.main(["--checkpoint", str(runs["fsdp_tp"].run_dir / "checkpoints"), "--output", str(sharded),
                        "--dtype", "fp32", "--max-shard-bytes", "100000"]) == 0
    assert (sharded / "model.safetensors.index.json").exists() and len(list(sharded.glob("*.safetensors"))) > 2
    tokens = torch.randint(0, 320, (2, 100), generator=torch.Generator().manual_seed(2))
    for directory, run in ((exported, runs["single"]), (sharded, runs["fsdp_tp"])):
        theirs, info = transformers.AutoModelForCausalLM.from_pretrained(directory, output_loading_info=True)
        assert info == {"missing_keys": set(), "unexpected_keys": set(), "mismatched_keys": set(),
                        "error_msgs": []}
        ours = _trained_model(run)
        with torch.no_grad():
            assert (ours(tokens) - theirs(tokens).logits).abs().max() < 1e-5
    assert (exported / "tokenizer.json").read_bytes() == (model_dir / "tokenizer.json").read_bytes()
    text = (CORPUS / "handlers.py").read_text()[:2000]
    ids = transformers.AutoTokenizer.from_pretrained(exported).encode(text, add_special_tokens=False)
    assert ids == list(HFTokenizer(str(model_dir / "tokenizer.json")).encode(text))


def test_a_committed_checkpoint_wins_over_model_path(runs: dict[str, Run], model_dir: Path, dataset: Path,
                                                     tmp_path: Path) -> None:
    """With a committed checkpoint under checkpoint.url the run resumes from it and does not read
    model.path's weights."""
    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(runs["single"].run_dir / "checkpoints", checkpoints)
    run = _ok(train([*RUN, f"model.path={model_dir}", f"data.url={dataset}", "trainer.max_steps=3",
                     f"checkpoint.url={checkpoints}", f"run.dir={tmp_path}/run"], cwd=tmp_path))
    assert f"model.path {model_dir} is not read: the run resumes from {checkpoints}/step-00000002" in run.output
    assert "this rank read" not in run.output and sorted(run.losses) == [3]


def test_import_from_s3_on_ceph(ceph: Ceph, model_dir: Path, dataset: Path, runs: dict[str, Run],
                                exported: Path, tmp_path: Path) -> None:
    """model.path=s3://...: the same first step as from the local directory, and the node's copy
    of the files is gone afterwards; an export to s3:// holds the same files as one to disk."""
    url = ceph.unique("models/tiny-llama")
    fs = ceph.fs()
    for file in model_dir.iterdir():
        fs.put_file(str(file), f"{url}/{file.name}")
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    run = _ok(train([*RUN, "storage=ceph", f"model.path={url}", f"data.url={dataset}", "checkpoint.interval=0",
                     f"run.dir={tmp_path}/run"], cwd=tmp_path, env={**ceph.env, "TMPDIR": str(tmp)}))
    assert run.losses[1] == runs["single"].losses[1]
    assert f"parameters from {url}" in run.output
    assert not list((tmp / "train-harness-hf").iterdir())
    out = ceph.unique("exports/tiny")
    assert export.main(["--checkpoint", str(runs["single"].run_dir / "checkpoints"), "--output", out,
                        "--dtype", "fp32", "--endpoint-url", ceph.endpoint]) == 0
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(out)) == sorted(p.name for p in exported.iterdir())
    for file in exported.iterdir():
        assert fs.cat_file(f"{out}/{file.name}") == file.read_bytes(), file.name


def test_zero3_checkpoint_exports_the_native_engines_weights(runs: dict[str, Run], tmp_path: Path) -> None:
    """DeepSpeed ZeRO-3 on 2 ranks imports the same weights (same first loss) and its checkpoint,
    consolidated by DeepSpeed, exports the weights the native engine has after the same step."""
    assert runs["zero3"].losses[1] == pytest.approx(runs["single"].losses[1], rel=1e-5)
    # DeepSpeed's consolidation in a process of its own: importing deepspeed changes process state
    proc = subprocess.run([sys.executable, "-m", "train.export", "--checkpoint", str(runs["zero3"].run_dir /
                           "checkpoints"), "--output", str(tmp_path / "zero3"), "--dtype", "fp32"],
                          capture_output=True, text=True, env=base_env(), cwd=tmp_path, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert export.main(["--checkpoint", str(runs["single"].run_dir / "checkpoints" / "step-00000001"),
                        "--output", str(tmp_path / "native"), "--dtype", "fp32"]) == 0
    zero3, native = (load_file(tmp_path / n / "model.safetensors") for n in ("zero3", "native"))
    assert sorted(zero3) == sorted(native)
    for name in native:
        torch.testing.assert_close(zero3[name], native[name], rtol=0, atol=1e-5, msg=name)


def test_greedy_generate_equals_transformers(runs: dict[str, Run], exported: Path, model_dir: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    """`train.generate --temperature 0` on the checkpoint and on its export print what transformers'
    greedy generate writes on the export, token for token."""
    prompt, steps = "def emit(self, record):", 16
    printed = []
    for source in (["--checkpoint", str(runs["single"].run_dir / "checkpoints")], ["--hf", str(exported)]):
        capsys.readouterr()
        assert generate.main([*source, "--prompt", prompt, "--max-new-tokens", str(steps), "--temperature", "0"]) == 0
        printed.append(capsys.readouterr().out)
    tokenizer = HFTokenizer(str(model_dir / "tokenizer.json"))
    ids = [tokenizer.bos_id, *tokenizer.encode(prompt)]  # as storage.prepare starts a document
    theirs = transformers.AutoModelForCausalLM.from_pretrained(exported)
    out = theirs.generate(torch.tensor([ids]), max_new_tokens=steps, do_sample=False)[0, len(ids):].tolist()
    assert len(out) == steps and tokenizer.eos_id not in out  # no early stop: all 16 are compared
    assert printed == [tokenizer.decode(out) + "\n"] * 2


# -- planning -------------------------------------------------------------------------------------
def test_planner_plans_model_hf_and_the_llama3_presets(model_dir: Path) -> None:
    _, cfg = load(["+cluster=2xCPU", "model=hf", f"model.path={model_dir}", "parallel=fsdp"])
    status, lines = run_plan(cfg, compare=False)
    weights = sum(t.numel() for f in model_dir.glob("*.safetensors") for t in load_file(f).values())
    assert status == 0 and lines[0].startswith(f"plan: model tiny-llama ({weights / 1e9:.2f}B parameters)"), lines
    assert num_params(cfg.model) == weights
    real = {"llama3_1b": 1_235_814_400, "llama3_3b": 3_212_749_824, "llama3_8b": 8_030_261_248,
            "llama3_70b": 70_553_706_496}  # the released models' parameter counts
    for preset, count in real.items():
        _, cfg = load(["+cluster=8xH100", f"model={preset}", "parallel=fsdp"])
        assert num_params(cfg.model) == count, preset
    status, lines = run_plan(load(["+cluster=8xH100", "model=llama3_8b", "parallel=fsdp"])[1], compare=False)
    assert status == 0 and "verdict: fits" in lines[-1], lines


# -- bad input ------------------------------------------------------------------------------------
def _edited_config(model_dir: Path, tmp_path: Path, **changes) -> Path:
    """A copy of the model's directory with config.json fields changed."""
    copy = tmp_path / "edited"
    shutil.copytree(model_dir, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, **changes}))
    return copy


@pytest.mark.parametrize("changes, overrides, message", [
    ({"model_type": "mistral"}, [], 'config.json: model_type="mistral" cannot be trained here'),
    ({"attention_bias": True}, [], "config.json: attention_bias=true cannot be trained here"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, [], 'rope_parameters.rope_type="yarn"'),
    ({}, ["+cluster=4xCPU", "parallel=tp"], "parallel.tp=4 must divide model.n_heads=4 and model.n_kv_heads=2"),
    ({}, ["model.dim=256"], "model.dim=256 disagrees with"),
], ids=["model-type", "attention-bias", "rope-type", "shape-vs-layout", "override"])
def test_architecture_the_harness_cannot_represent_is_refused_at_start(
        model_dir: Path, tmp_path: Path, changes: dict, overrides: list[str], message: str) -> None:
    path = _edited_config(model_dir, tmp_path, **changes)
    _, cfg = load(["model=hf", f"model.path={path}", *overrides])
    with pytest.raises(LayoutError) as err:
        startup_checks(cfg, cfg.cluster or load(["+cluster=2xCPU"])[1].cluster)
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_model_hf_without_a_path_is_refused() -> None:
    _, cfg = load(["+cluster=2xCPU", "model=hf"])
    with pytest.raises(LayoutError, match="model=hf needs model.path=URL"):
        startup_checks(cfg, cfg.cluster)


def test_non_llama_model_stops_the_run_before_anything_is_written(model_dir: Path, tmp_path: Path) -> None:
    path = _edited_config(model_dir, tmp_path, model_type="gpt2", architectures=["GPT2LMHeadModel"])
    run = train(["model=hf", f"model.path={path}", f"run.dir={tmp_path}/run"], cwd=tmp_path)
    assert run.returncode == 2
    assert [line.split(" ERROR train: ")[1] for line in _error_lines(run)] == [
        (f'{path}/config.json: model_type="gpt2" cannot be trained here: the harness builds Llama models '
         f"(LlamaForCausalLM, model_type llama) only")]
    assert not (tmp_path / "run").exists()


def _broken_copy(model_dir: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    """A copy of the model directory broken one way; returns it and the message expected."""
    copy = tmp_path / how
    shutil.copytree(model_dir, copy)
    index = json.loads((copy / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    file = index["weight_map"][name]
    if how == "missing-shard":
        (copy / file).unlink()
        return copy, f"{copy}/{file} is missing (model.safetensors.index.json names it)"
    if how == "truncated":
        data = (copy / file).read_bytes()
        (copy / file).write_bytes(data[: len(data) - 1000])
        return copy, f"{copy}/{file} is not a whole safetensors file"
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps({**config, "intermediate_size": 128}))
    return copy, "tensor model.layers.0.mlp.gate_proj.weight is [96, 64], but config.json makes it [128, 64]"


@pytest.mark.parametrize("how", ["missing-shard", "truncated", "shape-mismatch"])
def test_broken_weights_are_refused_in_one_line(model_dir: Path, tmp_path: Path, how: str) -> None:
    copy, message = _broken_copy(model_dir, tmp_path, how)
    with pytest.raises(hf.HFError) as err:
        hf.pretrained_model(_model_cfg(copy))
    assert message in str(err.value) and "\n" not in str(err.value), str(err.value)


def test_missing_shard_stops_the_run_with_no_checkpoint(model_dir: Path, dataset: Path, tmp_path: Path) -> None:
    copy, message = _broken_copy(model_dir, tmp_path, "missing-shard")
    run = train([*RUN, f"model.path={copy}", f"data.url={dataset}", f"run.dir={tmp_path}/run"], cwd=tmp_path)
    assert run.returncode == 2 and len(_error_lines(run)) == 1 and message in _error_lines(run)[0], run.output
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dataset_of_another_tokenizer_is_refused(model_dir: Path, tmp_path: Path, harness_cache: Path) -> None:
    """The builtin corpus is made with the byte tokenizer: the model's token ids mean other text."""
    run = train([*FAST, "model=hf", f"model.path={model_dir}", f"run.dir={tmp_path}/run"], cwd=tmp_path,
                cache_dir=harness_cache)
    fingerprint = hashlib.sha256((model_dir / "tokenizer.json").read_bytes()).hexdigest()
    assert run.returncode == 2 and len(_error_lines(run)) == 1, run.output
    assert (f"was made with tokenizer byte (fingerprint byte-v1), not with the model's {model_dir}/tokenizer.json "
            f"(fingerprint {fingerprint[:12]})") in _error_lines(run)[0]
    assert f"python -m storage.prepare --tokenizer {model_dir}/tokenizer.json" in _error_lines(run)[0]
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_dataset_with_more_ids_than_the_models_embedding_is_refused(model_dir: Path, dataset: Path,
                                                                    tmp_path: Path) -> None:
    """Checked on the vocabulary too, also where the model directory has no tokenizer.json."""
    path = _edited_config(model_dir, tmp_path, vocab_size=300)
    (path / "tokenizer.json").unlink()
    with pytest.raises(hf.HFError) as err:
        hf.check_dataset(_model_cfg(path), [read_index(str(dataset))])
    assert f"tokenizer {model_dir}/tokenizer.json of 320 ids, but the model at {path} embeds 300" in str(err.value)


def test_export_refuses_a_directory_that_is_not_empty(runs: dict[str, Run], tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert export.main(["--checkpoint", str(runs["single"].run_dir / "checkpoints"),
                        "--output", str(tmp_path / "out")]) == 2
    assert f"--output {tmp_path / 'out'} is not empty" in caplog.text
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and os.listdir(tmp_path / "out") == ["notes.txt"]
