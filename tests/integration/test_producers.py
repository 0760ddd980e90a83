"""What producers send, through the real worker and a real nats-server: JSON jobs answered in
JSON, stop strings, logprobs, chat messages, and cancellation (of a running job, a waiting
one, one not delivered yet, and by a fleet-wide cancel heard by two workers)."""

from __future__ import annotations

import asyncio
import json
import time

import msgpack
import nats
import pytest

from loadgen.fleet import provision
from schemas import ErrorCode, FinishReason, Job, Message, Result, Role, Sampling, encode
from schemas import decode_result
from worker.engine.build import build_engine
from worker.engine.sequence import Request
from worker.engine.step import generate
from worker.model.tokenizer import ByteTokenizer

pytestmark = pytest.mark.timeout(240)

RESULTS = "fabric.results.prod"


@pytest.fixture(scope="module")
def reference_engine():
    return build_engine("builtin:tiny", "cpu", "float32", 32768, 1088)


def reference_tokens(engine, prompt: list[int], n: int) -> list[int]:
    return generate(engine, [Request.greedy(1, prompt, n)])[0].tokens


class Client:
    """Publishes jobs and collects raw Result payloads by job id."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.js = nc.jetstream()
        self.raw: dict[str, list[bytes]] = {}
        self._arrived = asyncio.Condition()

    @classmethod
    async def connect(cls, url: str) -> Client:
        c = cls(await nats.connect(url))
        await c.nc.subscribe(RESULTS, cb=c._on_result)
        return c

    async def _on_result(self, m) -> None:
        r = decode_result(m.data)
        async with self._arrived:
            self.raw.setdefault(r.id, []).append(m.data)
            self._arrived.notify_all()

    async def send(self, job: Job | bytes) -> None:
        await self.js.publish("fabric.jobs.prod", job if isinstance(job, bytes) else encode(job))

    async def result(self, job_id: str, timeout_s: float = 60) -> Result:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: job_id in self.raw), timeout_s)
        return decode_result(self.raw[job_id][0])

    async def cancel(self, ids: list[str], subject: str = "fabric.cancel") -> None:
        await self.nc.publish(subject, json.dumps({"ids": ids}).encode())
        await self.nc.flush()


def job(job_id: str, prompt, n: int, **sampling) -> Job:
    return Job(id=job_id, prompt=prompt, max_new_tokens=n, reply_to=RESULTS,
               sampling=Sampling(**sampling))


async def test_a_json_job_is_answered_in_json(tmp_engine_toml, workers, nats_url,
                                              reference_engine) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg)
    c = await Client.connect(nats_url)
    try:
        await c.send(json.dumps({"id": "j1", "prompt": [5, 6, 7], "max_new_tokens": 6,
                                 "reply_to": RESULTS}).encode())
        await c.send(b'{"id": "j2", "prompt": [5], "max_new_tokens": 6.0, "reply_to": "'
                     + RESULTS.encode() + b'"}')
        await c.send(encode(job("m1", [5, 6, 7], 6)))
        ok, bad, packed = [await c.result(i) for i in ("j1", "j2", "m1")]
        for i in ("j1", "j2"):
            body = json.loads(c.raw[i][0])  # a JSON object, readable by `nats sub`
            assert body["id"] == i
        assert msgpack.unpackb(c.raw["m1"][0])["id"] == "m1"  # msgpack stays msgpack
        assert ok.ok and ok.tokens == packed.tokens == reference_tokens(reference_engine,
                                                                        [5, 6, 7], 6)
        assert not bad.ok and bad.error.code is ErrorCode.INVALID_JOB
        assert "max_new_tokens" in bad.error.message
    finally:
        await c.nc.close()


def expected_stop(tokens: list[int], stop: str) -> tuple[list[int], str]:
    """Independently of the worker's matcher: the shortest prefix whose text holds `stop`."""
    tok = ByteTokenizer()
    for n in range(1, len(tokens) + 1):
        text = tok.decode(tokens[:n])
        if stop in text:
            return tokens[:n], text[:text.index(stop)]
    raise AssertionError("stop string not in the text")


