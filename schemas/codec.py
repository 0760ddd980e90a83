"""Bytes to models and back: msgpack maps of the models' JSON-mode dump.

Rule: decoding never raises anything but DecodeError, whatever the bytes. The worker
decodes every message on its event loop and must answer even a malformed job, so a
DecodeError carries an ErrorCode for the Result and, when the payload was a map at
all, whatever `reply_to` and `id` could be read from it, so the producer still hears
back. The happy path is one unpack and one validation; recovery work happens only on
failure.
"""

from __future__ import annotations

import json
from typing import Any, TypeVar

import msgpack
from pydantic import BaseModel, ValidationError

from schemas.models import (
    MAX_ID_CHARS,
    PATTERN_HINTS,
    PROMPT_TAGS,
    ErrorCode,
    FinishReason,
    Job,
    Result,
    is_subject,
)

_Model = TypeVar("_Model", bound=BaseModel)

# Bounds on what a decode error message may carry back to the producer: a hostile key
# or value can be as long as the payload, and the message travels in a Result.
_MAX_SHOWN_ERRORS = 3
_MAX_LOC_PART_CHARS = 64
_MAX_DETAIL_CHARS = 200

_WIRE_TYPE_NAMES = {
    list: "array",
    str: "string",
    bytes: "binary",
    int: "integer",
    float: "float",
    bool: "boolean",
    type(None): "nil",
    msgpack.Timestamp: "timestamp",
}


class DecodeError(Exception):
    """A payload that is not a valid message, with what the worker needs to answer it.

    reply_to: the payload's reply subject when it was a well-formed subject, else None.
    job_id: the payload's id when it was a string (cut to 128 chars), else "".
    """

    def __init__(
        self, code: ErrorCode, message: str, reply_to: str | None = None, job_id: str = ""
    ) -> None:
        super().__init__(f"{code.value}: {message}")
        self.code = code
        self.message = message
        self.reply_to = reply_to
        self.job_id = job_id


_JSON_WHITESPACE = frozenset(b" \t\r\n")


def is_json(data: bytes) -> bool:
    """Is this payload meant as JSON? A JSON object starts with `{` (after whitespace); a
    msgpack map never does (0x7b is a msgpack integer), so the first byte decides."""
    for byte in data[:256]:
        if byte not in _JSON_WHITESPACE:
            return byte == 0x7B
    return False


def encode(model: BaseModel, as_json: bool = False) -> bytes:
    """Serialize any wire model as a msgpack map (or a JSON object); enums travel as their
    string values."""
    if as_json:
        return model.model_dump_json().encode()
    return msgpack.packb(model.model_dump(mode="json"), use_bin_type=True)


def encode_completion(*, as_json: bool = False, **fields: Any) -> bytes:
    """An ok Result's bytes, exactly what `encode(Result(ok=True, ...))` writes, without
    building and dumping the model (the fields are `completion_dict`'s).

    The worker's hot path: one per executed job, at thousands a second, where validating
    values the worker made itself bought nothing and cost a tenth of the event loop. A unit
    test holds the two byte-equal over generated values, so a change to the model that is
    not made here fails it."""
    result = completion_dict(**fields)
    if as_json:
        return json.dumps(result, separators=(",", ":"), ensure_ascii=False).encode()
    return msgpack.packb(result, use_bin_type=True)


def completion_dict(
    *,
    id: str,
    tokens: list[int],
    text: str | None,
    finish_reason: FinishReason,
    prompt_tokens: int,
    completion_tokens: int,
    padded_tokens: int,
    cached_tokens: int,
    queued_ms: float,
    first_token_ms: float | None,
    total_ms: float,
    worker: str,
    attempt: int,
    logprobs: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """An ok Result as the JSON-mode dict of the model: keys and nesting follow `Result`'s
    fields in order."""
    return {
            "id": id, "ok": True, "tokens": tokens, "text": text,
            "finish_reason": finish_reason.value, "error": None,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "padded_tokens": padded_tokens, "cached_tokens": cached_tokens},
            "timing": {"queued_ms": float(queued_ms),
                       "first_token_ms": None if first_token_ms is None else float(first_token_ms),
                       "total_ms": float(total_ms)},
            "worker": worker, "attempt": attempt, "logprobs": logprobs,
            "embedding": None, "truncated": False,
    }


def decode_job(data: bytes) -> Job:
    return _decode(data, Job)


def decode_result(data: bytes) -> Result:
    return _decode(data, Result)


def _decode(data: bytes, model: type[_Model]) -> _Model:
    return validate(decode_payload(data), model)


