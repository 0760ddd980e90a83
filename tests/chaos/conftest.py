"""Chaos tier: real nats-server and real worker processes, faults injected on purpose.

Rule: every test owns its broker (`broker`, a private EmbeddedNats on its own store) and its
workers (`fleet`), and both are stopped when it ends, whatever happened. Tests here kill
things; nothing they kill is shared.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
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
