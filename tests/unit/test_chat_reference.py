"""Our chat ids against a reference nobody here wrote: transformers' `apply_chat_template`.

Each checkpoint directory is written in the test: a BPE tokenizer trained here with the
templates' special tokens, a `tokenizer_config.json` naming them, and a Llama-3, ChatML or
Mistral style template (test_chat). transformers loads the same directory with
`AutoTokenizer`, so the template it picks, the variables it passes and the way it tokenizes
the text are all compared, not only the renderer. Last, a messages job runs end to end on a
tiny random Llama checkpoint: the same prompt ids, then the same greedy tokens as
transformers' `generate`, stopping at the eos id of `generation_config.json`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
import pytest
import torch

transformers = pytest.importorskip("transformers")

from worker.engine.build import build_engine  # noqa: E402
from worker.engine.sequence import Request  # noqa: E402
from worker.engine.step import generate  # noqa: E402
from worker.model.chat import ChatError, ChatTemplate  # noqa: E402
from worker.model.stops import StopMatcher  # noqa: E402
from worker.model.tokenizer import HFTokenizer  # noqa: E402

from tests.unit.test_chat import (  # noqa: E402
    CHATML,
    CONVERSATIONS,
    FAMILIES,
    LLAMA3,
    MISTRAL,
    hf_chat,
    messages,
    write_tokenizer,
)
from tests.unit.test_hf_reference import randomize  # noqa: E402

Pairs = list[tuple[str, str]]


def reference_ids(tok: Any, pairs: Pairs) -> list[int]:
    out = tok.apply_chat_template([{"role": r, "content": c} for r, c in pairs],
                                  add_generation_prompt=True, tokenize=True)
    # transformers 5 answers a BatchEncoding (return_dict defaults to True), 4.x a list.
    return out if isinstance(out, list) else list(out["input_ids"])


def reference(path: Path) -> Any:
    return transformers.AutoTokenizer.from_pretrained(str(path))


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[ChatTemplate, Any]]:
    """family -> (our template, transformers' tokenizer), from one directory each."""
    out = {}
    for family in FAMILIES:
        path = write_tokenizer(tmp_path_factory.mktemp(family), family)
        out[family] = (hf_chat(path), reference(path))
    return out


CASES = [(f, c) for f in FAMILIES for c in CONVERSATIONS if (f, c) != ("mistral", "tool")]


@pytest.mark.parametrize("family, conversation", CASES, ids=[f"{f}-{c}" for f, c in CASES])
def test_ids_equal_apply_chat_template(families, family: str, conversation: str) -> None:
    chat, tok = families[family]
    pairs = CONVERSATIONS[conversation]
    ours = chat.render(messages(pairs))
    assert ours == reference_ids(tok, pairs), chat.render_text(messages(pairs))
    # A match on a template that wrote nothing would prove little: it wrote its markers.
    assert len(ours) > len(pairs) * 3


@pytest.mark.parametrize("pairs", [CONVERSATIONS["tool"], [("user", "a"), ("user", "b")],
                                   [("assistant", "first")]])
def test_a_template_refuses_what_transformers_refuses(families, pairs: Pairs) -> None:
    chat, tok = families["mistral"]
    with pytest.raises(jinja2.TemplateError) as theirs:
        reference_ids(tok, pairs)
    with pytest.raises(ChatError) as ours:
        chat.render(messages(pairs))
    assert str(theirs.value) in str(ours.value)


VARIABLES = (
    "{{ bos_token }}{{ image_token }}{{ video_token }}{{ pad_token }}|"
    "{{ tools is defined }}/{{ tools is none }}/{{ documents is none }}/"
    "{{ date_string is defined }}|"
    "{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if loop.index0 == 1 %}{% continue %}{% endif %}"
    "{% set ns.n = ns.n + 1 %}{% generation %}{{ m|tojson }}{% endgeneration %}"
    "{% if loop.index == 3 %}{% break %}{% endif %}{% endfor %}{{ ns.n }}|"
    "{{ dict(a='<&>', b=[1, 2])|tojson(indent=2, sort_keys=true) }}|"
    "{{ messages[-1]['content']|trim }}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% endif %}"
)


def test_the_variables_and_environment_equal_transformers(tmp_path: Path) -> None:
    """Named special tokens from the config (string, AddedToken dict, a model-specific name,
    the named extra_special_tokens), tools/documents passed as None, loop controls, the
    generation tag, namespace, dict, tojson with its options and without HTML escapes."""
    path = write_tokenizer(tmp_path, "mistral", chat_template=VARIABLES, image_token="<image>",
                           extra_special_tokens={"video_token": "<video>"},
                           pad_token={"__type": "AddedToken", "content": "<|endoftext|>"})
    pairs = [("system", "<b>sys</b> é"), ("user", "skip me"), ("assistant", "a\"q"),
             ("user", "  last <image> \n")]
    tok = reference(path)
    theirs_text = tok.apply_chat_template([{"role": r, "content": c} for r, c in pairs],
                                          add_generation_prompt=True, tokenize=False)
    chat = hf_chat(path)
    assert chat.render_text(messages(pairs)) == theirs_text
    assert "<s><image><video><|endoftext|>|True/True/True/False|" in theirs_text
    assert chat.render(messages(pairs)) == reference_ids(tok, pairs)


@pytest.mark.parametrize("layout", ["config-list-default", "jinja-file-over-config"])
def test_the_template_transformers_picks_is_ours(tmp_path: Path, layout: str) -> None:
    if layout == "config-list-default":
        path = write_tokenizer(tmp_path, "llama3", chat_template=[
            {"name": "tool_use", "template": CHATML}, {"name": "default", "template": LLAMA3}])
    else:
        path = write_tokenizer(tmp_path, "mistral", chat_template=CHATML)
        (path / "chat_template.jinja").write_text(MISTRAL)
    pairs = CONVERSATIONS["multi-turn"]
    ours = hf_chat(path).render_text(messages(pairs))
    assert ours.startswith("<|begin_of_text|>" if layout == "config-list-default" else "<s> [INST]")
    assert hf_chat(path).render(messages(pairs)) == reference_ids(reference(path), pairs)


# --- a messages job end to end on a tiny checkpoint -----------------------------------------

NEW_TOKENS = 16


def first_new_token(tokens: list[int], start: int) -> int:
    """The index of the first token from `start` on that did not occur before it."""
    return next(i for i in range(start, len(tokens)) if tokens[i] not in tokens[:i])


def tiny_llama(path: Path) -> Any:
    """A seeded random Llama over the trained tokenizer at `path`, saved beside it."""
    cfg = transformers.LlamaConfig(
        vocab_size=HFTokenizer(path / "tokenizer.json").vocab_size, hidden_size=64,
        intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    randomize(model, seed=11)
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("family", ["llama3", "chatml"])
def test_stop_strings_end_where_transformers_stop_strings_end(tmp_path: Path,
                                                              family: str) -> None:
    """A stop string that spans a token boundary in the greedy reply: our tokens (the
    worker's matcher over the engine's tokens) equal `generate(stop_strings=...)`'s, and
    the text ends before the stop string."""
    path = write_tokenizer(tmp_path, family)
    model = tiny_llama(path)
    tok = reference(path)
    ids = reference_ids(tok, CONVERSATIONS["multi-turn"])
    prompt = torch.tensor([ids])
    with torch.no_grad():
        free = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=NEW_TOKENS, pad_token_id=0)[0, len(ids):].tolist()
    ours_tok = HFTokenizer(path / "tokenizer.json")
    # The last character of token k's text and the first of token k+1's: across a boundary.
    for k in range(4, NEW_TOKENS - 1):
        a, b = ours_tok.decode(free[:k]), ours_tok.decode(free[:k + 1])
        if len(b) > len(a) and a.strip() and b[len(a):].strip():
            stop = a[-1] + b[len(a)]
            if "\ufffd" not in stop:  # not half of a character the byte-level BPE split
                break
    else:
        pytest.skip("no token boundary with text on both sides in this reply")
    with torch.no_grad():
        theirs = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                max_new_tokens=NEW_TOKENS, pad_token_id=0,
                                stop_strings=[stop], tokenizer=tok)[0, len(ids):].tolist()
    engine = build_engine(str(path), "cpu", "float32", token_budget=1024, max_seq_len=512)
    [done] = generate(engine, [Request.greedy(0, ids, NEW_TOKENS)])
    assert done.tokens == free
    m = StopMatcher(ours_tok, ["never there", stop])
    for t in done.tokens:
        if m.feed([t]):
            break
    assert m.end is not None and done.tokens[:m.end] == theirs, (stop, theirs)
    text = ours_tok.decode(theirs)
    assert m.text[:m.cut] == text[:text.index(stop)]


