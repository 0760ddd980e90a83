"""The pipelined runner (rung 5): one staged copy per step, fixed-shape decode steps.

On the CPU the fixed-shape forward runs without capture; it must compute what the eager
packed forward computes (same logits, same tokens), since on CUDA the captured graph is
that same forward replayed. The CUDA-only parts (pinned memory, capture, replay) are in
tests/gpu.
"""

from __future__ import annotations

import dataclasses
import random
import threading
import time
from collections import Counter

import numpy as np
import pytest
import torch

from worker.engine.build import Engine, EngineError, build_engine, resolve_runner
from worker.engine.executor import Executor
from worker.engine.graphs import DecodeGraphs, bucket, ctx_buckets
from worker.engine.blocks import BlockPool
from worker.engine.runner import Runner
from worker.engine.scheduler import Scheduler, StepPlan
from worker.engine.sequence import Request
from worker.engine.staging import ALIGN, Stager

from tests.unit.test_engine import req


def ragged(n: int, seed: int, sampled_every: int = 0) -> list[Request]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        plen = max(4, min(600, int(rng.lognormvariate(4.0, 0.9))))
        kw = (dict(temperature=0.8, top_k=20, top_p=0.9)
              if sampled_every and i % sampled_every == 0 else {})
        out.append(req(i, [rng.randrange(256) for _ in range(plen)], rng.randint(1, 40), **kw))
    return out


def run_all(engine: Engine, reqs: list[Request]) -> tuple[dict[int, list[int]], int, Runner]:
    """`generate`, keeping the runner and counting the fixed-shape steps. From a cold cache:
    what the steps look like must not depend on what ran before."""
    engine.pool.blocks.drop_cached()
    sched, runner = engine.scheduler(), engine.runner()
    sched.add_all(reqs, time.monotonic())
    out, graphed = {}, 0
    runner.mixed = 0  # steps with prompts (packed forward) and a fixed-shape decode forward
    while sched.has_work():
        plan = sched.schedule()
        step = runner.prepare(plan)
        graphed += step.shape.graphed
        runner.mixed += step.inp is not None and step.graph is not None
        for c in sched.postprocess(plan, runner.run(step), time.monotonic()):
            out[c.key] = c.tokens
    assert engine.pool.blocks.used_blocks == 0
    return out, graphed, runner


# -- staging --------------------------------------------------------------------------


def test_stager_packs_every_dtype_and_shape_into_one_copy() -> None:
    st = Stager(torch.device("cpu"), capacity=256)
    arrays = [np.arange(5, dtype=np.int64), np.array([[1.5, -2.0], [0.25, 3.0]], np.float32),
              np.array([[True, False, True]]), np.zeros(0, np.int64),
              np.arange(6, dtype=np.int32).reshape(3, 2)]
    dev = st.stage(arrays)
    assert st.copies == 1
    base = st._dev.data_ptr()
    for a, t in zip(arrays, dev):
        assert t.dtype == torch.from_numpy(a).dtype and tuple(t.shape) == a.shape
        assert np.array_equal(t.numpy(), a)
        assert (t.data_ptr() - base) % ALIGN == 0 or a.size == 0


def test_stager_grows_and_alternates_host_buffers() -> None:
    st = Stager(torch.device("cpu"), capacity=128)
    first = st._turn
    small = st.stage([np.full(4, 7, np.int64)])
    assert small[0].tolist() == [7] * 4 and st._turn != first
    big = np.arange(1000, dtype=np.int64)  # 8,000 bytes > 128: the buffers grow
    got = st.stage([big, np.ones(3, np.float32)])
    assert st.capacity >= 8000 and np.array_equal(got[0].numpy(), big)
    assert got[1].tolist() == [1.0, 1.0, 1.0] and st.copies == 2


def test_stager_refuses_a_dtype_the_model_never_takes() -> None:
    with pytest.raises(TypeError, match="float64"):
        Stager(torch.device("cpu")).stage([np.zeros(3)])


# -- shapes ---------------------------------------------------------------------------


