"""The host tier's copies on a CUDA device: one side stream, an event per batch, and the
executor's stream waiting only for the copies a step depends on.

The side stream is held back with `torch.cuda._sleep` so that its copies are still queued
when the executor's stream moves on: a step that does not depend on them finishes first,
and a step that overwrites a block whose copy out is queued waits for it (else the host
copy would read the step's zeros). Skipped without a GPU; `pytest -m gpu tests/gpu`.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_kvcapacity import _write_out_and_read_back
from worker.engine.blocks import block_hashes
from worker.engine.kv import KVPool
from worker.model.decoder import ModelArgs

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

BS = 16
HOLD_CYCLES = 1_000_000_000  # about half a second of the side stream's time at 2 GHz


def _kv(num_blocks: int = 8, host_blocks: int = 16) -> KVPool:
    args = ModelArgs(vocab_size=32, dim=64, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=64)
    kv = KVPool(args, num_blocks, BS, torch.bfloat16, torch.device("cuda"),
                host_blocks=host_blocks)
    kv.blocks.min_load_blocks = 1
    return kv


def _hold_side_stream(kv: KVPool) -> None:
    with torch.cuda.stream(kv.copier.stream):
        torch.cuda._sleep(HOLD_CYCLES)


def test_the_host_tier_copies_on_a_side_stream_from_pinned_memory() -> None:
    kv = _kv(8, 4)
    assert kv.copier.stream is not None and kv.copier.host.is_pinned()
    _write_out_and_read_back(kv)
    torch.cuda.synchronize()


def test_a_write_back_runs_beside_the_step_and_the_step_that_reuses_its_block_waits() -> None:
    kv = _kv()
    p, dev, cp = kv.blocks, kv.copier.dev, kv.copier
    h = block_hashes(list(range(3 * BS)), BS)
    p.reserve(1, h, 3)
    chain = list(p.blocks_of(1))
    dev[:, chain] = torch.randn_like(dev[:, chain])  # the prefill, on the executor's stream
    want = dev[:, chain].clone()
    p.mark_ready(chain)
    p.release(1)
    _hold_side_stream(kv)
    p.flush()  # the chain is written back ahead, behind the held side stream
    assert p.tier.written_ahead == 3 and cp.waits == 0
    step = torch.cuda.Event()
    dev[:, 0].add_(1)  # a step that touches none of the chain (the scratch block)
    step.record()
    step.synchronize()
    assert not cp.events[-1][1].query(), "the step waited for copies it does not read"
    p.reserve(2, (), 8)  # every block: the chain is evicted with no copy, and reused
    assert p.tier.spills == 0 and p.evictions == 3
    p.flush()
    assert cp.waits == 1
    dev.zero_()  # the reusing step's writes: after the copies out have read the blocks
    p.release(2)
    r = p.reserve(3, h, 3)  # read back from the host tier
    assert r.shared == 3 and p.tier.hits == 3
    p.flush()
    assert cp.waits == 2
    assert torch.equal(dev[:, list(r.blocks)], want)
    p.check()


def test_a_spill_at_eviction_is_waited_for_by_the_step_that_overwrites_the_block() -> None:
    kv = _kv()
    p, dev, cp = kv.blocks, kv.copier.dev, kv.copier
    p.write_back_blocks = 0
    h = block_hashes(list(range(2 * BS)), BS)
    p.reserve(1, h, 2)
    chain = list(p.blocks_of(1))
    dev[:, chain] = torch.randn_like(dev[:, chain])
    want = dev[:, chain].clone()
    p.mark_ready(chain)
    p.release(1)
    p.reserve(2, (), 8)  # spilled at eviction, reused at once
    _hold_side_stream(kv)
    p.flush()
    assert p.tier.spills == 2 and cp.waits == 1
    dev.zero_()
    p.release(2)
    r = p.reserve(3, h, 2)
    p.flush()
    assert torch.equal(dev[:, list(r.blocks)], want)


def test_flushes_never_sync_the_host() -> None:
    """Under CUDA's sync debug mode set to error: copies out ahead and at eviction, loads,
    and the waits, with no synchronizing call (the block ids go through pinned memory)."""
    kv = _kv(16, 32)
    p, dev = kv.blocks, kv.copier.dev
    _write_out_and_read_back(kv)  # warms the pinned allocator and the kernels
    p.release(3)
    torch.cuda.set_sync_debug_mode("error")
    try:
        for turn in range(3):
            h = block_hashes([turn] * (4 * BS), BS)
            p.reserve(10 + turn, h, 4)
            p.mark_ready(p.blocks_of(10 + turn))
            p.release(10 + turn)
            p.flush()  # written back ahead
            p.reserve(20, (), 16)  # everything evicted and reused
            p.flush()
            p.release(20)
            p.reserve(30, h, 4)  # read back
            p.flush()
            p.release(30)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    assert p.tier.written_ahead > 0 and p.tier.hits > 3 and dev.is_cuda
    p.check()
