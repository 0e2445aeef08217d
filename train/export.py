"""`python -m train.export --checkpoint URL --output DIR [--dtype bf16|fp32]`: a committed
checkpoint as a Hugging Face model directory.

    python -m train.export --checkpoint runs/X/checkpoints --output exported/   # the latest committed one
    python -m train.export --checkpoint s3://b/run/checkpoints/step-00001000 --output s3://b/hf/run-1000

DIR gets what `transformers.AutoModelForCausalLM.from_pretrained(DIR)` (and vLLM) loads:
config.json, the weights as safetensors (model.safetensors, or shards of at most 5 GB and
model.safetensors.index.json), generation_config.json and, when the checkpoint's data was made
with a Hugging Face tokenizer, its tokenizer files. Any committed checkpoint exports: native (DCP,
written by any world size and layout; read here one shard of the output at a time) or DeepSpeed
(ZeRO-1/2/3, consolidated by DeepSpeed's own zero_to_fp32). Names, config.json and the RoPE row
order are train.hf's. DIR must be new or empty; a failed export leaves nothing behind.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

from storage import fs as storage_fs
from storage.checkpoint import COMMITTED, Checkpointer, CheckpointError, CheckpointInfo
from storage.fs import StorageError, has_protocol, retrying, url_to_fs
from storage.tokenizer import Tokenizer, load_tokenizer
from train import hf
from train.config import ModelConfig
from train.engine import DEEPSPEED

log = logging.getLogger("train.export")

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
MAX_SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained: "5GB"
# Files that come with a tokenizer.json in a Hugging Face model directory.
TOKENIZER_SIDE_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class ExportError(ValueError):
    """A checkpoint or output that cannot be exported as asked: the message says which and why."""


# -- the checkpoint ------------------------------------------------------------------------------
def find_checkpoint(url: str) -> CheckpointInfo:
    """The committed checkpoint at `url` (a step-NNNNNNNN directory), or the latest committed one
    under `url` (a checkpoint.url)."""
    url = url.rstrip("/")
    fs, path = url_to_fs(url)
    checkpointer = Checkpointer(url, keep_last=0, rank=0, world_size=1)
    if retrying(lambda: fs.exists(f"{path}/{COMMITTED}"), what=f"look for {url}/{COMMITTED}"):
        return checkpointer.info(url)
    if not fs.exists(path):
        raise ExportError(f"--checkpoint {url} does not exist")
    latest = checkpointer.latest()
    if latest is None:
        raise ExportError(f"--checkpoint {url} is neither a committed checkpoint (no {COMMITTED} marker) nor a "
                          f"checkpoint.url holding one: give a step-NNNNNNNN directory that has {COMMITTED}")
    return latest


def checkpoint_model(info: CheckpointInfo) -> ModelConfig:
    """The architecture the checkpoint's COMMITTED marker records."""
    shape = info.meta.get("model")
    if not isinstance(shape, dict):
        raise ExportError(f"checkpoint {info.url} records no model shape in its {COMMITTED} marker (written "
                          f"before shapes were recorded); it cannot be exported")
    fields = ModelConfig.__dataclass_fields__
    return ModelConfig(name=info.url, **{k: v for k, v in shape.items() if k in fields and k not in ("name", "path")})


