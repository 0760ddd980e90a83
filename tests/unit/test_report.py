"""Report arithmetic on a hand-built ledger and hand-written scrapes: no NATS, no schemas,
no HTTP, exact numbers."""

from __future__ import annotations

import json
import math
import time
import urllib.error
from pathlib import Path

import pytest

from loadgen.ledger import Outcome, RunStats
from loadgen.report import build_report, format_report, percentile, window_rate, write_report
from loadgen.scrape import Scraper, parse, summarize


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


def test_window_rate_counts_ok_results_arriving_inside_the_window() -> None:
    stats = ledger(6)
    # Sent at 100.0; answers at +0.5 (ramp), +1.0, +2.5 (in [1, 3)), +3.0 (end excluded),
    # an error at +2.0 and a duplicate of r-1 at +2.0, which count for nothing.
    for i, (at, prompt) in enumerate([(100.5, 7), (101.0, 10), (102.5, 20), (103.0, 40)]):
        stats.record_outcome(outcome(f"r-{i}", prompt=prompt, completion=5), at)
    stats.record_outcome(outcome("r-4", ok=False, code="too_long"), 102.0)
    stats.record_outcome(outcome("r-1", prompt=999), 102.0)
    w = window_rate(stats, 1.0, 3.0)
    assert (w["jobs"], w["jobs_per_s"]) == (2, 1.0)
    assert w["useful_tokens_per_s"] == pytest.approx((10 + 5 + 20 + 5) / 2.0)
    with pytest.raises(ValueError):
        window_rate(stats, 3.0, 3.0)
    with pytest.raises(ValueError):
        window_rate(RunStats(run_id="r", job_ids=[]), 0.0, 1.0)


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


def test_cancelled_results_are_counted_apart_from_errors() -> None:
    stats = ledger(5)
    stats.arrival = {"process": "burst",
                     "cancels": {"subject": "fabric.cancel", "jobs": 3, "ids_sent": 3,
                                 "messages": 2}}
    stats.record_outcome(outcome("r-0"), 101.0)
    stats.record_outcome(outcome("r-1", ok=False, code="cancelled", completion=3), 100.5)
    stats.record_outcome(outcome("r-2", ok=False, code="cancelled"), 100.5)
    stats.record_outcome(outcome("r-3", ok=False, code="too_long"), 100.5)
    r = build_report(stats)
    assert (r["jobs_ok"], r["jobs_error"], r["jobs_cancelled"], r["jobs_missing"]) == (1, 1, 2, 1)
    assert r["errors_by_code"] == {"too_long": 1}
    assert (r["cancels_sent"], r["cancel_messages"]) == (3, 2)
    assert r["completion_tokens"] == 5  # a cancelled job's tokens are not work done
    table = format_report(r)
    assert "1 ok / 1 error / 2 cancelled / 1 missing of 5" in table
    assert "3 ids sent in 2 messages; 2 jobs answered cancelled" in table


def test_the_verdict_accepts_only_the_cancels_the_run_sent() -> None:
    from loadgen.cli import _verdict

    stats = ledger(3)
    stats.record_outcome(outcome("r-0"), 101.0)
    stats.record_outcome(outcome("r-1", ok=False, code="cancelled"), 101.0)
    stats.record_outcome(outcome("r-2", ok=False, code="cancelled"), 101.0)
    assert _verdict(build_report(stats)) == 1  # cancelled, but not by this run
    stats.arrival = {"cancels": {"subject": "fabric.cancel", "jobs": 2, "ids_sent": 2,
                                 "messages": 1}}
    assert _verdict(build_report(stats)) == 0
    stats.outcomes["r-0"].ok, stats.outcomes["r-0"].error_code = False, "too_long"
    assert _verdict(build_report(stats)) == 1


# -- arrivals in the report ----------------------------------------------------------------


def test_arrival_lag_in_flight_and_sent_are_reported() -> None:
    stats = ledger(3)
    stats.job_ids.append("r-3")  # never sent: the run ended first
    stats.arrival = {"process": "open", "rate_per_s": 5.0, "seed": 0, "schedule_s": 0.4,
                     "offered_jobs_per_s": 5.0}
    stats.lag_s = [0.001, 0.002, 0.010]
    stats.max_in_flight = 2
    r = build_report(stats)
    assert r["jobs_sent"] == 3 and r["max_in_flight"] == 2
    assert r["arrival"]["process"] == "open"
    assert r["arrival_lag_ms"]["p50"] == pytest.approx(2.0)
    assert r["arrival_lag_ms"]["max"] == pytest.approx(10.0)
    table = format_report(r)
    assert "open loop, Poisson 5 jobs/s (seed 0), 0.4 s schedule, 5.00 jobs/s offered" in table
    assert "arrival lag ms" in table


