"""KV blocks as plain data: the budget's unit and the allocator that hands blocks out.

A sequence reserves, when it enters the executor, every block its padded length can ever
need (prompt + max_new_tokens, rounded up to the block size) and returns them when it ends,
so the step loop never allocates and never runs out: admission keeps the sum of padded
tokens under the budget, and the pool is sized from that budget. No torch here: the
broker side sizes jobs with `padded_tokens`, and the allocator is tested without a device.
"""

from __future__ import annotations


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
