"""Tool calls out of a reply's text, in the two formats chat templates ask models to write.

Rule: a call is recognised only when it parses whole; a reply that merely looks like one is
left as content, so parsing never loses text. The formats:
- Hermes / Qwen 2.5 / Qwen 3: `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`
  blocks, any text before the first block kept as content;
- Llama 3.x JSON: the whole reply (after an optional `<|python_tag|>`) is one JSON object
  `{"name": ..., "parameters" | "arguments": {...}}`, several joined by `;`, or a list of
  them. A forced tool call (tool_choice required or named) is written in this form by the
  grammar the request asked for.
Arguments go back as a JSON string, as OpenAI sends them; call ids are derived from the
custom id, so a replayed job's line is the same.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

_HERMES = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_PYTHON_TAG = "<|python_tag|>"


def parse_tool_calls(text: str, custom_id: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(the content left, the calls) of a reply; no calls: the text as it was."""
    calls: list[tuple[str, Any]] = []
    content: str | None = text
    if "<tool_call>" in text:
        blocks = _HERMES.findall(text)
        calls = [c for c in map(_one, blocks) if c is not None]
        if calls and len(calls) == len(blocks):
            content = text[:text.index("<tool_call>")].strip() or None
        else:
            calls = []
    else:
        stripped = text.strip().removeprefix(_PYTHON_TAG).strip()
        if stripped[:1] in ("{", "["):
            calls = _llama_json(stripped)
            if calls:
                content = None
    return content, [_call(name, args, custom_id, i) for i, (name, args) in enumerate(calls)]


def _llama_json(text: str) -> list[tuple[str, Any]]:
    try:
        value = json.loads(text)
        items = value if isinstance(value, list) else [value]
    except ValueError:
        try:
            items = [json.loads(part) for part in text.split(";") if part.strip()]
        except ValueError:
            return []
    calls = [c for c in map(_one, items) if c is not None]
    return calls if calls and len(calls) == len(items) else []


def _one(item: Any) -> tuple[str, Any] | None:
    if isinstance(item, str):
        try:
            item = json.loads(item)
        except ValueError:
            return None
    if not isinstance(item, dict) or not isinstance(item.get("name"), str):
        return None
    args = item.get("arguments", item.get("parameters", {}))
    if isinstance(args, str):  # some models write the arguments as a JSON string already
        try:
            args = json.loads(args)
        except ValueError:
            return None
    return (item["name"], args) if isinstance(args, dict) else None


def _call(name: str, args: dict[str, Any], custom_id: str, index: int) -> dict[str, Any]:
    digest = hashlib.sha256(f"{custom_id}\0{index}".encode()).hexdigest()[:24]
    return {"id": f"call_{digest}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