@pytest.mark.parametrize("arrival, text", [
    ({"process": "burst"}, "burst (all at once)"),
    ({"process": "closed", "concurrency": 8}, "closed loop, 8 outstanding"),
    ({"process": "trace", "speed": 2.0, "schedule_s": 15.0, "offered_jobs_per_s": 10.0},
     "trace replay x2, 15.0 s schedule, 10.00 jobs/s offered"),
    ({}, "\narrival              -\n"),  # a ledger no client filled in
])
def test_each_arrival_process_reads_in_the_table(arrival: dict, text: str) -> None:
    stats = ledger(1)
    stats.arrival = arrival
    assert text in format_report(build_report(stats))


def test_a_report_without_scraping_says_so() -> None:
    r = build_report(ledger(1))
    assert r["worker_metrics"] is None and r["budget_occupancy_while_queued"] is None
    assert r["arrival_lag_ms"] is None
    assert "budget occupancy" not in format_report(r)


# -- the worker's metrics ------------------------------------------------------------------

EXPOSITION = """\
# HELP fabric_budget_occupancy In-flight padded tokens over the budget.
# TYPE fabric_budget_occupancy gauge
fabric_budget_occupancy {occ}
# HELP fabric_budget_occupancy_while_queued Time-weighted.
# TYPE fabric_budget_occupancy_while_queued gauge
fabric_budget_occupancy_while_queued 0.5
# HELP fabric_queue_depth Jobs waiting in each bounded stage.
# TYPE fabric_queue_depth gauge
fabric_queue_depth{{stage="pending"}} {pending}
fabric_queue_depth{{stage="executor_waiting"}} 7.0
# HELP fabric_useful_tokens_total Prompt + generated tokens of jobs answered ok.
# TYPE fabric_useful_tokens_total counter
fabric_useful_tokens_total {useful}
# HELP fabric_computed_tokens_total Token rows, padding included.
# TYPE fabric_computed_tokens_total counter
fabric_computed_tokens_total {computed}
# HELP fabric_attention_real_pairs_total Pairs needed.
# TYPE fabric_attention_real_pairs_total counter
fabric_attention_real_pairs_total 300.0
# HELP fabric_attention_computed_pairs_total Pairs computed.
# TYPE fabric_attention_computed_pairs_total counter
fabric_attention_computed_pairs_total 400.0
# HELP fabric_padding_fraction Share of computed work that was padding since start.
# TYPE fabric_padding_fraction gauge
fabric_padding_fraction{{kind="compute"}} {pad}
fabric_padding_fraction{{kind="attention"}} 0.25
# HELP fabric_step_seconds Wall time of one executor step, by phase.
# TYPE fabric_step_seconds histogram
fabric_step_seconds_bucket{{le="0.01",phase="decode"}} 3.0
fabric_step_seconds_bucket{{le="+Inf",phase="decode"}} 4.0
fabric_step_seconds_count{{phase="decode"}} 4.0
fabric_step_seconds_sum{{phase="decode"}} 0.1
"""


def exposition(occ: float = 0.0, pending: int = 0, useful: float = 0.0,
               computed: float = 0.0, pad: float = 0.0) -> str:
    return EXPOSITION.format(occ=occ, pending=pending, useful=useful, computed=computed,
                             pad=pad)


def test_parse_takes_the_series_the_report_needs() -> None:
    s = parse(exposition(occ=0.75, pending=3, useful=900, computed=1000, pad=0.1), at_s=5.0)
    assert (s.at_s, s.occupancy, s.pending) == (5.0, 0.75, 3.0)
    assert s.padding == {"compute": 0.1, "attention": 0.25}
    assert s.counters == {
        "fabric_useful_tokens_total": 900.0, "fabric_computed_tokens_total": 1000.0,
        "fabric_attention_real_pairs_total": 300.0, "fabric_attention_computed_pairs_total": 400.0}
    empty = parse("# nothing here\n")
    assert empty.occupancy is None and empty.pending is None and not empty.counters


