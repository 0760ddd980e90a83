"""Seeded, ragged workloads: the same seed gives the same jobs, byte for byte.

Rule: everything random is drawn from one `random.Random(seed)` in a fixed order (per
job: prompt length, max_new_tokens, then the prompt body), so a workload is a pure
function of its `WorkloadSpec`. Nothing here touches NATS; `JobSpec.to_job()` is the
only door to the wire schema.

Shape for growth: a prompt-length law is any object with `sample(rng) -> int`
(`LogNormal`, `Uniform` today; bimodal or trace replay later). Arrival timing is not a
property of a job: today every job is published at once (a burst, which is what the
benchmark ladder wants); open- and closed-loop arrival schedules belong in a separate
`arrivals` module that the client consults, so a workload can be replayed under
either.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from schemas import Job

__all__ = [
    "JobSpec",
    "LengthLaw",
    "LogNormal",
    "Uniform",
    "WorkloadSpec",
    "generate",
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


class LengthLaw(Protocol):
    """A distribution of prompt lengths, already clipped to its own bounds."""

    def sample(self, rng: random.Random) -> int: ...


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

    def sample(self, rng: random.Random) -> int:
        n = round(rng.lognormvariate(math.log(self.median), self.sigma))
        return min(max(n, self.lo), self.hi)


@dataclass(frozen=True, slots=True)
class Uniform:
    """Uniform lengths in [lo, hi], inclusive."""

    lo: int = MIN_PROMPT_TOKENS
    hi: int = MAX_PROMPT_TOKENS

    def sample(self, rng: random.Random) -> int:
        return rng.randint(self.lo, self.hi)


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


@dataclass(slots=True)
class JobSpec:
    """One job as loadgen sees it, before it meets the wire schema."""

    id: str  # f"{run_id}-{n}", the idempotency key
    prompt: list[int] | str  # token ids in [0, VOCAB_SIZE) or printable ASCII
    prompt_len: int  # tokens (ids) or bytes (text); the length law's draw
    max_new_tokens: int

    def to_job(self, reply_to: str) -> Job:
        """The wire model; greedy sampling, no deadline."""
        from schemas import Job  # deferred: only the publishing path needs the wire

        return Job(
            id=self.id,
            prompt=self.prompt,
            max_new_tokens=self.max_new_tokens,
            reply_to=reply_to,
        )


def generate(spec: WorkloadSpec) -> list[JobSpec]:
    """The workload for `spec`, in publish order."""
    if spec.num_jobs < 0:
        raise ValueError(f"num_jobs must be >= 0, got {spec.num_jobs}")
    if not 0 <= spec.min_new_tokens <= spec.max_new_tokens:
        raise ValueError("need 0 <= min_new_tokens <= max_new_tokens")
    rng = random.Random(spec.seed)
    jobs: list[JobSpec] = []
    for n in range(spec.num_jobs):
        prompt_len = spec.prompt_lengths.sample(rng)
        max_new = rng.randint(spec.min_new_tokens, spec.max_new_tokens)
        prompt: list[int] | str
        if spec.text:
            prompt = "".join(rng.choices(_PRINTABLE, k=prompt_len))
        else:
            prompt = [rng.randrange(VOCAB_SIZE) for _ in range(prompt_len)]
        jobs.append(JobSpec(f"{spec.run_id}-{n}", prompt, prompt_len, max_new))
    return jobs
