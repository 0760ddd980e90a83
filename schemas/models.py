"""The wire models: what a producer may send (Job) and what a worker answers (Result).

Rule: these models are the whole contract with producers in any language. They are
validated once, at the edge, and are strict: a value of the wrong wire type is refused,
never coerced (no "5" for 5, no true for 1, no bytes for text), because a producer that
sends the wrong type has a bug we want it to see. Every model forbids unknown keys.
The JSON Schema files next to this module are generated from these classes
(`python -m schemas.export`); change the models, then regenerate.
"""

from __future__ import annotations

import json
import re
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Strict,
    Tag,
    model_validator,
)

# Limits that bound what one message can make the worker hold in memory.
MAX_ID_CHARS = 128
MAX_SESSION_CHARS = 128
DEFAULT_PRIORITY = 5
MAX_PROMPT_TOKENS = 1_000_000
MAX_PROMPT_CHARS = 4_000_000
MAX_STOP_TOKENS = 64
MAX_SUBJECT_CHARS = 256
MAX_SEED = 2**63 - 1
MAX_MESSAGES = 10_000
MAX_STOP_STRINGS = 8
MAX_STOP_CHARS = 128
MAX_LOGPROBS = 20
MAX_SCHEMA_BYTES = 64 * 1024  # a response_format's schema, as compact JSON

# The id becomes the `Nats-Msg-Id` header of the result, and header values are
# ASCII without whitespace or control characters; so the id is printable ASCII.
ID_PATTERN = r"^[!-~]+$"

# A literal NATS subject: dot-separated non-empty tokens with no whitespace, no
# control characters and no wildcards (a reply_to with `*` or `>` is not one subject).
_SUBJECT_TOKEN = r"[^\s\x00-\x1f\x7f.*>]+"
SUBJECT_PATTERN = rf"^{_SUBJECT_TOKEN}(\.{_SUBJECT_TOKEN})*$"
_SUBJECT_RE = re.compile(SUBJECT_PATTERN)

# What each pattern means in words, for error messages that a producer can act on
# (pydantic's own message quotes the regex).
PATTERN_HINTS = {
    ("id",): "should be printable ASCII without spaces",
    ("custom_id",): "should be printable ASCII without spaces (it is the job id)",
    ("reply_to",): "should be a NATS subject: dot-separated non-empty tokens, "
    "no whitespace, no wildcards",
}


