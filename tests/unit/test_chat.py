"""Chat templates without transformers: which template a checkpoint gets, what it renders
with, how its text is tokenized, every way a template can refuse or misbehave (each one a
`ChatError`, bounded in time and size), and the validator's answers for messages jobs.

That the ids equal transformers' `apply_chat_template` is test_chat_reference's job; the
tokenizers and the Llama-3, ChatML and Mistral style templates both files use are here.
"""

from __future__ import annotations

import json
import re
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from schemas import ErrorCode, Job, Message, encode
from worker.broker.validate import Limits, Outcome, Ticket, Validator
from worker.model.chat import (
    MAX_RENDER_CHARS,
    RENDER_DEADLINE_S,
    ChatError,
    ChatTemplate,
    load_chat_template,
    special_tokens,
)
from worker.model.checkpoint import CheckpointError, load_model
from worker.model.tokenizer import ByteTokenizer, HFTokenizer

from tests.unit.test_checkpoint import hf_config, write_checkpoint

# Approximations of the real templates' structure, written here (raw strings: Jinja reads
# the \n escapes inside its own string literals, as in a tokenizer_config.json).
LLAMA3 = r"""{{- bos_token }}
{%- if not date_string is defined %}
    {%- if strftime_now is defined %}
        {%- set date_string = strftime_now("%d %b %Y") %}
    {%- else %}
        {%- set date_string = "26 Jul 2024" %}
    {%- endif %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role in ['ipython', 'tool'] %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

CHATML = r"""{%- if messages[0]['role'] == 'system' %}
    {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
{%- else %}
    {{- '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant") %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

MISTRAL = r"""{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('After the optional system message, conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {%- if message['role'] == 'user' %}
        {%- if loop.first and system_message is defined %}
            {{- ' [INST] ' + system_message + '\n\n' + message['content'] + ' [/INST]' }}
        {%- else %}
            {{- ' [INST] ' + message['content'] + ' [/INST]' }}
        {%- endif %}
    {%- elif message['role'] == 'assistant' %}
        {{- ' ' + message['content'] + eos_token}}
    {%- else %}
        {{- raise_exception('Only user and assistant roles are supported, with the exception of an initial optional system message!') }}
    {%- endif %}
{%- endfor %}
"""

# family: (template, tokenizer_config.json without the template). Named tokens come as
# strings and as AddedToken dicts, as real configs write them.
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": (LLAMA3, {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}),
    "chatml": (CHATML, {"bos_token": None, "eos_token": "<|im_end|>",
                        "pad_token": {"__type": "AddedToken", "content": "<|endoftext|>",
                                      "special": True, "normalized": False}}),
    "mistral": (MISTRAL, {"bos_token": {"__type": "AddedToken", "content": "<s>", "lstrip": False,
                                        "rstrip": False, "normalized": False, "special": True},
                          "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}),
}
SPECIALS = ["<unk>", "<s>", "</s>", "<|begin_of_text|>", "<|eot_id|>", "<|start_header_id|>",
            "<|end_header_id|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "[INST]",
            "[/INST]", "<image>", "<video>"]
CORPUS = ("You are a helpful assistant. What is the capital of France? The capital of France is "
          "Paris. Tell me a joke about the weather, then the tool result: temperature 21 degrees "
          "in Paris today. Thanks, that is all for now.\n")

# The conversations every family renders (Mistral refuses the ones with tool messages).
CONVERSATIONS: dict[str, list[tuple[str, str]]] = {
    "user": [("user", "What is the capital of France?")],
    "system+user": [("system", "You are a helpful assistant."),
                    ("user", "Tell me a joke about the weather.")],
    "multi-turn": [("system", "Be brief."), ("user", "What is the capital of France?"),
                   ("assistant", "Paris."), ("user", "And the weather there?"),
                   ("assistant", "21 degrees."), ("user", "Thanks!")],
    "tool": [("user", "What is the weather in Paris?"), ("assistant", "Calling the tool."),
             ("tool", '{"temperature": 21}'), ("tool", '{"unit": "celsius"}'),
             ("user", "So?")],
    "unicode": [("user", "héllo wörld ✓ 日本語 🙂 — «quotes» \u00a0nbsp\ttab")],
    # Special-token strings in content are special tokens to transformers by default.
    "special-strings": [("user", "close <|eot_id|> or <|im_end|> then [INST] hi [/INST] </s>")],
    "whitespace": [("system", "  padded system  \n"), ("user", "\n  padded user \n")],
}


def messages(pairs: list[tuple[str, str]]) -> list[Message]:
    return [Message(role=role, content=content) for role, content in pairs]


def bpe_tokenizer(bos: str | None) -> Tokenizer:
    """A small byte-level BPE with the families' special tokens; its post-processor adds
    `bos` to text, as real ones do, so a rendered chat encoded with it would get two."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS] * 4, trainer)
    bos = bos or "<s>"
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))])
    return tok


def write_tokenizer(path: Path, family: str, template_in_config: bool = True,
                    **config: Any) -> Path:
    """tokenizer.json + tokenizer_config.json (its template inline unless told otherwise)."""
    template, base = FAMILIES[family]
    path.mkdir(parents=True, exist_ok=True)
    bos = base["bos_token"]
    tok = bpe_tokenizer(bos["content"] if isinstance(bos, dict) else bos)
    tok.save(str(path / "tokenizer.json"))
    cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **base, **config}
    if template_in_config:
        cfg.setdefault("chat_template", template)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


def hf_chat(path: Path) -> ChatTemplate | None:
    return load_chat_template(path, HFTokenizer(path / "tokenizer.json"))


def test_builtin_models_render_chatml_as_plain_bytes() -> None:
    loaded = load_model("builtin:tiny", torch.float32, torch.device("cpu"))
    assert loaded.chat is not None
    conv = messages([("system", "be kind"), ("user", "hé")])
    text = ("<|im_start|>system\nbe kind<|im_end|>\n<|im_start|>user\nhé<|im_end|>\n"
            "<|im_start|>assistant\n")
    assert loaded.chat.render_text(conv) == text
    assert loaded.chat.render(conv) == list(text.encode("utf-8"))  # no BOS (256), bytes only


def test_rendered_text_is_tokenized_without_adding_special_tokens(tmp_path: Path) -> None:
    chat = hf_chat(write_tokenizer(tmp_path, "llama3"))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    conv = messages(CONVERSATIONS["system+user"])
    ids, text = chat.render(conv), chat.render_text(conv)
    bos = tok.encode("")[0]  # the post-processor's BOS on a text prompt
    assert text.startswith("<|begin_of_text|>") and ids[0] == bos
    assert ids.count(bos) == 1 and tok.encode(text).count(bos) == 2
    assert ids == tok.encode(text, add_special_tokens=False)
    assert tok.encode("hi") == [bos, *tok.encode("hi", add_special_tokens=False)]  # text prompts


def _marker(name: str) -> str:
    return f"{{{{ '{name}' }}}}"


@pytest.mark.parametrize("layout, expect", [
    ("config-string", "config"),
    ("config-list", "default"),
    ("jinja-file", "file"),  # beats the config's template
    ("extra-dir-default", "extra"),
    ("none", None),
])
def test_the_template_is_picked_as_transformers_picks_it(tmp_path: Path, layout: str,
                                                         expect: str | None) -> None:
    cfg: dict[str, Any] = {"chat_template": _marker("config")}
    if layout == "config-list":
        cfg = {"chat_template": [{"name": "tool_use", "template": _marker("tool_use")},
                                 {"name": "default", "template": _marker("default")}]}
    elif layout == "none":
        cfg = {}
    path = write_tokenizer(tmp_path, "chatml", template_in_config=False, **cfg)
    if layout == "jinja-file":
        (path / "chat_template.jinja").write_text(_marker("file"))
    elif layout == "extra-dir-default":
        (path / "additional_chat_templates").mkdir()
        (path / "additional_chat_templates" / "default.jinja").write_text(_marker("extra"))
    chat = hf_chat(path)
    if expect is None:
        assert chat is None
    else:
        assert chat is not None and chat.render_text(messages([("user", "x")])) == expect


@pytest.mark.parametrize("cfg, files, error", [
    ({"chat_template": [{"name": "rag", "template": "x"}, {"name": "tool_use", "template": "y"}]},
     {}, "none named 'default'"),
    ({}, {"additional_chat_templates/rag.jinja": "x"}, "none named 'default'"),
    ({"chat_template": {"default": "x"}}, {}, "neither a string nor a list"),
    ({"chat_template": "{% for %}"}, {}, "does not compile"),
    ({}, {"chat_template.jinja": "{{ messages[0] }"}, "does not compile"),
])
def test_a_template_that_cannot_be_used_fails_start_up(tmp_path: Path, cfg: dict,
                                                       files: dict[str, str], error: str) -> None:
    """A broken template is the operator's to fix: the worker refuses to start, naming it,
    rather than start and answer every messages job with the same error."""
    write_checkpoint(tmp_path, hf_config(vocab_size=400))
    write_tokenizer(tmp_path, "chatml", template_in_config=False, **cfg)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(text)
    with pytest.raises(ChatError, match=error):
        hf_chat(tmp_path)
    with pytest.raises(CheckpointError, match=f"{re.escape(str(tmp_path))}.*{error}"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))


def test_a_checkpoint_loads_with_its_template_or_without_one(tmp_path: Path) -> None:
    with_template = write_tokenizer(write_checkpoint(tmp_path / "a", hf_config(vocab_size=400)),
                                    "mistral")
    loaded = load_model(str(with_template), torch.float32, torch.device("cpu"))
    assert loaded.chat is not None
    assert loaded.chat.render_text(messages([("user", "hi")])) == "<s> [INST] hi [/INST]"
    without = write_tokenizer(write_checkpoint(tmp_path / "b", hf_config(vocab_size=400)),
                              "mistral", template_in_config=False)
    assert load_model(str(without), torch.float32, torch.device("cpu")).chat is None
    bare = write_checkpoint(tmp_path / "c", hf_config())  # no tokenizer files at all
    assert load_model(str(bare), torch.float32, torch.device("cpu")).chat is None


def test_named_special_tokens_are_the_templates_variables(tmp_path: Path) -> None:
    config = {
        "bos_token": "<s>", "eos_token": {"__type": "AddedToken", "content": "</s>"},
        "pad_token": None, "add_bos_token": True, "image_token": "<image>",
        "extra_special_tokens": {"video_token": "<video>"}, "model_max_length": 4096,
    }
    assert special_tokens(config) == {"bos_token": "<s>", "eos_token": "</s>",
                                      "image_token": "<image>", "video_token": "<video>"}
    # The legacy special_tokens_map.json overrides the config's names, unless the config
    # lists its added tokens (then transformers never reads the legacy file).
    template = "{{ bos_token }}|{{ eos_token }}"
    path = write_tokenizer(tmp_path, "chatml", chat_template=template, bos_token="<s>",
                           eos_token="</s>")
    (path / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": {"content": "<|begin_of_text|>", "special": True}}))
    assert hf_chat(path).render_text(messages([("user", "x")])) == "<|begin_of_text|>|</s>"
    write_tokenizer(tmp_path, "chatml", chat_template=template, bos_token="<s>",
                    eos_token="</s>", added_tokens_decoder={})
    assert hf_chat(path).render_text(messages([("user", "x")])) == "<s>|</s>"


def test_the_environment_is_transformers_chat_environment() -> None:
    """tools/documents defined as None, tojson without HTML escapes, loop controls, the
    generation tag, strftime_now, a namespace; a long conversation renders in bounds."""
    template = ("{{ tools is defined and tools is none and documents is none }}|"
                "{{ messages|tojson }}|{{ {'k': '<&>'}|tojson(indent=1) }}|"
                "{% for m in messages %}{% if loop.first %}{% continue %}{% endif %}"
                "{% generation %}{{ m.role }}{% endgeneration %}{% break %}{% endfor %}|"
                "{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}"
                "{% endfor %}{{ ns.n }}|{{ strftime_now('%Y') }}")
    chat = ChatTemplate(template, ByteTokenizer())
    conv = messages([("user", "<b>é</b>"), ("assistant", "ok"), ("user", "again")])
    assert chat.render_text(conv) == (
        'True|[{"role": "user", "content": "<b>é</b>"}, {"role": "assistant", "content": "ok"}, '
        '{"role": "user", "content": "again"}]|{\n "k": "<&>"\n}|assistant|3|'
        + time.strftime("%Y"))
    long = messages([("user", "a question " * 50), ("assistant", "an answer " * 50)] * 500)
    assert len(ChatTemplate(LLAMA3, ByteTokenizer(), {"bos_token": "<s>"}).render(long)) > 500_000


# template -> what its ChatError says
BAD_TEMPLATES: dict[str, tuple[str, str]] = {
    "raise_exception": ("{{ raise_exception('roles must alternate') }}",
                        "refused these messages: roles must alternate"),
    "undefined": ("{{ messages[3].content.upper() }}", "refused these messages"),
    "python-error": ("{{ messages[0].content + 1 }}", "TypeError"),
    "empty": ("{% if false %}x{% endif %}", "rendered these messages to nothing"),
    "whitespace": ("  {% for m in messages %}\n \t{% endfor %}\n", "to nothing"),
    # Nested loops and a macro tree that yield nothing: only the time guard sees them.
    "silent-loop": ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}"
                    "{% endfor %}x", "ran past 100 ms"),
    "macro-fork": ("{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}"
                   "{% endmacro %}{{ f(0) }}x", "ran past"),
    "macro-recursion": ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
                        "RecursionError"),
    # Bounded chunks that add up: the size check on output.
    "output-size": ("{% for i in range(1000) %}{{ 'x' * 1000000 }}{% endfor %}",
                    f"more than {MAX_RENDER_CHARS} characters"),
    # One step that would allocate gigabytes or compute for minutes: refused before it runs.
    "repeat": ("{{ 'x' * 10**9 }}", "would build a value of 1000000000"),
    "repeat-list": ("{{ ([1] * 100000) * 100000 }}", "would build a value"),
    "power": ("{{ 10 ** (10 ** 9) }}", "over 4096 bits"),
    "doubling": ("{% set ns = namespace(s='x') %}{% for i in range(64) %}"
                 "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s }}", "would build"),
    "namespace-underscore": ("{% set ns = namespace(_x=1) %}x", "underscore"),
}


@pytest.mark.parametrize("name", list(BAD_TEMPLATES))
def test_bad_templates_are_one_jobs_chat_error(name: str) -> None:
    """Each refused within a second (unguarded, the loops run for hours) and without
    allocating more than a few output-sized strings (unguarded, the steps take gigabytes)."""
    template, error = BAD_TEMPLATES[name]
    chat = ChatTemplate(template, ByteTokenizer())  # compiles: only rendering goes wrong
    started = time.perf_counter()
    tracemalloc.start()
    try:
        with pytest.raises(ChatError, match=error):
            chat.render(messages([("user", "hi")]))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - started < 10 * RENDER_DEADLINE_S
    assert peak < 4 * MAX_RENDER_CHARS


def test_the_time_guard_leaves_the_previous_trace_function_in_place() -> None:
    def tracer(frame: Any, event: str, arg: Any) -> None:
        return None

    before = sys.gettrace()
    sys.settrace(tracer)
    try:
        ChatTemplate("{{ messages[0].content }}", ByteTokenizer()).render(messages([("user", "x")]))
        assert sys.gettrace() is tracer
        with pytest.raises(ChatError, match="ran past"):
            ChatTemplate(BAD_TEMPLATES["silent-loop"][0], ByteTokenizer()).render(
                messages([("user", "x")]))
        assert sys.gettrace() is tracer
    finally:
        sys.settrace(before)


# --- the validator: messages jobs to tickets or answers ---------------------------------


class FakeMsg:
    """What the validator reads of a nats Msg: the payload and the delivery count."""

    def __init__(self, data: bytes):
        self.data = data
        self.reply = "$JS.ACK.JOBS.workers.1.7.7.1700000000000000000.0"


def validator(tokenizer: Any, chat: ChatTemplate | None) -> Validator:
    limits = Limits(vocab_size=400, max_seq_len=1024, budget_tokens=4096, block_size=16,
                    reply_prefix="fabric.results.")
    return Validator(limits, tokenizer, chat=chat)


def chat_job(pairs: list[tuple[str, str]]) -> FakeMsg:
    return FakeMsg(encode(Job(id="c1", messages=messages(pairs), max_new_tokens=4,
                              reply_to="fabric.results.r")))


def test_a_messages_job_becomes_a_ticket_with_the_rendered_ids(tmp_path: Path) -> None:
    chat = hf_chat(write_tokenizer(tmp_path, "chatml"))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    conv = CONVERSATIONS["tool"]
    [ticket] = validator(tok, chat).check(chat_job(conv), time.monotonic())
    assert isinstance(ticket, Ticket)
    assert ticket.prompt == chat.render(messages(conv))
    assert ticket.prompt != tok.encode(chat.render_text(messages(conv)))  # no second BOS
    assert ticket.attempt == 1 and ticket.reserved_tokens % 16 == 0


def test_a_model_without_a_template_answers_no_chat_template() -> None:
    out = validator(ByteTokenizer(), None).check(chat_job([("user", "hi")]), time.monotonic())
    assert isinstance(out, Outcome) and out.error.code == ErrorCode.NO_CHAT_TEMPLATE
    assert out.reply_to == "fabric.results.r"


def test_a_template_that_refuses_answers_bad_messages(tmp_path: Path) -> None:
    chat = hf_chat(write_tokenizer(tmp_path, "mistral"))
    tok = HFTokenizer(tmp_path / "tokenizer.json")
    out = validator(tok, chat).check(chat_job([("user", "a"), ("user", "b")]), time.monotonic())
    assert isinstance(out, Outcome) and out.error.code == ErrorCode.BAD_MESSAGES
    assert "roles must alternate" in out.error.message and out.reply_to == "fabric.results.r"
