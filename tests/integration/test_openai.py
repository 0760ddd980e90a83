"""OpenAI Batch API lines through the real worker and a real nats-server, checked against the
official `openai` package: every output body validates with its pydantic types (no field it
does not know), error bodies too, and each request gives the same tokens as the same work
sent in the project's own format."""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import msgpack
import nats
import numpy as np
import pytest
from openai import BaseModel as OpenAIModel
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject

from loadgen.fleet import provision
from schemas import Job, Message, Result, Sampling, encode
from tests.fixtures_minilm import minilm_dir_or_skip

pytestmark = pytest.mark.timeout(300)

RESULTS = "fabric.results.oai"
MODEL = "builtin:tiny"


def strict(kind: type[OpenAIModel], body: dict[str, Any]) -> OpenAIModel:
    """The body as the openai type, refusing any key the type does not declare (its models
    keep unknown keys as extras instead of failing)."""
    obj = kind.model_validate(body)

    def walk(v: Any, where: str) -> None:
        if isinstance(v, OpenAIModel):
            assert not v.model_extra, f"{where}: keys openai does not know: {v.model_extra}"
            for name in type(v).model_fields:
                walk(getattr(v, name), f"{where}.{name}")
        elif isinstance(v, list):
            for i, x in enumerate(v):
                walk(x, f"{where}[{i}]")
    walk(obj, kind.__name__)
    return obj


def line(cid: str, url: str, body: dict[str, Any]) -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": url, "body": body, "reply_to": RESULTS}


async def exchange(url: str, payloads: list[bytes], n: int,
                   counts: dict[str, int] | None = None, linger_s: float = 0.0) -> dict[str, Any]:
    """Publish, and gather n answers by id (an output line's custom_id or a Result's id);
    `counts` gets how many answers each id had, heard `linger_s` past the n-th."""
    nc = await nats.connect(url)
    got: dict[str, Any] = {}
    counts = {} if counts is None else counts
    done = asyncio.Event()

    async def on(m) -> None:
        data = json.loads(m.data) if m.data[:1] == b"{" else msgpack.unpackb(m.data)
        key = data.get("custom_id", data.get("id"))
        got[key] = data
        counts[key] = counts.get(key, 0) + 1
        if len(got) >= n:
            done.set()

    await nc.subscribe(RESULTS, cb=on)
    await nc.flush()
    js = nc.jetstream()
    for p in payloads:
        await js.publish("fabric.jobs.oai", p)
    await asyncio.wait_for(done.wait(), 180)
    await asyncio.sleep(linger_s)
    await nc.close()
    return got


def own(job_id: str, n: int, **kw: Any) -> bytes:
    return encode(Job(id=job_id, max_new_tokens=n, reply_to=RESULTS, **kw), as_json=True)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city.",
    "parameters": {"type": "object", "additionalProperties": False, "required": ["city"],
                   "properties": {"city": {"type": "string", "maxLength": 6}}}}}
CITY = {"type": "object", "additionalProperties": False, "required": ["city"],
        "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo"]}}}
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


