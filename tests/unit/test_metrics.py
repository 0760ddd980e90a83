"""Metrics, health and the observability port on plain data: no NATS, no model, no GPU.

The worker is a stand-in with what the collector and the probes read (its `info` and a
`view()`); NVML is a fake module, so the GPU path is tested on a machine without one.
"""

from __future__ import annotations

import ast
import json
import socket
import time
import urllib.error
import urllib.request
from collections import deque
from pathlib import Path
from types import SimpleNamespace

import pytest
import structlog
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

import worker
from schemas import ErrorCode
from worker.admission import Admission
from worker.config import EngineConfig, config_hash
from worker.engine.blocks import BlockPool
from worker.engine.executor import StepReport
from worker.ops.health import liveness, readiness
from worker.ops.gpu import GpuCollector, nvml_target
from worker.ops.histograms import step_phase
from worker.ops.metrics import WorkerCollector, new_registry, register_worker
from worker.ops.http import Observer, start_http
from worker.ops.stats import WorkerStats, padding_fraction
from worker.ops.view import KvLevels, WorkerInfo, WorkerView

CFG = EngineConfig.model_validate({
    "nats_url": "nats://127.0.0.1:4222", "stream": "JOBS", "consumer": "workers",
    "model": "builtin:tiny", "device": "cpu", "dtype": "float32", "token_budget": 4096,
    "low_water": 2048, "max_seq_len": 1088,
})


class FakeWorker:
    """What metrics and health read of a worker: `info`, and a `view()` built from `state`
    (plain fields a test sets), an admission rule and a KV block pool."""

    def __init__(self, connected: bool, started: bool):
        self.info = WorkerInfo(worker_id="w-test", config_hash=config_hash(CFG), model=CFG.model,
                               device=CFG.device, dtype=CFG.dtype, token_budget=CFG.token_budget,
                               low_water=CFG.low_water, max_jobs=CFG.token_budget // 16)
        self.stats = WorkerStats()
        self.admission = Admission(4096, 2048)
        self.alloc = BlockPool(256, 16, first=0)
        self.state = SimpleNamespace(
            ready=started, draining=False, faulted=False, started=started, executor_alive=started,
            connected=connected if started else None, held=0, pending_jobs=0, pending_tokens=0,
            inflight_jobs=0, running_jobs=0, publisher_depth=0,
            publisher_capacity=1792 if started else 0, fetched=0, published=0, acked=0,
            termed=0, naked=0, dead_lettered=0, last_step_at=0.0, intra_op_threads=2,
            thread_probes=0, cpu_wait_s=0.0, cpu_wait_ratio=0.0, cpu_starved=False)

    def view(self) -> WorkerView:
        a = self.admission
        held = self.alloc.used_blocks * 16
        return WorkerView(**vars(self.state), inflight_tokens=held,
                          occupancy=held / CFG.token_budget, admission_holding=a.holding,
                          kv=KvLevels.of(self.alloc),
                          stats=self.stats)


def fake_worker(*, connected: bool = True, started: bool = True) -> FakeWorker:
    return FakeWorker(connected, started)


def scrape(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted labels): value} from the registry's text exposition."""
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def result(ok: bool = True, prompt: int = 10, completion: int = 5, padded: int = 15,
           first_ms: float | None = 20.0, total_ms: float = 50.0) -> dict:
    """WorkerStats.on_result's arguments for one executed job."""
    return {"ok": ok, "prompt_tokens": prompt, "completion_tokens": completion,
            "padded_tokens": padded, "queued_ms": 5.0, "first_token_ms": first_ms,
            "total_ms": total_ms}


def step(prefill: int, decode: int, rows: int = 64, real: int = 60, padded: int = 80) -> StepReport:
    return StepReport(prefill_seqs=prefill, decode_seqs=decode, rows=rows, attn_real=real,
                      attn_padded=padded, step_s=0.004, idle_s=0.01,
                      idle_while_queued_s=0.002)