def test_a_messages_job_generates_what_transformers_generates(tmp_path: Path) -> None:
    path = write_tokenizer(tmp_path, "llama3")
    model = tiny_llama(path)

    pairs = CONVERSATIONS["multi-turn"]
    ids = reference_ids(reference(path), pairs)
    prompt = torch.tensor([ids])
    with torch.no_grad():
        free = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=NEW_TOKENS, pad_token_id=0)[0, len(ids):].tolist()
    # The eos is a token the model really produces a few tokens in, so stopping is exercised.
    stop_at = first_new_token(free, start=3)
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": free[stop_at]}))

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(str(path)).eval()
    with torch.no_grad():
        theirs = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt),
                                   do_sample=False, max_new_tokens=NEW_TOKENS,
                                   pad_token_id=0)[0, len(ids):].tolist()
    assert theirs == free[:stop_at + 1]  # transformers stopped at the eos, and kept it

    engine = build_engine(str(path), "cpu", "float32", token_budget=1024, max_seq_len=512)
    assert engine.loaded.eos_ids == (free[stop_at],)
    assert engine.loaded.chat is not None
    prompt_ids = engine.loaded.chat.render(messages(pairs))
    assert prompt_ids == ids
    [done] = generate(engine, [Request.greedy(0, prompt_ids, NEW_TOKENS)])
    assert done.tokens == theirs and done.finish_reason == "stop"