def test_context_buckets_are_whole_blocks_at_most_one_and_a_half_apart() -> None:
    b = ctx_buckets(1088, 16)
    assert b == (64, 128, 192, 256, 384, 512, 768, 1024, 1088)
    assert all(k % 16 == 0 for k in b) and all(y <= 2 * x for x, y in zip(b, b[1:]))
    assert ctx_buckets(40, 16) == (48,)  # a short max_seq_len: one bucket, rounded up
    assert bucket(1, b) == 64 and bucket(1088, b) == 1088 and bucket(1089, b) is None


def test_shape_choice_weighs_padded_kv_against_saved_launches(engine: Engine) -> None:
    g = DecodeGraphs(engine.loaded.model, engine.pool.tensor, engine.device, 16, 1088,
                     max_batch=100)
    assert g.batch_buckets[-1] == 100 and g.batch_buckets[:4] == (1, 2, 4, 8)
    assert g.kv_bytes == 2 * 2 * 16 * 4 * 2  # k and v, 2 heads of 16, float32, 2 layers
    assert g.choose([20]) == (1, 64)  # a little padding, a forward's worth of launches
    assert g.choose([300] * 30) == (32, 384)  # similar lengths: little padding
    # One long context among many short ones: ~93k padded key slots against two groups'
    # launches. Refused at the CPU's costs; taken at a GPU's, where launches dominate.
    lopsided = [1000] + [50] * 90
    assert g.choose(lopsided) is None
    gpu = DecodeGraphs(engine.loaded.model, engine.pool.tensor, engine.device, 16, 1088,
                       max_batch=100, bandwidth=1.0e12, launch_s=6e-6)
    assert gpu.choose(lopsided) == (96, 1024)
    assert g.choose([10] * 101) is None  # more rows than the biggest bucket
    assert g.capture is False  # nothing to capture on the CPU


def test_host_inputs_pad_rows_to_the_scratch_slot(engine: Engine) -> None:
    g = DecodeGraphs(engine.loaded.model, engine.pool.tensor, engine.device, 16, 1088,
                     max_batch=8)
    table = np.array([[5, 6, 7], [9, 8, 8]])  # blocks 5,6 and 9 in use (the rest: past ctx)
    buf = g.host_inputs((4, 64), tokens=[11, 12], positions=[20, 3], write_slots=[100, 147],
                        ctx=[21, 4], table=table)
    mb, nb = 8, 1088 // 16
    head, table = buf[:4 * mb].reshape(4, mb), buf[4 * mb:].reshape(4, nb)
    assert head[0, :4].tolist() == [11, 12, 0, 0] and head[2, :4].tolist() == [100, 147, 0, 0]
    assert head[3, :4].tolist() == [21, 4, 1, 1]  # padding rows read the scratch slot only
    assert table[0, :3].tolist() == [5, 6, 0] and table[1, :2].tolist() == [9, 0]
    assert not table[2:].any()


# -- the same computation --------------------------------------------------------------


def test_fixed_shape_decode_gives_the_eager_logits(engine: Engine) -> None:
    runner = dataclasses.replace(engine, runner_mode="pipelined").runner()
    sched = engine.scheduler()
    reqs = ragged(12, seed=4)
    sched.add_all(reqs, 0.0)
    plan = sched.schedule()  # every prompt in one packed prefill
    sched.postprocess(plan, runner.run(runner.prepare(plan)), 0.0)
    live = list(sched.running)
    assert len(live) >= 8
    eager = Runner(engine.loaded.model, engine.pool.tensor, engine.device)
    eager_plan = StepPlan(decode=list(live))
    inp = eager.prepare(eager_plan).inp  # sorts its rows into length groups, in place
    with torch.inference_mode():
        want = dict(zip([s.req.key for s in eager_plan.decode],
                        engine.loaded.model(inp, engine.pool.tensor)))
    prepared = runner.prepare(StepPlan(decode=live))
    step, shape = prepared.graph, prepared.shape
    assert prepared.inp is None and shape.graphed and step.batch == len(live)
    assert shape.attn_padded == step.key[0] * step.key[1] >= shape.attn_real
    got = runner.graphs.run(step)
    for s, row in zip(live, got):
        torch.testing.assert_close(row, want[s.req.key], rtol=1e-5, atol=1e-5)
    for s in live:
        sched.pool.release(s.req.key)
    sched.running = []