# -- pure functions ---------------------------------------------------------------------


def test_step_phase() -> None:
    assert step_phase(3, 0) == "prefill"
    assert step_phase(0, 7) == "decode"
    assert step_phase(2, 5) == "mixed"
    assert step_phase(0, 0) == "decode"  # cannot happen (a step has work); never raises


@pytest.mark.parametrize(("real", "computed", "want"), [
    (0, 0, 0.0), (10, 10, 0.0), (3, 4, 0.25), (0, 8, 1.0), (9, 8, 0.0), (5, -1, 0.0)])
def test_padding_fraction_is_a_fraction(real: int, computed: int, want: float) -> None:
    assert padding_fraction(real, computed) == pytest.approx(want)


@pytest.mark.parametrize(("device", "visible", "want"), [
    ("cpu", None, None), ("cuda", None, 0), ("cuda:2", None, 2), ("cuda:0", "3,1", 3),
    ("cuda:1", "3,1", 1), ("cuda:2", "3,1", None), ("cuda:0", "", None),
    ("cuda:0", "GPU-8f6a3c1e-0000-1111-2222-333344445555",
     "GPU-8f6a3c1e-0000-1111-2222-333344445555"),
    ("cuda:0", " MIG-abc , 2", "MIG-abc")])
def test_nvml_target_follows_cuda_visible_devices(device, visible, want) -> None:
    assert nvml_target(device, visible) == want


# -- WorkerStats ------------------------------------------------------------------------


def test_stats_count_steps_and_results_and_summarise() -> None:
    s = WorkerStats()
    s.on_step(step(4, 0))
    s.on_step(step(1, 9))
    s.on_step(step(0, 10))
    s.on_result(**result(prompt=10, completion=5, padded=15))
    s.on_result(**result(prompt=6, completion=2, padded=10))
    s.on_result(**result(ok=False, first_ms=None))
    assert (s.useful_tokens, s.computed_tokens) == (23, 25)
    d = s.dist
    assert [d.step_s[p].sum > 0 for p in ("prefill", "decode", "mixed")] == [True] * 3
    reg = CollectorRegistry()
    for c in d.collectors():
        reg.register(c)
    got = scrape(reg)
    assert got[("fabric_step_batch_seqs_count", ())] == 3
    assert got[("fabric_step_batch_seqs_sum", ())] == 24
    assert got[("fabric_step_seconds_count", (("phase", "mixed"),))] == 1
    assert got[("fabric_job_queued_seconds_count", ())] == 3  # every executed job
    assert got[("fabric_job_latency_seconds_count", ())] == 2  # only jobs answered ok
    assert got[("fabric_time_to_first_token_seconds_sum", ())] == pytest.approx(0.04)
    summary = s.summary()
    assert summary["useful_tokens"] == 23
    assert summary["compute_padding_fraction"] == pytest.approx(0.08)
    assert summary["attn_padding_fraction"] == pytest.approx(0.25)
    assert summary["steps"] == 3 and summary["idle_while_queued_s"] == pytest.approx(0.006)


def test_on_step_is_cheap() -> None:
    """The executor thread pays this every step; a generous bound that a 2-core box meets."""
    s, r = WorkerStats(), step(2, 30)
    n = 20000
    t0 = time.perf_counter()
    for _ in range(n):
        s.on_step(r)
    per_step_us = (time.perf_counter() - t0) / n * 1e6
    assert per_step_us < 200, per_step_us


# -- the collector ----------------------------------------------------------------------


