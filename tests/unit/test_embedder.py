"""The embedding worker's engine and edge on the real model: steps pack whole inputs from the
length lanes, every input's vector equals the encoder's on it alone, a waiting job can be
ended, and the validator turns embed jobs into tickets (or answers)."""

from __future__ import annotations

import random
import types

import msgpack
import numpy as np
import pytest

from schemas import ErrorCode, Job, encode
from tests.fixtures_minilm import minilm_dir_or_skip
from worker.broker.validate import Limits, Outcome, Ticket, Validator
from worker.engine.blocks import padded_tokens
from worker.engine.build import EngineError, build_engine
from worker.engine.embedder import EmbedEngine, embed_now
from worker.engine.sequence import Request


@pytest.fixture(scope="module")
def engine() -> EmbedEngine:
    return build_engine(str(minilm_dir_or_skip()), "cpu", "float32", token_budget=4096,
                        max_seq_len=256, max_step_tokens=600)


def ids_of(engine: EmbedEngine, n: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    vocab = engine.loaded.args.vocab_size
    return [[101] + [rng.randrange(1000, vocab) for _ in range(rng.randint(1, 200))] + [102]
            for _ in range(n)]


def test_an_encoder_checkpoint_makes_an_embedding_engine(engine: EmbedEngine) -> None:
    assert engine.task == "embed" and engine.loaded.info.dim == 384
    with pytest.raises(EngineError, match="max_seq_len"):
        build_engine(str(minilm_dir_or_skip()), "cpu", "float32", 4096, 512)


def test_packed_steps_give_each_input_its_own_vector(engine: EmbedEngine) -> None:
    prompts = ids_of(engine, 24, seed=1)
    together = embed_now(engine, prompts)
    model = engine.loaded.encoder.model
    for p, v in zip(prompts, together):
        alone = model.embed([p], normalize=False)[0].numpy()
        assert np.abs(v - alone).max() < 1e-4
    assert engine.pool.blocks.used_blocks == 0


def test_a_step_takes_whole_inputs_oldest_lane_first_up_to_the_cap(engine: EmbedEngine) -> None:
    sched = engine.scheduler()
    prompts = ids_of(engine, 12, seed=2)
    sched.add_all([Request(key=i, prompt=p, max_new_tokens=0,
                           reserved_tokens=padded_tokens(len(p), 16), temperature=0.0, top_k=0,
                           top_p=1.0, seed=0, stop_ids=frozenset())
                   for i, p in enumerate(prompts)], 0.0)
    seen = []
    while sched.has_work():
        plan = sched.schedule()
        rows = plan.rows
        assert sum(len(s.req.prompt) for s in rows) <= 600 or len(rows) == 1
        for lane in plan.prefill:  # one lane, one attention group: similar lengths
            assert len({s.lane for s in lane}) == 1
        seen += [s.req.key for s in rows]
        sched.postprocess(plan, [np.zeros(384, np.float32)] * len(rows), 0.0)
    assert sorted(seen) == list(range(12)) and engine.pool.blocks.used_blocks == 0


def test_a_waiting_embed_job_can_be_ended(engine: EmbedEngine) -> None:
    sched = engine.scheduler()
    p = ids_of(engine, 1, seed=3)[0]
    sched.add_all([Request(key=7, prompt=p, max_new_tokens=0,
                           reserved_tokens=padded_tokens(len(p), 16), temperature=0.0, top_k=0,
                           top_p=1.0, seed=0, stop_ids=frozenset())], 0.0)
    c = sched.end(7, "cancelled", 0.0)
    assert c.finish_reason == "cancelled" and c.embedding is None and not sched.has_work()
    assert engine.pool.blocks.used_blocks == 0


def msg(job: Job) -> types.SimpleNamespace:
    return types.SimpleNamespace(data=encode(job), reply="$JS.ACK.S.c.1.1.1.0.0",
                                 subject="fabric.jobs.x")


def test_the_validator_tokenizes_embed_jobs_and_answers_what_it_cannot_run(
        engine: EmbedEngine) -> None:
    lim = Limits(vocab_size=engine.loaded.args.vocab_size, max_seq_len=256, budget_tokens=4096,
                 block_size=16, reply_prefix="fabric.results.", task="embed", embed_dim=384)
    v = Validator(lim, engine.loaded.tokenizer)

    def check(**kw):
        return v.check(msg(Job(id="j", task="embed", reply_to="fabric.results.x", **kw)), 0.0)

    [t] = check(prompt="hello world")
    assert isinstance(t, Ticket) and t.prompt == engine.loaded.tokenizer.encode(
        "hello world", truncate=False).ids and t.reserved_tokens == 16
    [cut] = check(prompt="word " * 300, truncate=True)
    assert isinstance(cut, Ticket) and cut.truncated and len(cut.prompt) == 256
    for kw, code in ((dict(prompt="word " * 300), ErrorCode.TOO_LONG),
                     (dict(prompt=[101] * 300), ErrorCode.TOO_LONG),
                     (dict(prompt=[10**6]), ErrorCode.BAD_TOKEN),
                     (dict(prompt="hi", dimensions=385), ErrorCode.INVALID_JOB)):
        o = check(**kw)
        assert isinstance(o, Outcome) and o.error.code is code, (kw, o.error)
    gen = v.check(msg(Job(id="g", prompt="hi", max_new_tokens=3, reply_to="fabric.results.x")),
                  0.0)
    assert isinstance(gen, Outcome) and gen.error.code is ErrorCode.UNSUPPORTED_TASK
    generate_worker = Validator(Limits(vocab_size=320, max_seq_len=1088, budget_tokens=4096,
                                       block_size=16, reply_prefix="fabric.results."),
                                engine.loaded.tokenizer)
    o = generate_worker.check(msg(Job(id="e", prompt="hi", task="embed",
                                      reply_to="fabric.results.x")), 0.0)
    assert isinstance(o, Outcome) and o.error.code is ErrorCode.UNSUPPORTED_TASK
    assert msgpack.unpackb(encode(Job(id="e", prompt="hi", task="embed", reply_to="r"))) \
        .get("max_new_tokens", "absent") == "absent"
