"""Which grammar library: xgrammar, llguidance, outlines-core, measured on this project's two
tokenizer kinds (the builtin byte tokenizer, a 32k byte-level BPE trained here) and the
schemas in json_schemas.py: compile time per schema, mask time per step, and whether every
finished output parses and validates (random walks through each grammar's allowed tokens).

Run: PYTHONPATH=<dir with the three wheels installed> python eval_grammars.py
"""

from __future__ import annotations

import json
import random
import statistics
import sys
import time
from pathlib import Path

import jsonschema
import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from json_schemas import SCHEMAS  # noqa: E402

WALKS, MAX_STEPS = 4, 200


def bpe(vocab: int = 32000):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast
    root = Path(__file__).resolve().parents[4]
    files = [str(p) for p in list(root.glob("**/*.py"))[:400] + list(root.glob("docs/**/*.md"))]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.train(files, trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<s>", "</s>"],
                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf = PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<s>", eos_token="</s>")
    return hf


class Bytes:
    """The builtin byte tokenizer: ids 0..255 are bytes, 256 BOS, 257 EOS."""
    eos_token_id, bos_token_id = 257, 256
    tokens = [bytes([i]) for i in range(256)] + [b"<s>", b"</s>"]
    special_token_ids = [256, 257]
    vocab_size = 258

    def __call__(self, s):
        return list(s if isinstance(s, bytes) else s.encode())

    def decode(self, ids):
        return bytes(i for i in ids if i < 256).decode("utf-8", "replace")


def allowed_from_bits(bits: np.ndarray, vocab: int) -> np.ndarray:
    flat = np.unpackbits(bits.view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(flat)


class XGrammar:
    name = "xgrammar"

    def __init__(self, tok, vocab):
        import xgrammar as xgr
        self.xgr, self.vocab = xgr, vocab
        if isinstance(tok, Bytes):
            info = xgr.TokenizerInfo([bytes([i]) for i in range(256)] + [b"", b""],
                                     xgr.VocabType.RAW, vocab_size=vocab, stop_token_ids=[257])
        else:
            info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bits = xgr.allocate_token_bitmask(1, vocab)

    def compile(self, schema):
        return self.compiler.compile_json_schema(json.dumps(schema), any_whitespace=False)

    def walk_start(self, compiled):
        return self.xgr.GrammarMatcher(compiled)

    def allowed(self, m):
        m.fill_next_token_bitmask(self.bits, 0)
        return allowed_from_bits(self.bits[0].numpy(), self.vocab)

    def accept(self, m, t):
        assert m.accept_token(t)

    def done(self, m):
        return m.is_terminated()


class LLGuidance:
    name = "llguidance"

    def __init__(self, tok, vocab):
        import llguidance
        import llguidance.numpy as lnp
        self.llg, self.lnp, self.vocab = llguidance, lnp, vocab
        if isinstance(tok, Bytes):
            self.tok = llguidance.LLTokenizer(llguidance.TokenizerWrapper(tok))
        else:
            import llguidance.hf
            self.tok = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
        self.bits = lnp.allocate_token_bitmask(1, self.tok.vocab_size)

    def compile(self, schema):
        g = self.llg.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False})
        m = self.llg.LLMatcher(self.tok, g)  # compiles lazily; the first mask does the rest
        self.lnp.fill_next_token_bitmask(m, self.bits, 0)
        assert not m.is_error(), m.get_error()
        return g

    def walk_start(self, g):
        return self.llg.LLMatcher(self.tok, g)

    def allowed(self, m):
        self.lnp.fill_next_token_bitmask(m, self.bits, 0)
        return allowed_from_bits(self.bits[0], self.vocab)

    def accept(self, m, t):
        assert m.consume_token(t), m.get_error()

    def done(self, m):
        return m.is_stopped()


