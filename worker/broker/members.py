"""Who owns which session partition: rendezvous hashing over the workers alive, capped so
that each owns its share (`owners`).

Every worker puts its id in the members KV bucket (`Topology.members_bucket`, whose entries
expire after `member_ttl_s`) every sixth of that TTL, under its pool's scope
(`<jobs stream>.<consumer>.m.<worker>`: pools of other streams or consumers on the same broker
share the bucket, not the owners), and reads its scope's keys back (one stream-info request,
not a watch: an entry that expires leaves no marker to watch). A
partition's owner is the member with the highest hash of (member, partition) -- rendezvous
hashing, as Kafka's sticky assignor and the cache-aware routers aim for: every worker
computes the same owners from the same list with no coordinator, a worker that joins takes
about 1/N of the partitions (and a few move between the others as the caps fall), and one
that leaves (or stops being heard from) hands over its own.

Not balanced by load: a version that carried each worker's recent work per partition and
placed partitions as consistent hashing with bounded loads does flapped -- each worker
computes from its own fresh rates and the others' second-old ones, so on bursty session
traffic the views disagreed and partitions moved back and forth every refresh, each move
a recomputed history -- and it showed no gain in the fleet runs
(`docs/bench/README.md`, issue 26). Load is left to the overflow bound (the ingress).

Views can disagree for one refresh (about a second): a partition then has two owners
(both pull it freely) or none. A worker keeps pulling freely a partition it owned at the
last refresh for one more (`owned | previous`), so a partition that moves has two owners
for a moment rather than none. Either costs some cache hits and loses nothing: which
worker pulls a job never decides whether it runs once. A worker that stops cleanly
deletes its entry, so its partitions move at once.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Callable, Sequence

import structlog

from worker.broker.topology import Topology, api_call

log = structlog.get_logger("members")


def _weight(m: str, partition: int) -> bytes:
    return hashlib.blake2b(f"{m}/{partition}".encode(), digest_size=8).digest()


def preferred(partition: int, members: Sequence[str]) -> str | None:
    """The member that `partition` hashes to (plain rendezvous); None with no members."""
    return max(members, key=lambda m: _weight(m, partition), default=None)


def owners(members: Sequence[str], partitions: int) -> list[str | None]:
    """Each partition's owner: rendezvous hashing with a cap, `ceil(partitions / members)`
    each. A member its partitions hash to beyond the cap keeps the ones it weighs highest
    and hands the others to their next choice with room. Plain rendezvous left one of two
    workers 5 partitions of 16 in three runs out of three, and with sessions that serve
    one turn at a time the other worker's backlog never spills (`docs/bench/README.md`).
    Same list, same owners on every worker; a joiner takes its share and a few move
    between the others to make room (the caps change), a leaver's go to their next choice."""
    members = sorted(set(members))
    out: list[str | None] = [preferred(k, members) for k in range(partitions)]
    if not members:
        return out
    cap = -(-partitions // len(members))
    mine: dict[str, list[int]] = {m: [] for m in members}
    for k, m in enumerate(out):
        mine[m].append(k)
    loose: list[int] = []
    for m in members:
        if len(mine[m]) > cap:
            keep = sorted(mine[m], key=lambda k: _weight(m, k), reverse=True)
            loose += keep[cap:]
            mine[m] = keep[:cap]
    for k in sorted(loose):
        m = max((m for m in members if len(mine[m]) < cap), key=lambda m: _weight(m, k))
        mine[m].append(k)
        out[k] = m
    return out


def owned(me: str, members: Sequence[str], partitions: int) -> frozenset[int]:
    return frozenset(k for k, m in enumerate(owners(members, partitions)) if m == me)


def member_key(worker_id: str) -> str:
    """A KV key for a worker id: letters, digits and -_= kept, anything else `_` (a dot
    would make the key two subject tokens)."""
    return re.sub(r"[^-_=A-Za-z0-9]", "_", worker_id)


class Membership:
    """This worker's entry in the members bucket, and the partitions it owns by it."""

    def __init__(self, nc, js, topo: Topology, worker_id: str, partitions: int,
                 on_change: Callable[[frozenset[int]], None]):
        self.nc, self.js, self.topo = nc, js, topo
        self.me = member_key(worker_id)
        self.partitions = partitions
        self.on_change = on_change
        self.members: tuple[str, ...] = ()
        self.owned: frozenset[int] = frozenset()  # by the latest refresh
        self.pulls: frozenset[int] = frozenset()  # what on_change was told: owned | previous
        # Six refreshes per TTL: a joiner is seen within a second, a dead worker after six
        # missed ones.
        self.refresh_s = topo.member_ttl_s / 6
        self._kv = None
        self.errors = 0
        # Two pools on one broker (another jobs stream, or another consumer on this one)
        # must not own each other's partitions: keys are scoped by both.
        self.scope = f"{topo.jobs_stream}.{topo.consumer}"
        self._lock = asyncio.Lock()  # a refresh's put and leave's purge never cross
        self._left = False

    @property
    def _stream(self) -> str:
        return f"KV_{self.topo.members_bucket}"

    async def join(self) -> bool:
        """Put our entry and learn the owners, before the first pull. False when the bucket
        cannot be reached (through a leaf node its subjects stay in the leaf's domain):
        then nobody owns anything here and this worker pulls every partition freely."""
        try:
            self._kv = await self.js.key_value(self.topo.members_bucket)
            await self.refresh()
            return True
        except Exception as e:  # noqa: BLE001 - a fleet without owners still serves all
            log.warning("members_unavailable", error=repr(e),
                        hint="session partitions are served by all workers alike")
            return False

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.refresh_s)
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - a broker hiccup: keep what we had
                self.errors += 1
                if self.errors == 1 or self.errors % 20 == 0:
                    log.warning("members_refresh_failed", error=repr(e), count=self.errors)

    async def refresh(self) -> None:
        async with self._lock:
            if not self._left:
                await self._refresh()

    async def _refresh(self) -> None:
        await self._kv.put(f"{self.scope}.m.{self.me}", json.dumps({"worker": self.me}).encode())
        members = await self.read()
        if self.me not in members:
            members = tuple(sorted((*members, self.me)))
        mine = owned(self.me, members, self.partitions)
        if members != self.members:
            log.info("members_changed", members=list(members), owned=sorted(mine))
        self.members = members
        pulls = mine | self.owned
        self.owned = mine
        if pulls != self.pulls:
            self.pulls = pulls
            self.on_change(pulls)

    async def read(self) -> tuple[str, ...]:
        prefix = f"$KV.{self.topo.members_bucket}.{self.scope}.m."
        resp = await api_call(self.nc, f"{self.topo.api_prefix}.STREAM.INFO.{self._stream}",
                              {"subjects_filter": prefix + ">"})
        subjects = (resp.get("state") or {}).get("subjects") or {}
        return tuple(sorted(s[len(prefix):] for s in subjects))

    async def leave(self, timeout_s: float = 0.5) -> None:
        """Stopping: delete our entry outright (a KV delete would leave a marker behind),
        so the others take our partitions now rather than after the TTL. No refresh puts it
        back: `run` keeps going until teardown ends, and before this lock and flag its next
        put undid the purge, so a stopped worker's partitions waited out the TTL unowned."""
        subject = f"$KV.{self.topo.members_bucket}.{self.scope}.m.{self.me}"
        try:
            async with asyncio.timeout(timeout_s):
                async with self._lock:
                    self._left = True
                    await self.js.purge_stream(self._stream, subject=subject)
        except Exception as e:  # noqa: BLE001 - then it expires after the TTL
            self._left = True
            log.warning("members_leave_failed", error=repr(e))