def test_pipelined_runner_computes_the_eager_tokens(engine: Engine) -> None:
    reqs = ragged(48, seed=7, sampled_every=3)  # greedy and seeded sampling both
    eager, graphed0, _ = run_all(engine, reqs)
    piped, graphed, runner = run_all(dataclasses.replace(engine, runner_mode="pipelined",
                                                         max_step_tokens=400), reqs)
    assert graphed0 == 0 and graphed > 10  # the fixed-shape path really ran
    assert runner.mixed > 5  # also beside prompts in the same step
    assert runner.graphs.eager_steps == graphed and runner.graphs.replays == 0
    assert piped == eager
    assert runner.stager.copies >= graphed  # one staged copy per step, whatever its kind


def test_pipelined_runner_serves_the_null_model() -> None:
    eng = build_engine("builtin:null", "cpu", "float32", token_budget=4096, max_seq_len=64,
                       runner="pipelined")
    out, graphed, runner = run_all(eng, [req(i, [1, 2, 3], 2) for i in range(20)])
    assert runner.graphs is None and graphed == 0  # no layers: nothing worth a graph
    assert len(out) == 20 and all(len(t) == 2 for t in out.values())


def test_a_failed_graph_check_falls_back_to_the_packed_forward(engine: Engine) -> None:
    """Capture on a machine without CUDA fails the start-up self-check; the runner then
    decodes through the packed forward, and says why graphs are off."""
    runner = dataclasses.replace(engine, runner_mode="pipelined").runner()
    runner.graphs.capture = True  # as on CUDA: the check captures, and here that must fail
    reason = runner.graphs.self_check()
    assert reason and runner.graphs.disabled == reason and not runner.graphs.graphs
    sched = engine.scheduler()
    reqs = ragged(10, seed=11)
    sched.add_all(reqs, 0.0)
    out, kinds = {}, set()
    while sched.has_work():
        plan = sched.schedule()
        step = runner.prepare(plan)
        kinds.add((step.inp is not None, step.graph is not None))
        out.update((c.key, c.tokens) for c in sched.postprocess(plan, runner.run(step), 0.0))
    assert kinds == {(True, False)}  # never the fixed-shape path
    assert out == run_all(engine, reqs)[0]


def test_runner_mode_resolves_per_device() -> None:
    cpu = torch.device("cpu")
    assert resolve_runner("auto", cpu) == "eager"
    assert resolve_runner("auto", torch.device("cuda", 0)) == "pipelined"
    assert resolve_runner("pipelined", cpu) == "pipelined"
    with pytest.raises(EngineError, match="runner"):
        resolve_runner("graphs", cpu)


# -- overlapped steps -------------------------------------------------------------------


def _fake_token(key: int, index: int) -> int:
    return (key * 7919 + index * 104729) % 97  # 0 is the end-of-sequence id below


def _fake_run(reqs: list[Request], overlap: bool) -> tuple[dict[int, list[int]], Counter, int]:
    """Drive the scheduler as the executor does, with a "device" whose token for a
    sequence depends only on (job, position); overlap launches a step before reading the
    last. Returns tokens, rows computed per job, and how many blocks are still held."""
    pool = BlockPool(4096, 16, first=1)
    sched = Scheduler(pool, 16, 256, eos_ids=(0,), overlap=overlap)
    sched.add_all(reqs, 0.0)
    out: dict[int, list[int]] = {}
    rows: Counter = Counter()
    inflight = None
    while sched.has_work():
        plan = sched.schedule()
        launched = None
        if plan:
            toks = [_fake_token(s.req.key, s.next_index) for s in plan.rows]
            rows.update(s.req.key for s in plan.rows)
            if overlap:
                sched.launched(plan)
                launched = (plan, toks)
            else:
                for c in sched.postprocess(plan, toks, 0.0):
                    out[c.key] = c.tokens
        if inflight is not None:
            for c in sched.postprocess(*inflight, 0.0):
                out[c.key] = c.tokens
        inflight = launched
    return out, rows, pool.used_blocks