NAMED = {
    "fabric_config_info", "fabric_ready", "fabric_draining", "fabric_executor_alive",
    "fabric_broker_connected", "fabric_jobs_total", "fabric_redeliveries_total",
    "fabric_messages_fetched_total", "fabric_settled_total", "fabric_results_published_total",
    "fabric_held_messages", "fabric_queue_depth", "fabric_queue_capacity",
    "fabric_pending_tokens", "fabric_inflight_tokens", "fabric_budget_tokens",
    "fabric_low_water_tokens", "fabric_budget_occupancy",
    "fabric_budget_occupancy_while_queued", "fabric_admission_state", "fabric_kv_blocks_used",
    "fabric_kv_blocks_capacity", "fabric_kv_blocks_cached", "fabric_kv_evictions_total",
    "fabric_kv_pool_blocks", "fabric_kv_hit_blocks_total", "fabric_kv_tier_evictions_total",
    "fabric_kv_host_copies_out_total",
    "fabric_prompt_tokens_total", "fabric_executor_busy_seconds_total",
    "fabric_executor_idle_seconds_total", "fabric_executor_idle_while_queued_seconds_total",
    "fabric_executor_steps_total", "fabric_executor_graphed_steps_total",
    "fabric_useful_tokens_total", "fabric_computed_tokens_total",
    "fabric_attention_real_pairs_total", "fabric_attention_computed_pairs_total",
    "fabric_padding_fraction", "fabric_dead_letters_total", "fabric_intra_op_threads",
    "fabric_intra_op_thread_probes_total", "fabric_cpu_wait_seconds_total",
    "fabric_cpu_wait_ratio", "fabric_cpu_starved",
    "fabric_executor_last_step_age_seconds", "fabric_step_batch_seqs_count", "fabric_step_tokens_count",
    "fabric_step_seconds_count", "fabric_job_queued_seconds_count",
    "fabric_time_to_first_token_seconds_count", "fabric_job_latency_seconds_count",
}


def test_collector_exports_every_named_series_from_live_state() -> None:
    w = fake_worker()
    reg = new_registry()
    register_worker(reg, w)
    w.stats.on_step(step(2, 3))
    w.stats.on_result(**result(), cached_tokens=4)
    w.stats.jobs_ok, w.stats.jobs_error = 7, 2
    w.stats.errors_by_code.update({"too_long": 2})
    w.stats.redelivered, w.stats.naked = 1, 3
    w.state.pending_jobs, w.state.pending_tokens = 2, 96
    w.state.inflight_jobs, w.state.running_jobs = 3, 1
    w.alloc.reserve(1, (), 188)  # 3008 tokens held
    w.admission.admit(deque([3000, 2000]), 0, lambda c: c > 2000)  # the second: holding
    w.state.acked, w.state.naked, w.state.published = 6, 1, 7
    w.state.held = 1
    w.state.dead_lettered = 2
    w.state.last_step_at = time.monotonic() - 3.0
    w.state.thread_probes, w.state.cpu_wait_s, w.state.cpu_wait_ratio = 4, 12.5, 0.6
    w.state.cpu_starved, w.state.intra_op_threads = True, 1
    got = scrape(reg)
    names = {name for name, _ in got}
    assert NAMED <= names, NAMED - names
    assert "process_resident_memory_bytes" in names
    assert not [n for n in names if n.endswith("_created")]
    assert got[("fabric_config_info", (
        ("config_hash", config_hash(CFG)), ("device", "cpu"), ("dtype", "float32"),
        ("model", "builtin:tiny"), ("worker", "w-test")))] == 1
    assert got[("fabric_jobs_total", (("code", "none"), ("outcome", "ok")))] == 7
    assert got[("fabric_jobs_total", (("code", "too_long"), ("outcome", "error")))] == 2
    # Every error code has a series from the start, so rate() works from the first failure.
    for code in ErrorCode:
        assert ("fabric_jobs_total", (("code", code.value), ("outcome", "error"))) in got
    assert got[("fabric_settled_total", (("action", "release"),))] == 3
    assert got[("fabric_settled_total", (("action", "nak"),))] == 1
    depth = {dict(lab)["stage"]: v for (n, lab), v in got.items() if n == "fabric_queue_depth"}
    cap = {dict(lab)["stage"]: v for (n, lab), v in got.items() if n == "fabric_queue_capacity"}
    assert depth == {"pending": 2, "executor_waiting": 2, "executor_running": 1, "publisher": 0}
    assert cap == {"pending": 256, "executor_waiting": 256, "executor_running": 256,
                   "publisher": 1792}
    assert got[("fabric_inflight_tokens", ())] == 3008
    assert got[("fabric_budget_occupancy", ())] == pytest.approx(3008 / 4096)
    assert got[("fabric_admission_state", (("state", "holding"),))] == 1
    assert got[("fabric_admission_state", (("state", "open"),))] == 0
    assert got[("fabric_kv_blocks_used", ())] == 188
    assert got[("fabric_kv_blocks_cached", ())] == 0 and got[("fabric_kv_evictions_total", ())] == 0
    by_state = {dict(lab)["tier"] + "/" + dict(lab)["state"]: v for (n, lab), v in got.items()
                if n == "fabric_kv_pool_blocks"}
    assert by_state == {"device/in_flight": 188, "device/cached": 0, "device/empty": 256 - 188,
                        "host/used": 0, "host/empty": 0}
    assert got[("fabric_kv_hit_blocks_total", (("tier", "device"),))] == 0
    assert got[("fabric_kv_tier_evictions_total", (("tier", "host"),))] == 0
    assert got[("fabric_kv_host_copies_out_total", (("when", "ahead"),))] == 0
    assert got[("fabric_prompt_tokens_total", (("source", "cache"),))] == 4
    assert got[("fabric_prompt_tokens_total", (("source", "computed"),))] == 6
    assert got[("fabric_useful_tokens_total", ())] == 15
    assert got[("fabric_padding_fraction", (("kind", "attention"),))] == pytest.approx(0.25)
    assert got[("fabric_ready", ())] == 1 and got[("fabric_held_messages", ())] == 1
    assert got[("fabric_dead_letters_total", ())] == 2
    assert 3.0 <= got[("fabric_executor_last_step_age_seconds", ())] < 60
    assert got[("fabric_intra_op_threads", ())] == 1
    assert got[("fabric_intra_op_thread_probes_total", ())] == 4
    assert got[("fabric_cpu_wait_seconds_total", ())] == 12.5
    assert got[("fabric_cpu_wait_ratio", ())] == 0.6 and got[("fabric_cpu_starved", ())] == 1


