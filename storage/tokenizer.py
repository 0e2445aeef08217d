"""Tokenizers that turn text into token ids for `storage.prepare`.

Two kinds: `ByteTokenizer` (UTF-8 bytes, no file, no download: what the builtin dataset and
the CPU smoke run use) and `HFTokenizer` (a Hugging Face `tokenizer.json`). Each has a
`fingerprint` that the dataset's index.json records, so a dataset always says which
tokenizer made it and a model with a too-small vocabulary can be refused up front.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Protocol

import numpy as np

from storage.fs import has_protocol, url_to_fs

# Names under which tokenizer.json files commonly declare their end-of-text token.
_EOS_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
# ... and their begin-of-text token (Llama 3, Llama 2 / Mistral, Gemma, GPT-NeoX style).
_BOS_NAMES = ("<|begin_of_text|>", "<s>", "<bos>", "<|startoftext|>")


class Tokenizer(Protocol):
    name: str
    vocab_size: int
    eos_id: int
    bos_id: int | None  # None: documents are separated by eos alone
    fingerprint: str

    def encode(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """Token id = UTF-8 byte value. vocab_size 256; NUL (id 0) is the end-of-document token.

    NUL does not occur in real text, so it is free to mark document ends; any NUL that does
    occur in the input is dropped so that it cannot be mistaken for one.
    """

    name = "byte"
    vocab_size = 256
    eos_id = 0
    bos_id = None
    fingerprint = "byte-v1"

    def encode(self, text: str) -> np.ndarray:
        """uint8 array of the UTF-8 bytes of `text`, NUL removed."""
        ids = np.frombuffer(text.encode("utf-8", errors="replace"), dtype=np.uint8)
        return ids[ids != self.eos_id] if (ids == self.eos_id).any() else ids

    def decode(self, ids) -> str:
        """Text for `ids`; eos tokens become newlines, invalid UTF-8 becomes U+FFFD."""
        data = bytes(np.asarray(ids, dtype=np.uint8)).replace(b"\0", b"\n")
        return data.decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json` (any fsspec URL), through the `tokenizers` package."""

    def __init__(self, url: str) -> None:
        fs, path = url_to_fs(url)
        if not fs.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {url} (expected 'byte' or a tokenizer.json)")
        try:
            import tokenizers
        except ImportError as e:
            raise ImportError(
                f"tokenizer {url} needs the `tokenizers` package: pip install tokenizers"
            ) from e
        with fs.open(path, "rb") as f:
            data = f.read()
        self._tok = tokenizers.Tokenizer.from_str(data.decode("utf-8"))
        # the name index.json records: absolute for a local file, so that it still names the file
        # when export or generate run from another directory
        self.name = url if has_protocol(url) else os.path.abspath(os.path.expanduser(url))
        self.vocab_size = int(self._tok.get_vocab_size(with_added_tokens=True))
        spec = json.loads(data)
        self.eos_id = self._find_eos(spec, url)
        self.bos_id = self._find_bos(spec)
        self.fingerprint = hashlib.sha256(data).hexdigest()

    def _find_eos(self, spec: dict, url: str) -> int:
        """The end-of-text id declared in the file: documents are separated by it."""
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        for name in _EOS_NAMES:
            if name in special:
                return int(special[name])
        for name in _EOS_NAMES:
            token_id = self._tok.token_to_id(name)
            if token_id is not None:
                return int(token_id)
        raise ValueError(
            f"tokenizer {url} declares no end-of-text token (looked for {', '.join(_EOS_NAMES)}); "
            "documents need one to be separated"
        )

    def _find_bos(self, spec: dict) -> int | None:
        """The begin-of-text id, if the file declares one as a special token other than eos:
        storage.prepare then starts every document with it, as Llama 2 and 3 were trained."""
        special = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
        for name in _BOS_NAMES:
            if name in special and int(special[name]) != self.eos_id:
                return int(special[name])
        return None

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`, without special tokens (the writer appends eos itself)."""
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int64)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def load_tokenizer(spec: str) -> Tokenizer:
    """`"byte"` for the byte tokenizer, else the path or URL of a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    return HFTokenizer(spec)
