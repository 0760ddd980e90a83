"""Mixed producer traffic (loadgen.mix) and the soak's supervisor (loadgen.soak)."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest

from loadgen.mix import Mix, apply_mix, one_property_schema, parse_mix
from loadgen.soak import RssSampler, Supervisor
from loadgen.workload import WorkloadSpec, generate
from schemas import decode_job, encode


def jobs(n: int = 400, seed: int = 3):
    return apply_mix(generate(WorkloadSpec(num_jobs=n, seed=seed, text=True)), Mix(), seed)


def test_a_mix_is_a_pure_function_of_the_seed_and_keeps_the_prompts() -> None:
    plain = generate(WorkloadSpec(num_jobs=400, seed=3, text=True))
    a, b = jobs(), jobs()
    assert a == b and [j.prompt for j in a] == [j.prompt for j in plain]
    assert jobs(seed=4) != a


def test_each_feature_is_drawn_at_about_its_share_and_every_job_is_valid_on_the_wire() -> None:
    js = jobs(2000)
    share = {
        "chat": sum(j.system is not None for j in js),
        "stops": sum(bool(j.stop) for j in js),
        "schemas": sum(j.response_format is not None for j in js),
        "json": sum(bool(j.as_json) for j in js),
        "cancel": sum(j.cancel_after_s is not None for j in js),
    }
    for name, count in share.items():
        assert abs(count / len(js) - getattr(Mix(), name)) < 0.04, (name, count)
    assert all(0 <= j.cancel_after_s <= 0.2 for j in js if j.cancel_after_s is not None)
    assert all(j.temperature == 0.7 and j.logprobs in (0, 2, 5) for j in js if j.stop)
    assert len({json.dumps(j.response_format) for j in js if j.response_format}) > 200
    for j in js[:300]:
        job = j.to_job("fabric.results.x")
        assert decode_job(encode(job, as_json=bool(j.as_json))) == job


def test_parse_mix_takes_shares_over_the_defaults_and_refuses_the_rest() -> None:
    assert parse_mix("") == Mix()
    assert parse_mix("chat=0,cancel=0.5") == Mix(chat=0.0, cancel=0.5)
    for bad in ("chat", "colour=0.1", "chat=2", "cancel_max_ms=-1"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    assert one_property_schema(7)["properties"]["k7"]["maximum"] == 17


class FakeWorker:
    """What the supervisor reads of a worker process."""

    def __init__(self, log: Path, line: str | None = None):
        self.log_path, self.returncode, self.pid = log, None, os.getpid()
        log.write_text("" if line is None else line + "\n")

    def wait_ready(self, timeout_s: float) -> None:
        pass


def test_the_supervisor_records_a_worker_exit_with_its_reason_and_replaces_it(
        tmp_path: Path) -> None:
    made: list[FakeWorker] = []
    fault = json.dumps({"event": "executor_failed", "error": "RuntimeError('boom')"})

    def make(n: int) -> FakeWorker:
        made.append(FakeWorker(tmp_path / f"w{n}.log", fault if n == 0 else None))
        return made[-1]

    sampler = RssSampler(os.getpid(), 60)
    sup = Supervisor(make(0), make, sampler, every_s=0.01)
    sup.start()
    made[0].returncode = 70
    done = threading.Event()
    for _ in range(500):
        if sup.exits:
            done.set()
            break
        threading.Event().wait(0.01)
    last = sup.stop()
    assert done.is_set() and len(made) == 2 and last is made[1]
    assert sup.exits[0]["code"] == 70 and "boom" in sup.exits[0]["why"]