def test_collector_before_connect_and_after_executor_death() -> None:
    w = fake_worker(started=False)
    reg = CollectorRegistry()
    reg.register(WorkerCollector(w))
    got = scrape(reg)
    assert got[("fabric_ready", ())] == 0 and got[("fabric_executor_alive", ())] == 0
    assert got[("fabric_broker_connected", ())] == 0
    assert got[("fabric_queue_capacity", (("stage", "publisher"),))] == 0
    w = fake_worker()
    reg = CollectorRegistry()
    reg.register(WorkerCollector(w))
    w.state.executor_alive = False
    got = scrape(reg)
    assert got[("fabric_ready", ())] == 0 and got[("fabric_executor_alive", ())] == 0


# -- health -----------------------------------------------------------------------------


def test_liveness() -> None:
    assert liveness(None).ok and liveness(None).reason == "loading model"
    assert liveness(fake_worker(started=False).view()).reason == "starting"
    w = fake_worker()
    assert liveness(w.view()).ok
    w.state.executor_alive = False
    assert not liveness(w.view()).ok and "executor" in liveness(w.view()).reason
    w = fake_worker()
    w.state.faulted = True  # fatal: executor stalled
    assert not liveness(w.view()).ok and liveness(w.view()).reason == "fault: exiting"


def test_readiness_through_the_lifecycle() -> None:
    assert readiness(None).reason == "loading model" and not readiness(None).ok
    w = fake_worker(started=False)
    assert readiness(w.view()).reason == "connecting to the broker"
    w.state.connected = True  # connected, verifying the topology
    assert readiness(w.view()).reason == "starting"
    w = fake_worker()
    assert readiness(w.view()).ok and readiness(w.view()).reason == "ready"
    w.state.connected = False
    assert readiness(w.view(), was_ready=True).reason == "broker disconnected"
    w.state.connected = True
    w.state.ready = False
    assert readiness(w.view(), was_ready=True).reason == "stopping"
    w.state.draining = True
    assert readiness(w.view(), was_ready=True).reason == "draining"
    w = fake_worker()
    w.state.executor_alive = False
    assert readiness(w.view()).reason == "executor thread is not running"
    w = fake_worker()
    w.state.draining = True
    w.state.faulted = True  # fatal: broker unreachable for 121s
    assert readiness(w.view()).reason == "fault: exiting"


