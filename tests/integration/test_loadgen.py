"""`fabric-loadgen run` against a real nats-server: the arrival processes' mechanics on a
stand-in responder (exact, no model noise), then the whole command as a user runs it --
a subprocess, closed loop, open loop and trace replay -- against a real worker
(builtin:tiny) whose Prometheus endpoint it scrapes, checking every report field it
promises; and what each job can ask (chat messages, stop strings, logprobs, JSON) with a
share of the jobs cancelled while they wait or run.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from loadgen.arrivals import Closed, poisson
from loadgen.broker import EmbeddedNats
from loadgen.cli import _verdict
from loadgen.client import run_jobs
from loadgen.fleet import WorkerProcess, provision, worker_env, write_engine_toml
from loadgen.report import build_report
from loadgen.workload import Uniform, WorkloadSpec, generate
from schemas import ErrorCode, FinishReason, Result, Usage, decode_job, decode_result, encode
from loadgen.broker import delete_streams
from tests.conftest import ENGINE_DEFAULTS

pytestmark = pytest.mark.timeout(180)

# The stand-in responder's subjects sit outside fabric.jobs.>, which the worker's stream
# owns while this module runs (JetStream refuses overlapping streams).
STUB_JOBS = "loadtest.jobs."
STUB_RESULTS = "loadtest.results."
# Jobs whose ids start with this take 20 ms more per step on the shared worker, so a cancel
# sent a little after them finds them waiting or running; other runs are not slowed.
SLOW = "slow-"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- the arrival mechanics, on a stand-in responder -------------------------------------


class Stub:
    """Answers every job on STUB_JOBS after `hold_s` (never, if None), and records when
    each arrived and how many it held at once."""

    def __init__(self, hold_s: float | None) -> None:
        self.hold_s = hold_s
        self.arrived_s: dict[str, float] = {}
        self.holding = 0
        self.max_holding = 0
        self._tasks: set[asyncio.Task] = set()

    async def serve(self, nc: nats.NATS) -> None:
        async def answer(msg) -> None:
            job = decode_job(msg.data)
            self.arrived_s[job.id] = time.monotonic()
            self.holding += 1
            self.max_holding = max(self.max_holding, self.holding)
            if self.hold_s is None:
                return
            await asyncio.sleep(self.hold_s)
            self.holding -= 1
            n = len(job.prompt)
            res = Result(id=job.id, ok=True, tokens=[1] * job.max_new_tokens,
                         finish_reason=FinishReason.LENGTH, worker="stub", attempt=1,
                         usage=Usage(prompt_tokens=n, completion_tokens=job.max_new_tokens,
                                     padded_tokens=n + job.max_new_tokens))
            await nc.publish(job.reply_to, encode(res))

        async def on_job(msg) -> None:
            # Each job its own task, so holds overlap as they would in a worker.
            self._tasks.add(task := asyncio.create_task(answer(msg)))
            task.add_done_callback(self._tasks.discard)

        await nc.subscribe(f"{STUB_JOBS}>", cb=on_job)
        await nc.flush()


@pytest.fixture
async def stub_stream(nats_url: str):
    name = f"LOADTEST_{secrets.token_hex(4)}"
    nc = await nats.connect(nats_url)
    await nc.jetstream().add_stream(name=name, subjects=[f"{STUB_JOBS}>"])
    yield nc
    await nc.jetstream().delete_stream(name)
    await nc.close()


def stub_jobs(n: int, run_id: str):
    return generate(WorkloadSpec(num_jobs=n, seed=3, run_id=run_id,
                                 prompt_lengths=Uniform(4, 16), max_new_tokens=4))


async def test_closed_loop_keeps_n_outstanding(stub_stream, nats_url: str) -> None:
    stub = Stub(hold_s=0.03)
    await stub.serve(stub_stream)
    stats = await run_jobs(nats_url, stub_jobs(60, "closed"), run_id="closed",
                           subject_prefix=STUB_JOBS, result_prefix=STUB_RESULTS,
                           arrival=Closed(5), progress=False, timeout_s=30)
    assert len(stats.outcomes) == 60 and not stats.timed_out
    assert stub.max_holding == 5 and stats.max_in_flight == 5
    # 60 jobs, 5 at a time, 30 ms each: at least 12 rounds.
    assert stats.last_arrived_s - stats.first_sent_s >= 12 * 0.03


async def test_closed_loop_waits_for_results(stub_stream, nats_url: str) -> None:
    stub = Stub(hold_s=None)  # answers nothing: the loop must not publish a fourth job
    await stub.serve(stub_stream)
    stats = await run_jobs(nats_url, stub_jobs(20, "stall"), run_id="stall",
                           subject_prefix=STUB_JOBS, result_prefix=STUB_RESULTS,
                           arrival=Closed(3), progress=False, timeout_s=1.0)
    assert stats.timed_out
    assert len(stats.sent_s) == 3 and len(stub.arrived_s) == 3


async def test_open_loop_publishes_on_its_schedule(stub_stream, nats_url: str) -> None:
    stub = Stub(hold_s=0.5)  # slower than arrivals: an open loop does not wait for it
    await stub.serve(stub_stream)
    jobs = stub_jobs(40, "open")
    schedule = poisson(len(jobs), 40.0, seed=2)
    stats = await run_jobs(nats_url, jobs, run_id="open", subject_prefix=STUB_JOBS,
                           result_prefix=STUB_RESULTS, arrival=schedule, progress=False,
                           timeout_s=30)
    assert len(stats.outcomes) == 40
    t0 = stub.arrived_s[jobs[0].id]
    late_s = [stub.arrived_s[j.id] - t0 - off for j, off in zip(jobs, schedule.offsets_s)]
    assert max(abs(x) for x in late_s) < 0.25, late_s
    assert stats.max_in_flight > 5  # held 0.5 s each at 40/s: ~20 at once
    assert stats.arrival["process"] == "open" and len(stats.lag_s) == 40


# -- the command, against a real worker ---------------------------------------------------


@pytest.fixture(scope="module")
def deployment(nats_server: EmbeddedNats, tmp_path_factory) -> Iterator[tuple[str, str]]:
    """One builtin:tiny worker with its metrics port: (nats url, metrics url)."""
    work = tmp_path_factory.mktemp("loadgen")
    tag = secrets.token_hex(4)
    stream = f"T_{tag}"
    config = write_engine_toml(work / "engine.toml", {
        "nats_url": nats_server.url, "stream": stream, "consumer": f"c_{tag}",
        **ENGINE_DEFAULTS})
    provision(config)
    port = free_port()
    worker = WorkerProcess(config, worker_id="lg-0", log_path=work / "worker.log",
                           metrics_port=port,
                           env={"FABRIC_FAILPOINTS": f"executor.step=sleep(0.02):job={SLOW}"},
                           ).start()
    try:
        worker.wait_ready(120)
        yield nats_server.url, f"http://127.0.0.1:{port}/metrics"
    finally:
        worker.terminate(grace_s=10)
        if nats_server.is_running():
            asyncio.run(delete_streams(nats_server.url, stream))


def loadgen_run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "report.json"
    p = subprocess.run([sys.executable, "-m", "loadgen", "run", "--json", str(out), *args],
                       env=worker_env(), capture_output=True, text=True, timeout=120)
    assert out.exists(), f"exit {p.returncode}\n{p.stdout}\n{p.stderr}"
    return p, json.loads(out.read_text())


def check_common(report: dict, jobs: int) -> None:
    """What every run against a healthy worker must report, whatever its arrivals."""
    assert report["jobs_total"] == report["jobs_sent"] == report["jobs_published"] == jobs
    assert report["wall_s"] > 0 and report["jobs_per_s"] > 0
    assert report["useful_tokens_per_s"] > report["jobs_per_s"]
    for key in ("latency_ms", "worker_latency_ms", "ttft_ms"):
        p = report[key]
        assert 0 < p["p50"] <= p["p90"] <= p["p99"], (key, p)
    assert report["ttft_ms"]["p50"] <= report["worker_latency_ms"]["p50"]
    assert report["padding_fraction"] == 0.0  # continuous batching pads nothing
    assert report["duplicates"] == report["strays"] == report["undecodable"] == 0
    assert report["workers"] == {"lg-0": report["jobs_ok"]}
    wm = report["worker_metrics"]
    assert wm["scrape_errors"] == 0 and wm["samples"] >= 3
    assert wm["budget_occupancy_mean"] is not None and 0 < wm["budget_occupancy_mean"] <= 1
    assert wm["padding_fraction_during_run"]["compute"] == 0.0
    assert 0 <= wm["padding_fraction_during_run"]["attention"] < 1
    assert set(wm["padding_fraction_at_end"]) == {"compute", "attention"}


def test_closed_loop_run(deployment, tmp_path: Path) -> None:
    url, metrics = deployment
    p, report = loadgen_run(tmp_path, "--nats-url", url, "--metrics-url", metrics,
                            "--metrics-period-s", "0.1", "--workload", "bimodal",
                            "--doc-share", "0.5", "--jobs", "80", "--concurrency", "16")
    assert p.returncode == 0, p.stderr
    check_common(report, 80)
    assert report["jobs_ok"] == 80 and report["errors_by_code"] == {}
    assert report["arrival"] == {"process": "closed", "concurrency": 16}
    assert report["max_in_flight"] == 16 and report["arrival_lag_ms"] is None
    # Sixteen outstanding, half of them documents of ~1000 padded tokens, against a
    # 4096-token budget: jobs wait for admission, and while they wait the budget is used.
    wm = report["worker_metrics"]
    assert wm["samples_while_queued"] >= 2
    assert 0.3 < report["budget_occupancy_while_queued"] <= 1.0
    assert report["budget_occupancy_while_queued"] == wm["budget_occupancy_while_queued"]
    assert "closed loop, 16 outstanding" in p.stdout and "budget occupancy" in p.stdout
    # The live bar: jobs done, in flight, useful tokens/s.
    assert "80/80" in p.stderr and "in_flight=" in p.stderr and "tok_s=" in p.stderr


def test_open_loop_run(deployment, tmp_path: Path) -> None:
    url, metrics = deployment
    p, report = loadgen_run(tmp_path, "--nats-url", url, "--metrics-url", metrics,
                            "--metrics-period-s", "0.1", "--workload", "uniform",
                            "--prompt-min", "16", "--prompt-max", "128",
                            "--max-new-tokens", "16", "--jobs", "60", "--rate", "30",
                            "--no-progress")
    assert p.returncode == 0, p.stderr
    check_common(report, 60)
    a = report["arrival"]
    assert (a["process"], a["rate_per_s"], a["seed"]) == ("open", 30.0, 0)
    assert 20 < a["offered_jobs_per_s"] < 45
    # Open loop: the run lasts as long as its schedule, whatever the worker's speed.
    assert report["wall_s"] >= a["schedule_s"]
    assert report["jobs_per_s"] < 1.5 * a["offered_jobs_per_s"]
    assert report["arrival_lag_ms"]["p99"] < 500
    assert report["max_in_flight"] < 60


def test_trace_replay_reports_errors_by_code(deployment, tmp_path: Path) -> None:
    url, metrics = deployment
    trace = tmp_path / "trace.jsonl"
    rows = [{"arrival_s": 1000 + i * 0.05, "prompt_tokens": 10 + 7 * i, "max_new_tokens": 8}
            for i in range(20)]
    rows[7]["prompt_tokens"] = 2000  # past max_seq_len: the worker answers too_long
    trace.write_text("".join(json.dumps(r) + "\n" for r in rows))
    p, report = loadgen_run(tmp_path, "--nats-url", url, "--metrics-url", metrics,
                            "--workload", "trace", "--trace", str(trace), "--speed", "2",
                            "--text", "--no-progress")
    assert p.returncode == 1  # not every job answered ok: the verdict says so
    assert report["jobs_total"] == 20 and report["jobs_ok"] == 19
    assert report["errors_by_code"] == {"too_long": 1}
    assert report["arrival"]["process"] == "trace" and report["arrival"]["speed"] == 2.0
    assert report["arrival"]["schedule_s"] == pytest.approx(19 * 0.05 / 2)
    assert "too_long=1" in p.stdout


STOP = "(Q"  # two bytes builtin:tiny often writes (the random model's text is mostly not text)


async def test_chat_jobs_with_stops_logprobs_and_cancels(deployment) -> None:
    """Chat jobs that run to 24 slow tokens unless a stop string ends them; a third of them
    cancelled 100 ms in. Twelve short prompts fit one step, so no job is between prefill
    chunks when its cancel lands (cancelling such a job with logprobs is a worker bug of
    its own)."""
    url, _ = deployment
    run_id = f"{SLOW}chat"
    jobs = generate(WorkloadSpec(num_jobs=12, seed=11, run_id=run_id, chat=True,
                                 prompt_lengths=Uniform(8, 32), min_new_tokens=24,
                                 max_new_tokens=24, stop=(STOP, "never-there"), logprobs=2,
                                 ignore_eos=True, cancel_fraction=0.3, cancel_after_ms=100))
    chosen = {j.id for j in jobs if j.cancel_after_s is not None}
    assert 2 <= len(chosen) <= 6
    # Our own ear on the reply subject, to read the Results' bodies, not just their outcomes.
    seen: dict[str, list[Result]] = {}

    async def on_result(msg) -> None:
        r = decode_result(msg.data)
        seen.setdefault(r.id, []).append(r)

    nc = await nats.connect(url)
    try:
        await nc.subscribe(f"fabric.results.{run_id}", cb=on_result)
        await nc.flush()
        stats = await run_jobs(url, jobs, run_id=run_id, progress=False, timeout_s=90)
        await nc.flush()
    finally:
        await nc.close()

    assert not stats.timed_out and stats.duplicates == 0
    assert sorted(seen) == sorted(j.id for j in jobs)
    assert all(len(rs) == 1 for rs in seen.values())  # exactly one Result per job
    cancelled = {i for i, (r,) in seen.items() if not r.ok}
    assert cancelled and cancelled <= chosen  # only what the run cancelled
    stopped = 0
    for (r,) in seen.values():
        if not r.ok:
            assert r.error.code is ErrorCode.CANCELLED
            assert r.finish_reason is FinishReason.CANCELLED and len(r.tokens) < 24
            continue
        assert STOP not in r.text
        assert len(r.logprobs) == len(r.tokens) and all(len(lp.top) == 2 for lp in r.logprobs)
        if r.finish_reason is FinishReason.STOP:
            stopped += 1
            assert len(r.tokens) <= 24
        else:  # ignore_eos: only max_new_tokens or a stop string ends a job
            assert r.finish_reason is FinishReason.LENGTH and len(r.tokens) == 24
    assert stopped >= 1

    report = build_report(stats)
    assert report["jobs_cancelled"] == len(cancelled) and report["jobs_error"] == 0
    assert report["jobs_ok"] + report["jobs_cancelled"] == 12
    assert report["errors_by_code"] == {}
    # Every cancel fell due while the run lasted (24 slow steps a job): one id each.
    assert report["cancels_sent"] == len(chosen)
    assert 1 <= report["cancel_messages"] <= len(chosen)
    assert _verdict(report) == 0


def test_run_sends_json_chat_jobs_and_cancels(deployment, tmp_path: Path) -> None:
    """The command, with cancels sent as soon as each job is in: they find jobs not yet
    delivered, waiting for admission (30 chat prompts overflow a step) or running."""
    url, _ = deployment
    p, report = loadgen_run(tmp_path, "--nats-url", url, "--run-id", f"{SLOW}cli",
                            "--workload", "uniform", "--prompt-min", "8", "--prompt-max", "32",
                            "--min-new-tokens", "24", "--max-new-tokens", "24", "--jobs", "30",
                            "--seed", "11", "--chat", "--json-jobs", "--stop", STOP,
                            "--ignore-eos", "--cancel-fraction", "0.3", "--cancel-after-ms", "0",
                            "--no-progress")
    assert p.returncode == 0, p.stdout + p.stderr  # cancelled jobs are not a failed run
    assert report["undecodable"] == 0  # the Results came back as JSON and were read
    assert report["jobs_cancelled"] >= 1 and report["jobs_error"] == 0
    assert report["jobs_ok"] + report["jobs_cancelled"] == report["jobs_total"] == 30
    assert report["cancels_sent"] >= report["jobs_cancelled"]
    assert report["arrival"]["cancels"]["subject"] == "fabric.cancel"
    assert " cancelled / " in p.stdout and "ids sent in" in p.stdout


def test_usage_errors_exit_2_with_one_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.csv"
    bad.write_text("arrival_s,prompt_tokens,max_new_tokens\n0,12,4\n0.5,twelve,4\n")
    for args, message in (
        (["--workload", "trace", "--trace", str(bad)], "bad.csv:3: prompt_tokens is not a number"),
        (["--arrival", "open"], "--arrival open needs --rate"),
        (["--rate", "5", "--concurrency", "4"], "give one"),
        (["--arrival", "closed", "--rate", "5"], "--rate is for --arrival open"),
        (["--metrics-url", "127.0.0.1:9400"], "expected http(s)://"),
        (["--cancel-fraction", "2"], "cancel_fraction must be in [0, 1]"),
        (["--logprobs", "21"], "logprobs must be in [0, 20]"),
        (["--workload", "agent", "--chat"], "--chat: not for --workload agent"),
    ):
        p = subprocess.run([sys.executable, "-m", "loadgen", "run", "--nats-url",
                            "nats://127.0.0.1:1", *args], env=worker_env(),
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, (args, p.stderr)
        assert message in p.stderr and "Traceback" not in p.stderr, (args, p.stderr)


def test_soak_runs_a_worker_at_saturation_and_reads_its_memory(tmp_path: Path) -> None:
    """The soak command end to end, briefly (the real one is 30 minutes, run by hand):
    a worker kept saturated by a closed loop, its RSS sampled, growth read three ways."""
    out = tmp_path / "soak"
    p = subprocess.run([sys.executable, "-m", "loadgen", "soak", "--out", str(out),
                        "--duration", "20", "--warmup-s", "4", "--model", "builtin:tiny",
                        "--token-budget", "4096", "--low-water", "2048",
                        "--runner", "pipelined"],
                       env=worker_env(), capture_output=True, text=True, timeout=150)
    assert p.returncode == 0, p.stderr[-2000:]
    r = json.loads((out / "soak.json").read_text())
    assert r["runner"] == "pipelined" and r["device"] == "cpu"
    assert r["jobs_ok"] > 50 and r["jobs_error"] == 0 and r["duplicates"] == 0
    assert len(r["rss_samples"]) >= 3 and r["rss"]["trend_fraction"] is not None
    assert r["worker_summary"]["graphed_step_fraction"] > 0
    assert "worker RSS after warm-up" in p.stdout


def test_a_mixed_soak_answers_every_job_once_and_no_worker_exits(tmp_path: Path) -> None:
    """`soak --mix`: every producer feature drawn per job (chat, stop strings with logprobs
    and sampling, 300 schemas, JSON payloads, cancels); the verdict is one Result per
    published job and no worker exit (issue 28: a grammar used to take the worker down)."""
    out = tmp_path / "soak"
    p = subprocess.run([sys.executable, "-m", "loadgen", "soak", "--out", str(out),
                        "--duration", "20", "--warmup-s", "4", "--model", "builtin:tiny",
                        "--token-budget", "4096", "--low-water", "2048", "--mix",
                        "--outstanding", "64"],
                       env=worker_env(), capture_output=True, text=True, timeout=200)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    r = json.loads((out / "soak.json").read_text())
    assert r["mix"]["schemas"] == 0.25 and r["outstanding"] == 64
    assert r["worker_exits"] == [] and r["jobs_unanswered"] == 0 and r["duplicates"] == 0
    assert r["jobs_ok"] > 100 and r["jobs_cancelled"] > 0
    assert set(r["errors_by_code"]) <= {"too_long"}  # a long prompt in a chat template
    assert r["worker_summary"]["masked_steps"] > 0 and "0 worker exits" in p.stdout
