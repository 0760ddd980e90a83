"""The worker's own view of a run, scraped from its Prometheus endpoint(s) while it runs.

Rule: budget occupancy is only a verdict on the scheduler while work is waiting for it,
so the run's occupancy is the mean of `fabric_budget_occupancy` over the samples in
which that worker's `fabric_queue_depth{stage="pending"}` was above zero (fetched jobs
waiting for admission). Padding is taken from the worker's counters, as a difference
between the first and the last scrape, so a long-lived worker's earlier traffic does not
leak into this run's number; its `fabric_padding_fraction{kind}` gauges (since the
worker started) are reported beside it as read at the end.

A `Scraper` is one background thread with urllib: it scrapes every URL once when
started (the baseline), every `period_s` while the run goes on, and once more when
stopped. A URL that fails is counted and keeps being tried; a scrape never raises into
the run. `summarize` is a pure function of what was scraped, tested without HTTP.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Scrape", "Scraper", "parse", "summarize"]

# Counter samples (exposition names) whose difference over the run gives its padding.
_COUNTERS = {
    "compute": ("fabric_useful_tokens_total", "fabric_computed_tokens_total"),
    "attention": ("fabric_attention_real_pairs_total", "fabric_attention_computed_pairs_total"),
}
_WANTED = {"fabric_budget_occupancy", "fabric_queue_depth", "fabric_padding_fraction",
           *(name for pair in _COUNTERS.values() for name in pair)}


@dataclass(slots=True)
class Scrape:
    """What one scrape of one worker said, reduced to what the report needs."""

    at_s: float  # time.monotonic() when the response arrived
    occupancy: float | None  # fabric_budget_occupancy
    pending: float | None  # fabric_queue_depth{stage="pending"}
    padding: dict[str, float] = field(default_factory=dict)  # fabric_padding_fraction by kind
    counters: dict[str, float] = field(default_factory=dict)  # _COUNTERS' samples by name


def parse(text: str, at_s: float = 0.0) -> Scrape:
    """The fields of a Scrape from Prometheus text exposition (missing series are None)."""
    out = Scrape(at_s=at_s, occupancy=None, pending=None)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name not in _WANTED:
                continue
            if s.name == "fabric_budget_occupancy":
                out.occupancy = s.value
            elif s.name == "fabric_queue_depth" and s.labels.get("stage") == "pending":
                out.pending = s.value
            elif s.name == "fabric_padding_fraction" and "kind" in s.labels:
                out.padding[s.labels["kind"]] = s.value
            elif s.name.endswith("_total"):
                out.counters[s.name] = s.value
    return out


def _fetch(url: str, timeout_s: float) -> str:
    with urllib.request.urlopen(url, timeout=timeout_s) as r:
        return r.read().decode("utf-8", errors="replace")


class Scraper:
    """Scrapes `urls` on a background thread from `start()` to `stop()`."""

    def __init__(self, urls: Sequence[str], period_s: float = 0.25, timeout_s: float = 2.0,
                 fetch: Callable[[str, float], str] = _fetch) -> None:
        if period_s <= 0:
            raise ValueError(f"scrape period must be > 0, got {period_s}")
        self.urls = list(dict.fromkeys(urls))  # each once, in the order given
        self.period_s = period_s
        self.timeout_s = timeout_s
        self._fetch = fetch
        self.scrapes: dict[str, list[Scrape]] = {u: [] for u in self.urls}  # owned by the thread
        self.errors: dict[str, int] = {u: 0 for u in self.urls}
        self.last_error: dict[str, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="metrics-scraper", daemon=True)

    def start(self) -> Scraper:
        self._scrape_all()  # the baseline, before the first job goes out
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, then take the last scrape (the run's end values)."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        self._scrape_all()

    def __enter__(self) -> Scraper:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def summary(self) -> dict[str, Any]:
        return summarize(self.scrapes, self.errors, self.last_error)

    def _loop(self) -> None:
        # Paced against a clock, not by sleeping a period after each scrape, so a slow
        # endpoint lowers the sample rate without shifting when samples fall.
        next_s = time.monotonic() + self.period_s
        while not self._stop.wait(max(next_s - time.monotonic(), 0.0)):
            self._scrape_all()
            next_s = max(next_s + self.period_s, time.monotonic())

    def _scrape_all(self) -> None:
        for url in self.urls:
            try:
                text = self._fetch(url, self.timeout_s)
                self.scrapes[url].append(parse(text, time.monotonic()))
            except (OSError, urllib.error.URLError, http.client.HTTPException, ValueError) as e:
                # Refused, timed out, HTTP error, or not Prometheus text: count, keep going.
                self.errors[url] += 1
                self.last_error[url] = f"{type(e).__name__}: {e}"


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def _fraction(real: float, computed: float) -> float | None:
    return min(1.0, max(0.0, 1.0 - real / computed)) if computed > 0 else None


def _padding_delta(first: Scrape, last: Scrape) -> dict[str, tuple[float, float]]:
    """(real, computed) added between two scrapes, per kind; a restart (counters fell)
    counts from zero."""
    out = {}
    for kind, (real_name, computed_name) in _COUNTERS.items():
        if real_name not in last.counters or computed_name not in last.counters:
            continue
        real = last.counters[real_name] - first.counters.get(real_name, 0.0)
        computed = last.counters[computed_name] - first.counters.get(computed_name, 0.0)
        if real < 0 or computed < 0:
            real, computed = last.counters[real_name], last.counters[computed_name]
        out[kind] = (real, computed)
    return out


def summarize(scrapes: dict[str, list[Scrape]], errors: dict[str, int] | None = None,
              last_error: dict[str, str] | None = None) -> dict[str, Any]:
    """The report's `worker_metrics` block. Occupancy means are over all workers' samples
    (each sample one worker at one instant); padding sums the workers' counters."""
    errors = errors or {}
    last_error = last_error or {}
    queued_occ: list[float] = []
    all_occ: list[float] = []
    totals: dict[str, list[float]] = {}
    per_worker: dict[str, Any] = {}
    for url, got in scrapes.items():
        occ = [s.occupancy for s in got if s.occupancy is not None]
        mine = [s.occupancy for s in got
                if s.occupancy is not None and s.pending is not None and s.pending > 0]
        all_occ += occ
        queued_occ += mine
        delta = _padding_delta(got[0], got[-1]) if got else {}
        for kind, (real, computed) in delta.items():
            acc = totals.setdefault(kind, [0.0, 0.0])
            acc[0] += real
            acc[1] += computed
        per_worker[url] = {
            "scrapes": len(got),
            "scrape_errors": errors.get(url, 0),
            "last_error": last_error.get(url),
            "samples_while_queued": len(mine),
            "budget_occupancy_while_queued": _mean(mine),
            "budget_occupancy_mean": _mean(occ),
            "padding_fraction_during_run": {k: _fraction(r, c) for k, (r, c) in delta.items()},
            "padding_fraction_at_end": dict(got[-1].padding) if got else {},
        }
    # One worker: its gauges verbatim. Several: their counters summed (same formula).
    if len(scrapes) == 1:
        at_end = next(iter(per_worker.values()))["padding_fraction_at_end"]
    else:
        at_end = {}
        for kind, (real_name, computed_name) in _COUNTERS.items():
            ends = [got[-1].counters for got in scrapes.values() if got]
            if ends and all(real_name in c and computed_name in c for c in ends):
                at_end[kind] = _fraction(sum(c[real_name] for c in ends),
                                         sum(c[computed_name] for c in ends))
    return {
        "urls": list(scrapes),
        "scrapes": sum(len(v) for v in scrapes.values()),
        "scrape_errors": sum(errors.values()),
        "scrape_error_sample": next((e for e in last_error.values() if e), None),
        "samples": len(all_occ),
        "samples_while_queued": len(queued_occ),
        "budget_occupancy_while_queued": _mean(queued_occ),
        "budget_occupancy_mean": _mean(all_occ),
        "padding_fraction_during_run": {k: _fraction(r, c) for k, (r, c) in totals.items()},
        "padding_fraction_at_end": at_end,
        "per_worker": per_worker,
    }