async def test_chat_and_completions_lines_conform_and_equal_the_own_format(
        tmp_engine_toml, workers, nats_url) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg)
    user = [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}]
    lines = [
        line("chat-greedy", CHAT, {"model": MODEL, "max_tokens": 12, "temperature": 0,
                                   "logprobs": True, "top_logprobs": 2, "messages": [
                                       {"role": "developer", "content": "Be brief."},
                                       {"role": "user", "content": user}]}),
        line("chat-seeded", CHAT, {"model": MODEL, "max_completion_tokens": 10,
                                   "temperature": 0.8, "top_p": 0.9, "seed": 11, "stop": "zz",
                                   "messages": [{"role": "user", "content": "Hi"}]}),
        line("text", COMPLETIONS, {"model": MODEL, "prompt": "Once upon a time",
                                   "max_tokens": 9, "temperature": 0, "logprobs": 2}),
        line("ids", COMPLETIONS, {"model": MODEL, "prompt": [[5, 6, 7]], "max_tokens": 6,
                                  "temperature": 0}),
        line("schema", CHAT, {"model": MODEL, "max_tokens": 40, "temperature": 0,
                              "messages": [{"role": "user", "content": "Where?"}],
                              "response_format": {"type": "json_schema", "json_schema": {
                                  "name": "city", "strict": True, "schema": CITY}}}),
        line("tool", CHAT, {"model": MODEL, "max_tokens": 80, "temperature": 0,
                            "messages": [{"role": "user", "content": "Weather?"}],
                            "tools": [WEATHER], "tool_choice": {
                                "type": "function", "function": {"name": "get_weather"}}}),
    ]
    twins = [
        own("own-chat-greedy", 12, messages=[Message(role="system", content="Be brief."),
                                             Message(role="user", content="Hello\nthere")],
            sampling=Sampling(logprobs=2)),
        own("own-chat-seeded", 10, messages=[Message(role="user", content="Hi")],
            sampling=Sampling(temperature=0.8, top_p=0.9, seed=11, stop=["zz"])),
        own("own-text", 9, prompt="Once upon a time", sampling=Sampling(logprobs=2)),
        own("own-ids", 6, prompt=[5, 6, 7]),
    ]
    packed = msgpack.packb(line("packed", COMPLETIONS, {"model": MODEL, "prompt": "ab",
                                                        "max_tokens": 3}))
    payloads = [json.dumps(x).encode() for x in lines] + twins + [packed]
    got = await exchange(nats_url, payloads, len(payloads))

    for cid in ("chat-greedy", "chat-seeded", "schema", "tool", "text", "ids", "packed"):
        out = got[cid]
        assert set(out) == {"id", "custom_id", "response", "error"} and out["error"] is None
        assert out["response"]["status_code"] == 200, out
        kind = ChatCompletion if cid in ("chat-greedy", "chat-seeded", "schema", "tool") \
            else Completion
        strict(kind, out["response"]["body"])
    for cid in ("chat-greedy", "chat-seeded", "text", "ids"):
        body, twin = got[cid]["response"]["body"], Result.model_validate(got[f"own-{cid}"])
        choice = body["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        assert twin.ok and text == twin.text
        assert body["usage"]["completion_tokens"] == len(twin.tokens)
        assert body["usage"]["prompt_tokens"] == twin.usage.prompt_tokens
        assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 0
    chosen = got["chat-greedy"]["response"]["body"]["choices"][0]["logprobs"]["content"]
    twin = Result.model_validate(got["own-chat-greedy"])
    # Equal up to float noise: the two jobs may share their batches with different others.
    assert [c["logprob"] for c in chosen] == pytest.approx([e.logprob for e in twin.logprobs],
                                                           abs=1e-4)
    assert all(len(c["top_logprobs"]) == 2 for c in chosen)
    assert got["text"]["response"]["body"]["choices"][0]["logprobs"]["token_logprobs"] == \
        pytest.approx([e.logprob for e in Result.model_validate(got["own-text"]).logprobs],
                      abs=1e-4)

    schema = got["schema"]["response"]["body"]["choices"][0]
    assert schema["finish_reason"] == "stop"
    assert json.loads(schema["message"]["content"])["city"] in ("Paris", "Oslo")
    tool = strict(ChatCompletion, got["tool"]["response"]["body"]).choices[0]
    assert tool.finish_reason == "tool_calls" and tool.message.content is None
    (call,) = tool.message.tool_calls
    assert call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(call.function.arguments, str)  # a JSON string, as OpenAI sends it
    assert set(json.loads(call.function.arguments)) == {"city"}


async def test_bad_lines_are_400_lines_with_openai_error_bodies(
        tmp_engine_toml, workers, nats_url) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg)
    hi = [{"role": "user", "content": "hi"}]
    bad = {
        "model": line("model", CHAT, {"model": "gpt-4o", "messages": hi}),
        "stream": line("stream", CHAT, {"model": MODEL, "messages": hi, "stream": True}),
        "echo": line("echo", COMPLETIONS, {"model": MODEL, "prompt": "a", "echo": True}),
        "unknown": line("unknown", CHAT, {"model": MODEL, "messages": hi, "logit_bias": {}}),
        "url": {**line("url", "/v1/responses", {}), "url": "/v1/responses"},
        "long": line("long", COMPLETIONS, {"model": MODEL, "prompt": "x" * 2000,
                                           "max_tokens": 8}),
        "schema": line("schema", CHAT, {"model": MODEL, "messages": hi, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x"}}}),
    }
    got = await exchange(nats_url, [json.dumps(x).encode() for x in bad.values()], len(bad))
    for cid in bad:
        out = got[cid]
        assert out["custom_id"] == cid and out["response"]["status_code"] == 400
        err = strict(ErrorObject, out["response"]["body"]["error"])
        assert err.message and err.type == "invalid_request_error", err
    assert "'gpt-4o'" in got["model"]["response"]["body"]["error"]["message"]
    assert "'builtin:tiny'" in got["model"]["response"]["body"]["error"]["message"]
    assert got["model"]["response"]["body"]["error"]["param"] == "model"
    assert got["stream"]["response"]["body"]["error"]["param"] == "stream"
    assert got["echo"]["response"]["body"]["error"]["param"] == "echo"
    assert "logit_bias" in got["unknown"]["response"]["body"]["error"]["message"]
    assert got["long"]["response"]["body"]["error"]["code"] == "too_long"
    assert got["schema"]["response"]["body"]["error"]["code"] == "bad_schema"


async def test_embeddings_lines_conform_and_equal_the_own_format(
        tmp_engine_toml, workers, nats_url) -> None:
    model = minilm_dir_or_skip()
    cfg = tmp_engine_toml(model=str(model), max_seq_len=256)
    provision(cfg)
    workers(cfg)
    name = model.name
    lines = [line("e-float", "/v1/embeddings", {"model": name, "input": "a cat sat"}),
             line("e-b64", "/v1/embeddings", {"model": name, "input": ["a cat sat"],
                                              "encoding_format": "base64", "dimensions": 8})]
    twins = [encode(Job(id="own-e", task="embed", prompt="a cat sat", reply_to=RESULTS),
                    as_json=True)]
    got = await exchange(nats_url, [json.dumps(x).encode() for x in lines] + twins, 3)
    ref = Result.model_validate(got["own-e"]).embedding
    flt = strict(CreateEmbeddingResponse, got["e-float"]["response"]["body"])
    # Equal up to float noise: packed with different others.
    assert np.allclose(flt.data[0].embedding, ref, atol=1e-5) and flt.usage.prompt_tokens > 0
    b64 = got["e-b64"]["response"]["body"]
    assert b64["object"] == "list" and isinstance(b64["data"][0]["embedding"], str)
    vec = np.frombuffer(base64.b64decode(b64["data"][0]["embedding"]), dtype="<f4")
    cut = np.asarray(ref[:8]) / np.linalg.norm(ref[:8])
    assert vec.shape == (8,) and np.allclose(vec, cut, atol=1e-5)


async def test_n_choices_share_one_message_and_equal_their_own_format_jobs(
        tmp_engine_toml, workers, nats_url) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg)
    hi = [{"role": "user", "content": "Tell me a story about the sea and a boat."}]
    lines = [line("n3", CHAT, {"model": MODEL, "messages": hi, "n": 3, "max_tokens": 10,
                               "temperature": 0.9, "seed": 5}),
             line("n2-bad", CHAT, {"model": MODEL, "messages": hi, "n": 2, "max_tokens": 2000})]
    twins = [own(f"own-{i}", 10, messages=[Message(role="user", content=hi[0]["content"])],
                 sampling=Sampling(temperature=0.9, seed=5 + i)) for i in range(3)]
    got = await exchange(nats_url, [json.dumps(x).encode() for x in lines] + twins, 5)
    body = strict(ChatCompletion, got["n3"]["response"]["body"])
    assert [c.index for c in body.choices] == [0, 1, 2]
    texts = [c.message.content for c in body.choices]
    own_results = [Result.model_validate(got[f"own-{i}"]) for i in range(3)]
    assert texts == [r.text for r in own_results]
    assert len(set(texts)) > 1  # seeds 5, 6, 7: not one choice three times
    assert body.usage.prompt_tokens == own_results[0].usage.prompt_tokens  # counted once
    assert body.usage.completion_tokens == sum(len(r.tokens) for r in own_results)
    assert got["n2-bad"]["response"]["status_code"] == 400  # too long: refused before fan-out


async def test_a_hermes_checkpoint_forced_into_a_tool_call(tmp_engine_toml, workers, nats_url,
                                                           tmp_path) -> None:
    """A tiny Qwen2 checkpoint whose chat template is Hermes-style: the tools reach its
    prompt, and with tool_choice required its reply (under the call grammar) comes back as
    a parsed call."""
    from tests.unit.test_chat import write_tokenizer
    from tests.unit.test_checkpoint import hf_config, write_checkpoint
    from tests.unit.test_openai import HERMES
    path = write_checkpoint(tmp_path / "hermes", hf_config(
        "Qwen2ForCausalLM", vocab_size=400, max_position_embeddings=2048))
    write_tokenizer(path, "chatml", chat_template=HERMES)
    cfg = tmp_engine_toml(model=str(path))
    provision(cfg)
    workers(cfg)
    hi = [{"role": "user", "content": "Weather in Oslo?"}]
    body = {"model": "hermes", "messages": hi, "max_tokens": 200, "temperature": 0}
    lines = [line("forced", CHAT, {**body, "tools": [WEATHER], "tool_choice": "required"}),
             line("plain", CHAT, body)]
    got = await exchange(nats_url, [json.dumps(x).encode() for x in lines], 2)
    forced = strict(ChatCompletion, got["forced"]["response"]["body"])
    plain = strict(ChatCompletion, got["plain"]["response"]["body"])
    assert forced.usage.prompt_tokens > plain.usage.prompt_tokens + 20  # the tools were shown
    choice = forced.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


async def test_a_list_of_prompts_is_one_line_equal_to_its_prompts_one_per_line(
        tmp_engine_toml, workers, nats_url) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg)
    prompts = ["Once upon a time", "The sea was", "Hello"]
    ids = [[5, 6, 7, 8], [9, 10]]
    body = {"model": MODEL, "max_tokens": 8, "temperature": 0.9, "seed": 3, "n": 2}
    greedy = {"model": MODEL, "max_tokens": 6, "temperature": 0}
    lines = [line("many", COMPLETIONS, {**body, "prompt": prompts}),
             line("ids", COMPLETIONS, {**greedy, "prompt": ids})]
    lines += [line(f"one-{i}", COMPLETIONS, {**body, "prompt": p}) for i, p in enumerate(prompts)]
    lines += [line(f"id-{i}", COMPLETIONS, {**greedy, "prompt": p}) for i, p in enumerate(ids)]
    bad = {
        "bad-item": {**body, "prompt": ["fine", "x" * 2000, "fine"]},  # prompt 1 too long
        "empty": {**body, "prompt": []},
        "mixed": {**body, "prompt": ["a", [5, 6]]},
        "too-many": {**body, "prompt": ["a"] * 65},  # x n 2 = 130 choices
    }
    lines += [line(cid, COMPLETIONS, b) for cid, b in bad.items()]
    counts: dict[str, int] = {}
    got = await exchange(nats_url, [json.dumps(x).encode() for x in lines], len(lines), counts,
                         linger_s=1.0)
    assert counts == {x["custom_id"]: 1 for x in lines}  # one line per custom_id, ever

    many = strict(Completion, got["many"]["response"]["body"])
    ones = [strict(Completion, got[f"one-{i}"]["response"]["body"]) for i in range(3)]
    # OpenAI's order: choice index = prompt index * n + choice; each the prompt's own line.
    assert [c.index for c in many.choices] == list(range(6))
    assert [c.text for c in many.choices] == [c.text for one in ones for c in one.choices]
    assert [c.finish_reason for c in many.choices] == [c.finish_reason for one in ones
                                                       for c in one.choices]
    assert many.usage.prompt_tokens == sum(one.usage.prompt_tokens for one in ones)
    assert many.usage.completion_tokens == sum(one.usage.completion_tokens for one in ones)
    assert many.usage.total_tokens == many.usage.prompt_tokens + many.usage.completion_tokens
    assert many.usage.prompt_tokens_details.cached_tokens >= 0
    by_ids = strict(Completion, got["ids"]["response"]["body"])
    alone = [strict(Completion, got[f"id-{i}"]["response"]["body"]) for i in range(2)]
    assert [c.text for c in by_ids.choices] == [one.choices[0].text for one in alone]
    assert by_ids.usage.prompt_tokens == sum(map(len, ids))

    for cid, why in (("bad-item", "body.prompt[1]: "), ("empty", "empty list"),
                     ("mixed", "mixes"), ("too-many", "130 choices")):
        out = got[cid]
        assert out["response"]["status_code"] == 400, out
        err = strict(ErrorObject, out["response"]["body"]["error"])
        assert why in err.message and err.param in ("prompt", "n"), err
    assert got["bad-item"]["response"]["body"]["error"]["code"] == "too_long"
    assert got["empty"]["response"]["body"]["error"]["code"] == "empty_prompt"