class CheckpointWeights:
    """The model weights of a committed checkpoint, whole, in the harness's names: a native (DCP)
    one read a few tensors at a time in this one process; a DeepSpeed one consolidated by
    zero_to_fp32 (lazily: a tensor is put together when read)."""

    def __init__(self, info: CheckpointInfo, cfg: ModelConfig, stack: contextlib.ExitStack) -> None:
        self.info, self.cfg = info, cfg
        self.deepspeed = info.meta.get("engine") == DEEPSPEED
        if self.deepspeed:
            self._lazy = _deepspeed_state(info, stack)
            found = {hf.canonical(name): name for name in self._lazy}
            self.shapes = {name: tuple(self._lazy[key].shape) for name, key in found.items()}
            self._keys = found
        else:
            metadata = _dcp_reader(info.url).read_metadata().state_dict_metadata
            prefix = "app.model."
            self.shapes = {key.removeprefix(prefix): tuple(md.size) for key, md in metadata.items()
                           if key.startswith(prefix)}
            self._dtypes = {key.removeprefix(prefix): md.properties.dtype for key, md in metadata.items()
                            if key.startswith(prefix)}
        expected = hf.expected_shapes(cfg)
        if cfg.tie_embeddings:
            self.shapes.pop("output.weight", None)  # DeepSpeed keeps the tied matrix under both names
        names = {hf.hf_name(name): name for name in self.shapes}
        if set(names) != set(expected):
            missing = sorted(set(expected) - set(names)) or sorted(set(names) - set(expected))
            raise ExportError(f"checkpoint {info.url} holds other tensors than its recorded model "
                              f"({missing[0]} and {len(missing) - 1} more differ)")
        self.names = [names[n] for n in expected]  # in transformers' order
        for name in self.names:
            if self.shapes[name] != expected[hf.hf_name(name)]:
                raise ExportError(f"checkpoint {info.url}: {name} is {list(self.shapes[name])}, its recorded "
                                  f"model makes it {list(expected[hf.hf_name(name)])}")

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        """The whole tensors `names` (fp32, or the dtype they were saved in)."""
        if self.deepspeed:
            return {name: self._lazy[self._keys[name]].contiguous() for name in names}
        import torch.distributed.checkpoint as dcp

        state = {f"app.model.{n}": torch.empty(self.shapes[n], dtype=self._dtypes[n]) for n in names}
        try:
            with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
                warnings.filterwarnings("ignore", message="torch.distributed is disabled")
                dcp.load(state, storage_reader=_dcp_reader(self.info.url), no_dist=True)
        except Exception as exc:  # DCP's own text, with the checkpoint named
            raise ExportError(f"cannot read checkpoint {self.info.url}: {str(exc).splitlines()[0]}") from exc
        return {n: state[f"app.model.{n}"] for n in names}


def _dcp_reader(url: str):
    import torch.distributed.checkpoint as dcp

    if has_protocol(url) and not url.startswith("file://"):
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

        return FsspecReader(url)
    return dcp.FileSystemReader(url.removeprefix("file://"))


