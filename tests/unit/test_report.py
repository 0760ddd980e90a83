"""Report arithmetic on a hand-built ledger: no NATS, no schemas, exact numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loadgen.ledger import Outcome, RunStats
from loadgen.report import build_report, format_report, percentile, write_report


def outcome(
    job_id: str,
    *,
    ok: bool = True,
    prompt: int = 10,
    completion: int = 5,
    padded: int = 20,
    total_ms: float | None = 100.0,
    first_token_ms: float | None = 10.0,
    code: str | None = None,
    finish: str = "length",
) -> Outcome:
    return Outcome(
        id=job_id,
        ok=ok,
        finish_reason=finish if ok else "error",
        error_code=None if ok else code,
        prompt_tokens=prompt,
        completion_tokens=completion,
        padded_tokens=padded,
        worker_total_ms=total_ms,
        first_token_ms=first_token_ms,
        worker="w0",
        attempt=1,
    )


def ledger(n: int) -> RunStats:
    stats = RunStats(run_id="r", job_ids=[f"r-{i}" for i in range(n)])
    for i in range(n):
        stats.record_sent(f"r-{i}", 100.0)
        stats.acked.add(f"r-{i}")
    return stats


def test_percentile_interpolates_linearly() -> None:
    assert percentile([1, 2, 3, 4], 0.5) == 2.5
    assert percentile([4, 1, 3, 2], 0.0) == 1
    assert percentile([4, 1, 3, 2], 1.0) == 4
    assert percentile(list(range(101)), 0.9) == pytest.approx(90.0)
    assert percentile(list(range(101)), 0.99) == pytest.approx(99.0)
    assert percentile([7.0], 0.99) == 7.0
    assert percentile([], 0.5) is None
    with pytest.raises(ValueError):
        percentile([1], 1.5)


def test_throughput_and_padding_count_ok_results_once() -> None:
    stats = ledger(4)
    # Two ok jobs finish at +1 s and +2 s; one errors; one never answers.
    assert stats.record_outcome(outcome("r-0", prompt=30, completion=10, padded=50), 101.0)
    assert stats.record_outcome(outcome("r-1", prompt=50, completion=10, padded=90), 102.0)
    assert stats.record_outcome(outcome("r-2", ok=False, code="too_long", padded=999), 100.5)
    # A duplicate of r-0 with different numbers must change nothing but the count.
    assert not stats.record_outcome(outcome("r-0", prompt=999, completion=999), 103.0)

    r = build_report(stats)
    assert r["jobs_total"] == 4
    assert r["jobs_published"] == 4
    assert (r["jobs_ok"], r["jobs_error"], r["jobs_missing"]) == (2, 1, 1)
    assert r["duplicates"] == 1
    assert r["errors_by_code"] == {"too_long": 1}
    assert r["wall_s"] == pytest.approx(2.0)  # first publish 100.0 -> last result 102.0
    assert r["jobs_per_s"] == pytest.approx(1.0)
    assert (r["prompt_tokens"], r["completion_tokens"], r["padded_tokens"]) == (80, 20, 140)
    assert r["useful_tokens_per_s"] == pytest.approx(50.0)
    assert r["padding_fraction"] == pytest.approx(1 - 100 / 140)
    # End-to-end latency is arrival minus publish, ok jobs only: 1000 and 2000 ms.
    assert r["latency_ms"]["p50"] == pytest.approx(1500.0)
    assert r["latency_ms"]["p99"] == pytest.approx(1990.0)


def test_worker_latency_and_ttft_skip_missing_values() -> None:
    stats = ledger(3)
    stats.record_outcome(outcome("r-0", total_ms=10.0, first_token_ms=None), 101.0)
    stats.record_outcome(outcome("r-1", total_ms=20.0, first_token_ms=4.0), 101.0)
    stats.record_outcome(outcome("r-2", total_ms=30.0, first_token_ms=6.0), 101.0)
    r = build_report(stats)
    assert r["worker_latency_ms"]["p50"] == pytest.approx(20.0)
    assert r["ttft_ms"]["p50"] == pytest.approx(5.0)


def test_no_padded_tokens_means_zero_padding_fraction() -> None:
    stats = ledger(1)
    stats.record_outcome(outcome("r-0", padded=0), 101.0)
    assert build_report(stats)["padding_fraction"] == 0.0


def test_an_empty_run_reports_zeros_and_nones() -> None:
    stats = ledger(2)
    stats.timed_out = True
    r = build_report(stats)
    assert r["jobs_missing"] == 2
    assert r["wall_s"] == 0.0 and r["jobs_per_s"] == 0.0 and r["useful_tokens_per_s"] == 0.0
    assert r["latency_ms"] == {"p50": None, "p90": None, "p99": None}
    assert "timed out" in format_report(r)


def test_strays_and_expired_without_code() -> None:
    stats = ledger(1)
    assert not stats.record_outcome(outcome("other-run-0"), 101.0)
    expired = outcome("r-0", ok=False, code=None)
    expired.finish_reason = "expired"
    stats.record_outcome(expired, 101.0)
    r = build_report(stats)
    assert r["strays"] == 1
    assert r["errors_by_code"] == {"expired": 1}


def test_write_report_round_trips_json(tmp_path: Path) -> None:
    stats = ledger(1)
    stats.record_outcome(outcome("r-0"), 100.25)
    r = build_report(stats)
    path = write_report(r, tmp_path / "sub" / "report.json")
    assert json.loads(path.read_text()) == r
    table = format_report(r)
    assert "useful tokens/s" in table and "1 ok / 0 error / 0 missing of 1" in table