async def test_a_list_of_inputs_is_one_line_equal_to_its_inputs_one_per_line(
        tmp_engine_toml, workers, nats_url) -> None:
    model = minilm_dir_or_skip()
    cfg = tmp_engine_toml(model=str(model), max_seq_len=256)
    provision(cfg)
    workers(cfg)
    name, url = model.name, "/v1/embeddings"
    texts = ["a cat sat", "on the mat", "the quick brown fox jumps", "a", "and so on and on"]
    ids = [[101, 2023, 102], [101, 4937, 2938, 102]]
    lines = [line("texts", url, {"model": name, "input": texts}),
             line("ids-b64", url, {"model": name, "input": ids, "encoding_format": "base64",
                                   "dimensions": 8}),
             line("bad-item", url, {"model": name, "input": ["fine", "word " * 300]}),
             line("too-many", url, {"model": name, "input": ["a"] * 2049})]
    lines += [line(f"text-{i}", url, {"model": name, "input": t}) for i, t in enumerate(texts)]
    lines += [line(f"ids-{i}", url, {"model": name, "input": x, "encoding_format": "base64",
                                     "dimensions": 8}) for i, x in enumerate(ids)]
    counts: dict[str, int] = {}
    got = await exchange(nats_url, [json.dumps(x).encode() for x in lines], len(lines), counts,
                         linger_s=1.0)
    assert counts == {x["custom_id"]: 1 for x in lines}

    many = strict(CreateEmbeddingResponse, got["texts"]["response"]["body"])
    ones = [strict(CreateEmbeddingResponse, got[f"text-{i}"]["response"]["body"])
            for i in range(len(texts))]
    assert [d.index for d in many.data] == list(range(len(texts)))
    for d, one in zip(many.data, ones):
        # Equal up to float noise: packed with different others.
        assert np.allclose(d.embedding, one.data[0].embedding, atol=1e-5)
    assert many.usage.prompt_tokens == sum(one.usage.prompt_tokens for one in ones)
    assert many.usage.total_tokens == many.usage.prompt_tokens

    def vectors(body: dict[str, Any]) -> list[np.ndarray]:
        return [np.frombuffer(base64.b64decode(d["embedding"]), dtype="<f4") for d in body["data"]]

    b64 = got["ids-b64"]["response"]["body"]
    assert [d["index"] for d in b64["data"]] == [0, 1]
    singles = [vectors(got[f"ids-{i}"]["response"]["body"])[0] for i in range(len(ids))]
    for vec, single in zip(vectors(b64), singles):
        assert vec.shape == (8,) and np.allclose(vec, single, atol=1e-5)
    assert b64["usage"]["prompt_tokens"] == sum(map(len, ids))

    assert got["bad-item"]["response"]["status_code"] == 400
    err = strict(ErrorObject, got["bad-item"]["response"]["body"]["error"])
    assert err.message.startswith("body.input[1]: ") and err.code == "too_long"
    err = strict(ErrorObject, got["too-many"]["response"]["body"]["error"])
    assert "2049 inputs are over the 2048" in err.message and err.param == "input"