def _deepspeed_state(info: CheckpointInfo, stack: contextlib.ExitStack) -> dict[str, Any]:
    """zero_to_fp32's lazy fp32 state dict of a DeepSpeed checkpoint (copied to local disk first
    when it is remote: DeepSpeed reads local files)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # consolidation runs on the CPU
    try:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    except ImportError:
        raise ExportError(f"checkpoint {info.url} was written by DeepSpeed: exporting it needs the deepspeed "
                          f"package (pip install -e '.[deepspeed]')") from None
    fs, path = url_to_fs(info.url)
    local = path
    if not storage_fs.is_local(fs):
        local = str(Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="train-export-"))) / "step")
        retrying(lambda: fs.get(path, local, recursive=True), what=f"download {info.url}")
    parent, tag = os.path.split(local.rstrip("/"))
    try:
        return get_fp32_state_dict_from_zero_checkpoint(parent, tag=tag, lazy_mode=True)
    except Exception as exc:  # DeepSpeed's own text, with the checkpoint named
        raise ExportError(f"cannot consolidate DeepSpeed checkpoint {info.url}: {exc}") from exc


def checkpoint_tokenizer(info: CheckpointInfo) -> tuple[Tokenizer, dict[str, bytes]]:
    """The tokenizer the checkpoint's data was made with, and the files to ship with it (none for
    the byte tokenizer). Its file must still be what it was: the fingerprint is checked."""
    recorded = info.meta.get("tokenizer")
    if not recorded:
        raise ExportError(f"checkpoint {info.url} records no tokenizer in its {COMMITTED} marker")
    url = recorded["name"]
    if url == "byte":
        return load_tokenizer(url), {}
    fs, path = url_to_fs(url)
    try:
        data = retrying(lambda: fs.cat_file(path), what=f"read {url}")
    except FileNotFoundError:
        raise ExportError(f"checkpoint {info.url} was trained on data made with tokenizer {url}, which is gone; "
                          f"put the same tokenizer.json back there") from None
    if hashlib.sha256(data).hexdigest() != recorded["fingerprint"]:
        raise ExportError(f"tokenizer {url} is not the one the checkpoint's data was made with (fingerprint "
                          f"{hashlib.sha256(data).hexdigest()[:12]}, recorded {recorded['fingerprint'][:12]}); "
                          f"put the original tokenizer.json back there")
    files = {hf.TOKENIZER: data}
    directory = path.rsplit("/", 1)[0]
    for name in TOKENIZER_SIDE_FILES:
        if fs.exists(f"{directory}/{name}"):
            files[name] = fs.cat_file(f"{directory}/{name}")
    return load_tokenizer(url), files


# -- the output ----------------------------------------------------------------------------------
class _Output:
    """Where the export goes, written so that a failure leaves nothing: a local directory is
    made under a temporary name beside it and renamed into place at the end; at an fsspec URL each
    file is uploaded when made, config.json last, and what was uploaded is removed on failure."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")
        self.fs, self.path = url_to_fs(self.url)
        self.local = storage_fs.is_local(self.fs)
        if self.fs.exists(self.path) and (not self.fs.isdir(self.path) or self.fs.ls(self.path)):
            raise ExportError(f"--output {url} is not empty: give a new or empty directory (nothing was written)")
        self.uploaded: list[str] = []
        self.written: list[str] = []  # file names, in the order written

    @contextlib.contextmanager
    def writing(self) -> Iterator[_Output]:
        if self.local:
            parent = os.path.dirname(os.path.abspath(self.path))
            os.makedirs(parent, exist_ok=True)
            self.staging = Path(tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.export-", dir=parent))
        else:
            self.staging = Path(tempfile.mkdtemp(prefix="train-export-"))
        try:
            yield self
            if self.local:
                if os.path.isdir(self.path):
                    os.rmdir(self.path)  # empty, checked above
                os.rename(self.staging, self.path)
        except BaseException:
            for remote in self.uploaded:
                self.fs.rm(remote)
            raise
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)

    def file(self, name: str) -> Path:
        return self.staging / name

    def done(self, name: str) -> None:
        """File `name` of the staging directory is complete: upload it (remote output)."""
        self.written.append(name)
        if self.local:
            return
        target = f"{self.path}/{name}"
        retrying(lambda: self.fs.put_file(str(self.staging / name), target), what=f"upload {self.url}/{name}")
        self.uploaded.append(target)
        (self.staging / name).unlink()

    def write_json(self, name: str, value: Any) -> None:
        self.file(name).write_text(json.dumps(value, indent=2) + "\n")
        self.done(name)


def _shards(names: list[str], shapes: dict[str, tuple[int, ...]], itemsize: int, max_bytes: int) -> list[list[str]]:
    """`names` in order, cut into groups of at most `max_bytes` (a bigger tensor alone)."""
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = torch.Size(shapes[name]).numel() * itemsize
        if groups[-1] and size + nbytes > max_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    return groups


