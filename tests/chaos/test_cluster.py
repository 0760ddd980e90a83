"""Issue test 3: a three-node NATS cluster with R3 streams; SIGKILL the node a worker is
connected to, mid-run. The worker fails over to another node, the streams keep every
message (their other two replicas elect new leaders), and every job is answered exactly
once, equal to its reference output."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest

from loadgen.broker import EmbeddedNats
from tests.chaos.harness import (count_results, engine_toml, log_events, provision, reference_tokens,
                                 results, small_jobs, wait_meta_leader, wait_results)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def _connected_node(nodes: list[EmbeddedNats], client_name: str) -> int:
    for i, node in enumerate(nodes):
        if not node.is_running():
            continue
        with urllib.request.urlopen(node.monitor_url + "/connz?limit=1024", timeout=2) as r:
            conns = json.load(r).get("connections") or []
        if any(c.get("name") == client_name for c in conns):
            return i
    raise AssertionError(f"{client_name} is connected to no node")


async def test_kill_the_node_the_worker_is_connected_to(cluster, fleet, tmp_path) -> None:
    urls = ",".join(n.url for n in cluster)
    await wait_meta_leader(urls)
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
