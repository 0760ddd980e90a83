"""A Batch API request line -> the project's own Job, and the `Call` its output line needs.

Rule: translation is total: a line either becomes a Job whose tokens are exactly those of
the same request sent in the project's own format (same prompt ids, same sampling), or a
`Refused` (a DecodeError, so the validator answers it like any bad job) that names the
field. Chat messages are rendered by the validator with the checkpoint's template (tools
included, as transformers passes them); this module only shapes them. Defaults are
OpenAI's: temperature 1, top_p 1, no seed; without `max_tokens` the job may run to
`max_seq_len` (the validator fills it in, and reserves that much KV: send `max_tokens`).
`n` > 1 choices run as n jobs of one message (the validator fans them out), the seed of choice
i being seed + i, and their Results join into one line (`response.join`) before it is
published and the message acked; their shared prompt's KV is computed once (prefix cache).
A list of several prompts (embedding inputs) runs the same way: the Job holds the first, the
Call all of them, and each becomes its own n jobs (part = prompt index * n + choice), each
exactly the job that prompt alone on its own line would be.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from schemas import DecodeError, ErrorCode, Job, Sampling
from schemas.codec import explain
from schemas.models import ID_PATTERN, MAX_ID_CHARS, MAX_SEED, ResponseFormat, is_subject
from schemas.openai import (BODIES, MAX_CHOICES, BatchRequest, ChatBody, CompletionBody,
                            EmbeddingBody)

CHAT, COMPLETIONS, EMBEDDINGS = "/v1/chat/completions", "/v1/completions", "/v1/embeddings"
_ID = re.compile(ID_PATTERN)


@dataclass(slots=True)
class Call:
    """What the output line needs of its request line (plain data, held by the Ticket)."""

    custom_id: str
    url: str | None = None  # None: the line was not a request we could read
    model: str = ""  # the name it asked for (one this worker serves)
    top_logprobs: int | None = None  # chat: logprobs asked (the top n shown); completions: n
    messages: list[dict[str, Any]] | None = None  # chat: for the template, OpenAI-shaped
    tools: list[dict[str, Any]] | None = None  # chat: passed to the template as given
    parse_tools: bool = False  # tool_choice is not "none": calls in the reply are parsed
    base64: bool = False  # embeddings: encoding_format base64
    fill_max_tokens: bool = False  # no max_tokens: up to max_seq_len (the validator's)
    param: str | None = None  # refused: the body field at fault, for the error body
    n: int = 1  # choices asked for: the line runs as n jobs (parts) sharing the prompt
    items: list[str | list[int]] | None = None  # several prompts (inputs): n parts each
    fanned: bool = False  # its parts were made (by the validator): their Results join
    parts: dict[int, dict[str, Any]] | None = None  # the joined parts' Results so far

    @property
    def width(self) -> int:
        """How many jobs (parts) the line runs as: n for each of its prompts (inputs)."""
        return self.n * (len(self.items) if self.items else 1)

    @property
    def field(self) -> str:
        """The body field its prompts are in (named by an error about one of them)."""
        return "input" if self.url == EMBEDDINGS else "prompt"


class Refused(DecodeError):
    """A line we answer with a 400: the code, what is wrong, the field, and its Call."""

    def __init__(self, code: ErrorCode, message: str, call: Call, reply_to: str | None,
                 param: str | None = None):
        # The job id becomes a header value (Nats-Msg-Id): only a well-formed custom_id is
        # one; the output line still names whatever was sent.
        ok = _ID.fullmatch(call.custom_id) is not None
        super().__init__(code, message, reply_to=reply_to, job_id=call.custom_id if ok else "")
        self.call = call
        call.param = param


def is_batch_line(payload: dict[str, Any]) -> bool:
    """A map with `custom_id` is a Batch API line (a Job has no such key)."""
    return "custom_id" in payload


def translate(payload: dict[str, Any], served: tuple[str, ...]) -> tuple[Job, Call]:
    """The line's Job and Call, or Refused."""
    cid = payload.get("custom_id")
    reply = payload.get("reply_to")
    call = Call(custom_id=cid[:MAX_ID_CHARS] if isinstance(cid, str) else "")
    reply = reply if is_subject(reply) else None
    try:
        line = BatchRequest.model_validate(payload)
    except ValidationError as e:
        raise Refused(ErrorCode.INVALID_JOB, explain(e), call, reply) from None
    call.url = line.url
    try:
        body = BODIES[line.url].model_validate(line.body)
    except ValidationError as e:
        raise Refused(_body_code(e), explain(e, prefix="body"), call, reply,
                      _body_param(e)) from None
    call.model = body.model
    if body.model not in served:
        raise Refused(ErrorCode.INVALID_JOB, f"model {body.model!r} is not served here: this "
                      f"worker serves {', '.join(map(repr, served))}", call, reply, "model")

    def refuse(param: str, why: str, code: ErrorCode = ErrorCode.INVALID_JOB) -> Refused:
        return Refused(code, f"body.{param}: {why}", call, reply, param)

    base = {"id": line.custom_id, "reply_to": line.reply_to}
    if isinstance(body, EmbeddingBody):
        call.base64 = body.encoding_format == "base64"
        inputs = _items(body.input, call, refuse)
        return _job(base, task="embed", prompt=inputs[0], dimensions=body.dimensions), call
    _common_refusals(body, refuse)
    call.n = body.n or 1
    max_tokens = body.max_tokens
    if isinstance(body, ChatBody):
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None \
            else max_tokens
        logprobs = _chat_logprobs(body, call, refuse)
        fmt = _chat_format(body, call, refuse)
        call.messages = [_template_message(m) for m in body.messages]
        prompt: Any = None
    else:
        if body.echo:
            raise refuse("echo", "echo is not supported: the prompt is not repeated")
        if body.suffix is not None:
            raise refuse("suffix", "suffix (insertion) is not supported")
        logprobs = body.logprobs or 0
        call.top_logprobs = body.logprobs
        fmt = None
        prompt = _items(body.prompt, call, refuse)[0]
        if call.width > MAX_CHOICES:
            raise refuse("n", f"{len(call.items)} prompts x n {call.n} = {call.width} choices "
                         f"are over the {MAX_CHOICES} one line may ask for")
    call.fill_max_tokens = max_tokens is None
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    sampling = Sampling(temperature=1.0 if body.temperature is None else float(body.temperature),
                        top_p=1.0 if body.top_p is None else float(body.top_p),
                        seed=None if body.seed is None else body.seed % (MAX_SEED + 1),
                        stop=stop, logprobs=logprobs)
    return _job(base, prompt=prompt, max_new_tokens=max_tokens or 0, sampling=sampling,
                response_format=fmt), call


