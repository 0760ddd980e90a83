"""The benchmark's peer is this model: transformers' `generate_batch` on the weights our
engine loads gives the same greedy tokens as our engine, job for job (float32, CPU)."""

from __future__ import annotations

from loadgen.peer import peer_jobs, run_hf_peer
from worker.engine.build import build_engine
from worker.engine.sequence import Request
from worker.engine.step import generate


def test_generate_batch_peer_computes_our_tokens() -> None:
    jobs = peer_jobs(6, 8, seed=0, prompt_range=(8, 60))
    # A small paged cache: the defaults size it for a GPU's memory, slow to set up here.
    peer = run_hf_peer("builtin:tiny", "cpu", "float32", jobs,
                       cb_config=dict(num_blocks=32, max_batch_tokens=256, page_size=32))
    assert peer["answered"] == len(jobs) and peer["useful_tokens_per_s"] > 0
    engine = build_engine("builtin:tiny", "cpu", "float32", 4096, 256)
    reqs = [Request.greedy(i, list(j.prompt), j.max_new_tokens) for i, j in enumerate(jobs)]
    for r in reqs:
        r.ignore_eos = True
    ours = {c.key: c.tokens for c in generate(engine, reqs)}
    assert {j.id: ours[i] for i, j in enumerate(jobs)} == peer["tokens"]
