"""Batch files on disk: an OpenAI Batch API input file read and checked, output files resumed.

Rule: a file is checked whole before anything is published -- every line a JSON request
the worker would accept (the same translation the worker runs, the model name aside: that
is the worker's to say), every custom_id once -- and each bad line is reported by its
number. An output file is appended to, never rewritten: a `collect` that crashed leaves
whole lines (a torn last line is cut off when it resumes) and the ids it wrote are the ones
it does not write again.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from schemas import DecodeError
from worker.features.openai.request import translate

# The placeholder reply subject a line is checked with; `submit` sets the batch's own.
_CHECK_REPLY = "fabric.results.check"
MAX_SHOWN_PROBLEMS = 20


@dataclass(slots=True)
class BatchFile:
    """An input file's requests, in file order, ready to publish."""

    path: Path
    name: str  # the batch's name: subjects and message ids are scoped by it
    lines: list[dict[str, Any]] = field(default_factory=list)  # the parsed requests

    @property
    def ids(self) -> list[str]:
        return [line["custom_id"] for line in self.lines]


class BadBatchFile(ValueError):
    """Lines that are not valid requests, by line number; nothing may be published."""

    def __init__(self, path: Path, problems: list[tuple[int, str]]):
        shown = "\n".join(f"  line {n}: {why}" for n, why in problems[:MAX_SHOWN_PROBLEMS])
        more = len(problems) - MAX_SHOWN_PROBLEMS
        super().__init__(f"{path}: {len(problems)} line(s) are not valid requests; nothing was "
                         f"published\n{shown}" + (f"\n  and {more} more" if more > 0 else ""))
        self.problems = problems


def batch_name(path: Path) -> str:
    """A name from the file's bytes: the same file is the same batch, wherever it is run."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return "b" + digest.hexdigest()[:16]


def read_batch(path: Path, name: str | None = None) -> BatchFile:
    """Every line checked (BadBatchFile lists the bad ones); blank lines are skipped."""
    batch = BatchFile(path=path, name=name or batch_name(path))
    problems: list[tuple[int, str]] = []
    seen: dict[str, int] = {}
    with path.open("rb") as f:
        for number, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                line = json.loads(raw)
            except ValueError as e:
                problems.append((number, f"not JSON: {e}"))
                continue
            if not isinstance(line, dict):
                problems.append((number, "not a JSON object"))
                continue
            why = _check(line)
            cid = line.get("custom_id")
            if why is None and cid in seen:
                why = f"custom_id {cid!r} is already on line {seen[cid]}"
            if why is not None:
                problems.append((number, why))
                continue
            seen[cid] = number
            batch.lines.append(line)
    if problems:
        raise BadBatchFile(path, problems)
    return batch


def _check(line: dict[str, Any]) -> str | None:
    body = line.get("body")
    model = body.get("model") if isinstance(body, dict) else None
    try:
        translate({**line, "reply_to": _CHECK_REPLY},
                  (model,) if isinstance(model, str) else ())
    except DecodeError as e:
        return e.message
    return None


class OutputFile:
    """An output (or errors) file opened to append, knowing the ids it already holds."""

    def __init__(self, path: Path):
        self.path = path
        self.ids: set[str] = set()
        _cut_torn_tail(path)
        if path.exists():
            with path.open("rb") as f:
                for raw in f:
                    if raw.strip():
                        self.ids.add(json.loads(raw)["custom_id"])
        self._f = path.open("ab")

    def write(self, custom_id: str, line: bytes) -> None:
        self._f.write(line.rstrip(b"\n") + b"\n")
        self.ids.add(custom_id)

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self.flush()
        self._f.close()


def _cut_torn_tail(path: Path) -> None:
    """A crash mid-write leaves a last line without its newline: drop it (it comes again)."""
    if not path.exists() or path.stat().st_size == 0:
        return
    with path.open("rb+") as f:
        f.seek(-1, os.SEEK_END)
        if f.read(1) == b"\n":
            return
        f.seek(0)
        data = f.read()
        f.truncate(data.rfind(b"\n") + 1)
