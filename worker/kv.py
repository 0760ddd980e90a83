"""The KV cache: one tensor allocated at start-up, handed out in fixed-size blocks.

The pool holds `num_blocks` blocks of `block_size` token slots for every layer. A sequence
reserves, when it enters the executor, all the blocks its padded length can ever need
(prompt + max_new_tokens, rounded up to the block size) and returns them when it ends, so
the step loop never allocates and never runs out: admission keeps the sum of padded
tokens under the budget, and the pool is sized from that budget.

`BlockAllocator` is plain Python on plain data (tested without a device); `KVPool` is the
tensor plus the allocator.
"""

from __future__ import annotations

import torch

from worker.model import ModelArgs


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def padded_tokens(num_tokens: int, block_size: int) -> int:
    """The budget's unit: tokens rounded up to whole KV blocks."""
    return blocks_for(num_tokens, block_size) * block_size


class OutOfBlocks(RuntimeError):
    """Admission let in more than the pool holds: a bug upstream, fatal by design."""


class BlockAllocator:
    """A LIFO free list of block ids; LIFO so recently freed (cache-warm) blocks go first.

    Ids start at `first`: the pool keeps block 0 as a scratch block that padding rows
    write into and nothing ever reads as a real key.
    """

    def __init__(self, num_blocks: int, first: int = 0):
        self.num_blocks = num_blocks
        self._free = list(range(first + num_blocks - 1, first - 1, -1))
        self._owner: dict[int, list[int]] = {}  # sequence key -> its blocks

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, key: int, n: int) -> list[int]:
        if key in self._owner:
            raise ValueError(f"sequence {key} already holds blocks")
        if n > len(self._free):
            raise OutOfBlocks(f"need {n} blocks, {len(self._free)} free of {self.num_blocks}")
        got = [self._free.pop() for _ in range(n)]
        self._owner[key] = got
        return got

    def release(self, key: int) -> int:
        """Return a sequence's blocks; releasing an unknown key is a no-op (idempotent)."""
        got = self._owner.pop(key, None)
        if got is None:
            return 0
        self._free.extend(reversed(got))
        return len(got)

    def holders(self) -> int:
        return len(self._owner)


class KVPool:
    """k/v for every layer: `tensor` is [L, S, 2, Hkv, D], S = (num_blocks + 1) * block_size.

    Block 0 is scratch (`SCRATCH_SLOT` lies in it): rows that are padding, never a real
    token, write their k/v there.
    """

    SCRATCH_SLOT = 0

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device):
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = (num_blocks + 1) * block_size
        self.tensor = torch.zeros(
            (args.n_layers, slots, 2, args.n_kv_heads, args.hd), dtype=dtype, device=device
        )
        self.allocator = BlockAllocator(num_blocks, first=1)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        return args.n_layers * 2 * args.n_kv_heads * args.hd * torch.finfo(dtype).bits // 8
