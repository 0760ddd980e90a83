"""Who owns which session partition: rendezvous hashing over the workers alive, with
bounded loads.

Every worker puts its id in the members KV bucket (`Topology.members_bucket`, whose entries
expire after `member_ttl_s`) every sixth of that TTL, and reads the bucket's keys back (one
stream-info request, not a watch: an entry that expires leaves no marker to watch). A
partition's owner is the member with the highest hash of (member, partition) -- rendezvous
hashing, as Kafka's sticky assignor and the cache-aware routers aim for: every worker
computes the same owners from the same list with no coordinator, a worker that joins takes
about 1/N of the partitions and moves nothing else, and one that leaves (or stops being
heard from) hands over only its own.

Loads: sessions hash to partitions unevenly (32 sessions over two workers split 13/19 as
often as not), and an owner keeps its sessions' turns in its own queue, where an idle
worker cannot take them. So each entry also carries the worker's recent work per
partition (decode rows of the jobs it pulled from it, a rate with a 4 s half-life; read
with one get per member each refresh), and
owners are assigned as consistent hashing with bounded loads does (Mirrokni, Thorup,
Zadimoghaddam 2018): the busiest partitions first, each to the first worker in its
rendezvous order that stays under `1 + LOAD_SLACK` times the mean load. A partition with
no recent work goes to its rendezvous owner, so a quiet fleet keeps plain rendezvous
hashing. The loads are the traffic's, not the owners', so an assignment does not feed
back into the next one.

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
import time
from collections.abc import Callable, Mapping, Sequence

import structlog

from worker.broker.topology import Topology

log = structlog.get_logger("members")


LOAD_SLACK = 0.25  # a worker may carry 1.25x the mean load before a partition moves off it
LOAD_HALF_LIFE_S = 4.0


def ranked(partition: int, members: Sequence[str]) -> list[str]:
    """The members in `partition`'s rendezvous order, most preferred first."""
    def weight(m: str) -> bytes:
        return hashlib.blake2b(f"{m}/{partition}".encode(), digest_size=8).digest()
    return sorted(members, key=weight, reverse=True)


def owner(partition: int, members: Sequence[str]) -> str | None:
    """The member that owns `partition` by rendezvous hashing alone; None with no members."""
    order = ranked(partition, members)
    return order[0] if order else None


def assign(members: Sequence[str], partitions: int,
           loads: Mapping[int, float] | None = None) -> dict[int, str]:
    """Every partition's owner: rendezvous hashing with bounded loads (see the top)."""
    if not members:
        return {}
    loads = loads or {}
    busy = sorted((k for k in range(partitions) if loads.get(k, 0.0) > 0),
                  key=lambda k: (-loads[k], k))
    cap = (1 + LOAD_SLACK) * sum(loads[k] for k in busy) / len(members)
    carried = dict.fromkeys(members, 0.0)
    out: dict[int, str] = {}
    for k in busy:
        order = ranked(k, members)
        fits = [m for m in order if carried[m] + loads[k] <= cap]
        m = fits[0] if fits else min(order, key=lambda m: carried[m])
        out[k] = m
        carried[m] += loads[k]
    for k in range(partitions):
        if k not in out:
            out[k] = ranked(k, members)[0]
    return out


def owned(me: str, members: Sequence[str], partitions: int,
          loads: Mapping[int, float] | None = None) -> frozenset[int]:
    return frozenset(k for k, m in assign(members, partitions, loads).items() if m == me)


def member_key(worker_id: str) -> str:
    """A KV key for a worker id (keys take letters, digits and -_=.)."""
    return re.sub(r"[^-_=A-Za-z0-9]", "_", worker_id)


