"""Text <-> token ids at the edge: a `tokenizer.json` when the checkpoint has one, bytes otherwise.

The byte tokenizer is lossless for any UTF-8 text (ids 0..255 are the bytes), so builtin
models accept text prompts with no vocabulary file. Decoding never raises: invalid UTF-8
from a random model becomes replacement characters.

`encode(text)` adds what the tokenizer's post-processor adds (a BOS, say) to a text
prompt; `add_special_tokens=False` leaves the text as written, for a rendered chat
template that already holds its special tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """ids 0..255 are bytes; 256 = BOS, 257 = EOS."""

    vocab_size = 258
    eos_id = 257

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # Nothing to add either way: byte prompts never get a BOS.
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if 0 <= i < 256).decode("utf-8", errors="replace")


class HFTokenizer:
    """A Hugging Face `tokenizer.json`, through the `tokenizers` library."""

    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        self.path = path  # structured output builds its own view of the vocabulary from it
        self._tok = _Tok.from_file(str(path))
        # The id space, not the count: added tokens may sit above a gap in the ids.
        self.vocab_size = max(self._tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def load_tokenizer(model_dir: Path | None) -> Tokenizer:
    if model_dir is not None and (model_dir / "tokenizer.json").is_file():
        return HFTokenizer(model_dir / "tokenizer.json")
    return ByteTokenizer()
