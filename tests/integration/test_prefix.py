"""Agent traffic through the real worker: sessions sharing system prompts, each turn the
last one plus its reply. Every Result equals the job run alone without a cache, and the
worker serves most prompt tokens from its prefix cache (usage.cached_tokens)."""

from __future__ import annotations

import pytest

from loadgen.fleet import WorkerProcess, provision
from loadgen.sessions import SessionSpec, plan, run_sessions
from schemas import decode_result
from worker.engine.build import build_engine
from worker.engine.sequence import Request
from worker.engine.step import generate

pytestmark = pytest.mark.timeout(240)


@pytest.mark.parametrize("runner", ["eager", "pipelined"])
async def test_sessions_are_answered_from_the_cache_with_the_uncached_tokens(
        tmp_engine_toml, nats_url, tmp_path, runner) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    w = WorkerProcess(cfg, worker_id="p1", log_path=tmp_path / "p1.log",
                      extra_args=("--runner", runner)).start()
    spec = SessionSpec(sessions=12, system_prompts=2, turns=3, system_tokens=(100, 200),
                       user_tokens=(4, 20), new_tokens=(8, 24), seed=5, run_id=f"pfx{runner}")
    try:
        w.wait_ready(120)
        stats = await run_sessions(nats_url, spec, timeout_s=180)
    finally:
        w.terminate(grace_s=10)
    assert not stats.timed_out and stats.duplicates == 0
    assert len(stats.outcomes) == 36 and all(o.ok for o in stats.outcomes.values())
    prompt = sum(o.prompt_tokens for o in stats.outcomes.values())
    cached = sum(o.cached_tokens for o in stats.outcomes.values())
    assert cached > 0.6 * prompt, (cached, prompt)
    for o in stats.outcomes.values():  # computed rows: what was not cached, and the reply
        assert o.padded_tokens == o.prompt_tokens - o.cached_tokens + o.completion_tokens

    # The same turns, rebuilt from the plan and the replies, through an engine without a
    # cache, one job at a time.
    ref = build_engine("builtin:tiny", "cpu", "float32", 4096, 1088, prefix_cache=False)
    replies = await _replies(nats_url, spec)
    systems, sessions = plan(spec)
    for i, s in enumerate(sessions):
        prompt_i = systems[s.system] + list(s.users[0])
        for t in range(spec.turns):
            r = Request.greedy(1, prompt_i, s.new_tokens[t])
            (c,) = generate(ref, [r])
            assert c.tokens == replies[spec.job_id(i, t)], (i, t)
            if t + 1 < spec.turns:
                prompt_i = prompt_i + c.tokens + list(s.users[t + 1])


async def _replies(nats_url: str, spec: SessionSpec) -> dict[str, list[int]]:
    """Every Result's tokens, read back from the results stream."""
    import nats

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        sub = await js.subscribe(f"fabric.results.{spec.run_id}", ordered_consumer=True)
        out: dict[str, list[int]] = {}
        while len(out) < spec.sessions * spec.turns:
            m = await sub.next_msg(timeout=10)
            r = decode_result(m.data)
            out[r.id] = list(r.tokens)
        return out
    finally:
        await nc.close()
