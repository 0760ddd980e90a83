"""Mixed producer traffic: every feature a producer may ask for, drawn per job.

Rule: a mix only decorates a workload (`apply_mix(jobs, mix, seed)`): the prompts and
shapes stay what the workload drew, and the features come from a generator of their own
seeded from the same seed, so the same seed gives the same mixed jobs.

Each feature is a share of jobs, drawn independently: chat `messages`; sampling with stop
strings, logprobs, a temperature and a seed; structured output under one of
`SCHEMA_COUNT` one-property JSON Schemas (an integer with a maximum: the shape that once
killed workers under this mix); the payload sent as JSON rather than msgpack; a cancel
sent 0 to `cancel_max_ms` after the publish. The defaults are that traffic.
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass

from loadgen.workload import CHAT_SYSTEM, JobSpec

__all__ = ["Mix", "SCHEMA_COUNT", "apply_mix", "one_property_schema", "parse_mix"]

SCHEMA_COUNT = 300  # distinct response formats: more than the worker's compile cache holds
STOPS = ("zz", "\n\n")


@dataclass(frozen=True, slots=True)
class Mix:
    """The share of jobs (0..1) that ask for each feature."""

    chat: float = 0.25
    stops: float = 0.30  # stop strings, logprobs 0/2/5, temperature 0.7, a seed
    schemas: float = 0.25
    json: float = 0.30
    cancel: float = 0.10
    cancel_max_ms: float = 200.0

    def __post_init__(self) -> None:
        for f in ("chat", "stops", "schemas", "json", "cancel"):
            if not 0.0 <= getattr(self, f) <= 1.0:
                raise ValueError(f"mix: {f} must be a share in [0, 1], got {getattr(self, f)}")
        if self.cancel_max_ms < 0:
            raise ValueError(f"mix: cancel_max_ms must be >= 0, got {self.cancel_max_ms}")


def parse_mix(text: str) -> Mix:
    """`chat=0.25,stops=0.3,...` over the defaults; an empty string is the default mix."""
    fields = {f.name for f in dataclasses.fields(Mix)}
    given: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or name not in fields:
            raise ValueError(f"mix: {part!r} is not NAME=SHARE with NAME one of "
                             f"{', '.join(sorted(fields))}")
        given[name] = float(value)
    return Mix(**given)


def one_property_schema(n: int) -> dict:
    return {"type": "object", "properties": {f"k{n}": {"type": "integer", "maximum": n + 10}},
            "required": [f"k{n}"]}


def apply_mix(jobs: list[JobSpec], mix: Mix, seed: int) -> list[JobSpec]:
    """The same jobs with features drawn per job. Prompts must be text (chat needs it)."""
    rng = random.Random(f"mix-{seed}")
    out = []
    for n, job in enumerate(jobs):
        if not isinstance(job.prompt, str):
            raise ValueError("a mixed workload needs text prompts")
        chat, stops, schema, as_json, cancel = (rng.random() < p for p in (
            mix.chat, mix.stops, mix.schemas, mix.json, mix.cancel))
        extra: dict = {"as_json": as_json}
        if chat:
            extra["system"] = CHAT_SYSTEM
        if stops:
            extra.update(stop=STOPS, logprobs=rng.choice((0, 2, 5)), temperature=0.7, seed=n)
        if schema:
            extra["response_format"] = {"type": "json_schema",
                                        "schema": one_property_schema(rng.randrange(SCHEMA_COUNT))}
        if cancel:
            extra["cancel_after_s"] = rng.uniform(0.0, mix.cancel_max_ms) / 1e3
        out.append(dataclasses.replace(job, **extra))
    return out
