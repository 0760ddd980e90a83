"""What producers send beyond a prompt, below the broker: stop strings, logprobs, ignore_eos,
cancellation (ending a job at a step boundary), and the cancel message's contract.

The engine runs the builtin tiny model in float32 on the CPU; transformers comparisons for
logprobs and end-of-sequence are in test_hf_reference.py.
"""

from __future__ import annotations

import dataclasses
import json
import random

import msgpack
import numpy as np
import pytest

from worker.broker.cancels import MAX_IDS, CancelError, Cancelled, parse_cancel
from worker.engine.blocks import padded_tokens
from worker.engine.build import Engine
from worker.engine.scheduler import StepPlan
from worker.engine.sequence import Request
from worker.engine.step import generate, turn
from worker.model.stops import StopMatcher
from worker.model.tokenizer import ByteTokenizer

BS = 16


def req(key: int, prompt: list[int], max_new: int = 12, **kw) -> Request:
    return Request(key=key, prompt=prompt, max_new_tokens=max_new,
                   reserved_tokens=padded_tokens(len(prompt) + max_new, BS), temperature=0.0,
                   top_k=0, top_p=1.0, seed=key, stop_ids=frozenset(), **kw)


def rand(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(256) for _ in range(n)]


# -- stop strings ------------------------------------------------------------------------


def feed_one_by_one(m: StopMatcher, ids: list[int]) -> bool:
    return any([m.feed([i]) for i in ids])


def test_a_stop_string_split_across_tokens_is_found_at_the_token_that_completes_it() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("abc###def")
    m = StopMatcher(tok, ["###"])
    assert not m.feed(ids[:4])  # "abc#"
    assert m.feed(ids[4:])
    assert m.end == 6 and m.text[:m.cut] == "abc"  # tokens through the third '#'


@pytest.mark.parametrize("chunks", [1, 2, 3, 100])
def test_matching_does_not_depend_on_how_tokens_arrive(chunks: int) -> None:
    tok = ByteTokenizer()
    ids = tok.encode("héllo wörld, ☃ and more ☃☃ END tail")
    ref = StopMatcher(tok, ["☃☃", "END"])
    feed_one_by_one(ref, ids)
    m = StopMatcher(tok, ["☃☃", "END"])
    for i in range(0, len(ids), chunks):
        m.feed(ids[i:i + chunks])
    assert (m.end, m.cut) == (ref.end, ref.cut)
    # '☃☃' is 6 bytes: its last byte completes it, and the text stops before it
    assert tok.decode(ids[:m.end]).endswith("☃☃") and m.text[:m.cut] == "héllo wörld, ☃ and more "


def test_the_earliest_stop_wins_and_a_stop_in_the_first_token_counts() -> None:
    tok = ByteTokenizer()
    m = StopMatcher(tok, ["zz", "b"])
    assert m.feed(tok.encode("ab")) and (m.end, m.text[:m.cut]) == (2, "a")
    m = StopMatcher(tok, ["x"])
    assert m.feed(tok.encode("x")) and (m.end, m.text[:m.cut]) == (1, "")
    m = StopMatcher(tok, ["cd", "bcde"])
    assert m.feed(tok.encode("abcdef")) and m.end == 4 and m.text[:m.cut] == "ab"  # "cd" first
    m = StopMatcher(tok, ["nope"])
    assert not m.feed(tok.encode("no no nop")) and m.end is None


def test_a_stop_inside_an_unfinished_character_waits_for_the_character() -> None:
    tok = ByteTokenizer()
    ids = tok.encode("x☃")
    m = StopMatcher(tok, ["☃"])
    assert not m.feed(ids[:2])  # 'x' and the first byte of the snowman: nothing to match yet
    assert m.text == "x"
    assert m.feed(ids[2:]) and m.end == 4 and m.text[:m.cut] == "x"


# -- cancel messages ---------------------------------------------------------------------


def test_a_cancel_message_is_a_list_of_job_ids_in_json_or_msgpack() -> None:
    assert parse_cancel(b'{"ids": ["a", "b", "a"]}') == ["a", "b"]
    assert parse_cancel(msgpack.packb({"ids": ["job-1"]})) == ["job-1"]
    assert parse_cancel(json.dumps({"ids": ["x" * 128] * 3}).encode()) == ["x" * 128]