def _job(base: dict[str, Any], **fields: Any) -> Job:
    # The parts were validated (the body's model, Sampling, ResponseFormat); the prompt of a
    # chat line is the validator's to render, so the Job is built without a second pass.
    return Job.model_construct(**base, **{k: v for k, v in fields.items() if v is not None})


def _body_code(e: ValidationError) -> ErrorCode:
    if any(err["type"] == "empty_prompt" for err in e.errors()):
        return ErrorCode.EMPTY_PROMPT  # an empty list of prompts, or an empty one in it
    locs = [err["loc"][:1] for err in e.errors()]
    if locs and all(loc == ("messages",) for loc in locs):
        return ErrorCode.BAD_MESSAGES
    if locs and all(loc == ("response_format",) for loc in locs):
        return ErrorCode.BAD_SCHEMA
    return ErrorCode.INVALID_JOB


def _body_param(e: ValidationError) -> str | None:
    """The body field at fault, when every error is about the same one."""
    fields = {str(err["loc"][0]) for err in e.errors() if err["loc"]}
    return fields.pop() if len(fields) == 1 else None


def _common_refusals(body: ChatBody | CompletionBody, refuse) -> None:
    if body.stream:
        raise refuse("stream", "stream is not possible in a batch: the output line is whole")
    for name in ("frequency_penalty", "presence_penalty"):
        if getattr(body, name) not in (None, 0):
            raise refuse(name, "penalties are not supported (only 0)")


