"""The real worker binary against a real nats-server: answered exactly once, bad input
answered with errors, SIGTERM drains, bad config refused before any connection."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import msgpack
import nats
import pytest

from loadgen.backlog import result_counts
from loadgen.rung import log_event
from loadgen.client import run_jobs
from loadgen.fleet import provision, worker_env
from loadgen.workload import WorkloadSpec, generate
from schemas import Job, Sampling, decode_result, encode
from tests.chaos.harness import log_events
from worker.engine.build import build_engine
from worker.engine.step import generate as engine_generate
from worker.engine.sequence import Request

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def reference_engine():
    return build_engine("builtin:tiny", "cpu", "float32", 32768, 1088)


def reference_tokens(engine, job: Job) -> list[int]:
    r = Request.greedy(1, list(job.prompt), job.max_new_tokens)
    return engine_generate(engine, [r])[0].tokens


def summary_of(log_path: Path) -> dict:
    for line in log_path.read_text().splitlines():
        if '"worker_summary"' in line:
            return json.loads(line)
    raise AssertionError(f"no worker_summary in {log_path}")


# The CPU's default runner, and the pipelined one (CUDA's default: staged copies, fixed-
# shape decode steps, overlapped steps) run on the CPU, so the worker's whole path is tested.
RUNNERS = pytest.mark.parametrize("runner", ["eager", "pipelined"])


@RUNNERS
async def test_ragged_jobs_answered_exactly_once(tmp_engine_toml, workers, nats_url,
                                                 reference_engine, runner) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    workers(cfg, extra_args=("--runner", runner))
    jobs = generate(WorkloadSpec(num_jobs=300, seed=11, run_id="ragged"))
    stats = await run_jobs(nats_url, jobs, run_id="ragged", timeout_s=180, progress=False)
    assert not stats.timed_out
    assert len(stats.outcomes) == 300 and stats.duplicates == 0
    assert all(o.ok for o in stats.outcomes.values())
    for o in stats.outcomes.values():
        assert o.padded_tokens == o.prompt_tokens + o.completion_tokens  # continuous: no pad
    # Greedy results equal the job run alone through the same model.
    by_id = {j.id: j for j in jobs}
    for jid in list(by_id)[::15]:
        j = by_id[jid]
        ref = reference_tokens(reference_engine, j.to_job("fabric.results.x"))
        got = stats.outcomes[jid]
        assert got.completion_tokens == len(ref)
    counts = await result_counts(nats_url, "fabric.results.ragged")
    assert counts == {j.id: 1 for j in jobs}


@RUNNERS
async def test_results_match_reference_tokens(tmp_engine_toml, workers, nats_url,
                                              reference_engine, runner) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    w = workers(cfg, extra_args=("--runner", runner))
    ready = log_event(w.log_path, "runner_ready")
    assert (ready["mode"], ready["overlap"]) == (runner, runner == "pipelined")
    jobs = generate(WorkloadSpec(num_jobs=40, seed=12, run_id="exact"))
    got: dict[str, list[int]] = {}
    nc = await nats.connect(nats_url)
    done = asyncio.Event()

    async def on_result(m) -> None:
        r = decode_result(m.data)
        got[r.id] = r.tokens
        if len(got) == len(jobs):
            done.set()

    await nc.subscribe("fabric.results.exact", cb=on_result)
    js = nc.jetstream()
    for j in jobs:
        await js.publish("fabric.jobs.exact", encode(j.to_job("fabric.results.exact")))
    await asyncio.wait_for(done.wait(), 120)
    await nc.close()
    for j in jobs:
        assert got[j.id] == reference_tokens(reference_engine, j.to_job("fabric.results.x")), j.id


@RUNNERS
async def test_jobs_run_alone_are_answered(tmp_engine_toml, workers, nats_url,
                                           reference_engine, runner) -> None:
    """Suspected poison jobs (here: every job, from its first delivery) run one at a time
    with nothing else in the step, to the end, and are answered like any other."""
    cfg = tmp_engine_toml()
    provision(cfg)
    w = workers(cfg, extra_args=("--runner", runner, "--solo-from-attempt", "1"))
    jobs = generate(WorkloadSpec(num_jobs=12, seed=14, run_id="alone"))
    stats = await run_jobs(nats_url, jobs, run_id="alone", timeout_s=120, progress=False)
    assert not stats.timed_out and len(stats.outcomes) == 12
    assert all(o.ok for o in stats.outcomes.values())
    for j in jobs:
        ref = reference_tokens(reference_engine, j.to_job("fabric.results.x"))
        assert stats.outcomes[j.id].completion_tokens == len(ref)
    assert len(log_events(w, "job_solo")) == 12


MALFORMED: list[tuple[bytes, str | None]] = [
    (b"\xc1\xff not msgpack", None),
    (msgpack.packb([1, 2, 3]), None),
    (msgpack.packb({"id": "m-types", "prompt": "x", "max_new_tokens": "ten",
                    "reply_to": "fabric.results.bad"}), "invalid_job"),
    (msgpack.packb({"id": "m-unknown", "prompt": [1], "max_new_tokens": 1,
                    "reply_to": "fabric.results.bad", "colour": "red"}), "invalid_job"),
    (msgpack.packb({"id": "m-empty", "prompt": [], "max_new_tokens": 1,
                    "reply_to": "fabric.results.bad"}), "empty_prompt"),
    (msgpack.packb({"id": "m-neg", "prompt": [1, 2], "max_new_tokens": -3,
                    "reply_to": "fabric.results.bad"}), "invalid_job"),
    (encode(Job(id="m-long", prompt=[1] * 1080, max_new_tokens=64,
                reply_to="fabric.results.bad")), "too_long"),
    (encode(Job(id="m-vocab", prompt=[1, 99999], max_new_tokens=4,
                reply_to="fabric.results.bad")), "bad_token"),
    (encode(Job(id="m-expired", prompt=[1, 2], max_new_tokens=4, deadline_s=1.0,
                reply_to="fabric.results.bad")), "expired"),
    (encode(Job(id="m-forbidden", prompt=[1, 2], max_new_tokens=4,
                reply_to="$JS.API.STREAM.DELETE.FABRIC_RESULTS")), None),
    (msgpack.packb({"id": "m-utf8", "prompt": b"\xff\xfe", "max_new_tokens": 1,
                    "reply_to": "fabric.results.bad"}), "invalid_job"),
]


async def test_malformed_inputs_answered_while_good_jobs_flow(tmp_engine_toml, workers,
                                                              nats_url) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    w = workers(cfg)
    good = [Job(id=f"g-{i}", prompt=[i % 250 + 1] * (5 + i), max_new_tokens=3,
                reply_to="fabric.results.bad") for i in range(30)]
    extra_ok = [Job(id="m-zero", prompt=[1, 2, 3], max_new_tokens=0, reply_to="fabric.results.bad"),
                Job(id="m-text", prompt="héllo wörld", max_new_tokens=4,
                    reply_to="fabric.results.bad", sampling=Sampling(temperature=0.7, seed=5))]
    results: dict[str, object] = {}
    nc = await nats.connect(nats_url)

    async def record(m) -> None:
        r = decode_result(m.data)
        results[r.id] = r

    await nc.subscribe("fabric.results.bad", cb=record)
    js = nc.jetstream()
    payloads = [encode(j) for j in good + extra_ok]
    bad = [p for p, _ in MALFORMED]
    for i, p in enumerate(bad * 3):  # interleave, and send each bad one three times
        await js.publish("fabric.jobs.bad", p)
        await js.publish("fabric.jobs.bad", payloads[i % len(payloads)])
    for p in payloads:
        await js.publish("fabric.jobs.bad", p)
    expect_ids = {j.id for j in good + extra_ok} | {
        msgpack.unpackb(p)["id"] for p, code in MALFORMED if code is not None}
    deadline = time.monotonic() + 60
    while not expect_ids <= results.keys() and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
    assert expect_ids <= results.keys(), expect_ids - results.keys()
    for j in good + extra_ok:
        assert results[j.id].ok, results[j.id]
    assert results["m-zero"].tokens == [] and results["m-zero"].finish_reason == "length"
    assert results["m-text"].text is not None
    for payload, code in MALFORMED:
        if code is not None:
            rid = msgpack.unpackb(payload)["id"]
            assert results[rid].error.code == code, (rid, results[rid])
            assert results[rid].finish_reason == ("expired" if code == "expired" else "error")
    assert "m-forbidden" not in results  # never publish outside the result prefix
    # Nothing left unacked, nothing redelivered in a loop, the worker is still up.
    await asyncio.sleep(1.0)
    info = await js.consumer_info(cfg_stream(cfg), cfg_consumer(cfg))
    assert info.num_ack_pending == 0 and info.num_pending == 0
    assert info.num_redelivered == 0
    await nc.close()
    assert w.returncode is None


def cfg_stream(cfg: Path) -> str:
    import tomllib
    return tomllib.loads(cfg.read_text())["stream"]


def cfg_consumer(cfg: Path) -> str:
    import tomllib
    return tomllib.loads(cfg.read_text())["consumer"]


@RUNNERS
async def test_sigterm_drains_and_nothing_is_lost(tmp_engine_toml, workers, nats_url,
                                                  tmp_path, runner) -> None:
    cfg = tmp_engine_toml(model="builtin:small", token_budget=8192, low_water=4096)
    provision(cfg)
    w1 = workers(cfg, "w1", extra_args=("--runner", runner))
    jobs = generate(WorkloadSpec(num_jobs=400, seed=13, run_id="drain"))
    run = asyncio.create_task(run_jobs(nats_url, jobs, run_id="drain", timeout_s=200,
                                       progress=False))
    # Let w1 get well into the backlog, then stop it mid-flight.
    await asyncio.sleep(4.0)
    t0 = time.monotonic()
    code = await asyncio.to_thread(w1.terminate, 60)
    assert code == 0
    s1 = summary_of(tmp_path / "w1.log")
    assert s1["exit_reason"] == "SIGTERM" and s1["jobs_ok"] > 0
    assert time.monotonic() - t0 < 35  # within the default 30 s grace
    workers(cfg, "w2")  # the rest, including what w1 nak'd, goes to w2
    stats = await run
    assert not stats.timed_out and len(stats.outcomes) == 400
    assert stats.duplicates == 0 and all(o.ok for o in stats.outcomes.values())
    assert {o.worker for o in stats.outcomes.values()} == {"w1", "w2"}


def _run_cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *args], env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)


def test_bad_config_is_refused_before_any_connection(tmp_engine_toml) -> None:
    # Nothing listens on port 1: a connection attempt would hang or fail differently.
    cfg = tmp_engine_toml(nats_url="nats://127.0.0.1:1", token_budget=-5)
    t0 = time.monotonic()
    p = _run_cli("run", "--config", str(cfg))
    assert p.returncode == 2
    assert "token_budget" in p.stderr and "greater than 0" in p.stderr
    assert time.monotonic() - t0 < 30
    cfg = tmp_engine_toml(nats_url="nats://127.0.0.1:1", low_water=None)
    p = _run_cli("run", "--config", str(cfg))
    assert p.returncode == 2 and "low_water" in p.stderr
    cfg = tmp_engine_toml(nats_url="nats://127.0.0.1:1", model="builtin:nope")
    p = _run_cli("run", "--config", str(cfg))
    assert p.returncode == 2 and "model" in p.stderr and "Traceback" not in p.stderr


def test_worker_refuses_to_start_without_topology(tmp_engine_toml) -> None:
    cfg = tmp_engine_toml()
    p = _run_cli("run", "--config", str(cfg))
    assert p.returncode == 2
    assert "does not exist" in p.stderr and "provision" in p.stderr
