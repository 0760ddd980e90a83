"""Decode attention groups that persist across steps, each with its own key table.

Attention is where the running sequences' lengths meet: one batched call pads every row to
the longest in it, so rows are grouped (sequences that hold a prefix in the same KV blocks,
`worker.engine.cascades`; the rest by context length, `worker.engine.lanes`). A group's
attention call reads a key table: [G, W] KV slots and a [G, W] mask of the positions that
exist. Rebuilt every step, those tables are the largest host cost of a decode step (every
row's whole context, gathered). But between two steps a row's context grows by one token:
so each group keeps its tables, and a step writes one slot and one mask bit per row. A
table is `W` = a multiple of the block size wide, one to two blocks more than its longest
row, and is rebuilt when a row reaches its end (every 17-32 steps).

The tables of all groups live end to end in two flat buffers (a bump allocator: a table
rebuilt takes new room, the buffers are compacted when more than half is dead), so a
step's writes, for every row of every group, are one scatter into each buffer, whatever
the number of groups; each group's [G, W] tables are contiguous views of its region.

Membership changes where sequences join or leave. A row that leaves is dropped from its
group (the group's tables lose that row). Rows that join are grouped among themselves
until the next full regrouping, which runs at most every `REGROUP_STEPS` steps and only if
someone joined: a grouping stays valid as contexts grow (every row grows alike, so a
group's spread does not), and a group that loses members is still a valid group.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from worker.engine.blocks import SCRATCH_SLOT
from worker.engine.cascades import decode_groups
from worker.engine.lanes import group_by_length

if TYPE_CHECKING:
    from worker.engine.batch import DecodeBatch

REGROUP_STEPS = 8  # joiners wait in groups of their own at most this many steps
HEADROOM_BLOCKS = 2


@dataclass(slots=True, eq=False)
class Group:
    rows: np.ndarray  # [G] batch rows
    gens: np.ndarray  # [G] their owners' join numbers (a row reused is another sequence)
    shared: int  # leading tokens all hold in the same KV blocks (cascade), a block multiple
    off: int  # its tables' first element in the flat buffers
    width: int  # W: the tables are [G, W], positions shared .. shared + W
    prefix: np.ndarray | None  # [shared] the shared prefix's slots
    at: int = 0  # its first row in the flat order (`Groups.rows`)
    view: StepGroup | None = None  # how a step reads it whole (kept while the tables stay)
    view_w: int = 0  # the width that view reads: its longest row, rounded up to a block


@dataclass(slots=True)
class StepGroup:
    """One group as a step reads it: its rows `start..stop` of the step's decode order."""

    shared: int
    start: int
    stop: int
    kv: np.ndarray
    mask: np.ndarray
    prefix: np.ndarray | None
    # What a runner made of these tables (device tensors that are views of them, on the
    # CPU): valid while this StepGroup is, which is while the tables stay where they are.
    memo: dict = field(default_factory=dict)


