"""KV blocks as plain data: the budget's unit, and the pool that hands blocks out by content.

A job reserves, when it is admitted, every block its padded length can ever need (prompt +
max_new_tokens, rounded up to the block size) and returns them when it ends, so the step
loop never allocates and never runs out. The pool is sized by memory, not by the budget:
admission keeps the blocks *held* under `token_budget` (`reserve(limit=)`), and every block
beyond what in-flight jobs hold is cache.

Blocks are content-addressed. A full block's key chains its parent's key with its own token
ids (`block_hashes`), so equal prefixes map to equal keys; a job's reservation takes every
leading block whose key the pool already knows -- held by another job or kept after its
job ended -- and counts only what it adds. Blocks are reference-counted: a block whose
count falls to zero keeps its content and its key (cached, evictable) until its space is
needed. A block reserved but not yet computed carries its key too, so jobs admitted
together share a prefix that nobody has computed yet: the first one scheduled computes it,
the others read it (`ready` says which blocks hold their KV).

Eviction keeps what is likely to come back: keyed blocks form a tree (a block is keyed only
under its own job's keyed parent), and only a leaf -- a cached block no keyed block hangs
from -- is evicted, least recently used first, so a chain is cut from its end, never in the
middle, and a held block is never evicted. With a host tier (`worker.engine.hosttier`) an
evicted block's content is copied out, and a reservation that runs past the device's keys
into the tier's takes fresh blocks and has the copies brought back (`flush`, once a step,
before the step that reads or overwrites them). The copy out is mostly done ahead: each
flush writes back a few cached blocks at the LRU end (`write_back_blocks`), so that their
eviction costs no copy, and the step waits only for copies it depends on: a load it may
read, a copy out of a block it may overwrite (`flush`'s `wait`).

Thread-safe: admission (the event loop) reserves, the executor thread marks blocks ready,
registers blocks of generated tokens, flushes and releases; one lock, held for microseconds.
No torch here: the broker side sizes jobs with `padded_tokens` and hashes prompts with
`block_hashes`, and the pool is tested without a device.
"""

from __future__ import annotations

import hashlib
import itertools
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # the tier is handed in: the broker side loads blocks without it
    from worker.engine.hosttier import Copies, HostTier


# KV slot 0 lies in block 0, which no job holds: rows that are padding, never a real token,
# write their KV there, and a masked key may point there (`KVPool.SCRATCH_SLOT`).
SCRATCH_SLOT = 0


# Blocks written back ahead a step, at most (one contiguous copy: they take consecutive host
# slots). 8 blocks are 128 tokens: twice what a decode step of 64 sequences writes, so decode
# stretches build a lead; a step that admits long prompts may evict more than the lead, and
# those blocks are copied out at eviction (counted apart). Only the cached blocks within
# `WRITE_BACK_WINDOW` of eviction, counting the empty blocks first, are candidates: what
# the next reservations would evict, not the whole cache (a tier smaller than the device
# cache would otherwise fill with copies of blocks the device keeps), and a step's scan for
# them stays short.
WRITE_BACK_BLOCKS = 8
WRITE_BACK_WINDOW = 256


