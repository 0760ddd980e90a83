"""The OpenAI layer's cost: a chat batch file through `fabric-batch submit` + `collect` and one
worker, against the same jobs in the project's own format sent and collected the same way.

Each run gets a fresh broker streams, a fresh worker (started and ready before the clock
starts) and the same 10,000 chat requests (builtin:tiny, greedy, 8 tokens). The clock covers
`submit` (publish, returns at once) and `collect` (until the last line is written), both as
processes of their own; the own-format runs use this script's `own-submit` / `own-collect`,
which publish and collect exactly as `fabric-batch` does (same window, same ordered consumer,
same file writes) but with Job payloads. Runs alternate own / openai to share the machine's
noise. The collector's peak RSS is sampled every 20 ms.

Run (exclusive lock: it measures):
    flock -x /work/quiet.lock .venv/bin/python docs/bench/cpu-2core/openai/bench_batch.py \
        --lines 10000 --reps 2 --json docs/bench/cpu-2core/openai/batch-10k.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil

from loadgen import batch
from loadgen.batchfile import BatchFile, OutputFile
from loadgen.broker import EmbeddedNats, delete_streams
from loadgen.client import connect
from loadgen.fleet import WorkerProcess, provision, worker_env, write_engine_toml

ENGINE = {"model": "builtin:tiny", "device": "cpu", "dtype": "float32", "token_budget": 8192,
          "low_water": 6144, "max_seq_len": 1088}
WORDS = "tea cat sky rain blue code fast slow river stone light".split()


def write_file(path: Path, n: int, seed: int = 27) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
            f.write(json.dumps({"custom_id": f"request-{i}", "method": "POST",
                                "url": "/v1/chat/completions",
                                "body": {"model": "builtin:tiny", "max_tokens": 8,
                                         "temperature": 0,
                                         "messages": [{"role": "user", "content": text}]}})
                    + "\n")


def own_job(line: dict, reply_to: str, batch_name: str) -> bytes:
    """The same request as the project's own Job. Its id is scoped by the batch, as the
    OpenAI line's Result id is (by its reply subject): the runs share a results stream,
    whose duplicate window would drop a second run's Results under the same ids."""
    body = line["body"]
    return json.dumps({"id": f"{batch_name}:{line['custom_id']}", "messages": body["messages"],
                       "max_new_tokens": body["max_tokens"], "reply_to": reply_to},
                      separators=(",", ":")).encode()


async def own_submit(url: str, b: BatchFile) -> None:
    nc = await connect(url, name="own-submit")
    js = nc.jetstream()
    jobs, replies = batch.subjects(b)
    gate = asyncio.Semaphore(batch.WINDOW)

    async def one(line: dict) -> None:
        try:
            await js.publish(jobs, own_job(line, replies, b.name),
                             headers={"Nats-Msg-Id": f"{b.name}:{line['custom_id']}"})
        finally:
            gate.release()

    tasks = []
    for line in b.lines:
        await gate.acquire()
        tasks.append(asyncio.create_task(one(line)))
    await asyncio.gather(*tasks)
    await nc.close()


async def own_collect(url: str, b: BatchFile, out: Path) -> None:
    nc = await connect(url, name="own-collect")
    _, replies = batch.subjects(b)
    want, done, f = {f"{b.name}:{i}" for i in b.ids}, set(), OutputFile(out)

    def on_msg(msg) -> None:
        r = json.loads(msg.data)
        if r["id"] in want and r["id"] not in done:
            f.write(r["id"], msg.data)
            done.add(r["id"])

    await batch.read_subject(nc.jetstream(), replies, on_msg,
                             until=lambda: len(done) >= len(want), timeout_s=3600)
    f.close()
    await nc.close()


def timed(cmds: list[list[str]]) -> tuple[float, int]:
    """Run the commands one after the other: seconds in all, the last one's peak RSS."""
    t0, peak = time.perf_counter(), 0
    for cmd in cmds:
        p = subprocess.Popen(cmd, env=worker_env(), stderr=subprocess.DEVNULL)
        proc = psutil.Process(p.pid)
        while p.poll() is None:
            try:
                peak = max(peak, proc.memory_info().rss)
            except psutil.NoSuchProcess:
                break
            time.sleep(0.02)
        assert p.returncode == 0, cmd
    return time.perf_counter() - t0, peak


def one_run(server: EmbeddedNats, tmp: Path, src: Path, kind: str, rep: int) -> dict:
    tag = f"{kind}{rep}"
    cfg = write_engine_toml(tmp / f"{tag}.toml", {"nats_url": server.url, "stream": f"J_{tag}",
                                                   "consumer": f"c_{tag}", **ENGINE})
    provision(cfg)
    w = WorkerProcess(cfg, worker_id=tag, log_path=tmp / f"{tag}.log").start()
    w.wait_ready(120)
    me, out = [sys.executable, __file__], tmp / f"{tag}.out.jsonl"
    common = [str(src), "--nats-url", server.url, "--batch", tag]
    if kind == "openai":
        cli = [sys.executable, "-m", "loadgen.batch"]
        cmds = [cli + ["submit", *common], cli + ["collect", *common, "--out", str(out)]]
    else:
        cmds = [me + ["own-submit", *common], me + ["own-collect", *common, "--out", str(out)]]
    wall, rss = timed(cmds)
    w.terminate(grace_s=10)
    asyncio.run(delete_streams(server.url, f"J_{tag}"))  # the next run's stream takes its subjects
    lines = out.read_text().splitlines()
    ok = sum(1 for x in lines if (json.loads(x).get("response") or {}).get("status_code") == 200
             or json.loads(x).get("ok") is True)
    return {"kind": kind, "rep": rep, "wall_s": round(wall, 3), "collect_peak_rss_mib":
            round(rss / 2**20, 1), "lines": len(lines), "ok": ok}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", nargs="?", default="bench", choices=["bench", "own-submit",
                                                                 "own-collect"])
    p.add_argument("file", nargs="?")
    p.add_argument("--nats-url")
    p.add_argument("--batch")
    p.add_argument("--out", type=Path)
    p.add_argument("--lines", type=int, default=10000)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--json", type=Path)
    a = p.parse_args()
    if a.mode != "bench":
        b = BatchFile(Path(a.file), a.batch)
        b.lines = [json.loads(x) for x in Path(a.file).read_text().splitlines() if x.strip()]
        asyncio.run(own_submit(a.nats_url, b) if a.mode == "own-submit"
                    else own_collect(a.nats_url, b, a.out))
        return 0
    runs = []
    with tempfile.TemporaryDirectory() as d, EmbeddedNats() as server:
        tmp = Path(d)
        src = tmp / "batch.jsonl"
        write_file(src, a.lines)
        for rep in range(a.reps):
            for kind in ("own", "openai"):
                runs.append(one_run(server, tmp, src, kind, rep))
                print(json.dumps(runs[-1]), flush=True)
    best = {k: min(r["wall_s"] for r in runs if r["kind"] == k) for k in ("own", "openai")}
    summary = {"lines": a.lines, "engine": ENGINE, "max_tokens": 8, "runs": runs,
               "best_wall_s": best,
               "openai_cost_pct": round(100 * (best["openai"] / best["own"] - 1), 2),
               "cpus": psutil.cpu_count()}
    print(json.dumps(summary, indent=2))
    if a.json:
        a.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
