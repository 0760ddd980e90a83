"""Failure semantics on the real binary, one broker: poison jobs end in the dead-letter
stream after max_deliver deliveries across crashes and restarts, and an operator can list
and replay them; deadlines are checked again at admission; in-progress heartbeats keep
long jobs alive under a short ack wait; a fault leaves nothing waiting for the ack wait."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from loadgen.fleet import WorkerProcess, provision, worker_env
from schemas import Job
from tests.chaos.harness import (consumer_state, count_results, dead_letters, log_events, publish,
                                 results, small_jobs, wait_results)

pytestmark = pytest.mark.timeout(240)


def names(cfg: Path) -> tuple[str, str]:
    t = tomllib.loads(cfg.read_text())
    return t["stream"], t["consumer"]


@pytest.fixture
def start_worker(tmp_path: Path):
    started: list[WorkerProcess] = []

    def start(cfg: Path, name: str, args=(), env=None, wait: bool = True) -> WorkerProcess:
        w = WorkerProcess(cfg, worker_id=name, log_path=tmp_path / f"{name}.log",
                          extra_args=list(args), env=env).start()
        started.append(w)
        if wait:
            w.wait_ready(120)
        return w

    yield start
    for w in started:
        w.terminate(grace_s=5)


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "worker", *args], env=worker_env(),
                          capture_output=True, text=True, timeout=timeout)


async def test_poison_job_is_dead_lettered_after_max_deliver_across_restarts(
        tmp_engine_toml, nats_url, start_worker) -> None:
    cfg = tmp_engine_toml()
    stream, consumer = names(cfg)
    provision(cfg, extra_args=["--max-deliver", "4", "--ack-wait-s", "10"])
    reply = f"fabric.results.{stream}"
    poison = Job(id="poison-1", prompt=[7, 8, 9, 10], max_new_tokens=8, reply_to=reply)
    good = small_jobs("good", 30, seed=3, reply_to=reply, max_new=8)
    # The poison job first: the worker's cautious first fetch takes it alone, and the good
    # jobs that follow share its first (batched) run and its first crash.
    await publish(nats_url, [poison], f"fabric.jobs.{stream}")
    await publish(nats_url, good, f"fabric.jobs.{stream}")
    env = {"FABRIC_FAILPOINTS": "executor.step=raise:job=poison-"}
    args = ["--solo-from-attempt", "2"]
    crashes, workers = 0, []
    deadline = time.monotonic() + 150
    while await count_results(nats_url, reply) < len(good) + 1:
        assert time.monotonic() < deadline, [w.log_tail() for w in workers]
        w = start_worker(cfg, f"w{len(workers)}", args=args, env=env)
        workers.append(w)
        while w.returncode is None and await count_results(nats_url, reply) < len(good) + 1:
            await asyncio.sleep(0.2)
        if w.returncode is not None:
            assert w.returncode == 1, w.log_tail()
            crashes += 1
    # Deliveries 1-3 crashed a worker each; delivery 4 (max_deliver) was dead-lettered unrun.
    assert crashes == 3
    solo = [e for w in workers for e in log_events(w, "job_solo") if e["job"] == "poison-1"]
    assert sorted(e["attempt"] for e in solo) == [2, 3]
    got = await results(nats_url, reply)
    assert got.keys() == {j.id for j in good} | {"poison-1"}
    assert all(len(v) == 1 for v in got.values())
    assert all(got[j.id][0].ok for j in good)
    p = got["poison-1"][0]
    assert not p.ok and p.error.code == "poison" and p.attempt == 4
    letters = await dead_letters(nats_url, stream)
    assert len(letters) == 1
    headers, data = letters[0]
    assert headers["Fabric-Job-Id"] == "poison-1" and headers["Fabric-Deliveries"] == "4"
    assert headers["Fabric-Subject"] == f"fabric.jobs.{stream}"
    assert "max_deliver 4" in headers["Fabric-Error"]
    from schemas import decode_job
    assert decode_job(data) == poison  # the payload as the producer sent it
    info = await consumer_state(nats_url, stream, consumer)
    assert info.num_ack_pending == 0 and info.num_pending == 0

    # The operator's view, and a replay once the cause is gone (no failpoint now).
    out = cli("dlq", "list", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    rows = [line for line in out.stdout.splitlines() if not line.startswith("#")]
    assert len(rows) == 1 and "poison-1" in rows[0] and "deliveries=4" in rows[0]
    seq = rows[0].split("\t")[0]
    # The cause goes away: the last worker (it dead-lettered delivery 4 and is still up, its
    # failpoint armed) stops first, or it could take the replay, crash on it, and hand the
    # healthy worker a second delivery.
    for w in workers:
        if w.returncode is None:
            w.terminate()
    healthy = start_worker(cfg, "healthy")
    answered = asyncio.Event()

    import nats
    nc = await nats.connect(nats_url)
    replayed = []

    async def on_result(m) -> None:
        from schemas import decode_result
        r = decode_result(m.data)
        if r.id == "poison-1":
            replayed.append(r)
            answered.set()

    await nc.subscribe(reply, cb=on_result)
    await nc.flush()
    out = cli("dlq", "replay", "--config", str(cfg), "--seq", seq)
    assert out.returncode == 0 and "replayed" in out.stdout, out.stderr
    await asyncio.wait_for(answered.wait(), 60)
    await nc.close()
    assert replayed[0].ok and replayed[0].attempt == 1 and replayed[0].worker == "healthy"
    assert await dead_letters(nats_url, stream) == []
    assert healthy.returncode is None


async def test_deadline_checked_again_at_admission(tmp_engine_toml, nats_url, start_worker) -> None:
    """Jobs that expire while they wait for admission get `expired` without device time."""
    cfg = tmp_engine_toml(token_budget=256, low_water=128, max_seq_len=128)
    stream, consumer = names(cfg)
    provision(cfg)
    # Slow steps and a small budget: most jobs wait in the pending queue for seconds.
    w = start_worker(cfg, "w1", env={"FABRIC_FAILPOINTS": "executor.step=sleep(0.05)"})
    reply = f"fabric.results.{stream}"
    soon = time.time() + 2.0
    jobs = [Job(id=f"d-{i}", prompt=[1 + i % 200] * 20, max_new_tokens=24, reply_to=reply,
                deadline_s=soon) for i in range(40)]
    await publish(nats_url, jobs, f"fabric.jobs.{stream}")
    await wait_results(nats_url, reply, len(jobs), 60, [w])
    got = await results(nats_url, reply)
    ran = [v[0] for v in got.values() if v[0].ok]
    expired = [v[0] for v in got.values() if not v[0].ok]
    assert ran and expired, (len(ran), len(expired))
    assert all(r.error.code == "expired" and r.finish_reason == "expired" for r in expired)
    assert all(r.usage.completion_tokens == 0 for r in expired)
    # They were fetched before the deadline (the edge let them in), so admission caught them.
    assert any("waited for admission" in r.error.message for r in expired)
    info = await consumer_state(nats_url, stream, consumer)
    assert info.num_ack_pending == 0 and info.num_redelivered == 0


async def test_heartbeats_keep_long_jobs_alive_under_a_short_ack_wait(
        tmp_engine_toml, nats_url, start_worker) -> None:
    """Each job takes ~3x the 1.5 s ack wait; in-progress acks keep the broker from
    redelivering it to the second worker, so nothing runs twice."""
    cfg = tmp_engine_toml()
    stream, consumer = names(cfg)
    provision(cfg, extra_args=["--ack-wait-s", "1.5"])
    env = {"FABRIC_FAILPOINTS": "executor.step=sleep(0.15)"}
    w1 = start_worker(cfg, "w1", env=env)
    w2 = start_worker(cfg, "w2", env=env)
    reply = f"fabric.results.{stream}"
    jobs = [Job(id=f"long-{i}", prompt=[5 + i] * 8, max_new_tokens=32, reply_to=reply)
            for i in range(6)]
    t0 = time.monotonic()
    await publish(nats_url, jobs, f"fabric.jobs.{stream}")
    await wait_results(nats_url, reply, len(jobs), 90, [w1, w2])
    assert time.monotonic() - t0 > 3 * 1.5  # the jobs did outlive the ack wait
    got = await results(nats_url, reply)
    assert all(len(v) == 1 and v[0].ok and v[0].attempt == 1 for v in got.values())
    info = await consumer_state(nats_url, stream, consumer)
    assert info.num_redelivered == 0 and info.num_ack_pending == 0
    assert not log_events(w1, "job_redelivered") and not log_events(w2, "job_redelivered")


async def test_fault_leaves_nothing_for_the_ack_wait(tmp_engine_toml, nats_url, start_worker) -> None:
    """Alone on the consumer, a worker that faults naks everything it held (pending, in
    flight, late deliveries): a worker started after it gets all of it at once, well inside
    the 60 s ack wait, and each message was redelivered exactly once."""
    cfg = tmp_engine_toml()
    stream, consumer = names(cfg)
    provision(cfg, extra_args=["--ack-wait-s", "60"])
    w1 = start_worker(cfg, "w1", env={"FABRIC_FAILPOINTS":
                                      "executor.step=sleep(0.05);executor.step=raise@12"})
    reply = f"fabric.results.{stream}"
    jobs = small_jobs("n", 600, seed=5, reply_to=reply, max_new=32)
    await publish(nats_url, jobs, f"fabric.jobs.{stream}")
    assert await asyncio.to_thread(w1.wait, 60) == 1
    naked = log_events(w1, "fatal_naked")[0]
    t0 = time.monotonic()
    w2 = start_worker(cfg, "w2")
    await wait_results(nats_url, reply, len(jobs), 50, [w2])
    assert time.monotonic() - t0 < 40  # not the 60 s ack wait
    got = await results(nats_url, reply)
    assert all(len(v) == 1 and v[0].ok for v in got.values())
    redelivered = {e["job"]: e["attempt"] for e in log_events(w2, "job_redelivered")}
    assert set(naked["jobs"]) <= redelivered.keys()
    assert set(redelivered.values()) == {2}  # handed over once, never back to w1's own request
    info = await consumer_state(nats_url, stream, consumer)
    assert info.num_ack_pending == 0 and info.num_pending == 0


def test_connect_refused_or_unreachable_exits_2_quickly(tmp_engine_toml) -> None:
    cfg = tmp_engine_toml(nats_url="nats://user:hunter2@127.0.0.1:1")
    t0 = time.monotonic()
    p = cli("run", "--config", str(cfg), "--connect-give-up-s", "2")
    assert p.returncode == 2 and "cannot connect" in p.stderr
    assert time.monotonic() - t0 < 30
    assert "hunter2" not in p.stderr + p.stdout
