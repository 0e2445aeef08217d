"""`python -m train.generate --checkpoint URL --prompt TEXT`: a quick look at what a model writes.

    python -m train.generate --checkpoint runs/X/checkpoints --prompt "def main(" --max-new-tokens 64
    python -m train.generate --hf exported/ --prompt "Once upon a time" --temperature 0

`--checkpoint` takes a committed checkpoint (or a checkpoint.url: its latest committed one) of
either engine and decodes with the tokenizer its data was made with (the checkpoint records it);
`--hf` takes a Hugging Face Llama directory (an export, or a downloaded model) and its
tokenizer.json. The prompt is encoded as storage.prepare encodes documents (begin-of-text first,
where the tokenizer has one). Prints the continuation, up to the end-of-text token or
--max-new-tokens. --temperature 0 is greedy (what transformers' generate does with
do_sample=False); above 0 it samples from softmax(logits / T) with --seed. On the CPU in fp32, or
on one GPU under bf16 autocast; each token recomputes the whole sequence (no KV cache): a quick look, not a
server.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys

import torch

from storage import fs as storage_fs
from storage.checkpoint import CheckpointError
from storage.fs import StorageError, url_to_fs
from storage.tokenizer import HFTokenizer, Tokenizer
from train import export, hf
from train.model import Transformer

log = logging.getLogger("train.generate")


def from_checkpoint(url: str) -> tuple[Transformer, Tokenizer]:
    """The model of a committed checkpoint, on the CPU in fp32, and its data's tokenizer."""
    info = export.find_checkpoint(url)
    cfg = export.checkpoint_model(info)
    tokenizer, _ = export.checkpoint_tokenizer(info)
    with contextlib.ExitStack() as stack:
        weights = export.CheckpointWeights(info, cfg, stack)
        state = {name: tensor.float() for name, tensor in weights.read(weights.names).items()}
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or set(missing) - ({"output.weight"} if cfg.tie_embeddings else set()):
        raise export.ExportError(f"checkpoint {info.url}: cannot load its weights (missing {missing}, "
                                 f"unexpected {unexpected})")
    log.info("model from %s (step %d): %d layers, dim %d, vocabulary %d", info.url, info.step, cfg.n_layers,
             cfg.dim, cfg.vocab_size)
    return model, tokenizer


def from_hf(url: str) -> tuple[Transformer, Tokenizer]:
    """A Hugging Face Llama directory's model, through train.hf as model=hf reads it, and its
    tokenizer.json."""
    path = url.rstrip("/")
    cfg = hf.model_config(hf.read_config(path), f"{path}/{hf.CONFIG}")
    cfg.name, cfg.path = path, path
    fs, tokenizer_path = url_to_fs(hf.tokenizer_url(path))
    if not fs.exists(tokenizer_path):
        raise hf.HFError(f"--hf {url} has no {hf.TOKENIZER}: generate decodes with the model's own tokenizer")
    return hf.pretrained_model(cfg), HFTokenizer(hf.tokenizer_url(path))


@torch.no_grad()
def generate(model: Transformer, prompt: list[int], *, max_new_tokens: int, temperature: float,
             eos_id: int | None, generator: torch.Generator) -> list[int]:
    """The tokens after `prompt`, to eos (not included) or max_new_tokens: argmax at temperature
    0, else a draw from softmax(logits / temperature)."""
    device = next(model.parameters()).device
    tokens = torch.tensor([prompt], device=device)
    new: list[int] = []
    for _ in range(max_new_tokens):
        logits = model(tokens)[0, -1].float()
        if temperature == 0:
            token = int(logits.argmax())
        else:
            probs = torch.softmax(logits / temperature, dim=-1).cpu()
            token = int(torch.multinomial(probs, 1, generator=generator))
        if token == eos_id:
            break
        new.append(token)
        tokens = torch.cat([tokens, torch.tensor([[token]], device=device)], dim=1)
    return new


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.generate", description=__doc__.split("\n\n")[0])
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", metavar="URL", help="a committed checkpoint, or a checkpoint.url")
    source.add_argument("--hf", metavar="DIR", help="a Hugging Face Llama directory (export or download)")
    p.add_argument("--prompt", required=True, help="the text to continue")
    p.add_argument("--max-new-tokens", type=int, default=64, help="at most this many tokens after the prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy; above 0, sample")
    p.add_argument("--seed", type=int, default=0, help="seeds the sampling")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="auto: one GPU if there is one")
    export.add_storage_args(p)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1 or args.temperature < 0:
        p.error("--max-new-tokens must be >= 1 and --temperature >= 0")
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    try:
        export.configure_storage(args)
        for url in (args.checkpoint or args.hf,):
            storage_fs.check_reachable(url)
        model, tokenizer = from_checkpoint(args.checkpoint) if args.checkpoint else from_hf(args.hf)
        bos = getattr(tokenizer, "bos_id", None)
        prompt = ([bos] if bos is not None else []) + [int(t) for t in tokenizer.encode(args.prompt)]
        if len(prompt) + args.max_new_tokens > model.cfg.max_seq_len:
            raise hf.HFError(f"the prompt ({len(prompt)} tokens) and --max-new-tokens={args.max_new_tokens} exceed "
                             f"the model's max_seq_len={model.cfg.max_seq_len}")
    except (export.ExportError, hf.HFError, CheckpointError, StorageError, OSError) as exc:
        log.error("error: %s", exc)
        return 2
    device = torch.device("cuda" if args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
                          else "cpu")
    model = model.to(device).eval()
    with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
        new = generate(model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       eos_id=tokenizer.eos_id, generator=torch.Generator().manual_seed(args.seed))
    print(tokenizer.decode(new))
    return 0


if __name__ == "__main__":
    sys.exit(main())