async def test_a_prompt_failing_while_it_runs_makes_its_line_one_error_line(
        tmp_engine_toml, workers, nats_url) -> None:
    """The line's stop matcher fails from its 6th token on (a failpoint for this line's id
    only; its three prompts make some 45 tokens, fed as they are made), after some of its
    prompts may have finished: the line is one 400 line naming a prompt, never a partial
    answer, the message acked (no redelivery, no second line) and the worker's other work
    unharmed."""
    cfg = tmp_engine_toml()
    provision(cfg)
    w = workers(cfg, env={"FABRIC_FAILPOINTS": "stops.feed=raise@6:job=fails"})
    body = {"model": MODEL, "temperature": 0, "stop": "zzz"}
    lines = [line("fails", COMPLETIONS, {**body, "prompt": ["a", "b", "c"], "max_tokens": 16}),
             line("fine", COMPLETIONS, {**body, "prompt": ["a", "b", "c"], "max_tokens": 16})]
    counts: dict[str, int] = {}
    got = await exchange(nats_url, [json.dumps(x).encode() for x in lines], 2, counts,
                         linger_s=1.5)
    assert counts == {"fails": 1, "fine": 1}
    out = got["fails"]["response"]
    err = strict(ErrorObject, out["body"]["error"])
    assert out["status_code"] == 400 and err.code == "stop_failed" and err.type == "server_error"
    assert err.message.startswith("body.prompt[") and err.param == "prompt"
    fine = strict(Completion, got["fine"]["response"]["body"])
    assert [c.index for c in fine.choices] == [0, 1, 2]
    assert fine.usage.completion_tokens > 8  # the twin line made well past the 6th token
    w.terminate(grace_s=10)
    assert '"redelivered": 0' in w.log_path.read_text()
