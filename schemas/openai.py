"""The field's own wire format: an OpenAI Batch API request line, and the bodies it carries.

Rule: a line is `{custom_id, method, url, body}` plus our `reply_to`, exactly as the Batch
API, LiteLLM and `vllm run-batch` write it; the body is the `/v1/chat/completions`,
`/v1/completions` or `/v1/embeddings` request. Every field the worker honours is modelled;
a field it cannot honour is refused by name (unknown keys are refused, and known ones whose
value would change the output in a way we do not do -- `stream: true`, penalties -- are
refused by `worker.features.openai`), never ignored silently. A list of prompts (inputs) is
of one kind -- all strings or all token-id lists -- and at most `MAX_CHOICES` (`MAX_INPUTS`)
long. Numbers follow OpenAI's own leniency (an integer is a fine temperature), unlike the
project's strict Job.
The output line is built in `worker.features.openai.response` and checked against the
official `openai` package's types by the tests; its shape is `BatchOutput` here, for the
JSON Schema export.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_core import PydanticCustomError

from schemas.models import (ID_PATTERN, MAX_ID_CHARS, MAX_LOGPROBS, MAX_MESSAGES,
                            MAX_PROMPT_CHARS, MAX_PROMPT_TOKENS, MAX_SEED, MAX_STOP_CHARS,
                            MAX_STOP_STRINGS, MAX_SUBJECT_CHARS, SUBJECT_PATTERN)

URLS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_TOOLS = 128
# A completions line runs as one job per choice (prompts x n), all held until the last is
# done: n's own cap bounds them together. Embeddings follow OpenAI's limit on inputs.
MAX_CHOICES = 128
MAX_INPUTS = 2048


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, populate_by_name=True)


Str = Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
Ids = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1,
                                                          max_length=MAX_PROMPT_TOKENS)]


class BatchRequest(_Body):
    """One line of a batch input file, published as one job."""

    custom_id: Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS,
                                    pattern=ID_PATTERN)] = Field(
        description="The job id (idempotency key): printable ASCII, no spaces.")
    method: Literal["POST"]
    url: Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
    body: dict[str, Any] = Field(description="The request body for `url`.")
    reply_to: Annotated[str, Field(min_length=1, max_length=MAX_SUBJECT_CHARS,
                                   pattern=SUBJECT_PATTERN)] = Field(
        description="Ours: the NATS subject its output line is published to.")


class TextPart(_Body):
    type: Literal["text"]
    text: Str


class FunctionCall(_Body):
    name: Str
    arguments: Str = Field(description="The arguments as a JSON string, as OpenAI sends them.")


class ToolCall(_Body):
    id: Str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Str | list[TextPart] | None = None
    name: Str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: Str | None = None


class FunctionDef(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: Str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(_Body):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]


class NamedToolChoice(_Body):
    type: Literal["function"]
    function: NamedFunction


class JsonSchemaSpec(_Body):
    name: Annotated[str, Field(min_length=1, max_length=64)]
    description: Str | None = None
    json_schema: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None


class ChatResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None


Stop = (Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]
        | Annotated[list[Annotated[str, Field(min_length=1, max_length=MAX_STOP_CHARS)]],
                    Field(max_length=MAX_STOP_STRINGS)])
Temperature = Annotated[float, Field(ge=0, le=2)]
TopP = Annotated[float, Field(gt=0, le=1)]
Seed = Annotated[int, Field(ge=-MAX_SEED, le=MAX_SEED)]
MaxTokens = Annotated[int, Field(ge=0)]
Penalty = Annotated[float, Field(ge=-2, le=2)]


class _Sampled(_Body):
    """What chat and completions bodies share."""

    model: Annotated[str, Field(min_length=1, max_length=256)]
    max_tokens: MaxTokens | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    seed: Seed | None = None
    stop: Stop | None = None
    n: Annotated[int, Field(ge=1, le=MAX_CHOICES)] | None = None
    stream: bool | None = None
    frequency_penalty: Penalty | None = None  # only 0: we have no penalties
    presence_penalty: Penalty | None = None
    user: Annotated[str, Field(max_length=256)] | None = None  # no effect on the output


class ChatBody(_Sampled):
    messages: Annotated[list[ChatMessage], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_completion_tokens: MaxTokens | None = None
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=MAX_LOGPROBS)] | None = None
    response_format: ChatResponseFormat | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None  # the parser returns every call it finds
    metadata: dict[str, Str] | None = None  # no effect on the output
    store: bool | None = None


def _items(what: str, most: int) -> BeforeValidator:
    """A list of several prompts (inputs) checked before the union's own errors (one per
    member, none of them saying what is wrong): empty, mixed kinds, too many, or one of them
    empty (error type `empty_prompt`: the line's code is then `empty_prompt`)."""
    def check(value: Any) -> Any:
        if not isinstance(value, list):
            return value
        if not value:
            raise PydanticCustomError("empty_prompt", f"is an empty list: send at least one "
                                      f"{what}")
        kinds = {"strings" if isinstance(x, str) else "token-id lists" if isinstance(x, list)
                 else "token ids" for x in value}
        if len(kinds) > 1:
            raise PydanticCustomError("mixed_items", f"mixes {' and '.join(sorted(kinds))}: a "
                                      f"list of {what}s is all strings or all token-id lists")
        if kinds == {"token ids"}:
            return value  # one prompt of token ids
        if len(value) > most:
            raise PydanticCustomError("too_many_items", f"{len(value)} {what}s are over the "
                                      f"{most} one request may hold: split them over lines")
        empty = next((i for i, x in enumerate(value) if not x), None)
        if empty is not None:
            raise PydanticCustomError("empty_prompt", f"{what} {empty} of the list is empty")
        return value
    return BeforeValidator(check)


def _prompts(what: str, most: int) -> Any:
    """One prompt (input) -- a string or token ids -- or a list of 1..`most` of one kind."""
    return Annotated[Str | Ids | Annotated[list[Str], Field(min_length=1, max_length=most)]
                     | Annotated[list[Ids], Field(min_length=1, max_length=most)],
                     _items(what, most)]


class CompletionBody(_Sampled):
    prompt: _prompts("prompt", MAX_CHOICES) = Field(
        description=f"One prompt, or a list of them (one choice each, x n; prompts x n at "
                    f"most {MAX_CHOICES}).")
    logprobs: Annotated[int, Field(ge=0, le=5)] | None = None
    echo: bool | None = None  # only false: the prompt is not repeated in the text
    suffix: Str | None = None  # only null: no insertion


class EmbeddingBody(_Body):
    model: Annotated[str, Field(min_length=1, max_length=256)]
    input: _prompts("input", MAX_INPUTS) = Field(
        description=f"One input, or a list of up to {MAX_INPUTS} (one embedding each).")
    dimensions: Annotated[int, Field(ge=1)] | None = None
    encoding_format: Literal["float", "base64"] | None = None
    user: Annotated[str, Field(max_length=256)] | None = None


BODIES: dict[str, type[_Body]] = dict(zip(URLS, (ChatBody, CompletionBody, EmbeddingBody)))


class BatchResponse(BaseModel):
    status_code: int
    request_id: str
    body: dict[str, Any] = Field(description="A chat.completion, text_completion or embedding "
                                 "list object (as the openai package's types), or {error}.")


class BatchError(BaseModel):
    code: str
    message: str


class BatchOutput(BaseModel):
    """One line of a batch output file: the Result of an OpenAI request line."""

    id: str
    custom_id: str
    response: BatchResponse | None
    error: BatchError | None