def test_occupancy_is_the_mean_over_samples_while_jobs_were_pending() -> None:
    run = [parse(exposition(occ=0.1, pending=0, useful=500, computed=1000)),  # baseline
           parse(exposition(occ=0.9, pending=4, useful=600, computed=1100)),
           parse(exposition(occ=0.7, pending=1, useful=800, computed=1400)),
           parse(exposition(occ=0.3, pending=0, useful=900, computed=1500))]  # the end
    m = summarize({"http://w0/metrics": run})
    assert (m["samples"], m["samples_while_queued"]) == (4, 2)
    assert m["budget_occupancy_while_queued"] == pytest.approx(0.8)
    assert m["budget_occupancy_mean"] == pytest.approx(0.5)
    # This run's padding: 400 useful of 500 computed since the baseline, not the 900 of
    # 1500 since the worker started (which the gauge at the end reports).
    assert m["padding_fraction_during_run"]["compute"] == pytest.approx(0.2)
    assert m["padding_fraction_during_run"]["attention"] is None  # no attention work ran
    assert m["padding_fraction_at_end"] == {"compute": 0.0, "attention": 0.25}
    assert m["per_worker"]["http://w0/metrics"]["samples_while_queued"] == 2


def test_no_queued_samples_means_no_occupancy_verdict() -> None:
    m = summarize({"u": [parse(exposition(occ=0.2)), parse(exposition(occ=0.4))]})
    assert m["budget_occupancy_while_queued"] is None
    assert m["budget_occupancy_mean"] == pytest.approx(0.3)


def test_a_restarted_worker_counts_from_zero() -> None:
    m = summarize({"u": [parse(exposition(useful=5000, computed=9000)),
                         parse(exposition(useful=80, computed=100))]})
    assert m["padding_fraction_during_run"]["compute"] == pytest.approx(0.2)


def test_several_workers_pool_their_samples_and_counters() -> None:
    m = summarize({
        "a": [parse(exposition(useful=0, computed=0)),
              parse(exposition(occ=1.0, pending=1, useful=100, computed=100))],
        "b": [parse(exposition(useful=0, computed=0)),
              parse(exposition(occ=0.5, pending=2, useful=100, computed=300)),
              parse(exposition(occ=0.0, pending=0, useful=100, computed=300))],
        "c": [],  # never answered
    }, errors={"c": 3}, last_error={"c": "URLError: refused"})
    assert m["samples_while_queued"] == 2
    assert m["budget_occupancy_while_queued"] == pytest.approx(0.75)
    assert m["padding_fraction_during_run"]["compute"] == pytest.approx(1 - 200 / 400)
    assert m["scrape_errors"] == 3 and m["scrape_error_sample"] == "URLError: refused"
    assert m["per_worker"]["c"]["budget_occupancy_while_queued"] is None


def test_scraper_takes_a_baseline_samples_and_a_last_scrape() -> None:
    bodies = iter([exposition(occ=x / 10, pending=1) for x in range(1000)])
    fails = {"n": 0}

    def fetch(url: str, timeout_s: float) -> str:
        if url.endswith("down"):
            fails["n"] += 1
            raise urllib.error.URLError("connection refused")
        return next(bodies)

    scraper = Scraper(["http://w/metrics", "http://w/down", "http://w/metrics"],
                      period_s=0.01, fetch=fetch)
    assert scraper.urls == ["http://w/metrics", "http://w/down"]  # each once
    with scraper:
        assert len(scraper.scrapes["http://w/metrics"]) == 1  # the baseline, at start
        time.sleep(0.2)
    got = scraper.scrapes["http://w/metrics"]
    assert 5 <= len(got) <= 30
    assert [s.occupancy for s in got] == pytest.approx([x / 10 for x in range(len(got))])
    summary = scraper.summary()
    assert summary["scrape_errors"] == fails["n"] == len(got)
    assert "connection refused" in summary["scrape_error_sample"]
    with pytest.raises(ValueError):
        Scraper(["u"], period_s=0)


def test_worker_metrics_in_the_report_and_the_table() -> None:
    wm = summarize({"http://w0:9400/metrics": [
        parse(exposition(useful=0, computed=0)),
        parse(exposition(occ=0.9, pending=2, useful=90, computed=100, pad=0.1))]})
    stats = ledger(1)
    stats.record_outcome(outcome("r-0"), 101.0)
    r = build_report(stats, wm)
    assert r["budget_occupancy_while_queued"] == pytest.approx(0.9)
    assert r["worker_metrics"]["padding_fraction_during_run"]["compute"] == pytest.approx(0.1)
    json.dumps(r)  # JSON-ready
    table = format_report(r)
    assert "0.900 mean while queued (1 of 2 samples; 0.450 over all)" in table
    assert "compute 0.100 this run" in table and "http://w0:9400/metrics" in table


