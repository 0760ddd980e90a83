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

Stopping is the subtle part. A pull request outlives the moment we stop asking (until its
`expires`), and the server may deliver to it meanwhile. Those deliveries still reach our
callback, which hands them on as usual; the worker, draining, naks them. So the worker
stops the loop, waits out the last request's expiry and a round trip, lets the
subscription's buffer empty (`settle_deliveries`), and only then naks -- or they would sit
out the whole ack wait in a dead process.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.errors
import structlog
from nats.aio.msg import Msg

from schemas import DecodeError, ErrorCode, ErrorInfo, FinishReason, Job, decode_job
from worker import failpoints
from worker.kv import padded_tokens
from worker.sampling import fold_seed
from worker.sequence import Request
from worker.tokenizer import Tokenizer

log = structlog.get_logger("ingress")

# The 409 a pull request gets when it asks for more than the consumer's max_batch.
_MAX_BATCH = re.compile(r"MaxRequestBatch of (\d+)")


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
    # The delivery count is a token of the ack subject: `$JS.ACK.<stream>.<consumer>.<n>...`
    # (9 tokens), or with a domain and account hash in front (12 or more). Read it directly;
    # nats-py's `metadata` parses every token into a dataclass.
    reply = getattr(msg, "reply", None)
    if reply:
        parts = reply.split(".")
        if len(parts) == 9 or len(parts) >= 12:
            with contextlib.suppress(ValueError):
                return int(parts[4 if len(parts) == 9 else 6])
    try:
        return msg.metadata.num_delivered
    except Exception:  # noqa: BLE001 - a non-JetStream message has no metadata
        return 1


class Ingress:
    """The pull loop. `room()` says how many messages may be pulled now.

    A pull consumer without nats-py's `fetch`: that call costs a task, a timer and a uuid
    per message. Here one private inbox subscription receives every delivery and hands each
    to the validator from its callback; the loop keeps exactly one pull request open at a
    time (`{"batch": room, "expires": fetch_timeout_s}` to the consumer's next-message
    subject), so every delivery and status on the inbox belongs to it. A request is over
    when its batch has all arrived or a status (408 expired, 409 refused) says so; the next
    one is sized by the room then.
    """

    def __init__(self, nc, stream: str, consumer: str, validator: Validator,
                 room: Callable[[], int], on_ticket: Callable[[Ticket], None],
                 on_outcome: Callable[[Outcome], None], fetch_timeout_s: float = 1.0,
                 api_prefix: str = "$JS.API"):
        self.nc = nc
        self.next_subject = f"{api_prefix}.CONSUMER.MSG.NEXT.{stream}.{consumer}"
        self.validator = validator
        self.room = room
        self.on_ticket = on_ticket
        self.on_outcome = on_outcome
        self.fetch_timeout_s = fetch_timeout_s
        self.room_changed = asyncio.Event()
        self._request_over = asyncio.Event()
        self._credit = 0  # deliveries the open request may still bring
        self._refused = False  # the server ended the last request with an error status
        self._failure: BaseException | None = None  # raised from a delivery's hand-on
        self.max_batch = 1 << 30  # lowered if the consumer says it caps a pull's batch
        self._inbox = ""
        self._sub = None
        self.stopping = False
        self.fetched = 0
        self.last_fetch_len = 0  # the batch the latest pull request asked for
        self.fetch_errors = 0
        self.requests_expire_at = 0.0  # monotonic time by which every pull request we made expired

    async def start(self) -> None:
        self._inbox = self.nc.new_inbox()
        self._sub = await self.nc.subscribe(self._inbox, cb=self._on_msg,
                                            pending_msgs_limit=-1, pending_bytes_limit=-1)

    async def run(self) -> None:
        expires_ns = int(self.fetch_timeout_s * 1e9)
        while not self.stopping:
            if self._failure is not None:
                raise self._failure
            n = min(self.room(), self.max_batch)
            if n <= 0:
                self.room_changed.clear()
                await self.room_changed.wait()
                continue
            self._credit = self.last_fetch_len = n
            self._refused = False
            self._request_over.clear()
            self.requests_expire_at = time.monotonic() + self.fetch_timeout_s
            try:
                await self.nc.publish(self.next_subject,
                                      b'{"batch":%d,"expires":%d}' % (n, expires_ns),
                                      reply=self._inbox)
                # A status lost with a broken connection must not wedge us: ask again after.
                await asyncio.wait_for(self._request_over.wait(), self.fetch_timeout_s + 0.5)
            except asyncio.TimeoutError:
                pass
            except nats.errors.Error as e:
                # Disconnected, reconnecting: wait and ask again. A broker that stays away is
                # the worker's watchdog's call, not ours.
                self._fetch_failed(repr(e))
                await asyncio.sleep(0.5)
                continue
            if self._refused:
                await asyncio.sleep(0.5)  # a 409 again at once would be a tight loop
            failpoints.hit("ingress.fetch")

    def _fetch_failed(self, why: str) -> None:
        self.fetch_errors += 1
        if self.fetch_errors == 1 or self.fetch_errors % 20 == 0:
            log.warning("fetch_failed", error=why, count=self.fetch_errors)

    async def _on_msg(self, msg: Msg) -> None:
        if not msg.reply:
            # A status, not a job (deliveries carry an ack subject): 408 the request expired,
            # 409 the server refused or ended it (leader change, consumer deleted...), 100 an
            # idle heartbeat. Either way this request brings nothing more.
            status = msg.headers.get("Status") if msg.headers else None
            if status == "100":
                return
            if status not in ("404", "408"):
                why = msg.headers.get("Description", "") if msg.headers else ""
                m = _MAX_BATCH.search(why)
                if m:
                    # The consumer caps a pull's batch (max_batch): ask for that much from now on.
                    self.max_batch = max(1, int(m[1]))
                self._refused = True
                self._fetch_failed(f"pull request ended: {status} {why}")
            self._request_over.set()
            return
        self._credit -= 1
        if self._credit <= 0:
            self._request_over.set()
        self.fetched += 1
        try:
            item = self.validator.check(msg, time.monotonic())
            if isinstance(item, Ticket):
                self.on_ticket(item)
            else:
                self.on_outcome(item)
        except Exception as e:  # noqa: BLE001 - a bug here must stop the worker, not vanish
            # nats-py would only log an exception from a callback; the pull loop raises it
            # instead, and a stage that fails takes the worker down (fatal: all nak'd).
            self._failure = self._failure or e
            self._request_over.set()
            self.room_changed.set()

    def stop(self) -> None:
        self.stopping = True
        self.room_changed.set()
        self._request_over.set()

    async def settle_deliveries(self, timeout_s: float) -> None:
        """Let every delivery that reached us be handed on (see the top); bounded wait."""
        deadline = time.monotonic() + timeout_s
        while self._sub is not None and self._sub.pending_msgs and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
