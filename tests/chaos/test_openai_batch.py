"""A batch file of a few thousand OpenAI lines through `fabric-batch`, a real nats-server and
two workers, with a worker and the collector each killed with SIGKILL in the middle and
`submit` run twice: the output files hold exactly one line per custom_id, nothing lost."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from openai.types.chat import ChatCompletion
from openai.types.shared import ErrorObject

from loadgen.fleet import worker_env
from tests.chaos.harness import count_results, engine_toml, provision

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

N = 2500
WRONG_MODEL = 5  # lines the worker answers 400 (the file check leaves the model to it)


def write_batch(path: Path, n: int) -> list[str]:
    rng = random.Random(27)
    ids = []
    with path.open("w") as f:
        for i in range(n):
            cid = f"request-{i}"
            model = "gpt-4o" if i % (n // WRONG_MODEL) == 7 else "builtin:tiny"
            words = " ".join(rng.choice(["tea", "cat", "sky", "rain"]) for _ in range(8))
            f.write(json.dumps({"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                                "body": {"model": model, "max_tokens": rng.randint(1, 6),
                                         "temperature": 0,
                                         "messages": [{"role": "user", "content": words}]}})
                    + "\n")
            ids.append(cid)
    return ids


def batch_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "loadgen.batch", *args]


async def wait_count(url: str, subject: str, n: int, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while await count_results(url, subject) < n:
        assert time.monotonic() < deadline, f"fewer than {n} results after {timeout_s}s"
        await asyncio.sleep(0.2)


async def test_a_batch_file_survives_kill9_of_a_worker_and_the_collector(
        broker, fleet, tmp_path) -> None:
    cfg, _, _ = engine_toml(tmp_path, broker.url)
    provision(cfg, extra_args=["--ack-wait-s", "2"])
    f = fleet(cfg)
    victim, _ = f.start("a"), f.start("b")
    src, out, err = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "err.jsonl"
    ids = write_batch(src, N)
    common = ("--nats-url", broker.url, "--batch", "k9")
    env = worker_env()

    first = subprocess.run(batch_cmd("submit", str(src), *common), env=env, capture_output=True,
                           text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    again = subprocess.run(batch_cmd("submit", str(src), *common), env=env, capture_output=True,
                           text=True, timeout=120)
    assert again.returncode == 0 and f"{N} already published, publishing 0" in again.stderr

    collect = [*batch_cmd("collect", str(src), *common, "--out", str(out), "--errors", str(err),
                          "--timeout-s", "240")]
    collector = subprocess.Popen(collect, env=env, stderr=subprocess.PIPE, text=True)
    replies = "fabric.results.batch.k9"
    await wait_count(broker.url, replies, N // 3)
    victim.kill()  # SIGKILL: its unacked lines come back to the survivor after the ack wait
    await wait_count(broker.url, replies, N // 2)
    collector.kill()
    collector.wait()
    resumed = subprocess.run(collect, env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr

    got: dict[str, list[dict]] = {}
    for path in (out, err):
        for raw in path.read_text().splitlines():
            row = json.loads(raw)
            got.setdefault(row["custom_id"], []).append(row)
    assert set(got) == set(ids)
    twice = [k for k, rows in got.items() if len(rows) != 1]
    assert not twice, twice[:5]
    failed = [rows[0] for rows in got.values() if rows[0]["response"]["status_code"] != 200]
    assert len(failed) == WRONG_MODEL
    assert len(err.read_text().splitlines()) == WRONG_MODEL
    for row in failed:
        assert ErrorObject.model_validate(row["response"]["body"]["error"]).param == "model"
    for raw in out.read_text().splitlines()[:200]:
        ChatCompletion.model_validate(json.loads(raw)["response"]["body"])
