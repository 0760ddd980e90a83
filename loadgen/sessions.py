"""Agent traffic: sessions that share a few long system prompts and grow turn by turn.

What machine-generated work looks like to the worker: every job of a session starts with
one of a few system prompts (tools, instructions, examples), and turn t+1's prompt is turn
t's prompt, the reply the worker actually generated, and a new user message. Each session
is a closed loop: it publishes turn t+1 only when turn t's Result has come back. Shapes
are drawn from one seeded `random.Random` up front (`plan`), so two runs of a spec send the
same system prompts and user messages; what they send next also depends on the worker's
replies, which greedy decoding makes the same too.

Results are recorded in the same `RunStats` as `loadgen.client.run_jobs`, so the report
(including the share of prompt tokens the workers served from their prefix caches) is
the same.
"""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass
from typing import Any

import nats.errors

from loadgen.client import RESULT_PREFIX, connect, outcome_of, reply_subject
from loadgen.ledger import RunStats
from loadgen.workload import VOCAB_SIZE
from schemas import DecodeError, Job, decode_result, encode
from schemas.subjects import job_subject

__all__ = ["SessionSpec", "plan", "run_sessions"]


@dataclass(frozen=True, slots=True)
class SessionSpec:
    sessions: int = 32  # concurrent sessions (the closed loop's size)
    system_prompts: int = 4  # distinct system prompts the sessions share
    turns: int = 4  # jobs per session
    system_tokens: tuple[int, int] = (300, 700)  # a system prompt's length, uniform
    user_tokens: tuple[int, int] = (8, 32)  # a user message's length, uniform
    new_tokens: tuple[int, int] = (16, 48)  # max_new_tokens per turn, uniform
    seed: int = 0
    run_id: str = "agent"
    # Jobs name their session and go to its subject (`schemas.subjects.job_subject`), so a
    # fleet serves each session where its KV lives; False: anonymous jobs on one subject.
    named: bool = True

    def __post_init__(self) -> None:
        for name in ("system_tokens", "user_tokens", "new_tokens"):
            lo, hi = getattr(self, name)
            if not 1 <= lo <= hi:
                raise ValueError(f"{name} needs 1 <= lo <= hi, got {(lo, hi)}")
        if min(self.sessions, self.system_prompts, self.turns) < 1:
            raise ValueError("sessions, system_prompts and turns must be at least 1")

    def longest_job(self) -> int:
        """Prompt + max_new_tokens of the longest possible last turn."""
        return (self.system_tokens[1] + self.turns * self.user_tokens[1]
                + self.turns * self.new_tokens[1])

    def job_id(self, session: int, turn: int) -> str:
        return f"{self.run_id}-s{session}-t{turn}"

    def session_name(self, session: int) -> str:
        return f"{self.run_id}-s{session}"


@dataclass(frozen=True, slots=True)
class Session:
    system: int  # which system prompt
    users: tuple[tuple[int, ...], ...]  # one user message per turn
    new_tokens: tuple[int, ...]  # max_new_tokens per turn


def plan(spec: SessionSpec) -> tuple[list[list[int]], list[Session]]:
    """The system prompts and each session's turns, a pure function of the spec."""
    rng = random.Random(spec.seed)

    def tokens(lo_hi: tuple[int, int]) -> list[int]:
        return [rng.randrange(VOCAB_SIZE) for _ in range(rng.randint(*lo_hi))]

    systems = [tokens(spec.system_tokens) for _ in range(spec.system_prompts)]
    sessions = [Session(system=rng.randrange(spec.system_prompts),
                        users=tuple(tuple(tokens(spec.user_tokens)) for _ in range(spec.turns)),
                        new_tokens=tuple(rng.randint(*spec.new_tokens) for _ in range(spec.turns)))
                for _ in range(spec.sessions)]
    return systems, sessions


async def run_sessions(nats_url: str, spec: SessionSpec, *,
                       subject_prefix: str = "fabric.jobs.", timeout_s: float = 300.0,
                       result_prefix: str = RESULT_PREFIX,
                       connect_options: dict[str, Any] | None = None) -> RunStats:
    """Run every session to its last turn (a session whose job fails ends there)."""
    systems, sessions = plan(spec)
    ids = [spec.job_id(i, t) for i in range(spec.sessions) for t in range(spec.turns)]
    stats = RunStats(run_id=spec.run_id, job_ids=ids)
    stats.arrival = {"kind": "sessions", "sessions": spec.sessions, "turns": spec.turns,
                     "system_prompts": spec.system_prompts}
    where = {spec.job_id(i, t): (i, t) for i in range(spec.sessions) for t in range(spec.turns)}
    prompts: dict[int, list[int]] = {}  # session -> the prompt of its turn in flight
    reply_to = reply_subject(spec.run_id, result_prefix)
    plain_subject = f"{subject_prefix}{spec.run_id}"
    ended = asyncio.Event()
    live = spec.sessions
    tasks: set[asyncio.Task] = set()
    nc = await connect(nats_url, name=f"fabric-loadgen-{spec.run_id}", **(connect_options or {}))
    js = nc.jetstream()

    async def send(i: int, t: int) -> None:
        s = sessions[i]
        job = Job(id=spec.job_id(i, t), prompt=prompts[i], max_new_tokens=s.new_tokens[t],
                  reply_to=reply_to, session=spec.session_name(i) if spec.named else None)
        subject = job_subject(job, spec.run_id) if spec.named else plain_subject
        stats.record_sent(job.id, time.monotonic())
        stats.token_log.append(("sent", prompts[i]))
        stats.max_in_flight = max(stats.max_in_flight, len(stats.sent_s) - len(stats.outcomes))
        for _ in range(3):
            try:
                await js.publish(subject, encode(job), headers={"Nats-Msg-Id": job.id},
                                 timeout=5.0)
            except nats.errors.Error as exc:  # timeouts and JetStream API errors
                stats.publish_errors[job.id] = f"{type(exc).__name__}: {exc}"
                continue
            stats.acked.add(job.id)
            stats.publish_errors.pop(job.id, None)
            return
        end_session()  # never got in: the session cannot go on

    def start(i: int, t: int) -> None:
        task = asyncio.ensure_future(send(i, t))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    def end_session() -> None:
        nonlocal live
        live -= 1
        if live == 0:
            ended.set()

    async def on_result(msg) -> None:
        now = time.monotonic()
        try:
            result = decode_result(msg.data)
        except DecodeError:
            stats.undecodable += 1
            return
        if not stats.record_outcome(outcome_of(result), now):
            return
        i, t = where[result.id]
        stats.token_log.append(("done", prompts[i] + list(result.tokens)))
        if not result.ok or t + 1 == spec.turns:
            end_session()
            return
        prompts[i] = prompts[i] + list(result.tokens) + list(sessions[i].users[t + 1])
        start(i, t + 1)

    try:
        sub = await nc.subscribe(reply_to, cb=on_result, pending_msgs_limit=-1,
                                 pending_bytes_limit=-1)
        await nc.flush()
        for i, s in enumerate(sessions):
            prompts[i] = systems[s.system] + list(s.users[0])
            start(i, 0)
        try:
            await asyncio.wait_for(ended.wait(), timeout_s)
        except asyncio.TimeoutError:
            stats.timed_out = True
        await sub.unsubscribe()
    finally:
        for task in list(tasks):
            task.cancel()
        await nc.close()
    return stats
