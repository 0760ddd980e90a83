"""The producer side of a run: publish every job when its arrival process says, collect
every Result.

Rule: listen before speaking. The run's reply subject is subscribed (and the
subscription flushed to the server) before the first job goes out, so no Result can
arrive to nobody. Jobs are published through JetStream with `Nats-Msg-Id: <job id>`
and at most `window` publishes await their acks at once: enough in flight that
thousands of jobs go out in a second or two, few enough that a slow broker pushes back
on us rather than on its own memory. A publish that fails is retried -- safe, because
the stream's duplicate window drops a second copy with the same Msg-Id.

When a job goes out is the arrival process's call (`loadgen.arrivals`): all at once
(burst), at fixed offsets from the start (open-loop Poisson, trace replay), or when a
slot frees (closed loop: a slot frees when the job holding it is answered, ok or error,
or its publish fails for good). A scheduled job that goes out late records its lag, so
a report can tell a slow producer from a slow service.

A job with `cancel_after_s` gets a cancel (`{"ids": [...]}`, JSON, core NATS on
`cancel_subject`) that long after JetStream accepted it. One task sends them in due
order; ids that fall due together share a message, up to the wire's 1024. Once every job
has answered, cancels not yet due are dropped: they would change nothing.

The run ends when every job JetStream accepted has a Result or `timeout_s` (counted
from the start of publishing) passes; either way the RunStats says what happened (and
`stats.arrival["cancels"]`, when the run cancelled, how many it sent).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import time
from collections.abc import Mapping, Sequence
from typing import Any

import nats
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from tqdm import tqdm

from loadgen.arrivals import Arrival, Burst, Closed, Schedule, describe
from loadgen.ledger import Outcome, RunStats
from loadgen.workload import JobSpec
from schemas import DecodeError, Result, decode_result, encode
from worker.broker.cancels import MAX_IDS as MAX_CANCEL_IDS

__all__ = ["CANCEL_SUBJECT", "RESULT_PREFIX", "connect", "outcome_of", "reply_subject",
           "run_jobs"]

# Workers only publish under this prefix (DESIGN: reply subjects are confined), and the
# results stream captures it.
RESULT_PREFIX = "fabric.results."
# Every worker hears cancels here unless started with another --cancel-subject.
CANCEL_SUBJECT = "fabric.cancel"
# Progress postfix refresh: tqdm redraws cheaply, but a postfix dict per Result is not.
_POSTFIX_EVERY_S = 0.5


def reply_subject(run_id: str, result_prefix: str = RESULT_PREFIX) -> str:
    return f"{result_prefix}{run_id}"


def outcome_of(result: Result) -> Outcome:
    """The wire Result reduced to the ledger's plain record."""
    return Outcome(
        id=result.id,
        ok=result.ok,
        finish_reason=result.finish_reason.value,
        error_code=result.error.code.value if result.error is not None else None,
        prompt_tokens=result.usage.prompt_tokens,
        completion_tokens=result.usage.completion_tokens,
        padded_tokens=result.usage.padded_tokens,
        worker_total_ms=result.timing.total_ms,
        first_token_ms=result.timing.first_token_ms,
        worker=result.worker,
        attempt=result.attempt,
        cached_tokens=result.usage.cached_tokens,
    )


async def connect(nats_url: str, *, name: str, connect_timeout_s: float = 10.0,
                  **options: Any) -> NATS:
    """A connection that reconnects forever once up (a broker restart mid-run is a
    chaos test, not a failure) but gives up on the first connect after a bound.

    nats-py retries even the first connect for as long as reconnects are allowed,
    so the bound is a wall-clock one around it; its per-attempt errors are kept
    quietly and the last one explains a failure. `options` go to `nats.connect` as they
    are (credentials, TLS).
    """
    last_error: list[BaseException] = []

    async def on_error(exc: Exception) -> None:
        last_error[:] = [exc]

    try:
        return await asyncio.wait_for(
            nats.connect(
                nats_url,
                name=name,
                error_cb=on_error,
                connect_timeout=2,
                reconnect_time_wait=0.5,
                max_reconnect_attempts=-1,
                **options,
            ),
            timeout=connect_timeout_s,
        )
    except asyncio.TimeoutError:
        why = f"{type(last_error[0]).__name__}: {last_error[0]}" if last_error else "timed out"
        raise ConnectionError(f"cannot reach {nats_url} in {connect_timeout_s}s ({why})") from None


