"""Conversations to prompt tokens with the checkpoint's own chat template.

A `messages` job becomes the ids that transformers' `apply_chat_template(messages,
add_generation_prompt=True, tokenize=True)` gives for the same checkpoint: the template is
picked as transformers picks it (`chat_template.jinja`, else `tokenizer_config.json`'s
`chat_template`, of a list the one named "default"), renders in the same sandboxed Jinja
environment with the same variables (the named special tokens among them), and its text is
tokenized without adding special tokens: the template wrote them. As in transformers'
default, special-token strings inside a message are not escaped.

A template is untrusted code run on every messages job, so a render is bounded in time
(`render_deadline_s`, checked on every line the template runs) and in size
(MAX_RENDER_CHARS, checked on every chunk of output, and before `*`, `**` or `+` builds a
value that large; growth through `~`, filters or methods is left to the deadline).
Whatever a template raises, an empty render or a bound crossed is a `ChatError`: one job's
`bad_messages`, never the worker's problem. A template that does not compile is the
operator's: `load_chat_template` raises, and the worker refuses to start rather than refuse
every messages job later.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from types import FrameType
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.exceptions import SecurityError
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from schemas import Message
from schemas.models import MAX_PROMPT_CHARS
from worker.model.tokenizer import Tokenizer

# A rendered conversation is a prompt: no longer than a job may send as text.
MAX_RENDER_CHARS = MAX_PROMPT_CHARS
# The validator renders on the event loop, so a render may hold it only briefly. Guarded,
# Llama-3 and ChatML style templates take ~0.2 ms on a short conversation and 18-25 us per
# message on long ones: a tenth of a second, plus twice that per message (a conversation may
# have 10,000), leaves room for a loaded host and stops a runaway template soon.
RENDER_DEADLINE_S = 0.1
RENDER_S_PER_MESSAGE = 50e-6
# An integer power past this many bits is refused before it is computed: no template needs
# one, and 10 ** 10 ** 9 would hold the event loop for minutes.
MAX_POWER_BITS = 4096
# The filename the template's code is compiled under: how the time guard knows its frames.
TEMPLATE_FILENAME = "<chat template>"

# For the builtin models (byte tokenizer): ChatML, its markers plain text.
BUILTIN_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class ChatError(ValueError):
    """The template refused the messages, or rendered them to nothing or too much."""


class ChatTemplate:
    """A compiled template, the tokenizer for its text and the special tokens it may name."""

    def __init__(self, source: str, tokenizer: Tokenizer,
                 special_tokens: Mapping[str, str] | None = None):
        env = _environment()
        try:
            code = env.compile(source, filename=TEMPLATE_FILENAME)
        except Exception as e:  # noqa: BLE001 - on pathological sources Jinja fails with more
            # than TemplateSyntaxError (RecursionError, MemoryError): all are "does not compile"
            raise ChatError(f"the chat template does not compile: {type(e).__name__}: {e}"
                            ) from None
        self._template = env.template_class.from_code(env, code, env.make_globals(None), None)
        self._tokenizer = tokenizer
        self._special_tokens = dict(special_tokens or {})

    def render(self, messages: Sequence[Message | dict[str, Any]],
               tools: list[dict[str, Any]] | None = None) -> list[int]:
        return self._tokenizer.encode(self.render_text(messages, tools), add_special_tokens=False)

    def render_text(self, messages: Sequence[Message | dict[str, Any]],
                    tools: list[dict[str, Any]] | None = None) -> str:
        """Messages are the Job's, or OpenAI-shaped dicts (tool calls, tool results); tools
        are JSON-schema dicts handed over as transformers hands them."""
        variables = {
            **self._special_tokens,
            "messages": [m if isinstance(m, dict) else {"role": m.role.value, "content": m.content}
                         for m in messages],
            # Passed as None, not left out: templates test `tools is defined`/`is none`.
            "tools": tools or None,
            "documents": None,
            "add_generation_prompt": True,
        }
        budget_s = render_deadline_s(len(messages))
        try:
            text = _bounded_render(self._template, variables, time.perf_counter() + budget_s)
        except ChatError:
            raise
        except _Timeout:
            raise ChatError(f"the chat template ran past {budget_s * 1000:.0f} ms on these "
                            "messages") from None
        except jinja2.TemplateError as e:  # raise_exception(), undefined names, the sandbox
            raise ChatError(f"the chat template refused these messages: {e}") from None
        except Exception as e:  # noqa: BLE001 - the template is untrusted code: whatever it
            # raises (TypeError, RecursionError, MemoryError...) is this job's answer
            raise ChatError(f"the chat template failed on these messages: "
                            f"{type(e).__name__}: {e}") from None
        if not text.strip():
            raise ChatError("the chat template rendered these messages to nothing")
        return text


def render_deadline_s(num_messages: int) -> float:
    return RENDER_DEADLINE_S + RENDER_S_PER_MESSAGE * num_messages


def load_chat_template(model_dir: Path, tokenizer: Tokenizer) -> ChatTemplate | None:
    """The checkpoint's template, or None when it has none.

    Raises ChatError for one that cannot be used (unreadable, not compiling, no default).
    """
    config = _json_object(model_dir / "tokenizer_config.json")
    source = _template_source(model_dir, config)
    if source is None:
        return None
    # transformers reads the legacy special_tokens_map.json only when the config does not
    # list its added tokens, and then it overrides the config's names.
    if "added_tokens_decoder" not in config:
        config = {**config, **_json_object(model_dir / "special_tokens_map.json")}
    return ChatTemplate(source, tokenizer, special_tokens(config))


def special_tokens(config: Mapping[str, Any]) -> dict[str, str]:
    """The named special tokens transformers hands a template: every `*_token` entry of
    tokenizer_config (a string, or an AddedToken dict with its `content`), then the names
    in `extra_special_tokens` (or its old name `additional_special_tokens`) when a dict."""
    entries = {k: v for k, v in config.items() if k.endswith("_token")}
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens")
    if isinstance(extra, dict):
        entries.update(extra)
    out: dict[str, str] = {}
    for name, value in entries.items():
        text = value.get("content") if isinstance(value, dict) else value
        if isinstance(text, str):
            out[name] = text
    return out


def _template_source(model_dir: Path, config: Mapping[str, Any]) -> str | None:
    # Template files replace the config's templates altogether, as in transformers.
    named = _template_files(model_dir) or _config_templates(config)
    if not named:
        return None
    if "default" not in named:
        raise ChatError(f"chat templates {sorted(named)} but none named 'default': there is no "
                        "telling which one renders a conversation")
    return named["default"]


def _template_files(model_dir: Path) -> dict[str, str]:
    named: dict[str, str] = {}
    if (model_dir / "chat_template.jinja").is_file():
        named["default"] = _text(model_dir / "chat_template.jinja")
    extra = model_dir / "additional_chat_templates"
    for path in sorted(extra.glob("*.jinja")) if extra.is_dir() else []:
        named[path.name.removesuffix(".jinja")] = _text(path)
    return named


def _config_templates(config: Mapping[str, Any]) -> dict[str, str]:
    value = config.get("chat_template")
    if value is None:
        return {}
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list) and all(isinstance(t, dict) and isinstance(t.get("name"), str)
                                       and isinstance(t.get("template"), str) for t in value):
        return {t["name"]: t["template"] for t in value}
    raise ChatError("tokenizer_config.json: chat_template is neither a string nor a list of "
                    "{name, template}")


def _text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"{path.name} cannot be read: {e}") from None


def _json_object(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(_text(path))
    except json.JSONDecodeError as e:
        raise ChatError(f"{path.name} is not JSON: {e}") from None
    if not isinstance(data, dict):
        raise ChatError(f"{path.name}: expected a JSON object, found {type(data).__name__}")
    return data


# --- rendering under bounds ---------------------------------------------------------------


class _Timeout(Exception):
    """Raised into the template's frame by the time guard once the deadline has passed."""


