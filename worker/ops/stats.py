"""Counters the worker keeps about itself: the shutdown summary and the metrics read them.

Step figures are written by the executor thread only (`on_step`), job figures by the event
loop only (`on_result`, per executed job); the metrics scrape reads them from its own thread
(plain int/float attributes: a torn read costs one sample, never correctness). Budget
occupancy is integrated over time, and only over time when jobs were waiting for
admission: that is the figure that says whether admission kept the executor fed. The
histograms live in `dist` and are observed at the same two points.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from typing import TYPE_CHECKING

from worker.ops.histograms import Distributions

if TYPE_CHECKING:
    from worker.engine.executor import StepReport


def padding_fraction(real: int, computed: int) -> float:
    """1 - real/computed: the share of computed work that was padding (0 when none ran)."""
    if computed <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - real / computed))


@dataclass(slots=True)
class WorkerStats:
    jobs_ok: int = 0
    jobs_error: int = 0
    errors_by_code: Counter = field(default_factory=Counter)
    cancels: int = 0  # cancel messages taken
    cancels_refused: int = 0  # cancel messages that were not {"ids": [...]}
    redelivered: int = 0  # messages seen with a delivery count above 1
    naked: int = 0  # messages nak'd back without a Result (SIGTERM drain, fatal teardown)
    # executor steps
    steps: int = 0
    rows: int = 0
    attn_real: int = 0
    attn_padded: int = 0
    graphed_steps: int = 0  # fixed-shape decode steps (pipelined runner; graph replays on CUDA)
    masked_steps: int = 0  # steps with structured-output rows
    mask_s: float = 0.0  # host time filling their masks
    grammar_compiles: int = 0  # response formats compiled (cache misses)
    grammar_compile_s: float = 0.0
    busy_s: float = 0.0
    idle_s: float = 0.0
    idle_while_queued_s: float = 0.0  # executor had nothing to run while jobs waited upstream
    # executed jobs answered ok (event loop)
    useful_tokens: int = 0  # prompt + generated tokens: the work anyone asked for
    computed_tokens: int = 0  # token rows those jobs occupied in forwards, padding included
    prompt_tokens: int = 0  # of the useful tokens, the prompts'
    cached_tokens: int = 0  # of those, served from the prefix cache (not computed)
    dist: Distributions = field(default_factory=Distributions)  # the metrics' histograms
    # occupancy while queued, time-weighted
    _occ_area: float = 0.0
    _occ_time: float = 0.0
    _occ_last: float = field(default_factory=time.monotonic)
    _occ_value: float = 0.0
    _occ_queued: bool = False

    def on_step(self, r: StepReport) -> None:
        self.steps += 1
        self.rows += r.rows
        self.attn_real += r.attn_real
        self.attn_padded += r.attn_padded
        self.graphed_steps += r.graphed
        if r.mask_s:
            self.masked_steps += 1
            self.mask_s += r.mask_s
        self.busy_s += r.step_s
        self.idle_s += r.idle_s
        self.idle_while_queued_s += r.idle_while_queued_s
        self.dist.on_step(r.prefill_seqs, r.decode_seqs, r.rows, r.step_s)

    def on_edge_answer(self, ok: bool, error_code: str | None) -> None:
        """A Result decided without the device (bad input, expired, poison...)."""
        if ok:
            self.jobs_ok += 1
        else:
            self.jobs_error += 1
            self.errors_by_code[error_code] += 1

    def on_result(self, *, ok: bool, prompt_tokens: int, completion_tokens: int,
                  padded_tokens: int, queued_ms: float, first_token_ms: float | None,
                  cached_tokens: int = 0,
                  total_ms: float, error_code: str | None = None) -> None:
        """A Result for a job the executor ran (`on_edge_answer` counts the others); not ok:
        ended early (cancelled), its tokens not counted as useful."""
        if ok:
            self.jobs_ok += 1
            self.useful_tokens += prompt_tokens + completion_tokens
            self.computed_tokens += padded_tokens
            self.prompt_tokens += prompt_tokens
            self.cached_tokens += cached_tokens
        else:
            self.jobs_error += 1
            self.errors_by_code[error_code] += 1
        self.dist.on_result(ok, queued_ms, first_token_ms, total_ms)

    def occupancy(self, value: float, queued: bool) -> None:
        """Record the budget occupancy from now on, and whether jobs are waiting."""
        now = time.monotonic()
        if self._occ_queued:
            self._occ_area += self._occ_value * (now - self._occ_last)
            self._occ_time += now - self._occ_last
        self._occ_last, self._occ_value, self._occ_queued = now, value, queued

    @property
    def occupancy_while_queued(self) -> float | None:
        return self._occ_area / self._occ_time if self._occ_time > 0 else None

    def summary(self) -> dict[str, object]:
        occ = self.occupancy_while_queued
        return {
            "jobs_ok": self.jobs_ok, "jobs_error": self.jobs_error,
            "errors_by_code": dict(self.errors_by_code), "redelivered": self.redelivered,
            "naked": self.naked, "steps": self.steps,
            "mean_batch_rows": round(self.rows / self.steps, 2) if self.steps else 0.0,
            "graphed_step_fraction": round(self.graphed_steps / self.steps, 4) if self.steps else 0.0,
            "masked_steps": self.masked_steps,
            "mask_ms_per_masked_step": (round(1e3 * self.mask_s / self.masked_steps, 3)
                                        if self.masked_steps else None),
            "grammar_compiles": self.grammar_compiles,
            "grammar_compile_ms_mean": (round(1e3 * self.grammar_compile_s / self.grammar_compiles,
                                              3) if self.grammar_compiles else None),
            "attn_padding_fraction": round(padding_fraction(self.attn_real, self.attn_padded), 4),
            "compute_padding_fraction": round(padding_fraction(
                self.useful_tokens - self.cached_tokens, self.computed_tokens), 4),
            "prompt_cache_hit_fraction": (round(self.cached_tokens / self.prompt_tokens, 4)
                                          if self.prompt_tokens else 0.0),
            "useful_tokens": self.useful_tokens,
            "busy_s": round(self.busy_s, 3), "idle_s": round(self.idle_s, 3),
            "idle_while_queued_s": round(self.idle_while_queued_s, 3),
            "budget_occupancy_while_queued": round(occ, 4) if occ is not None else None,
        }
