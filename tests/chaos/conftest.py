"""Chaos tier: real nats-server and real worker processes, faults injected on purpose.

Rule: every test owns its broker (`broker`, a private EmbeddedNats on its own store) and its
workers (`fleet`), and both are stopped when it ends, whatever happened. Tests here kill
things; nothing they kill is shared.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path

import pytest

from loadgen.broker import EmbeddedNats
from tests.chaos.harness import Fleet


@pytest.fixture
def broker() -> Iterator[EmbeddedNats]:
    with EmbeddedNats() as server:
        yield server


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Callable[[Path], Fleet]]:
    """Factory: `fleet(config) -> Fleet`; every worker of every fleet is stopped at the end."""
    made: list[Fleet] = []

    def make(config: Path) -> Fleet:
        f = Fleet(tmp_path, config)
        made.append(f)
        return f

    yield make
    for f in made:
        f.close()


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
