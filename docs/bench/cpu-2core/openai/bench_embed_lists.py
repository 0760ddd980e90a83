"""Embeddings sent as lists: 1,000 inputs as 10 lines of 100-input lists against the same
1,000 inputs as 1,000 one-input lines, each through `fabric-batch submit` + `collect` and one
MiniLM worker (all-MiniLM-L6-v2, from the dev extra's wheel; never downloaded).

Each run gets a fresh stream and a fresh worker (ready before the clock starts); the clock
covers `submit` (returns once published) and `collect` (until the last line is written), as
processes of their own. Runs alternate lists / singles to share the machine's noise. The
output files are checked: every line 200, 1,000 embeddings in all.

Run (exclusive lock: it measures):
    PYTHONPATH=. flock -x /work/quiet.lock .venv/bin/python \
        docs/bench/cpu-2core/openai/bench_embed_lists.py \
        --inputs 1000 --per-line 100 --reps 2
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

from loadgen.broker import EmbeddedNats, delete_streams
from loadgen.fleet import WorkerProcess, provision, worker_env, write_engine_toml
from tests.fixtures_minilm import minilm_dir

WORDS = "tea cat sky rain blue code fast slow river stone light".split()


def write_file(path: Path, model: str, texts: list[str], per_line: int) -> None:
    with path.open("w") as f:
        for i in range(0, len(texts), per_line):
            chunk = texts[i:i + per_line]
            f.write(json.dumps({"custom_id": f"request-{i}", "method": "POST",
                                "url": "/v1/embeddings",
                                "body": {"model": model,
                                         "input": chunk if per_line > 1 else chunk[0]}}) + "\n")


def one_run(server: EmbeddedNats, tmp: Path, src: Path, kind: str, rep: int,
            engine: dict) -> dict:
    tag = f"{kind}{rep}"
    cfg = write_engine_toml(tmp / f"{tag}.toml", {"nats_url": server.url, "stream": f"J_{tag}",
                                                   "consumer": f"c_{tag}", **engine})
    provision(cfg)
    w = WorkerProcess(cfg, worker_id=tag, log_path=tmp / f"{tag}.log").start()
    w.wait_ready(120)
    out = tmp / f"{tag}.out.jsonl"
    cli = [sys.executable, "-m", "loadgen.batch"]
    common = [str(src), "--nats-url", server.url, "--batch", tag]
    t0 = time.perf_counter()
    for cmd in (cli + ["submit", *common], cli + ["collect", *common, "--out", str(out)]):
        subprocess.run(cmd, env=worker_env(), stderr=subprocess.DEVNULL, check=True)
    wall = time.perf_counter() - t0
    w.terminate(grace_s=10)
    asyncio.run(delete_streams(server.url, f"J_{tag}"))
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert all(x["response"]["status_code"] == 200 for x in lines)
    vectors = sum(len(x["response"]["body"]["data"]) for x in lines)
    return {"kind": kind, "rep": rep, "wall_s": round(wall, 3), "lines": len(lines),
            "embeddings": vectors}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", type=int, default=1000)
    p.add_argument("--per-line", type=int, default=100)
    p.add_argument("--reps", type=int, default=2)
    a = p.parse_args()
    model = minilm_dir()
    engine = {"model": str(model), "device": "cpu", "dtype": "float32", "token_budget": 4096,
              "low_water": 2048, "max_seq_len": 256}
    rng = random.Random(27)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16)))
             for _ in range(a.inputs)]
    runs = []
    with tempfile.TemporaryDirectory() as d, EmbeddedNats() as server:
        tmp = Path(d)
        files = {"lists": tmp / "lists.jsonl", "singles": tmp / "singles.jsonl"}
        write_file(files["lists"], model.name, texts, a.per_line)
        write_file(files["singles"], model.name, texts, 1)
        for rep in range(a.reps):
            for kind in ("lists", "singles"):
                runs.append(one_run(server, tmp, files[kind], kind, rep, engine))
                print(json.dumps(runs[-1]), flush=True)
    best = {k: min(r["wall_s"] for r in runs if r["kind"] == k) for k in ("lists", "singles")}
    print(json.dumps({"inputs": a.inputs, "per_line": a.per_line, "best_wall_s": best}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