@pytest.mark.parametrize("runner", ["eager", "pipelined"])
async def test_stop_strings_and_logprobs(tmp_engine_toml, workers, nats_url, reference_engine,
                                         runner) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg, extra_args=("--runner", runner))
    tok = ByteTokenizer()
    c = await Client.connect(nats_url)
    try:
        cases = {}
        for i in range(40):
            prompt = [(7 * i + 3 * k) % 256 for k in range(5 + i)]
            ref = reference_tokens(reference_engine, prompt, 40)
            # Two printable bytes in a row, after a few tokens: a stop string that spans
            # tokens (the random model's bytes are mostly not text).
            at = [k for k in range(3, 30) if all(32 < t < 127 for t in ref[k:k + 2])]
            if at:
                stop = tok.decode(ref[at[0]:at[0] + 2])
                cases[f"s{i}"] = (prompt, ref, stop)
                await c.send(job(f"s{i}", prompt, 40, stop=["never-there", stop], logprobs=3))
            if len(cases) == 4:
                break
        assert len(cases) >= 2
        for jid, (prompt, ref, stop) in cases.items():
            r = await c.result(jid)
            want_tokens, want_text = expected_stop(ref, stop)
            assert r.ok and r.finish_reason is FinishReason.STOP, jid
            assert r.tokens == want_tokens and r.text == want_text, (jid, stop)
            assert r.usage.completion_tokens == len(r.tokens)
            assert len(r.logprobs) == len(r.tokens)
            for t, lp in zip(r.tokens, r.logprobs):  # greedy: the token is the most likely
                assert lp.token == t and len(lp.top) == 3 and lp.top[0][0] == t
                assert lp.logprob == pytest.approx(lp.top[0][1], abs=1e-6) and lp.logprob <= 0
    finally:
        await c.nc.close()


async def test_a_chat_job_is_rendered_with_the_models_template(tmp_engine_toml, workers,
                                                               nats_url, reference_engine) -> None:
    """The builtin models carry a ChatML-style template over bytes (worker.model.chat)."""
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg)
    chat = reference_engine.loaded.chat
    messages = [Message(role=Role.SYSTEM, content="be brief"),
                Message(role=Role.USER, content="hello ☃")]
    prompt = chat.render(messages)
    c = await Client.connect(nats_url)
    try:
        await c.send(Job(id="chat1", messages=messages, max_new_tokens=8, reply_to=RESULTS))
        await c.send(Job(id="chat2", messages=[Message(role=Role.ASSISTANT, content="x")],
                         max_new_tokens=8, reply_to=RESULTS))
        r = await c.result("chat1")
        assert r.ok and r.usage.prompt_tokens == len(prompt)
        assert r.tokens == reference_tokens(reference_engine, prompt, 8)
        await c.result("chat2")  # answered, whatever the template makes of it
    finally:
        await c.nc.close()


SLOW = {"FABRIC_FAILPOINTS": "executor.step=sleep(0.05):job=slow-"}


async def test_a_running_job_is_cancelled_within_steps_with_its_tokens(
        tmp_engine_toml, workers, nats_url, reference_engine) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg, env=SLOW)  # steps with a slow- job take 50 ms: 400 tokens would be 20 s
    prompt = [9, 8, 7, 6]
    c = await Client.connect(nats_url)
    try:
        await c.send(job("slow-1", prompt, 400))
        await c.send(job("fast-1", [1, 2], 4))
        await c.result("fast-1")  # the slow job has started by now (admitted together)
        await asyncio.sleep(0.5)
        t0 = time.monotonic()
        await c.cancel(["slow-1", "not-held-anywhere"])
        r = await c.result("slow-1", timeout_s=10)
        took = time.monotonic() - t0
        assert not r.ok and r.error.code is ErrorCode.CANCELLED
        assert r.finish_reason is FinishReason.CANCELLED
        assert 0 < len(r.tokens) < 400 and took < 2.0, (len(r.tokens), took)
        assert r.tokens == reference_tokens(reference_engine, prompt, 400)[:len(r.tokens)]
        # Its blocks went back: a job as large as the budget allows still runs.
        await c.send(job("after", prompt, 8))
        assert (await c.result("after")).ok
        await asyncio.sleep(0.5)
        assert len(c.raw["slow-1"]) == 1  # one Result, acked: never redelivered
        # Cancelling it again, or cancelling a finished job, changes nothing.
        await c.cancel(["slow-1", "after"])
        await asyncio.sleep(0.5)
        assert len(c.raw["slow-1"]) == 1 and len(c.raw["after"]) == 1
    finally:
        await c.nc.close()


