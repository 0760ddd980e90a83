"""How many intra-op threads the executor runs: measured, not assumed.

A worker alone on its cores is fastest with a thread per core. Two workers that each run a
team the size of the same cores collapse: an OpenMP team spins at every op's barrier
waiting for a teammate that the other worker's team has pushed off its core, and both
workers crawl (40x slower on 2 cores). One thread each avoids the collapse but leaves a
lone worker slower. No fixed setting is right for both, and a worker cannot see its
neighbours -- but it can see its own speed and the CPUs nobody is using.

So the governor starts at the largest count the CPUs left idle while the worker loaded can
hold (`start_spare`: a lone worker starts with a thread per core; one that loaded beside a
busy neighbour, or beside another loading worker, starts at one) and measures. A probe runs
each candidate count of a halving ladder (n, n/2, ..., 1) for a short window of busy time,
twice, alternating, and keeps the fastest. Going up is tried only with spare CPUs (idle time
on the worker's own CPUs, `spare`): a count the CPUs cannot hold is the collapse, and one
step of it can last seconds. Going down is always tried. Only steps of at least
`min_step_s` are measured: below it a step is the fixed cost around the model and a team's
wake-up, where counts cannot be told apart (a decision taken on a worker's first warm-up
steps once cost a lone worker a third of its speed for 30 s). Probes come when the speed of
the chosen count falls below `drop` of what it measured (a neighbour arrived), when spare
CPUs appear below the largest count (a neighbour left), and on a schedule of busy time:
every `reprobe_s`, or, while spare CPUs could hold more threads than it runs, after 2 s,
then 4, 8, ... up to `reprobe_s` (a wrong choice of fewer threads is undone in seconds, and
a right one costs ever fewer probes). Speed is work per second of step time, work being the
step's token rows plus its attention pairs weighed by their cost relative to a row.

Plain data, fed by the executor thread after every step; it returns a new count when the
executor should switch. Only CPU workers whose thread count was not set explicitly have
one (`--threads`, `--cpus` or `OMP_NUM_THREADS` fix it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


def ladder(max_threads: int) -> tuple[int, ...]:
    """The counts tried: max_threads halved down to 1."""
    out = [max(1, max_threads)]
    while out[-1] > 1:
        out.append(out[-1] // 2)
    return tuple(out)


@dataclass(slots=True)
class _Tally:
    work: float = 0.0
    busy_s: float = 0.0

    @property
    def rate(self) -> float:
        return self.work / self.busy_s if self.busy_s > 0 else 0.0


@dataclass(slots=True)
class Decision:
    threads: int  # the count chosen
    rates: dict[int, float]  # work per busy second measured for each count tried
    reason: str  # what started the probe: "start", "schedule", "drop" (speed fell), "spare"


@dataclass(slots=True)
class ThreadGovernor:
    max_threads: int
    spare: Callable[[], float] = lambda: 0.0  # idle CPUs of ours since the last call
    window_s: float = 0.25  # busy seconds each count is measured for, per round
    rounds: int = 2  # rounds of the ladder per probe (alternating evens out the workload)
    reprobe_s: float = 30.0  # busy seconds between scheduled probes
    start_spare: float = 0.0  # idle CPUs of ours while the worker loaded: sets the start count
    min_step_s: float = 0.002  # shorter steps are not measured (counts look alike there)
    first_reprobe_s: float = 2.0  # with room for more threads: the first scheduled probe
    drop: float = 0.35  # probe when the chosen count's speed falls below this share of what
    # it measured, two windows running (a change of step mix moves it by less)
    counts: tuple[int, ...] = field(init=False)
    threads: int = field(init=False)  # the count in force
    probing: bool = field(init=False, default=False)
    probes: int = field(init=False, default=0)
    last: Decision | None = field(init=False, default=None)
    _tallies: dict[int, _Tally] = field(init=False, default_factory=dict)
    _order: list[int] | None = field(init=False, default_factory=list)  # counts to measure
    _window: _Tally = field(init=False, default_factory=_Tally)
    _skip: bool = field(init=False, default=False)  # the first step after a switch
    _since_probe_s: float = field(init=False, default=0.0)
    _chosen_rate: float = field(init=False, default=0.0)
    _low: int = field(init=False, default=0)  # consecutive windows below the drop line
    _roomy: int = field(init=False, default=0)  # consecutive windows with spare CPUs above
    _spare: float = field(init=False, default=0.0)
    _reason: str = field(init=False, default="start")
    _decided_up_to: int = field(init=False, default=1)  # the spare CPUs' reach at the decision
    _next_probe_s: float = field(init=False, default=0.0)  # busy seconds to the next scheduled

    def __post_init__(self) -> None:
        self.counts = ladder(self.max_threads)
        self.threads = 1
        self._spare = self.start_spare
        self.threads = self._up_to()
        self.probing = True  # from the first window: it measures the start count
        self._order = None  # the candidates, once the first window has read the spare CPUs
        self._next_probe_s = self.first_reprobe_s

    @property
    def adaptive(self) -> bool:
        return len(self.counts) > 1

    def on_step(self, work: float, step_s: float) -> int | None:
        """Record one step; the count to switch to, if it changes."""
        if not self.adaptive:
            return None
        if self._skip:  # a switch's first step pays for waking or parking threads
            self._skip = False
            return None
        if step_s < self.min_step_s:
            return None  # too small to tell the counts apart: not measured
        w = self._window
        if w.busy_s == 0.0:
            self.spare()  # the idle reading covers this window only, not an idle spell before
        w.work += work
        w.busy_s += step_s
        if w.busy_s < self.window_s:
            return None
        self._window = _Tally()
        self._spare = self.spare()
        if self.probing:
            t = self._tallies.setdefault(self.threads, _Tally())
            t.work += w.work
            t.busy_s += w.busy_s
            if self._order is None:  # the first window: one round is enough to start
                self._plan(rounds=1)
                self._order.pop(0)  # this window was it for the count in force
            if self._order:
                return self._switch(self._order.pop(0))
            return self._decide()
        self._since_probe_s += w.busy_s
        self._low = self._low + 1 if w.rate < self.drop * self._chosen_rate else 0
        # Spare CPUs beyond what the last probe could use: a neighbour left.
        self._roomy = self._roomy + 1 if self._up_to() > self._decided_up_to else 0
        if self._low >= 2:
            return self._probe("drop")
        if self._roomy >= 2:
            return self._probe("spare")
        if self._since_probe_s >= self._next_probe_s:
            return self._probe("schedule")
        return None

    def _up_to(self) -> int:
        """The largest count the spare CPUs can hold beside the threads now running."""
        room = self.threads + int(self._spare + 0.25)
        return max(c for c in self.counts if c <= room or c == 1)

    def _probe(self, reason: str) -> int | None:
        self.probing = True
        self._reason = reason
        self._low = self._roomy = 0
        self._tallies = {}
        self._plan(self.rounds)
        # The count in force is measured first: no switch until its window is done.
        self._order = self._order[1:]
        return None

    def _plan(self, rounds: int) -> None:
        """The probe's order of counts, from the one in force; larger ones only as far as
        the spare CPUs reach."""
        self.probes += 1
        self._decided_up_to = top = max(self._up_to(), self.threads)
        cands = [c for c in self.counts if c <= top]
        order = [c for _ in range(rounds) for c in cands]
        i = order.index(self.threads)
        self._order = order[i:] + order[:i]

    def _switch(self, n: int) -> int | None:
        if n == self.threads:
            return None
        self.threads = n
        self._skip = True
        return n

    def _decide(self) -> int | None:
        rates = {n: t.rate for n, t in self._tallies.items()}
        best = max(rates, key=lambda n: (rates[n], -n))  # a tie: fewer threads
        self.probing = False
        self._since_probe_s = 0.0
        self._chosen_rate = rates[best]
        changed = self.last is None or self.last.threads != best
        self.last = Decision(best, rates, self._reason)
        # Fewer threads than the spare CPUs could hold: look again soon, and again later
        # each time the answer stands; at the top (or a changed answer) the plain schedule.
        if best < self._up_to():
            self._next_probe_s = (self.first_reprobe_s if changed
                                  else min(2 * self._next_probe_s, self.reprobe_s))
        else:
            self._next_probe_s = self.reprobe_s
        return self._switch(best)
