"""Structured output: a job's `response_format` to a grammar matcher, with llguidance.

Why llguidance: measured against xgrammar and outlines-core on this project's tokenizers and
22 schemas (docs/bench/cpu-2core/structured/): the only one whose every finished output
parsed and validated (xgrammar let control characters into strings, outlines-core cannot
bound numbers), compile in about a millisecond where outlines-core took up to 20 s, mask
p99 of 0.3 ms on a 32k vocabulary where xgrammar's was 5.7 ms, MIT-licensed, no
dependencies (xgrammar needs triton and transformers).

Compiling is done once per distinct format (a bounded cache keyed by the canonical JSON of
the format), off the executor: the worker calls `Grammars.compile` on a thread of its own,
and a job waits for it outside admission. The compiled form is a matcher in its start
state; each job takes a deep copy (`Grammar.matcher`). The parser's own limits bound the
work of every later step (`LLParserLimits`); a format that does not compile, or compiles
past `COMPILE_TIMEOUT_S`, is the producer's error (`bad_schema`).

No torch here: masks are filled into numpy arrays (`fill_masks`, on the executor thread
while the device runs what was launched before) and the engine applies them on the device.

A matcher can fail while its job runs: its parser stops (llguidance then masks to the end
tokens only) or it refuses a token. `masks_for` reports which matchers cannot constrain
their next token, and the scheduler checks every sampled token against the mask its row
got (`mask_allows`) before the matcher sees it; either failure ends that job alone
(`grammar_failed`), never the worker. Numbers and strings need no bound of ours: the
lexer's fuel is spent per token, not per lexeme, so a lexeme as long as any job can write
(`max_seq_len`) stays within the parser's default limits (measured to 150,000 tokens;
tests/unit/test_structured_real.py checks 20,000 on a real 49k-token BPE).
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from worker.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer

COMPILE_TIMEOUT_S = 2.0  # a format that takes longer to compile is refused (bad_schema)
CACHE_SIZE = 256  # distinct formats kept compiled
MAX_FORMAT_BYTES = 64 * 1024  # a response_format's JSON; larger is refused at the edge


class GrammarError(ValueError):
    """A response_format that cannot be compiled (the message says why)."""


def canonical(response_format: dict[str, Any]) -> str:
    """The cache key: equal formats, however their keys were ordered, compile once."""
    return json.dumps(response_format, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True, slots=True)
class Grammar:
    """A compiled response_format: `matcher()` gives a job its own matcher."""

    key: str
    _start: Any  # llguidance.LLMatcher in its start state; never advanced

    def matcher(self) -> Any:
        return self._start.deep_copy()


class Grammars:
    """Compiles response formats for one tokenizer, and fills token masks."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_ids: Sequence[int]):
        import llguidance

        self._llg = llguidance
        self.vocab_size = vocab_size
        self.tokenizer = _ll_tokenizer(llguidance, tokenizer, vocab_size, eos_ids)
        self.limits = llguidance.LLParserLimits()
        self._cache: OrderedDict[str, Grammar] = OrderedDict()
        self._lock = threading.Lock()  # compiles run on a pool thread; the cache is shared
        self.compiles = 0  # formats compiled (cache misses), and the time it took
        self.compile_s = 0.0

    def cached(self, response_format: dict[str, Any]) -> Grammar | None:
        """The compiled format if it is in the cache (any thread; marks it recently used)."""
        key = canonical(response_format)
        with self._lock:
            g = self._cache.get(key)
            if g is not None:
                self._cache.move_to_end(key)
            return g

    def compile(self, response_format: dict[str, Any]) -> Grammar:
        """Compile (or find) a format; GrammarError if it cannot be. Blocking: call it off
        the event loop and never on the executor (it drops the GIL while it compiles)."""
        if (g := self.cached(response_format)) is not None:
            return g
        key = canonical(response_format)
        llg = self._llg
        t0 = time.perf_counter()
        try:
            return self._compile(key, response_format, llg)
        finally:
            self.compiles += 1
            self.compile_s += time.perf_counter() - t0

    def _compile(self, key: str, response_format: dict[str, Any], llg: Any) -> Grammar:
        try:
            if response_format["type"] == "json_object":
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    {"type": "object"}, defaults=_JSON_OPTIONS)
            else:
                grammar = llg.LLMatcher.grammar_from_json_schema(
                    response_format["schema"], defaults=_JSON_OPTIONS)
        except (ValueError, TypeError) as e:
            raise GrammarError(f"not a usable JSON Schema: {e}") from None
        start = llg.LLMatcher(self.tokenizer, grammar, log_level=0, limits=self.limits)
        if start.is_error():
            raise GrammarError(f"the schema cannot be compiled: {start.get_error()[:400]}")
        g = Grammar(key, start)
        with self._lock:
            self._cache[key] = g
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
        return g


