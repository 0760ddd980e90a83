"""Workload generation: deterministic for a seed, inside its bounds, shaped as documented."""

from __future__ import annotations

import random
import statistics

import pytest

from loadgen.workload import (
    MAX_PROMPT_TOKENS,
    MIN_PROMPT_TOKENS,
    VOCAB_SIZE,
    LogNormal,
    Uniform,
    WorkloadSpec,
    generate,
)


def test_same_seed_same_jobs() -> None:
    a = generate(WorkloadSpec(num_jobs=200, seed=7, run_id="r"))
    b = generate(WorkloadSpec(num_jobs=200, seed=7, run_id="r"))
    assert a == b


def test_different_seed_different_jobs() -> None:
    a = generate(WorkloadSpec(num_jobs=50, seed=1))
    b = generate(WorkloadSpec(num_jobs=50, seed=2))
    assert [j.prompt for j in a] != [j.prompt for j in b]


def test_ids_are_run_id_and_index() -> None:
    jobs = generate(WorkloadSpec(num_jobs=5, run_id="abc"))
    assert [j.id for j in jobs] == [f"abc-{n}" for n in range(5)]


def test_token_prompts_are_in_bounds() -> None:
    jobs = generate(WorkloadSpec(num_jobs=2000, seed=3))
    for job in jobs:
        assert isinstance(job.prompt, list)
        assert len(job.prompt) == job.prompt_len
        assert MIN_PROMPT_TOKENS <= job.prompt_len <= MAX_PROMPT_TOKENS
        assert all(0 <= t < VOCAB_SIZE for t in job.prompt)
        assert 1 <= job.max_new_tokens <= 64
    # Both ends of the new-token range are reachable.
    assert {1, 64} <= {j.max_new_tokens for j in jobs}


def test_text_prompts_are_printable_ascii_of_the_drawn_length() -> None:
    jobs = generate(WorkloadSpec(num_jobs=300, seed=4, text=True))
    for job in jobs:
        assert isinstance(job.prompt, str)
        assert len(job.prompt.encode()) == job.prompt_len
        assert all(32 <= ord(c) < 127 for c in job.prompt)


def test_text_and_tokens_draw_the_same_lengths() -> None:
    # Lengths and max_new_tokens are drawn before the prompt body, per job; but the
    # body consumes the stream differently, so only the first job is guaranteed equal.
    tokens = generate(WorkloadSpec(num_jobs=1, seed=9))
    text = generate(WorkloadSpec(num_jobs=1, seed=9, text=True))
    assert tokens[0].prompt_len == text[0].prompt_len
    assert tokens[0].max_new_tokens == text[0].max_new_tokens


def test_lognormal_median_near_90_with_a_long_tail() -> None:
    law = LogNormal()
    rng = random.Random(0)
    lengths = sorted(law.sample(rng) for _ in range(20_000))
    assert 85 <= statistics.median(lengths) <= 95
    p99 = lengths[int(0.99 * len(lengths))]
    assert 450 <= p99 <= 700  # "several hundred", as the docstring promises
    assert lengths[0] >= MIN_PROMPT_TOKENS and lengths[-1] <= MAX_PROMPT_TOKENS


def test_lognormal_clips_to_its_bounds() -> None:
    # A wide law in a narrow window: most draws land outside and must be clipped.
    law = LogNormal(median=15, sigma=3.0, lo=10, hi=20)
    rng = random.Random(1)
    drawn = {law.sample(rng) for _ in range(500)}
    assert min(drawn) == 10 and max(drawn) == 20


def test_uniform_law_is_pluggable() -> None:
    jobs = generate(WorkloadSpec(num_jobs=500, seed=5, prompt_lengths=Uniform(8, 16)))
    assert {j.prompt_len for j in jobs} == set(range(8, 17))


def test_zero_jobs_and_bad_specs() -> None:
    assert generate(WorkloadSpec(num_jobs=0)) == []
    with pytest.raises(ValueError):
        generate(WorkloadSpec(num_jobs=-1))
    with pytest.raises(ValueError):
        generate(WorkloadSpec(num_jobs=1, min_new_tokens=5, max_new_tokens=4))


def test_to_job_builds_a_valid_wire_job() -> None:
    schemas = pytest.importorskip("schemas")
    spec = generate(WorkloadSpec(num_jobs=1, seed=0, run_id="r"))[0]
    job = spec.to_job("fabric.results.r")
    assert isinstance(job, schemas.Job)
    assert (job.id, job.prompt, job.max_new_tokens) == (spec.id, spec.prompt, spec.max_new_tokens)
    assert schemas.decode_job(schemas.encode(job)) == job
