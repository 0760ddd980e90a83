"""The KV cache: one tensor allocated at start-up, handed out in fixed-size blocks.

The pool holds `num_blocks` blocks of `block_size` token slots for every layer; which
job holds which block, and which blocks keep a prefix's KV for the next job, is
`worker.engine.blocks.BlockPool`'s business. A GPU worker may add a host tier: pinned
host blocks that evicted blocks are copied to and read back from (`TierCopier`).
"""

from __future__ import annotations

from collections import deque

import torch

from worker.engine.blocks import BlockPool, SCRATCH_SLOT
from worker.engine.hosttier import Copies, HostTier, runs
from worker.model.decoder import ModelArgs


class KVPool:
    """k/v for every layer: `tensor` is [L, S, 2, Hkv, D], S = (num_blocks + 1) * block_size.

    Block 0 is scratch (`SCRATCH_SLOT` lies in it): rows that are padding, never a real
    token, write their k/v there.
    """

    SCRATCH_SLOT = SCRATCH_SLOT

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, caching: bool = True,
                 host_blocks: int = 0, sized_by: str = ""):
        self.block_size = block_size
        self.num_blocks = num_blocks
        self.sized_by = sized_by  # which option (or default) set num_blocks: logged at start
        slots = (num_blocks + 1) * block_size
        self.tensor = torch.zeros(
            (args.n_layers, slots, 2, args.n_kv_heads, args.hd), dtype=dtype, device=device
        )
        tier = HostTier(host_blocks) if host_blocks and caching else None
        self.blocks = BlockPool(num_blocks, block_size, first=1, caching=caching, tier=tier)
        self.copier = None
        if tier is not None:
            self.copier = self.blocks.copier = TierCopier(self.tensor, host_blocks, block_size)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def describe(self) -> dict[str, object]:
        """The sizing, for the start-up log line."""
        tier = self.blocks.tier
        return {"kv_pool_sized_by": self.sized_by,
                "host_tier_blocks": tier.num_blocks if tier is not None else 0,
                "host_tier_mib": round(self.copier.nbytes / 2**20, 1) if self.copier else 0}

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        return args.n_layers * 2 * args.n_kv_heads * args.hd * torch.finfo(dtype).bits // 8


class TierCopier:
    """Issues a flush's copies between the device pool and the host blocks.

    On CUDA they run on one side stream, off the executor's stream: the side stream first
    waits for the work already queued (the KV it copies out is written, and no earlier
    step still touches a block it loads into), and records an event after each batch. The
    executor's stream waits for a batch's event only when the pool says the step depends on
    it (`wait`: a load it may read, a copy out of a block it may overwrite); copies of
    blocks the step leaves alone run beside it. Both waits are on the device; the host
    never blocks. On the CPU (tests) the same copies run in place.
    """

    def __init__(self, tensor: torch.Tensor, host_blocks: int, block_size: int):
        n_layers, slots, *rest = tensor.shape
        # [L, NB, bs, 2, Hkv, D]: block b of every layer is dev[:, b]
        self.dev = tensor.view(n_layers, slots // block_size, block_size, *rest)
        cuda = tensor.device.type == "cuda"
        # [NH, L, bs, 2, Hkv, D]: a host block is contiguous, and so is a run of them
        self.host = torch.zeros((host_blocks, n_layers, block_size, *rest), dtype=tensor.dtype,
                                pin_memory=cuda)
        self.stream = torch.cuda.Stream(tensor.device) if cuda else None
        # (mark, event) of the batches issued that the executor's stream has not waited for
        # and that may not have finished, oldest first.
        self.events: deque[tuple[int, torch.cuda.Event]] = deque()
        self.flushes = 0
        self.waits = 0  # steps the executor's stream was made to wait for copies

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()

    def __call__(self, owed: Copies, ahead: Copies, wait: int) -> None:
        if owed or ahead:
            self.flushes += 1
        dev = self.dev.device
        if self.stream is None:
            for copies in (owed, ahead):
                self._copy(copies, dev)
            return
        main = torch.cuda.current_stream(dev)
        # Finished batches need no wait: forget them (the stream runs them in order).
        while self.events and self.events[0][1].query():
            self.events.popleft()
        if owed or ahead:
            self.stream.wait_stream(main)
            with torch.cuda.stream(self.stream):
                for copies in (owed, ahead):
                    if copies:
                        self._copy(copies, dev)
                        self.events.append((copies.mark, torch.cuda.Event()))
                        self.events[-1][1].record(self.stream)
        # One stream: the last batch at or below `wait` covers every earlier one.
        last = None
        while self.events and self.events[0][0] <= wait:
            last = self.events.popleft()[1]
        if last is not None:
            main.wait_event(last)
            self.waits += 1

    def _copy(self, copies: Copies, dev: torch.device) -> None:
        nb = dev.type != "cpu"
        for kind, pairs in copies.batches:
            if kind == "load":
                staged = torch.empty((len(pairs), *self.host.shape[1:]), dtype=self.host.dtype,
                                     device=dev)  # [n, L, bs, 2, Hkv, D]
                for i, j, slot in runs(pairs, 0):
                    staged[i:j].copy_(self.host[slot:slot + j - i], non_blocking=nb)
                self.dev.index_copy_(1, _index([b for _, b in pairs], dev),
                                     staged.transpose(0, 1))
            else:
                idx = _index([b for b, _ in pairs], dev)
                staged = self.dev.index_select(1, idx).transpose(0, 1).contiguous()  # [n, L, ...]
                for i, j, slot in runs(pairs, 1):
                    self.host[slot:slot + j - i].copy_(staged[i:j], non_blocking=nb)
        # Every temporary here was allocated on the stream that uses it and freed to it:
        # whatever reuses its memory is queued after these copies.


def _index(blocks: list[int], dev: torch.device) -> torch.Tensor:
    """Block ids on `dev`. Through pinned memory on CUDA: a copy from pageable memory would
    make the host wait for the side stream, which waits for the executor's."""
    idx = torch.tensor(blocks, dtype=torch.int64)
    return idx if dev.type == "cpu" else idx.pin_memory().to(dev, non_blocking=True)
