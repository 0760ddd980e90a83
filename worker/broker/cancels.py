"""Cancellation: producers withdraw jobs by id on a core NATS subject every worker hears.

A cancel message is `{"ids": [...]}` (a JSON object or a msgpack map, as jobs are). Every
worker subscribes (no queue group: a job may be held by any of them, or not delivered yet),
ends what it holds of those ids at the next step boundary, and remembers the ids, so a job
delivered after its cancel is answered `cancelled` without device time. The memory lasts
as long as the results stream's duplicate window (after that a replayed job's Result would
be a new message anyway) and holds a bounded number of ids, oldest forgotten first.

Pure apart from the clock the caller passes: no I/O.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterable

import msgpack

from schemas import is_json
from schemas.models import ID_PATTERN, MAX_ID_CHARS

MAX_IDS = 1024  # per cancel message: a producer withdrawing more sends more messages
MAX_REMEMBERED = 100_000  # ids remembered for jobs not delivered yet, across all messages
_MAX_CANCEL_BYTES = MAX_IDS * (MAX_ID_CHARS + 8) + 64

_ID_CHARS = frozenset(range(0x21, 0x7F))  # ID_PATTERN: printable ASCII, no spaces
assert ID_PATTERN == r"^[!-~]+$"  # the rule above mirrors the wire model's


class CancelError(ValueError):
    """A cancel message that is not `{"ids": [job id, ...]}` within the bounds."""


def parse_cancel(data: bytes) -> list[str]:
    """The job ids a cancel message names (deduplicated, in order), or CancelError."""
    if len(data) > _MAX_CANCEL_BYTES:
        raise CancelError(f"cancel message of {len(data)} bytes; at most {MAX_IDS} ids a message")
    try:
        body = json.loads(data) if is_json(data) else msgpack.unpackb(data, raw=False)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is the producer's
        raise CancelError(f"not a JSON object or msgpack map: {str(exc)[:120]}") from None
    if not isinstance(body, dict) or set(body) != {"ids"}:
        raise CancelError('a cancel message is {"ids": [job id, ...]} and nothing else')
    ids = body["ids"]
    if not isinstance(ids, list) or not ids:
        raise CancelError('"ids" must be a non-empty list of job ids')
    if len(ids) > MAX_IDS:
        raise CancelError(f"{len(ids)} ids in one cancel message; at most {MAX_IDS}")
    for i in ids:
        if not (isinstance(i, str) and 0 < len(i) <= MAX_ID_CHARS
                and all(ord(c) in _ID_CHARS for c in i)):
            raise CancelError(f"ids must be job ids (printable ASCII, 1-{MAX_ID_CHARS} "
                              f"characters): {str(i)[:40]!r}")
    return list(dict.fromkeys(ids))


class Cancelled:
    """The ids cancelled in the last `window_s` seconds, at most `capacity` of them."""

    def __init__(self, window_s: float, capacity: int = MAX_REMEMBERED):
        self.window_s = window_s
        self.capacity = capacity
        self._until: OrderedDict[str, float] = OrderedDict()  # id -> forget at, oldest first

    def add(self, ids: Iterable[str], now: float) -> None:
        for i in ids:
            self._until.pop(i, None)
            self._until[i] = now + self.window_s
        while len(self._until) > self.capacity:
            self._until.popitem(last=False)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._until

    def forget_expired(self, now: float) -> None:
        while self._until:
            first, until = next(iter(self._until.items()))
            if until > now:
                return
            del self._until[first]

    def __len__(self) -> int:
        return len(self._until)
