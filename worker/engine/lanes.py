"""FEED lanes: sequences of similar length share one attention call, so padding stays bounded.

The dense layers run on packed tokens and never pad. Attention is where lengths meet: a
batched attention call pads every sequence to the longest in it. So sequences are grouped
by length: prompts into lanes keyed by their length bucket for prefill, running sequences
into groups of similar context length for decode. A bucket's width grows with the length
(16 tokens, or 1/8 of the length beyond 128), which bounds padding at about 12% of the
attention work of a group, and never more than the lane width in tokens.
"""

from __future__ import annotations

LANE_MIN_WIDTH = 16  # tokens; also the KV block size, so a lane is a whole number of blocks


def lane_width(num_tokens: int) -> int:
    return max(LANE_MIN_WIDTH, (num_tokens // 8) // LANE_MIN_WIDTH * LANE_MIN_WIDTH)


def lane_of(num_tokens: int) -> int:
    """The lane key: the padded length (upper edge of the bucket) this prompt belongs to."""
    w = lane_width(num_tokens)
    return -(-num_tokens // w) * w


def group_by_length(lengths: list[int]) -> list[list[int]]:
    """Split indices into groups whose lengths fit one lane width of the group's longest.

    Returns index lists, each sorted by length; a group's longest minus its shortest is
    below `lane_width(longest)`.
    """
    order = sorted(range(len(lengths)), key=lengths.__getitem__, reverse=True)
    groups: list[list[int]] = []
    for i in order:
        if groups:
            head = lengths[groups[-1][0]]  # the longest of the current group
            if head - lengths[i] < lane_width(head):
                groups[-1].append(i)
                continue
        groups.append([i])
    return groups
