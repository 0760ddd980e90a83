"""The OpenAI edges without a broker: request lines refused by name, tools handed to a
Hermes-style template as transformers hands them, tool calls parsed, every error code an
OpenAI error body, and batch files checked by line number and resumed after a torn write."""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from openai.types import Completion, CreateEmbeddingResponse
from openai.types.shared import ErrorObject

from loadgen import batch
from loadgen.batchfile import OutputFile
from schemas import ErrorCode
from tests.unit.test_chat import FakeMsg, hf_chat, write_tokenizer
from worker.broker.validate import Limits, Outcome, Ticket, Validator
from worker.features.openai.request import Refused, translate
from worker.features.openai.response import error_body, join, output_line
from worker.features.openai.tools import parse_tool_calls
from worker.model.tokenizer import HFTokenizer

transformers = pytest.importorskip("transformers")

CHAT = "/v1/chat/completions"
HI = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather by city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}

# Qwen 2.5's way with tools, shortened: tools listed as JSON in the system turn, calls and
# responses in <tool_call> / <tool_response> blocks.
HERMES = """{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}{% else %}You help.{% endif %}

# Tools
<tools>{% for tool in tools %}
{{ tool | tojson }}{% endfor %}
</tools>
Return calls as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'assistant' and message.tool_calls %}<|im_start|>assistant
{% for tc in message.tool_calls %}<tool_call>
{"name": "{{ tc.function.name }}", "arguments": {{ tc.function.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif not (tools and message.role == 'system' and loop.first) %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""


def chat_line(body: dict[str, Any], cid: str = "r1") -> dict[str, Any]:
    return {"custom_id": cid, "method": "POST", "url": CHAT, "reply_to": "fabric.results.t",
            "body": {"model": "m", **body}}


def test_tools_reach_a_hermes_template_as_transformers_hands_them(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path, "chatml", chat_template=HERMES)
    tok = HFTokenizer(path / "tokenizer.json")
    v = Validator(Limits(vocab_size=400, max_seq_len=4096, budget_tokens=8192, block_size=16,
                         reply_prefix="fabric.results."), tok, hf_chat(path), served=("m",))
    messages = [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": [{"type": "text", "text": "Weather in Oslo?"}]},
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "rain"},
    ]
    line = chat_line({"messages": messages, "tools": [TOOL], "max_tokens": 8})
    [t] = v.check(FakeMsg(json.dumps(line).encode()), time.monotonic())
    assert isinstance(t, Ticket), t
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    # transformers is handed the messages as chat templates read them (text parts joined,
    # arguments as a dict) and the tools as sent.
    _, call = translate(line, ("m",))
    text = ref.apply_chat_template(call.messages, tools=[TOOL], add_generation_prompt=True,
                                   tokenize=False)
    assert "<tools>" in text and '"get_weather"' in text and '{"city": "Oslo"}' in text
    assert t.prompt == ref.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("text, content, calls", [
    ('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None, [("f", {"a": 1})]),
    ('Let me look.\n<tool_call>{"name": "f", "arguments": {}}</tool_call>'
     '<tool_call>{"name": "g", "arguments": {"b": "é"}}</tool_call>', "Let me look.",
     [("f", {}), ("g", {"b": "é"})]),
    ('{"name": "f", "parameters": {"x": [1, 2]}}', None, [("f", {"x": [1, 2]})]),
    ('<|python_tag|>{"name": "f", "parameters": {}}; {"name": "g", "arguments": {}}', None,
     [("f", {}), ("g", {})]),
    ('[{"name": "f", "arguments": "{\\"q\\": 2}"}]', None, [("f", {"q": 2})]),
    ('<tool_call>{"name": "f", "arguments": {</tool_call>', None, []),  # torn: left as text
    ('{"answer": 42}', None, []),
    ("plain words", None, []),
])
def test_tool_calls_are_parsed_only_when_whole(text: str, content: str | None,
                                               calls: list) -> None:
    got_content, got = parse_tool_calls(text, "r1")
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == calls
    assert all(isinstance(c["function"]["arguments"], str) and c["type"] == "function"
               and c["id"].startswith("call_") for c in got)
    assert got_content == (content if calls else text)
    assert len({c["id"] for c in got}) == len(got)


@pytest.mark.parametrize("body, param", [
    ({"messages": HI, "stream": True}, "stream"),
    ({"messages": HI, "frequency_penalty": 1}, "frequency_penalty"),
    ({"messages": HI, "presence_penalty": 0.5}, "presence_penalty"),
    ({"messages": HI, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": HI, "tool_choice": "required"}, "tool_choice"),
    ({"messages": HI, "tools": [TOOL], "tool_choice": {"type": "function",
                                                        "function": {"name": "nope"}}},
     "tool_choice"),
    ({"messages": HI, "tools": [TOOL], "tool_choice": "required",
      "response_format": {"type": "json_object"}}, "response_format"),
    ({"messages": HI, "model": "other"}, "model"),
])
def test_what_cannot_be_honoured_is_refused_by_name(body: dict, param: str) -> None:
    with pytest.raises(Refused) as e:
        translate(chat_line(body), ("m",))
    assert e.value.call.param == param and e.value.call.custom_id == "r1"
    assert param in e.value.message or param == "model"
    out = output_line(e.value.call, [{"ok": False, "error": {"code": e.value.code.value,
                                                             "message": e.value.message}}], None)
    assert out["response"]["status_code"] == 400
    assert ErrorObject.model_validate(out["response"]["body"]["error"]).param == param


def test_unknown_fields_are_refused_and_a_list_of_one_prompt_is_that_prompt() -> None:
    with pytest.raises(Refused, match="logit_bias: not supported"):
        translate(chat_line({"messages": HI, "logit_bias": {"5": 1}}), ("m",))
    job, call = translate(text_line({"prompt": ["a"]}), ("m",))
    assert job.prompt == "a" and call.fill_max_tokens and job.sampling.temperature == 1.0
    assert call.items is None and call.width == 1


def text_line(body: dict[str, Any], cid: str = "r1") -> dict[str, Any]:
    return {**chat_line({}, cid), "url": "/v1/completions", "body": {"model": "m", **body}}


def embed_line(body: dict[str, Any], cid: str = "r1") -> dict[str, Any]:
    return {**chat_line({}, cid), "url": "/v1/embeddings", "body": {"model": "m", **body}}


@pytest.mark.parametrize("line, code, param, words", [
    (text_line({"prompt": []}), ErrorCode.EMPTY_PROMPT, "prompt", "empty list"),
    (embed_line({"input": []}), ErrorCode.EMPTY_PROMPT, "input", "empty list"),
    (text_line({"prompt": ["a", ""]}), ErrorCode.EMPTY_PROMPT, "prompt", "prompt 1 of the list"),
    (embed_line({"input": [[1], []]}), ErrorCode.EMPTY_PROMPT, "input", "input 1 of the list"),
    (text_line({"prompt": ""}), ErrorCode.EMPTY_PROMPT, "prompt", "is empty"),
    (text_line({"prompt": ["a", [1, 2]]}), ErrorCode.INVALID_JOB, "prompt",
     "mixes strings and token-id lists"),
    (embed_line({"input": [[1, 2], "a"]}), ErrorCode.INVALID_JOB, "input", "mixes"),
    (embed_line({"input": [1, "a"]}), ErrorCode.INVALID_JOB, "input", "mixes"),
    (text_line({"prompt": ["a"] * 129}), ErrorCode.INVALID_JOB, "prompt", "129 prompts are over "
     "the 128"),
    (embed_line({"input": ["a"] * 2049}), ErrorCode.INVALID_JOB, "input", "2049 inputs are over "
     "the 2048"),
    (text_line({"prompt": ["a"] * 3, "n": 50}), ErrorCode.INVALID_JOB, "n",
     "3 prompts x n 50 = 150 choices are over the 128"),
])
def test_lists_of_prompts_refused_with_a_400_that_says_why(line: dict, code: ErrorCode,
                                                          param: str, words: str) -> None:
    with pytest.raises(Refused) as e:
        translate(line, ("m",))
    assert e.value.code is code and words in e.value.message, e.value.message
    out = output_line(e.value.call, [{"ok": False, "error": {"code": e.value.code.value,
                                                             "message": e.value.message}}], None)
    assert out["response"]["status_code"] == 400
    assert ErrorObject.model_validate(out["response"]["body"]["error"]).param == param


def test_the_limits_admit_what_they_name() -> None:
    _, call = translate(embed_line({"input": ["a"] * 2048}), ("m",))
    assert call.width == 2048
    _, call = translate(text_line({"prompt": [[1]] * 4, "n": 32}), ("m",))
    assert call.width == 128
    job, call = translate(embed_line({"input": [7] * 5000}), ("m",))  # one input of ids
    assert call.items is None and job.prompt == [7] * 5000


def ids_validator(task: str = "generate") -> Validator:
    """Token-id prompts need no tokenizer."""
    return Validator(Limits(vocab_size=400, max_seq_len=64, budget_tokens=4096, block_size=16,
                            reply_prefix="fabric.results.", task=task, embed_dim=16), None,
                     None, served=("m",))


def check(v: Validator, line: dict[str, Any]) -> list[Ticket] | Outcome:
    return v.check(FakeMsg(json.dumps(line).encode()), time.monotonic())


def test_a_list_of_prompts_is_each_prompt_alone_times_n() -> None:
    v = ids_validator()
    prompts = [[1, 2, 3], [4, 5], [6] * 20]
    body = {"max_tokens": 4, "temperature": 0.7, "seed": 9, "n": 2}
    parts = check(v, text_line({**body, "prompt": prompts}))
    assert [t.part for t in parts] == list(range(6))
    assert len({t.key for t in parts}) == 6 and len({id(t.msg) for t in parts}) == 1
    call = parts[0].openai
    assert all(t.openai is call for t in parts) and call.fanned and call.width == 6
    for i, prompt in enumerate(prompts):
        alone = check(v, text_line({**body, "prompt": prompt}))
        for j in range(2):
            t, a = parts[i * 2 + j], alone[j]
            assert (t.prompt, t.hashes, t.reserved_tokens) == (a.prompt, a.hashes,
                                                                a.reserved_tokens)
            assert t.job.sampling == a.job.sampling and t.job.sampling.seed == 9 + j
            assert t.job.max_new_tokens == a.job.max_new_tokens == 4
    inputs = check(ids_validator("embed"), embed_line({"input": prompts, "dimensions": 8}))
    assert [t.prompt for t in inputs] == prompts and [t.part for t in inputs] == [0, 1, 2]
    assert all(t.job.task == "embed" and t.job.dimensions == 8 for t in inputs)


def test_one_bad_prompt_refuses_the_whole_line_by_its_place() -> None:
    out = check(ids_validator(), text_line({"prompt": [[1], [2] * 60, [3]], "max_tokens": 8}))
    assert isinstance(out, Outcome) and out.error.code == ErrorCode.TOO_LONG
    assert out.error.message.startswith("body.prompt[1]: ") and out.openai.param == "prompt"
    line = output_line(out.openai, [{"ok": False, "error": out.error.model_dump(mode="json")}],
                       None)
    assert line["response"]["status_code"] == 400 and line["custom_id"] == "r1"
    assert line["response"]["body"]["error"]["message"].startswith("body.prompt[1]: ")
    out = check(ids_validator("embed"), embed_line({"input": [[1], [999]]}))
    assert isinstance(out, Outcome) and out.error.code == ErrorCode.BAD_TOKEN
    assert out.error.message.startswith("body.input[1]: ")


def test_max_tokens_zero_answers_a_list_unrun_with_every_prompt_counted() -> None:
    out = check(ids_validator(), text_line({"prompt": [[1, 2], [3, 4, 5]], "max_tokens": 0,
                                            "n": 2}))
    assert isinstance(out, Outcome) and out.error is None and out.prompt_tokens == 5
    result = {"ok": True, "error": None, "tokens": [], "text": "", "finish_reason": "length",
              "usage": {"prompt_tokens": 5, "cached_tokens": 0}}
    body = Completion.model_validate(output_line(out.openai, [result], None)["response"]["body"])
    assert [c.index for c in body.choices] == [0, 1, 2, 3]
    assert body.usage.prompt_tokens == 5 and body.usage.completion_tokens == 0


def result(tokens: list[int], prompt: int, cached: int = 0, **kw: Any) -> dict[str, Any]:
    return {"ok": True, "error": None, "tokens": tokens, "text": "x" * len(tokens),
            "finish_reason": "length", "usage": {"prompt_tokens": prompt,
                                                 "cached_tokens": cached}, **kw}


def test_a_list_lines_parts_join_into_one_line_in_part_order() -> None:
    _, call = translate(text_line({"prompt": [[1, 2], [3, 4, 5]], "n": 2}), ("m",))
    call.fanned, call.parts = True, {}
    parts = {0: result([1], 2, cached=2), 1: result([1, 2], 2, cached=0),
             2: result([1, 2, 3], 3, cached=3), 3: result([4], 3, cached=3)}
    for k in (3, 0, 2):
        assert join(call, k, parts[k]) is None
    joined = join(call, 1, parts[1])
    assert joined == [parts[k] for k in range(4)]
    body = Completion.model_validate(output_line(call, joined, None)["response"]["body"])
    assert [(c.index, c.text) for c in body.choices] == [(0, "x"), (1, "xx"), (2, "xxx"),
                                                         (3, "x")]
    # Each prompt once; its cached tokens the fewest any of its choices found.
    assert body.usage.prompt_tokens == 5 and body.usage.completion_tokens == 7
    assert body.usage.total_tokens == 12 and body.usage.prompt_tokens_details.cached_tokens == 3


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_a_list_of_inputs_is_one_embedding_each_by_index(fmt: str) -> None:
    _, call = translate(embed_line({"input": ["a", "b", "c"], "encoding_format": fmt}), ("m",))
    vectors = [[0.5, -0.25], [1.0, 0.0], [0.0, 2.0]]
    results = [result([], 3 + i, embedding=v) for i, v in enumerate(vectors)]
    raw = output_line(call, results, None)["response"]["body"]
    if fmt == "base64":  # the openai client decodes these before building its type
        assert all(isinstance(d["embedding"], str) for d in raw["data"])
        raw["data"] = [{**d, "embedding": np.frombuffer(base64.b64decode(d["embedding"]),
                                                        dtype="<f4").tolist()}
                       for d in raw["data"]]
    body = CreateEmbeddingResponse.model_validate(raw)
    assert [d.index for d in body.data] == [0, 1, 2]
    assert [d.embedding for d in body.data] == vectors
    assert body.usage.prompt_tokens == body.usage.total_tokens == 3 + 4 + 5


def test_one_failed_part_makes_the_line_its_error_naming_the_input() -> None:
    _, call = translate(embed_line({"input": [[1], [2], [3]]}), ("m",))
    failed = {"ok": False, "error": {"code": "expired", "message": "deadline passed"}}
    out = output_line(call, [result([], 1, embedding=[1.0]), failed, failed], None)
    err = ErrorObject.model_validate(out["response"]["body"]["error"])
    assert out["response"]["status_code"] == 400
    assert err.message == "body.input[1]: deadline passed" and err.param == "input"
    assert err.type == "request_expired"


@pytest.mark.parametrize("code", list(ErrorCode))
def test_every_error_code_is_an_openai_error_body(code: ErrorCode) -> None:
    body = error_body(code.value, "why")
    err = ErrorObject.model_validate(body["error"])
    assert err.code == code.value and err.type


def test_a_bad_batch_file_is_reported_by_line_number_before_anything_is_published(
        tmp_path: Path, capsys) -> None:
    good = chat_line({"messages": HI, "max_tokens": 2})
    del good["reply_to"]
    rows = [json.dumps(good), "not json", json.dumps({**good, "custom_id": "r2", "url": "/x"}),
            json.dumps({**good, "custom_id": "r3", "body": {"model": "m", "messages": HI,
                                                            "stream": True}}),
            "", json.dumps(good)]
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(rows) + "\n")
    # A broker address nothing listens on: the check must fail before any connection.
    assert batch.main(["submit", str(path), "--nats-url", "nats://127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "4 line(s) are not valid requests; nothing was published" in err
    for n, why in ((2, "not JSON"), (3, "url"), (4, "stream"), (6, "already on line 1")):
        assert f"line {n}: " in err and why in err.split(f"line {n}: ")[1].splitlines()[0]


def test_an_output_file_resumes_after_a_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_bytes(b'{"custom_id": "a"}\n{"custom_id": "b"}\n{"custom_')
    out = OutputFile(path)
    assert out.ids == {"a", "b"}
    out.write("c", b'{"custom_id": "c"}')
    out.close()
    assert path.read_bytes().splitlines() == [b'{"custom_id": "a"}', b'{"custom_id": "b"}',
                                              b'{"custom_id": "c"}']


def test_a_bad_line_answered_at_the_edge_is_an_output_line(tmp_path: Path) -> None:
    v = Validator(Limits(vocab_size=400, max_seq_len=64, budget_tokens=4096, block_size=16,
                         reply_prefix="fabric.results."), None, None, served=("m",))
    out = v.check(FakeMsg(json.dumps(chat_line({"messages": HI})).encode()), time.monotonic())
    assert isinstance(out, Outcome) and out.openai.custom_id == "r1"
    assert out.error.code == ErrorCode.NO_CHAT_TEMPLATE


def test_the_exported_schemas_agree_with_the_models_on_samples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    from schemas import export
    chat = jsonschema.Draft202012Validator(json.loads(
        (export.SCHEMA_DIR / "openai-chat-body.schema.json").read_text()))
    line = jsonschema.Draft202012Validator(json.loads(
        (export.SCHEMA_DIR / "openai-batch-request.schema.json").read_text()))
    body = {"model": "m", "messages": HI, "tools": [TOOL], "max_tokens": 4,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "x", "schema": {"type": "object"}}}}
    assert not list(chat.iter_errors(body))
    assert list(chat.iter_errors({**body, "logit_bias": {}}))  # unknown keys are refused
    assert not list(line.iter_errors(chat_line(body)))
    assert list(line.iter_errors({**chat_line(body), "custom_id": "has space"}))
    for name, field, most in (("completion", "prompt", 128), ("embedding", "input", 2048)):
        schema = jsonschema.Draft202012Validator(json.loads(
            (export.SCHEMA_DIR / f"openai-{name}-body.schema.json").read_text()))
        for value in ("a", [1, 2], ["a", "b"], [[1], [2, 3]], ["a"] * most):
            assert not list(schema.iter_errors({"model": "m", field: value})), value
        for value in ([], ["a"] * (most + 1), [[1]] * (most + 1), [[]], ["a", [1]]):
            assert list(schema.iter_errors({"model": "m", field: value})), value


def test_a_custom_id_that_is_no_header_value_is_not_the_result_id() -> None:
    with pytest.raises(Refused) as e:
        translate(chat_line({"messages": HI}, cid="two\nlines"), ("m",))
    assert e.value.job_id == "" and e.value.call.custom_id == "two\nlines"


def test_result_ids_are_scoped_by_reply_subject_for_openai_lines_only() -> None:
    from worker.broker.replies import msg_id
    _, call = translate(chat_line({"messages": HI}), ("m",))
    assert msg_id("r1", call, "fabric.results.a") == "r1@fabric.results.a"
    assert msg_id("r1", None, "fabric.results.a") == "r1"  # the own format: unchanged
    assert msg_id("", call, "fabric.results.a") == ""  # no readable id: no dedupe key
