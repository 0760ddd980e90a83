"""Issue test 3: a three-node NATS cluster with R3 streams; SIGKILL the node a worker is
connected to, mid-run. The worker fails over to another node, the streams keep every
message (their other two replicas elect new leaders), and every job is answered exactly
once, equal to its reference output."""

from __future__ import annotations

import asyncio
import json
import socket
import time
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack

import nats
import pytest

from loadgen.broker import EmbeddedNats
from tests.chaos.harness import (count_results, engine_toml, log_events, provision, reference_tokens,
                                 results, small_jobs, wait_results)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture
def cluster(tmp_path) -> Iterator[list[EmbeddedNats]]:
    client, monitor, route = _ports(3), _ports(3), _ports(3)
    with ExitStack() as stack:
        nodes = []
        for i in range(3):
            routes = ", ".join(f"nats-route://127.0.0.1:{route[j]}" for j in range(3) if j != i)
            conf = (f"server_name: n{i}\n"
                    f"cluster {{\n  name: fabric-chaos\n  listen: 127.0.0.1:{route[i]}\n"
                    f"  routes: [{routes}]\n}}\n")
            node = EmbeddedNats(port=client[i], monitor_port=monitor[i], extra_config=conf,
                                store_dir=tmp_path / f"js{i}",
                                health_path="/healthz?js-enabled-only=true")
            stack.callback(node.close)
            nodes.append(node)
        for node in nodes:  # each waits only for itself; the meta leader comes after
            node.start()
        yield nodes


def _connected_node(nodes: list[EmbeddedNats], client_name: str) -> int:
    for i, node in enumerate(nodes):
        if not node.is_running():
            continue
        with urllib.request.urlopen(node.monitor_url + "/connz?limit=1024", timeout=2) as r:
            conns = json.load(r).get("connections") or []
        if any(c.get("name") == client_name for c in conns):
            return i
    raise AssertionError(f"{client_name} is connected to no node")


async def _wait_meta_leader(urls: str, timeout_s: float = 30) -> None:
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


async def test_kill_the_node_the_worker_is_connected_to(cluster, fleet, tmp_path) -> None:
    urls = ",".join(n.url for n in cluster)
    await _wait_meta_leader(urls)
    cfg, stream, consumer = engine_toml(tmp_path, urls)
    provision(cfg, extra_args=["--replicas", "3", "--ack-wait-s", "5"])
    f = fleet(cfg)
    workers = [f.start("a"), f.start("b")]
    reply = "fabric.results.cl"
    n = 1500
    jobs = small_jobs("cl", n, seed=43, reply_to=reply, max_prompt=64, max_new=24)
    from tests.chaos.harness import publish
    await publish(urls, jobs, "fabric.jobs.cl")
    while await count_results(urls, reply) < n // 3:
        await asyncio.sleep(0.1)
    victim = _connected_node(cluster, "a")
    cluster[victim].kill()
    t0 = time.monotonic()
    took = await wait_results(urls, reply, n, 150, workers)
    moved = _connected_node(cluster, "a")
    print(f"\n[cluster] killed n{victim} (worker a's node); a moved to n{moved}; "
          f"the rest answered in {took:.1f}s")
    assert moved != victim and all(w.returncode is None for w in workers)
    assert any(e.get("event") == "broker_reconnected" for e in log_events(workers[0]))
    got = await results(urls, reply)
    assert got.keys() == {j.id for j in jobs}
    assert all(len(v) == 1 for v in got.values())
    ref = reference_tokens(jobs)
    assert all(got[j.id][0].ok and got[j.id][0].tokens == ref[j.id] for j in jobs)
    assert time.monotonic() - t0 < 150