@pytest.mark.parametrize("data", [
    b"", b"not json", b"[1, 2]", b'{"ids": "a"}', b'{"ids": []}', b'{"ids": [1]}',
    b'{"ids": ["a b"]}', b'{"ids": [""]}', b'{"id": ["a"]}', b'{"ids": ["a"], "x": 1}',
    json.dumps({"ids": ["x" * 129]}).encode(), msgpack.packb(["a"]),
    json.dumps({"ids": [f"j{i}" for i in range(MAX_IDS + 1)]}).encode(),
    json.dumps({"ids": [f"j{i}" for i in range(10_000)]}).encode(),
], ids=["empty", "text", "json array", "ids not a list", "no ids", "int id", "space in id",
        "empty id", "wrong key", "extra key", "long id", "msgpack array", "too many", "10k ids"])
def test_a_bad_cancel_message_is_refused_with_a_reason(data: bytes) -> None:
    with pytest.raises(CancelError) as info:
        parse_cancel(data)
    assert str(info.value)


def test_cancelled_ids_are_remembered_for_the_window_and_up_to_the_capacity() -> None:
    c = Cancelled(window_s=10.0, capacity=3)
    c.add(["a", "b"], now=0.0)
    c.add(["c"], now=5.0)
    assert "a" in c and "c" in c and len(c) == 3
    c.add(["d"], now=6.0)  # over capacity: the oldest goes first
    assert "a" not in c and "b" in c and len(c) == 3
    c.forget_expired(now=10.0)
    assert "b" not in c and "c" in c and "d" in c
    c.add(["c"], now=12.0)  # cancelled again: remembered from now
    c.forget_expired(now=16.5)
    assert "c" in c and "d" not in c


# -- ending a job at a step boundary -----------------------------------------------------


def drive(engine: Engine, reqs: list[Request], end_at: dict[int, int], overlap: bool = False):
    """Run like the executor; end job k (reason cancelled) before step end_at[k]. Returns the
    completions by key and the step each was reported in."""
    sched, runner = engine.scheduler(overlap=overlap), engine.runner()
    sched.add_all(reqs, 0.0)
    done, when, inflight, step = {}, {}, None, 0
    while sched.has_work() or inflight is not None:
        for k, at in end_at.items():
            if at == step and (c := sched.end(k, "cancelled", 0.0)) is not None:
                done[k], when[k] = c, step
        plan = sched.schedule() if sched.has_work() else StepPlan()
        _, inflight, finished = turn(sched, runner, plan, inflight)
        for c in finished:
            done[c.key], when[c.key] = c, step
        step += 1
    engine.pool.blocks.check()
    assert engine.pool.blocks.used_blocks == 0 and not sched.live
    return done, when


@pytest.mark.parametrize("overlap", [False, True], ids=["eager", "overlapped"])
def test_a_cancelled_job_ends_at_the_next_step_with_its_tokens_and_frees_its_blocks(
        engine: Engine, overlap: bool) -> None:
    rng = random.Random(3)
    prompts = [rand(rng, n) for n in (5, 30, 70)]
    full, _ = drive(engine, [req(i, p, 20) for i, p in enumerate(prompts)], {}, overlap)
    got, when = drive(engine, [req(i, p, 20) for i, p in enumerate(prompts)], {1: 6}, overlap)
    c = got[1]
    assert c.finish_reason == "cancelled" and when[1] == 6
    assert 0 < len(c.tokens) < 20 and c.tokens == full[1].tokens[:len(c.tokens)]
    for k in (0, 2):  # the others are untouched
        assert (got[k].tokens, got[k].finish_reason) == (full[k].tokens, full[k].finish_reason)


def test_a_job_cancelled_before_its_first_step_ends_empty_and_one_unknown_is_ignored(
        engine: Engine) -> None:
    sched = engine.scheduler()
    sched.add_all([req(1, [1, 2, 3], logprobs=2), req(2, [4, 5, 6], solo=True)], 0.0)
    for key in (1, 2):
        c = sched.end(key, "cancelled", 0.0)
        assert c.tokens == [] and c.finish_reason == "cancelled"
        assert c.logprobs is None if key == 2 else c.logprobs.shape == (0, 5)
    assert sched.end(1, "cancelled", 0.0) is None and sched.end(99, "cancelled", 0.0) is None
    assert not sched.has_work() and engine.pool.blocks.used_blocks == 0


