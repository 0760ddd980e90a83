"""The host tier: KV blocks the device pool evicted, kept in pinned host memory by content key.

Rule: the tier is a ring of `num_blocks` host blocks written in the order the device pool
evicts (its least recently used leaves first), so its own eviction is first in, first out:
the device's LRU order one tier down, with every batch of spills landing in consecutive
slots (one copy per run, `runs`). It is inclusive: a block read back to the device keeps
its host copy, so evicting it again costs no second copy.

This module is the bookkeeping only, plain data under the block pool's lock: which key
lives in which slot, and the copies owed (`pending`). The pool hands them to a copier
(`worker.engine.kv.TierCopier`) once per step, in the order they were owed, on one
stream, so a block or slot is read before it is overwritten, and a slot's index entry
always describes the content it will hold once every queued copy has run.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Copies:
    """The copies one flush issues, in the order they were owed, consecutive ones of a
    kind batched: a spill owed before a load reads its block before the load overwrites
    it, and a load owed before a spill reads its slot before the spill overwrites it."""

    # ("load", [(host slot, device block), ...]) or ("spill", [(device block, host slot), ...])
    batches: list[tuple[str, list[tuple[int, int]]]] = field(default_factory=list)

    def add(self, kind: str, pair: tuple[int, int]) -> None:
        if not self.batches or self.batches[-1][0] != kind:
            self.batches.append((kind, []))
        self.batches[-1][1].append(pair)

    def __bool__(self) -> bool:
        return bool(self.batches)


class HostTier:
    def __init__(self, num_blocks: int):
        if num_blocks < 1:
            raise ValueError("a host tier needs at least one block")
        self.num_blocks = num_blocks
        self._key: list[bytes | None] = [None] * num_blocks  # slot -> the key it holds
        self._index: dict[bytes, int] = {}  # key -> slot
        self._head = 0  # the next slot a spill writes (the oldest content)
        self.pending = Copies()
        self.spills = 0  # blocks copied out
        self.hits = 0  # blocks found here and copied back
        self.evictions = 0  # keys overwritten by a newer spill

    @property
    def used_blocks(self) -> int:
        return len(self._index)

    def __contains__(self, h: bytes) -> bool:
        return h in self._index

    def spill(self, h: bytes, block: int) -> None:
        """Device block `block` (key `h`) is evicted: owe a copy of it into the oldest slot.
        A key the tier holds already costs nothing (its content is the same)."""
        if h in self._index:
            return
        slot = self._head
        self._head = (slot + 1) % self.num_blocks
        old = self._key[slot]
        if old is not None:
            del self._index[old]
            self.evictions += 1
        self._key[slot] = h
        self._index[h] = slot
        self.pending.add("spill", (block, slot))
        self.spills += 1

    def load(self, h: bytes, block: int) -> None:
        """Owe a copy of key `h`'s content into device block `block` (a fresh block the
        reserving job holds: nothing reads or writes it before the next flush)."""
        self.pending.add("load", (self._index[h], block))
        self.hits += 1

    def take(self) -> Copies:
        """The copies owed since the last flush, in the order they must run."""
        out, self.pending = self.pending, Copies()
        return out

    def check(self) -> None:
        """The invariants (tests): index and slots agree, each key once."""
        assert len(self._index) == sum(k is not None for k in self._key)
        for h, s in self._index.items():
            assert self._key[s] == h


def runs(pairs: list[tuple[int, int]], on: int) -> list[tuple[int, int, int]]:
    """(start, stop, first) for each run of `pairs` whose element `on` (0 or 1) counts up by
    one: a run is one contiguous copy."""
    out: list[tuple[int, int, int]] = []
    i = 0
    while i < len(pairs):
        j = i + 1
        while j < len(pairs) and pairs[j][on] == pairs[j - 1][on] + 1:
            j += 1
        out.append((i, j, pairs[i][on]))
        i = j
    return out


def worth_loading(num_blocks: int, block_bytes: int, copy_bytes_per_s: float,
                  copy_latency_s: float, prefill_s_per_block: float) -> bool:
    """A host hit is read back only when the copy is cheaper than the prefill it saves."""
    copy_s = copy_latency_s + num_blocks * block_bytes / copy_bytes_per_s
    return copy_s < num_blocks * prefill_s_per_block
