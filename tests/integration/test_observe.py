"""The observability port of the real worker binary against a real nats-server.

/metrics is scraped continuously from a worker under load: the named series exist, move,
and stay inside their bounds in every sample. /healthz and /readyz are probed through
start (broker unreachable), steady state and a SIGTERM drain. Every wait polls against a
deadline; no sleep is an assertion.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Self

import nats
import pytest
from prometheus_client.parser import text_string_to_metric_families

from loadgen.client import run_jobs
from loadgen.fleet import WorkerProcess, provision
from loadgen.workload import WorkloadSpec, generate
from schemas import encode
from worker.config import config_hash, load_config
from worker.engine.blocks import padded_tokens

pytestmark = pytest.mark.timeout(240)

Sample = dict[tuple[str, tuple], float]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(port: int, path: str) -> tuple[int, str]:
    """(status, body); status 0 when nothing listens (not up yet, or gone)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        try:
            return e.code, e.read().decode()
        except (http.client.HTTPException, OSError):
            return 0, ""  # the server went away mid-answer (the worker is exiting)
    except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError):
        return 0, ""


def scrape(port: int) -> Sample | None:
    code, body = get(port, "/metrics")
    if code != 200:
        return None
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(body) for s in fam.samples}


def by(sample: Sample, name: str, label: str) -> dict[str, float]:
    return {dict(lab)[label]: v for (n, lab), v in sample.items() if n == name}


def poll(what: Callable[[], object], deadline_s: float, why: str):
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {deadline_s}s: {why}")


class Recorder:
    """Calls `probe` every `period_s` on a thread until stopped or it returns None."""

    def __init__(self, probe: Callable[[], object | None], period_s: float):
        self.samples: list = []
        self._probe, self._period_s = probe, period_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.is_set():
            got = self._probe()
            if got is None:
                return
            self.samples.append(got)
            self._stop.wait(self._period_s)


@pytest.fixture
def start_worker(tmp_path: Path):
    started: list[WorkerProcess] = []

    def start(config: Path, name: str = "w1") -> tuple[WorkerProcess, int]:
        port = free_port()
        w = WorkerProcess(config, worker_id=name, log_path=tmp_path / f"{name}.log",
                          metrics_port=port).start()
        started.append(w)
        return w, port

    yield start
    for w in started:
        w.terminate(grace_s=10)


async def test_metrics_exist_move_and_stay_bounded_under_load(tmp_engine_toml, start_worker,
                                                              nats_url) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    w, port = start_worker(cfg)
    w.wait_ready(120)
    first = poll(lambda: scrape(port), 30, "first scrape")
    jobs = generate(WorkloadSpec(num_jobs=300, seed=21, run_id="observe"))
    with Recorder(lambda: scrape(port) or {}, 0.05) as rec:
        stats = await run_jobs(nats_url, jobs, run_id="observe", timeout_s=180, progress=False)
    assert not stats.timed_out and len(stats.outcomes) == 300
    assert all(o.ok for o in stats.outcomes.values())

    def settled() -> Sample | None:
        s = scrape(port)
        done = s and by(s, "fabric_settled_total", "action")["ack"] == 300
        return s if done and s[("fabric_held_messages", ())] == 0 else None
    last = poll(settled, 30, "all 300 jobs acked and nothing held")

    # The named series exist from the first scrape, before any job.
    names = {n for n, _ in first}
    for name in ("fabric_config_info", "fabric_jobs_total", "fabric_queue_depth",
                 "fabric_queue_capacity", "fabric_inflight_tokens", "fabric_budget_occupancy",
                 "fabric_admission_state", "fabric_padding_fraction", "fabric_step_batch_seqs_bucket",
                 "fabric_step_tokens_bucket", "fabric_step_seconds_bucket",
                 "fabric_useful_tokens_total", "fabric_time_to_first_token_seconds_bucket",
                 "fabric_job_latency_seconds_bucket", "fabric_redeliveries_total",
                 "fabric_kv_blocks_used", "fabric_kv_blocks_capacity",
                 "fabric_executor_idle_while_queued_seconds_total", "fabric_ready",
                 "process_resident_memory_bytes"):
        assert name in names, name
    assert not any(n.startswith("fabric_gpu_") for n in names)  # no GPU here: absent, not 0
    [info] = [dict(lab) for n, lab in first if n == "fabric_config_info"]
    assert info["config_hash"] == config_hash(load_config(cfg)) and info["worker"] == "w1"

    # Bounds hold in every sample taken under load.
    samples = [s for s in rec.samples if s] + [last]
    assert len(samples) >= 5, "the scraper barely ran"
    budget = last[("fabric_budget_tokens", ())]
    engine = load_config(cfg)
    max_job_tokens = padded_tokens(engine.max_seq_len, 16)
    for s in samples:
        depth = by(s, "fabric_queue_depth", "stage")
        cap = by(s, "fabric_queue_capacity", "stage")
        assert depth.keys() == cap.keys() == {"pending", "executor_waiting", "executor_running",
                                              "publisher"}
        assert all(0 <= depth[k] <= cap[k] for k in depth), (depth, cap)
        assert 0 <= s[("fabric_inflight_tokens", ())] <= budget
        # Pending is bounded in jobs (each reserves at least one block); in tokens only by
        # that many jobs of the longest kind, since a fetch cannot know sizes in advance.
        assert 0 <= s[("fabric_pending_tokens", ())] <= cap["pending"] * max_job_tokens
        assert 0 <= s[("fabric_budget_occupancy", ())] <= 1
        assert s[("fabric_kv_blocks_used", ())] <= s[("fabric_kv_blocks_capacity", ())]
        assert sorted(by(s, "fabric_admission_state", "state").values()) == [0, 1]
        for kind, frac in by(s, "fabric_padding_fraction", "kind").items():
            assert 0 <= frac <= 1, (kind, frac)

    # ... and the levels moved while jobs ran.
    assert max(s[("fabric_inflight_tokens", ())] for s in samples) > 0
    assert max(s[("fabric_kv_blocks_used", ())] for s in samples) > 0
    assert max(sum(by(s, "fabric_queue_depth", "stage").values()) for s in samples) > 0

    # The counters add up to what the producer saw.
    jobs_total = by(last, "fabric_jobs_total", "outcome")
    assert jobs_total["ok"] == 300 and last[("fabric_results_published_total", ())] == 300
    assert sum(v for (n, lab), v in last.items()
               if n == "fabric_jobs_total" and dict(lab)["outcome"] == "error") == 0
    useful = sum(o.prompt_tokens + o.completion_tokens for o in stats.outcomes.values())
    assert last[("fabric_useful_tokens_total", ())] == useful
    assert useful <= last[("fabric_computed_tokens_total", ())]
    assert last[("fabric_time_to_first_token_seconds_count", ())] == 300
    assert last[("fabric_job_latency_seconds_count", ())] == 300
    steps = last[("fabric_step_batch_seqs_count", ())]
    assert steps > 0 and last[("fabric_step_tokens_count", ())] == steps
    assert 0 < last[("fabric_step_tokens_sum", ())] <= last[("fabric_computed_tokens_total", ())]
    assert sum(by(last, "fabric_step_seconds_count", "phase").values()) == steps
    assert last[("fabric_redeliveries_total", ())] == 0
    assert last[("fabric_inflight_tokens", ())] == 0 and last[("fabric_kv_blocks_used", ())] == 0
    assert last[("fabric_executor_busy_seconds_total", ())] > 0
    assert last[("fabric_ready", ())] == 1


