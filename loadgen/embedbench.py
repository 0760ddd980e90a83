"""The embedding table of `fabric-loadgen bench --embed-model DIR`: one set of texts, three
ways, on this machine.

- **worker**: an embedding worker (the checkpoint as its `model`) behind NATS, the texts
  published as a backlog of embed jobs.
- **consumer**: what a user would write without this project -- pull up to 32 messages,
  `SentenceTransformer.encode` them, publish each result, ack (sentence-transformers is a
  dev dependency; the row is skipped without it).
- **ceiling**: the same encoder on the same texts, perfectly packed, steps of the worker's
  token cap, no broker: the kernel-only ceiling.

Useful tokens are the texts' tokens (special tokens included, truncated to the model's
limit), the same count for all three. Padding: the share of the dense layers' rows that
were padding (a padded batch pads every text to its batch's longest; packing pads none),
and for the worker also its attention padding within length groups.
"""

from __future__ import annotations

import asyncio
import dataclasses
import importlib.util
import time
from pathlib import Path
from typing import Any

import msgpack
import nats
from nats.js.api import AckPolicy, ConsumerConfig, StreamConfig

from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung
from loadgen.workload import JobSpec, LogNormal, WorkloadSpec, generate

CONSUMER_BATCH = 32


def embed_jobs(n: int, seed: int, max_tokens: int, run_id: str) -> list[JobSpec]:
    """Texts with lognormal lengths up to the model's limit (median a quarter of it)."""
    law = LogNormal(median=max(8, max_tokens // 4), sigma=0.8, lo=4, hi=max_tokens)
    return generate(WorkloadSpec(num_jobs=n, seed=seed, run_id=run_id, prompt_lengths=law,
                                 embed=True))


def token_counts(model_dir: str, texts: list[str]) -> list[list[int]]:
    from worker.model.embed_checkpoint import load_encoder

    import torch

    tok = load_encoder(Path(model_dir), torch.float32, torch.device("cpu")).tokenizer
    return [e.ids for e in tok.encode_batch(texts, truncate=True)]


def ceiling(model_dir: str, ids: list[list[int]], step_tokens: int, repeats: int = 3) -> dict:
    """The encoder alone on the texts, perfectly packed: median of `repeats` passes."""
    import torch

    from worker.engine.build import build_engine
    from worker.engine.embedder import embed_now

    from worker.engine.blocks import padded_tokens

    limit = max(map(len, ids))
    # Every text is queued at once: a budget that holds them all (blocks only, no KV).
    budget = sum(padded_tokens(len(i), 16) for i in ids) + 16
    engine = build_engine(model_dir, "cpu", "float32", token_budget=budget,
                          max_seq_len=limit, max_step_tokens=step_tokens)
    with torch.inference_mode():
        embed_now(engine, ids[:64])  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            embed_now(engine, ids)
            times.append(time.perf_counter() - t0)
    wall = sorted(times)[len(times) // 2]
    tokens = sum(map(len, ids))
    return {"useful_tokens_per_s": tokens / wall, "wall_s": wall, "padding_fraction": 0.0}


async def _consumer(url: str, model_dir: str, jobs: list[JobSpec], tag: str,
                    lengths: dict[str, int]) -> dict:
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(model_dir, device="cpu")
    nc = await nats.connect(url)
    js = nc.jetstream()
    stream, subject = f"EMBCONS_{tag}", f"embcons.{tag}.jobs"
    await js.add_stream(StreamConfig(name=stream, subjects=[subject]))
    try:
        for j in jobs:
            await js.publish(subject, msgpack.packb({"id": j.id, "text": j.prompt}))
        sub = await js.pull_subscribe(subject, durable="c", stream=stream,
                                      config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT))
        done, real, padded = 0, 0, 0
        t0 = time.perf_counter()
        while done < len(jobs):
            msgs = await sub.fetch(CONSUMER_BATCH, timeout=5)
            bodies = [msgpack.unpackb(m.data) for m in msgs]
            vecs = st.encode([b["text"] for b in bodies], batch_size=CONSUMER_BATCH)
            lens = [lengths[b["id"]] for b in bodies]  # (counted outside the timed loop)
            real += sum(lens)
            padded += len(lens) * max(lens)  # encode pads a batch to its longest
            for m, b, v in zip(msgs, bodies, vecs):
                await nc.publish(f"embcons.{tag}.res", msgpack.packb(
                    {"id": b["id"], "embedding": v.tolist()}, use_single_float=True))
                await m.ack()
            done += len(msgs)
        wall = time.perf_counter() - t0
    finally:
        await js.delete_stream(stream)
        await nc.close()
    return {"wall_s": wall, "padding_fraction": 1 - real / padded, "tokens": real}


def consumer(url: str, model_dir: str, jobs: list[JobSpec], tag: str,
             lengths: dict[str, int]) -> dict[str, Any] | None:
    if importlib.util.find_spec("sentence_transformers") is None:
        return None
    out = asyncio.run(_consumer(url, model_dir, jobs, tag, lengths))
    out["useful_tokens_per_s"] = out["tokens"] / out["wall_s"]
    return out


def run_embed(cfg: BenchConfig, broker: EmbeddedNats, work: Path, log,
              partial=lambda: None) -> dict[str, Any]:
    """The embedding table (`loadgen.embedbench`): an embedding worker through NATS, a
    consumer as a user would write it, and the kernel-only ceiling, on the same texts."""
    import torch

    from worker.model.embed_checkpoint import load_encoder

    limit = load_encoder(Path(cfg.embed_model), torch.float32,
                         torch.device("cpu")).info.max_seq_len
    jobs = embed_jobs(cfg.embed_jobs, cfg.seed, limit, "emb")
    ids = token_counts(cfg.embed_model, [j.prompt for j in jobs])
    tokens = sum(map(len, ids))
    out: dict[str, Any] = {"texts": len(jobs), "tokens": tokens, "model_limit": limit}
    log(f"embeddings, worker: {len(jobs)} texts, {tokens} tokens ...")
    ecfg = dataclasses.replace(cfg, max_seq_len=limit)
    r = run_rung(ecfg, broker, work, "embed", "continuous", jobs, model=cfg.embed_model)
    r.pop("completions", None)
    out["worker"] = r
    partial()
    log(f"  {r['useful_tokens_per_s']:.0f} useful tok/s")
    log("embeddings, a consumer with SentenceTransformer.encode ...")
    out["consumer"] = consumer(broker.url, cfg.embed_model, jobs, "bench",
                                  {j.id: len(i) for j, i in zip(jobs, ids)})
    partial()
    if out["consumer"]:
        log(f"  {out['consumer']['useful_tokens_per_s']:.0f} useful tok/s, padding "
            f"{out['consumer']['padding_fraction']:.3f}")
    log("embeddings, kernel-only ceiling ...")
    out["ceiling"] = ceiling(cfg.embed_model, ids, max(limit, 2048))  # the worker's step cap
    if out["consumer"]:
        out["worker_over_consumer"] = (r["useful_tokens_per_s"]
                                       / out["consumer"]["useful_tokens_per_s"])
    out["worker_over_ceiling"] = r["useful_tokens_per_s"] / out["ceiling"]["useful_tokens_per_s"]
    log(f"  {out['ceiling']['useful_tokens_per_s']:.0f} useful tok/s; worker / ceiling "
        f"{out['worker_over_ceiling']:.3f}")
    return out


def markdown(e: dict[str, Any]) -> list[str]:
    """The embedding table of ladder.md."""
    lines = ["", f"Embeddings ({e['texts']:,} texts, {e['tokens']:,} tokens, lognormal "
             f"lengths up to the model's {e['model_limit']}):", "",
             "| way | useful tok/s | dense padding | attention padding |", "|---|---|---|---|"]
    w = e["worker"]
    lines.append(f"| worker through NATS | {w['useful_tokens_per_s']:,.0f} | 0.0% | "
                 f"{100 * (w.get('attn_padding_fraction') or 0):.1f}% |")
    if e["consumer"]:
        c = e["consumer"]
        lines.append(f"| consumer, SentenceTransformer.encode, 32 a batch | "
                     f"{c['useful_tokens_per_s']:,.0f} | {100 * c['padding_fraction']:.1f}% | "
                     "(padded batch) |")
    lines.append(f"| kernel-only ceiling, perfectly packed | "
                 f"{e['ceiling']['useful_tokens_per_s']:,.0f} | 0.0% | - |")
    if e.get("worker_over_consumer"):
        lines += ["", f"Worker over consumer: {e['worker_over_consumer']:.2f}x; worker over "
                  f"ceiling: {100 * e['worker_over_ceiling']:.1f}%."]
    return lines