def is_subject(value: object) -> bool:
    """True if `value` is a str that Job.reply_to would accept."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_SUBJECT_CHARS
        and _SUBJECT_RE.match(value) is not None
    )


class ErrorCode(StrEnum):
    """Machine-readable reason a job failed; producers branch on these, so never rename one."""

    BAD_PAYLOAD = "bad_payload"  # not msgpack, trailing bytes, or not a map
    INVALID_JOB = "invalid_job"  # a map that violates the Job schema
    EMPTY_PROMPT = "empty_prompt"
    TOO_LONG = "too_long"  # prompt + max_new_tokens over max_seq_len or the budget
    FORBIDDEN_REPLY_TO = "forbidden_reply_to"  # reply subject outside the result prefix
    EXPIRED = "expired"  # past deadline_s before it got device time
    BAD_TOKEN = "bad_token"  # token id outside the model's vocabulary
    POISON = "poison"  # failed on too many deliveries
    BAD_MESSAGES = "bad_messages"  # messages the chat template refused or rendered to nothing
    NO_CHAT_TEMPLATE = "no_chat_template"  # messages for a model without a chat template
    CANCELLED = "cancelled"  # withdrawn by its producer (a cancel message named its id)
    BAD_SCHEMA = "bad_schema"  # a response_format that cannot be compiled (or not in time)
    UNSUPPORTED_TASK = "unsupported_task"  # a task this worker's model does not do
    # A part of the job failed while it ran; it ended alone with the tokens it made so far:
    GRAMMAR_FAILED = "grammar_failed"  # its response_format's parser stopped or refused a token
    LOGPROBS_FAILED = "logprobs_failed"  # its logprobs were not finite (NaN logits)
    STOP_FAILED = "stop_failed"  # matching its stop strings raised
    RESULT_FAILED = "result_failed"  # its Result could not be built (decoding its tokens)


class FinishReason(StrEnum):
    LENGTH = "length"  # produced max_new_tokens
    STOP = "stop"  # produced one of stop_token_ids (or the model's end token)
    ERROR = "error"
    EXPIRED = "expired"
    CANCELLED = "cancelled"  # a cancel message named the job; tokens are those made so far


class _Wire(BaseModel):
    # NaN and inf are refused everywhere: a NaN temperature or deadline has no meaning
    # and would poison comparisons downstream.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


StrictStr = Annotated[str, Strict()]
TokenId = Annotated[int, Strict(), Field(ge=0)]
NonNegInt = Annotated[int, Strict(), Field(ge=0)]
NonNegFloat = Annotated[float, Strict(), Field(ge=0)]


def _prompt_kind(value: Any) -> str | None:
    # Dispatching on the Python type (rather than trying each union member) keeps the
    # error for a bad prompt about the one shape the producer meant to send.
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "tokens"
    return None


# Union tags appear in validation error locations; the codec drops them from messages.
PROMPT_TAGS = frozenset({"tokens", "text"})

Prompt = Annotated[
    Annotated[list[TokenId], Field(min_length=1, max_length=MAX_PROMPT_TOKENS), Tag("tokens")]
    | Annotated[StrictStr, Field(min_length=1, max_length=MAX_PROMPT_CHARS), Tag("text")],
    Discriminator(
        _prompt_kind,
        custom_error_type="prompt_type",
        custom_error_message="Input should be a list of token ids or a string",
    ),
]


class Sampling(_Wire):
    temperature: NonNegFloat = Field(0.0, description="0 means greedy decoding.")
    top_k: NonNegInt = Field(0, description="Keep the k most likely tokens; 0 turns it off.")
    top_p: Annotated[float, Strict(), Field(gt=0, le=1)] = Field(
        1.0, description="Nucleus sampling mass in (0, 1]; 1 turns it off."
    )
    seed: Annotated[int, Strict(), Field(ge=0, le=MAX_SEED)] | None = Field(
        None, description="Per-job RNG seed; null lets the worker choose."
    )
    stop_token_ids: Annotated[list[TokenId], Field(max_length=MAX_STOP_TOKENS)] = Field(
        default=[], description="Generation stops after any of these tokens."
    )
    stop: Annotated[
        list[Annotated[StrictStr, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
        Field(max_length=MAX_STOP_STRINGS),
    ] = Field(
        default=[],
        description="Generation stops when the text contains one of these strings; the "
        "Result's text ends before it, its tokens with the token that completed it.",
    )
    ignore_eos: Annotated[bool, Strict()] = Field(
        False, description="Keep generating past the model's end-of-sequence tokens."
    )
    logprobs: Annotated[int, Strict(), Field(ge=0, le=MAX_LOGPROBS)] = Field(
        0,
        description="With n > 0 the Result carries, per generated token, its log-probability "
        "and the n most likely tokens' (log-softmax of the raw logits).",
    )


class ResponseFormat(_Wire):
    """Constrain the output: any JSON object, or JSON that validates against a schema."""

    # `schema` on the wire (the field cannot have that name: BaseModel has a `schema`).
    model_config = ConfigDict(serialize_by_alias=True)

    type: Literal["json_object", "json_schema"] = Field(
        description="json_object: any JSON object; json_schema: one that validates against "
        "`schema`. Generation ends (finish_reason stop) when the value is complete; a job "
        "that reaches max_new_tokens first ends with `length`, its text not promised valid."
    )
    json_schema: dict[str, Any] | None = Field(
        None, alias="schema",
        description="The JSON Schema (json_schema only): objects, required and optional "
        "properties, arrays with item schemas and length bounds, enum, const, bounded "
        "numbers and integers, strings with length bounds and patterns, nesting, $ref "
        "within the document.")

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("schema is required with type json_schema and only with it")
        if self.json_schema is not None:
            try:
                size = len(json.dumps(self.json_schema, separators=(",", ":")))
            except (TypeError, ValueError):  # msgpack binary or NaN: not JSON at all
                raise ValueError("schema must be plain JSON (no binary, NaN or infinity)") from None
            if size > MAX_SCHEMA_BYTES:
                raise ValueError(f"schema is over {MAX_SCHEMA_BYTES} bytes as JSON")
        return self

    def as_dict(self) -> dict[str, Any]:
        """The wire form, `schema` by its name (what the grammar cache keys on)."""
        return self.model_dump(exclude_none=True)


class Role(StrEnum):
    SYSTEM = "system"
    USER = "user"
    ASSISTANT = "assistant"
    TOOL = "tool"


class Message(_Wire):
    role: Role
    content: Annotated[StrictStr, Field(max_length=MAX_PROMPT_CHARS)]


def _no_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)  # absent means "not this one", not null


def _absent(value: Any) -> bool:
    return value is None  # dumped absent, as sent: a null would not validate


class Job(_Wire):
    """One unit of work, published to a subject of the jobs stream as a msgpack map or as a
    JSON object (a payload whose first byte other than whitespace is `{`); the worker
    answers in the same encoding."""

    id: Annotated[StrictStr, Field(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)] = (
        Field(description="Producer-chosen idempotency key; printable ASCII, no spaces.")
    )
    # Exactly one of prompt and messages (the validator below; `oneOf` in the JSON Schema).
    # Each may be absent but never null: the None default is not validated, a sent null is,
    # and fails with the field's own message.
    # Task embed takes a prompt and no max_new_tokens; generate needs max_new_tokens.
    model_config = ConfigDict(json_schema_extra={
        "oneOf": [{"required": ["prompt"]}, {"required": ["messages"]}],
        "if": {"properties": {"task": {"const": "embed"}}, "required": ["task"]},
        "then": {"required": ["prompt"]},
        "else": {"required": ["max_new_tokens"]}})

    prompt: Prompt = Field(  # type: ignore[assignment]
        None, description="Token ids, or text the worker tokenizes. Never empty. Exactly one "
        "of prompt and messages.", json_schema_extra=_no_default, exclude_if=_absent)
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)] = Field(
        None, description="A conversation the worker renders with the model's chat template "  # type: ignore[assignment]
        "(generation prompt added). Exactly one of prompt and messages.",
        json_schema_extra=_no_default, exclude_if=_absent)
    task: Literal["generate", "embed"] = Field(
        "generate", description="generate: tokens after the prompt; embed: the prompt's "
        "embedding (an embedding checkpoint; max_new_tokens and sampling do not apply).")
    max_new_tokens: NonNegInt = Field(  # type: ignore[assignment]
        None, description="Most tokens to generate (task generate: required).",
        json_schema_extra=_no_default, exclude_if=_absent)
    reply_to: Annotated[
        StrictStr, Field(min_length=1, max_length=MAX_SUBJECT_CHARS, pattern=SUBJECT_PATTERN)
    ] = Field(description="NATS subject the Result is published to; no wildcards.")
    sampling: Sampling = Field(default_factory=Sampling)
    deadline_s: Annotated[float, Strict()] | None = Field(
        None, description="Unix time in seconds after which the job is not worth running."
    )
    response_format: ResponseFormat | None = Field(
        None, description="Constrain the output to JSON (see ResponseFormat).")
    normalize: Annotated[bool, Strict()] | None = Field(
        None, description="embed: L2-normalize the embedding; null: as the checkpoint says.")
    dimensions: Annotated[int, Strict(), Field(ge=1)] | None = Field(
        None, description="embed: keep the first n values (Matryoshka), then normalize.")
    truncate: Annotated[bool, Strict()] = Field(
        False, description="embed: cut an over-long input to the model's limit (the Result "
        "says so) instead of answering too_long.")
    priority: Annotated[int, Strict(), Field(ge=0, le=9)] = Field(
        DEFAULT_PRIORITY, description="0 first, 9 last. The broker keeps one queue per "
        "priority, chosen by the subject (`fabric.prio.<priority>.<anything>`; "
        "`job_subject` computes it); a worker admits what it has pulled by this field.")
    session: Annotated[StrictStr, Field(min_length=1, max_length=MAX_SESSION_CHARS)] | None = (
        Field(None, description="A conversation whose turns share their history: published to "
              "`fabric.session.<priority>.<token>` (`job_subject`), its jobs go to the worker "
              "that holds its KV while that worker lives and keeps up.", exclude_if=_absent))

    @model_validator(mode="after")
    def _prompt_or_messages(self) -> Job:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("exactly one of prompt and messages is required")
        if self.task == "generate":
            if self.max_new_tokens is None:
                raise ValueError("max_new_tokens is required for task generate")
            if self.normalize is not None or self.dimensions is not None or self.truncate:
                raise ValueError("normalize, dimensions and truncate apply to task embed only")
        elif self.messages is not None:
            raise ValueError("an embed job sends its input as prompt, not messages")
        elif self.response_format is not None:
            raise ValueError("response_format applies to task generate only")
        return self


class ErrorInfo(_Wire):
    code: ErrorCode
    message: StrictStr


class Usage(_Wire):
    prompt_tokens: NonNegInt = 0
    completion_tokens: NonNegInt = 0
    padded_tokens: NonNegInt = Field(
        0,
        description="Token positions the job occupied in the device's batches, padding "
        "included: its prompt rows (padded to the batch's longest under static batching) "
        "plus one per decode step it took part in. Equal to prompt + completion when "
        "nothing was padded.",
    )
    cached_tokens: NonNegInt = Field(
        0,
        description="Prompt tokens whose KV the worker already held (a prefix this job shares "
        "with an earlier or concurrent one): served from cache, not computed for this job.",
    )


class Timing(_Wire):
    # Every figure is measured from the message's arrival at the worker, so a Result
    # says where the worker's time went; broker time is the producer's to measure.
    queued_ms: NonNegFloat = Field(0.0, description="Arrival to admission.")
    first_token_ms: NonNegFloat | None = Field(None, description="Arrival to first token.")
    total_ms: NonNegFloat = Field(0.0, description="Arrival to result.")


class TokenLogprob(_Wire):
    token: TokenId
    logprob: Annotated[float, Strict()]
    top: list[tuple[TokenId, Annotated[float, Strict()]]] = Field(
        description="The most likely tokens at this position, [token, logprob], most likely "
        "first."
    )


class Result(_Wire):
    """The answer to one job, published to its reply_to subject in the job's encoding
    (msgpack map, or JSON object for a JSON job); `Nats-Msg-Id` is the job's id."""

    id: Annotated[StrictStr, Field(max_length=MAX_ID_CHARS)] = Field(
        description="The job's id; empty when the payload had no readable id."
    )
    ok: Annotated[bool, Strict()]
    tokens: list[TokenId] = []
    text: StrictStr | None = None
    finish_reason: FinishReason
    error: ErrorInfo | None = None
    usage: Usage = Field(default_factory=Usage)
    timing: Timing = Field(default_factory=Timing)
    worker: StrictStr = ""
    attempt: NonNegInt = Field(0, description="JetStream delivery count of the job.")
    logprobs: list[TokenLogprob] | None = Field(
        None, description="One entry per generated token when the job asked for logprobs."
    )
    embedding: list[Annotated[float, Strict()]] | None = Field(
        None, description="task embed: the embedding (float32 values; msgpack float 32).")
    truncated: Annotated[bool, Strict()] = Field(
        False, description="task embed: the input was cut to the model's limit (truncate).")

    @model_validator(mode="after")
    def _ok_means_no_error(self) -> Result:
        if self.ok != (self.error is None):
            raise ValueError("ok must be true exactly when error is null")
        return self
