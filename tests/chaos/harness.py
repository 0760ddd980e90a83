"""What the chaos and failure tests share: a private broker, configs, a fleet that is always
stopped, publishing without waiting for answers, and the results stream as the ground truth.

Rule: the results stream, not a core subscription, says what was answered. A producer's
subscription misses what is published while it is itself reconnecting, and may see a Result
twice after a crash; the stream keeps exactly one per job id (Nats-Msg-Id), and that is the
contract under test.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import nats
import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from loadgen.broker import delete_streams
from loadgen.fleet import WorkerProcess, provision, write_engine_toml
from schemas import Job, Result, decode_result, encode
from worker.engine.build import build_engine
from worker.engine.step import generate as engine_generate
from worker.engine.blocks import padded_tokens
from worker.engine.sequence import Request
from worker.broker.topology import DLQ_STREAM, RESULTS_STREAM

ENGINE = {"model": "builtin:tiny", "device": "cpu", "dtype": "float32",
          "token_budget": 4096, "low_water": 2048, "max_seq_len": 1088}


def engine_toml(tmp_path: Path, url: str, **overrides: object) -> tuple[Path, str, str]:
    """A fresh engine.toml with unique stream/consumer names -> (path, stream, consumer)."""
    tag = secrets.token_hex(4)
    fields = {"nats_url": url, "stream": f"C_{tag}", "consumer": f"c_{tag}", **ENGINE, **overrides}
    path = write_engine_toml(tmp_path / f"engine-{tag}.toml", fields)
    return path, str(fields["stream"]), str(fields["consumer"])


@dataclass
class Fleet:
    """Worker processes started by a test; `close()` stops every one (the fixture calls it)."""

    tmp_path: Path
    config: Path
    started: list[WorkerProcess] = field(default_factory=list)
    counter: int = 0

    def start(self, name: str | None = None, args: Iterable[str] = (), env: dict | None = None,
              wait: bool = True) -> WorkerProcess:
        self.counter += 1
        name = name or f"w{self.counter}"
        w = WorkerProcess(self.config, worker_id=name, log_path=self.tmp_path / f"{name}.log",
                          extra_args=list(args), env=env).start()
        self.started.append(w)
        if wait:
            w.wait_ready(120)
        return w

    def close(self) -> None:
        for w in self.started:
            w.terminate(grace_s=5)


def log_events(w: WorkerProcess, event: str | None = None) -> list[dict]:
    out = []
    for line in w.log_path.read_text(errors="replace").splitlines():
        if not line.startswith("{"):
            continue
        try:
            ev = json.loads(line)
        except json.JSONDecodeError:
            continue
        if event is None or ev.get("event") == event:
            out.append(ev)
    return out


def iso_to_unix(ts: str) -> float:
    from datetime import datetime
    return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()


async def _connect(url: str):
    """A test client; `url` may list several servers (a cluster), comma-separated."""
    return await asyncio.wait_for(nats.connect(url.split(","), connect_timeout=2,
                                               reconnect_time_wait=0.2, max_reconnect_attempts=5), 20)


async def publish(url: str, jobs: list[Job], subject: str | Callable[[Job], str],
                  window: int = 512, raw: list[bytes] | None = None) -> None:
    """Publish jobs (and raw payloads) to JetStream, `window` acks outstanding at most;
    `subject` may be a function of the job (`schemas.subjects.job_subject`)."""
    nc = await _connect(url)
    try:
        js = nc.jetstream()
        gate = asyncio.Semaphore(window)

        async def one(payload: bytes, msg_id: str | None, to: str) -> None:
            async with gate:
                headers = {"Nats-Msg-Id": msg_id} if msg_id else None
                await js.publish(to, payload, headers=headers, timeout=30)

        def to(j: Job | None) -> str:
            return subject(j) if callable(subject) and j is not None else str(subject)
        await asyncio.gather(*(one(encode(j), j.id, to(j)) for j in jobs),
                             *(one(p, None, to(None)) for p in raw or []))
    finally:
        await nc.close()


async def wait_meta_leader(urls: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            nc = await nats.connect(urls.split(","), connect_timeout=2)
            try:
                await nc.jetstream().account_info()
                return
            finally:
                await nc.close()
        except Exception:  # noqa: BLE001 - "JetStream not ready" until the cluster forms
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


async def count_results(url: str, subject: str) -> int:
    nc = await _connect(url)
    try:
        info = await nc.jetstream().stream_info(RESULTS_STREAM, subjects_filter=subject)
        return (info.state.subjects or {}).get(subject, 0)
    finally:
        await nc.close()


async def wait_results(url: str, subject: str, n: int, timeout_s: float,
                       alive: Iterable[WorkerProcess] = ()) -> float:
    """Poll the results stream until it holds n Results on subject; returns the seconds taken."""
    t0 = time.monotonic()
    got = -1
    while time.monotonic() - t0 < timeout_s:
        try:
            got = await count_results(url, subject)
        except (OSError, asyncio.TimeoutError, nats.errors.Error):
            got = -1  # the broker is restarting under us
        if got >= n:
            return time.monotonic() - t0
        await asyncio.sleep(0.25)
    tails = "\n".join(f"--- {w.worker_id} (rc={w.returncode})\n{w.log_tail()}" for w in alive)
    raise AssertionError(f"{got}/{n} results on {subject} after {timeout_s}s\n{tails}")


async def read_stream(url: str, stream: str, subject: str, attempts: int = 5) -> list[tuple[dict, bytes]]:
    """Every message on `subject` in `stream`, as (headers, data), without disturbing anyone.

    Retried whole: right after a cluster node is lost, creating the reader's consumer can
    time out while the stream's replicas elect a new leader."""
    for attempt in range(attempts):
        try:
            return await _read_stream(url, stream, subject)
        except (asyncio.TimeoutError, nats.errors.Error):
            if attempt + 1 == attempts:
                raise
            await asyncio.sleep(1.0)
    raise AssertionError("unreachable")


