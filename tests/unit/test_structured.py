"""Structured output: every Result that ends `stop` parses and fits its schema, the masks
are exactly what the grammar allows, and constrained jobs change nothing for the others.

The schemas are the ones the grammar libraries were measured on
(docs/bench/cpu-2core/structured/json_schemas.py: objects, required and optional properties,
arrays with bounds, enums, const, bounded numbers, strings with lengths and patterns,
nesting, $ref). Two tokenizers: the builtin byte tokenizer, and a byte-level BPE trained
in the test under a tiny random Llama (tokens there cross grammar boundaries: `":`, `"}`).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import random
from pathlib import Path

import jsonschema
import numpy as np
import pytest

from worker.engine.build import Engine, build_engine
from worker.engine.scheduler import StepPlan
from worker.engine.sequence import Request
from worker.engine.step import generate, turn
from worker.model.grammar import GrammarError, Grammars, canonical, fill_masks

_spec = importlib.util.spec_from_file_location(
    "bench_schemas",
    Path(__file__).resolve().parents[2] / "docs/bench/cpu-2core/structured/json_schemas.py")
_mod = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_mod)
SCHEMAS: dict[str, dict] = _mod.SCHEMAS


def fmt(schema: dict | None) -> dict:
    return {"type": "json_object"} if schema is None else {"type": "json_schema", "schema": schema}


def grammars(engine: Engine) -> Grammars:
    loaded = engine.loaded
    return Grammars(loaded.tokenizer, loaded.args.vocab_size, loaded.eos_ids)


def prompt(i: int, n: int = 24) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(256) for _ in range(n)]


def constrained(g: Grammars, key: int, schema: dict | None, p: list[int], n: int = 160,
                temperature: float = 0.0) -> Request:
    r = Request.greedy(key, p, n, seed=key)
    r.temperature = temperature
    r.grammar = g.compile(fmt(schema)).matcher()
    return r


def check_valid(engine: Engine, done, schemas: dict[int, dict | None]) -> int:
    """Every constrained Result that ended `stop` parses and validates; returns how many."""
    tok = engine.loaded.tokenizer
    stopped = 0
    for c in done:
        if c.key not in schemas or c.finish_reason != "stop":
            continue
        value = json.loads(tok.decode(c.tokens))
        schema = schemas[c.key]
        jsonschema.validate(value, schema if schema is not None else {"type": "object"})
        stopped += 1
    return stopped


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "seeded"])
def test_every_finished_output_fits_its_schema_on_the_byte_tokenizer(engine: Engine,
                                                                     temperature: float) -> None:
    g = grammars(engine)
    schemas = dict(enumerate([*SCHEMAS.values(), None]))
    reqs = [constrained(g, k, s, prompt(k), temperature=temperature) for k, s in schemas.items()]
    done = generate(engine, reqs)
    stopped = check_valid(engine, done, schemas)
    assert stopped >= 0.8 * len(schemas), f"only {stopped} of {len(schemas)} finished"
    assert engine.pool.blocks.used_blocks == 0


def test_a_job_that_runs_out_of_tokens_says_length(engine: Engine) -> None:
    g = grammars(engine)
    (c,) = generate(engine, [constrained(g, 1, SCHEMAS["extraction"], prompt(1), n=5)])
    assert c.finish_reason == "length" and len(c.tokens) == 5
    assert engine.loaded.tokenizer.decode(c.tokens).startswith("{")


def test_unconstrained_jobs_give_the_same_tokens_beside_constrained_ones(engine: Engine) -> None:
    g = grammars(engine)
    plain = [Request.greedy(100 + i, prompt(100 + i, 10 + 7 * i), 30, seed=i) for i in range(4)]
    for r in plain[2:]:
        r.temperature = 0.8
    alone = {c.key: c.tokens for c in generate(engine, [dataclasses.replace(r) for r in plain])}
    mixed = plain + [constrained(g, k, s, prompt(k), temperature=0.7 * (k % 2))
                     for k, s in enumerate(list(SCHEMAS.values())[:8])]
    together = {c.key: c.tokens for c in generate(engine, mixed)}
    assert {k: together[k] for k in alone} == alone


def test_a_constrained_jobs_tokens_do_not_depend_on_its_batch(engine: Engine) -> None:
    g = grammars(engine)
    schema = SCHEMAS["classification"]
    (alone,) = generate(engine, [constrained(g, 7, schema, prompt(7), temperature=0.9)])
    crowd = [constrained(g, k, s, prompt(k), temperature=0.9)
             for k, s in enumerate(list(SCHEMAS.values())[:6])]
    crowd.append(constrained(g, 7, schema, prompt(7), temperature=0.9))
    got = {c.key: c for c in generate(engine, crowd)}
    assert got[7].tokens == alone.tokens


def test_overlapped_steps_give_the_same_tokens(engine: Engine) -> None:
    """The pipelined runner's loop: a constrained row sits out the step after each of its
    tokens (its next mask needs that token), and its tokens do not change."""
    g = grammars(engine)
    schemas = dict(enumerate(list(SCHEMAS.values())[:6]))

    def reqs():
        out = [constrained(g, k, s, prompt(k), temperature=0.5 * (k % 2))
               for k, s in schemas.items()]
        return out + [Request.greedy(50, prompt(50), 40)]

    plain = {c.key: c.tokens for c in generate(engine, reqs())}
    piped = dataclasses.replace(engine, runner_mode="pipelined")
    sched, runner = piped.scheduler(overlap=True), piped.runner()
    sched.add_all(reqs(), 0.0)
    got, inflight = {}, None
    while sched.has_work() or inflight is not None:
        _, inflight, done = turn(sched, runner, sched.schedule() if sched.has_work()
                                 else StepPlan(), inflight)
        got.update((c.key, c.tokens) for c in done)
    assert got == plain


def test_prefix_caching_and_constrained_output(engine: Engine) -> None:
    g = grammars(engine)
    system = prompt(999, 64)
    for round_ in range(2):
        reqs = [constrained(g, k, SCHEMAS["int-bounds"], system + prompt(k, 5))
                for k in range(4)]
        done = generate(engine, reqs)
        assert check_valid(engine, done, {k: SCHEMAS["int-bounds"] for k in range(4)}) == 4
        if round_:
            assert sum(c.cached_tokens for c in done) >= 4 * 64


def test_masks_are_exactly_what_the_grammar_allows(engine: Engine) -> None:
    """Replay recorded generations through a fresh matcher: at every step our mask's bit for
    each token equals the library's own verdict on that token (`validate_tokens`)."""
    g = grammars(engine)
    vocab = engine.loaded.args.vocab_size
    for name in ("nested", "pattern", "number-bounds", "unicode-enum", "ref"):
        (c,) = generate(engine, [constrained(g, 3, SCHEMAS[name], prompt(3), temperature=0.9)])
        m = g.compile(fmt(SCHEMAS[name])).matcher()
        for tok in c.tokens:
            bits = np.unpackbits(fill_masks([m], vocab).view(np.uint8), bitorder="little")[:vocab]
            probe = m.deep_copy()
            for t in range(vocab):
                assert bool(bits[t]) == (probe.validate_tokens([t]) == 1), (name, t)
            assert bits[tok] and m.consume_token(tok)