class Groups:
    def __init__(self, batch: DecodeBatch):
        self.b = batch
        self.groups: list[Group] = []
        self.joined: list[tuple[int, int]] = []  # (row, gen) not grouped yet
        self.dirty = False  # a row left since the last update
        self.age = 0  # steps since the last full regrouping
        self._kv = np.zeros(1 << 16, dtype=np.int64)
        self._mask = np.zeros(1 << 16, dtype=np.bool_)
        self._used = 0  # the bump allocator's end
        self._flat()

    # -- membership ----------------------------------------------------------------------

    def update(self) -> None:
        """Bring the groups up to date with the batch, and write every row's newest
        position into its table, before a step reads them."""
        b = self.b
        self.age += 1
        changed = False
        if self.dirty:
            self.dirty = False
            kept = []
            for g in self.groups:
                keep = b.held[g.rows] & (b.gen[g.rows] == g.gens)
                if not keep.all():
                    changed = True
                    if not keep.any():
                        continue
                    g = self._build(g.rows[keep], g.shared)
                kept.append(g)
            self.groups = kept
        if self.joined:
            new = np.array([r for r, gen in self.joined if b.held[r] and b.gen[r] == gen],
                           dtype=np.int64)
            self.joined = []
            if len(new) and (self.age >= REGROUP_STEPS or not self.groups):
                self._regroup()
            elif len(new):
                ctx = b.ctx(new).tolist()
                self.groups += [self._build(new[g], 0) for g in group_by_length(ctx)]
            changed = changed or bool(len(new))
        if changed:
            self._flat()
        self._advance()
        if 2 * self.live < self._used and self._used > 1 << 16:
            self._compact()
            self._flat()

    def _regroup(self) -> None:
        """Every running row, grouped as `cascades.decode_groups` says."""
        b = self.b
        rows = np.flatnonzero(b.held)
        found = decode_groups([b.seqs[r] for r in rows.tolist()], b.ctx(rows).tolist(), b.bs)
        self._used = 0  # every table is rebuilt: the buffers start over
        self.groups = [self._build(rows[idx], shared) for shared, idx in found]
        self.age = 0

    # -- tables --------------------------------------------------------------------------

    def _build(self, rows: np.ndarray, shared: int) -> Group:
        """A group's tables, filled from the batch's slot table up to each row's context."""
        b = self.b
        lens = b.ctx(rows) - shared
        # Room to grow into: one to two blocks (a table outgrown is rebuilt, a wider one
        # costs the attention call masked keys).
        width = (int(lens.max()) // b.bs + HEADROOM_BLOCKS) * b.bs
        n = len(rows) * width
        if self._used + n > len(self._kv):  # grown in place: every offset stays valid
            size = 2 * (self._used + n)
            self._kv = np.concatenate((self._kv[:self._used], np.zeros(size - self._used,
                                                                       dtype=np.int64)))
            self._mask = np.concatenate((self._mask[:self._used],
                                         np.zeros(size - self._used, dtype=np.bool_)))
            for old in self.groups:
                old.view = None  # its views are of the old buffers
        g = Group(rows, b.gen[rows], shared, self._used, width,
                  b.slots[rows[0], :shared].copy() if shared else None)
        kv, mask = self.tables(g)
        cols = min(width, b.width - shared)
        mask[:] = np.arange(width)[None, :] < lens[:, None]
        kv[:, :cols] = b.slots[rows, shared:shared + cols]
        kv[:, cols:] = SCRATCH_SLOT
        kv[~mask] = SCRATCH_SLOT
        self._used += n
        return g

    def _compact(self) -> None:
        """The live tables moved to the front of new buffers (when more than half is dead)."""
        live = sum(len(g.rows) * g.width for g in self.groups)
        size = max(4 * live, 1 << 16)
        kv, mask, at = np.empty(size, dtype=np.int64), np.empty(size, dtype=np.bool_), 0
        for g in self.groups:
            n = len(g.rows) * g.width
            kv[at:at + n] = self._kv[g.off:g.off + n]
            mask[at:at + n] = self._mask[g.off:g.off + n]
            g.off, g.view = at, None
            at += n
        self._kv, self._mask, self._used = kv, mask, at

    def _view(self, g: Group, w: int) -> StepGroup:
        """How a step reads the group: its tables' first `w` columns (the growth room past
        its longest row is not attention's work)."""
        kv, mask = self.tables(g)
        g.view, g.view_w = StepGroup(g.shared, g.at, g.at + len(g.rows), kv[:, :w],
                                     mask[:, :w], g.prefix), w
        return g.view

    def tables(self, g: Group) -> tuple[np.ndarray, np.ndarray]:
        """A group's [G, W] KV slot and mask tables: views of its region of the buffers."""
        n = len(g.rows) * g.width
        return (self._kv[g.off:g.off + n].reshape(len(g.rows), g.width),
                self._mask[g.off:g.off + n].reshape(len(g.rows), g.width))

    def _flat(self) -> None:
        """Every grouped row, in group order: its row, and where position p of it lies in
        the flat buffers (`base + p`), up to `end` (its table row's end)."""
        at = 0
        for g in self.groups:
            g.at, g.view = at, None
            at += len(g.rows)
        parts = [(g.rows, g.off + np.arange(len(g.rows)) * g.width - g.shared, g.width)
                 for g in self.groups]
        self.rows = (np.concatenate([r for r, _, _ in parts]) if parts
                     else np.zeros(0, dtype=np.int64))
        self.base = (np.concatenate([base for _, base, _ in parts]) if parts
                     else np.zeros(0, dtype=np.int64))
        self.end = (np.concatenate([base + g.shared + w for (_, base, w), g
                                    in zip(parts, self.groups)]) if parts
                    else np.zeros(0, dtype=np.int64))
        self.seen = self.b.ctx(self.rows)
        self._starts = np.array([g.at for g in self.groups], dtype=np.int64)
        self._totals()

    def _totals(self) -> None:
        self.live = sum(len(g.rows) * g.width for g in self.groups)  # table elements in use

    def _advance(self) -> None:
        """Write each row's newest position (`ctx - 1`) into its table: one scatter. A
        table some row has outgrown (or, defensively, whose row grew by more than one
        position since) is rebuilt first."""
        b = self.b
        ctx = b.ctx(self.rows)
        at = self.base + ctx - 1
        bad = (at >= self.end) | (ctx - self.seen > 1)
        if bad.any():
            where = np.flatnonzero(bad)
            for i, g in enumerate(self.groups):
                a = g.at
                if ((where >= a) & (where < a + len(g.rows))).any():
                    g = self.groups[i] = self._build(g.rows, g.shared)
                    g.at = a
                    base = g.off + np.arange(len(g.rows)) * g.width - g.shared
                    self.base[a:a + len(g.rows)] = base
                    self.end[a:a + len(g.rows)] = base + g.shared + g.width
            self._totals()
            at = self.base + ctx - 1
        self._kv[at] = b.slots[self.rows, ctx - 1]
        self._mask[at] = True
        self.seen = ctx

    # -- a step --------------------------------------------------------------------------

    def step(self, rows: np.ndarray) -> tuple[np.ndarray, list[StepGroup], np.ndarray | None]:
        """`rows` (a plan's decode rows, all running) in group order, the groups as the
        step reads them (a group some of whose rows sit this step out: those rows' tables),
        and the rows' contexts when they are every running row (None: not computed)."""
        self.update()
        if len(rows) == len(self.rows):  # every running row (a plan's rows are running)
            bs, out = self.b.bs, []
            if self.groups:
                longest = np.maximum.reduceat(self.seen, self._starts).tolist()
            for g, n in zip(self.groups, longest if self.groups else ()):
                w = min(g.width, -(-(n - g.shared) // bs) * bs)
                out.append(g.view if g.view is not None and g.view_w == w else self._view(g, w))
            return self.rows, out, self.seen
        inp = np.zeros(self.b.cap, dtype=np.bool_)
        inp[rows] = True
        parts, out, at = [], [], 0
        for g in self.groups:
            sel = inp[g.rows]
            if not sel.any():
                continue
            r = g.rows[sel]
            kv, mask = self.tables(g)
            w = min(g.width, -(-(int(self.b.ctx(r).max()) - g.shared) // self.b.bs) * self.b.bs)
            parts.append(r)
            out.append(StepGroup(g.shared, at, at + len(r), kv[sel, :w], mask[sel, :w],
                                 g.prefix))
            at += len(r)
        order = np.concatenate(parts) if parts else rows[:0]
        if len(order) != len(rows):
            raise AssertionError(f"{len(rows)} decode rows, {len(order)} of them in groups")
        return order, out, None