def _items(value: Any, call: Call, refuse) -> list[str | list[int]]:
    """The prompts (inputs) of a body: one -- a string or token ids -- or a list of them (the
    schema has held a list to one kind, its count bounded, none empty). Several are kept in
    the Call, for the validator to make a job of each."""
    if value == "":
        raise refuse(call.field, "is empty", ErrorCode.EMPTY_PROMPT)
    items = [value] if isinstance(value, str) or isinstance(value[0], int) else value
    call.items = items if len(items) > 1 else None
    return items


def _chat_logprobs(body: ChatBody, call: Call, refuse) -> int:
    if body.top_logprobs is not None and not body.logprobs:
        raise refuse("top_logprobs", "top_logprobs needs logprobs: true")
    if not body.logprobs:
        return 0
    call.top_logprobs = body.top_logprobs or 0
    return max(1, call.top_logprobs)  # the chosen token's logprob comes with the top rows


def _chat_format(body: ChatBody, call: Call, refuse) -> ResponseFormat | None:
    """The job's response_format: the body's, or the grammar a forced tool call needs."""
    rf, choice = body.response_format, body.tool_choice
    tools = body.tools or []
    if choice is not None and choice != "none" and not tools:
        raise refuse("tool_choice", "tool_choice needs tools")
    call.tools = [t.model_dump(exclude_none=True) for t in tools] or None
    call.parse_tools = bool(tools) and choice != "none"
    forced = None
    if choice == "required":
        forced = {"anyOf": [_call_schema(t.function) for t in tools]}
    elif choice is not None and not isinstance(choice, str):
        named = [t for t in tools if t.function.name == choice.function.name]
        if not named:
            raise refuse("tool_choice", f"no tool is named {choice.function.name!r}")
        forced = _call_schema(named[0].function)
    if forced is not None:
        if rf is not None and rf.type != "text":
            raise refuse("response_format", "a forced tool call is its own format: send "
                         "response_format or tool_choice required/named, not both")
        return _format({"type": "json_schema", "schema": forced}, refuse)
    if rf is None or rf.type == "text":
        return None
    if rf.type == "json_object":
        return _format({"type": "json_object"}, refuse)
    if rf.json_schema is None or rf.json_schema.json_schema is None:
        raise refuse("response_format", "json_schema needs json_schema.schema",
                     ErrorCode.BAD_SCHEMA)
    return _format({"type": "json_schema", "schema": rf.json_schema.json_schema}, refuse)


def _call_schema(fn) -> dict[str, Any]:
    """A call as the Llama 3 JSON tool format writes it: {"name", "arguments"}."""
    return {"type": "object", "additionalProperties": False, "required": ["name", "arguments"],
            "properties": {"name": {"const": fn.name},
                           "arguments": fn.parameters or {"type": "object"}}}


def _format(value: dict[str, Any], refuse) -> ResponseFormat:
    try:
        return ResponseFormat.model_validate(value)
    except ValidationError as e:
        raise refuse("response_format", explain(e), ErrorCode.BAD_SCHEMA) from None


def _template_message(m) -> dict[str, Any]:
    """A message as chat templates read it: text parts joined, `developer` as `system`,
    tool-call arguments as a dict where they parse to one (templates iterate them)."""
    content = m.content
    if isinstance(content, list):
        content = "\n".join(p.text for p in content)
    out: dict[str, Any] = {"role": "system" if m.role == "developer" else m.role,
                           "content": content}
    if m.name is not None:
        out["name"] = m.name
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {
            "name": c.function.name, "arguments": _arguments(c.function.arguments)}}
            for c in m.tool_calls]
    return out


def _arguments(text: str) -> Any:
    try:
        value = json.loads(text)
    except ValueError:
        return text
    return value if isinstance(value, dict) else text
