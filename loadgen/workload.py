"""Seeded, ragged workloads: the same seed gives the same jobs, byte for byte.

Rule: everything random is drawn from one `random.Random(seed)` in a fixed order (per
job: its shape -- prompt length, then max_new_tokens -- then the prompt body), so a
workload is a pure function of its `WorkloadSpec`. Nothing here touches NATS;
`JobSpec.to_job()` is the only door to the wire schema.

A job's shape comes from a `ShapeLaw`: `Independent` (a prompt-length law such as
`LogNormal` or `Uniform`, and max_new_tokens uniform in a range -- what
`WorkloadSpec(prompt_lengths=...)` has always meant), `Bimodal` (chat plus documents,
where the generation length depends on which kind of prompt it is), or `Trace` (a
recorded file replayed row by row). Arrival timing is not a property of a job: it lives
in `loadgen.arrivals`, so one workload can be published as a burst, a closed loop, an
open loop, or at a trace's own times.

What a job asks beyond its shape -- sent as chat `messages`, stop strings, logprobs,
ignore_eos, and whether its producer cancels it -- is the same for every job or, for the
cancel, drawn from a second generator seeded from the same seed: turning these on never
changes a prompt, and a larger cancel fraction only adds jobs to the cancelled ones.

The trace file format and its parser live in `loadgen.trace`; docs/loadgen.md has
the details.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from loadgen.trace import Trace

if TYPE_CHECKING:
    from schemas import Job

__all__ = [
    "Bimodal",
    "Independent",
    "JobSpec",
    "LengthLaw",
    "LogNormal",
    "ShapeLaw",
    "Uniform",
    "WorkloadSpec",
    "generate",
    "CHAT_SYSTEM",
    "VOCAB_SIZE",
    "MIN_PROMPT_TOKENS",
    "MAX_PROMPT_TOKENS",
]

# Token ids 0..255 are the builtin model's byte tokens; its specials sit above and a
# random prompt must not contain them.
VOCAB_SIZE = 256
MIN_PROMPT_TOKENS = 4
# 1024 prompt + 64 new tokens = 1088, the demo's max_seq_len.
MAX_PROMPT_TOKENS = 1024
# Printable ASCII without whitespace control characters (space..tilde): one byte each,
# so a text prompt of n characters is n byte tokens for a byte-level tokenizer.
_PRINTABLE = "".join(chr(c) for c in range(32, 127))
# Embedding jobs' texts: words drawn from this list (wordpiece tokenizers split text into
# about 1.3 tokens a word of it), so lengths in tokens follow the law as they would for prose.
_WORDS = ("the of and to in is was for on that with as by at from his her an were are "
          "which this be or has had not but have they one their its new first after also "
          "who two been more when time would there other into only about over year may "
          "city state world between during under people known three since later being "
          "company government university century system music national river several "
          "station village water embedding retrieval queue worker message broker token "
          "index search document question answer agent pipeline batch latency throughput").split()
# A chat job's system message: fixed, so chat traffic shares a prefix as real traffic does.
CHAT_SYSTEM = "You are a helpful assistant. Answer briefly."


class LengthLaw(Protocol):
    """A distribution of prompt lengths, already clipped to its own bounds."""

    def sample(self, rng: random.Random) -> int: ...


class ShapeLaw(Protocol):
    """A law over job n's shape: (prompt tokens, max_new_tokens)."""

    def shape(self, n: int, rng: random.Random) -> tuple[int, int]: ...


@dataclass(frozen=True, slots=True)
class LogNormal:
    """Log-normal lengths: most prompts short, a long tail, as in chat traffic.

    sigma=0.8 with median 90 puts p75 near 155, p95 near 335 and p99 near 580, so a
    1000-job run holds a few dozen prompts of several hundred tokens and a handful
    near the 1024 clip: enough spread that padding to the longest would waste most of
    a batch, which is exactly what the scheduler rungs are meant to show.
    """

    median: float = 90.0  # exp(mu)
    sigma: float = 0.8  # std-dev of log(length)
    lo: int = MIN_PROMPT_TOKENS  # clip bounds, inclusive
    hi: int = MAX_PROMPT_TOKENS

    def __post_init__(self) -> None:
        if not (self.median > 0 and self.sigma >= 0 and 1 <= self.lo <= self.hi):
            raise ValueError(f"LogNormal needs median > 0, sigma >= 0, 1 <= lo <= hi: {self}")

    def sample(self, rng: random.Random) -> int:
        n = round(rng.lognormvariate(math.log(self.median), self.sigma))
        return min(max(n, self.lo), self.hi)