def test_a_bad_schema_is_refused_and_formats_compile_once() -> None:
    eng = build_engine("builtin:null", "cpu", "float32", 4096, 1088)
    g = grammars(eng)
    for bad in ({"type": "objectx"}, {"type": "string", "pattern": "(unclosed"},
                {"$ref": "#/$defs/missing"}):
        with pytest.raises(GrammarError):
            g.compile(fmt(bad))
    a = g.compile(fmt({"type": "object", "properties": {"a": {"type": "integer"}}}))
    b = g.compile(fmt({"properties": {"a": {"type": "integer"}}, "type": "object"}))
    assert a is b and g.cached(fmt({"properties": {"a": {"type": "integer"}}, "type": "object"}))
    assert canonical(fmt({"b": 1, "a": 2})) == canonical(fmt({"a": 2, "b": 1}))


# -- a Hugging Face checkpoint with a BPE tokenizer --------------------------------------


@pytest.fixture(scope="module")
def bpe_engine(tmp_path_factory: pytest.TempPathFactory) -> Engine:
    pytest.importorskip("transformers")
    from tests.unit.test_chat import write_tokenizer
    from tests.unit.test_chat_reference import tiny_llama

    path = write_tokenizer(tmp_path_factory.mktemp("bpe"), "chatml")
    tiny_llama(path)
    return build_engine(str(path), "cpu", "float32", token_budget=16384, max_seq_len=512)


