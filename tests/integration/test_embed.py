"""An embedding worker on a real model (all-MiniLM-L6-v2) behind a real nats-server: every
embedding equals sentence-transformers' (cosine >= 0.99999), alone or in any batch, with
the job's options (normalize, dimensions, truncate) and its bad input answered."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import msgpack
import nats
import numpy as np
import pytest

from loadgen.fleet import WorkerProcess, provision
from schemas import ErrorCode, Job, decode_result, encode
from tests.fixtures_minilm import minilm_dir_or_skip

pytestmark = pytest.mark.timeout(300)
RESULTS = "fabric.results.emb"


@pytest.fixture(scope="module")
def model() -> Path:
    return minilm_dir_or_skip()


@pytest.fixture(scope="module")
def reference(model: Path):
    st = pytest.importorskip("sentence_transformers")
    return st.SentenceTransformer(str(model), device="cpu")


async def run(url: str, jobs: list[bytes], n: int) -> dict[str, bytes]:
    nc = await nats.connect(url)
    got: dict[str, bytes] = {}
    done = asyncio.Event()

    async def on_result(m) -> None:
        got[decode_result(m.data).id] = m.data
        if len(got) == n:
            done.set()

    await nc.subscribe(RESULTS, cb=on_result)
    js = nc.jetstream()
    for data in jobs:
        await js.publish("fabric.jobs.emb", data)
    await asyncio.wait_for(done.wait(), 120)
    await nc.close()
    return got


def cos(a, b) -> float:
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


async def test_embeddings_equal_sentence_transformers_through_the_worker(
        tmp_engine_toml, nats_url, tmp_path, model, reference) -> None:
    cfg = tmp_engine_toml(model=str(model), max_seq_len=256, token_budget=4096, low_water=3072)
    provision(cfg)
    w = WorkerProcess(cfg, worker_id="e1", log_path=tmp_path / "e1.log").start()
    rng = np.random.default_rng(0)
    words = "the quick brown fox jumps over a lazy dog while 日本語 and émigré café 🙂".split()
    texts = [" ".join(rng.choice(words, size=int(n))) for n in rng.integers(1, 180, size=40)]
    texts += ["x", "   ", "a " * 400]  # a single char, whitespace, over the limit
    try:
        w.wait_ready(120)
        jobs = [encode(Job(id=f"t{i}", prompt=t, task="embed", reply_to=RESULTS,
                           truncate=True)) for i, t in enumerate(texts)]
        tok = reference.tokenizer
        ids = tok("hello world")["input_ids"]
        jobs += [
            encode(Job(id="ids", prompt=ids, task="embed", reply_to=RESULTS)),
            encode(Job(id="dims", prompt="hello world", task="embed", reply_to=RESULTS,
                       dimensions=64)),
            encode(Job(id="raw", prompt="hello world", task="embed", reply_to=RESULTS,
                       normalize=False)),
            json.dumps({"id": "json", "prompt": "hello world", "task": "embed",
                        "reply_to": RESULTS}).encode(),
            encode(Job(id="long", prompt="a " * 400, task="embed", reply_to=RESULTS)),
            encode(Job(id="gen", prompt="hello", max_new_tokens=4, reply_to=RESULTS)),
            encode(Job(id="toomany", prompt="hello", task="embed", reply_to=RESULTS,
                       dimensions=385)),
        ]
        got = await run(nats_url, jobs, len(jobs))
    finally:
        w.terminate(grace_s=10)
    ref = reference.encode(texts + ["hello world"], convert_to_numpy=True)
    for i in range(len(texts)):
        r = decode_result(got[f"t{i}"])
        assert r.ok and len(r.embedding) == 384, r
        assert cos(r.embedding, ref[i]) >= 0.99999, (i, texts[i][:40])
        assert r.truncated == (i == len(texts) - 1)
        assert abs(np.linalg.norm(r.embedding) - 1) < 1e-5  # the checkpoint normalizes
    hello = ref[-1]
    assert cos(decode_result(got["ids"]).embedding, hello) >= 0.99999
    dims = decode_result(got["dims"]).embedding
    assert len(dims) == 64 and abs(np.linalg.norm(dims) - 1) < 1e-5
    assert cos(dims, hello[:64]) >= 0.99999  # the first 64 values, normalized again
    raw = decode_result(got["raw"]).embedding
    assert cos(raw, hello) >= 0.99999 and abs(np.linalg.norm(raw) - 1) > 1e-3  # not unit
    body = json.loads(got["json"])
    assert cos(body["embedding"], hello) >= 0.99999
    packed = msgpack.unpackb(got["t0"], raw=False)
    assert got["t0"].count(b"\xca") >= 384  # float 32 on the wire
    assert len(packed["embedding"]) == 384
    for jid, code in (("long", ErrorCode.TOO_LONG), ("gen", ErrorCode.UNSUPPORTED_TASK),
                      ("toomany", ErrorCode.INVALID_JOB)):
        r = decode_result(got[jid])
        assert not r.ok and r.error.code is code, r