@dataclass(frozen=True, slots=True)
class Uniform:
    """Uniform lengths in [lo, hi], inclusive."""

    lo: int = MIN_PROMPT_TOKENS
    hi: int = MAX_PROMPT_TOKENS

    def __post_init__(self) -> None:
        if not 0 <= self.lo <= self.hi:
            raise ValueError(f"Uniform needs 0 <= lo <= hi: {self}")

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)


@dataclass(frozen=True, slots=True)
class Independent:
    """Prompt length from a length law, then max_new_tokens uniform in [min_new, max_new]:
    the two drawn independently (the original workload, byte for byte)."""

    prompt: LengthLaw
    min_new: int
    max_new: int

    def shape(self, n: int, rng: random.Random) -> tuple[int, int]:
        return self.prompt.sample(rng), rng.randint(self.min_new, self.max_new)


@dataclass(frozen=True, slots=True)
class Bimodal:
    """Chat plus documents: two populations whose generation length depends on the kind.

    Default: 80 % chat -- log-normal prompts, median 60, sigma 0.6 (p99 near 240),
    clipped to [4, 512], answers of 8 to 64 new tokens -- and 20 % documents -- 600 to
    1000 prompt tokens, uniform, summarised in 24 to 40 new tokens (mean 32). Every job
    fits the demo's max_seq_len (1088). Per job: one draw picks the kind, then the
    kind's prompt length, then its max_new_tokens.

    What it exercises: most work is short, but a fifth of the prompts are ten times
    longer, so a batch padded to its longest prompt wastes most of its compute, and
    long prefills land in the middle of short decodes.
    """

    doc_share: float = 0.2  # probability that a job is a document
    chat: LengthLaw = LogNormal(median=60.0, sigma=0.6, lo=MIN_PROMPT_TOKENS, hi=512)
    chat_new: tuple[int, int] = (8, 64)  # max_new_tokens for chat, uniform, inclusive
    doc: LengthLaw = Uniform(600, 1000)
    doc_new: tuple[int, int] = (24, 40)  # max_new_tokens for documents, uniform, inclusive

    def __post_init__(self) -> None:
        if not 0.0 <= self.doc_share <= 1.0:
            raise ValueError(f"doc_share must be in [0, 1], got {self.doc_share}")
        for name, (lo, hi) in (("chat_new", self.chat_new), ("doc_new", self.doc_new)):
            if not 0 <= lo <= hi:
                raise ValueError(f"{name} must be (lo, hi) with 0 <= lo <= hi, got {(lo, hi)}")

    def shape(self, n: int, rng: random.Random) -> tuple[int, int]:
        if rng.random() < self.doc_share:
            return self.doc.sample(rng), rng.randint(*self.doc_new)
        return self.chat.sample(rng), rng.randint(*self.chat_new)


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Everything that determines a workload. Same spec, same jobs."""

    num_jobs: int
    seed: int = 0
    run_id: str = "run"  # job ids are f"{run_id}-{n}"
    prompt_lengths: LengthLaw = field(default_factory=LogNormal)
    min_new_tokens: int = 1  # max_new_tokens is uniform in [min, max], inclusive
    max_new_tokens: int = 64
    text: bool = False  # text prompts (printable ASCII) instead of token ids
    # When set, draws each job's (prompt length, max_new_tokens) instead of the three
    # fields above (Bimodal, Trace).
    shape: ShapeLaw | None = None
    # Sent as messages: CHAT_SYSTEM, then the text prompt as the user's (implies text).
    chat: bool = False
    stop: tuple[str, ...] = ()  # sampling.stop of every job
    logprobs: int = 0  # sampling.logprobs of every job
    ignore_eos: bool = False  # sampling.ignore_eos of every job
    cancel_fraction: float = 0.0  # share of jobs whose producer cancels them, drawn per job
    cancel_after_ms: float = 0.0  # a cancel goes this long after its job was published
    # Embedding jobs (task embed, truncate on): texts of words, lengths by the length law in
    # about-tokens; for an embedding worker.
    embed: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.cancel_fraction <= 1.0:
            raise ValueError(f"cancel_fraction must be in [0, 1], got {self.cancel_fraction}")
        if not self.cancel_after_ms >= 0:
            raise ValueError(f"cancel_after_ms must be >= 0, got {self.cancel_after_ms}")
        if self.stop or self.logprobs:
            # The wire's own bounds, checked here so a bad flag fails before a publish.
            from schemas.models import MAX_LOGPROBS, MAX_STOP_CHARS, MAX_STOP_STRINGS

            if len(self.stop) > MAX_STOP_STRINGS or not all(
                    1 <= len(s) <= MAX_STOP_CHARS for s in self.stop):
                raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings of 1-"
                                 f"{MAX_STOP_CHARS} characters, got {list(self.stop)}")
            if not 0 <= self.logprobs <= MAX_LOGPROBS:
                raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.logprobs}")


@dataclass(slots=True)
class JobSpec:
    """One job as loadgen sees it, before it meets the wire schema."""

    id: str  # f"{run_id}-{n}", the idempotency key
    prompt: list[int] | str  # token ids in [0, VOCAB_SIZE) or printable ASCII
    prompt_len: int  # tokens (ids) or bytes (text); the length law's draw
    max_new_tokens: int
    system: str | None = None  # chat: sent as messages, this system one then the user's prompt
    stop: tuple[str, ...] = ()
    logprobs: int = 0
    ignore_eos: bool = False
    cancel_after_s: float | None = None  # cancel this long after the publish; None: never
    task: str = "generate"  # "embed": the prompt's embedding (truncated to the model's limit)
    temperature: float = 0.0  # 0: greedy
    seed: int | None = None  # sampling.seed; None: the worker chooses
    response_format: dict | None = None  # structured output, as on the wire
    as_json: bool | None = None  # sent as JSON (True) or msgpack (False); None: the run's choice

    def to_job(self, reply_to: str) -> Job:
        """The wire model; no deadline."""
        from schemas import Job, Message, Role, Sampling  # deferred: only publishing needs it

        if self.task == "embed":
            return Job(id=self.id, prompt=self.prompt, task="embed", reply_to=reply_to,
                       truncate=True)
        if self.system is None:
            body: dict[str, object] = {"prompt": self.prompt}
        else:
            body = {"messages": [Message(role=Role.SYSTEM, content=self.system),
                                 Message(role=Role.USER, content=self.prompt)]}
        return Job(
            id=self.id,
            **body,
            max_new_tokens=self.max_new_tokens,
            reply_to=reply_to,
            sampling=Sampling(stop=list(self.stop), logprobs=self.logprobs,
                              ignore_eos=self.ignore_eos, temperature=self.temperature,
                              seed=self.seed),
            response_format=self.response_format,
        )


def generate(spec: WorkloadSpec) -> list[JobSpec]:
    """The workload for `spec`, in publish order."""
    if spec.num_jobs < 0:
        raise ValueError(f"num_jobs must be >= 0, got {spec.num_jobs}")
    if not 0 <= spec.min_new_tokens <= spec.max_new_tokens:
        raise ValueError("need 0 <= min_new_tokens <= max_new_tokens")
    if isinstance(spec.shape, Trace) and spec.num_jobs > len(spec.shape.rows):
        raise ValueError(f"trace {spec.shape.source} has {len(spec.shape.rows)} rows; "
                         f"cannot replay {spec.num_jobs} jobs")
    law = spec.shape or Independent(spec.prompt_lengths, spec.min_new_tokens,
                                    spec.max_new_tokens)
    rng = random.Random(spec.seed)
    # Its own stream (str seeds hash the same in every process), so the choice neither
    # moves a prompt nor depends on how many jobs the run has.
    cancel_rng = random.Random(f"cancel-{spec.seed}")
    text = spec.text or spec.chat
    jobs: list[JobSpec] = []
    for n in range(spec.num_jobs):
        prompt_len, max_new = law.shape(n, rng)
        prompt: list[int] | str
        if spec.embed:
            prompt = " ".join(rng.choices(_WORDS, k=max(1, prompt_len * 3 // 4)))
        elif text:
            prompt = "".join(rng.choices(_PRINTABLE, k=prompt_len))
        else:
            prompt = [rng.randrange(VOCAB_SIZE) for _ in range(prompt_len)]
        cancelled = cancel_rng.random() < spec.cancel_fraction
        jobs.append(JobSpec(f"{spec.run_id}-{n}", prompt, prompt_len, max_new,
                            system=CHAT_SYSTEM if spec.chat else None, stop=spec.stop,
                            logprobs=spec.logprobs, ignore_eos=spec.ignore_eos,
                            cancel_after_s=spec.cancel_after_ms / 1e3 if cancelled else None,
                            task="embed" if spec.embed else "generate"))
    return jobs