def _bounded_render(template: jinja2.Template, variables: dict[str, Any], deadline: float) -> str:
    chunks: list[str] = []
    size = 0
    with _deadline_guard(deadline):
        for chunk in template.generate(variables):
            size += len(chunk)
            if size > MAX_RENDER_CHARS:
                raise ChatError(f"the chat template renders these messages to more than "
                                f"{MAX_RENDER_CHARS} characters")
            # Also here: a guard unset by a swallowed _Timeout must not let output run on.
            if time.perf_counter() > deadline:
                raise _Timeout
            chunks.append(chunk)
    return "".join(chunks)


@contextmanager
def _deadline_guard(deadline: float) -> Iterator[None]:
    """Check the clock on every line the template's own code runs, raising _Timeout there.

    Output alone cannot bound the time: nested loops over ranges (each capped at 100,000 by
    the sandbox) and recursive macros can run for hours and yield nothing. Only frames of
    code compiled under TEMPLATE_FILENAME get the line hook; the global hook returns None
    for every other frame (Jinja's runtime, filters), so they run untraced apart from one
    call per frame. That per-frame call is most of the cost: a short conversation renders in
    ~0.17 ms guarded against ~0.05 ms unguarded. The thread's previous trace function (a
    debugger, coverage) is restored; it does not see the template's frames meanwhile.
    """
    def on_line(frame: FrameType, event: str, arg: Any) -> Any:
        if time.perf_counter() > deadline:
            raise _Timeout
        return on_line

    def on_call(frame: FrameType, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        yield
    finally:
        sys.settrace(previous)


# --- the environment: transformers' chat environment -------------------------------------


class _Sandbox(ImmutableSandboxedEnvironment):
    """Operators that can build a huge value in one step are checked before they run."""

    intercepted_binops = frozenset({"*", "**", "+"})

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any,
                   right: Any) -> Any:
        _check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)


def _check_binop(operator: str, left: Any, right: Any) -> None:
    sized = (str, list, tuple)
    if operator == "*":
        size = next((len(s) * n for s, n in ((left, right), (right, left))
                     if isinstance(s, sized) and isinstance(n, int)), 0)
    elif operator == "+" and isinstance(left, sized) and isinstance(right, sized):
        size = len(left) + len(right)
    else:
        size = 0
    if size > MAX_RENDER_CHARS:
        raise SecurityError(f"{operator!r} would build a value of {size} items "
                            f"(limit {MAX_RENDER_CHARS})")
    if (operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0
            and abs(left) > 1 and right * abs(left).bit_length() > MAX_POWER_BITS):
        raise SecurityError(f"{left} ** {right} is over {MAX_POWER_BITS} bits")


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` marks an assistant reply for training masks
    (transformers' AssistantTracker); rendering a prompt, it is its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body).set_lineno(lineno)


class _Namespace(Namespace):
    """transformers' namespace: no underscore names, so nothing reaches Python internals."""

    def __init__(*args: Any, **kwargs: Any):  # Namespace's signature: `namespace(self=...)` works
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise SecurityError(f"a namespace cannot hold {name!r}: underscore names are refused")


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which changes what a model reads.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> _Sandbox:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True,
                   extensions=[_GenerationTag, loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       namespace=_Namespace)
    return env