def _health(port: int) -> tuple[int, str, int] | None:
    """(readyz status, readyz reason, healthz status), or None once nothing listens."""
    code, body = get(port, "/readyz")
    if code == 0:
        return None
    return code, json.loads(body)["reason"], get(port, "/healthz")[0]


async def test_health_while_the_broker_is_unreachable(tmp_engine_toml, start_worker) -> None:
    # Nothing listens on port 1: the worker keeps retrying its first connect.
    cfg = tmp_engine_toml(nats_url="nats://127.0.0.1:1")
    w, port = start_worker(cfg)
    # The port answers from before the model loads ("loading model"), then connecting.
    first = poll(lambda: _health(port), 120, "the port to answer")
    assert first[0] == 503 and first[2] == 200
    assert first[1] in ("loading model", "connecting to the broker")
    code, reason, live = poll(lambda: (h := _health(port)) and h[1] != "loading model" and h,
                              120, "the model to load")
    assert (code, reason, live) == (503, "connecting to the broker", 200)
    assert w.returncode is None


async def test_readiness_through_start_steady_state_and_drain(tmp_engine_toml, start_worker,
                                                              nats_url) -> None:
    cfg = tmp_engine_toml(model="builtin:small", token_budget=8192, low_water=4096)
    provision(cfg)
    w, port = start_worker(cfg)
    with Recorder(lambda: _health(port) or (0, "", 0), 0.02) as starting:
        w.wait_ready(120)
        poll(lambda: starting.samples[-1:] == [(200, "ready", 200)], 30,
             "ready after worker_ready")
    seen = [s for s in starting.samples if s[0]]
    assert seen[-1] == (200, "ready", 200)
    # Alive all along once it answers; once ready, ready in every probe after.
    assert all(live == 200 for _, _, live in seen)
    first_ready = next(i for i, s in enumerate(seen) if s[0] == 200)
    assert all(s[0] == 200 for s in seen[first_ready:])

    # Load it, so there is in-flight work to drain when SIGTERM comes.
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    for j in generate(WorkloadSpec(num_jobs=300, seed=22, run_id="health")):
        await js.publish("fabric.jobs.health", encode(j.to_job("fabric.results.health")))
    await nc.close()
    poll(lambda: (s := scrape(port)) and s[("fabric_inflight_tokens", ())] > 0, 60,
         "jobs in flight")
    assert _health(port) == (200, "ready", 200)

    with Recorder(lambda: _health(port), 0.02) as draining:
        code = await asyncio.to_thread(w.terminate, 60)
    assert code == 0
    seen = draining.samples
    assert seen, "the port went away before the first probe"
    # Once not ready it stays not ready; while it drains the process is still alive.
    went = next((i for i, s in enumerate(seen) if s[0] != 200), None)
    assert went is not None, seen[-5:]
    assert all(s[0] == 503 for s in seen[went:]), seen[went:]
    assert (503, "draining", 200) in seen[went:], seen[went:]