_executor: Any = None  # llguidance's thread pool for masks, made on first use
MAX_WHY = 400  # characters of a parser's error kept in a job's error message


def fill_masks(matchers: list[Any], vocab_size: int) -> np.ndarray:
    """[len(matchers), ceil(vocab_size / 32)] int32 bitmasks of each matcher's allowed next
    tokens (bit t % 32 of word t // 32 in row i: token t allowed), computed in parallel by
    llguidance's threads with the GIL released."""
    global _executor
    if _executor is None:
        import llguidance

        _executor = llguidance.LLExecutor(num_threads=2)
    words = (vocab_size + 31) // 32
    masks = np.zeros((len(matchers), words), dtype=np.int32)
    _executor.unsafe_compute_mask_ptr([(m, i) for i, m in enumerate(matchers)],
                                      masks.ctypes.data, words * 4, len(matchers))
    return masks


def masks_for(matchers: list[Any], vocab_size: int) -> tuple[np.ndarray, list[str | None]]:
    """`fill_masks`, and for each matcher why it cannot constrain its next token (None: it
    can). A matcher that errored -- before or while its mask was computed -- gets a mask of
    its end tokens from llguidance; the caller must not take that row's token as the job's.
    A batch call that raises (one matcher llguidance will not take) is redone one matcher
    at a time, so only the culprit fails."""
    try:
        masks = fill_masks(matchers, vocab_size)
    except (ValueError, RuntimeError, TypeError):  # pyo3 raises these for a matcher it refuses
        masks = np.zeros((len(matchers), (vocab_size + 31) // 32), dtype=np.int32)
        why: list[str | None] = []
        for i, m in enumerate(matchers):
            try:
                masks[i] = fill_masks([m], vocab_size)[0]
                why.append(None)
            except (ValueError, RuntimeError, TypeError) as e:
                why.append(f"its grammar's mask could not be computed: {e!r}"[:MAX_WHY])
    else:
        why = [None] * len(matchers)
    for i, m in enumerate(matchers):
        if why[i] is None and m.is_error():
            why[i] = f"its grammar's parser stopped: {m.get_error()[:MAX_WHY]}"
    return masks, why


def mask_allows(mask: np.ndarray, token: int) -> bool:
    """Whether a `fill_masks` row allows `token`."""
    return 0 <= token < 32 * len(mask) and bool((int(mask[token >> 5]) >> (token & 31)) & 1)


# Compact JSON: no whitespace between tokens, so a job's tokens go to content. Strings may
# hold any character JSON allows (control characters escaped, as the grammar requires).
_JSON_OPTIONS = {"whitespace_flexible": False}


def _ll_tokenizer(llg: Any, tok: Tokenizer, vocab_size: int, eos_ids: Sequence[int]) -> Any:
    eos = list(eos_ids) or None
    if isinstance(tok, HFTokenizer):
        return llg.LLTokenizer(str(tok.path), n_vocab=vocab_size, eos_token=eos)
    if isinstance(tok, ByteTokenizer):
        return llg.LLTokenizer(llg.TokenizerWrapper(_ByteWords(vocab_size)), n_vocab=vocab_size,
                               eos_token=eos)
    raise GrammarError(f"structured output needs a byte or Hugging Face tokenizer, not "
                       f"{type(tok).__name__}")


class _ByteWords:
    """The byte tokenizer as llguidance reads a vocabulary: id i < 256 is byte i; BOS and
    EOS are special (they spell nothing)."""

    bos_token_id = 256
    eos_token_id = ByteTokenizer.eos_id
    special_token_ids = [256, ByteTokenizer.eos_id]

    def __init__(self, vocab_size: int):
        self.tokens = [bytes([i]) for i in range(256)] + [b"<s>", b"</s>"]
        self.tokens += [b""] * (vocab_size - len(self.tokens))

    def __call__(self, text: bytes | str) -> list[int]:
        return list(text if isinstance(text, bytes) else text.encode("utf-8"))
