"""CPU budget, contention and the thread governor on plain data: cgroup files, /proc/stat
and step timings are made up here, so these tests need no cgroup and no second worker.
(`tests/integration/test_cpu.py` puts a real worker under a real cgroup quota.)
"""

from __future__ import annotations

from pathlib import Path

import pytest

from worker.engine.governor import ThreadGovernor, ladder
from worker.ops.cpu import IdleCpus, Starvation, cgroup_quota, cpu_budget, process_wait_s


def v2(tmp_path: Path, path: str, limits: dict[str, str]) -> tuple[Path, Path]:
    """A cgroup v2 tree: `limits` maps a cgroup path to its cpu.max."""
    root = tmp_path / "cg"
    for p, value in limits.items():
        d = root / p.lstrip("/")
        d.mkdir(parents=True, exist_ok=True)
        (d / "cpu.max").write_text(value + "\n")
    self_cg = tmp_path / "self-cgroup"
    self_cg.write_text(f"0::{path}\n")
    return root, self_cg


def v1(tmp_path: Path, path: str, quota: int, period: int = 100000,
       mount: str = "cpu,cpuacct") -> tuple[Path, Path]:
    root = tmp_path / "cg1"
    d = root / mount / path.lstrip("/")
    d.mkdir(parents=True)
    (d / "cpu.cfs_quota_us").write_text(f"{quota}\n")
    (d / "cpu.cfs_period_us").write_text(f"{period}\n")
    self_cg = tmp_path / "self-cgroup"
    self_cg.write_text(f"5:memory:/x\n4:{mount}:{path}\n3:cpuset:/\n")
    return root, self_cg


def test_v2_quota_is_the_smallest_on_the_path(tmp_path: Path) -> None:
    root, self_cg = v2(tmp_path, "/kubepods/pod1/c1", {
        "/kubepods": "max 100000", "/kubepods/pod1": "400000 100000",
        "/kubepods/pod1/c1": "250000 100000"})
    quota, where = cgroup_quota(root, self_cg)
    assert quota == 2.5 and where.endswith("kubepods/pod1/c1/cpu.max")


def test_v2_inside_a_container_reads_its_own_root(tmp_path: Path) -> None:
    # With a cgroup namespace the path is "/" and the mount is the container's own cgroup.
    root, self_cg = v2(tmp_path, "/", {"/": "100000 100000"})
    assert cgroup_quota(root, self_cg)[0] == 1.0


def test_v2_without_a_limit_is_none(tmp_path: Path) -> None:
    root, self_cg = v2(tmp_path, "/a", {"/a": "max 100000"})
    assert cgroup_quota(root, self_cg) is None
    assert cgroup_quota(root, tmp_path / "missing") is None


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_v1_quota_from_cfs_quota_and_period(tmp_path: Path, mount: str) -> None:
    root, self_cg = v1(tmp_path, "/docker/abc", 150000, mount=mount)
    assert cgroup_quota(root, self_cg)[0] == 1.5
    root2, self_cg2 = v1(tmp_path / "b", "/docker/abc", -1)
    assert cgroup_quota(root2, self_cg2) is None


def test_the_budget_follows_the_quota_and_explicit_settings_win(tmp_path: Path) -> None:
    root, self_cg = v1(tmp_path, "/docker/abc", 150000)
    kw = dict(root=root, self_cgroup=self_cg, affinity=64)
    b = cpu_budget(environ={}, **kw)
    assert (b.threads, b.source, b.explicit, b.quota_cpus) == (1, "cgroup", False, 1.5)
    assert cpu_budget(threads=3, environ={}, **kw).describe()["source"] == "--threads"
    assert cpu_budget(cpus={0, 1, 2, 3}, environ={}, **kw).threads == 4
    omp = cpu_budget(environ={"OMP_NUM_THREADS": "6"}, **kw)
    assert (omp.threads, omp.source, omp.explicit) == (6, "OMP_NUM_THREADS", True)
    none = tmp_path / "none"
    free = cpu_budget(environ={}, affinity=8, root=none, self_cgroup=none)
    assert (free.threads, free.source, free.quota_cpus) == (8, "affinity", None)
    # A quota above the affinity does not raise the count.
    root3, self_cg3 = v1(tmp_path / "c", "/d", 1600000)
    assert cpu_budget(environ={}, affinity=4, root=root3, self_cgroup=self_cg3).threads == 4