def blocks_for(num_tokens: int, block_size: int) -> int:
    return -(-num_tokens // block_size)


def padded_tokens(num_tokens: int, block_size: int) -> int:
    """The budget's unit: tokens rounded up to whole KV blocks."""
    return blocks_for(num_tokens, block_size) * block_size


def block_hashes(tokens: Sequence[int], block_size: int, parent: bytes = b"",
                 start: int = 0) -> list[bytes]:
    """Content keys of the full blocks of `tokens` from block `start` on (`parent`: the key
    of block `start - 1`). 16-byte BLAKE2b: a collision would hand a job another prompt's
    KV, so the key is a cryptographic digest, not Python's 64-bit hash."""
    ids = np.asarray(tokens, dtype=np.int64).astype(np.int32, copy=False)
    out: list[bytes] = []
    for i in range(start, len(ids) // block_size):
        parent = hashlib.blake2b(parent + ids[i * block_size:(i + 1) * block_size].tobytes(),
                                 digest_size=16).digest()
        out.append(parent)
    return out


class OutOfBlocks(RuntimeError):
    """Admission let in more than the pool holds: a bug upstream, fatal by design."""


@dataclass(frozen=True, slots=True)
class Reservation:
    blocks: tuple[int, ...]  # every block the job may use, in position order
    shared: int  # leading blocks found by content (cached, or held by another job)
    added: int  # blocks it took from the free pool: what it costs the budget


class BlockPool:
    """Block ids `first .. first + num_blocks - 1`; id 0 stays scratch (padding rows write
    there and nothing reads it as a real key).

    Every block is in exactly one state: held (reference count above zero), cached (zero,
    with content and key: evictable once a leaf, least recently used first) or empty (zero,
    no content).
    """

    def __init__(self, num_blocks: int, block_size: int, first: int = 1, caching: bool = True,
                 tier: HostTier | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.caching = caching  # off: no keys are kept, every job computes its whole prompt
        self.tier = tier if caching else None  # evicted blocks' second home (GPU workers)
        # Given a flush's copies (owed, written ahead) and the mark the step waits for,
        # issues them (worker.engine.kv.TierCopier); set with a tier.
        self.copier: Callable[[Copies, Copies, int], None] | None = None
        self.min_load_blocks = 1  # a host hit shorter than this is recomputed instead
        self.write_back_blocks = WRITE_BACK_BLOCKS  # 0: copy out at eviction only
        self.write_back_window = WRITE_BACK_WINDOW
        end = first + num_blocks
        self._ref = [0] * end
        self._key: list[bytes | None] = [None] * end
        self._parent = [-1] * end  # a keyed block's parent block (-1: the chain's first)
        self._kids = [0] * end  # keyed blocks whose parent this block is
        self.ready = [False] * end  # the block's KV has been written (a launched step did)
        self._index: dict[bytes, int] = {}  # key -> block
        self._empty = list(range(end - 1, first - 1, -1))  # LIFO: recently freed first
        self._cached: OrderedDict[int, None] = OrderedDict()  # oldest first
        self._owner: dict[int, tuple[int, ...]] = {}  # job key -> its blocks
        self._lock = threading.Lock()
        # Copies not yet waited for: a block -> the mark of the batch copying it out, and
        # the highest mark the next step must wait for (0: none).
        self._out: dict[int, int] = {}
        self._wait = 0
        self.evictions = 0  # cached blocks whose space was taken for another job
        self.hit_blocks = 0  # blocks reservations found by content on the device

    # -- reading (any thread; a stale value at worst) ------------------------------------

    @property
    def used_blocks(self) -> int:
        """Held by at least one job: what the budget counts."""
        return self.num_blocks - len(self._empty) - len(self._cached)

    @property
    def cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def empty_blocks(self) -> int:
        return len(self._empty)

    @property
    def free_blocks(self) -> int:
        """Empty or evictable."""
        return len(self._empty) + len(self._cached)

    def holders(self) -> int:
        return len(self._owner)

    def blocks_of(self, key: int) -> tuple[int, ...]:
        return self._owner[key]

    # -- admission (event loop) ----------------------------------------------------------

    def _hits(self, hashes: Sequence[bytes], n_blocks: int) -> tuple[list[int], int]:
        """The leading blocks found on the device, and how many keys after them the host
        tier holds (0 when that run is too short to be worth its copy)."""
        hits: list[int] = []
        if not self.caching:
            return hits, 0
        hashes = hashes[:n_blocks]
        for h in hashes:
            b = self._index.get(h)
            if b is None:
                break
            hits.append(b)
        host = 0
        # Past a block nobody has computed yet the tier's copies would sit under unwritten
        # KV: what is ready stays a prefix of every chain.
        if self.tier is not None and (not hits or self.ready[hits[-1]]):
            for h in hashes[len(hits):]:
                if h not in self.tier:
                    break
                host += 1
        return hits, host if host >= self.min_load_blocks else 0

    def cost(self, hashes: Sequence[bytes], n_blocks: int) -> int:
        """Blocks a reservation of `n_blocks` would take out of the free pool now."""
        with self._lock:
            hits, _ = self._hits(hashes, n_blocks)
            return n_blocks - len(hits) + sum(1 for b in hits if self._ref[b] == 0)

    def reserve(self, key: int, hashes: Sequence[bytes], n_blocks: int,
                limit: int | None = None) -> Reservation | None:
        """Take `n_blocks` for job `key`, sharing every leading block whose content key is
        known. With `limit`, only if the blocks held afterwards stay within it (None: it
        would not fit). OutOfBlocks when the pool itself is short: a bug upstream."""
        with self._lock:
            if key in self._owner:
                raise ValueError(f"job {key} already holds blocks")
            hits, host = self._hits(hashes, n_blocks)
            revived = sum(1 for b in hits if self._ref[b] == 0)  # cached: leave the free pool
            fresh = n_blocks - len(hits)
            added = fresh + revived
            if limit is not None and self.used_blocks + added > limit:
                return None
            if fresh > self.free_blocks - revived:
                raise OutOfBlocks(f"need {fresh} blocks, {self.free_blocks - revived} free "
                                  f"of {self.num_blocks}")
            for b in hits:
                if self._ref[b] == 0:
                    del self._cached[b]
                self._ref[b] += 1
            blocks = hits + [self._take() for _ in range(fresh)]
            # Key the prompt's own full blocks now, computed or not: a job admitted after
            # this one shares them (and waits for them, or computes them first).
            for i in range(len(hits), min(len(hashes), n_blocks)):
                self._set_key(blocks, i, hashes[i])
            loaded = 0
            for i in range(len(hits), len(hits) + host):
                # Found in the host tier: its copy back is owed before anything reads it.
                # (This reservation's own evictions may have overwritten the ring's oldest.)
                if hashes[i] not in self.tier or self._key[blocks[i]] != hashes[i]:
                    break
                self._wait = max(self._wait, self.tier.load(hashes[i], blocks[i]))
                self.ready[blocks[i]] = True
                loaded += 1
            self._owner[key] = res = tuple(blocks)
            self.hit_blocks += len(hits)
            return Reservation(res, len(hits) + loaded, added)

    def _take(self) -> int:
        b = self._empty.pop() if self._empty else self._evict()
        self._ref[b] = 1
        self.ready[b] = False
        # Its new holder overwrites it: not before its copy out has read it.
        self._wait = max(self._wait, self._out.pop(b, 0))
        return b

    def _evict(self) -> int:
        """Free the least recently used leaf, its content copied to the host tier if any
        (unless it was written back ahead)."""
        b = next(b for b in self._cached if not self._kids[b])
        del self._cached[b]
        if self.tier is not None and self.tier.spill(self._key[b], b):
            self._out[b] = self.tier.pending.mark
        self._drop_key(b)
        self.evictions += 1
        return b

    def evict_cached(self) -> int:
        """Evict every cached block as a reservation would, leaves first (tests force
        evictions with it)."""
        with self._lock:
            n = len(self._cached)
            while self._cached:
                b = self._evict()
                self.ready[b] = False
                self._empty.append(b)
            return n

    def _set_key(self, blocks: Sequence[int], i: int, h: bytes) -> None:
        """Key `blocks[i]` with `h` if its own previous block carries its parent's key: a
        block under someone else's copy of its parent would outlive that parent."""
        b = blocks[i]
        parent = blocks[i - 1] if i else -1
        if (self.caching and h not in self._index and self._key[b] is None
                and (not i or self._key[parent] is not None)):
            self._key[b] = h
            self._index[h] = b
            self._parent[b] = parent
            if i:
                self._kids[parent] += 1

    def _drop_key(self, b: int) -> None:
        h = self._key[b]
        if h is not None:
            self._key[b] = None
            del self._index[h]
            if self._parent[b] >= 0:
                self._kids[self._parent[b]] -= 1
            self._parent[b] = -1

    # -- the executor --------------------------------------------------------------------

    def mark_ready(self, blocks: Sequence[int]) -> None:
        """These blocks' KV is written (the step that writes it has been launched)."""
        for b in blocks:
            self.ready[b] = True

    def register(self, blocks: Sequence[int], i: int, h: bytes) -> None:
        """Give a job's block `blocks[i]`, whose KV is written (generated tokens), its
        content key."""
        with self._lock:
            self.ready[blocks[i]] = True
            self._set_key(blocks, i, h)

    def flush(self) -> None:
        """Issue the host tier's copies (once a step, before the step is launched): those
        owed since the last flush, then a few written back ahead; and say which the step
        must wait for -- loads it may read, copies out of blocks it may overwrite."""
        if self.tier is None:
            return
        with self._lock:
            self._write_back()
            owed, ahead = self.tier.take()
            wait, self._wait = self._wait, 0
        if owed or ahead or wait:
            self.copier(owed, ahead, wait)

    def _write_back(self) -> None:
        """Owe copies of the cached blocks next in line for eviction that the tier lacks:
        at most `write_back_blocks`, within `write_back_window` of eviction (empty blocks
        go first)."""
        window = self.write_back_window - len(self._empty)
        n = self.write_back_blocks
        if window <= 0 or n <= 0:
            return
        tier, mark = self.tier, self.tier.ahead.mark
        for b in itertools.islice(self._cached, window):
            h = self._key[b]
            if h not in tier:
                tier.write_back(h, b)
                self._out[b] = mark
                n -= 1
                if not n:
                    return

    def release(self, key: int) -> int:
        """Return a job's blocks (idempotent). Blocks nobody holds any more keep their content
        as cached blocks if it was computed; the prefix goes to the cache last, so it is
        evicted last."""
        with self._lock:
            blocks = self._owner.pop(key, None)
            if blocks is None:
                return 0
            for b in reversed(blocks):
                self._ref[b] -= 1
                if self._ref[b] < 0:
                    raise AssertionError(f"block {b} released more often than held")
                if self._ref[b] == 0:
                    if self._key[b] is not None and self.ready[b]:
                        self._cached[b] = None
                    else:
                        self._drop_key(b)
                        self.ready[b] = False
                        self._empty.append(b)
            return len(blocks)

    def drop_cached(self) -> int:
        """Forget every cached block (their space becomes empty); held blocks are untouched."""
        with self._lock:
            n = len(self._cached)
            while self._cached:
                b, _ = self._cached.popitem(last=True)  # the newest first: children first
                self._drop_key(b)
                self.ready[b] = False
                self._empty.append(b)
            return n

    def check(self) -> None:
        """The invariants (tests): every block in exactly one state, keys consistent, keyed
        blocks a tree whose cached leaves alone may go."""
        with self._lock:
            held = {b for bs in self._owner.values() for b in bs}
            empty, cached = set(self._empty), set(self._cached)
            assert len(empty) == len(self._empty) and not (empty & cached)
            assert not (held & (empty | cached)), "a block both free and referenced"
            assert len(held | empty | cached) == self.num_blocks
            for b in range(len(self._ref)):
                assert self._ref[b] >= 0
                assert (self._ref[b] > 0) == (b in held), b
            refs: dict[int, int] = {}
            for bs in self._owner.values():
                for b in bs:
                    refs[b] = refs.get(b, 0) + 1
            assert all(self._ref[b] == n for b, n in refs.items())
            kids = [0] * len(self._ref)
            for h, b in self._index.items():
                assert self._key[b] == h
                p = self._parent[b]
                if p >= 0:
                    assert self._key[p] is not None, f"block {b}'s chain is cut above it"
                    assert self.ready[p] or not self.ready[b], f"block {b} ready, its parent not"
                    kids[p] += 1
            assert kids == self._kids
            for b in cached:
                assert self._key[b] is not None and self.ready[b], "cached without content"
            for b in empty:
                assert self._key[b] is None
            if self.tier is not None:
                self.tier.check()
                # A copy out is owed or issued: its mark is one the tier has handed out.
                assert all(0 < m <= self.tier.ahead.mark for m in self._out.values())
