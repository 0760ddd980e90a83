"""How many intra-op threads the executor runs: measured, not assumed.

A worker alone on its cores is fastest with a thread per core. Two workers that each run a
team the size of the same cores collapse: an OpenMP team spins at every op's barrier
waiting for a teammate that the other worker's team has pushed off its core, and both
workers crawl (38x slower on 2 cores). One thread each avoids the collapse but leaves a
lone worker slower. No fixed setting is right for both, and a worker cannot see its
neighbours -- but it can see its own speed. So the governor tries each thread count of a
halving ladder (n, n/2, ..., 1) for a short window of busy time, keeps the fastest, and
tries again every `reprobe_s`, or at once when the speed it chose falls by half (a
neighbour arrived). Speed is work per second of step time, work being the step's token
rows plus its attention pairs weighed by their cost relative to a row.

Plain data, fed by the executor thread after every step; it returns a new count when the
executor should switch. Only CPU workers whose thread count was not set explicitly have
one (`--threads`, `--cpus` or `OMP_NUM_THREADS` pin it).
"""

from __future__ import annotations

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
    reason: str  # why it was measured: "start", "schedule" (every reprobe_s), "drop" (speed fell)


@dataclass(slots=True)
class ThreadGovernor:
    max_threads: int
    window_s: float = 0.25  # busy seconds each count is measured for, per round
    rounds: int = 2  # rounds of the ladder per probe (alternating evens out the workload)
    reprobe_s: float = 30.0  # busy seconds between probes
    drop: float = 0.35  # re-probe at once when the chosen count's speed falls below this
    # share of what it measured, two windows running (a busy step mix moves it by less)
    counts: tuple[int, ...] = field(init=False)
    threads: int = field(init=False)  # the count in force
    probing: bool = field(init=False, default=True)
    last: Decision | None = field(init=False, default=None)
    _tallies: dict[int, _Tally] = field(init=False, default_factory=dict)
    _order: list[int] = field(init=False, default_factory=list)  # counts still to measure
    _window: _Tally = field(init=False, default_factory=_Tally)
    _skip: bool = field(init=False, default=False)  # the first step after a switch
    _since_probe_s: float = field(init=False, default=0.0)
    _chosen_rate: float = field(init=False, default=0.0)
    _low: int = field(init=False, default=0)  # consecutive windows below the drop line
    _reason: str = field(init=False, default="start")  # why the probe under way began

    def __post_init__(self) -> None:
        self.counts = ladder(self.max_threads)
        self.threads = self.counts[0]
        self._start_probe()

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
        w = self._window
        w.work += work
        w.busy_s += step_s
        if w.busy_s < self.window_s:
            return None
        self._window = _Tally()
        if self.probing:
            t = self._tallies.setdefault(self.threads, _Tally())
            t.work += w.work
            t.busy_s += w.busy_s
            if self._order:
                return self._switch(self._order.pop(0))
            return self._decide()
        self._since_probe_s += w.busy_s
        self._low = self._low + 1 if w.rate < self.drop * self._chosen_rate else 0
        if self._low >= 2:
            return self._reprobe("drop")
        if self._since_probe_s >= self.reprobe_s:
            return self._reprobe("schedule")
        return None

    def _start_probe(self, reason: str = "start") -> None:
        self.probing = True
        self._reason = reason
        self._low = 0
        self._tallies = {}
        order = [c for _ in range(self.rounds) for c in self.counts]
        # Start from the count in force: no switch until its window is measured.
        i = order.index(self.threads)
        self._order = order[i + 1:] + order[:i]

    def _reprobe(self, reason: str) -> int | None:
        self._start_probe(reason)
        return None

    def _switch(self, n: int) -> int | None:
        if n == self.threads:
            return None
        self.threads = n
        self._skip = True
        return n

    def _decide(self) -> int | None:
        rates = {n: t.rate for n, t in self._tallies.items()}
        best = max(rates, key=lambda n: (rates[n], n))
        self.probing = False
        self._since_probe_s = 0.0
        self._chosen_rate = rates[best]
        self.last = Decision(best, rates, self._reason)
        return self._switch(best)
