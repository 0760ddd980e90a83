"""Structured output on real weights: SmolLM2-135M-Instruct (tests/fixtures_smollm.py), a
49k-token byte-level BPE, the decoder of issue 28's second case.

- The issue's job (prompt `Answer in JSON: `, 256 new tokens, greedy, a string and a number
  in [0, 1]) runs to a clean end on both runners, alone and among mixed traffic, with the
  same tokens either way; every constrained job that ends `stop` parses and validates.
- The issue's exact token sequence (a 70-digit number, then `**,`) fed to the scheduler as
  a model's output: the refused token ends that job alone (`grammar_failed`), where it used
  to be an executor fault that took the worker down.
- The parser's limits hold for numbers and strings far longer than any job can write.
"""

from __future__ import annotations

import json
import random
import time

import jsonschema
import numpy as np
import pytest

from tests.fixtures_smollm import SmolLMUnavailable, smollm_dir
from tests.unit.test_containment import RUNNERS, run
from worker.engine.build import Engine, build_engine
from worker.engine.sequence import Request
from worker.model.grammar import Grammars, fill_masks, mask_allows

pytestmark = pytest.mark.timeout(600)

SCHEMA = {"type": "object", "properties": {
    "lang": {"type": "string"},
    "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["lang", "confidence"]}
# What the model wrote in the issue before it sampled `**,` (token 26765).
WRITTEN = ('{"lang":"en","confidence":'
           '0.68675919967980133355622543754085610021924602276344853288848145333135')
REFUSED = 26765


@pytest.fixture(scope="module")
def smol() -> Engine:
    try:
        path = smollm_dir()
    except SmolLMUnavailable as e:
        pytest.skip(str(e))
    return build_engine(str(path), "cpu", "float32", token_budget=16384, max_seq_len=1024)


def grammars(engine: Engine) -> Grammars:
    L = engine.loaded
    return Grammars(L.tokenizer, L.args.vocab_size, L.eos_ids)


def the_issue_job(engine: Engine, g: Grammars, key: int = 19) -> Request:
    r = Request.greedy(key, engine.loaded.tokenizer.encode("Answer in JSON: "), 256)
    r.grammar = g.compile({"type": "json_schema", "schema": SCHEMA}).matcher()
    return r


def mixed_traffic(engine: Engine, g: Grammars, n: int = 19) -> tuple[list[Request], dict]:
    """Jobs like the issue's mix: chat-rendered prompts sharing a system message, one-
    property schemas, logprobs, sampling."""
    tok, rng = engine.loaded.tokenizer, random.Random(5)
    words = "the queue worker answers every job once with its tokens and its reasons".split()
    reqs, schemas = [], {}
    for k in range(n):
        text = " ".join(rng.choices(words, k=rng.randint(3, 20)))
        ids = tok.encode(("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n"
                          if k % 2 else "") + text)
        r = Request.greedy(100 + k, ids, rng.randint(8, 48), seed=k)
        if k % 3 == 0:
            schemas[r.key] = {"type": "object", "properties": {
                f"k{k}": {"type": "integer", "maximum": k + 10}}, "required": [f"k{k}"]}
            r.grammar = g.compile({"type": "json_schema", "schema": schemas[r.key]}).matcher()
        if k % 4 == 1:
            r.logprobs = 2
        if k % 5 == 2:
            r.temperature = 0.7
        reqs.append(r)
    return reqs, schemas


def valid(engine: Engine, c, schema: dict) -> None:
    jsonschema.validate(json.loads(engine.loaded.tokenizer.decode(c.tokens)), schema)


@pytest.mark.parametrize("mode", RUNNERS)
def test_the_issue_job_ends_cleanly_alone_and_in_mixed_traffic(smol: Engine, mode: str) -> None:
    g = grammars(smol)
    (alone,) = run(smol, mode, [the_issue_job(smol, g)]).values()
    assert alone.error is None and alone.finish_reason in ("stop", "length")
    if alone.finish_reason == "stop":
        valid(smol, alone, SCHEMA)
    others, schemas = mixed_traffic(smol, g)
    got = run(smol, mode, [the_issue_job(smol, g), *others])
    assert [c.error for c in got.values() if c.error] == []
    assert got[19].tokens == alone.tokens
    for k, schema in schemas.items():
        if got[k].finish_reason == "stop":
            valid(smol, got[k], schema)


def test_the_issue_token_sequence_ends_that_job_alone(smol: Engine) -> None:
    """The scheduler fed the issue's tokens as if the model had sampled them: everything it
    wrote is accepted, `**,` is refused, and the job ends `grammar_failed` with the tokens
    before it while its neighbour decodes on."""
    g, tok = grammars(smol), smol.loaded.tokenizer
    written = tok.encode(WRITTEN)
    assert len(written) == 77
    victim, other = the_issue_job(smol, g), Request.greedy(20, tok.encode("Hello"), 100)
    forced = written + [REFUSED]
    sched = smol.scheduler()
    sched.add_all([victim, other], time.monotonic())
    ended = None
    for step in range(len(forced)):
        plan = sched.schedule()
        tokens = [forced[step] if s.req.key == 19 else 42 for s in plan.rows]
        for c in sched.postprocess(plan, tokens, time.monotonic()):
            assert c.key == 19
            ended = c
    assert ended is not None and (ended.finish_reason, ended.error[0]) == ("error",
                                                                           "grammar_failed")
    assert ended.tokens == written and "26765" in ended.error[1]
    assert [s.req.key for s in sched.running] == [20]  # the other job decodes on
    sched.end(20, "cancelled", time.monotonic())
    assert smol.pool.blocks.used_blocks == 0


@pytest.mark.parametrize("kind,prefix,unit", [
    ("number in [0, 1]", '{"lang":"en","confidence":0.', "68675919967980133355"),
    ("string", '{"lang":"', "hello world, the quick brown fox "),
])
def test_long_lexemes_stay_within_the_parsers_limits(smol: Engine, kind: str, prefix: str,
                                                     unit: str) -> None:
    """The bound on numbers and strings is the job's own length (max_seq_len): llguidance's
    lexer fuel is per token, not per lexeme, so a lexeme of any length a job can write stays
    within its default limits (measured to 150,000 tokens; checked here to 20,000, far past
    the longest job a worker admits). The mask stays exact all the way."""
    g, tok = grammars(smol), smol.loaded.tokenizer
    m = g.compile({"type": "json_schema", "schema": SCHEMA}).matcher()
    assert m.consume_tokens(tok.encode(prefix))
    ids = tok.encode(unit)
    vocab = smol.loaded.args.vocab_size
    for i in range(20_000):
        t = ids[i % len(ids)]
        if i % 2_000 == 0:
            assert mask_allows(fill_masks([m], vocab)[0], t)
            assert not mask_allows(fill_masks([m], vocab)[0], REFUSED) or kind == "string"
        assert m.consume_token(t), m.get_error()
    assert not m.is_error()
    assert np.count_nonzero(fill_masks([m], vocab)) > 0