def test_process_wait_is_read_from_schedstat() -> None:
    w = process_wait_s()
    assert w is not None and w >= 0


def test_starved_after_a_held_high_ratio_while_busy_and_over_after_a_held_low_one() -> None:
    s = Starvation(cpus=2, threshold=0.25, hold_s=3.0)
    t, wait = 0.0, 0.0
    assert s.update(t, wait, busy=True) is None
    changes = []
    for _ in range(6):  # 1.0 s of waiting per second over 2 CPUs: ratio 0.5
        t, wait = t + 1, wait + 1.0
        changes.append(s.update(t, wait, busy=True))
    assert s.wait_ratio == pytest.approx(0.5) and changes.count(True) == 1 and s.starved
    assert changes.index(True) == 3  # crossed at t=1, declared 3 s later
    changes = []
    for _ in range(6):  # idle: not starved, whatever the ratio
        t, wait = t + 1, wait + 1.0
        changes.append(s.update(t, wait, busy=False))
    assert changes.count(False) == 1 and not s.starved


def test_idle_cpus_reads_our_cpus_only(tmp_path: Path) -> None:
    stat = tmp_path / "stat"

    def write(*cpus: tuple[int, int]) -> None:  # (user, idle) jiffies per CPU
        stat.write_text("cpu  0 0 0 0 0 0 0 0\n" + "".join(
            f"cpu{i} {user} 0 0 {idle} 0 0 0 0 0 0\n" for i, (user, idle) in enumerate(cpus))
            + "intr 1 2 3\n")

    write((100, 0), (100, 0), (100, 0))
    idle = IdleCpus({0, 1}, stat)
    # cpu0: 100 new jiffies, all idle; cpu1: 100 new, all busy; cpu2 is not ours.
    write((100, 100), (200, 0), (100, 5000))
    assert idle() == pytest.approx(1.0)
    assert idle() == 0.0  # nothing new since


# -- the governor ------------------------------------------------------------------------


def test_the_ladder_halves_down_to_one() -> None:
    assert ladder(8) == (8, 4, 2, 1) and ladder(6) == (6, 3, 1) and ladder(1) == (1,)
    assert not ThreadGovernor(1).adaptive


def drive(g: ThreadGovernor, speed, steps: int, step_work: float = 100.0) -> list[int]:
    """Feed `steps` steps whose time is step_work / speed(threads); the counts in force."""
    seen = []
    for _ in range(steps):
        n = g.on_step(step_work, step_work / speed(g.threads))
        seen.append(g.threads)
        assert n is None or n == g.threads
    return seen


def test_alone_with_spare_cores_it_goes_up_and_stays() -> None:
    g = ThreadGovernor(2, spare=lambda: 1.0, reprobe_s=5.0)
    assert g.threads == 1
    drive(g, {1: 1000.0, 2: 1500.0}.__getitem__, 400)
    assert g.threads == 2 and g.last.threads == 2 and g.last.rates[2] > g.last.rates[1]
    probes = g.probes
    drive(g, {1: 1000.0, 2: 1500.0}.__getitem__, 800)  # scheduled probes confirm it
    assert g.threads == 2 and g.probes > probes


def test_without_spare_cores_it_never_tries_more_threads() -> None:
    tried = set()

    def speed(n: int) -> float:
        tried.add(n)
        return {1: 1000.0, 2: 25.0}[n]  # two threads here would be the collapse

    g = ThreadGovernor(2, spare=lambda: 0.0, reprobe_s=2.0)
    drive(g, speed, 2000)
    assert tried == {1} and g.probes >= 3


def test_a_neighbour_arriving_sends_it_down_at_once() -> None:
    spare = [1.0]
    g = ThreadGovernor(2, spare=lambda: spare[0], reprobe_s=1000.0)
    drive(g, {1: 1000.0, 2: 1500.0}.__getitem__, 200)
    assert g.threads == 2
    spare[0] = 0.0  # a neighbour takes the other core: two threads collapse
    drive(g, {1: 900.0, 2: 30.0}.__getitem__, 200)
    assert g.threads == 1 and g.last.reason == "drop"


