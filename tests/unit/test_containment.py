"""A failure that belongs to one job ends that job alone (issue 28).

A structured-output job's grammar can fail in two places: before its row is sampled (its
parser stopped on its own limits: llguidance then gives a mask of end tokens only) or on
its token (the matcher rejects it). Either way the job ends with one error Completion
(`grammar_failed`), its KV goes back to the pool, and every other job's tokens are those
it makes alone. The same holds for a job whose logprobs are not finite. And the property
that would have made the worker's old fault impossible: under random mixes of constrained,
cancelled, stopped and logprob jobs, on both runners, every constrained row's token is
one its own mask allowed (checked by the scheduler on every token; a violation would show
here as a `grammar_failed` Completion).
"""

from __future__ import annotations

import dataclasses
import json
import random

import jsonschema
import numpy as np
import pytest

from worker.engine.build import Engine
from worker.engine.postprocess import _advance_grammar
from worker.engine.scheduler import StepPlan
from worker.engine.sequence import Completion, Request
from worker.engine.step import turn
from worker.model.grammar import Grammars, mask_allows
from worker.ops import failpoints

RUNNERS = ("eager", "pipelined")


def one_property(n: int) -> dict:
    """The schemas of the mixed traffic that once took workers down (loadgen.mix)."""
    return {"type": "object", "properties": {f"k{n}": {"type": "integer", "maximum": n + 10}},
            "required": [f"k{n}"]}


def prompt(i: int, n: int = 24) -> list[int]:
    rng = random.Random(i)
    return [rng.randrange(256) for _ in range(n)]


def grammars(engine: Engine) -> Grammars:
    L = engine.loaded
    return Grammars(L.tokenizer, L.args.vocab_size, L.eos_ids)


def constrained(g: Grammars, key: int, n: int = 40, schema: dict | None = None,
                temperature: float = 0.0) -> Request:
    r = Request.greedy(key, prompt(key), n, seed=key)
    r.temperature = temperature
    r.grammar = g.compile({"type": "json_schema",
                           "schema": schema or one_property(key % 300)}).matcher()
    return r


def run(engine: Engine, mode: str, reqs: list[Request],
        ends: dict[int, tuple[int, str]] | None = None) -> dict[int, Completion]:
    """Every request to its end on runner `mode` ("pipelined": the overlapped loop), with
    `ends` {key: (step, reason)} asked at a step boundary as the executor would. One
    Completion per key, and nothing left held in the pool."""
    eng = dataclasses.replace(engine, runner_mode=mode)
    sched, runner = eng.scheduler(overlap=eng.overlaps), eng.runner()
    sched.add_all(reqs, 0.0)
    got: dict[int, Completion] = {}
    inflight, step = None, 0
    while sched.has_work() or inflight is not None:
        for key, (at, reason) in (ends or {}).items():
            if at == step and (c := sched.end(key, reason, 0.0)) is not None:
                got[key] = c
        plan = sched.schedule() if sched.has_work() else StepPlan()
        _, inflight, done = turn(sched, runner, plan, inflight)
        for c in done:
            assert c.key not in got, f"job {c.key} completed twice"
            got[c.key] = c
        step += 1
    assert engine.pool.blocks.used_blocks == 0
    assert set(got) == {r.key for r in reqs}
    return got


def fresh(reqs: list[Request]) -> list[Request]:
    """Copies with their own matchers in the start state (a run advances them)."""
    return [dataclasses.replace(r, grammar=None if r.grammar is None else r.grammar.deep_copy())
            for r in reqs]