@pytest.mark.parametrize("temperature", [0.0, 0.9], ids=["greedy", "seeded"])
def test_every_finished_output_fits_its_schema_on_a_bpe_tokenizer(bpe_engine: Engine,
                                                                  temperature: float) -> None:
    g = grammars(bpe_engine)
    tok = bpe_engine.loaded.tokenizer
    schemas = dict(enumerate([*SCHEMAS.values(), None]))
    reqs = [constrained(g, k, s, tok.encode(f"Reply in JSON, please ({k})."), n=120,
                        temperature=temperature) for k, s in schemas.items()]
    done = generate(bpe_engine, reqs)
    assert check_valid(bpe_engine, done, schemas) >= 0.6 * len(schemas)


def json_bpe(path: Path) -> Path:
    """A byte-level BPE trained on JSON, so its merges cross grammar boundaries."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rng = random.Random(0)
    lines = [json.dumps({"k": "v" * rng.randint(1, 3), "n": rng.randint(0, 99),
                         "xs": ["a", "b"][:rng.randint(0, 2)]}, separators=(",", ":"))
             for _ in range(2000)]
    t = Tokenizer(models.BPE())
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(lines, trainers.BpeTrainer(
        vocab_size=400, special_tokens=["</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    have = {t.decode([i]) for i in range(t.get_vocab_size())}
    t.add_tokens([s for s in ('"}', '",', '":') if s not in have])  # whatever merges missed
    t.save(str(path / "tokenizer.json"))
    return path / "tokenizer.json"


def test_tokens_that_cross_a_grammar_boundary_are_allowed(tmp_path: Path) -> None:
    """A BPE token that closes a string and goes on into the JSON around it (`"}`, `",`,
    `":`) is allowed exactly where the grammar allows all of its text."""
    from worker.model.tokenizer import HFTokenizer

    tok = HFTokenizer(json_bpe(tmp_path))
    g = Grammars(tok, tok.vocab_size, (tok.encode("</s>", add_special_tokens=False)[0],))
    crossing = {t: tok.decode([t]) for t in range(tok.vocab_size)
                if tok.decode([t]) in ('"}', '",', '":', '"]', '},', '":"')}
    assert {'"}', '",', '":'} <= set(crossing.values()), crossing
    m = g.compile(fmt({"type": "object", "properties": {"k": {"type": "string"}},
                       "required": ["k"], "additionalProperties": False})).matcher()
    for t in tok.encode('{"k":"v', add_special_tokens=False):
        assert m.consume_token(t)
    bits = np.unpackbits(fill_masks([m], tok.vocab_size).view(np.uint8),
                         bitorder="little")[:tok.vocab_size]
    for t, text in crossing.items():
        assert bool(bits[t]) == (text == '"}'), text  # after "v: close and end the object
    m2 = g.compile(fmt(SCHEMAS["flat"])).matcher()
    for t in tok.encode('{"name', add_special_tokens=False):
        assert m2.consume_token(t)
    bits = np.unpackbits(fill_masks([m2], tok.vocab_size).view(np.uint8),
                         bitorder="little")[:tok.vocab_size]
    allowed = {text for t, text in crossing.items() if bits[t]}
    assert '":' in allowed and '"}' not in allowed and '",' not in allowed