class Outlines:
    name = "outlines-core"

    def __init__(self, tok, vocab):
        import outlines_core
        self.oc, self.vocab = outlines_core, vocab
        if isinstance(tok, Bytes):
            mapping = {}
            for i in range(256):  # byte tokens as the strings outlines-core's DFA reads
                mapping.setdefault(bytes([i]).decode("latin-1"), []).append(i)
            self.eos = 257
        else:
            vocab_map = tok.get_vocab()
            mapping = {}
            for s, i in vocab_map.items():
                if i not in (tok.bos_token_id, tok.eos_token_id):
                    mapping.setdefault(s, []).append(i)
            self.eos = tok.eos_token_id
        self.vocabulary = outlines_core.Vocabulary(self.eos, mapping)

    def compile(self, schema):
        regex = self.oc.json_schema.build_regex_from_schema(json.dumps(schema))
        return self.oc.Index(regex, self.vocabulary)

    def walk_start(self, index):
        return self.oc.Guide(index)

    def allowed(self, g):
        return np.asarray(g.get_tokens())

    def accept(self, g, t):
        g.advance(t)

    def done(self, g):
        return g.is_finished()


def walk(lib, compiled, rng, decode, eos):
    m = lib.walk_start(compiled)
    out, times = [], []
    for _ in range(MAX_STEPS):
        t0 = time.perf_counter()
        allowed = lib.allowed(m)
        times.append(time.perf_counter() - t0)
        if len(allowed) == 0:
            return None, times, "empty mask"
        if eos in allowed and (rng.random() < 0.5 or len(allowed) == 1):
            lib.accept(m, eos)
            return decode(out), times, None
        choices = [int(a) for a in allowed if a != eos]
        # Prefer short closers sometimes, so walks end: a quote, bracket or brace token.
        t = rng.choice(choices)
        lib.accept(m, t)
        out.append(t)
        if lib.done(m):
            return decode(out), times, None
    return None, times, "length"


def main() -> None:
    kinds = {"bytes": (Bytes(), 258, Bytes().decode, 257)}
    hf = bpe()
    kinds["bpe-32k"] = (hf, len(hf), lambda ids: hf.decode(ids), hf.eos_token_id)
    report = {}
    for kind, (tok, vocab, decode, eos) in kinds.items():
        for cls in (XGrammar, LLGuidance, Outlines):
            try:
                lib = cls(tok, vocab)
            except Exception as e:  # noqa: BLE001
                report[f"{cls.name}/{kind}"] = {"error": f"set-up: {e!r}"[:300]}
                continue
            comp, mask, bad, ok, unfinished, errors = [], [], [], 0, 0, {}
            rng = random.Random(0)
            for name, schema in SCHEMAS.items():
                t0 = time.perf_counter()
                try:
                    compiled = lib.compile(schema)
                except Exception as e:  # noqa: BLE001
                    errors[name] = f"compile: {e!r}"[:200]
                    continue
                comp.append(time.perf_counter() - t0)
                for _ in range(WALKS):
                    try:
                        text, times, why = walk(lib, compiled, rng, decode, eos)
                    except Exception as e:  # noqa: BLE001
                        errors[name] = f"walk: {e!r}"[:200]
                        break
                    mask += times
                    if text is None:
                        unfinished += 1
                        continue
                    try:
                        jsonschema.validate(json.loads(text), schema)
                        ok += 1
                    except Exception as e:  # noqa: BLE001
                        bad.append((name, text[:80], str(e)[:80]))
            report[f"{cls.name}/{kind}"] = {
                "schemas_compiled": len(comp), "compile_ms_median": round(1e3 * statistics.median(comp), 2) if comp else None,
                "compile_ms_max": round(1e3 * max(comp), 2) if comp else None,
                "mask_us_median": round(1e6 * statistics.median(mask), 1) if mask else None,
                "mask_us_p99": round(1e6 * sorted(mask)[int(0.99 * len(mask))], 1) if mask else None,
                "finished_valid": ok, "finished_invalid": len(bad), "unfinished": unfinished,
                "invalid_examples": bad[:3], "errors": errors}
            print(f"{cls.name}/{kind}", json.dumps(report[f'{cls.name}/{kind}']), flush=True)
    Path(__file__).with_name("eval_grammars.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
