"""Workloads and arrivals: deterministic for a seed, inside their bounds, shaped as
documented; trace files parsed, or refused with the file, line and reason."""

from __future__ import annotations

import json
import random
import statistics
from pathlib import Path

import pytest

from loadgen.arrivals import Burst, Closed, Schedule, describe, poisson, replay
from loadgen.trace import SAMPLE_TRACE, TraceError, TraceRow, load_trace, parse_trace
from loadgen.workload import (
    CHAT_SYSTEM,
    MAX_PROMPT_TOKENS,
    MIN_PROMPT_TOKENS,
    VOCAB_SIZE,
    Bimodal,
    Independent,
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


# -- what each job asks: chat, sampling options, cancels, JSON ---------------------------


def test_chat_jobs_send_messages_with_the_text_prompt_as_the_users() -> None:
    schemas = pytest.importorskip("schemas")
    text = generate(WorkloadSpec(num_jobs=50, seed=6, text=True))
    chat = generate(WorkloadSpec(num_jobs=50, seed=6, chat=True))  # implies text
    for t, c in zip(text, chat):
        job = c.to_job("fabric.results.r")
        assert isinstance(job, schemas.Job) and job.prompt is None
        assert [(m.role, m.content) for m in job.messages] == [
            (schemas.Role.SYSTEM, CHAT_SYSTEM), (schemas.Role.USER, t.prompt)]
        # The length law is the user content's: the same draws as the text workload.
        assert (c.prompt, c.prompt_len, c.max_new_tokens) == (t.prompt, t.prompt_len,
                                                             t.max_new_tokens)
        assert len(c.prompt.encode()) == c.prompt_len
        assert "prompt" not in job.model_dump(mode="json")  # absent on the wire, not null
        assert schemas.decode_job(schemas.encode(job)) == job


def test_stop_logprobs_and_ignore_eos_land_in_every_jobs_sampling() -> None:
    schemas = pytest.importorskip("schemas")
    spec = WorkloadSpec(num_jobs=20, seed=2, stop=("\n\n", "###"), logprobs=3, ignore_eos=True)
    for j in generate(spec):
        s = j.to_job("fabric.results.r").sampling
        assert (s.stop, s.logprobs, s.ignore_eos) == (["\n\n", "###"], 3, True)
        assert (s.temperature, s.top_k, s.top_p) == (0.0, 0, 1.0)  # still greedy
    # Without them a job is what it always was: default sampling, same bytes on the wire.
    plain = generate(WorkloadSpec(num_jobs=1, seed=2))[0]
    assert plain.to_job("fabric.results.r").sampling == schemas.Sampling()


def test_job_options_never_move_a_prompt() -> None:
    base = generate(WorkloadSpec(num_jobs=100, seed=8, text=True))
    dressed = generate(WorkloadSpec(num_jobs=100, seed=8, text=True, stop=("x",), logprobs=1,
                                    ignore_eos=True, cancel_fraction=0.5, cancel_after_ms=5))
    assert [(j.prompt, j.max_new_tokens) for j in base] == [
        (j.prompt, j.max_new_tokens) for j in dressed]


def test_the_cancel_choice_is_seeded_nested_and_near_the_fraction() -> None:
    def chosen(n: int, fraction: float, seed: int = 4) -> list[int]:
        jobs = generate(WorkloadSpec(num_jobs=n, seed=seed, cancel_fraction=fraction,
                                     cancel_after_ms=250))
        assert {j.cancel_after_s for j in jobs} <= {None, 0.25}
        return [i for i, j in enumerate(jobs) if j.cancel_after_s is not None]

    quarter = chosen(4000, 0.25)
    assert quarter == chosen(4000, 0.25)  # same seed, same jobs
    assert quarter != chosen(4000, 0.25, seed=5)
    # Binomial std for 4000 jobs at 0.25 is 0.7 %: +-3 % is four of them.
    assert 0.22 <= len(quarter) / 4000 <= 0.28
    # A larger fraction adds jobs; a shorter run keeps its prefix's choice.
    assert set(chosen(4000, 0.1)) <= set(quarter) <= set(chosen(4000, 0.5))
    assert chosen(100, 0.25) == [i for i in quarter if i < 100]
    assert chosen(50, 0.0) == [] and chosen(50, 1.0) == list(range(50))


def test_a_job_can_go_as_json() -> None:
    schemas = pytest.importorskip("schemas")
    spec = generate(WorkloadSpec(num_jobs=1, seed=0, run_id="r", chat=True, stop=("ab",),
                                 logprobs=2))[0]
    job = spec.to_job("fabric.results.r")
    wire = schemas.encode(job, as_json=True)
    assert schemas.is_json(wire) and json.loads(wire)["messages"][1]["content"] == spec.prompt
    assert schemas.decode_job(wire) == job


@pytest.mark.parametrize("bad, message", [
    ({"cancel_fraction": 1.5}, "cancel_fraction"),
    ({"cancel_fraction": -0.1}, "cancel_fraction"),
    ({"cancel_after_ms": -1.0}, "cancel_after_ms"),
    ({"stop": tuple("abcdefghi")}, "at most 8 stop strings"),
    ({"stop": ("",)}, "stop strings of 1-128"),
    ({"stop": ("x" * 129,)}, "stop strings of 1-128"),
    ({"logprobs": 21}, "logprobs"),
    ({"logprobs": -1}, "logprobs"),
])
def test_job_options_outside_the_wires_bounds_are_refused(bad: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        WorkloadSpec(num_jobs=1, **bad)


# -- shapes: bimodal ---------------------------------------------------------------------


def test_default_spec_is_the_independent_law() -> None:
    # The original draw order, byte for byte: existing seeds keep their workloads.
    a = generate(WorkloadSpec(num_jobs=100, seed=21))
    b = generate(WorkloadSpec(num_jobs=100, seed=21, shape=Independent(LogNormal(), 1, 64)))
    assert a == b


def test_bimodal_is_deterministic_and_shaped_as_documented() -> None:
    spec = WorkloadSpec(num_jobs=200, seed=5, shape=Bimodal())
    assert generate(spec) == generate(spec)
    # The law itself, without prompt bodies, for a large sample.
    rng = random.Random(5)
    shapes = [Bimodal().shape(n, rng) for n in range(20_000)]
    docs = [(p, m) for p, m in shapes if p >= 600]
    chat = [(p, m) for p, m in shapes if p < 600]
    # 20 % documents: the binomial std is 0.3 %, so +-1.5 % is five of them.
    assert 0.185 <= len(docs) / len(shapes) <= 0.215
    assert all(600 <= p <= 1000 and 24 <= m <= 40 for p, m in docs)
    assert 31 <= statistics.mean(m for _, m in docs) <= 33
    assert 55 <= statistics.median(p for p, _ in chat) <= 65
    assert all(4 <= p <= 512 and 8 <= m <= 64 for p, m in chat)
    # Every job fits the demo's max_seq_len.
    assert max(p + m for p, m in shapes) <= 1088


def test_bimodal_share_is_a_parameter_and_checked() -> None:
    jobs = generate(WorkloadSpec(num_jobs=500, seed=1, shape=Bimodal(doc_share=1.0)))
    assert all(j.prompt_len >= 600 for j in jobs)
    jobs = generate(WorkloadSpec(num_jobs=500, seed=1, shape=Bimodal(doc_share=0.0)))
    assert all(j.prompt_len <= 512 for j in jobs)
    with pytest.raises(ValueError, match="doc_share"):
        Bimodal(doc_share=1.5)
    with pytest.raises(ValueError, match="chat_new"):
        Bimodal(chat_new=(10, 5))


def test_length_laws_refuse_impossible_bounds() -> None:
    with pytest.raises(ValueError):
        Uniform(10, 5)
    with pytest.raises(ValueError):
        LogNormal(median=0)
    with pytest.raises(ValueError):
        LogNormal(lo=0)


# -- traces ------------------------------------------------------------------------------


def test_trace_csv_with_header_comments_and_any_column_order() -> None:
    text = ("# recorded 2024-05-01\n"
            "\n"
            "max_new_tokens,arrival_s,prompt_tokens,user\n"
            "16,1714550400.5,120,alice\n"
            "0,1714550400.0,7,bob\n")
    trace = parse_trace(text, "t.csv")
    # Sorted by arrival, and arrival offsets are relative to the first row.
    assert trace.rows == (TraceRow(1714550400.0, 7, 0), TraceRow(1714550400.5, 120, 16))
    assert trace.arrivals_s == [0.0, 0.5]
    assert trace.duration_s == 0.5


def test_trace_csv_without_header_and_jsonl_agree() -> None:
    csv_text = "0,10,4\n0.25,20,8\n2.0,30,0\n"
    jsonl = "\n".join(json.dumps({"arrival_s": a, "prompt_tokens": p, "max_new_tokens": m,
                                  "extra": "ignored"})
                      for a, p, m in ((0, 10, 4), (0.25, 20, 8), (2.0, 30, 0)))
    assert parse_trace(csv_text).rows == parse_trace(jsonl).rows
    assert [r.prompt_tokens for r in parse_trace(csv_text).rows] == [10, 20, 30]


@pytest.mark.parametrize("text, message", [
    ("", "no rows"),
    ("# only a comment\n\n", "no rows"),
    ("arrival_s,prompt_tokens,max_new_tokens\n", "a header but no rows"),
    ("arrival_s,prompt_tokens\n0,1\n", "t:1: header lacks max_new_tokens"),
    ("0,10,4\n1,20\n", "t:2: expected 3 comma-separated fields"),
    ("0,10,4\n1,20,4,9\n", "t:2: expected 3 comma-separated fields"),
    ("0,10,4\nsoon,20,4\n", "t:2: arrival_s is not a number: 'soon'"),
    ("0,10.5,4\n", "t:1: prompt_tokens must be a whole number"),
    ("0,10,nan\n", "t:1: max_new_tokens is not a finite number"),
    ("-1,10,4\n", "t:1: arrival_s must be >= 0"),
    ("0,0,4\n", "t:1: prompt_tokens must be >= 1"),
    ("0,10,-4\n", "t:1: max_new_tokens must be >= 0"),
    ("0,,4\n", "t:1: missing prompt_tokens"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "max_new_tokens": 1}\n{"arrival_s": 1,\n',
     "t:2: not valid JSON"),
    ('{"arrival_s": 0, "prompt_tokens": 5}\n', "t:1: missing max_new_tokens"),
    ('{"arrival_s": 0, "prompt_tokens": true, "max_new_tokens": 1}\n',
     "t:1: prompt_tokens is not a finite number"),
    ('{"arrival_s": 0, "prompt_tokens": 5, "max_new_tokens": 1}\n[1, 2, 3]\n',
     "t:2: expected a JSON object"),
])
def test_trace_errors_name_the_line_and_the_problem(text: str, message: str) -> None:
    with pytest.raises(TraceError) as e:
        parse_trace(text, "t")
    assert message in str(e.value)


def test_load_trace_names_an_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(TraceError, match="nope.csv: cannot read trace"):
        load_trace(tmp_path / "nope.csv")
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(TraceError, match="not a UTF-8 text file"):
        load_trace(binary)


def test_a_trace_replays_its_shapes_with_seeded_bodies() -> None:
    trace = parse_trace("0,5,1\n0.1,1000,0\n0.2,3000,7\n")
    jobs = generate(WorkloadSpec(num_jobs=3, seed=4, shape=trace))
    # As recorded, unclipped: a 3000-token prompt is the worker's to refuse.
    assert [(j.prompt_len, j.max_new_tokens) for j in jobs] == [(5, 1), (1000, 0), (3000, 7)]
    assert [len(j.prompt) for j in jobs] == [5, 1000, 3000]
    assert jobs == generate(WorkloadSpec(num_jobs=3, seed=4, shape=trace))
    assert jobs != generate(WorkloadSpec(num_jobs=3, seed=5, shape=trace))
    assert len(generate(WorkloadSpec(num_jobs=2, shape=trace))) == 2
    with pytest.raises(ValueError, match="has 3 rows; cannot replay 4 jobs"):
        generate(WorkloadSpec(num_jobs=4, shape=trace))


def test_the_sample_trace_is_well_formed() -> None:
    trace = load_trace(SAMPLE_TRACE)
    assert 100 <= len(trace.rows) <= 300 and 20 <= trace.duration_s <= 40
    assert all(r.prompt_tokens + r.max_new_tokens <= 1088 for r in trace.rows)


# -- arrivals ----------------------------------------------------------------------------


def test_poisson_is_seeded_and_starts_at_zero() -> None:
    a = poisson(500, 20.0, seed=3)
    assert a == poisson(500, 20.0, seed=3)
    assert a.offsets_s != poisson(500, 20.0, seed=4).offsets_s
    assert a.offsets_s[0] == 0.0 and len(a.offsets_s) == 500
    assert list(a.offsets_s) == sorted(a.offsets_s)
    assert poisson(0, 5.0).offsets_s == ()


def test_poisson_rate_and_dispersion_within_statistical_bounds() -> None:
    rate, n = 50.0, 20_000
    offsets = poisson(n, rate, seed=11).offsets_s
    gaps = [b - a for a, b in zip(offsets, offsets[1:])]
    # Exponential gaps: mean 1/rate (std error 0.7 % here) and coefficient of variation 1.
    assert statistics.mean(gaps) == pytest.approx(1 / rate, rel=0.03)
    assert statistics.stdev(gaps) / statistics.mean(gaps) == pytest.approx(1.0, abs=0.05)
    # Counts per one-second window: Poisson, so variance over mean near 1 (a fixed-gap
    # schedule would give 0, a bursty one well above 1).
    counts = [0] * (int(offsets[-1]) + 1)
    for t in offsets:
        counts[int(t)] += 1
    counts = counts[:-1]  # the last window is partial
    assert statistics.mean(counts) == pytest.approx(rate, rel=0.03)
    assert 0.8 <= statistics.variance(counts) / statistics.mean(counts) <= 1.2
    assert describe(poisson(n, rate, seed=11), n)["offered_jobs_per_s"] == pytest.approx(
        rate, rel=0.03)


def test_arrival_parameters_are_checked() -> None:
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="rate"):
            poisson(10, bad)
        with pytest.raises(ValueError, match="speed"):
            replay([0.0, 1.0], bad)
    with pytest.raises(ValueError, match="concurrency"):
        Closed(0)
    with pytest.raises(ValueError, match="non-decreasing"):
        Schedule((0.0, 2.0, 1.0), "trace")


def test_replay_is_relative_to_the_first_arrival_and_scaled() -> None:
    s = replay([100.0, 100.5, 102.0], speed=2.0)
    assert s.offsets_s == (0.0, 0.25, 1.0) and s.duration_s == 1.0
    assert replay([]).offsets_s == ()


def test_describe_states_each_process() -> None:
    assert describe(Burst(), 10) == {"process": "burst"}
    assert describe(Closed(8), 10) == {"process": "closed", "concurrency": 8}
    trace = describe(replay([0.0, 1.0, 4.0], speed=2.0), 3)
    assert trace == {"process": "trace", "speed": 2.0, "schedule_s": 2.0,
                     "offered_jobs_per_s": 1.0}
    assert describe(poisson(1, 5.0), 1)["offered_jobs_per_s"] is None
