"""Who owns which session partition: rendezvous hashing over the workers alive, capped so
that each owns its share (`owners`), then evened out by the sessions each carries, one
move at a time, by the first member (`rebalance`, `Membership._owners`).

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

Balanced by load through one snapshot (`rebalance`): each worker's entry carries the
sessions it pulled jobs of per partition in the last `LOAD_WINDOW_S` (`SessionLoads`); the
member first by name (the leader) reads them all, moves at most one partition a refresh
from the busiest worker to the idlest when that narrows their gap by `MIN_GAIN` sessions
or more (the same move seen at two refreshes in a row), and writes the owners to one key (`<scope>.owners`) that every member reads and
follows while its list of members is theirs. A partition that moved stays put for
`DWELL_S`. (A first version let every worker place partitions by load from its own fresh
figures and the others' second-old ones; the views disagreed on bursty traffic and
partitions moved back and forth every refresh. One writer cannot disagree with itself.)
Hash and cap alone left 32 like sessions split 13/19 and worse, and the worker with fewer
sat idle for the last third of the run (`docs/bench/README.md`, issue 26). Until the
leader has written owners for the current members (a join or a leave), every worker uses
the capped rendezvous owners, which need no snapshot.

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
from collections.abc import Callable, Sequence

import nats.js.errors
import structlog

from worker.broker.topology import Topology, api_call

log = structlog.get_logger("members")

LOAD_WINDOW_S = 10.0  # a session counts toward its partition's load this long after a job
DWELL_S = 30.0  # a partition that moved stays with its new owner at least this long
MIN_GAIN = 2  # a move must narrow the gap between two workers by this many sessions,
MIN_GAIN_SHARE = 0.05  # and by this share of a worker's mean (a move recomputes histories)


class SessionLoads:
    """The sessions this worker pulled jobs of, per partition, in the last window: its view
    of each partition's load. Counted in sessions, not tokens served: an agent session
    keeps one turn out at a time, so a worker with more sessions serves each of them more
    slowly at the same tokens/s -- what it serves says nothing of what waits on it."""

    def __init__(self, window_s: float = LOAD_WINDOW_S):
        self.window_s = window_s
        self._seen: dict[int, dict[str, float]] = {}

    def saw(self, partition: int, session: str, now: float) -> None:
        self._seen.setdefault(partition, {})[session] = now

    def counts(self, now: float | None = None) -> dict[int, int]:
        cut = (time.monotonic() if now is None else now) - self.window_s
        out: dict[int, int] = {}
        for k, seen in self._seen.items():
            for session in [x for x, t in seen.items() if t < cut]:
                del seen[session]
            if seen:
                out[k] = len(seen)
        return out


def rebalance(owner: Sequence[str | None], load: Sequence[int], members: Sequence[str],
              frozen: frozenset[int] = frozenset(),
              min_gain: int = MIN_GAIN) -> tuple[int, str, str] | None:
    """The one move (partition, from, to) that narrows the gap between the busiest member
    and the idlest the most, if it narrows it by `min_gain` or more and by `MIN_GAIN_SHARE`
    of a member's mean load (with hundreds of sessions a worker, a handful more or less
    is noise, and every move costs its sessions their cached histories); None otherwise.
    A partition in `frozen` (moved lately) stays. Loads that hold still converge: every
    move shrinks the spread, so nothing moves back and forth."""
    total = {m: 0 for m in members}
    for k, m in enumerate(owner):
        if m in total:
            total[m] += load[k]
    if len(total) < 2:
        return None
    min_gain = max(min_gain, MIN_GAIN_SHARE * sum(total.values()) / len(total))
    top = max(total.values())
    lo = min(total, key=lambda m: (total[m], m))
    gap = top - total[lo]
    best: tuple[int, int] | None = None
    for k, m in enumerate(owner):  # from any of the busiest (they may tie)
        if m in total and total[m] == top and k not in frozen and load[k] > 0:
            gain = gap - abs(gap - 2 * load[k])
            if gain >= min_gain and (best is None or gain > best[0]):
                best = (gain, k)
    return None if best is None else (best[1], owner[best[1]], lo)


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


def member_key(worker_id: str) -> str:
    """A KV key for a worker id: letters, digits and -_= kept, anything else `_` (a dot
    would make the key two subject tokens)."""
    return re.sub(r"[^-_=A-Za-z0-9]", "_", worker_id)


class Membership:
    """This worker's entry in the members bucket, and the partitions it owns by it."""

    def __init__(self, nc, js, topo: Topology, worker_id: str, partitions: int,
                 on_change: Callable[[frozenset[int]], None],
                 loads: Callable[[], dict[int, int]] = dict):
        self.nc, self.js, self.topo = nc, js, topo
        self.loads = loads  # this worker's sessions per partition (`SessionLoads.counts`)
        self.moved = 0  # partitions this worker moved while it led
        self._proposed: tuple[int, str, str] | None = None  # the move the last refresh saw
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
        self._heard_change = asyncio.Event()  # a member we do not know, or new owners
        self._own: list[str | None] = []  # every partition's owner, by the latest refresh
        self._sub = None

    @property
    def _stream(self) -> str:
        return f"KV_{self.topo.members_bucket}"

    async def join(self) -> bool:
        """Put our entry and learn the owners, before the first pull. False when the bucket
        cannot be reached (through a leaf node its subjects stay in the leaf's domain):
        then nobody owns anything here and this worker pulls every partition freely."""
        try:
            self._kv = await self.js.key_value(self.topo.members_bucket)
            # Every put is a message on its key's subject: hearing a member we do not know,
            # or owners other than ours, refresh now, not at the next tick -- the workers
            # there first would otherwise pull a joiner's partitions for up to a second,
            # and a partition the leader moved would have two owners as long.
            self._sub = await self.nc.subscribe(f"{self._prefix}>", cb=self._heard)
            await self.refresh()
            return True
        except Exception as e:  # noqa: BLE001 - a fleet without owners still serves all
            log.warning("members_unavailable", error=repr(e),
                        hint="session partitions are served by all workers alike")
            return False

    @property
    def _prefix(self) -> str:
        return f"$KV.{self.topo.members_bucket}.{self.scope}."

    def _key(self, member: str) -> str:
        """A member's entry in the bucket (`<scope>.m.<member>`)."""
        return f"{self.scope}.m.{member}"

    async def _heard(self, msg) -> None:
        key = msg.subject[len(self._prefix):]
        if key == "owners":
            try:
                changed = json.loads(msg.data).get("owners") != self._own
            except (ValueError, AttributeError):
                return  # not ours to read: the next refresh reads it as it can
        else:
            changed = key.startswith("m.") and key[2:] not in self.members
        if changed:
            self._heard_change.set()

    async def run(self) -> None:
        wait = self.refresh_s
        while True:
            try:
                await asyncio.wait_for(self._heard_change.wait(), wait)
                # Heard a joiner or a move: refresh now, and again shortly, which ends the
                # refresh for which we still pull what we owned before (`owned | previous`).
                wait = min(0.25, self.refresh_s)
            except asyncio.TimeoutError:
                wait = self.refresh_s
            self._heard_change.clear()
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
        entry = {"worker": self.me, "loads": {str(k): n for k, n in self.loads().items()}}
        await self._kv.put(self._key(self.me), json.dumps(entry).encode())
        members = await self.read()
        if self.me not in members:
            members = tuple(sorted((*members, self.me)))
        self._own = await self._owners(members)
        mine = frozenset(k for k, m in enumerate(self._own) if m == self.me)
        if members != self.members:
            log.info("members_changed", members=list(members), owned=sorted(mine))
        self.members = members
        pulls = mine | self.owned
        self.owned = mine
        if pulls != self.pulls:
            self.pulls = pulls
            self.on_change(pulls)

    async def _get(self, key: str) -> dict | None:
        try:
            entry = await self._kv.get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return json.loads(entry.value) if entry.value else None

    async def _owners(self, members: tuple[str, ...]) -> list[str | None]:
        """The leader's owners when it wrote them for these members, else capped rendezvous.
        The leader (first by name) also moves one partition by load and writes them again,
        every refresh, so the key outlives the bucket's TTL while the leader does."""
        key = f"{self.scope}.owners"
        rec = await self._get(key)
        valid = (rec is not None and rec.get("members") == list(members)
                 and len(rec.get("owners", ())) == self.partitions)
        own = list(rec["owners"]) if valid else owners(members, self.partitions)
        if members[0] != self.me or len(members) < 2:
            return own
        now = time.time()
        moved = {k: t for k, t in (rec.get("moved", {}) if valid else {}).items()
                 if now - t < DWELL_S}
        entries = await asyncio.gather(*(self._get(self._key(m)) for m in members))
        load = [0] * self.partitions
        for e in entries:  # a partition's sessions: the most any member saw (one that moved
            for k, n in ((e or {}).get("loads") or {}).items():  # is seen by both a while)
                if int(k) < self.partitions:
                    load[int(k)] = max(load[int(k)], int(n))
        move = rebalance(own, load, members, frozenset(int(k) for k in moved))
        # Acted on when proposed at two refreshes in a row: while loads are still coming
        # in (the first seconds of a run, an entry a second older than another) a move
        # the next snapshot would undo is proposed once, and each move costs histories.
        move, self._proposed = (move if move == self._proposed else None), move
        if move is not None:
            self._proposed = None
            k, frm, to = move
            own[k] = to
            moved[str(k)] = now
            self.moved += 1
            log.info("partition_moved", partition=k, sessions=load[k], frm=frm, to=to,
                     loads={m: sum(n for p, n in enumerate(load) if own[p] == m)
                            for m in members})
        await self._kv.put(key, json.dumps({"members": list(members), "owners": own,
                                            "moved": moved}).encode())
        return own

    async def read(self) -> tuple[str, ...]:
        prefix = f"{self._prefix}m."
        resp = await api_call(self.nc, f"{self.topo.api_prefix}.STREAM.INFO.{self._stream}",
                              {"subjects_filter": prefix + ">"})
        subjects = (resp.get("state") or {}).get("subjects") or {}
        return tuple(sorted(s[len(prefix):] for s in subjects))

    async def leave(self, timeout_s: float = 0.5) -> None:
        """Stopping: delete our entry outright (a KV delete would leave a marker behind),
        so the others take our partitions now rather than after the TTL. No refresh puts it
        back: `run` keeps going until teardown ends, and before this lock and flag its next
        put undid the purge, so a stopped worker's partitions waited out the TTL unowned."""
        subject = f"$KV.{self.topo.members_bucket}.{self._key(self.me)}"
        try:
            async with asyncio.timeout(timeout_s):
                async with self._lock:
                    self._left = True
                    if self._sub is not None:
                        await self._sub.unsubscribe()
                    await self.js.purge_stream(self._stream, subject=subject)
        except Exception as e:  # noqa: BLE001 - then it expires after the TTL
            self._left = True
            log.warning("members_leave_failed", error=repr(e))
