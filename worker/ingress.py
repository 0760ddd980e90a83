"""Ingress: pull only what admission has room for; decode and validate each message once.

The pull consumer is the outermost buffer. Ingress asks the broker for at most as many
messages as the pending queue can take (its bound is in tokens, one budget's worth, so a
backlog of any size stays in the broker, not in this process). Every message becomes
either a `Ticket` (valid work) or an `Outcome` that the drain answers at once (bad input,
expired, zero tokens to generate, poison): bad input never reaches the executor and never
stops the worker.

Poison: a message on its last allowed delivery (the consumer's `max_deliver`) has already
been handed out that many times without an answer -- every worker that took it died or
failed. It is not run again: it becomes a dead letter before anything else is done with
it, even decoding (decoding may be what kills us).

Stopping is the subtle part. A pull request outlives the `fetch` call that made it (until
its `expires`), and messages the server delivers to it meanwhile wait in the
subscription's buffer for the next fetch. A worker that stops fetching must collect those
(`take_buffered`, after the last request expired) and nak them, or they sit out the whole
ack wait in a dead process.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.errors
import structlog
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from schemas import DecodeError, ErrorCode, ErrorInfo, FinishReason, Job, decode_job
from worker import failpoints
from worker.kv import padded_tokens
from worker.sampling import fold_seed
from worker.sequence import Request
from worker.tokenizer import Tokenizer

log = structlog.get_logger("ingress")


@dataclass(slots=True)
class Ticket:
    """A valid job held by this worker, from fetch to ack."""

    msg: Msg
    job: Job
    key: int
    attempt: int  # JetStream delivery count, 1 on first delivery
    prompt: list[int]
    reserved_tokens: int  # the admission/KV unit: prompt + max_new_tokens in whole blocks
    arrived_at: float  # time.monotonic() when fetched
    admitted_at: float = 0.0
    text_prompt: bool = False

    def request(self, seed: int, solo: bool) -> Request:
        s = self.job.sampling
        return Request(key=self.key, prompt=self.prompt, max_new_tokens=self.job.max_new_tokens,
                       reserved_tokens=self.reserved_tokens, temperature=s.temperature,
                       top_k=s.top_k, top_p=s.top_p, seed=fold_seed(seed),
                       stop_ids=frozenset(s.stop_token_ids), solo=solo)


@dataclass(slots=True)
class Outcome:
    """An answer decided at the edge, without the device."""

    msg: Msg
    job_id: str
    reply_to: str | None  # None: nobody we may answer; the message is only terminated
    attempt: int
    arrived_at: float
    finish_reason: FinishReason
    error: ErrorInfo | None = None
    prompt_tokens: int = 0
    terminate: bool = True  # term (never redeliver) rather than ack
    dead_letter: str | None = None  # why it goes to the dead-letter stream (poison)
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Limits:
    vocab_size: int
    max_seq_len: int
    budget_tokens: int
    block_size: int
    reply_prefix: str
    max_deliver: int = 0  # the consumer's; a message on this delivery is poison (<= 0: never)


class Validator:
    """Message -> Ticket | Outcome. Pure apart from the clock; no I/O."""

    def __init__(self, limits: Limits, tokenizer: Tokenizer):
        self.limits = limits
        self.tokenizer = tokenizer
        self._next_key = 0

    def _reply_ok(self, subject: str | None) -> bool:
        return bool(subject) and subject.startswith(self.limits.reply_prefix)

    def check(self, msg: Msg, now: float) -> Ticket | Outcome:
        lim = self.limits
        attempt = _attempt(msg)
        if 0 < lim.max_deliver <= attempt:
            return self._poison(msg, attempt, now)
        try:
            job = decode_job(msg.data)
        except DecodeError as e:
            reply = e.reply_to if self._reply_ok(e.reply_to) else None
            return Outcome(msg, e.job_id, reply, attempt, now, FinishReason.ERROR,
                           ErrorInfo(code=e.code, message=e.message))

        def fail(code: ErrorCode, message: str, reply: str | None = job.reply_to,
                 reason: FinishReason = FinishReason.ERROR) -> Outcome:
            return Outcome(msg, job.id, reply, attempt, now, reason, ErrorInfo(code=code, message=message))

        if not self._reply_ok(job.reply_to):
            return fail(ErrorCode.FORBIDDEN_REPLY_TO,
                        f"reply_to must start with {lim.reply_prefix!r}", reply=None)
        if job.deadline_s is not None and job.deadline_s <= time.time():
            return fail(ErrorCode.EXPIRED, "deadline passed before the job started",
                        reason=FinishReason.EXPIRED)
        text = isinstance(job.prompt, str)
        prompt = self.tokenizer.encode(job.prompt) if text else job.prompt
        if not prompt:
            return fail(ErrorCode.EMPTY_PROMPT, "the prompt encodes to no tokens")
        if max(prompt) >= lim.vocab_size:
            return fail(ErrorCode.BAD_TOKEN, f"token id {max(prompt)} is outside the "
                        f"vocabulary (size {lim.vocab_size})")
        total = len(prompt) + job.max_new_tokens
        reserved = padded_tokens(total, lim.block_size)
        if total > lim.max_seq_len or reserved > lim.budget_tokens:
            return fail(ErrorCode.TOO_LONG, f"prompt ({len(prompt)}) + max_new_tokens "
                        f"({job.max_new_tokens}) = {total} is over max_seq_len {lim.max_seq_len}")
        if job.max_new_tokens == 0:
            return Outcome(msg, job.id, job.reply_to, attempt, now, FinishReason.LENGTH,
                           prompt_tokens=len(prompt), terminate=False)
        self._next_key += 1
        return Ticket(msg=msg, job=job, key=self._next_key, attempt=attempt, prompt=prompt,
                      reserved_tokens=reserved, arrived_at=now, text_prompt=text)


    def _poison(self, msg: Msg, attempt: int, now: float) -> Outcome:
        why = (f"delivered {attempt} times (max_deliver {self.limits.max_deliver}) without an "
               "answer: every worker that took it crashed, stalled or failed on it")
        try:
            job = decode_job(msg.data)
            job_id, reply = job.id, job.reply_to
        except DecodeError as e:
            job_id, reply = e.job_id, e.reply_to
        return Outcome(msg, job_id, reply if self._reply_ok(reply) else None, attempt, now,
                       FinishReason.ERROR, ErrorInfo(code=ErrorCode.POISON, message=why),
                       dead_letter=why)


def _attempt(msg: Msg) -> int:
    try:
        return msg.metadata.num_delivered
    except Exception:  # noqa: BLE001 - a non-JetStream message has no metadata
        return 1


class Ingress:
    """The fetch loop. `room()` says how many messages may be pulled now."""

    def __init__(self, sub, validator: Validator, room: Callable[[], int],
                 on_ticket: Callable[[Ticket], None], on_outcome: Callable[[Outcome], None],
                 fetch_timeout_s: float = 1.0):
        self.sub = sub
        self.validator = validator
        self.room = room
        self.on_ticket = on_ticket
        self.on_outcome = on_outcome
        self.fetch_timeout_s = fetch_timeout_s
        self.room_changed = asyncio.Event()
        self.stopping = False
        self.fetched = 0
        self.last_fetch_len = 0  # messages the latest fetch returned
        self.fetch_errors = 0
        self.requests_expire_at = 0.0  # monotonic time by which every pull request we made expired

    async def run(self) -> None:
        while not self.stopping:
            n = self.room()
            if n <= 0:
                self.room_changed.clear()
                await self.room_changed.wait()
                continue
            self.requests_expire_at = time.monotonic() + self.fetch_timeout_s
            try:
                msgs = await self.sub.fetch(batch=n, timeout=self.fetch_timeout_s)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                continue
            except nats.errors.Error as e:
                # Disconnected, reconnecting, a cluster leader change (409), JetStream not ready
                # (503): wait and ask again. A broker that stays away is the worker's watchdog's
                # call, not ours.
                self.fetch_errors += 1
                if self.fetch_errors == 1 or self.fetch_errors % 20 == 0:
                    log.warning("fetch_failed", error=repr(e), count=self.fetch_errors)
                await asyncio.sleep(0.5)
                continue
            failpoints.hit("ingress.fetch")
            self.handle(msgs)

    def handle(self, msgs: list[Msg]) -> None:
        now = time.monotonic()
        self.fetched += len(msgs)
        self.last_fetch_len = len(msgs)
        for m in msgs:
            item = self.validator.check(m, now)
            if isinstance(item, Ticket):
                self.on_ticket(item)
            else:
                self.on_outcome(item)

    def stop(self) -> None:
        self.stopping = True
        self.room_changed.set()

    def take_buffered(self) -> list[Msg]:
        """Messages delivered to our pull requests that no fetch has returned (see the top).

        nats-py keeps them in the subscription's pending queue and has no public call that
        takes them without asking the server for more, so this reads that queue directly."""
        queue = getattr(getattr(self.sub, "_sub", None), "_pending_queue", None)
        out: list[Msg] = []
        while queue is not None and not queue.empty():
            m = queue.get_nowait()
            if not JetStreamContext.is_status_msg(m):  # a 408/409/heartbeat is not a delivery
                out.append(m)
        return out