def test_overlapped_scheduling_samples_the_same_tokens_one_step_behind() -> None:
    rng = random.Random(5)
    reqs = [req(i, [1] * rng.randint(1, 70), rng.randint(1, 30), stop_ids=frozenset({5}))
            for i in range(120)]
    plain, plain_rows, held0 = _fake_run(reqs, overlap=False)
    ahead, ahead_rows, held1 = _fake_run(reqs, overlap=True)
    assert ahead == plain and held0 == held1 == 0
    stopped = {k for k, t in plain.items() if t[-1] in (0, 5) and len(t) < reqs[k].max_new_tokens}
    assert len(stopped) > 20  # the workload exercises stop tokens, not only lengths
    for k, n in plain_rows.items():
        # A job that ends by length is never launched past its last token; one that ends
        # on a stop token may have been launched once more (a wasted row), never twice.
        assert ahead_rows[k] - n in ((0, 1) if k in stopped else (0,))
    assert sum(ahead_rows.values()) > sum(plain_rows.values())  # some rows were wasted


def test_overlapped_scheduling_runs_suspected_poison_jobs_alone_to_the_end() -> None:
    reqs = [req(i, [1] * (5 + i), 12, stop_ids=frozenset({5}), solo=i % 4 == 0)
            for i in range(16)]
    plain, _, _ = _fake_run(reqs, overlap=False)
    ahead, _, held = _fake_run(reqs, overlap=True)
    assert ahead == plain and len(ahead) == 16 and held == 0
    assert all(len(ahead[k]) > 1 for k in range(0, 16, 4))  # decoded, not just prefilled


def test_executor_overlaps_steps_and_answers_like_the_eager_engine(engine: Engine) -> None:
    reqs = ragged(40, seed=9, sampled_every=4)
    first, _, _ = run_all(engine, reqs)
    common = Counter(t for toks in first.values() for t in toks).most_common(2)
    stops = frozenset(t for t, _ in common)
    reqs = [dataclasses.replace(r, stop_ids=stops) if r.key % 2 else r for r in reqs]
    want, _, _ = run_all(engine, reqs)
    assert any(len(want[r.key]) < r.max_new_tokens for r in reqs)  # some stopped early
    piped = dataclasses.replace(engine, runner_mode="pipelined", max_step_tokens=300)
    assert piped.overlaps
    got: dict[int, list[int]] = {}
    steps: list = []
    fatal: list = []
    finished = threading.Event()

    def on_complete(cs) -> None:
        got.update((c.key, c.tokens) for c in cs)
        if len(got) == len(reqs):
            finished.set()

    ex = Executor(piped, on_complete, steps.append, fatal.append)
    assert ex.overlap and ex.scheduler.overlap
    ex.start()
    ex.submit(reqs[:25])
    ex.submit(reqs[25:])
    assert finished.wait(120), f"{len(got)} of {len(reqs)} answered, fatal={fatal}"
    assert ex.stop(10) and not fatal
    assert got == want
    assert engine.pool.blocks.used_blocks == 0
    assert any(r.graphed and r.prefill_seqs for r in steps)  # prompts beside a decode graph
    assert any(r.graphed and not r.prefill_seqs for r in steps)


def test_kernel_ceiling_with_overlapped_steps_decodes_the_same_lengths() -> None:
    from loadgen.ceiling import kernel_ceiling
    from loadgen.rung import BenchConfig
    from loadgen.workload import WorkloadSpec, generate

    jobs = generate(WorkloadSpec(num_jobs=60, seed=0, run_id="r4"))
    eager = kernel_ceiling(BenchConfig(model="builtin:tiny"), jobs, {})
    piped = kernel_ceiling(BenchConfig(model="builtin:tiny", ceiling_runner="pipelined"), jobs,
                           {})
    assert (eager["runner"], piped["runner"]) == ("eager", "pipelined")
    assert piped["lengths"] == eager["lengths"] and piped["useful_tokens"] == eager["useful_tokens"]
    assert any(n < j.max_new_tokens for j, n in zip(jobs, eager["lengths"].values()))
    # The ceiling is the better of two schedules, both decoding the same lengths (checked
    # inside: a disagreement raises); the continuous one runs within the budget's pool.
    for c in (eager, piped):
        assert c["schedules"].keys() == {"phased", "continuous"}
        assert c["useful_tokens_per_s"] == max(s["useful_tokens_per_s"]
                                               for s in c["schedules"].values())
        assert c["schedules"][c["schedule"]]["useful_tokens_per_s"] == c["useful_tokens_per_s"]
        assert c["schedules"]["continuous"]["steps"] > 0