async def _read_stream(url: str, stream: str, subject: str) -> list[tuple[dict, bytes]]:
    nc = await _connect(url)
    out: list[tuple[dict, bytes]] = []
    try:
        js = nc.jetstream()
        info = await js.stream_info(stream, subjects_filter=subject)
        expected = (info.state.subjects or {}).get(subject, 0)
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE,
                             filter_subject=subject, inactive_threshold=30.0)
        sub = await js.pull_subscribe(subject, stream=stream, config=cfg)
        idle = 0
        while len(out) < expected and idle < 3:
            try:
                msgs = await sub.fetch(1000, timeout=1.0)
            except (asyncio.TimeoutError, nats.errors.TimeoutError):
                idle += 1
                continue
            out.extend((dict(m.headers or {}), m.data) for m in msgs)
        await sub.unsubscribe()
    finally:
        await nc.close()
    return out


async def results(url: str, subject: str) -> dict[str, list[Result]]:
    by_id: dict[str, list[Result]] = {}
    for _, data in await read_stream(url, RESULTS_STREAM, subject):
        r = decode_result(data)
        by_id.setdefault(r.id, []).append(r)
    return by_id


async def dead_letters(url: str, stream: str) -> list[tuple[dict, bytes]]:
    return await read_stream(url, DLQ_STREAM, f"fabric.dlq.{stream}")


async def consumer_state(url: str, stream: str, consumer: str):
    nc = await _connect(url)
    try:
        return await nc.jetstream().consumer_info(stream, consumer)
    finally:
        await nc.close()


async def redelivered_now(url: str, stream: str, consumer: str, batch: int = 2000,
                          timeout_s: float = 1.5) -> int:
    """How many messages the durable hands out again right now (delivery count above 1).

    A nak'd message stays "ack pending" in consumer info until it is redelivered, so the way
    to tell "nak'd" from "waiting for the ack wait" is to ask for it: nak'd ones come at once."""
    nc = await _connect(url)
    try:
        sub = await nc.jetstream().pull_subscribe_bind(consumer, stream=stream)
        try:
            msgs = await sub.fetch(batch, timeout=timeout_s)
        except (asyncio.TimeoutError, nats.errors.TimeoutError):
            return 0
        return sum(1 for m in msgs if m.metadata.num_delivered > 1)
    finally:
        await nc.close()


_REF = None


def reference_tokens(jobs: list[Job]) -> dict[str, list[int]]:
    """Greedy tokens of each job run through the same model with no broker and no worker."""
    global _REF
    if _REF is None:
        _REF = build_engine("builtin:tiny", "cpu", "float32", 32768, 1088)
    out: dict[str, list[int]] = {}
    chunk: list[Request] = []
    ids: dict[int, str] = {}
    used = 0

    def run() -> None:
        for c in engine_generate(_REF, chunk):
            out[ids[c.key]] = c.tokens

    for i, j in enumerate(jobs):
        prompt = list(j.prompt)
        res = padded_tokens(len(prompt) + j.max_new_tokens, 16)
        if used + res > 32768:
            run()
            chunk, used = [], 0
        chunk.append(Request.greedy(i, prompt, j.max_new_tokens))
        ids[i] = j.id
        used += res
    if chunk:
        run()
    return out


def small_jobs(run_id: str, n: int, seed: int, reply_to: str, max_prompt: int = 48,
               max_new: int = 8) -> list[Job]:
    """Ragged but small: enough jobs for chaos in seconds on two CPU cores."""
    import random
    rng = random.Random(seed)
    return [Job(id=f"{run_id}-{i}", prompt=[rng.randrange(1, 256) for _ in range(rng.randint(4, max_prompt))],
                max_new_tokens=rng.randint(1, max_new), reply_to=reply_to) for i in range(n)]


__all__ = ["ENGINE", "Fleet", "consumer_state", "count_results", "dead_letters", "delete_streams",
           "engine_toml", "iso_to_unix", "log_events", "provision", "publish", "read_stream",
           "redelivered_now", "reference_tokens", "results", "small_jobs", "wait_meta_leader",
           "wait_results"]
