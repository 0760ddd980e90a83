"""How much CPU this process may use, and whether it is getting it.

`cpu_budget` decides the intra-op thread count at start, before torch makes its thread
pool: an explicit setting wins (`--threads`, `--cpus`, `OMP_NUM_THREADS`); otherwise the
CPUs the process may run on (its affinity mask) and its cgroup's CPU quota (v2 `cpu.max`,
v1 `cpu.cfs_quota_us`), whichever is smaller. A container limited to 2 CPUs on a 64-core
node runs 2 threads, not 64: a team larger than the quota only spins against the throttle.

`thread_wait_s` reads how long a thread has been runnable but waiting for a CPU (the
kernel's schedstat run delay): the direct measure of a worker starved by its neighbours.

Plain functions over files whose paths can be injected, so tests need no cgroup of their own;
`Starvation.report` logs when the worker becomes starved and when that ends.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger("worker")

CGROUP_ROOT = Path("/sys/fs/cgroup")
SELF_CGROUP = Path("/proc/self/cgroup")


@dataclass(frozen=True, slots=True)
class CpuBudget:
    threads: int  # intra-op threads to run
    source: str  # what decided it: "--threads", "--cpus", "OMP_NUM_THREADS", "cgroup", "affinity"
    explicit: bool  # an operator's setting: kept as it is, never adapted
    affinity: int  # CPUs in the process's affinity mask
    quota_cpus: float | None  # the cgroup's CPU quota in CPUs (None: no quota)
    quota_file: str | None  # where the quota was read

    def describe(self) -> dict[str, object]:
        return {"threads": self.threads, "source": self.source, "explicit": self.explicit,
                "affinity_cpus": self.affinity, "quota_cpus": self.quota_cpus,
                "quota_file": self.quota_file}


def cpu_budget(threads: int | None = None, cpus: set[int] | None = None,
               environ: Mapping[str, str] = os.environ, affinity: int | None = None,
               root: Path = CGROUP_ROOT, self_cgroup: Path = SELF_CGROUP) -> CpuBudget:
    """The thread count to run. `threads`/`cpus`: the command line's `--threads`/`--cpus`."""
    if affinity is None:
        affinity = len(cpus) if cpus else len(os.sched_getaffinity(0))
    quota = cgroup_quota(root, self_cgroup)
    qcpus, qfile = quota if quota else (None, None)

    def budget(n: int, source: str, explicit: bool) -> CpuBudget:
        return CpuBudget(max(1, n), source, explicit, affinity, qcpus, qfile)

    if threads:
        return budget(threads, "--threads", True)
    if cpus:
        return budget(len(cpus), "--cpus", True)
    omp = environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        return budget(int(omp), "OMP_NUM_THREADS", True)
    if qcpus is not None and qcpus < affinity:
        # A fractional quota rounds down: 1.5 CPUs of quota cannot keep two threads busy,
        # and a thread that waits on the throttle holds up the rest of its team.
        return budget(math.floor(qcpus), "cgroup", False)
    return budget(affinity, "affinity", False)


def cgroup_quota(root: Path = CGROUP_ROOT,
                 self_cgroup: Path = SELF_CGROUP) -> tuple[float, str] | None:
    """The smallest CPU quota on this process's cgroup path, in CPUs, and its file; None
    when no cgroup on the path limits CPU (or none can be read)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        return None
    found: list[tuple[float, str]] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":  # cgroup v2: one unified hierarchy
            found += _walk(root, path, _read_v2)
        elif "cpu" in controllers.split(","):  # cgroup v1: the cpu controller's hierarchy
            for mount in (root / controllers, root / "cpu", root / "cpu,cpuacct"):
                if mount.is_dir():
                    found += _walk(mount, path, _read_v1)
                    break
    return min(found) if found else None


def _walk(mount: Path, path: str, read) -> list[tuple[float, str]]:
    """Quotas on `path` and its ancestors under `mount`. In a container with its own cgroup
    namespace the path is "/" and the mount is the container's own cgroup: read it too."""
    out: list[tuple[float, str]] = []
    rel = Path(path.lstrip("/"))
    for d in {mount / rel, *[mount / p for p in rel.parents], mount}:
        q = read(d)
        if q is not None:
            out.append(q)
    return out


