"""Prometheus metrics: what the worker is doing, in its own registry, every name `fabric_`.

Rule: a scrape never waits on the event loop or the executor. Levels (queue depths,
in-flight tokens, admission state, KV blocks) and counters are read at scrape time from
the worker's typed view (`worker.ops.view.WorkerView`) by a pull-based collector. Only
distributions are pushed, in O(1) where the value is born (`worker.ops.histograms`).
Reading another thread's ints and lengths without a lock can be one sample stale; it never
raises and never blocks the owner.

GPU readings are `worker.ops.gpu`'s. docs/operations.md says what every series means and
what healthy looks like.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    ProcessCollector,
    disable_created_metrics,
)
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from schemas import ErrorCode
from worker.ops.gpu import GpuCollector
from worker.ops.health import readiness
from worker.ops.stats import padding_fraction
from worker.ops.view import WorkerInfo, WorkerView


def _copy(d: dict) -> dict:
    """A copy of a dict another thread may be adding keys to."""
    for _ in range(3):
        try:
            return dict(d)
        except RuntimeError:  # changed size during the copy: take it again
            continue
    return {}


def _gauge(name: str, doc: str, value: float, labels: dict[str, str] | None = None):
    g = GaugeMetricFamily(name, doc, labels=list(labels) if labels else None)
    g.add_metric(list(labels.values()) if labels else [], value)
    return g


def _counter(name: str, doc: str, value: float):
    return CounterMetricFamily(name, doc, value=value)


class Observed(Protocol):
    """What the collector and the HTTP port read: a worker, or a stand-in in tests."""

    info: WorkerInfo

    def view(self) -> WorkerView: ...


class WorkerCollector(Collector):
    """Everything read at scrape time from one worker's view."""

    def __init__(self, worker: Observed):
        self.worker = worker
        i = worker.info
        self._info = {"config_hash": i.config_hash, "model": i.model, "device": i.device,
                      "dtype": i.dtype, "worker": i.worker_id}

    def describe(self) -> Iterator:
        return iter(())  # unchecked collector: its families depend on the live state

    def collect(self) -> Iterator:
        i, v = self.worker.info, self.worker.view()
        stats = v.stats

        info = InfoMetricFamily("fabric_config", "The engine config this worker runs.")
        info.add_metric([], self._info)
        yield info
        yield _gauge("fabric_ready", "1 when /readyz answers 200.", float(readiness(v).ok))
        yield _gauge("fabric_draining", "1 while stopping (SIGTERM or fatal).", float(v.draining))
        yield _gauge("fabric_executor_alive", "1 while the executor thread runs.",
                     float(v.started and v.executor_alive))
        yield _gauge("fabric_broker_connected", "1 while connected to NATS.", float(bool(v.connected)))

        # -- jobs and messages
        jobs = CounterMetricFamily("fabric_jobs", "Jobs answered with a Result, by outcome and "
                                   "error code.", labels=["outcome", "code"])
        jobs.add_metric(["ok", "none"], stats.jobs_ok)
        by_code = _copy(stats.errors_by_code)
        for code in ErrorCode:
            by_code.setdefault(code.value, 0)
        for code, n in sorted(by_code.items()):
            jobs.add_metric(["error", code], n)
        yield jobs
        yield _counter("fabric_redeliveries", "Messages received with a delivery count above 1.",
                       stats.redelivered)
        yield _counter("fabric_messages_fetched", "Messages pulled from the consumers.", v.fetched)
        by_queue = CounterMetricFamily(
            "fabric_queue_messages_fetched", "Messages pulled, by queue: a priority's (p0-p9; "
            "p5 is the default) or the session partitions'.", labels=["queue"])
        for q, n in sorted(v.fetched_by_queue.items()):
            by_queue.add_metric([q], n)
        yield by_queue
        yield _counter("fabric_session_spilled", "Session jobs taken from partitions another "
                       "worker owns (its owner was not keeping up).", v.spilled)
        if v.partitions_owned is not None:
            yield _gauge("fabric_session_partitions_owned", "Session partitions this worker "
                         "owns now.", v.partitions_owned)
        cancels = CounterMetricFamily(
            "fabric_cancel_messages", "Cancel messages heard: taken, or refused (not "
            '{"ids": [...]} within the bounds).', labels=["result"])
        cancels.add_metric(["taken"], stats.cancels)
        cancels.add_metric(["refused"], stats.cancels_refused)
        yield cancels
        settled = CounterMetricFamily(
            "fabric_settled", "Messages settled: ack/term/nak after a Result; release = nak'd "
            "back without a Result (SIGTERM drain, fatal teardown).", labels=["action"])
        for action, n in (("ack", v.acked), ("term", v.termed), ("nak", v.naked),
                          ("release", stats.naked)):
            settled.add_metric([action], n)
        yield settled
        yield _counter("fabric_results_published", "Results confirmed by the broker.", v.published)
        yield _counter("fabric_dead_letters", "Jobs moved to the dead-letter stream (poison, or "
                       "out of deliveries).", v.dead_lettered)
        yield _gauge("fabric_held_messages", "Messages this worker holds unacked (counts "
                     "against the consumer's max_ack_pending).", v.held)

        # -- queues, every one bounded
        depth = GaugeMetricFamily("fabric_queue_depth", "Jobs (or Results) waiting in each "
                                  "bounded stage.", labels=["stage"])
        cap = GaugeMetricFamily("fabric_queue_capacity", "The bound of each stage's queue.",
                                labels=["stage"])
        for stage, n, limit in (
            ("pending", v.pending_jobs, i.max_jobs),
            ("executor_waiting", max(0, v.inflight_jobs - v.running_jobs), i.max_jobs),
            ("executor_running", v.running_jobs, i.max_jobs),
            # Results waiting to be published, and published awaiting their PubAck.
            ("publisher", v.publisher_depth, v.publisher_capacity),
        ):
            depth.add_metric([stage], n)
            cap.add_metric([stage], limit)
        yield depth
        yield cap

        # -- admission and the token budget
        yield _gauge("fabric_pending_tokens", "Padded tokens fetched but not yet admitted.",
                     v.pending_tokens)
        yield _gauge("fabric_inflight_tokens", "Padded tokens admitted and not yet finished.",
                     v.inflight_tokens)
        yield _gauge("fabric_budget_tokens", "token_budget: admission's high-water mark.",
                     i.token_budget)
        yield _gauge("fabric_low_water_tokens", "low_water: admission resumes at or below this.",
                     i.low_water)
        yield _gauge("fabric_budget_occupancy", "In-flight padded tokens over the budget.",
                     v.occupancy)
        occ = stats.occupancy_while_queued
        yield _gauge("fabric_budget_occupancy_while_queued", "Time-weighted budget occupancy "
                     "while jobs waited for admission, since start.", occ if occ is not None else 0)
        state = GaugeMetricFamily("fabric_admission_state", "1 for the current admission state: "
                                  "open, or holding (hit high water, waits for low water).",
                                  labels=["state"])
        state.add_metric(["open"], float(not v.admission_holding))
        state.add_metric(["holding"], float(v.admission_holding))
        yield state
        kv = v.kv
        yield _gauge("fabric_kv_blocks_used", "KV cache blocks reserved by admitted jobs.",
                     kv.in_flight)
        yield _gauge("fabric_kv_blocks_capacity", "KV cache blocks in the preallocated pool.",
                     kv.blocks)
        yield _gauge("fabric_kv_blocks_cached", "KV blocks no job holds that keep a computed "
                     "prefix for the next job (evictable, not counted in use).", kv.cached)
        yield _counter("fabric_kv_evictions", "Cached KV blocks whose space was taken for "
                       "another job.", kv.evictions)
        states = GaugeMetricFamily("fabric_kv_pool_blocks", "KV blocks by state and tier: the "
                                   "device pool's in flight, cached and empty; the host tier's "
                                   "used and empty.", labels=["tier", "state"])
        for tier, state, n in (("device", "in_flight", kv.in_flight), ("device", "cached", kv.cached),
                               ("device", "empty", kv.empty), ("host", "used", kv.host_used),
                               ("host", "empty", kv.host_blocks - kv.host_used)):
            states.add_metric([tier, state], n)
        yield states
        hits = CounterMetricFamily("fabric_kv_hit_blocks", "KV blocks reservations found by "
                                   "content, by the tier they were found in.", labels=["tier"])
        evicted = CounterMetricFamily("fabric_kv_tier_evictions", "KV blocks evicted, by tier "
                                      "(device: dropped, or copied to the host tier).",
                                      labels=["tier"])
        for tier, hit, ev in (("device", kv.hits, kv.evictions),
                              ("host", kv.host_hits, kv.host_evictions)):
            hits.add_metric([tier], hit)
            evicted.add_metric([tier], ev)
        yield hits
        yield evicted
        out = CounterMetricFamily("fabric_kv_host_copies_out", "KV blocks copied to the host "
                                  "tier: ahead of their eviction, off the step's path, or "
                                  "at it (the step that reuses the block waits for the copy).",
                                  labels=["when"])
        out.add_metric(["ahead"], kv.written_ahead)
        out.add_metric(["at_eviction"], kv.spilled_at_eviction)
        yield out

        # -- executor work, real versus computed
        yield _counter("fabric_executor_busy_seconds", "Time the executor spent in steps.",
                       stats.busy_s)
        yield _counter("fabric_executor_idle_seconds", "Time the executor waited for work.",
                       stats.idle_s)
        yield _counter("fabric_executor_steps", "Executor steps.", stats.steps)
        yield _counter("fabric_executor_graphed_steps", "Steps whose decode rows ran at a fixed "
                       "shape (pipelined runner; a CUDA graph replay on a GPU).",
                       stats.graphed_steps)
        yield _counter("fabric_grammar_masked_steps", "Steps with structured-output rows, whose "
                       "token masks the host filled.", stats.masked_steps)
        yield _counter("fabric_grammar_mask_seconds", "Host time filling structured-output "
                       "masks (on the executor thread, while the device ran the step before).",
                       stats.mask_s)
        yield _counter("fabric_grammar_compiles", "Response formats compiled (not in the "
                       "cache).", stats.grammar_compiles)
        yield _counter("fabric_grammar_compile_seconds", "Time compiling response formats "
                       "(a thread of its own).", stats.grammar_compile_s)
        yield _gauge("fabric_executor_last_step_age_seconds", "Seconds since the last step "
                     "finished (large with jobs in flight: a stalled executor).",
                     time.monotonic() - v.last_step_at if v.last_step_at else 0.0)
        yield _counter("fabric_executor_idle_while_queued_seconds", "Time the executor waited "
                       "for work while jobs waited for admission (should stay near 0).",
                       stats.idle_while_queued_s)
        yield _counter("fabric_useful_tokens", "Prompt + generated tokens of jobs answered ok.",
                       stats.useful_tokens)
        yield _counter("fabric_computed_tokens", "Token rows those jobs occupied in forwards, "
                       "padding included.", stats.computed_tokens)
        prompt = CounterMetricFamily("fabric_prompt_tokens", "Prompt tokens of jobs answered "
                                     "ok, by where their KV came from: computed, or found in "
                                     "the prefix cache.", labels=["source"])
        prompt.add_metric(["computed"], stats.prompt_tokens - stats.cached_tokens)
        prompt.add_metric(["cache"], stats.cached_tokens)
        yield prompt
        yield _counter("fabric_attention_real_pairs", "Attention query x key pairs needed.",
                       stats.attn_real)
        yield _counter("fabric_attention_computed_pairs", "Attention query x key pairs computed, "
                       "padding included.", stats.attn_padded)
        yield _gauge("fabric_intra_op_threads", "Threads the executor's CPU ops run on now.",
                     v.intra_op_threads)
        yield _counter("fabric_intra_op_thread_probes", "Times the thread count was measured "
                       "against its alternatives (0 when fixed by --threads or --cpus).",
                       v.thread_probes)
        if v.cpu_wait_s is not None:
            yield _counter("fabric_cpu_wait_seconds", "Time this process's threads were "
                           "runnable but waiting for a CPU (schedstat run delay).", v.cpu_wait_s)
        yield _gauge("fabric_cpu_wait_ratio", "Of that, per second and per CPU the worker "
                     "expects to use, over the last second.", v.cpu_wait_ratio)
        yield _gauge("fabric_cpu_starved", "1 while the worker is starved of CPU: its threads "
                     "kept waiting for CPUs others hold while it had work.", float(v.cpu_starved))
        pad = GaugeMetricFamily("fabric_padding_fraction", "Share of computed work that was "
                                "padding since start: compute (token rows) and attention.",
                                labels=["kind"])
        pad.add_metric(["compute"], padding_fraction(stats.useful_tokens - stats.cached_tokens,
                                                     stats.computed_tokens))
        pad.add_metric(["attention"], padding_fraction(stats.attn_real, stats.attn_padded))
        yield pad


def register_worker(registry: CollectorRegistry, worker: Observed,
                    gpu: GpuCollector | None = None) -> None:
    """Put one worker's metrics, its histograms, process and GPU metrics into `registry`."""
    registry.register(WorkerCollector(worker))
    for c in worker.view().stats.dist.collectors():
        registry.register(c)
    registry.register(gpu if gpu is not None else GpuCollector(worker.info.device))


def new_registry() -> CollectorRegistry:
    # `*_created` series double the exposition and nothing here reads them (process-wide).
    disable_created_metrics()
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)  # RSS, CPU seconds, open fds, start time
    return registry