def decode_payload(data: bytes) -> dict[str, Any]:
    """The payload's map, not yet a model (a Job or an OpenAI Batch API line)."""
    if is_json(data):
        return _parse_json(data)
    payload = _unpack(data)
    if not isinstance(payload, dict):
        kind = _WIRE_TYPE_NAMES.get(type(payload), type(payload).__name__)
        raise DecodeError(ErrorCode.BAD_PAYLOAD, f"payload is a msgpack {kind}, not a map")
    return payload


def validate(payload: dict[str, Any], model: type[_Model]) -> _Model:
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(payload, exc) from None


def _unpack(data: bytes) -> Any:
    try:
        return msgpack.unpackb(
            data,
            raw=False,  # str must be UTF-8; a bad byte is a bad payload, not mojibake
            strict_map_key=True,  # map keys are str or bytes, never containers
            # unpackb caps every str/bin/array/map length at len(data) by itself, so
            # no length header can make it allocate more than was sent.
            ext_hook=_refuse_ext,
        )
    except msgpack.ExtraData:
        # str(ExtraData) embeds the trailing bytes themselves; do not echo them.
        raise DecodeError(
            ErrorCode.BAD_PAYLOAD, "trailing bytes after the msgpack object"
        ) from None
    except UnicodeDecodeError:
        raise DecodeError(ErrorCode.BAD_PAYLOAD, "a string is not valid UTF-8") from None
    except (ValueError, OverflowError, msgpack.UnpackException) as exc:
        detail = str(exc)[:_MAX_DETAIL_CHARS] or type(exc).__name__
        raise DecodeError(ErrorCode.BAD_PAYLOAD, f"not valid msgpack: {detail}") from None


def _parse_json(data: bytes) -> dict[str, Any]:
    """A JSON object (the first byte said so). Numbers stay as written: 5 is an integer,
    5.0 a float, so the models' strict types hold for JSON producers too."""
    try:
        payload = json.loads(data, parse_constant=_refuse_constant)
    except UnicodeDecodeError:
        raise DecodeError(ErrorCode.BAD_PAYLOAD, "a string is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        detail = str(exc)[:_MAX_DETAIL_CHARS] or type(exc).__name__
        raise DecodeError(ErrorCode.BAD_PAYLOAD, f"not valid JSON: {detail}") from None
    if not isinstance(payload, dict):  # `{` then trailing data is caught above; defensive
        raise DecodeError(ErrorCode.BAD_PAYLOAD, "payload is not a JSON object")
    return payload


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} is not part of the contract")


def explain(exc: ValidationError, prefix: str = "") -> str:
    """The first few of a validation's errors, one clause each, the field named (under
    `prefix`); an unknown key is said to be refused, not ignored."""
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    shown = [_describe(err, prefix) for err in errors[:_MAX_SHOWN_ERRORS]]
    if len(errors) > _MAX_SHOWN_ERRORS:
        shown.append(f"and {len(errors) - _MAX_SHOWN_ERRORS} more")
    return "; ".join(shown)


def _invalid(payload: dict[Any, Any], exc: ValidationError) -> DecodeError:
    errors = exc.errors(include_url=False, include_context=False, include_input=False)
    if any(map(_is_empty_prompt, errors)):
        code = ErrorCode.EMPTY_PROMPT
    elif errors and all(err["loc"][:1] == ("messages",) for err in errors):
        code = ErrorCode.BAD_MESSAGES  # an unknown role, content not a string, no messages
    elif errors and all(err["loc"][:1] == ("response_format",) for err in errors):
        code = ErrorCode.BAD_SCHEMA  # no schema with json_schema, an unknown type, too big
    else:
        code = ErrorCode.INVALID_JOB
    reply_to = payload.get("reply_to")
    job_id = payload.get("id")
    return DecodeError(
        code,
        explain(exc),
        reply_to=reply_to if is_subject(reply_to) else None,
        job_id=job_id[:MAX_ID_CHARS] if isinstance(job_id, str) else "",
    )


def _is_empty_prompt(err: Any) -> bool:
    loc = err["loc"]
    return len(loc) == 2 and loc[0] == "prompt" and err["type"] in ("too_short", "string_too_short")


def _describe(err: Any, prefix: str = "") -> str:
    """'sampling.stop_token_ids[3]: Input should be ...' from one pydantic error."""
    path = prefix
    for i, part in enumerate(err["loc"]):
        if isinstance(part, int):
            path += f"[{part}]"
        elif i == 1 and err["loc"][0] in ("prompt", "input") and part in PROMPT_TAGS:
            continue  # the union branch name is ours, not the producer's
        else:
            path += ("." if path else "") + str(part)[:_MAX_LOC_PART_CHARS]
    msg = err["msg"]
    if err["type"] == "string_pattern_mismatch":
        msg = PATTERN_HINTS.get(err["loc"], msg)
    elif err["type"] == "extra_forbidden" and prefix:
        msg = "not supported by this worker (refused rather than ignored)"
    return f"{path}: {msg}" if path else msg
