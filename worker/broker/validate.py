"""Validation: each delivery becomes its `Ticket`s (valid work) or an `Outcome` (an answer).

A delivery is one Ticket, except an OpenAI line that asks for several: n choices, or a list
of prompts (inputs), each becoming n. Such a line is valid only if every prompt is: one that
is not answers the whole line, its message naming the item (`body.prompt[3]: ...`).

An `Outcome` is decided at the edge without the device: bad input, a reply subject outside
the result prefix, a deadline already past, zero tokens to generate, poison. So bad input
never reaches the executor and never stops the worker.

Poison: a message on its last allowed delivery (the consumer's `max_deliver`) has already
been handed out that many times without an answer -- every worker that took it died or
failed. It is not run again: it becomes a dead letter before anything else is done with
it, even decoding (decoding may be what kills us).

Pure apart from the clock: no I/O, no torch.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any

from nats.aio.msg import Msg

from schemas import DecodeError, ErrorCode, ErrorInfo, FinishReason, Job, is_json
from schemas.codec import decode_payload, validate
from worker.engine.blocks import Reservation, block_hashes, padded_tokens
from worker.features.openai.request import Call, is_batch_line, translate
from worker.model.chat import ChatError, ChatTemplate
from worker.model.tokenizer import Tokenizer


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
    hashes: tuple[bytes, ...] = ()  # content keys of the prompt's full KV blocks
    json: bool = False  # the job came as JSON: its Result goes back as JSON
    grammar: Any = None  # its compiled response_format (worker.model.grammar.Grammar)
    truncated: bool = False  # embed: the input was cut to the model's limit (job.truncate)
    admitted_at: float = 0.0  # time.monotonic() when admitted (0 while pending)
    reservation: Reservation | None = None  # its KV blocks, from admission on
    openai: Call | None = None  # it came as an OpenAI Batch API line: answered as one
    part: int = 0  # an OpenAI line of several jobs: which (prompt index * n + choice)


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
    json: bool = False  # the job came as JSON: its Result goes back as JSON
    openai: Call | None = None  # it came as an OpenAI Batch API line: answered as one
    part: int = 0  # an OpenAI line of several jobs: which (prompt index * n + choice)


@dataclass(frozen=True, slots=True)
class Limits:
    vocab_size: int
    max_seq_len: int
    budget_tokens: int
    block_size: int
    reply_prefix: str
    max_deliver: int = 0  # the consumer's; a message on this delivery is poison (<= 0: never)
    task: str = "generate"  # what this worker's model does: "generate" or "embed"
    embed_dim: int = 0  # embed: values per embedding


class Validator:
    """Message -> Ticket | Outcome. Pure apart from the clock; no I/O."""

    def __init__(self, limits: Limits, tokenizer: Tokenizer, chat: ChatTemplate | None = None,
                 served: tuple[str, ...] = ()):
        self.limits = limits
        self.tokenizer = tokenizer
        self.chat = chat  # the checkpoint's chat template; None: jobs with messages are refused
        self.served = served  # the model names an OpenAI line may ask for
        self._next_key = 0

    def _reply_ok(self, subject: str | None) -> bool:
        return bool(subject) and subject.startswith(self.limits.reply_prefix)

    def check(self, msg: Msg, now: float) -> list[Ticket] | Outcome:
        """The delivery's Tickets (parts in order), or the Outcome that answers it."""
        lim = self.limits
        attempt = _attempt(msg)
        if 0 < lim.max_deliver <= attempt:
            return self._poison(msg, attempt, now)
        as_json = is_json(msg.data)
        try:
            job, call = self._decode(msg.data)
        except DecodeError as e:
            reply = e.reply_to if self._reply_ok(e.reply_to) else None
            return Outcome(msg, e.job_id, reply, attempt, now, FinishReason.ERROR,
                           ErrorInfo(code=e.code, message=e.message), json=as_json,
                           openai=getattr(e, "call", None))

        def fail(code: ErrorCode, message: str, reply: str | None = job.reply_to,
                 reason: FinishReason = FinishReason.ERROR) -> Outcome:
            return Outcome(msg, job.id, reply, attempt, now, reason,
                           ErrorInfo(code=code, message=message), json=as_json, openai=call)

        if not self._reply_ok(job.reply_to):
            return fail(ErrorCode.FORBIDDEN_REPLY_TO,
                        f"reply_to must start with {lim.reply_prefix!r}", reply=None)
        if job.deadline_s is not None and job.deadline_s <= time.time():
            return fail(ErrorCode.EXPIRED, "deadline passed before the job started",
                        reason=FinishReason.EXPIRED)
        if job.task != lim.task:
            return fail(ErrorCode.UNSUPPORTED_TASK, f"this worker's model does task "
                        f"{lim.task!r}, not {job.task!r}: send it to a worker that does")
        if call is None or call.items is None:
            one = self._prompt(msg, job, attempt, now, as_json, fail, call)
            return one if isinstance(one, Outcome) else self._fan_out([one])
        firsts: list[Ticket] = []
        answered: Outcome | None = None
        for i, item in enumerate(call.items):
            got = self._prompt(msg, job.model_copy(update={"prompt": item}), attempt, now,
                               as_json, fail, call)
            if isinstance(got, Ticket):
                firsts.append(got)
            elif got.error is not None:
                call.param = call.field
                got.error = ErrorInfo(code=got.error.code,
                                      message=f"body.{call.field}[{i}]: {got.error.message}")
                return got
            else:  # max_tokens 0, as it is for every prompt: the line is answered unrun
                got.prompt_tokens += answered.prompt_tokens if answered else 0
                answered = got
        return answered if answered is not None else self._fan_out(firsts)

    def _prompt(self, msg: Msg, job: Job, attempt: int, now: float, as_json: bool, fail,
                call: Call | None) -> Ticket | Outcome:
        """One prompt's (input's) Ticket, or the Outcome that answers it."""
        lim = self.limits
        if job.task == "embed":
            return self._embed(msg, job, attempt, now, as_json, fail, call)
        messages = job.messages if call is None else call.messages
        if messages is not None:
            if self.chat is None:
                return fail(ErrorCode.NO_CHAT_TEMPLATE, "this model has no chat template: send "
                            "a prompt (text or token ids) instead of messages")
            try:
                prompt = self.chat.render(messages, tools=call and call.tools)
            except ChatError as e:
                return fail(ErrorCode.BAD_MESSAGES, str(e))
        elif isinstance(job.prompt, str):
            prompt = self.tokenizer.encode(job.prompt)
        else:
            prompt = job.prompt
        if (bad := self._bad_ids(prompt, "prompt", fail)) is not None:
            return bad
        if call is not None and call.fill_max_tokens:  # OpenAI's default: up to the limit
            job.max_new_tokens = max(1, min(lim.max_seq_len, lim.budget_tokens // lim.block_size
                                            * lim.block_size) - len(prompt))
        total = len(prompt) + job.max_new_tokens
        reserved = padded_tokens(total, lim.block_size)
        if total > lim.max_seq_len or reserved > lim.budget_tokens:
            return fail(ErrorCode.TOO_LONG, f"prompt ({len(prompt)}) + max_new_tokens "
                        f"({job.max_new_tokens}) = {total} is over max_seq_len {lim.max_seq_len}")
        if job.max_new_tokens == 0:
            return Outcome(msg, job.id, job.reply_to, attempt, now, FinishReason.LENGTH,
                           prompt_tokens=len(prompt), terminate=False, json=as_json, openai=call)
        self._next_key += 1
        return Ticket(msg=msg, job=job, key=self._next_key, attempt=attempt, prompt=prompt,
                      reserved_tokens=reserved, arrived_at=now,
                      hashes=tuple(block_hashes(prompt, lim.block_size)), json=as_json,
                      openai=call)

    def _fan_out(self, firsts: list[Ticket]) -> list[Ticket]:
        """Each prompt's Ticket, and for an OpenAI line with n choices n of them: the same
        message and prompt (its KV computed once), their own keys, choice j seeded seed + j
        -- as that prompt alone on a line of its own with n choices would be."""
        call = firsts[0].openai
        if call is None or call.width == 1:
            return firsts
        call.fanned, call.parts = True, {}
        out = []
        for i, t in enumerate(firsts):
            t.part = i * call.n
            out.append(t)
            seed = t.job.sampling.seed
            for choice in range(1, call.n):
                self._next_key += 1
                sampling = t.job.sampling.model_copy(
                    update={"seed": None if seed is None else (seed + choice) % (1 << 63)})
                out.append(replace(t, job=t.job.model_copy(update={"sampling": sampling}),
                                   key=self._next_key, part=t.part + choice))
        return out

    def _bad_ids(self, ids: list[int], what: str, fail) -> Outcome | None:
        """The answer for ids no model can take (none, or outside the vocabulary)."""
        if not ids:
            return fail(ErrorCode.EMPTY_PROMPT, f"the {what} encodes to no tokens")
        if max(ids) >= self.limits.vocab_size:
            return fail(ErrorCode.BAD_TOKEN, f"token id {max(ids)} is outside the "
                        f"vocabulary (size {self.limits.vocab_size})")
        return None

    def _embed(self, msg: Msg, job: Job, attempt: int, now: float, as_json: bool,
               fail, call: Call | None) -> Ticket | Outcome:
        """An embed job: its input's ids (cut to the model's limit if it asks), no decode."""
        lim = self.limits
        truncated = False
        if isinstance(job.prompt, str):
            try:
                enc = self.tokenizer.encode(job.prompt, truncate=job.truncate)
            except ValueError as e:  # TextTooLong
                return fail(ErrorCode.TOO_LONG, str(e))
            prompt, truncated = enc.ids, enc.truncated
        else:
            prompt = job.prompt
        if (bad := self._bad_ids(prompt, "input", fail)) is not None:
            return bad
        if len(prompt) > lim.max_seq_len:
            return fail(ErrorCode.TOO_LONG, f"the input is {len(prompt)} tokens, over "
                        f"max_seq_len {lim.max_seq_len}")
        if job.dimensions is not None and job.dimensions > lim.embed_dim:
            return fail(ErrorCode.INVALID_JOB, f"dimensions {job.dimensions} is over the "
                        f"model's {lim.embed_dim}")
        self._next_key += 1
        return Ticket(msg=msg, job=job, key=self._next_key, attempt=attempt, prompt=prompt,
                      reserved_tokens=padded_tokens(len(prompt), lim.block_size), arrived_at=now,
                      json=as_json, truncated=truncated, openai=call)

    def _poison(self, msg: Msg, attempt: int, now: float) -> Outcome:
        why = (f"delivered {attempt} times (max_deliver {self.limits.max_deliver}) without an "
               "answer: every worker that took it crashed, stalled or failed on it")
        try:
            job, call = self._decode(msg.data)
            job_id, reply = job.id, job.reply_to
        except DecodeError as e:
            job_id, reply, call = e.job_id, e.reply_to, getattr(e, "call", None)
        return Outcome(msg, job_id, reply if self._reply_ok(reply) else None, attempt, now,
                       FinishReason.ERROR, ErrorInfo(code=ErrorCode.POISON, message=why),
                       dead_letter=why, json=is_json(msg.data), openai=call)

    def _decode(self, data: bytes) -> tuple[Job, Call | None]:
        """The job, and its Call when it came as an OpenAI Batch API line; or DecodeError."""
        payload = decode_payload(data)
        if is_batch_line(payload):
            return translate(payload, self.served)
        return validate(payload, Job), None


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