@pytest.mark.parametrize("mode", RUNNERS)
def test_a_matcher_stopped_before_sampling_ends_its_job_alone(engine: Engine, mode: str) -> None:
    g = grammars(engine)
    others = [constrained(g, 11), Request.greedy(12, prompt(12, 40), 30),
              constrained(g, 13, temperature=0.8)]
    alone = {c.key: c.tokens for c in run(engine, mode, fresh(others)).values()}
    broken = constrained(g, 10)
    assert not broken.grammar.consume_token(7)  # a token its grammar refuses: parser stopped
    assert broken.grammar.is_error()
    got = run(engine, mode, [broken, *fresh(others)])
    c = got[10]
    assert (c.finish_reason, c.error[0], c.tokens) == ("error", "grammar_failed", [])
    assert "parser stopped" in c.error[1]
    assert {k: got[k].tokens for k in alone} == alone
    assert all(got[k].error is None for k in alone)


@pytest.mark.parametrize("mode", RUNNERS)
def test_a_token_its_grammar_refuses_ends_that_job_with_the_tokens_before_it(
        engine: Engine, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    g = grammars(engine)
    others = [constrained(g, 21), Request.greedy(22, prompt(22, 33), 25)]
    alone = {c.key: c.tokens for c in run(engine, mode, fresh(others)).values()}
    (ok,) = run(engine, mode, [constrained(g, 20)]).values()
    # The job's third token fails in its matcher (as a parser that stops on its limits
    # does): job-specific, so no other job's grammar is touched.
    monkeypatch.setattr(failpoints, "_points",
                        failpoints.parse("grammar.advance=raise@3:job=victim"))
    victim = dataclasses.replace(constrained(g, 20), job_id="victim")
    got = run(engine, mode, [victim, *fresh(others)])
    c = got[20]
    assert (c.finish_reason, c.error[0]) == ("error", "grammar_failed")
    assert c.tokens == ok.tokens[:2]  # the refused token is not its output
    assert {k: got[k].tokens for k in alone} == alone


def test_a_token_outside_its_rows_mask_is_the_engines_fault_named_as_such(
        engine: Engine) -> None:
    g = grammars(engine)
    r = constrained(g, 30)
    seq = type("S", (), {})()  # the two fields _advance_grammar reads
    seq.req, seq.mask = r, np.zeros((engine.loaded.args.vocab_size + 31) // 32, np.int32)
    seq.mask[ord("{") >> 5] = 1 << (ord("{") & 31)
    assert mask_allows(seq.mask, ord("{")) and not mask_allows(seq.mask, ord("["))
    code, why = _advance_grammar(seq, ord("["))
    assert code == "grammar_failed" and "outside its grammar's mask" in why
    assert _advance_grammar(seq, ord("{")) is None  # allowed and accepted


@pytest.mark.parametrize("mode", RUNNERS)
def test_logprobs_that_are_not_finite_end_that_job_alone(engine: Engine, mode: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """NaN logits for one row (a broken checkpoint, an overflow) would make a Result the
    wire refuses: the job ends `logprobs_failed`; its neighbours keep their tokens."""
    import worker.engine.runner as runner_mod

    real = runner_mod.token_logprobs

    def nan_for_row0(logits, tokens, n):
        out = real(logits, tokens, n).clone()
        out[0, 0] = float("nan")
        return out

    reqs = [dataclasses.replace(Request.greedy(40 + i, prompt(40 + i, 20 + i), 12), logprobs=2)
            for i in range(3)]
    alone = {c.key: c.tokens for c in run(engine, mode, [dataclasses.replace(r) for r in reqs])
             .values()}
    monkeypatch.setattr(runner_mod, "token_logprobs", nan_for_row0)
    got = run(engine, mode, reqs)
    failed = [c for c in got.values() if c.error is not None]
    assert failed and all(c.error[0] == "logprobs_failed" for c in failed)
    for c in got.values():
        if c.error is None:
            assert c.tokens == alone[c.key] and len(c.logprobs) == len(c.tokens)
            assert np.isfinite(c.logprobs).all()


@pytest.mark.parametrize("mode", RUNNERS)
@pytest.mark.parametrize("seed", [1, 2])
def test_every_constrained_token_is_one_its_own_mask_allowed_under_random_mixes(
        engine: Engine, mode: str, seed: int) -> None:
    """Random mixes -- constrained (300 one-property schemas, greedy and sampled),
    plain, logprobs, shared prefixes, jobs ended as cancelled or by a stop string at
    random step boundaries -- submitted in waves while others run, as the executor takes
    them. The scheduler checks each constrained token against the mask its row was
    sampled under; any slip of the row bookkeeping fails that job `grammar_failed`."""
    g = grammars(engine)
    rng = random.Random(seed)
    eng = dataclasses.replace(engine, runner_mode=mode)
    sched, runner = eng.scheduler(overlap=eng.overlaps), eng.runner()
    system = prompt(10_000 + seed, 45)
    got: dict[int, Completion] = {}
    ended: dict[int, Completion] = {}  # ended from outside (cancel, stop string)
    schemas: dict[int, dict] = {}
    inflight, key = None, 0
    for wave in range(40):
        wave_reqs = []
        for _ in range(rng.randint(1, 8)):
            key += 1
            p = (system if rng.random() < 0.3 else []) + prompt(key, rng.randint(1, 60))
            r = Request.greedy(key, p, rng.randint(1, 48), seed=key)
            if rng.random() < 0.3:
                r.temperature = 0.7
            if rng.random() < 0.3:
                r.logprobs = rng.choice((0, 2, 5))
            if rng.random() < 0.4:
                schemas[key] = one_property(rng.randrange(300))
                r.grammar = g.compile({"type": "json_schema", "schema": schemas[key]}).matcher()
            wave_reqs.append(r)
        sched.add_all(wave_reqs, 0.0)
        for _ in range(rng.randint(1, 6)):
            if rng.random() < 0.25 and sched.live:
                k = rng.choice(sorted(sched.live))
                if (c := sched.end(k, rng.choice(("cancelled", "stop")), 0.0)) is not None:
                    got[k] = ended[k] = c
            plan = sched.schedule() if sched.has_work() else StepPlan()
            if not plan and inflight is None:
                break
            _, inflight, done = turn(sched, runner, plan, inflight)
            for c in done:
                assert c.key not in got
                got[c.key] = c
    while sched.has_work() or inflight is not None:
        _, inflight, done = turn(sched, runner, sched.schedule() if sched.has_work()
                                 else StepPlan(), inflight)
        got.update((c.key, c) for c in done)
    assert len(got) == key and engine.pool.blocks.used_blocks == 0
    assert [c.error for c in got.values() if c.error is not None] == []
    tok = engine.loaded.tokenizer
    finished = [k for k in schemas if got[k].finish_reason == "stop" and k not in ended
                and got[k].tokens[-1] not in engine.loaded.eos_ids]
    for k in finished:
        jsonschema.validate(json.loads(tok.decode(got[k].tokens)), schemas[k])
    assert len(schemas) > 50


def test_the_byte_tokenizer_case_a_first_token_its_grammar_forbids_ends_that_job_alone(
        engine: Engine) -> None:
    """Issue 28's first case, fed to the scheduler as a model's output: the job's first
    token is byte 0xA0 where its grammar forces `{`. The job ends `grammar_failed` with no
    tokens; the job beside it decodes on; nothing is left held."""
    import time

    g = grammars(engine)
    victim, other = constrained(g, 69044), Request.greedy(7, prompt(7), 20)
    sched = engine.scheduler()
    sched.add_all([victim, other], time.monotonic())
    plan = sched.schedule()
    done = sched.postprocess(plan, [0xA0 if s.req.key == 69044 else 65 for s in plan.rows],
                             time.monotonic())
    assert [(c.key, c.finish_reason, c.error[0], c.tokens) for c in done] == [
        (69044, "error", "grammar_failed", [])]
    assert "rejected token 160" in done[0].error[1]
    assert [s.req.key for s in sched.running] == [7]
    sched.end(7, "cancelled", time.monotonic())
    assert engine.pool.blocks.used_blocks == 0