def export(checkpoint: str, output: str, dtype: torch.dtype = torch.bfloat16,
           max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """Write the checkpoint at `checkpoint` as a Hugging Face model directory at `output`;
    returns the files written. Everything is checked before the first byte is written."""
    from safetensors.torch import save_file

    info = find_checkpoint(checkpoint)
    cfg = checkpoint_model(info)
    tokenizer, tokenizer_files = checkpoint_tokenizer(info)
    out = _Output(output)
    with contextlib.ExitStack() as stack:
        weights = CheckpointWeights(info, cfg, stack)
        itemsize = torch.empty((), dtype=dtype).element_size()
        groups = _shards(weights.names, weights.shapes, itemsize, max_shard_bytes)
        files = [hf.SINGLE] if len(groups) == 1 else [
            f"model-{i:05d}-of-{len(groups):05d}.safetensors" for i in range(1, len(groups) + 1)]
        log.info("exporting %s (step %d, %s) to %s: %d tensors in %d file(s), %s", info.url, info.step,
                 info.meta.get("engine", "native"), output, len(weights.names), len(files), dtype)
        with out.writing():
            weight_map, total = {}, 0
            for file, group in zip(files, groups):
                tensors = {hf.hf_name(name): hf.to_hf(name, tensor, cfg).to(dtype).contiguous()
                           for name, tensor in weights.read(group).items()}
                save_file(tensors, str(out.file(file)), metadata={"format": "pt"})
                out.done(file)
                weight_map.update(dict.fromkeys(tensors, file))
                total += sum(t.numel() * t.element_size() for t in tensors.values())
            if len(files) > 1:
                out.write_json(hf.INDEX, {"metadata": {"total_size": total}, "weight_map": weight_map})
            bos, eos = getattr(tokenizer, "bos_id", None), tokenizer.eos_id
            for name, data in tokenizer_files.items():
                out.file(name).write_bytes(data)
                out.done(name)
            if tokenizer_files and "tokenizer_config.json" not in tokenizer_files:
                out.write_json("tokenizer_config.json", _tokenizer_config(tokenizer, cfg))
            out.write_json("generation_config.json", {"bos_token_id": bos, "eos_token_id": eos})
            out.write_json(hf.CONFIG, hf.hf_config(cfg, bos_id=bos, eos_id=eos, dtype=dtype))  # last: complete
    return out.written


def _tokenizer_config(tokenizer: Tokenizer, cfg: ModelConfig) -> dict[str, Any]:
    """For a bare tokenizer.json: what AutoTokenizer needs to load it as a fast tokenizer."""
    def token(token_id: int | None) -> str | None:
        return None if token_id is None else tokenizer.decode([token_id])

    return {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": token(getattr(tokenizer, "bos_id", None)),
            "eos_token": token(tokenizer.eos_id), "model_max_length": cfg.max_seq_len}


def configure_storage(args: argparse.Namespace) -> None:
    """S3 settings for s3:// URLs from the command line (as storage.prepare takes them)."""
    storage_fs.configure(SimpleNamespace(endpoint_url=args.endpoint_url, verify_tls=not args.no_verify_tls,
                                         ca_bundle=args.ca_bundle, connect_timeout_s=5.0, read_timeout_s=60.0,
                                         max_retries=5))


def add_storage_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--endpoint-url", default=os.environ.get("S3_ENDPOINT_URL", ""),
                   help="S3 endpoint for s3:// URLs (Ceph RGW); default $S3_ENDPOINT_URL. Credentials come from "
                        "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the AWS files")
    p.add_argument("--ca-bundle", default="", help="PEM file of the CA of an https:// endpoint")
    p.add_argument("--no-verify-tls", action="store_true", help="do not check the endpoint's certificate")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.export", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="URL",
                   help="a committed checkpoint (step-NNNNNNNN), or a checkpoint.url (its latest committed one)")
    p.add_argument("--output", required=True, metavar="DIR", help="new or empty directory (any fsspec URL)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16", help="dtype of the exported weights")
    p.add_argument("--max-shard-bytes", type=int, default=MAX_SHARD_BYTES, help="largest safetensors file")
    add_storage_args(p)
    args = p.parse_args(argv)
    if args.max_shard_bytes < 1:
        p.error(f"--max-shard-bytes must be positive, got {args.max_shard_bytes}")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    storage_fs.no_world_writable_files()
    try:
        configure_storage(args)
        for url in (args.checkpoint, args.output):
            storage_fs.check_reachable(url)
        files = export(args.checkpoint, args.output, DTYPES[args.dtype], args.max_shard_bytes)
    except (ExportError, hf.HFError, CheckpointError, StorageError, OSError) as exc:
        log.error("error: %s", exc)
        return 2
    print(f"wrote {args.output}: {', '.join(files)}")
    if hf.TOKENIZER in files:
        print(f"generate from it: python -m train.generate --hf {args.output} --prompt 'Once upon a time'")
    else:  # trained on data of a tokenizer without files (byte): generate decodes from the checkpoint
        print(f"no tokenizer files (the data was made with a tokenizer that has none); generate from the "
              f"checkpoint: python -m train.generate --checkpoint {args.checkpoint} --prompt 'Once upon a time'")
    return 0


if __name__ == "__main__":
    sys.exit(main())