class Membership:
    """This worker's entry in the members bucket, and the partitions it owns by it."""

    def __init__(self, nc, js, topo: Topology, worker_id: str, partitions: int,
                 on_change: Callable[[frozenset[int]], None],
                 work: Callable[[], Mapping[int, float]] = dict):
        self.nc, self.js, self.topo = nc, js, topo
        self.me = member_key(worker_id)
        self.partitions = partitions
        self.on_change = on_change
        self.members: tuple[str, ...] = ()
        self.owned: frozenset[int] = frozenset()  # by the latest refresh
        self.pulls: frozenset[int] = frozenset()  # what on_change was told: owned | previous
        self.work = work  # this worker's work per partition so far (a counter)
        self._work_seen: dict[int, float] = {}
        self._work_at = time.monotonic()
        self.rates: dict[int, float] = {}  # our work per partition per second, smoothed
        self._mine: dict[int, float] = {}  # the rates as our entry says them
        self.loads: dict[int, float] = {}  # the fleet's, summed from every entry
        # Six refreshes per TTL: a joiner is seen within a second, a dead worker after six
        # missed ones.
        self.refresh_s = topo.member_ttl_s / 6
        self._kv = None
        self.errors = 0

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
        self._measure()
        # Our own loads as the others read them (rounded), so every view computes alike.
        self._mine = {k: round(r, 3) for k, r in self.rates.items()}
        entry = {"worker": self.me, "loads": {str(k): v for k, v in self._mine.items()}}
        await self._kv.put(self.me, json.dumps(entry).encode())
        members = await self.read()
        if self.me not in members:
            members = tuple(sorted((*members, self.me)))
        self.loads = await self._read_loads(members)
        mine = owned(self.me, members, self.partitions, self.loads)
        if members != self.members:
            log.info("members_changed", members=list(members), owned=sorted(mine))
        elif mine != self.owned:  # the loads moved partitions: rare, unless they flap
            log.info("owners_changed", owned=sorted(mine),
                     gained=sorted(mine - self.owned), lost=sorted(self.owned - mine))
        self.members = members
        pulls = mine | self.owned
        self.owned = mine
        if pulls != self.pulls:
            self.pulls = pulls
            self.on_change(pulls)

    def _measure(self) -> None:
        """Fold the work done since the last refresh into the smoothed rates."""
        now = time.monotonic()
        dt, self._work_at = max(now - self._work_at, 1e-3), now
        keep = 0.5 ** (dt / LOAD_HALF_LIFE_S)
        work = self.work()
        for k in set(work) | set(self.rates):
            done = work.get(k, 0.0) - self._work_seen.get(k, 0.0)
            rate = keep * self.rates.get(k, 0.0) + (1 - keep) * done / dt
            if rate > 1e-3:
                self.rates[k] = rate
            else:
                self.rates.pop(k, None)
        self._work_seen = dict(work)

    async def _read_loads(self, members: Sequence[str]) -> dict[int, float]:
        loads: dict[int, float] = {}
        for m in members:
            if m == self.me:
                entry_loads = self._mine
            else:
                try:
                    e = await self._kv.get(m)
                    raw = json.loads(e.value or b"{}").get("loads") or {}
                    entry_loads = {int(k): float(v) for k, v in raw.items()}
                except Exception:  # noqa: BLE001 - gone since the list was read: no load
                    continue
            for k, v in entry_loads.items():
                loads[k] = loads.get(k, 0.0) + v
        return loads

    async def read(self) -> tuple[str, ...]:
        prefix = f"$KV.{self.topo.members_bucket}."
        resp = await self.nc.request(f"{self.topo.api_prefix}.STREAM.INFO.{self._stream}",
                                     json.dumps({"subjects_filter": prefix + ">"}).encode(),
                                     timeout=5)
        subjects = (json.loads(resp.data).get("state") or {}).get("subjects") or {}
        return tuple(sorted(s[len(prefix):] for s in subjects))

    async def leave(self, timeout_s: float = 0.5) -> None:
        """Stopping: delete our entry outright (a KV delete would leave a marker behind),
        so the others take our partitions now rather than after the TTL."""
        try:
            await asyncio.wait_for(self.js.purge_stream(
                self._stream, subject=f"$KV.{self.topo.members_bucket}.{self.me}"), timeout_s)
        except Exception as e:  # noqa: BLE001 - then it expires after the TTL
            log.warning("members_leave_failed", error=repr(e))