def test_soak_growth_reads_a_leak_a_flat_line_and_a_swing() -> None:
    from loadgen.soak import growth

    mib = 2**20
    flat = [(t, 400 * mib) for t in range(0, 1800, 5)]
    g = growth(flat, 120, 120)
    assert g["growth_fraction"] == 0 and abs(g["trend_fraction"]) < 1e-9
    leak = [(t, int((400 + t / 60) * mib)) for t in range(0, 1800, 5)]  # +1 MiB a minute
    g = growth(leak, 120, 120)
    assert 0.06 < g["trend_fraction"] < 0.07 and 0.06 < g["growth_fraction"] < 0.07
    assert g["second_half_max_mib"] > g["first_half_max_mib"]
    # A swing of +-30 MiB around a flat 400 (the allocator giving pages back and taking
    # them again) whose first window after warm-up is a trough and last one a crest: the
    # window medians read +11 %, the fitted trend and the half peaks see no growth.
    swing = [(t, int((400 - 30 * math.cos(2 * math.pi * (t - 120) / 480)) * mib))
             for t in range(0, 1800, 5)]
    g = growth(swing, 120, 120)
    assert g["growth_fraction"] > 0.1
    assert abs(g["trend_fraction"]) < 0.01
    assert round(g["first_half_max_mib"]) == round(g["second_half_max_mib"]) == 430


def test_the_unbounded_hit_rate_counts_what_a_cache_that_never_evicts_would_serve() -> None:
    """Leading full blocks known from an earlier job's prompt, or an answered job's prompt
    and reply but its newest token; never the whole prompt (its last token is computed)."""
    from loadgen.agentbench import unbounded_hit_fraction

    first = list(range(40))  # 2 full blocks of 16
    reply = list(range(100, 124))  # prompt + reply = 64 tokens: the newest not yet written
    turn2 = first + reply + [7] * 10  # 74 tokens: blocks 0-2 known (48), the 4th was not
    log = [("sent", first), ("done", first + reply), ("sent", turn2), ("sent", first[:32])]
    # first: 0 of 40; turn2: 48 of 74; first[:32]: both blocks known, but 31 at most.
    assert unbounded_hit_fraction(log, 16) == pytest.approx((48 + 31) / (40 + 74 + 32))
    assert unbounded_hit_fraction([], 16) == 0.0


def test_the_agent_table_with_the_host_tier_reports_hits_by_tier_and_copies_by_when() -> None:
    from loadgen.agentbench import markdown

    def run(tps: float, host: int, ahead: int) -> dict:
        return {"useful_tokens_per_s": tps, "jobs_per_s": 1.0, "cache_hit_fraction": 0.9,
                "unbounded_hit_fraction": 0.95, "kv_blocks": 768, "kv_budget_blocks": 512,
                "rss_mib": 900, "latency_ms": {"p50": 10, "p99": 20},
                "kv": {"hits": 900, "host_hits": host, "written_ahead": ahead,
                       "spilled_at_eviction": 3, "evictions": 400, "host_blocks": host and 8192}}

    a = {"spec": {"sessions": 32, "turns": 12, "system_prompts": 2, "system_tokens": [100, 200]},
         "cache": run(2000.0, 300, 390), "no_tier": run(1600.0, 0, 0), "ratio": 1.25}
    md = "\n".join(markdown(a))
    assert "Host tier on over off: 1.25x" in md and "Prefix caching" not in md
    assert "| cache | 900 | 300 | 390 | 3 | 400 | 8192 |" in md and "| no tier |" in md


def test_the_agent_table_reports_the_fleet_and_the_kill() -> None:
    from loadgen.agentbench import markdown

    def run(tps: float, hit: float = 0.9, **kw) -> dict:
        return {"useful_tokens_per_s": tps, "jobs_per_s": 1.0, "cache_hit_fraction": hit,
                "unbounded_hit_fraction": 0.95, "kv_blocks": 768, "kv_budget_blocks": 512,
                "rss_mib": 900, "latency_ms": {"p50": 10, "p99": 20}, **kw}

    a = {"spec": {"sessions": 32, "turns": 12, "system_prompts": 2, "system_tokens": [100, 200]},
         "cache": run(2000.0), "no_cache": run(1000.0, 0.0), "ratio": 2.0,
         "one_core": run(1000.0), "two_workers": run(1700.0, 0.88),
         "two_workers_anonymous": run(1500.0, 0.8),
         "two_workers_kill9": run(1200.0, jobs=384, jobs_ok=384, killed_after_s=6.04,
                                  results_stored=384, duplicates_on_reply_subject=3,
                                  redelivered=11),
         "fleet_ratio": 1.7, "fleet_hit_ratio": 0.88 / 0.9}
    md = "\n".join(markdown(a))
    assert "| two workers kill9 | 1,200 |" in md
    assert "over one one-core worker with their pools together: 1.70x" in md
    assert ("one killed with SIGKILL after 6.0 s: 384 of 384 jobs answered ok, 384 Results "
            "kept by the results stream, 11 jobs redelivered to the survivor (3 answered twice")\
        in md