def _read_v2(d: Path) -> tuple[float, str] | None:
    f = d / "cpu.max"
    try:
        quota, period = f.read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max" or int(period) <= 0:
        return None
    return int(quota) / int(period), str(f)


def _read_v1(d: Path) -> tuple[float, str] | None:
    f = d / "cpu.cfs_quota_us"
    try:
        quota = int(f.read_text())
        period = int((d / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    if quota <= 0 or period <= 0:
        return None
    return quota / period, str(f)


def thread_wait_s(tid: int) -> float | None:
    """Seconds thread `tid` of this process has spent runnable, waiting for a CPU (None
    where the kernel does not report it)."""
    try:
        return int(Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


def process_wait_s(task_dir: Path = Path("/proc/self/task")) -> float | None:
    """Seconds all of this process's threads have spent runnable, waiting for a CPU."""
    total, seen = 0, False
    try:
        tasks = list(task_dir.iterdir())
    except OSError:
        return None
    for t in tasks:
        try:
            total += int((t / "schedstat").read_text().split()[1])
            seen = True
        except (OSError, ValueError, IndexError):
            continue  # a thread that ended between the listing and the read
    return total / 1e9 if seen else None


@dataclass(slots=True)
class Starvation:
    """Is the worker starved of CPU? Fed the process's run delay every tick.

    `wait_ratio` is the time the process's threads spent waiting for a CPU per second, over
    the CPUs it expects to use: near 0 when it has its cores, near or above 1 when its
    threads queue behind someone else's. Starved is declared after `hold_s` above
    `threshold` while busy, and ends after `hold_s` below it (no flapping on one slow second).
    """

    cpus: int
    threshold: float = 0.25  # alone on its cores: about 0.05; collapsed with a neighbour: 0.5
    hold_s: float = 3.0
    starved: bool = False
    wait_ratio: float = 0.0
    _last: tuple[float, float] | None = None  # (now, process wait seconds)
    _since: float | None = None  # when the reading first crossed the line the other way

    def update(self, now: float, wait_s: float | None, busy: bool) -> bool | None:
        """A new reading; True/False when the starved state changes, else None."""
        if wait_s is None:
            return None
        last, self._last = self._last, (now, wait_s)
        if last is None or now <= last[0]:
            return None
        self.wait_ratio = (wait_s - last[1]) / (now - last[0]) / max(1, self.cpus)
        crossed = (busy and self.wait_ratio > self.threshold) != self.starved
        if not crossed:
            self._since = None
            return None
        self._since = self._since if self._since is not None else now
        if now - self._since < self.hold_s:
            return None
        self.starved, self._since = not self.starved, None
        return self.starved

    def report(self, now: float, wait_s: float | None, busy: bool, threads: int) -> None:
        """`update`, and a log line when the starved state changes."""
        changed = self.update(now, wait_s, busy)
        if changed is True:
            log.warning("cpu_starved", wait_ratio=round(self.wait_ratio, 3), threads=threads,
                        why="this worker's threads wait for CPUs other processes hold: "
                            "give it its own cores (--cpus, a CPU limit) or fewer neighbours")
        elif changed is False:
            log.info("cpu_starvation_over", wait_ratio=round(self.wait_ratio, 3), threads=threads)


class IdleCpus:
    """Idle CPUs among `cpus` since the previous call, from /proc/stat (host-wide counters:
    in a container too, idle time on a CPU is idle for everyone)."""

    def __init__(self, cpus: set[int] | None = None, stat: Path = Path("/proc/stat")):
        self.cpus = cpus if cpus is not None else os.sched_getaffinity(0)
        self._stat = stat
        self._last = self._read()

    def _read(self) -> tuple[int, int] | None:
        """(idle, total) jiffies summed over our CPUs."""
        idle = total = 0
        try:
            lines = self._stat.read_text().splitlines()
        except OSError:
            return None
        for line in lines:
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in self.cpus:
                continue
            v = [int(x) for x in rest.split()]
            idle += v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
            total += sum(v[:8])  # user..steal; guest time is counted in user already
        return (idle, total) if total else None

    def __call__(self) -> float:
        now, last = self._read(), self._last
        self._last = now
        if now is None or last is None or now[1] <= last[1]:
            return 0.0
        return len(self.cpus) * (now[0] - last[0]) / (now[1] - last[1])
