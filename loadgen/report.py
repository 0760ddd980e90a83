"""The report of one run: throughput, padding and latency from a RunStats ledger.

Rule: throughput and latency count only ok Results -- an error answered in a
millisecond is not work done -- and each job counts once (the ledger already dropped
duplicates). Useful tokens are real prompt plus generated tokens; padding the worker
paid for shows up only in `padding_fraction`. Wall time runs from the first publish
to the last Result, so it includes the broker and the queueing a producer sees.

Percentiles interpolate linearly between order statistics (numpy's default), so
p50 of [1, 2, 3, 4] is 2.5; an empty sample gives None rather than a made-up zero.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from loadgen.ledger import RunStats

__all__ = ["build_report", "format_report", "percentile", "percentiles", "write_report"]

_QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-quantile (0 <= q <= 1) of values, linearly interpolated; None if empty."""
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q}")
    if not values:
        return None
    ordered = sorted(values)
    pos = q * (len(ordered) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def percentiles(values: Sequence[float]) -> dict[str, float | None]:
    return {name: percentile(values, q) for name, q in _QUANTILES.items()}


def build_report(stats: RunStats) -> dict[str, Any]:
    """A JSON-ready dict; keys are stable, tests and dashboards read them."""
    ok = [o for o in stats.outcomes.values() if o.ok]
    failed = [o for o in stats.outcomes.values() if not o.ok]

    first, last = stats.first_sent_s, stats.last_arrived_s
    wall_s = (last - first) if first is not None and last is not None else 0.0

    prompt_tokens = sum(o.prompt_tokens for o in ok)
    completion_tokens = sum(o.completion_tokens for o in ok)
    padded_tokens = sum(o.padded_tokens for o in ok)
    useful = prompt_tokens + completion_tokens
    padding_fraction = 1.0 - useful / padded_tokens if padded_tokens > 0 else 0.0

    e2e_ms = [
        (stats.arrived_s[o.id] - stats.sent_s[o.id]) * 1e3 for o in ok if o.id in stats.sent_s
    ]
    worker_ms = [o.worker_total_ms for o in ok if o.worker_total_ms is not None]
    ttft_ms = [o.first_token_ms for o in ok if o.first_token_ms is not None]

    # An expired Result may carry no error body; its finish reason is then its code.
    errors_by_code = Counter(o.error_code or o.finish_reason for o in failed)

    def per_s(x: float) -> float:
        return x / wall_s if wall_s > 0 else 0.0

    return {
        "run_id": stats.run_id,
        "jobs_total": len(stats.job_ids),
        "jobs_published": len(stats.acked),
        "publish_errors": len(stats.publish_errors),
        # One message is enough to tell "no stream" from "broker overloaded".
        "publish_error_sample": next(iter(stats.publish_errors.values()), None),
        "jobs_ok": len(ok),
        "jobs_error": len(failed),
        "jobs_missing": len(stats.job_ids) - len(stats.outcomes),
        "duplicates": stats.duplicates,
        "strays": stats.strays,
        "undecodable": stats.undecodable,
        "timed_out": stats.timed_out,
        "errors_by_code": dict(sorted(errors_by_code.items())),
        "wall_s": wall_s,
        "jobs_per_s": per_s(len(ok)),
        "useful_tokens_per_s": per_s(useful),
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "padded_tokens": padded_tokens,
        "padding_fraction": padding_fraction,
        "latency_ms": percentiles(e2e_ms),
        "worker_latency_ms": percentiles(worker_ms),
        "ttft_ms": percentiles(ttft_ms),
        "workers": dict(sorted(Counter(o.worker for o in ok).items())),
    }


def write_report(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write the report as indented JSON, creating parent dirs; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    return out


def format_report(report: dict[str, Any]) -> str:
    """A console table for people; JSON is for machines."""

    def num(x: float | None, fmt: str = ".1f") -> str:
        return "-" if x is None else format(x, fmt)

    def pcts(d: dict[str, float | None]) -> str:
        return "  ".join(f"{k} {num(v)}" for k, v in d.items())

    rows = [
        ("run", report["run_id"]),
        ("jobs", f"{report['jobs_ok']} ok / {report['jobs_error']} error / "
                 f"{report['jobs_missing']} missing of {report['jobs_total']} "
                 f"({report['jobs_published']} published)"),
        ("duplicates", str(report["duplicates"])),
        ("errors by code",
         ", ".join(f"{k}={v}" for k, v in report["errors_by_code"].items()) or "-"),
        ("wall", f"{num(report['wall_s'], '.2f')} s"),
        ("jobs/s", num(report["jobs_per_s"], ".2f")),
        ("useful tokens/s", num(report["useful_tokens_per_s"])),
        ("tokens", f"{report['prompt_tokens']} prompt + {report['completion_tokens']} completion"),
        ("padding fraction", num(report["padding_fraction"], ".3f")),
        ("latency ms (e2e)", pcts(report["latency_ms"])),
        ("latency ms (worker)", pcts(report["worker_latency_ms"])),
        ("ttft ms (worker)", pcts(report["ttft_ms"])),
    ]
    if report["publish_errors"] or report["strays"] or report["undecodable"]:
        rows.append(("anomalies", f"publish_errors={report['publish_errors']} "
                                  f"strays={report['strays']} undecodable={report['undecodable']}"))
    if report["publish_error_sample"]:
        rows.append(("publish error", report["publish_error_sample"]))
    if report["timed_out"]:
        rows.append(("timed out", "yes: the deadline passed before every job answered"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
