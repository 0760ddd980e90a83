"""The host tier: KV blocks the device pool evicts, kept in pinned host memory by content key.

Rule: the tier is a ring of `num_blocks` host blocks written in the order the device pool
is about to evict (its least recently used end), so its own eviction is first in, first
out: the device's LRU order one tier down, with every batch of copies landing in
consecutive slots (one copy per run, `runs`). It is inclusive: a block read back to the
device keeps its host copy, so evicting it again costs no second copy.

Write-back ahead: each step the pool copies a few cached blocks next in line for eviction
to the tier before they are evicted (`write_back`, the `ahead` batch), so that evicting
them later costs bookkeeping only. A block evicted before it was written back is copied
out then (`spill`, the `pending` batch): those copies the step that reuses the block waits
for; the ones written ahead it waits for only if they have not finished by then.

This module is the bookkeeping only, plain data under the block pool's lock: which key
lives in which slot, and the copies owed. The pool hands them to a copier
(`worker.engine.kv.TierCopier`) once per step, in the order they were owed, on one
stream, so a block or slot is read before it is overwritten, and a slot's index entry
always describes the content it will hold once every queued copy has run. Every batch has
a number (`Copies.mark`, rising in issue order): a step waits for a batch by its number.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class Copies:
    """One batch of copies, in the order they were owed, consecutive ones of a kind
    grouped: a spill owed before a load reads its block before the load overwrites it, and
    a load owed before a spill reads its slot before the spill overwrites it."""

    mark: int  # its number: batches are issued in rising order on one stream
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
        self._head = 0  # the next slot a copy out writes (the oldest content)
        # Owed by reservations (spills at eviction, loads), then written ahead by the flush:
        # issued in that order, so `ahead` has the higher mark.
        self.pending = Copies(1)
        self.ahead = Copies(2)
        self.spills = 0  # blocks copied out when they were evicted (on the critical path)
        self.written_ahead = 0  # blocks copied out before their eviction (off it)
        self.hits = 0  # blocks found here and copied back
        self.evictions = 0  # keys overwritten by a newer copy out

    @property
    def used_blocks(self) -> int:
        return len(self._index)

    def __contains__(self, h: bytes) -> bool:
        return h in self._index

    def spill(self, h: bytes, block: int) -> bool:
        """Device block `block` (key `h`) is evicted: owe a copy of it into the oldest slot.
        False, and no copy, if the tier holds the key already (written ahead, or read back)."""
        if h in self._index:
            return False
        self.pending.add("spill", (block, self._slot_for(h)))
        self.spills += 1
        return True

    def write_back(self, h: bytes, block: int) -> None:
        """Owe a copy of cached device block `block` (key `h`, not held here) ahead of its
        eviction; the block keeps its content and key until then."""
        self.ahead.add("spill", (block, self._slot_for(h)))
        self.written_ahead += 1

    def _slot_for(self, h: bytes) -> int:
        slot = self._head
        self._head = (slot + 1) % self.num_blocks
        old = self._key[slot]
        if old is not None:
            del self._index[old]
            self.evictions += 1
        self._key[slot] = h
        self._index[h] = slot
        return slot

    def load(self, h: bytes, block: int) -> int:
        """Owe a copy of key `h`'s content into device block `block` (a fresh block the
        reserving job holds: nothing reads or writes it before the next flush). Returns the
        mark of the batch that carries it."""
        self.pending.add("load", (self._index[h], block))
        self.hits += 1
        return self.pending.mark

    def take(self) -> tuple[Copies, Copies]:
        """The copies owed since the last flush and those written ahead, in issue order."""
        out = self.pending, self.ahead
        mark = self.ahead.mark
        self.pending, self.ahead = Copies(mark + 1), Copies(mark + 2)
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
    """The load-or-recompute rule: a run of `num_blocks` host hits is read back only when
    its copy (a fixed latency, then the bytes at the link's rate) takes less time than
    prefilling the same tokens would. Both grow with the run, the copy from a fixed start:
    below some length a recompute is cheaper, and the pool recomputes (`min_load_blocks`)."""
    copy_s = copy_latency_s + num_blocks * block_bytes / copy_bytes_per_s
    return copy_s < num_blocks * prefill_s_per_block