def test_a_neighbour_leaving_lets_it_go_back_up() -> None:
    spare = [0.0]
    g = ThreadGovernor(2, spare=lambda: spare[0], reprobe_s=1000.0)
    drive(g, {1: 1000.0, 2: 30.0}.__getitem__, 100)
    assert g.threads == 1
    spare[0] = 1.0
    drive(g, {1: 1000.0, 2: 1500.0}.__getitem__, 100)
    assert g.threads == 2 and g.last.reason == "spare"


def test_the_first_step_after_a_switch_is_not_counted() -> None:
    g = ThreadGovernor(2, spare=lambda: 1.0, window_s=0.25)
    for _ in range(3):  # the first window measures one thread; then it tries two
        g.on_step(100.0, 0.1)
    assert g.threads == 2
    g.on_step(10_000.0, 100.0)  # the wake-up step: huge, and ignored
    assert g._window.busy_s == 0.0


def test_where_one_thread_is_faster_spare_cpus_make_it_probe_ever_less_often() -> None:
    g = ThreadGovernor(2, spare=lambda: 1.0, reprobe_s=30.0)
    seen = drive(g, {1: 1500.0, 2: 1000.0}.__getitem__, 1000)  # about 67 busy seconds
    # The start, then after 2, 4, 8, 16 and 30 busy seconds: the answer stands each time.
    assert 5 <= g.probes <= 7 and g.last.threads == 1
    assert seen.count(2) < 0.1 * len(seen)


def test_the_start_takes_two_windows() -> None:
    g = ThreadGovernor(2, spare=lambda: 1.0, window_s=0.25)
    seen = drive(g, {1: 1000.0, 2: 1500.0}.__getitem__, 12, step_work=100.0)
    # 0.1 s steps at one thread: window 1 is steps 0-2; the switch's first step is not
    # counted; window 2 (two threads) then decides.
    assert seen[:3] == [1, 1, 2] and g.last is not None and g.last.reason == "start"
    assert g.threads == 2


def test_a_worker_that_loaded_beside_idle_cores_starts_with_a_thread_per_core() -> None:
    g = ThreadGovernor(2, spare=lambda: 1.0, start_spare=1.0)
    assert g.threads == 2
    seen = drive(g, {1: 1000.0, 2: 1500.0}.__getitem__, 400)
    assert g.last.threads == 2 and g.last.reason == "start"
    assert seen.count(1) <= 4  # the start probe's one-thread window, nothing more
    assert ThreadGovernor(2, spare=lambda: 0.0, start_spare=0.2).threads == 1  # a busy neighbour


def test_steps_too_small_to_tell_the_counts_apart_decide_nothing() -> None:
    """Warm-up steps (a millisecond each) where one thread looks three times faster: no
    decision is taken on them; the first real steps decide."""
    g = ThreadGovernor(2, spare=lambda: 1.0, start_spare=1.0)
    drive(g, {1: 300_000.0, 2: 100_000.0}.__getitem__, 2000, step_work=100.0)  # 0.3-1 ms
    assert g.last is None and g.threads == 2
    drive(g, {1: 1000.0, 2: 1500.0}.__getitem__, 100, step_work=20.0)  # 13-20 ms steps
    assert g.last is not None and g.last.threads == 2


def test_a_wrong_choice_of_fewer_threads_is_undone_within_seconds() -> None:
    """The start decided one thread (the workload then favoured it); the workload changes
    and two threads are faster: with spare CPUs it is back at two within a few busy
    seconds, not the 30 of the plain schedule."""
    g = ThreadGovernor(2, spare=lambda: 1.0, start_spare=1.0, reprobe_s=30.0)
    drive(g, {1: 1500.0, 2: 1000.0}.__getitem__, 30)
    assert g.last.threads == 1
    busy = 0.0
    while g.threads != 2 or g.probing:
        g.on_step(100.0, 100.0 / {1: 1000.0, 2: 1500.0}[g.threads])
        busy += 100.0 / {1: 1000.0, 2: 1500.0}[g.threads]
        assert busy < 4.0, "not undone within 4 busy seconds"
    assert g.last.threads == 2 and g.last.reason == "schedule"