async def run_jobs(
    nats_url: str,
    jobs: Sequence[JobSpec],
    *,
    run_id: str,
    subject_prefix: str = "fabric.jobs.",
    timeout_s: float = 300.0,
    progress: bool = True,
    window: int = 256,
    publish_timeout_s: float = 5.0,
    publish_attempts: int = 3,
    arrival: Arrival = Burst(),
    result_prefix: str = RESULT_PREFIX,
    connect_options: Mapping[str, Any] | None = None,
    as_json: bool = False,
    cancel_subject: str = CANCEL_SUBJECT,
    publish_for_s: float | None = None,
) -> RunStats:
    """Publish `jobs` to `<subject_prefix><run_id>` as `arrival` says (msgpack, or JSON
    objects with `as_json`, or as each job says); collect their Results on
    `<result_prefix><run_id>`; cancel those with `cancel_after_s` on `cancel_subject`.
    `publish_for_s`: stop publishing after this long and wait for what was sent (a soak's
    end: every job it sent is answered, none cut off by the clock)."""
    stats = RunStats(run_id=run_id, job_ids=[j.id for j in jobs])
    if len(set(stats.job_ids)) != len(stats.job_ids):
        raise ValueError("job ids must be unique within a run")
    if isinstance(arrival, Schedule) and len(arrival.offsets_s) < len(jobs):
        raise ValueError(f"the schedule has {len(arrival.offsets_s)} arrivals for {len(jobs)} jobs")
    stats.arrival = describe(arrival, len(jobs))
    reply_to = reply_subject(run_id, result_prefix)
    subject = f"{subject_prefix}{run_id}"
    all_done = asyncio.Event()
    # Ids JetStream accepted that have not answered yet; known only once publishing
    # ends (a Result can beat its own PubAck). A job that never got in never answers,
    # so the run waits on these, not on every job.
    unanswered: set[str] | None = None
    # Sent and neither answered nor failed for good: what "in flight" means here.
    outstanding: set[str] = set()
    slots = asyncio.Semaphore(arrival.concurrency) if isinstance(arrival, Closed) else None
    useful_tokens = 0
    # (due time, job id) of cancels not sent yet, earliest first; `due_changed` wakes the
    # sender when a new one goes to the front.
    due: list[tuple[float, str]] = []
    due_changed = asyncio.Event()
    cancels = {"subject": cancel_subject, "jobs": sum(j.cancel_after_s is not None for j in jobs),
               "ids_sent": 0, "messages": 0}
    if cancels["jobs"]:
        stats.arrival["cancels"] = cancels

    def settle(job_id: str) -> None:
        """The job no longer holds a closed-loop slot: answered, or never will be."""
        if job_id in outstanding:
            outstanding.discard(job_id)
            if slots is not None:
                slots.release()

    async def on_result(msg: Msg) -> None:
        nonlocal useful_tokens
        # Arrival is stamped before decoding, so latency does not include our own work.
        now = time.monotonic()
        try:
            result = decode_result(msg.data)
        except DecodeError:
            stats.undecodable += 1
            return
        outcome = outcome_of(result)
        if not stats.record_outcome(outcome, now):
            return
        settle(outcome.id)
        if outcome.ok:
            useful_tokens += outcome.prompt_tokens + outcome.completion_tokens
        bar.update(1)
        if unanswered is not None:
            unanswered.discard(outcome.id)
            if not unanswered:
                all_done.set()

    def postfix(refresh: bool) -> None:
        first = stats.first_sent_s
        elapsed_s = (stats.last_arrived_s or time.monotonic()) - first if first else 0.0
        bar.set_postfix(in_flight=len(outstanding), refresh=refresh,
                        tok_s=f"{useful_tokens / elapsed_s:,.0f}" if elapsed_s > 0 else "-")

    async def show_progress() -> None:
        # A postfix per Result is not cheap; twice a second is enough for a person.
        while True:
            await asyncio.sleep(_POSTFIX_EVERY_S)
            postfix(refresh=True)

    async def send_cancels(nc: NATS) -> None:
        """Send each cancel when due, every id due by then in as few messages as fit."""
        while True:
            wait_s = due[0][0] - time.monotonic() if due else None
            if wait_s is None or wait_s > 0:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(due_changed.wait(), wait_s)
                due_changed.clear()
                continue
            now = time.monotonic()
            ids: list[str] = []
            while due and due[0][0] <= now and len(ids) < MAX_CANCEL_IDS:
                ids.append(heapq.heappop(due)[1])
            await nc.publish(cancel_subject, json.dumps({"ids": ids}).encode())
            cancels["ids_sent"] += len(ids)
            cancels["messages"] += 1

    async def publish(js: Any, job: JobSpec, scheduled_s: float | None) -> None:
        payload = encode(job.to_job(reply_to),
                         as_json=as_json if job.as_json is None else job.as_json)
        headers = {"Nats-Msg-Id": job.id}
        async with gate:
            now = time.monotonic()
            stats.record_sent(job.id, now)
            if scheduled_s is not None:
                stats.lag_s.append(max(now - scheduled_s, 0.0))
            outstanding.add(job.id)
            stats.max_in_flight = max(stats.max_in_flight, len(outstanding))
            for _ in range(publish_attempts):
                try:
                    await js.publish(subject, payload, timeout=publish_timeout_s, headers=headers)
                except nats.errors.Error as exc:  # timeouts and JetStream API errors
                    stats.publish_errors[job.id] = f"{type(exc).__name__}: {exc}"
                    continue
                stats.acked.add(job.id)
                stats.publish_errors.pop(job.id, None)
                if job.cancel_after_s is not None:
                    heapq.heappush(due, (time.monotonic() + job.cancel_after_s, job.id))
                    if due[0][1] == job.id:
                        due_changed.set()
                return
            settle(job.id)

    async def feed(js: Any) -> None:
        """Start each job's publish when its arrival process says; wait for them all."""
        tasks: list[asyncio.Task] = []
        t0 = time.monotonic()
        try:
            for n, job in enumerate(jobs):
                if publish_for_s is not None and time.monotonic() - t0 >= publish_for_s:
                    break
                scheduled_s = None
                if slots is not None:
                    await slots.acquire()
                elif isinstance(arrival, Schedule):
                    # Against the absolute schedule, so one late job does not delay the rest.
                    scheduled_s = t0 + arrival.offsets_s[n]
                    delay_s = scheduled_s - time.monotonic()
                    if delay_s > 0:
                        await asyncio.sleep(delay_s)
                tasks.append(asyncio.create_task(publish(js, job, scheduled_s)))
            await asyncio.gather(*tasks)
        finally:
            # The deadline passed mid-run: publishes still waiting on the gate never start.
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    nc = await connect(nats_url, name=f"fabric-loadgen-{run_id}", **(connect_options or {}))
    bar = tqdm(total=len(jobs), unit="job", disable=not progress, dynamic_ncols=True)
    ticker = asyncio.create_task(show_progress()) if progress else None
    canceller = asyncio.create_task(send_cancels(nc)) if cancels["jobs"] else None
    gate = asyncio.Semaphore(window)
    try:
        # Results for thousands of jobs can land in a burst; the default pending limit
        # would mark us a slow consumer and drop some, which would read as "missing".
        sub = await nc.subscribe(
            reply_to, cb=on_result, pending_msgs_limit=-1, pending_bytes_limit=-1
        )
        await nc.flush()
        deadline_s = time.monotonic() + timeout_s
        try:
            await asyncio.wait_for(feed(nc.jetstream()), timeout=timeout_s)
        except asyncio.TimeoutError:
            stats.timed_out = True
        unanswered = stats.acked - stats.outcomes.keys()
        if unanswered and not stats.timed_out:
            remaining_s = max(deadline_s - time.monotonic(), 0.0)
            try:
                await asyncio.wait_for(all_done.wait(), timeout=remaining_s)
            except asyncio.TimeoutError:
                stats.timed_out = True
        await sub.unsubscribe()
    finally:
        if canceller is not None:
            canceller.cancel()
            # Cancelled is its normal end; anything else it raised is a bug and surfaces.
            with contextlib.suppress(asyncio.CancelledError):
                await canceller
        if ticker is not None:
            ticker.cancel()
            postfix(refresh=False)
        bar.close()
        await nc.close()
    return stats
