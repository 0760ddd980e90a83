"""The worker's histograms: observed where their values are born, in O(1), by one writer each.

Rule: a histogram on a hot path costs one bisect and two additions per observation, no lock
and no allocation: per step on the executor thread, per Result on the event loop
(`Distributions`, owned by `WorkerStats`). A scrape copies the counts, so it is at most one
observation stale. `worker.ops.metrics` registers them beside the levels it reads.
"""

from __future__ import annotations

from bisect import bisect_left

from prometheus_client.core import HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

STEP_PHASES = ("prefill", "decode", "mixed")
# Token rows per step reach max_step_tokens (2048 by default, more for long prompts).
_TOKEN_BUCKETS = (1, 4, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768)
_SEQ_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
_STEP_S_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_JOB_S_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                  120.0, 300.0)


def step_phase(prefill_seqs: int, decode_seqs: int) -> str:
    """A step that only prefills, only decodes, or does both in one packed forward."""
    if prefill_seqs and decode_seqs:
        return "mixed"
    return "prefill" if prefill_seqs else "decode"


class _Series:
    """One histogram series: counts per bucket and a sum, written by one thread only."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # le semantics: a value equal to a bound falls in that bound's bucket.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class Hist(Collector):
    """A histogram for a hot path: one bisect and two additions per observation.

    prometheus-client's Histogram takes a lock and scans its buckets per observation,
    twice per value (bucket and sum); at thousands of jobs a second that was a tenth of
    the event loop. Each series here has a single writer (the executor thread or the
    event loop); a scrape copies the counts, so a bucket total and its count always agree
    and a scrape is at most one observation stale."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...],
                 labelnames: tuple[str, ...] = ()) -> None:
        self.name, self.doc, self.bounds = name, doc, tuple(float(b) for b in buckets)
        # The `le` labels, as prometheus-client's own Histogram writes them, +Inf last.
        self._les = [floatToGoString(b) for b in (*self.bounds, float("inf"))]
        self.labelnames = labelnames
        self._series: dict[tuple[str, ...], _Series] = {} if labelnames else {(): _Series(self.bounds)}

    def labels(self, *values: str) -> _Series:
        return self._series.setdefault(values, _Series(self.bounds))

    def observe(self, value: float) -> None:
        self._series[()].observe(value)

    def collect(self):
        fam = HistogramMetricFamily(self.name, self.doc, labels=list(self.labelnames))
        for values, series in list(self._series.items()):
            counts, total = list(series.counts), series.sum
            cumulative, buckets = 0, []
            for le, n in zip(self._les, counts):
                cumulative += n
                buckets.append((le, cumulative))
            fam.add_metric(list(values), buckets, total)
        yield fam


class Distributions:
    """The histograms, observed where their values are born; registered by `register_worker`.

    `on_step` runs on the executor thread once per step: three observations, no allocation,
    no lock. `on_result` runs on the event loop per executed job.
    """

    def __init__(self) -> None:
        self.step_seqs = Hist(
            "fabric_step_batch_seqs", "Sequences in one executor step (prefills + decodes).",
            _SEQ_BUCKETS)
        self.step_tokens = Hist(
            "fabric_step_tokens", "Packed token rows through the dense layers in one step.",
            _TOKEN_BUCKETS)
        self._step_s = Hist(
            "fabric_step_seconds", "Wall time of one executor step, by phase.", _STEP_S_BUCKETS,
            ("phase",))
        self.step_s = {p: self._step_s.labels(p) for p in STEP_PHASES}
        self.queued_s = Hist(
            "fabric_job_queued_seconds", "Arrival at the worker to admission (executed jobs).",
            _JOB_S_BUCKETS)
        self.ttft_s = Hist(
            "fabric_time_to_first_token_seconds",
            "Arrival at the worker to the first generated token (jobs answered ok).",
            _JOB_S_BUCKETS)
        self.latency_s = Hist(
            "fabric_job_latency_seconds", "Arrival at the worker to its Result (jobs answered ok).",
            _JOB_S_BUCKETS)

    def collectors(self) -> list[Collector]:
        return [self.step_seqs, self.step_tokens, self._step_s, self.queued_s, self.ttft_s,
                self.latency_s]

    def on_step(self, prefill_seqs: int, decode_seqs: int, rows: int, step_s: float) -> None:
        self.step_seqs.observe(prefill_seqs + decode_seqs)
        self.step_tokens.observe(rows)
        self.step_s[step_phase(prefill_seqs, decode_seqs)].observe(step_s)

    def on_result(self, ok: bool, queued_ms: float, first_token_ms: float | None,
                  total_ms: float) -> None:
        self.queued_s.observe(queued_ms / 1e3)
        if not ok:
            return  # a failed job's latency says nothing about serving speed
        self.latency_s.observe(total_ms / 1e3)
        if first_token_ms is not None:
            self.ttft_s.observe(first_token_ms / 1e3)