async def test_a_cancel_before_the_job_arrives_wins_and_two_workers_both_hear_cancels(
        tmp_engine_toml, workers, nats_url) -> None:
    cfg = tmp_engine_toml(token_budget=2048, low_water=1024)
    provision(cfg)
    ws = [workers(cfg, name=name, env=SLOW) for name in ("w1", "w2")]
    c = await Client.connect(nats_url)
    try:
        await c.cancel(["early-1"])
        await asyncio.sleep(0.3)  # both workers have it (core NATS: no ordering with the stream)
        await c.send(job("early-1", [1, 2, 3], 50))
        r = await c.result("early-1")
        logs = "\n".join(line for w in ws for line in w.log_path.read_text().splitlines()
                         if "cancel" in line or "early-1" in line)
        assert r.error is not None, f"{r}\n{logs}"
        assert r.error.code is ErrorCode.CANCELLED and r.tokens == [] and r.usage.padded_tokens == 0
        # Enough slow jobs that both workers hold some, waiting or running; one cancel for all.
        ids = [f"slow-{i}" for i in range(12)]
        for i in ids:
            await c.send(job(i, [3, 4, 5, 6], 300))
        await asyncio.sleep(1.5)
        await c.cancel(ids)
        got = [await c.result(i, timeout_s=20) for i in ids]
        assert all(r.error is not None and r.error.code is ErrorCode.CANCELLED for r in got)
        assert {r.worker for r in got} == {"w1", "w2"}
    finally:
        await c.nc.close()


async def test_a_cancel_sent_while_no_worker_runs_is_honoured_by_one_started_later(
        tmp_engine_toml, workers, nats_url) -> None:
    """The broker keeps cancels (`provision` makes a stream capture the subject): a worker
    that was not running when one was sent reads them before it is ready."""
    cfg = tmp_engine_toml()
    provision(cfg)
    c = await Client.connect(nats_url)
    try:
        await c.cancel(["gone-1", "gone-2"])  # nobody runs: only the stream hears these
        await c.send(job("gone-1", [1, 2, 3], 20))
        await c.send(job("kept-1", [1, 2, 3], 4))
        w = workers(cfg)
        gone, kept = await c.result("gone-1"), await c.result("kept-1")
        assert gone.error is not None and gone.error.code is ErrorCode.CANCELLED
        assert gone.tokens == [] and gone.usage.padded_tokens == 0  # no device time
        assert kept.ok and len(kept.tokens) == 4
        assert "cancels_replayed" in w.log_path.read_text()
        await c.send(job("gone-2", [4, 5], 4))  # delivered later: still remembered
        assert (await c.result("gone-2")).error.code is ErrorCode.CANCELLED
    finally:
        await c.nc.close()


async def test_a_bad_cancel_message_is_refused_and_changes_nothing(tmp_engine_toml, workers,
                                                                   nats_url) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg)
    nc = await nats.connect(nats_url)
    try:
        reply = await nc.request("fabric.cancel", b'{"ids": "everything"}', timeout=5)
        body = json.loads(reply.data)
        assert body["ok"] is False and "ids" in body["error"]
        too_many = json.dumps({"ids": [f"j{i}" for i in range(10_000)]}).encode()
        reply = await nc.request("fabric.cancel", too_many, timeout=5)
        assert json.loads(reply.data)["ok"] is False
        reply = await nc.request("fabric.cancel", b'{"ids": ["nobody"]}', timeout=5)
        assert json.loads(reply.data) == {"ok": True, "worker": "w1", "held": []}
    finally:
        await nc.close()


async def test_structured_output_through_the_worker(tmp_engine_toml, workers, nats_url) -> None:
    """A schema job ends `stop` with JSON that fits; the same schema again is not compiled
    again; a schema that cannot be compiled is answered `bad_schema` without device time."""
    import jsonschema

    cfg = tmp_engine_toml()
    provision(cfg)
    w = workers(cfg)
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                     "maximum": 9},
                                               "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}
    c = await Client.connect(nats_url)
    try:
        for i in range(4):
            await c.send(Job(id=f"js{i}", prompt=[10 + i, 20, 30], max_new_tokens=40,
                             reply_to=RESULTS, sampling=Sampling(temperature=0.8, seed=i),
                             response_format={"type": "json_schema", "schema": schema}))
        await c.send(json.dumps({"id": "any", "prompt": "x", "max_new_tokens": 40,
                                 "reply_to": RESULTS,
                                 "response_format": {"type": "json_object"}}).encode())
        await c.send(Job(id="bad", prompt=[1], max_new_tokens=40, reply_to=RESULTS,
                         response_format={"type": "json_schema",
                                          "schema": {"type": "string", "pattern": "(oops"}}))
        for i in range(4):
            r = await c.result(f"js{i}")
            assert r.ok and r.finish_reason is FinishReason.STOP, r
            jsonschema.validate(json.loads(r.text), schema)
        anything = await c.result("any")
        assert anything.ok
        if anything.finish_reason is FinishReason.STOP:  # length: cut short, no promise
            assert isinstance(json.loads(anything.text), dict)
        bad = await c.result("bad")
        assert bad.error.code is ErrorCode.BAD_SCHEMA and bad.usage.padded_tokens == 0
    finally:
        await c.nc.close()
    w.terminate(grace_s=10)
    summary = next(json.loads(line) for line in w.log_path.read_text().splitlines()
                   if '"worker_summary"' in line)
    assert summary["grammar_compiles"] == 3  # the schema once, json_object once, the bad one
    assert summary["masked_steps"] > 0