# -- the HTTP port ----------------------------------------------------------------------


def get(port: int, path: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.headers["Content-Type"], r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers["Content-Type"], e.read().decode()


def test_http_port_serves_health_before_and_after_the_worker_exists() -> None:
    obs = Observer(0, "127.0.0.1").start()
    try:
        assert get(obs.port, "/healthz")[0] == 200
        code, ctype, body = get(obs.port, "/readyz")
        assert (code, ctype, json.loads(body)) == (
            503, "application/json", {"ok": False, "reason": "loading model"})
        code, _, body = get(obs.port, "/metrics")
        assert code == 200 and "fabric_" not in body  # process metrics only, so far
        w = fake_worker()
        obs.attach(w)
        code, ctype, body = get(obs.port, "/metrics")
        assert code == 200 and ctype.startswith("text/plain") and "fabric_jobs_total" in body
        assert get(obs.port, "/readyz")[0] == 200
        assert get(obs.port, "/readyz?verbose=1")[0] == 200
        w.state.draining = True
        code, _, body = get(obs.port, "/readyz")
        assert code == 503 and json.loads(body)["reason"] == "draining"
        w.state.executor_alive = False
        assert get(obs.port, "/healthz")[0] == 503
        assert get(obs.port, "/nope")[0] == 404
    finally:
        obs.close()


def test_a_taken_port_exits_with_the_config_status(capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        with pytest.raises(SystemExit) as e:
            start_http(s.getsockname()[1], "127.0.0.1")
    assert e.value.code == 2 and "--metrics-port" in capsys.readouterr().err


# -- GPU metrics --------------------------------------------------------------------------


class NotSupported(Exception):
    pass


class FakeNvml:
    NVML_TEMPERATURE_GPU = 0

    def __init__(self, fail_init: bool = False):
        self.fail_init = fail_init
        self.power_calls = 0

    def nvmlInit(self) -> None:
        if self.fail_init:
            raise OSError("NVML Shared Library Not Found")

    def nvmlDeviceGetHandleByIndex(self, i: int) -> str:
        return f"h{i}"

    def nvmlDeviceGetHandleByUUID(self, u: str) -> str:
        return u

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, h):
        return SimpleNamespace(used=30 * 2**30, total=80 * 2**30, free=50 * 2**30)

    def nvmlDeviceGetPowerUsage(self, h) -> int:
        self.power_calls += 1
        raise NotSupported("Not Supported")

    def nvmlDeviceGetTemperature(self, h, sensor) -> int:
        return 61


def gpu_scrape(collector: GpuCollector) -> dict[tuple[str, tuple], float]:
    reg = CollectorRegistry()
    reg.register(collector)
    return scrape(reg)


def test_gpu_metrics_from_nvml_and_unsupported_readings_dropped_quietly() -> None:
    nvml = FakeNvml()
    with structlog.testing.capture_logs() as logs:
        gpu = GpuCollector("cuda:1", nvml=nvml, environ={"CUDA_VISIBLE_DEVICES": "2,5"})
        first, second = gpu_scrape(gpu), gpu_scrape(gpu)
    dev = (("device", "cuda:1"),)
    assert first == second
    assert first[("fabric_gpu_sm_utilization_ratio", dev)] == pytest.approx(0.87)
    assert first[("fabric_gpu_memory_used_bytes", dev)] == 30 * 2**30
    assert first[("fabric_gpu_memory_total_bytes", dev)] == 80 * 2**30
    assert first[("fabric_gpu_temperature_celsius", dev)] == 61
    assert ("fabric_gpu_power_watts", dev) not in first
    assert nvml.power_calls == 1  # not asked again on the next scrape
    events = [e["event"] for e in logs]
    assert events == ["gpu_metrics_on", "gpu_metric_unavailable"]
    assert logs[0]["nvml_device"] == "5"


@pytest.mark.parametrize(("device", "nvml"), [("cpu", None), ("cuda:0", FakeNvml(fail_init=True))])
def test_no_gpu_means_no_gpu_series_and_one_info_line(device, nvml) -> None:
    with structlog.testing.capture_logs() as logs:
        gpu = GpuCollector(device, nvml=nvml, environ={})
        assert gpu_scrape(gpu) == {} and gpu_scrape(gpu) == {}
    assert not gpu.enabled
    assert [(e["event"], e["log_level"]) for e in logs] == [("gpu_metrics_off", "info")]


class SequencedNvml(FakeNvml):
    """Utilization readings from a list, then a lost device."""

    def __init__(self, readings: list[int]):
        super().__init__()
        self.readings = list(readings)

    def nvmlDeviceGetUtilizationRates(self, h):
        if not self.readings:
            raise OSError("GPU is lost")
        return SimpleNamespace(gpu=self.readings.pop(0), memory=0)


def test_busy_sampler_averages_nvml_utilization_until_the_reading_fails() -> None:
    from loadgen.gpubusy import BusySampler

    with BusySampler("cuda:0", interval_s=0.001, nvml=SequencedNvml([100, 90, 95, 99]),
                     environ={}) as busy:
        deadline = time.monotonic() + 10
        while busy.error is None and time.monotonic() < deadline:
            time.sleep(0.005)
    assert busy.samples == [1.0, 0.9, 0.95, 0.99] and busy.mean == pytest.approx(0.96)
    assert "GPU is lost" in busy.error


@pytest.mark.parametrize(("device", "nvml"), [("cpu", None), ("cuda:0", FakeNvml(fail_init=True))])
def test_busy_sampler_without_a_gpu_reports_nothing(device, nvml) -> None:
    from loadgen.gpubusy import BusySampler

    with BusySampler(device, interval_s=0.001, nvml=nvml, environ={}) as busy:
        time.sleep(0.01)
    assert busy.mean is None and busy.samples == []
    assert (busy.error is None) == (device == "cpu")


# -- logs -------------------------------------------------------------------------------


def _log_calls(path: Path) -> list[tuple[int, str, set[str]]]:
    """(line, event, keyword names) of every `log.<level>("event", ...)` call in a file."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and isinstance(node.func.value, ast.Name) and node.func.value.id == "log"
                and node.func.attr in ("debug", "info", "warning", "error", "exception")):
            first = node.args[0] if node.args else None
            event = first.value if isinstance(first, ast.Constant) else "<dynamic>"
            out.append((node.lineno, str(event), {k.arg for k in node.keywords if k.arg}))
    return out


def test_every_job_log_line_carries_job_and_attempt() -> None:
    root = Path(worker.__file__).parent
    missing = [f"{p.relative_to(root)}:{line} {event}" for p in sorted(root.rglob("*.py"))
               for line, event, keys in _log_calls(p)
               if ("job" in keys or event.startswith("job_")) and not {"job", "attempt"} <= keys]
    assert not missing, missing


def test_summary_has_what_an_operator_reads_at_shutdown() -> None:
    keys = set(WorkerStats().summary())
    assert {"jobs_ok", "jobs_error", "errors_by_code", "redelivered", "naked",
            "useful_tokens", "compute_padding_fraction", "idle_while_queued_s"} <= keys
