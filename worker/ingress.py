"""Ingress: pull only what admission has room for; decode and validate each message once.

The pull consumer is the outermost buffer. Ingress asks the broker for at most as many
messages as the pending queue can take (its bound is in tokens, one budget's worth, so a
backlog of any size stays in the broker, not in this process). Every message becomes
either a `Ticket` (valid work) or an `Outcome` that the drain answers at once (bad input,
expired, zero tokens to generate): bad input never reaches the executor and never stops
the worker.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import nats.errors
import structlog
from nats.aio.msg import Msg

from schemas import DecodeError, ErrorCode, ErrorInfo, FinishReason, Job, decode_job
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
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Limits:
    vocab_size: int
    max_seq_len: int
    budget_tokens: int
    block_size: int
    reply_prefix: str


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

    async def run(self) -> None:
        while not self.stopping:
            n = self.room()
            if n <= 0:
                self.room_changed.clear()
                await self.room_changed.wait()
                continue
            try:
                msgs = await self.sub.fetch(batch=n, timeout=self.fetch_timeout_s)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                continue
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError,
                    nats.errors.NoRespondersError, nats.errors.SlowConsumerError) as e:
                log.warning("fetch_failed", error=repr(e))
                await asyncio.sleep(0.5)
                continue
            now = time.monotonic()
            self.fetched += len(msgs)
            for m in msgs:
                item = self.validator.check(m, now)
                if isinstance(item, Ticket):
                    self.on_ticket(item)
                else:
                    self.on_outcome(item)

    def stop(self) -> None:
        self.stopping = True
        self.room_changed.set()
