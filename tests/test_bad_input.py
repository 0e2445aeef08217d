"""Bad input stops at once with one clear message, a non-zero exit, and nothing written."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import FAST
from tests.distributed import REPO, torchrun, train


def test_unknown_config_key_is_named(tmp_path: Path) -> None:
    run = train(["trainer.max_stpes=5", f"run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode != 0
    assert "Key 'max_stpes' not in 'TrainerConfig'" in run.output
    assert not (tmp_path / "r").exists()


def test_wrong_type_is_named(tmp_path: Path) -> None:
    run = train(["trainer.max_steps=ten", f"run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode != 0
    assert "trainer.max_steps" in run.output and "Integer" in run.output
    assert not (tmp_path / "r").exists()


def test_unknown_cluster_lists_the_known_ones(tmp_path: Path) -> None:
    run = train(["+cluster=9xA100"], cwd=tmp_path)
    assert run.returncode != 0
    assert "cluster/9xA100" in run.output and "8xA100" in run.output


def test_layout_that_does_not_fit_the_world_gives_the_right_command(tmp_path: Path) -> None:
    run = torchrun(1, ["+cluster=8xA100", f"run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode != 0
    assert "cluster 8xA100 expects 1 node(s) x 8 processes per node = 8" in run.output
    assert "torchrun started 1 process" in run.output
    assert "Run: torchrun --nproc_per_node=8 -m train.run +cluster=8xA100" in run.output
    # torchrun prints its own ChildFailedError trace; none may come from the harness's code
    assert f'File "{REPO / "train"}' not in run.output
    assert not (tmp_path / "r").exists()


def test_tensor_parallel_must_divide_heads(tmp_path: Path) -> None:
    run = torchrun(2, ["parallel=tp", "model.n_heads=3", "model.n_kv_heads=3", "model.dim=96",
                       f"run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode != 0
    assert "parallel.tp=2 must divide model.n_heads=3" in run.output


def test_global_batch_must_split_over_ranks(tmp_path: Path) -> None:
    run = torchrun(2, [*FAST, "trainer.global_batch_tokens=192", f"run.dir={tmp_path}/r"],
                   cwd=tmp_path)
    assert run.returncode != 0
    # one micro-step is 4 sequences x 64 tokens x 2 ranks = 512 tokens; 192 is below it
    assert ("trainer.global_batch_tokens=192 does not split into micro-batches" in run.output
            and "use trainer.global_batch_tokens=512" in run.output), run.output[-2000:]


def test_missing_dataset_is_named(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    run = train([*FAST, "data=shards", f"data.url={missing}", "data.seq_len=64",
                 f"run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode == 2
    assert f"dataset not found: {missing}" in run.output
    assert "python -m storage.prepare" in run.output
    assert "Traceback" not in run.output


def test_corrupt_shard_stops_the_run_naming_the_shard(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.distributed import base_env

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(40):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "some real words here. " * 400)
    dataset = tmp_path / "dataset"
    prepare = subprocess.run(
        [sys.executable, "-m", "storage.prepare", "--input", str(corpus), "--output", str(dataset),
         "--shard-tokens", "65536", "--val-fraction", "0.1"],
        capture_output=True, text=True, env=base_env(), cwd=tmp_path)
    assert prepare.returncode == 0, prepare.stderr
    shard = sorted((dataset / "train").glob("shard-*.bin"))[0]
    data = bytearray(shard.read_bytes())
    data[100] ^= 0xFF  # one flipped byte, as a bad disk or a torn copy would leave
    shard.write_bytes(bytes(data))
    run = train([*FAST, "data=shards", f"data.url={dataset}", "data.seq_len=64",
                 f"run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode == 2
    assert f"train/{shard.name}" in run.output and "sha256" in run.output
    assert "Traceback" not in run.output
    assert not list((tmp_path / "r").glob("checkpoints/step-*"))


def _dataset(path: Path, splits: dict[str, int], tokenizer=None) -> Path:
    import numpy as np

    from storage.shards import ShardWriter, TokenizerInfo
    from storage.tokenizer import ByteTokenizer

    writer = ShardWriter(str(path), TokenizerInfo.of(tokenizer or ByteTokenizer()), shard_tokens=4096)
    for split, tokens in splits.items():
        writer.add(np.random.default_rng(0).integers(1, 256, tokens), split)
    writer.close()
    return path


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


SMALL = [*FAST, "data=shards", "data.seq_len=64", "model.vocab_size=256"]


def test_empty_dataset_is_named(tmp_path: Path) -> None:
    empty = _dataset(tmp_path / "only-val", {"val": 5000})
    run = train([*SMALL, f"data.url={empty}", f"run.dir={tmp_path}/r"], cwd=tmp_path)
    assert run.returncode == 2
    assert f"dataset {empty} has no tokens in split 'train'" in run.output
    assert "Traceback" not in run.output
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_dataset_vocabulary_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    ds = _dataset(tmp_path / "ds", {"train": 20000, "val": 5000})
    run = train([*SMALL, f"data.url={ds}", "model.vocab_size=200", f"run.dir={tmp_path}/r"],
                cwd=tmp_path)
    assert run.returncode == 2
    assert "was made with tokenizer byte (vocab 256); model.vocab_size is 200" in run.output
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_checkpoint_of_another_model_shape_is_refused_and_left_alone(tmp_path: Path,
                                                                     harness_cache: Path) -> None:
    first = train([*FAST, "trainer.max_steps=2", f"run.dir={tmp_path}/r"], cwd=tmp_path,
                  cache_dir=harness_cache)
    assert first.returncode == 0, first.output[-3000:]
    before = _files(tmp_path / "r" / "checkpoints")
    run = train([*FAST, "trainer.max_steps=4", "model.n_layers=3", f"run.dir={tmp_path}/r"],
                cwd=tmp_path, cache_dir=harness_cache)
    assert run.returncode == 2
    assert "step-00000002 was written for model=" in run.output and "'n_layers': 4" in run.output
    assert "start a new checkpoint.url, or resume with the same model" in run.output
    assert "Traceback" not in run.output
    assert _files(tmp_path / "r" / "checkpoints") == before


def test_dataset_of_another_tokenizer_than_the_checkpoints_is_refused(tmp_path: Path) -> None:
    """Same vocabulary size, other tokenizer: resuming would feed the model ids that mean other
    text. The checkpoint records the tokenizer's fingerprint; the resumed run refuses."""
    from storage.tokenizer import ByteTokenizer

    class Shifted(ByteTokenizer):  # a different tokenizer with the same 256 ids
        name = "shifted-bytes"
        fingerprint = "0" * 64

    first_ds = _dataset(tmp_path / "bytes", {"train": 20000, "val": 5000})
    other_ds = _dataset(tmp_path / "shifted", {"train": 20000, "val": 5000}, Shifted())
    first = train([*SMALL, f"data.url={first_ds}", "trainer.max_steps=2", f"run.dir={tmp_path}/r"],
                  cwd=tmp_path)
    assert first.returncode == 0, first.output[-3000:]
    before = _files(tmp_path / "r" / "checkpoints")
    run = train([*SMALL, f"data.url={other_ds}", "trainer.max_steps=4", f"run.dir={tmp_path}/r"],
                cwd=tmp_path)
    assert run.returncode == 2
    assert "was trained on data made with tokenizer byte" in run.output
    assert f"but the dataset {other_ds} was made with tokenizer shifted-bytes" in run.output
    assert _files(tmp_path / "r" / "checkpoints") == before
