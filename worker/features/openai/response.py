"""The internal Result of an OpenAI line -> its batch output line.

Rule: one output line per Result, built from the Result's plain dict (the same values the
project's own format carries), so the two formats cannot disagree on tokens, text or usage.
An ok Result's body is a `chat.completion`, `text_completion` or embedding `list` object;
a failed one is status 400 with an OpenAI error body whose `code` is the project's error
code (`ERROR_TYPES` maps every one) and whose `param` names the field when one is at fault.
Ids are derived from the custom id, so a job answered twice (a replay) writes the same ids.
A line of several parts (n choices, several prompts or inputs) is answered once, when the
Results of all its parts have joined: choice (or embedding) `index` is the part's, usage is
summed over the prompts (each counted once however many choices share it), and one failed
part makes the whole line its error, naming the prompt -- never a partial answer.
"""

from __future__ import annotations

import base64
import hashlib
import json
import time
from typing import Any

import msgpack
import numpy as np

from schemas import ErrorCode
from worker.features.openai.request import CHAT, EMBEDDINGS, Call
from worker.features.openai.tools import parse_tool_calls
from worker.model.tokenizer import Tokenizer

# The OpenAI error `type` of each error code: what the request did wrong, or what failed
# while it ran (the request itself was fine: worth sending again).
_RUN_FAILURES = {ErrorCode.POISON, ErrorCode.GRAMMAR_FAILED, ErrorCode.LOGPROBS_FAILED,
                 ErrorCode.STOP_FAILED, ErrorCode.RESULT_FAILED}
ERROR_TYPES: dict[str, str] = {
    **{c.value: "invalid_request_error" for c in ErrorCode},
    **{c.value: "server_error" for c in _RUN_FAILURES},
    ErrorCode.EXPIRED.value: "request_expired",
    ErrorCode.CANCELLED.value: "request_cancelled",
}
BAD_REQUEST = 400


def join(call: Call, part: int, result: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The Results the line is built from: this one, or for a line fanned out into several
    parts, all of them in part order once the last has come (None until then). The Call is
    the one place the parts meet: every part's Ticket holds it."""
    if not call.fanned:
        return [result]
    call.parts[part] = result
    if len(call.parts) < call.width:
        return None
    return [call.parts[i] for i in range(call.width)]


def output_line(call: Call, results: list[dict[str, Any]], tok: Tokenizer | None,
                created: int | None = None) -> dict[str, Any]:
    """The output line of `results` (Results as JSON-mode dicts, one per part in part order;
    a line answered before it was fanned out has one, its usage the line's, repeated for
    every choice). One failed part makes the line its error."""
    whole = len(results) == call.width
    for part, result in enumerate(results):
        err = result.get("error")
        if err is not None or not result["ok"]:
            message, param = err["message"], call.param
            if call.items and whole:  # a part of a list: say which prompt (input) failed
                message, param = f"body.{call.field}[{part // call.n}]: {message}", call.field
            return _line(call, BAD_REQUEST, error_body(err["code"], message, param))
    if call.url == EMBEDDINGS:
        return _line(call, 200, _embeddings(call, results))
    if whole:
        # Each prompt is counted once, as OpenAI counts it for n choices; its cached tokens
        # are the fewest any of its choices found: a cold prompt was computed (once), so 0.
        groups = [results[i:i + call.n] for i in range(0, len(results), call.n)]
        prompt = sum(g[0]["usage"]["prompt_tokens"] for g in groups)
        cached = sum(min(r["usage"]["cached_tokens"] for r in g) for g in groups)
    else:
        prompt, cached = results[0]["usage"]["prompt_tokens"], results[0]["usage"]["cached_tokens"]
        results = results * call.width
    created = int(time.time()) if created is None else created
    chat = call.url == CHAT
    choose = _chat_choice if chat else _text_choice
    completion = sum(len(r["tokens"]) for r in results)
    body = {"id": ("chatcmpl-" if chat else "cmpl-") + _digest(call.custom_id)[:24],
            "object": "chat.completion" if chat else "text_completion",
            "created": created, "model": call.model,
            "choices": [choose(call, r, tok, i) for i, r in enumerate(results)],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                      "total_tokens": prompt + completion,
                      "prompt_tokens_details": {"cached_tokens": cached}},
            "system_fingerprint": None}
    return _line(call, 200, body)


def error_body(code: str, message: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": ERROR_TYPES.get(code, "invalid_request_error"),
                      "param": param, "code": code}}


def encode_line(line: dict[str, Any], as_json: bool) -> bytes:
    if as_json:
        return json.dumps(line, separators=(",", ":"), ensure_ascii=False).encode()
    return msgpack.packb(line, use_bin_type=True)


def _line(call: Call, status: int, body: dict[str, Any]) -> dict[str, Any]:
    d = _digest(call.custom_id)
    return {"id": f"batch_req_{d[:24]}", "custom_id": call.custom_id,
            "response": {"status_code": status, "request_id": f"req_{d[24:48]}", "body": body},
            "error": None}


def _digest(custom_id: str) -> str:
    return hashlib.sha256(custom_id.encode()).hexdigest()


def _finish(result: dict[str, Any]) -> str:
    return "length" if result["finish_reason"] == "length" else "stop"


def _chat_choice(call: Call, result: dict[str, Any], tok: Tokenizer | None,
                 index: int) -> dict[str, Any]:
    text = result.get("text") or ""
    finish = _finish(result)
    message: dict[str, Any] = {"role": "assistant", "content": text, "refusal": None}
    if call.parse_tools and finish == "stop":
        content, calls = parse_tool_calls(text, f"{call.custom_id}:{index}" if index else
                                          call.custom_id)
        if calls:
            message.update(content=content, tool_calls=calls)
            finish = "tool_calls"
    logprobs = None
    if call.top_logprobs is not None and result.get("logprobs") is not None and tok is not None:
        n = call.top_logprobs
        logprobs = {"content": [
            {**_token(tok, e["token"], e["logprob"]),
             "top_logprobs": [_token(tok, i, lp) for i, lp in e["top"][:n]]}
            for e in result["logprobs"]], "refusal": None}
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish}


def _token(tok: Tokenizer, token: int, logprob: float) -> dict[str, Any]:
    s = tok.decode([token])
    return {"token": s, "logprob": logprob, "bytes": list(s.encode())}


def _text_choice(call: Call, result: dict[str, Any], tok: Tokenizer | None,
                 index: int) -> dict[str, Any]:
    logprobs = None
    if call.top_logprobs is not None and result.get("logprobs") is not None and tok is not None:
        entries = result["logprobs"]
        strings = [tok.decode([e["token"]]) for e in entries]
        offsets, at = [], 0
        for s in strings:
            offsets.append(at)
            at += len(s)
        logprobs = {"tokens": strings, "token_logprobs": [e["logprob"] for e in entries],
                    "top_logprobs": [{tok.decode([i]): lp for i, lp in e["top"][:call.top_logprobs]}
                                     for e in entries],
                    "text_offset": offsets}
    return {"index": index, "text": result.get("text") or "", "logprobs": logprobs,
            "finish_reason": _finish(result)}


def _embeddings(call: Call, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One embedding object per input, `index` its place in the list; tokens summed."""
    data = []
    for index, result in enumerate(results):
        values = result["embedding"]
        vector: Any = (base64.b64encode(np.asarray(values, dtype="<f4").tobytes()).decode()
                       if call.base64 else values)
        data.append({"object": "embedding", "index": index, "embedding": vector})
    tokens = sum(r["usage"]["prompt_tokens"] for r in results)
    return {"object": "list", "model": call.model, "data": data,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
