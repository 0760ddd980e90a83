"""The report of one run: throughput, padding and latency from a RunStats ledger.

Rule: throughput and latency count only ok Results -- an error answered in a
millisecond is not work done -- and each job counts once (the ledger already dropped
duplicates). Useful tokens are real prompt plus generated tokens; padding the worker
paid for shows up only in `padding_fraction`. Wall time runs from the first publish
to the last Result, so it includes the broker and the queueing a producer sees.

Budget occupancy and the worker's own padding figures are not in the Results: they come
from the worker's Prometheus endpoint (`loadgen.scrape`), passed in as `worker_metrics`,
and are None when nobody scraped. `padding_fraction` here is the Results' own
(usage.padded_tokens), which every run has.

A cancelled Result (error code `cancelled`) is the answer to a cancel, not a failure: it
counts in `jobs_cancelled`, not in `jobs_error` or `errors_by_code`, and, like an error,
not as work done. The cancels the run sent are in its `arrival` description.

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

__all__ = ["build_report", "format_report", "percentile", "percentiles", "window_rate",
           "write_report"]

_QUANTILES = {"p50": 0.50, "p90": 0.90, "p99": 0.99}
_CANCELLED = "cancelled"  # schemas.ErrorCode.CANCELLED; the report does not import the wire


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


def build_report(stats: RunStats, worker_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
    """A JSON-ready dict; keys are stable, tests and dashboards read them.
    `worker_metrics` is `loadgen.scrape.summarize()`'s block, when the run was scraped."""
    ok = [o for o in stats.outcomes.values() if o.ok]
    cancelled = [o for o in stats.outcomes.values() if o.error_code == _CANCELLED]
    failed = [o for o in stats.outcomes.values() if not o.ok and o.error_code != _CANCELLED]
    cancels = stats.arrival.get("cancels") or {}

    first, last = stats.first_sent_s, stats.last_arrived_s
    wall_s = (last - first) if first is not None and last is not None else 0.0

    prompt_tokens = sum(o.prompt_tokens for o in ok)
    completion_tokens = sum(o.completion_tokens for o in ok)
    padded_tokens = sum(o.padded_tokens for o in ok)
    cached_tokens = sum(o.cached_tokens for o in ok)
    useful = prompt_tokens + completion_tokens
    # Padding against the tokens the workers had to compute (a cached prefix is not).
    computed = useful - cached_tokens
    padding_fraction = max(0.0, 1.0 - computed / padded_tokens) if padded_tokens > 0 else 0.0

    e2e_ms = [
        (stats.arrived_s[o.id] - stats.sent_s[o.id]) * 1e3 for o in ok if o.id in stats.sent_s
    ]
    worker_ms = [o.worker_total_ms for o in ok if o.worker_total_ms is not None]
    ttft_ms = [o.first_token_ms for o in ok if o.first_token_ms is not None]

    # An expired Result may carry no error body; its finish reason is then its code.
    errors_by_code = Counter(o.error_code or o.finish_reason for o in failed)

    def per_s(x: float) -> float:
        return x / wall_s if wall_s > 0 else 0.0

    lag_ms = [x * 1e3 for x in stats.lag_s]
    return {
        "run_id": stats.run_id,
        "arrival": dict(stats.arrival),
        "jobs_total": len(stats.job_ids),
        "jobs_sent": len(stats.sent_s),
        "jobs_published": len(stats.acked),
        "publish_errors": len(stats.publish_errors),
        # One message is enough to tell "no stream" from "broker overloaded".
        "publish_error_sample": next(iter(stats.publish_errors.values()), None),
        "jobs_ok": len(ok),
        "jobs_error": len(failed),
        "jobs_cancelled": len(cancelled),
        # Job ids named in the cancel messages the run sent, and how many messages.
        "cancels_sent": cancels.get("ids_sent", 0),
        "cancel_messages": cancels.get("messages", 0),
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
        "cached_tokens": cached_tokens,
        # Prompt tokens served from the workers' prefix caches, of all prompt tokens.
        "cache_hit_fraction": cached_tokens / prompt_tokens if prompt_tokens else 0.0,
        "latency_ms": percentiles(e2e_ms),
        "worker_latency_ms": percentiles(worker_ms),
        "ttft_ms": percentiles(ttft_ms),
        "workers": dict(sorted(Counter(o.worker for o in ok).items())),
        # When each worker answered its last job, seconds from the first send: in a fleet,
        # a worker done well before the wall has idled at the end (its share was smaller).
        "worker_done_s": {w: round(max(stats.arrived_s[o.id] for o in ok if o.worker == w)
                                   - first, 3)
                          for w in sorted({o.worker for o in ok})} if first is not None else {},
        "max_in_flight": stats.max_in_flight,
        # Scheduled arrivals only: how late the producer itself published.
        "arrival_lag_ms": ({**percentiles(lag_ms), "max": max(lag_ms)} if lag_ms else None),
        "budget_occupancy_while_queued": (
            worker_metrics["budget_occupancy_while_queued"] if worker_metrics else None),
        "worker_metrics": worker_metrics,
    }