def test_cancelling_the_job_that_would_compute_a_shared_prefix_leaves_it_to_the_others(
        engine: Engine) -> None:
    """A burst sharing an uncached prefix: the one that would compute it is cancelled before
    its step; the others compute it instead, and their tokens do not change."""
    rng = random.Random(9)
    system = rand(rng, 64)
    prompts = [system + rand(rng, rng.randint(1, 20)) for _ in range(4)]
    engine.pool.blocks.drop_cached()
    alone = {k: c.tokens for k, c in drive(engine, [req(i + 1, p) for i, p in enumerate(prompts[1:])],
                                            {})[0].items()}
    engine.pool.blocks.drop_cached()
    got, _ = drive(engine, [req(i, p) for i, p in enumerate(prompts)], {0: 0})
    assert got[0].tokens == [] and all(got[k].tokens == alone[k] for k in (1, 2, 3))


# -- ignore_eos and logprobs ---------------------------------------------------------------


def test_the_models_eos_ends_a_job_unless_it_asks_to_ignore_it(engine: Engine) -> None:
    prompt = rand(random.Random(4), 20)
    (free,) = generate(engine, [req(0, prompt, 16)])
    eos = free.tokens[5]
    first = free.tokens.index(eos)
    with_eos = dataclasses.replace(engine, loaded=dataclasses.replace(engine.loaded,
                                                                      eos_ids=(eos,)))
    (stopped,) = generate(with_eos, [req(0, prompt, 16)])
    assert stopped.tokens == free.tokens[:first + 1] and stopped.finish_reason == "stop"
    (ignored,) = generate(with_eos, [req(0, prompt, 16, ignore_eos=True)])
    assert ignored.tokens == free.tokens and ignored.finish_reason == "length"


@pytest.mark.parametrize("runner", ["eager", "pipelined"])
def test_logprobs_describe_the_sampled_token_and_change_nothing_else(engine: Engine,
                                                                     runner: str) -> None:
    engine = dataclasses.replace(engine, runner_mode=runner)
    rng = random.Random(5)
    prompts = [rand(rng, n) for n in (3, 17, 40)]
    plain = {c.key: c for c in generate(engine, [req(i, p) for i, p in enumerate(prompts)])}
    reqs = [req(0, prompts[0], logprobs=1), req(1, prompts[1], logprobs=20), req(2, prompts[2])]
    for r in reqs:
        r.temperature, r.seed = 0.8, 7  # sampled, not greedy: logprobs must not move the draw
    sampled = {c.key: c for c in generate(engine, [dataclasses.replace(r, logprobs=0)
                                                   for r in reqs])}
    got = {c.key: c for c in generate(engine, reqs)}
    assert got[2].logprobs is None
    for k, n in ((0, 1), (1, 20)):
        c = got[k]
        assert c.tokens == sampled[k].tokens
        rows = c.logprobs
        assert rows.shape == (len(c.tokens), 1 + 2 * n) and rows.dtype == np.float32
        ids, vals = rows[:, 1:1 + n].astype(np.int64), rows[:, 1 + n:]
        assert (vals <= 0).all() and (np.diff(vals, axis=1) <= 0).all()  # most likely first
        assert (np.exp(vals).sum(axis=1) <= 1 + 1e-4).all()
        for t, (tok, row) in enumerate(zip(c.tokens, rows)):
            if tok in ids[t]:  # the chosen token's logprob is its entry in the top list
                assert row[0] == pytest.approx(vals[t][list(ids[t]).index(tok)], abs=1e-5)
            else:
                assert row[0] <= vals[t][-1] + 1e-5
    greedy = {c.key: c for c in generate(engine, [req(i, p, logprobs=3)
                                                  for i, p in enumerate(prompts)])}
    for k, c in greedy.items():  # greedy: the chosen token is the most likely one
        assert c.tokens == plain[k].tokens
        assert (c.logprobs[:, 1].astype(np.int64) == c.tokens).all()
        assert np.allclose(c.logprobs[:, 0], c.logprobs[:, 4], atol=1e-6)