async def test_one_jobs_broken_grammar_ends_that_job_alone_under_mixed_traffic(
        tmp_engine_toml, workers, nats_url, reference_engine) -> None:
    """Issue 28 through the real worker: a structured-output job whose matcher fails on its
    third token (a failpoint inside the grammar's advance, for that job only) is answered
    once, `grammar_failed`, with the tokens before the failure; a job whose stop matcher
    raises is answered once, `stop_failed`, with its tokens so far; the worker stays up, every
    other job of the mix (plain, chat, stop strings with logprobs, schemas, JSON) is
    answered once and ok, the plain ones with the tokens they make alone; and the worker
    serves the next job."""
    import jsonschema

    cfg = tmp_engine_toml()
    provision(cfg)
    w = workers(cfg, env={"FABRIC_FAILPOINTS": "grammar.advance=raise@3:job=victim;"
                                               "stops.feed=raise@4:job=stopper"})
    schema = {"type": "object", "properties": {"k5": {"type": "integer", "maximum": 15}},
              "required": ["k5"]}
    fmt = {"type": "json_schema", "schema": schema}
    c = await Client.connect(nats_url)
    try:
        await c.send(Job(id="victim", prompt=[9, 8, 7], max_new_tokens=30, reply_to=RESULTS,
                         response_format=fmt))
        await c.send(job("stopper", [9, 9, 9], 40, stop=["never"], ignore_eos=True))
        plain = {f"p{i}": [5 + i, 6, 7, 8] for i in range(6)}
        for jid, p in plain.items():
            await c.send(job(jid, p, 12))
        for i in range(4):
            await c.send(Job(id=f"s{i}", prompt=[20 + i, 21], max_new_tokens=30,
                             reply_to=RESULTS, response_format=fmt,
                             sampling=Sampling(temperature=0.7, seed=i)))
            await c.send(json.dumps({"id": f"t{i}", "prompt": f"hello {i}", "max_new_tokens": 20,
                                     "reply_to": RESULTS, "sampling": {
                                         "stop": ["zz", "\n\n"], "logprobs": 2,
                                         "temperature": 0.7, "seed": i}}).encode())
            await c.send(Job(id=f"c{i}", messages=[Message(role=Role.USER, content=f"hi {i}")],
                             max_new_tokens=10, reply_to=RESULTS))
        victim = await c.result("victim")
        assert (victim.ok, victim.error.code) == (False, ErrorCode.GRAMMAR_FAILED)
        assert victim.finish_reason is FinishReason.ERROR and len(victim.tokens) == 2
        stopper = await c.result("stopper")  # its stop matcher raised on its 4th token
        assert (stopper.error.code, stopper.finish_reason) == (ErrorCode.STOP_FAILED,
                                                               FinishReason.ERROR)
        assert 4 <= len(stopper.tokens) < 40
        for jid, p in plain.items():
            r = await c.result(jid)
            assert r.ok and r.tokens == reference_tokens(reference_engine, p, 12)
        for i in range(4):
            s, t, ch = [await c.result(f"{k}{i}") for k in "stc"]
            assert s.ok and t.ok and ch.ok, (s.error, t.error, ch.error)
            if s.finish_reason is FinishReason.STOP:
                jsonschema.validate(json.loads(s.text), schema)
        await c.send(job("after", [1, 2, 3], 5))
        assert (await c.result("after")).ok
        assert all(len(v) == 1 for v in c.raw.values())
    finally:
        await c.nc.close()
    assert w.returncode is None  # still serving
    w.terminate(grace_s=10)
    summary = next(json.loads(line) for line in w.log_path.read_text().splitlines()
                   if '"worker_summary"' in line)
    assert summary["errors_by_code"] == {"grammar_failed": 1, "stop_failed": 1}
