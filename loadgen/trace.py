"""Recorded workloads: a trace file of job shapes and arrival times, parsed once, replayed as is.

Rule: a trace that cannot be replayed is refused whole, before anything is published,
with the file, the line and the reason; one that can is replayed exactly, in arrival
order. Job n of a trace workload has row n's shape (a `ShapeLaw` for
`loadgen.workload.generate`), and the rows' times are an arrival schedule
(`loadgen.arrivals.replay`).

Format: one job per line, `arrival_s,prompt_tokens,max_new_tokens`, as CSV (a header line
is optional; with one, columns may come in any order and extra columns are ignored) or as
JSON Lines (one object per line with those three keys, others ignored; recognised by a
first line that starts with `{`). Blank lines and lines starting with `#` are skipped.
Rows are replayed in arrival order (a stable sort: a file already in order plays as
written); arrival times are relative to the earliest row, so epoch timestamps work as
they are. docs/loadgen.md ("Trace files") has examples.
"""

from __future__ import annotations

import csv
import json
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path

__all__ = ["SAMPLE_TRACE", "TRACE_COLUMNS", "Trace", "TraceError", "TraceRow", "load_trace",
           "parse_trace"]

# A small trace shipped with loadgen; its header comment says how it was made.
SAMPLE_TRACE = Path(__file__).parent / "traces" / "sample.csv"
TRACE_COLUMNS = ("arrival_s", "prompt_tokens", "max_new_tokens")


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One recorded job: when it arrived and how big it was."""

    arrival_s: float  # any origin (epoch seconds work); replay is relative to the first row
    prompt_tokens: int  # >= 1
    max_new_tokens: int  # >= 0


class TraceError(ValueError):
    """A trace file that cannot be replayed; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Trace:
    """A recorded workload, replayed row by row: job n has row n's shape (in arrival order).

    Prompt bodies are not in the trace; they are drawn from the workload's seed. Lengths
    are replayed as recorded, unclipped: a prompt longer than the worker's max_seq_len
    comes back as a `too_long` error, which is what that job did in production too.
    """

    rows: tuple[TraceRow, ...]  # sorted by arrival_s
    source: str = "<trace>"  # file name, for messages

    def shape(self, n: int, rng: random.Random) -> tuple[int, int]:
        row = self.rows[n]
        return row.prompt_tokens, row.max_new_tokens

    @property
    def arrivals_s(self) -> list[float]:
        """Arrival offsets from the first row, in seconds, in replay order."""
        t0 = self.rows[0].arrival_s if self.rows else 0.0
        return [r.arrival_s - t0 for r in self.rows]

    @property
    def duration_s(self) -> float:
        return self.rows[-1].arrival_s - self.rows[0].arrival_s if self.rows else 0.0


def _trace_row(values: dict[str, object], where: str) -> TraceRow:
    def number(key: str, integer: bool) -> float:
        raw = values.get(key)
        if raw is None or raw == "":
            raise TraceError(f"{where}: missing {key}")
        try:
            x = float(raw) if not isinstance(raw, bool) else math.nan
        except (TypeError, ValueError):
            raise TraceError(f"{where}: {key} is not a number: {raw!r}") from None
        if not math.isfinite(x):
            raise TraceError(f"{where}: {key} is not a finite number: {raw!r}")
        if integer and x != int(x):
            raise TraceError(f"{where}: {key} must be a whole number of tokens, got {raw!r}")
        return x

    arrival = number("arrival_s", integer=False)
    prompt = int(number("prompt_tokens", integer=True))
    new = int(number("max_new_tokens", integer=True))
    if arrival < 0:
        raise TraceError(f"{where}: arrival_s must be >= 0, got {arrival}")
    if prompt < 1:
        raise TraceError(f"{where}: prompt_tokens must be >= 1, got {prompt}")
    if new < 0:
        raise TraceError(f"{where}: max_new_tokens must be >= 0, got {new}")
    return TraceRow(arrival, prompt, new)


def _significant(text: str) -> list[tuple[int, str]]:
    """(line number, line) for every line that is not blank or a comment."""
    return [(i, line) for i, line in enumerate(text.splitlines(), start=1)
            if line.strip() and not line.lstrip().startswith("#")]


def _parse_jsonl(lines: list[tuple[int, str]], source: str) -> list[TraceRow]:
    rows = []
    for i, line in lines:
        where = f"{source}:{i}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TraceError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise TraceError(f"{where}: expected a JSON object with {', '.join(TRACE_COLUMNS)}")
        rows.append(_trace_row(obj, where))
    return rows


def _parse_csv(lines: list[tuple[int, str]], source: str) -> list[TraceRow]:
    first = next(csv.reader([lines[0][1]]))
    try:
        float(first[0])
        columns: list[str] = list(TRACE_COLUMNS)
    except ValueError:
        columns = [c.strip() for c in first]
        missing = [c for c in TRACE_COLUMNS if c not in columns]
        if missing:
            raise TraceError(f"{source}:{lines[0][0]}: header lacks {', '.join(missing)} "
                             f"(expected {','.join(TRACE_COLUMNS)})") from None
        lines = lines[1:]
    rows = []
    for (i, line), fields in zip(lines, csv.reader(ln for _, ln in lines)):
        where = f"{source}:{i}"
        if len(fields) != len(columns):
            raise TraceError(f"{where}: expected {len(columns)} comma-separated fields "
                             f"({','.join(columns)}), got {len(fields)}: {line.strip()!r}")
        rows.append(_trace_row({c: f.strip() for c, f in zip(columns, fields)}, where))
    return rows


def parse_trace(text: str, source: str = "<trace>") -> Trace:
    """A Trace from CSV or JSON Lines text (told apart by the first significant line)."""
    lines = _significant(text)
    if not lines:
        raise TraceError(f"{source}: no rows (expected lines of {','.join(TRACE_COLUMNS)})")
    parse = _parse_jsonl if lines[0][1].lstrip().startswith("{") else _parse_csv
    rows = parse(lines, source)
    if not rows:
        raise TraceError(f"{source}: a header but no rows")
    return Trace(tuple(sorted(rows, key=lambda r: r.arrival_s)), source)


def load_trace(path: str | os.PathLike[str]) -> Trace:
    """Read and parse a trace file; errors name the file and the line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise TraceError(f"{p}: cannot read trace ({e.strerror or e})") from None
    except UnicodeDecodeError:
        raise TraceError(f"{p}: not a UTF-8 text file") from None
    return parse_trace(text, str(p))
