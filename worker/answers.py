"""Answers: every Result this worker sends, built from what decided it and handed to the publisher.

Rule: a job is answered once, by one of two things: an `Outcome` decided without the device
(bad input, poison, expired, cancelled or refused before it ran) or the `Completion` of the
job the executor ran. Either becomes one `Delivery`; the publisher settles the message only
after the Result is durable, and the message stops being held when it is settled. Once the
publisher has aborted (a fatal fault) nothing goes out: the message waits for the
teardown's nak with the rest. A failure while one job's Result is built (its stop matcher,
decoding its text) is that job's error Result, never the others'. What the payloads hold
is `worker.broker.replies`. An OpenAI line with n choices is n jobs of one message: their
Results join into one output line, delivered (and the message settled) with the last.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import structlog
from nats.aio.msg import Msg

from schemas import ErrorCode, ErrorInfo, FinishReason
from worker.admission import Intake
from worker.broker.publisher import DeadLetter, Delivery, Publisher, Settle
from worker.broker.replies import (JobTimes, cancelled_result, completion_payload, dead_letter,
                                   edge_result, embedding_payload, failed_result, msg_id, payload)
from worker.broker.validate import Outcome, Ticket
from worker.engine.sequence import Completion
from worker.features.stops import StopFailed, cut
from worker.model.stops import StopMatcher
from worker.model.tokenizer import Tokenizer
from worker.ops.stats import WorkerStats

log = structlog.get_logger("worker")


class Answers:
    def __init__(self, intake: Intake, publisher: Publisher, stats: WorkerStats, worker_id: str,
                 dlq_subject: str, tokenizer: Tokenizer, normalize: bool,
                 release_stops: Callable[[int], StopMatcher | None],
                 room_changed: Callable[[], None]):
        self._intake = intake  # holds every message until it is settled
        self._publisher = publisher
        self._stats = stats
        self._worker_id = worker_id
        self._dlq_subject = dlq_subject
        self._tokenizer = tokenizer
        self._normalize = normalize  # an embedding model's own setting (its default)
        self._release_stops = release_stops  # a finished job's stop matcher (the stops stage)
        self._room_changed = room_changed  # a settled message makes room for another pull

    # -- without the device ------------------------------------------------------------

    def edge(self, o: Outcome) -> None:
        res = edge_result(o, self._worker_id, time.monotonic())
        self._stats.on_edge_answer(res.ok, res.error.code.value if res.error else None)
        dead = None
        if o.dead_letter is not None:
            dead = dead_letter(o, self._dlq_subject, self._worker_id, time.time())
            log.error("job_dead_lettered", job=o.job_id, attempt=o.attempt, subject=dead.subject,
                      reason=o.dead_letter)
        else:
            log.info("job_rejected" if not res.ok else "job_answered_at_edge", job=o.job_id,
                     attempt=o.attempt, code=o.error.code.value if o.error else None,
                     reason=o.error.message if o.error else None)
        data = payload(res, o.openai, self._tokenizer, o.json, o.part)
        if data is not None:  # None: an OpenAI line waiting for its other choices
            self._deliver(o.msg, msg_id(o.job_id, o.openai, o.reply_to), o.attempt, data,
                          o.reply_to, Settle.TERM if o.terminate else Settle.ACK, dead)

    def unrun(self, t: Ticket, reason: FinishReason, code: ErrorCode, why: str,
              terminate: bool = True) -> None:
        """Answer a valid job that never reached the executor."""
        self.edge(Outcome(t.msg, t.job.id, t.job.reply_to, t.attempt, t.arrived_at, reason,
                          ErrorInfo(code=code, message=why), prompt_tokens=len(t.prompt),
                          terminate=terminate, json=t.json, openai=t.openai, part=t.part))

    def expired(self, t: Ticket, why: str) -> None:
        self.unrun(t, FinishReason.EXPIRED, ErrorCode.EXPIRED, why)

    def cancelled(self, t: Ticket, why: str) -> None:
        """Acked, not terminated: a cancelled job is done."""
        self.unrun(t, FinishReason.CANCELLED, ErrorCode.CANCELLED, why, terminate=False)

    def bad_schema(self, t: Ticket, why: str) -> None:
        self.unrun(t, FinishReason.ERROR, ErrorCode.BAD_SCHEMA, why)

    # -- after the executor ------------------------------------------------------------

    def completions(self, comps: list[Completion]) -> None:
        """Jobs the executor finished."""
        now = time.monotonic()
        tok = self._tokenizer
        for c in comps:
            t = self._intake.finished(c.key)
            stops = self._release_stops(c.key)
            if t is None:
                continue
            times = JobTimes.of(t, c, now)
            try:
                data, code = self._payload(t, c, stops, times, tok)
            except Exception as e:  # noqa: BLE001 - one job's Result must not cost the others
                stop = isinstance(e, StopFailed)
                c.finish_reason, c.error = "error", (
                    (ErrorCode.STOP_FAILED if stop else ErrorCode.RESULT_FAILED).value,
                    f"{'matching its stop strings' if stop else 'building its Result'} "
                    f"failed: {e!r}"[:400])
                data, code = self._payload(t, c, None, times, None)
            if code not in (None, ErrorCode.CANCELLED):
                log.warning("job_failed", job=t.job.id, attempt=t.attempt, code=code.value,
                            reason=c.error[1] if c.error else None, tokens=len(c.tokens))
            self._stats.on_result(ok=code is None, prompt_tokens=len(t.prompt),
                                  completion_tokens=len(c.tokens),
                                  padded_tokens=c.computed_tokens, cached_tokens=c.cached_tokens,
                                  queued_ms=times.queued_ms, first_token_ms=times.first_token_ms,
                                  total_ms=times.total_ms,
                                  error_code=None if code is None else code.value)
            if data is not None:  # None: an OpenAI line waiting for its other choices
                self._deliver(t.msg, msg_id(t.job.id, t.openai, t.job.reply_to), t.attempt,
                              data, t.job.reply_to, Settle.ACK)

    def _payload(self, t: Ticket, c: Completion, stops: StopMatcher | None, times: JobTimes,
                 tok: Tokenizer | None) -> tuple[bytes | None, ErrorCode | None]:
        """The job's encoded Result and its error code (None: ok). `tok` None: the tokens
        are not decoded (the Result of a job whose decoding failed)."""
        wid = self._worker_id
        if c.embedding is not None:
            return embedding_payload(t, c, wid, times, self._normalize), None
        if c.finish_reason in ("cancelled", "error"):
            text = tok.decode(c.tokens) if c.tokens and tok is not None else None
            if c.finish_reason == "cancelled":
                log.info("job_cancelled", job=t.job.id, attempt=t.attempt, tokens=len(c.tokens))
                return payload(cancelled_result(t, c, text, wid, times), t.openai, tok,
                               t.json, t.part), ErrorCode.CANCELLED
            code = ErrorCode(c.error[0]) if c.error else ErrorCode.RESULT_FAILED
            why = c.error[1] if c.error else "the executor ended it without a reason"
            return payload(failed_result(t, c, text, wid, times, code, why), t.openai, tok,
                           t.json, t.part), code
        text = None if stops is None else cut(stops, c)
        return completion_payload(t, c, tok.decode(c.tokens) if text is None else text, wid,
                                  times, tok), None

    def _deliver(self, msg: Msg, job_id: str, attempt: int, payload: bytes, reply_to: str | None,
                 settle: Settle, dead: DeadLetter | None = None) -> None:
        if self._publisher.aborted:
            self._intake.refused.append(msg)  # the fatal teardown naks it with the rest
            return

        def done(_as_asked: bool) -> None:
            self._intake.settled(msg)
            self._room_changed()
        self._publisher.put(Delivery(msg, job_id, attempt, payload, reply_to, settle, on_done=done,
                                     dead_letter=dead))
