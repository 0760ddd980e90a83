"""What a worker sends back: Result payloads and dead letters, built from plain data.

Pure functions (no I/O, no clock of their own): the worker passes the times in, so every
field of what goes on the wire is decided here and tested here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np

from schemas import (ErrorCode, ErrorInfo, FinishReason, Result, Timing, TokenLogprob, Usage,
                     encode, encode_completion)
from schemas.codec import completion_dict
from worker.broker.publisher import DeadLetter
from worker.broker.validate import Outcome, Ticket
from worker.features.openai.request import Call
from worker.features.openai.response import encode_line, join, output_line
from worker.model.tokenizer import Tokenizer

if TYPE_CHECKING:  # the engine's record, read by attribute (no engine import at run time)
    from worker.engine.sequence import Completion


def edge_result(o: Outcome, worker_id: str, now: float) -> Result:
    """The Result of a job answered without the device (bad input, expired, poison...)."""
    return Result(id=o.job_id, ok=o.error is None, finish_reason=o.finish_reason, error=o.error,
                  usage=Usage(prompt_tokens=o.prompt_tokens),
                  timing=Timing(total_ms=(now - o.arrived_at) * 1e3),
                  worker=worker_id, attempt=o.attempt)


@dataclass(frozen=True, slots=True)
class JobTimes:
    """A job's timings from its arrival at this worker, in milliseconds."""

    queued_ms: float  # until admitted
    first_token_ms: float
    total_ms: float  # until its Result was built

    @classmethod
    def of(cls, t: Ticket, c: Completion, now: float) -> JobTimes:
        return cls((t.admitted_at - t.arrived_at) * 1e3, (c.first_token_at - t.arrived_at) * 1e3,
                   (now - t.arrived_at) * 1e3)


def payload(res: Result, call: Call | None, tok: Tokenizer | None, as_json: bool,
            part: int = 0) -> bytes | None:
    """A Result's bytes in the job's encoding: the Result itself, or for a job that came as
    an OpenAI Batch API line, its output line -- None while the line waits for its other
    choices (`part` is this job's)."""
    if call is None:
        return encode(res, as_json=as_json)
    return line_payload(call, part, res.model_dump(mode="json"), tok, as_json)


def line_payload(call: Call, part: int, result: dict[str, Any], tok: Tokenizer | None,
                 as_json: bool) -> bytes | None:
    results = join(call, part, result)
    return None if results is None else encode_line(output_line(call, results, tok), as_json)


def msg_id(job_id: str, call: Call | None, reply_to: str | None) -> str:
    """The Result's `Nats-Msg-Id`: the job id; an OpenAI line's custom id is scoped by its
    reply subject, since batch files from different producers reuse ids like `request-1`."""
    return job_id if call is None or not job_id else f"{job_id}@{reply_to}"


def completion_payload(t: Ticket, c: Completion, text: str, worker_id: str,
                       times: JobTimes, tok: Tokenizer | None = None) -> bytes | None:
    """The encoded Result of a job the executor ran (built without a pydantic model: the
    hot path, one per job), in the job's encoding (`tok`: an OpenAI line's token strings)."""
    fields = dict(
        id=t.job.id, tokens=c.tokens, text=text, finish_reason=FinishReason(c.finish_reason),
        prompt_tokens=len(t.prompt), completion_tokens=len(c.tokens),
        padded_tokens=c.computed_tokens, cached_tokens=c.cached_tokens, queued_ms=times.queued_ms,
        first_token_ms=times.first_token_ms, total_ms=times.total_ms, worker=worker_id,
        attempt=t.attempt, logprobs=logprob_entries(c, len(c.tokens)))
    if t.openai is not None:
        return line_payload(t.openai, t.part, completion_dict(**fields), tok, t.json)
    return encode_completion(**fields, as_json=t.json)


def cancelled_result(t: Ticket, c: Completion, text: str | None, worker_id: str,
                     times: JobTimes) -> Result:
    """A job the executor ended because a cancel named it: an error, with what it made."""
    return failed_result(t, c, text, worker_id, times, ErrorCode.CANCELLED,
                         "cancelled while it ran; tokens are those made so far",
                         FinishReason.CANCELLED)