def window_rate(stats: RunStats, start_s: float, end_s: float) -> dict[str, float]:
    """Throughput over the ok Results that arrived between `start_s` and `end_s` seconds
    after the first publish: a sustained rate, free of a finite run's ramp (the first
    admissions) and tail (the last jobs finishing while the rest of the fleet idles)."""
    first = stats.first_sent_s
    span = end_s - start_s
    if first is None or span <= 0:
        raise ValueError(f"window {start_s}..{end_s} s of a run that sent nothing or is empty")
    ok = [o for o in stats.outcomes.values()
          if o.ok and start_s <= stats.arrived_s[o.id] - first < end_s]
    return {"start_s": start_s, "end_s": end_s, "jobs": len(ok), "jobs_per_s": len(ok) / span,
            "useful_tokens_per_s": sum(o.prompt_tokens + o.completion_tokens for o in ok) / span}


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

    cancelled = (f"{report['jobs_cancelled']} cancelled / " if report.get("jobs_cancelled")
                 else "")
    rows = [
        ("run", report["run_id"]),
        ("arrival", _arrival(report.get("arrival") or {})),
        ("jobs", f"{report['jobs_ok']} ok / {report['jobs_error']} error / {cancelled}"
                 f"{report['jobs_missing']} missing of {report['jobs_total']} "
                 f"({report['jobs_published']} published)"),
        ("duplicates", str(report["duplicates"])),
        ("errors by code",
         ", ".join(f"{k}={v}" for k, v in report["errors_by_code"].items()) or "-"),
        ("wall", f"{num(report['wall_s'], '.2f')} s"),
        ("jobs/s", num(report["jobs_per_s"], ".2f")),
        ("useful tokens/s", num(report["useful_tokens_per_s"])),
        ("tokens", f"{report['prompt_tokens']} prompt + {report['completion_tokens']} completion"),
        ("padding fraction", f"{num(report['padding_fraction'], '.3f')} (Results)"),
        ("prompt from cache", f"{num(report.get('cache_hit_fraction', 0.0), '.3f')} "
                              f"({report.get('cached_tokens', 0)} tokens)"),
        ("latency ms (e2e)", pcts(report["latency_ms"])),
        ("latency ms (worker)", pcts(report["worker_latency_ms"])),
        ("ttft ms (worker)", pcts(report["ttft_ms"])),
        ("in flight (max)", str(report.get("max_in_flight", "-"))),
    ]
    if report.get("cancels_sent") or report.get("jobs_cancelled"):
        messages = report.get("cancel_messages", 0)
        rows.append(("cancels", f"{report.get('cancels_sent', 0)} ids sent in {messages} "
                                f"message{'' if messages == 1 else 's'}; "
                                f"{report['jobs_cancelled']} jobs answered cancelled"))
    if report.get("arrival_lag_ms"):
        rows.append(("arrival lag ms", pcts(report["arrival_lag_ms"])))
    wm = report.get("worker_metrics")
    if wm:
        rows += _worker_rows(wm, num)
    if report["publish_errors"] or report["strays"] or report["undecodable"]:
        rows.append(("anomalies", f"publish_errors={report['publish_errors']} "
                                  f"strays={report['strays']} undecodable={report['undecodable']}"))
    if report["publish_error_sample"]:
        rows.append(("publish error", report["publish_error_sample"]))
    if report["timed_out"]:
        rows.append(("timed out", "yes: the deadline passed before every job answered"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _arrival(a: dict[str, Any]) -> str:
    process = a.get("process")
    if process == "closed":
        return f"closed loop, {a['concurrency']} outstanding"
    if process in ("open", "trace"):
        what = (f"open loop, Poisson {a['rate_per_s']:g} jobs/s (seed {a['seed']})"
                if process == "open" else f"trace replay x{a['speed']:g}")
        offered = a.get("offered_jobs_per_s")
        return (f"{what}, {a['schedule_s']:.1f} s schedule"
                + (f", {offered:.2f} jobs/s offered" if offered else ""))
    return "burst (all at once)" if process == "burst" else "-"


def _worker_rows(wm: dict[str, Any], num: Any) -> list[tuple[str, str]]:
    def kinds(d: dict[str, float | None]) -> str:
        return ", ".join(f"{k} {num(v, '.3f')}" for k, v in sorted(d.items())) or "-"

    rows = [
        ("budget occupancy", f"{num(wm['budget_occupancy_while_queued'], '.3f')} mean while "
                             f"queued ({wm['samples_while_queued']} of {wm['samples']} samples; "
                             f"{num(wm['budget_occupancy_mean'], '.3f')} over all)"),
        ("padding (worker)", f"{kinds(wm['padding_fraction_during_run'])} this run; "
                             f"{kinds(wm['padding_fraction_at_end'])} since start"),
        ("scraped", ", ".join(wm["urls"])),
    ]
    if wm["scrape_errors"]:
        rows.append(("scrape errors", f"{wm['scrape_errors']}: {wm['scrape_error_sample']}"))
    return rows
