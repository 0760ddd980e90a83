"""Cascades: which sequences attend to a prefix they hold in the same KV blocks as one group.

Rule: sharing is physical -- the block pool gave them the same blocks for the same prefix --
so a group is read off the block ids (`shared_prefixes`), and it is split where padding its
members' tails to the longest would cost more than reading the prefix again
(`by_tail_length`). The runner builds one attention call per group.
"""

from __future__ import annotations

from worker.engine.lanes import group_by_length
from worker.engine.sequence import Sequence


# Splitting a cascade group costs another gather of its prefix's keys and another attention
# call; keeping it whole costs the padding of short tails to the longest. Groups of similar
# tails (`group_by_length`) stay apart only while merging them would add more padded query x
# key pairs than this many per shared token, plus one call's worth.
_MERGE_PAIRS_PER_SHARED_TOKEN = 4
_MERGE_PAIRS_PER_CALL = 4096
# A decode cascade (the shared prefix read once for the group, merged by log-sum-exp) costs
# an attention call and a merge; it saves gathering the prefix's keys for every member but
# one. Measured on the CPU (builtin:small, 12 sessions on two system prompts, decode ms a
# step, cascade vs none): 160-token prefixes 11.0 vs 9.4, 480 12.0 vs 13.1, 960 13.8 vs
# 26.0. So a decode group is a cascade only where shared tokens x (members - 1) reach this.
DECODE_CASCADE_MIN_SAVED = 2048


def decode_groups(seqs: list[Sequence], ctx: list[int], block_size: int
                  ) -> list[tuple[int, list[int]]]:
    """Decode rows' attention groups [(shared tokens, indices)]: cascades worth their merge
    (split by tail length), then the rest by context length. `ctx`: each row's keys, itself
    included (blocks below its own token are written, so a prefix there can be shared)."""
    found = [(shared, idx) for shared, idx in
             by_tail_length(shared_prefixes(seqs, [n - 1 for n in ctx], block_size), ctx,
                            block_size)
             if shared * (len(idx) - 1) >= DECODE_CASCADE_MIN_SAVED]
    taken = {i for _, idx in found for i in idx}
    rest = [i for i in range(len(seqs)) if i not in taken]
    return found + [(0, [rest[j] for j in g]) for g in group_by_length([ctx[i] for i in rest])]


def by_tail_length(cascades: list[tuple[int, list[int]]], lengths: list[int],
                   block_size: int) -> list[tuple[int, list[int]]]:
    """Cascade groups [(shared tokens, indices)] split where their members' own keys after
    the prefix differ so much in length that padding the short to the long would cost more
    than reading the prefix again: one system prompt under conversations of every length
    must not put them all in one call, while sessions over a long shared prompt stay
    together. Members left alone by the split are dropped (they attend as usual)."""
    out = []
    for p, idx in cascades:
        shared = p * block_size
        tails = [lengths[i] - shared for i in idx]
        limit = _MERGE_PAIRS_PER_SHARED_TOKEN * shared + _MERGE_PAIRS_PER_CALL
        merged: list[list[int]] = []
        for g in group_by_length(tails):  # longest tails first
            if merged:
                head = max(tails[j] for j in merged[-1])
                if sum(head - tails[j] for j in g) <= limit:
                    merged[-1] += g
                    continue
            merged.append(g)
        out += [(shared, [idx[j] for j in g]) for g in merged if len(g) >= 2]
    return out


def shared_prefixes(seqs: list[Sequence], limits: list[int], block_size: int,
                    min_blocks: int = 2) -> list[tuple[int, list[int]]]:
    """Groups of sequences that hold their first KV blocks in common: [(blocks, indices)].

    Sharing is physical: the block pool gave them the same blocks for the same prefix. A
    sequence takes part only with blocks wholly below `limits[i]` (positions it may read as
    already written); a group needs two members and `min_blocks` blocks in common."""
    by_first: dict[int, list[int]] = {}
    for i, s in enumerate(seqs):
        if s.blocks and limits[i] >= min_blocks * block_size:
            by_first.setdefault(s.blocks[0], []).append(i)
    out = []
    for idx in by_first.values():
        if len(idx) < 2:
            continue
        cap = min(limits[i] // block_size for i in idx)
        ref = seqs[idx[0]].blocks
        p = 1
        while p < cap and all(seqs[i].blocks[p] == ref[p] for i in idx):
            p += 1
        if p >= min_blocks:
            out.append((p, idx))
    return out