def failed_result(t: Ticket, c: Completion, text: str | None, worker_id: str, times: JobTimes,
                  code: ErrorCode, message: str,
                  finish_reason: FinishReason = FinishReason.ERROR) -> Result:
    """A job the executor ended early -- cancelled, or one of its own parts failed (its
    grammar, its logprobs, its stop matcher): an error Result with the tokens it made
    (and the logprob rows kept for them: finite, the executor refuses others)."""
    rows = logprob_entries(c, len(c.tokens)) or []
    return Result(id=t.job.id, ok=False, tokens=c.tokens, text=text,
                  finish_reason=finish_reason, error=ErrorInfo(code=code, message=message),
                  usage=Usage(prompt_tokens=len(t.prompt), completion_tokens=len(c.tokens),
                              padded_tokens=c.computed_tokens, cached_tokens=c.cached_tokens),
                  timing=Timing(queued_ms=times.queued_ms, first_token_ms=times.first_token_ms,
                                total_ms=times.total_ms),
                  worker=worker_id, attempt=t.attempt,
                  logprobs=[TokenLogprob.model_validate(e) for e in rows] or None)


def embedding_payload(t: Ticket, c: Completion, worker_id: str, times: JobTimes,
                      default_normalize: bool) -> bytes | None:
    """An embed job's Result: its vector cut to `dimensions` and normalized as the job (or
    the checkpoint) says, as float32 values -- msgpack float 32, or JSON numbers of the
    float32's shortest round-trip form. An OpenAI line's input: its output line, or None
    while the line waits for its other inputs."""
    v = np.asarray(c.embedding, dtype=np.float32)
    if t.job.dimensions is not None:
        v = v[:t.job.dimensions]
    if default_normalize if t.job.normalize is None else t.job.normalize:
        v = v / max(float(np.linalg.norm(v)), 1e-12)
    values = [float(f"{x:.9g}") for x in v.tolist()] if t.json else v.tolist()
    res = Result(id=t.job.id, ok=True, finish_reason=FinishReason.STOP, embedding=values,
                 truncated=t.truncated,
                 usage=Usage(prompt_tokens=len(t.prompt), padded_tokens=c.computed_tokens),
                 timing=Timing(queued_ms=times.queued_ms, first_token_ms=times.first_token_ms,
                               total_ms=times.total_ms),
                 worker=worker_id, attempt=t.attempt)
    if t.openai is not None:
        return payload(res, t.openai, None, t.json, t.part)
    if t.json:
        return res.model_dump_json().encode()
    return msgpack.packb(res.model_dump(mode="json"), use_bin_type=True, use_single_float=True)


def logprob_entries(c: Completion, n_tokens: int) -> list[dict[str, Any]] | None:
    """The Result's `logprobs` from the executor's rows (`Completion.logprobs`): one entry per
    token kept, `{token, logprob, top: [[id, logprob], ...]}`."""
    if c.logprobs is None:
        return None
    rows = c.logprobs[:n_tokens]
    n = (rows.shape[1] - 1) // 2
    chosen = rows[:, 0].tolist()
    ids = rows[:, 1:1 + n].astype("int64").tolist()
    vals = rows[:, 1 + n:].tolist()
    return [{"token": tok, "logprob": lp, "top": [[i, v] for i, v in zip(ti, tv)]}
            for tok, lp, ti, tv in zip(c.tokens, chosen, ids, vals)]


def reply_json(body: dict[str, Any]) -> bytes:
    """A control reply (to a cancel request) as JSON: meant for people and scripts."""
    return json.dumps(body, separators=(",", ":")).encode()


def dead_letter(o: Outcome, dlq_subject: str, worker_id: str, now_unix: float) -> DeadLetter:
    """The job's original bytes with its provenance, for the dead-letter stream."""
    md = o.msg.metadata
    headers = {
        # One dead letter per stored job message, however often it is dead-lettered.
        "Nats-Msg-Id": f"{md.stream}:{md.sequence.stream}",
        "Fabric-Job-Id": o.job_id,
        "Fabric-Stream": md.stream,
        "Fabric-Stream-Seq": str(md.sequence.stream),
        "Fabric-Subject": o.msg.subject,
        "Fabric-Deliveries": str(o.attempt),
        "Fabric-Error": o.dead_letter or "",
        "Fabric-Worker": worker_id,
        "Fabric-Dead-At": f"{now_unix:.3f}",
    }
    return DeadLetter(dlq_subject, o.msg.data, headers)

