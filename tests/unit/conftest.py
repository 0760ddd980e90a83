"""The unit tier's one shared fixture: the builtin tiny model on the CPU in float32."""

from __future__ import annotations

import pytest

from worker.engine.build import Engine, build_engine


@pytest.fixture(scope="module")
def engine() -> Engine:
    return build_engine("builtin:tiny", "cpu", "float32", token_budget=32768, max_seq_len=1088)
