"""A worker behind a leaf node, with the streams in the hub's JetStream domain.

The leaf runs a JetStream of its own (domain `leaf`), so `$JS.API` there answers for the
leaf's, which holds nothing of ours: only a worker that sends every API call and every
pull request to `$JS.hub.API` finds its stream and consumer. Jobs and Results are plain
subjects, which the leaf connection carries to the hub's streams.
"""

from __future__ import annotations

import asyncio
import secrets
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest

from loadgen.backlog import result_counts
from loadgen.broker import EmbeddedNats, _free_port, delete_streams
from loadgen.client import run_jobs
from loadgen.fleet import WorkerProcess, provision, worker_env, write_engine_toml
from loadgen.workload import WorkloadSpec, generate
from tests.conftest import ENGINE_DEFAULTS

pytestmark = pytest.mark.timeout(240)


@pytest.fixture(scope="module")
def hub_and_leaf():
    port = _free_port()
    with EmbeddedNats(js_domain="hub", extra_config=f"leafnodes {{ listen: 127.0.0.1:{port} }}") as hub, \
         EmbeddedNats(js_domain="leaf", extra_config="leafnodes { remotes: [ "
                      f'{{ url: "nats-leaf://127.0.0.1:{port}" }} ] }}') as leaf:
        asyncio.run(_wait_for_hub(leaf.url))
        yield hub, leaf


async def _wait_for_hub(url: str, timeout_s: float = 20.0) -> None:
    """Until the leaf's connection to the hub is up: the hub's domain answers through it."""
    nc = await nats.connect(url)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                await nc.jetstream(domain="hub").account_info()
                return
            except Exception:  # noqa: BLE001 - no responders until the leaf connects
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.2)
    finally:
        await nc.close()


@pytest.fixture
def engine(hub_and_leaf, tmp_path: Path):
    """An engine config on the leaf; its jobs stream (in the hub) is deleted afterwards,
    since every jobs stream captures `fabric.jobs.>`."""
    hub, leaf = hub_and_leaf
    tag = secrets.token_hex(4)
    stream = f"D_{tag}"
    yield write_engine_toml(tmp_path / f"engine-{tag}.toml",
                            {"nats_url": leaf.url, "stream": stream, "consumer": f"c_{tag}",
                             **ENGINE_DEFAULTS}), stream, f"c_{tag}"
    asyncio.run(delete_streams(hub.url, stream))


async def test_worker_through_a_leaf_node_serves_the_hub_domain(hub_and_leaf, engine,
                                                                tmp_path) -> None:
    hub, leaf = hub_and_leaf
    cfg, stream, consumer = engine
    provision(cfg, extra_args=("--js-domain", "hub"))
    w = WorkerProcess(cfg, worker_id="leafy", log_path=tmp_path / "leafy.log",
                      extra_args=("--js-domain", "hub")).start()
    try:
        w.wait_ready(120)
        jobs = generate(WorkloadSpec(num_jobs=40, seed=5, run_id="domain"))
        stats = await run_jobs(leaf.url, jobs, run_id="domain", timeout_s=120, progress=False)
    finally:
        w.terminate(grace_s=10)
    assert not stats.timed_out and stats.duplicates == 0
    assert len(stats.outcomes) == 40 and all(o.ok for o in stats.outcomes.values())
    # The Results are in the hub's results stream, once each, and nothing is left unacked.
    assert await result_counts(hub.url, "fabric.results.domain") == {j.id: 1 for j in jobs}
    nc = await nats.connect(hub.url)
    try:
        info = await nc.jetstream().consumer_info(stream, consumer)
        assert info.num_ack_pending == 0 and info.num_pending == 0
    finally:
        await nc.close()


def test_without_the_domain_the_worker_finds_nothing_and_says_so(engine) -> None:
    cfg, _, _ = engine
    provision(cfg, extra_args=("--js-domain", "hub"))
    # The leaf's own JetStream holds no such stream: the worker refuses to start (exit 2).
    proc = subprocess.run([sys.executable, "-m", "worker", "run", "--config", str(cfg)],
                          env=worker_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr


def test_js_domain_must_be_a_name() -> None:
    proc = subprocess.run([sys.executable, "-m", "worker", "check-config", "--config", "x",
                           "--js-domain", "hub.x"], env=worker_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "--js-domain" in proc.stderr
