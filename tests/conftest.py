"""Shared fixtures: one real nats-server per test session, and engine configs per test.

Rule: tests share the broker but never its state. Each test that needs JetStream gets
its own stream and consumer names from `tmp_engine_toml`, and those streams are
deleted when the test ends: every jobs stream captures `fabric.jobs.>`, and JetStream
refuses two streams with overlapping subjects, so a stream left behind would break the
next test's provision. Tests that need a broker to themselves (restart, kill) start
their own EmbeddedNats.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from loadgen.broker import EmbeddedNats, delete_streams
from loadgen.fleet import WorkerProcess, write_engine_toml

# Small enough for CPU tests; max_seq_len is 1024 prompt + 64 new, like the demo.
ENGINE_DEFAULTS: dict[str, object] = {
    "model": "builtin:tiny",
    "device": "cpu",
    "dtype": "float32",
    "token_budget": 4096,
    "low_water": 2048,
    "max_seq_len": 1088,
}


@pytest.fixture(scope="session")
def nats_server() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


@pytest.fixture
def nats_url(nats_server: EmbeddedNats) -> str:
    # A test may have killed or stopped the shared server; bring it back for the next.
    if not nats_server.is_running():
        nats_server.restart()
    return nats_server.url


@pytest.fixture
def tmp_engine_toml(
    tmp_path: Path, nats_server: EmbeddedNats
) -> Iterator[Callable[..., Path]]:
    """Factory: `tmp_engine_toml(**overrides) -> Path` of a fresh engine.toml.

    Stream and consumer names are unique per call (`T_<hex>`, `c_<hex>`); any of the
    nine fields can be overridden, and an override of None drops the key (to test
    that the worker rejects a config missing it). Extra keys are written as given.
    """

    def make(**overrides: object) -> Path:
        tag = secrets.token_hex(4)
        fields: dict[str, object] = {
            "nats_url": nats_server.url,
            "stream": f"T_{tag}",
            "consumer": f"c_{tag}",
            **ENGINE_DEFAULTS,
            **overrides,
        }
        fields = {k: v for k, v in fields.items() if v is not None}
        if isinstance(fields.get("stream"), str):
            streams.append(fields["stream"])
        return write_engine_toml(tmp_path / f"engine-{tag}.toml", fields)

    streams: list[str] = []
    yield make
    if streams and nats_server.is_running():
        # A sync teardown runs outside the session loop, so a private loop is safe here.
        # The cancels stream too: a cancel kept from one test must not reach the next's workers;
        # and the members bucket: a killed worker's entry must not own the next's partitions.
        asyncio.run(delete_streams(nats_server.url, *streams, "FABRIC_CANCELS",
                                   "KV_FABRIC_WORKERS"))


@pytest.fixture
def workers(tmp_path: Path):
    """Factory: `workers(config, name="w1", **WorkerProcess kwargs)` starts a worker and
    waits until it is ready; every worker started is stopped (SIGTERM) after the test."""
    started: list[WorkerProcess] = []

    def start(config: Path, name: str = "w1", **kw) -> WorkerProcess:
        w = WorkerProcess(config, worker_id=name, log_path=tmp_path / f"{name}.log", **kw).start()
        started.append(w)
        w.wait_ready(120)
        return w

    yield start
    for w in started:
        w.terminate(grace_s=10)
