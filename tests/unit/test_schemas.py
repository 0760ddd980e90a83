"""The wire contract: round trips, every validation rule, decode error codes, recovery
of reply_to/id from malformed maps, a fuzz that only DecodeError ever escapes, and the
committed JSON Schema files matching the models."""

from __future__ import annotations

import json
import math
import random
from typing import Any

import msgpack
import pytest
from pydantic import ValidationError

import schemas
from schemas import (
    DecodeError,
    ErrorCode,
    ErrorInfo,
    FinishReason,
    Job,
    Result,
    Role,
    is_json,
    Sampling,
    Timing,
    Usage,
    decode_job,
    decode_result,
    encode,
    encode_completion,
    export,
)
from schemas.models import is_subject


def job_map(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {
        "id": "job-1",
        "prompt": [1, 2, 3],
        "max_new_tokens": 8,
        "reply_to": "fabric.results.job-1",
    }
    base.update(overrides)
    return base


def sampling_map(**overrides: Any) -> dict[str, Any]:
    return job_map(sampling=overrides)


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def decode_error(data: bytes) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_job(data)
    return info.value


# --- round trips ---------------------------------------------------------------------


def test_exports() -> None:
    assert set(schemas.__all__) == {
        "Job", "Result", "Sampling", "ErrorInfo", "ErrorCode", "Usage", "Timing",
        "FinishReason", "encode", "encode_completion", "decode_job", "decode_result",
        "DecodeError", "Message", "Role", "TokenLogprob", "is_json",
    }  # fmt: skip


def test_encode_completion_writes_the_bytes_the_model_writes() -> None:
    """The worker's hot-path encoder against the model: byte-equal over generated values
    (a field added to Result and not to encode_completion fails here)."""
    rng = random.Random(7)
    for i in range(300):
        n = rng.randint(0, 40)
        tokens = [rng.randrange(2**17) for _ in range(n)]
        fields = dict(
            id=f"job-{i}" if i % 7 else "x" * 128, tokens=tokens,
            text=None if i % 5 == 0 else "".join(chr(rng.randrange(32, 0x3000)) for _ in range(n)),
            finish_reason=rng.choice([FinishReason.LENGTH, FinishReason.STOP]),
            prompt_tokens=rng.randrange(1, 5000), completion_tokens=n,
            padded_tokens=rng.randrange(0, 10**6), cached_tokens=rng.randrange(0, 5000),
            queued_ms=rng.choice([0, 0.0, rng.random() * 1e4]),
            first_token_ms=None if i % 3 == 0 else rng.random() * 1e4,
            total_ms=rng.choice([0, rng.random() * 1e5]), worker=f"w-{i % 4}", attempt=rng.randint(1, 9),
            logprobs=None if i % 4 else [
                {"token": t, "logprob": -rng.random() * 20,
                 "top": [[rng.randrange(2**17), -rng.random() * 20] for _ in range(i % 3)]}
                for t in tokens],
        )
        model = Result(id=fields["id"], ok=True, tokens=tokens, text=fields["text"],
                       finish_reason=fields["finish_reason"],
                       usage=Usage(prompt_tokens=fields["prompt_tokens"], completion_tokens=n,
                                   padded_tokens=fields["padded_tokens"],
                                   cached_tokens=fields["cached_tokens"]),
                       timing=Timing(queued_ms=fields["queued_ms"],
                                     first_token_ms=fields["first_token_ms"],
                                     total_ms=fields["total_ms"]),
                       worker=fields["worker"], attempt=fields["attempt"],
                       logprobs=fields["logprobs"])
        fast = encode_completion(**fields)
        assert fast == encode(model), fields
        assert decode_result(fast) == model
        # JSON: the same Result (float formatting may differ from pydantic's, so compare values)
        as_json = encode_completion(**fields, as_json=True)
        assert decode_result(as_json) == model == decode_result(encode(model, as_json=True))
        assert json.loads(as_json)["logprobs"] == fields["logprobs"]


@pytest.mark.parametrize(
    "job",
    [
        Job(id="a", prompt=[0], max_new_tokens=0, reply_to="r"),
        Job(
            id="x" * 128,
            prompt="hello, world",
            max_new_tokens=100,
            reply_to="_INBOX.abc.def",
            sampling=Sampling(
                temperature=0.7, top_k=40, top_p=0.9, seed=2**63 - 1, stop_token_ids=[2, 3]
            ),
            deadline_s=1_700_000_000.5,
        ),
    ],
)
def test_job_round_trip(job: Job) -> None:
    assert decode_job(encode(job)) == job


def test_job_defaults() -> None:
    job = decode_job(pack(job_map()))
    assert job.sampling == Sampling(temperature=0.0, top_k=0, top_p=1.0, seed=None)
    assert job.sampling.stop_token_ids == []
    assert job.deadline_s is None


def test_mutable_defaults_are_not_shared() -> None:
    a, b = Sampling(), Sampling()
    a.stop_token_ids.append(1)
    assert b.stop_token_ids == []


def test_result_round_trip_ok_and_error() -> None:
    ok = Result(
        id="job-1",
        ok=True,
        tokens=[5, 6],
        text="hi",
        finish_reason=FinishReason.STOP,
        usage=Usage(prompt_tokens=3, completion_tokens=2, padded_tokens=16),
        timing=Timing(queued_ms=1.5, first_token_ms=3.0, total_ms=9.0),
        worker="w-0",
        attempt=2,
    )
    failed = Result(
        id="",
        ok=False,
        finish_reason=FinishReason.ERROR,
        error=ErrorInfo(code=ErrorCode.BAD_PAYLOAD, message="nope"),
    )
    for result in (ok, failed):
        assert decode_result(encode(result)) == result


def test_encoding_is_a_plain_msgpack_map() -> None:
    result = Result(
        id="j",
        ok=False,
        finish_reason=FinishReason.EXPIRED,
        error=ErrorInfo(code=ErrorCode.EXPIRED, message="late"),
    )
    raw = msgpack.unpackb(encode(result), raw=False)
    assert raw["finish_reason"] == "expired"
    assert raw["error"] == {"code": "expired", "message": "late"}
    # exclude_none=False: absent values still travel, so every key is always there.
    assert raw["text"] is None and raw["timing"]["first_token_ms"] is None
    assert set(raw) == set(Result.model_fields)


def test_enums_are_strings_with_the_contract_values() -> None:
    assert [c.value for c in ErrorCode] == [
        "bad_payload", "invalid_job", "empty_prompt", "too_long", "forbidden_reply_to",
        "expired", "bad_token", "poison", "bad_messages", "no_chat_template", "cancelled",
        "bad_schema", "unsupported_task", "grammar_failed", "logprobs_failed", "stop_failed",
        "result_failed",
    ]  # fmt: skip
    assert [f.value for f in FinishReason] == ["length", "stop", "error", "expired", "cancelled"]
    assert [r.value for r in Role] == ["system", "user", "assistant", "tool"]
    assert ErrorCode.POISON == "poison"


# --- Job validation ----------------------------------------------------------------------

INVALID_JOBS = [
    # id
    ("empty id", job_map(id="")),
    ("long id", job_map(id="x" * 129)),
    ("space in id", job_map(id="a b")),
    ("tab in id", job_map(id="a\tb")),
    ("control in id", job_map(id="a\x00b")),
    ("non-ascii id", job_map(id="jöb")),
    ("int id", job_map(id=7)),
    # prompt
    ("negative token", job_map(prompt=[1, -1])),
    ("float token", job_map(prompt=[1.0])),
    ("bool token", job_map(prompt=[True])),
    ("str token", job_map(prompt=["1"])),
    ("int prompt", job_map(prompt=5)),
    ("nil prompt", job_map(prompt=None)),
    ("bin prompt", job_map(prompt=b"abc")),
    ("map prompt", job_map(prompt={"a": 1})),
    ("too many tokens", job_map(prompt=[1] * 1_000_001)),
    ("too many chars", job_map(prompt="x" * 4_000_001)),
    # max_new_tokens
    ("negative max_new_tokens", job_map(max_new_tokens=-1)),
    ("bool max_new_tokens", job_map(max_new_tokens=True)),
    ("float max_new_tokens", job_map(max_new_tokens=1.5)),
    ("integral float max_new_tokens", job_map(max_new_tokens=2.0)),
    ("str max_new_tokens", job_map(max_new_tokens="5")),
    # reply_to
    ("empty reply_to", job_map(reply_to="")),
    ("space in reply_to", job_map(reply_to="a b")),
    ("newline in reply_to", job_map(reply_to="a\nb")),
    ("nbsp in reply_to", job_map(reply_to="a\u00a0b")),
    ("star wildcard", job_map(reply_to="a.*")),
    ("star in token", job_map(reply_to="a.b*")),
    ("gt wildcard", job_map(reply_to="a.>")),
    ("bare gt", job_map(reply_to=">")),
    ("empty token", job_map(reply_to="a..b")),
    ("leading dot", job_map(reply_to=".a")),
    ("trailing dot", job_map(reply_to="a.")),
    ("long reply_to", job_map(reply_to="a" * 257)),
    ("bin reply_to", job_map(reply_to=b"a.b")),
    # sampling
    ("negative temperature", sampling_map(temperature=-0.1)),
    ("nan temperature", sampling_map(temperature=math.nan)),
    ("inf temperature", sampling_map(temperature=math.inf)),
    ("str temperature", sampling_map(temperature="0.5")),
    ("negative top_k", sampling_map(top_k=-1)),
    ("bool top_k", sampling_map(top_k=False)),
    ("zero top_p", sampling_map(top_p=0.0)),
    ("negative top_p", sampling_map(top_p=-0.5)),
    ("top_p over one", sampling_map(top_p=1.01)),
    ("negative seed", sampling_map(seed=-1)),
    ("huge seed", sampling_map(seed=2**63)),
    ("bool seed", sampling_map(seed=True)),
    ("too many stop tokens", sampling_map(stop_token_ids=list(range(65)))),
    ("negative stop token", sampling_map(stop_token_ids=[-1])),
    ("unknown sampling key", sampling_map(beam_width=4)),
    ("nine stop strings", sampling_map(stop=["a"] * 9)),
    ("long stop string", sampling_map(stop=["x" * 129])),
    ("empty stop string", sampling_map(stop=[""])),
    ("stop not a list", sampling_map(stop="###")),
    ("int stop string", sampling_map(stop=[5])),
    ("logprobs over 20", sampling_map(logprobs=21)),
    ("negative logprobs", sampling_map(logprobs=-1)),
    ("bool logprobs", sampling_map(logprobs=True)),
    ("int ignore_eos", sampling_map(ignore_eos=1)),
    ("sampling not a map", job_map(sampling=[0.5])),
    # deadline and the rest
    ("nan deadline", job_map(deadline_s=math.nan)),
    ("str deadline", job_map(deadline_s="soon")),
    ("bool deadline", job_map(deadline_s=True)),
    ("unknown key", job_map(urgency=1)),
    ("priority over 9", job_map(priority=10)),
    ("negative priority", job_map(priority=-1)),
    ("str priority", job_map(priority="1")),
    ("float priority", job_map(priority=1.0)),
    ("empty session", job_map(session="")),
    ("long session", job_map(session="s" * 129)),
    ("int session", job_map(session=42)),
    ("missing id", {k: v for k, v in job_map().items() if k != "id"}),
    ("missing prompt", {k: v for k, v in job_map().items() if k != "prompt"}),
    ("missing max_new_tokens", {k: v for k, v in job_map().items() if k != "max_new_tokens"}),
    ("missing reply_to", {k: v for k, v in job_map().items() if k != "reply_to"}),
    ("prompt and messages", job_map(messages=[{"role": "user", "content": "hi"}])),
]

CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def chat_map(messages: Any = CHAT, **overrides: Any) -> dict[str, Any]:
    return {**{k: v for k, v in job_map(**overrides).items() if k != "prompt"},
            "messages": messages}


BAD_MESSAGES = [
    ("empty conversation", chat_map([])),
    ("unknown role", chat_map([{"role": "robot", "content": "hi"}])),
    ("non-string content", chat_map([{"role": "user", "content": ["hi"]}])),
    ("nil content", chat_map([{"role": "user", "content": None}])),
    ("missing content", chat_map([{"role": "user"}])),
    ("extra message key", chat_map([{"role": "user", "content": "hi", "name": "x"}])),
    ("message not a map", chat_map(["hi"])),
    ("messages not a list", chat_map("hi")),
    ("nil messages", chat_map(None)),
]


@pytest.mark.parametrize("payload", [p for _, p in BAD_MESSAGES], ids=[n for n, _ in BAD_MESSAGES])
def test_bad_messages_have_their_own_code(payload: dict[str, Any]) -> None:
    err = decode_error(pack(payload))
    assert err.code is ErrorCode.BAD_MESSAGES, err.message
    assert err.message.startswith("messages"), err.message
    assert err.reply_to == payload["reply_to"] and err.job_id == payload["id"]


def test_a_chat_job_round_trips_and_says_exactly_one_of_prompt_and_messages() -> None:
    job = decode_job(pack(chat_map(sampling={"stop": ["###", "\n\n"], "logprobs": 5,
                                              "ignore_eos": True})))
    assert job.prompt is None and [m.role for m in job.messages] == [Role.SYSTEM, Role.USER]
    assert job.sampling.stop == ["###", "\n\n"] and job.sampling.logprobs == 5
    assert decode_job(encode(job)) == job
    assert "prompt" not in msgpack.unpackb(encode(job))  # absent, as sent
    for payload in (job_map(messages=CHAT), {k: v for k, v in job_map().items() if k != "prompt"}):
        err = decode_error(pack(payload))
        assert err.code is ErrorCode.INVALID_JOB and "exactly one of prompt and messages" in err.message


BAD_FORMATS = [
    ("json_schema without schema", {"type": "json_schema"}),
    ("json_object with schema", {"type": "json_object", "schema": {"type": "object"}}),
    ("unknown type", {"type": "xml"}),
    ("schema under its field name", {"type": "json_schema", "json_schema": {}}),
    ("schema not a map", {"type": "json_schema", "schema": ["object"]}),
    ("binary in schema", {"type": "json_schema", "schema": {"pattern": b"x"}}),
    ("huge schema", {"type": "json_schema", "schema": {"enum": ["x" * 1000] * 70}}),
]


@pytest.mark.parametrize("fmt", [f for _, f in BAD_FORMATS], ids=[n for n, _ in BAD_FORMATS])
def test_a_bad_response_format_is_bad_schema(fmt: dict[str, Any]) -> None:
    err = decode_error(pack(job_map(response_format=fmt)))
    assert err.code is ErrorCode.BAD_SCHEMA and err.message.startswith("response_format"), err.message


def test_a_response_format_round_trips_with_schema_by_its_wire_name() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    job = decode_job(pack(job_map(response_format={"type": "json_schema", "schema": schema})))
    assert job.response_format.as_dict() == {"type": "json_schema", "schema": schema}
    assert msgpack.unpackb(encode(job))["response_format"] == {"type": "json_schema",
                                                               "schema": schema}
    assert decode_job(encode(job)) == job == decode_job(encode(job, as_json=True))
    assert decode_job(pack(job_map(response_format={"type": "json_object"}))
                      ).response_format.as_dict() == {"type": "json_object"}


def test_an_embed_job_needs_no_max_new_tokens_and_its_options_are_its_own() -> None:
    embed = {k: v for k, v in job_map().items() if k != "max_new_tokens"}
    job = decode_job(pack({**embed, "task": "embed", "dimensions": 64, "normalize": False,
                           "truncate": True}))
    assert job.task == "embed" and job.max_new_tokens is None and job.dimensions == 64
    assert "max_new_tokens" not in msgpack.unpackb(encode(job))
    assert decode_job(encode(job)) == job == decode_job(encode(job, as_json=True))
    for payload, words in ((embed, "max_new_tokens is required"),
                           (job_map(truncate=True), "apply to task embed only"),
                           ({**embed, "task": "embed", "dimensions": 0}, "dimensions"),
                           ({**embed, "task": "classify"}, "task"),
                           ({**embed, "task": "embed",
                             "response_format": {"type": "json_object"}}, "generate only")):
        err = decode_error(pack(payload))
        assert err.code is ErrorCode.INVALID_JOB and words in err.message, err.message
    chat = {k: v for k, v in embed.items() if k != "prompt"}
    err = decode_error(pack({**chat, "task": "embed", "messages": [{"role": "user",
                                                                     "content": "x"}]}))
    assert "prompt, not messages" in err.message


def test_a_json_job_is_the_same_job_as_its_msgpack_twin() -> None:
    for payload in (job_map(), chat_map(), job_map(prompt=[1, 2, 3], deadline_s=1.5e9,
                                                   sampling={"temperature": 1, "stop": ["é"]})):
        data = json.dumps(payload).encode()
        assert is_json(data) and is_json(b" \n\t" + data) and not is_json(pack(payload))
        assert decode_job(b"  " + data) == decode_job(pack(payload))


def test_a_bad_json_job_still_names_its_reply_subject_and_id() -> None:
    payload = job_map(max_new_tokens=2.0)  # JSON keeps 2.0 a float: refused like msgpack's
    err = decode_error(json.dumps(payload).encode())
    assert err.code is ErrorCode.INVALID_JOB and "max_new_tokens" in err.message
    assert err.reply_to == payload["reply_to"] and err.job_id == payload["id"]
    assert "not valid JSON" in decode_error(b'{"id": "a"').message


@pytest.mark.parametrize("payload", [p for _, p in INVALID_JOBS], ids=[n for n, _ in INVALID_JOBS])
def test_invalid_job_is_rejected(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Job.model_validate(payload)
    assert decode_error(pack(payload)).code is ErrorCode.INVALID_JOB


VALID_JOBS = [
    ("max id", job_map(id="x" * 128)),
    ("first priority", job_map(priority=0)),
    ("last priority", job_map(priority=9)),
    ("a session", job_map(session="chat 42 / tenant é")),
    ("max session", job_map(session="s" * 128)),
    ("punctuated id", job_map(id="tenant/42:job#7~!")),
    ("one token", job_map(prompt=[0])),
    ("big token id", job_map(prompt=[2**40])),
    ("one char", job_map(prompt="x")),
    ("unicode text", job_map(prompt="héllo ☃")),
    ("max tokens", job_map(prompt=[1] * 1_000_000)),
    ("zero max_new_tokens", job_map(max_new_tokens=0)),
    ("single token subject", job_map(reply_to="results")),
    ("inbox subject", job_map(reply_to="_INBOX.Xy12.3")),
    ("unicode subject", job_map(reply_to="résultats.ü")),
    ("max subject", job_map(reply_to="a" * 256)),
    ("top_p one", sampling_map(top_p=1.0)),
    ("tiny top_p", sampling_map(top_p=1e-9)),
    ("int temperature", sampling_map(temperature=1)),
    ("int top_p", sampling_map(top_p=1)),
    ("seed zero", sampling_map(seed=0)),
    ("max seed", sampling_map(seed=2**63 - 1)),
    ("nil seed", sampling_map(seed=None)),
    ("max stop tokens", sampling_map(stop_token_ids=list(range(64)))),
    ("max stop strings", sampling_map(stop=["x" * 128] * 8)),
    ("max logprobs", sampling_map(logprobs=20)),
    ("int deadline", job_map(deadline_s=1_700_000_000)),
    ("past deadline", job_map(deadline_s=-1.0)),
    ("nil deadline", job_map(deadline_s=None)),
]


@pytest.mark.parametrize("payload", [p for _, p in VALID_JOBS], ids=[n for n, _ in VALID_JOBS])
def test_valid_job_is_accepted(payload: dict[str, Any]) -> None:
    assert decode_job(pack(payload)) == Job.model_validate(payload)


def test_int_floats_are_widened_not_refused() -> None:
    job = decode_job(pack(job_map(deadline_s=5, sampling={"temperature": 1})))
    assert isinstance(job.deadline_s, float) and isinstance(job.sampling.temperature, float)


@pytest.mark.parametrize(
    "char", [" ", "\t", "\r", "\n", "\x0b", "\x0c", "\x00", "\x1f", "\x7f", "\x85",
             "\u00a0", "\u2003", "\u2028", "\u3000", "*", ">", "."],
)  # fmt: skip
def test_is_subject_agrees_with_job_validation(char: str) -> None:
    subject = f"a{char}b"
    try:
        Job.model_validate(job_map(reply_to=subject))
        accepted = True
    except ValidationError:
        accepted = False
    assert is_subject(subject) == accepted
    assert (char == ".") == accepted


# --- Result validation -------------------------------------------------------------------


def result_map(**overrides: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"id": "job-1", "ok": True, "finish_reason": "length"}
    base.update(overrides)
    return base


BAD_ERROR = {"code": "bad_payload", "message": "boom"}

INVALID_RESULTS = [
    ("ok with error", result_map(error=BAD_ERROR)),
    ("failed without error", result_map(ok=False, finish_reason="error")),
    ("long id", result_map(id="x" * 129)),
    ("unknown finish reason", result_map(finish_reason="done")),
    ("unknown error code", result_map(ok=False, error={"code": "oops", "message": "m"})),
    ("negative token", result_map(tokens=[-1])),
    ("negative attempt", result_map(attempt=-1)),
    ("negative usage", result_map(usage={"padded_tokens": -1})),
    ("negative timing", result_map(timing={"total_ms": -0.1})),
    ("nan timing", result_map(timing={"queued_ms": math.nan})),
    ("str ok", result_map(ok="true")),
    ("int ok", result_map(ok=1)),
    ("unknown key", result_map(latency=1)),
    ("unknown error key", result_map(ok=False, error={**BAD_ERROR, "trace": "x"})),
]


@pytest.mark.parametrize(
    "payload", [p for _, p in INVALID_RESULTS], ids=[n for n, _ in INVALID_RESULTS]
)
def test_invalid_result_is_rejected(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Result.model_validate(payload)
    with pytest.raises(DecodeError) as info:
        decode_result(pack(payload))
    assert info.value.code is ErrorCode.INVALID_JOB


def test_result_allows_an_unreadable_id_and_a_missing_first_token() -> None:
    result = Result.model_validate(
        result_map(id="", ok=False, finish_reason="error", error=BAD_ERROR)
    )
    assert result.id == "" and result.timing.first_token_ms is None
    assert Result.model_validate(result_map(id="a b\n" * 32)).id == "a b\n" * 32


def test_ok_is_the_absence_of_error_message() -> None:
    with pytest.raises(ValidationError, match="ok must be true exactly when error is null"):
        Result.model_validate(result_map(ok=False, finish_reason="error"))


# --- decode errors -----------------------------------------------------------------------

VALID_BYTES = pack(job_map())

BAD_PAYLOADS = [
    ("empty", b""),
    ("reserved byte", b"\xc1"),
    ("truncated", VALID_BYTES[:-1]),
    ("trailing bytes", VALID_BYTES + b"\x00"),
    ("two maps", VALID_BYTES + VALID_BYTES),
    ("array", pack([job_map()])),
    ("string", pack("job")),
    ("integer", pack(5)),
    ("nil", pack(None)),
    ("binary", pack(b"\x81")),
    ("json array", json.dumps([job_map()]).encode()),
    ("malformed json", b'{"id": "a", '),
    ("json with trailing data", json.dumps(job_map()).encode() + b" {}"),
    ("json NaN", json.dumps(job_map(max_new_tokens=float("nan"))).encode()),
    ("non-utf8 string", b"\x81\xa2id\xa2\xff\xfe"),
    ("int map key", pack({1: "x"})),
    ("extension type", pack(msgpack.ExtType(5, b"xx"))),
    ("extension in map", pack(job_map(deadline_s=msgpack.ExtType(1, b"t")))),
    ("lying array length", b"\xdd\xff\xff\xff\xff"),
    ("lying string length", b"\xdb\x7f\xff\xff\xff" + b"a"),
    ("too deep", b"\x91" * 10_000),
]


@pytest.mark.parametrize("data", [d for _, d in BAD_PAYLOADS], ids=[n for n, _ in BAD_PAYLOADS])
def test_bad_payload(data: bytes) -> None:
    err = decode_error(data)
    assert err.code is ErrorCode.BAD_PAYLOAD
    assert err.reply_to is None and err.job_id == ""
    assert err.message and len(err.message) < 300


def test_bad_payload_messages_are_specific() -> None:
    assert decode_error(pack([1])).message == "payload is a msgpack array, not a map"
    assert decode_error(VALID_BYTES + b"\x00").message == "trailing bytes after the msgpack object"
    assert "UTF-8" in decode_error(b"\x81\xa2id\xa2\xff\xfe").message


def test_invalid_job_message_names_the_field() -> None:
    err = decode_error(pack(job_map(max_new_tokens=-1)))
    assert err.code is ErrorCode.INVALID_JOB
    assert err.message == "max_new_tokens: Input should be greater than or equal to 0"
    assert str(err) == f"invalid_job: {err.message}"


def test_invalid_job_message_paths() -> None:
    assert decode_error(pack(job_map(prompt=[1, -1]))).message == (
        "prompt[1]: Input should be greater than or equal to 0"
    )
    assert decode_error(pack(job_map(prompt=5))).message == (
        "prompt: Input should be a list of token ids or a string"
    )
    assert decode_error(pack(sampling_map(stop_token_ids=[1, -2]))).message == (
        "sampling.stop_token_ids[1]: Input should be greater than or equal to 0"
    )
    assert decode_error(pack(job_map(extra=1))).message == "extra: Extra inputs are not permitted"
    assert "NATS subject" in decode_error(pack(job_map(reply_to="a.>"))).message
    assert "printable ASCII" in decode_error(pack(job_map(id="a b"))).message


def test_invalid_job_message_shows_at_most_three_errors() -> None:
    err = decode_error(pack({"a": 1, "b": 2}))
    parts = err.message.split("; ")
    assert len(parts) == 4 and parts[-1].startswith("and ") and parts[-1].endswith(" more")


def test_invalid_job_message_bounds_a_hostile_key() -> None:
    err = decode_error(pack(job_map(**{"k" * 100_000: 1})))
    assert len(err.message) < 200


@pytest.mark.parametrize("prompt", [[], ""])
def test_empty_prompt_has_its_own_code(prompt: list[int] | str) -> None:
    with pytest.raises(ValidationError):
        Job.model_validate(job_map(prompt=prompt))
    err = decode_error(pack(job_map(prompt=prompt)))
    assert err.code is ErrorCode.EMPTY_PROMPT
    assert err.message.startswith("prompt: ")
    assert (err.reply_to, err.job_id) == ("fabric.results.job-1", "job-1")


def test_empty_prompt_wins_over_other_violations() -> None:
    err = decode_error(pack(job_map(prompt=[], max_new_tokens=-1)))
    assert err.code is ErrorCode.EMPTY_PROMPT
    assert "max_new_tokens" in err.message


# --- recovering reply_to and id ----------------------------------------------------------


def test_recovers_reply_to_and_id_from_an_invalid_job() -> None:
    err = decode_error(pack(job_map(max_new_tokens="lots", id="job-9", reply_to="res.job-9")))
    assert (err.reply_to, err.job_id) == ("res.job-9", "job-9")


def test_recovers_an_id_the_schema_refuses() -> None:
    err = decode_error(pack(job_map(id="has space")))
    assert err.job_id == "has space" and err.reply_to == "fabric.results.job-1"


def test_recovered_id_is_truncated() -> None:
    err = decode_error(pack(job_map(id="x" * 500)))
    assert err.job_id == "x" * 128


@pytest.mark.parametrize("reply_to", ["a.*", "a b", "", "x" * 257, b"bin.subject", 5, None])
def test_does_not_recover_an_unusable_reply_to(reply_to: Any) -> None:
    err = decode_error(pack(job_map(reply_to=reply_to, max_new_tokens=-1)))
    assert err.reply_to is None and err.job_id == "job-1"


@pytest.mark.parametrize("job_id", [5, None, b"job-1", ["job-1"]])
def test_non_string_id_recovers_as_empty(job_id: Any) -> None:
    err = decode_error(pack(job_map(id=job_id)))
    assert err.job_id == "" and err.reply_to == "fabric.results.job-1"


def test_recovers_from_a_map_with_binary_keys() -> None:
    err = decode_error(pack({b"\xff": 1, "id": "j", "reply_to": "r.j"}))
    assert err.code is ErrorCode.INVALID_JOB and (err.reply_to, err.job_id) == ("r.j", "j")


def test_decode_result_recovers_the_id() -> None:
    with pytest.raises(DecodeError) as info:
        decode_result(pack(result_map(id="job-3", attempt=-1)))
    assert info.value.job_id == "job-3"


# --- fuzz --------------------------------------------------------------------------------


def _check_decode(data: bytes) -> None:
    try:
        job = decode_job(data)
    except DecodeError as err:
        assert isinstance(err.code, ErrorCode)
        assert isinstance(err.message, str) and err.message
        assert err.reply_to is None or is_subject(err.reply_to)
        assert isinstance(err.job_id, str) and len(err.job_id) <= 128
    else:
        assert isinstance(job, Job)
    try:
        decode_result(data)
    except DecodeError:
        pass  # the only exception decode may raise; the point is nothing else escapes


_ATOMS: list[Any] = [
    0, 1, -1, 2**63 - 1, 2**64 - 1, -(2**63), 0.5, -0.0, math.nan, math.inf, True, False,
    None, "", "a", "a.b", "a.*", ">", "x" * 200, "ü", b"", b"\xff", "job-1",
]  # fmt: skip
_KEYS = [*Job.model_fields, *Sampling.model_fields, *Result.model_fields, "x", "", b"id"]


def _random_value(rng: random.Random, depth: int) -> Any:
    roll = rng.random()
    if depth > 3 or roll < 0.5:
        return rng.choice(_ATOMS)
    if roll < 0.75:
        return [_random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {rng.choice(_KEYS): _random_value(rng, depth + 1) for _ in range(rng.randrange(6))}


def test_fuzz_random_bytes() -> None:
    rng = random.Random(20240601)
    for _ in range(3000):
        _check_decode(rng.randbytes(rng.randrange(64)))


def test_fuzz_random_msgpack_structures() -> None:
    rng = random.Random(7)
    for _ in range(3000):
        _check_decode(pack(_random_value(rng, 0)))


def test_fuzz_random_job_like_maps() -> None:
    rng = random.Random(11)
    for _ in range(3000):
        payload = job_map()
        for _ in range(rng.randrange(1, 4)):
            key = rng.choice(_KEYS)
            if rng.random() < 0.2:
                payload.pop(key, None)
            else:
                payload[key] = _random_value(rng, 1)
        _check_decode(pack(payload))


def test_fuzz_mutated_valid_jobs() -> None:
    rng = random.Random(3)
    base = bytearray(pack(job_map(sampling={"temperature": 0.5, "seed": 9}, deadline_s=1.5)))
    for _ in range(3000):
        data = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            data[rng.randrange(len(data))] = rng.randrange(256)
        if rng.random() < 0.3:
            data = data[: rng.randrange(len(data))]
        _check_decode(bytes(data))


# --- JSON Schema files -------------------------------------------------------------------


def test_committed_json_schemas_match_the_models() -> None:
    stale = export.stale_files()
    assert not stale, f"regenerate with `python -m schemas.export`: {stale}"
    assert export.main(["--check"]) == 0


def test_export_check_notices_drift(tmp_path: Any) -> None:
    export.write_all(tmp_path)
    assert export.stale_files(tmp_path) == []
    (tmp_path / "job.schema.json").write_text("{}\n")
    (tmp_path / "result.schema.json").unlink()
    assert export.stale_files(tmp_path) == [
        tmp_path / "job.schema.json",
        tmp_path / "result.schema.json",
    ]


def test_schema_files_are_canonical_json() -> None:
    for name in export.SCHEMAS:
        text = (export.SCHEMA_DIR / name).read_text()
        assert text == json.dumps(json.loads(text), sort_keys=True, indent=2) + "\n"


def test_json_schema_agrees_with_the_model_on_samples() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((export.SCHEMA_DIR / "job.schema.json").read_text())
    validator = jsonschema.Draft202012Validator(schema)
    for _, payload in VALID_JOBS:
        if len(payload["prompt"]) < 1000:
            assert not list(validator.iter_errors(payload)), payload
    for name, payload in INVALID_JOBS:
        if name in {"too many tokens", "too many chars"}:
            continue  # slow in a pure-Python validator, and the bound is in the schema
        if any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(payload)):
            continue  # JSON has no NaN or inf to send
        if name in {"float token", "integral float max_new_tokens", "float priority"}:
            continue  # JSON Schema counts 1.0 as an integer; msgpack keeps the difference
        if name.startswith("bin "):
            continue  # JSON has no bytes
        assert list(validator.iter_errors(payload)), name


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for v in value.values() for leaf in _leaves(v)]
    if isinstance(value, list):
        return [leaf for v in value for leaf in _leaves(v)]
    return [value]
