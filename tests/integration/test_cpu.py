"""A real worker under a real cgroup CPU quota runs one thread and serves.

The test makes a cgroup with a 1-CPU quota (v1 `cpu.cfs_quota_us` or v2 `cpu.max`) and
starts the worker binary inside it. Where the machine does not let a test make a cgroup
(not root, no writable cpu controller), it is skipped: `tests/unit/test_cpu.py` covers
the same rule on injected quota files.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from loadgen.client import run_jobs
from loadgen.fleet import provision, worker_env
from loadgen.workload import WorkloadSpec, generate
from tests.chaos.harness import log_events

pytestmark = pytest.mark.timeout(240)


def make_cgroup(quota_cpus: float) -> tuple[Path, Path] | None:
    """(directory, procs file) of a new cgroup with this CPU quota, or None if not allowed."""
    name = f"fabric-test-{secrets.token_hex(4)}"
    v1 = Path("/sys/fs/cgroup/cpu")
    v2_self = Path("/sys/fs/cgroup") / Path(
        next((line.split("::", 1)[1] for line in Path("/proc/self/cgroup").read_text().splitlines()
              if line.startswith("0::")), "/")).relative_to("/")
    try:
        if (v1 / "cpu.cfs_quota_us").exists():
            d = v1 / name
            d.mkdir()
            (d / "cpu.cfs_period_us").write_text("100000")
            (d / "cpu.cfs_quota_us").write_text(str(int(quota_cpus * 100000)))
            return d, d / "cgroup.procs"
        if (v2_self / "cgroup.subtree_control").exists():
            d = v2_self / name
            d.mkdir()
            (d / "cpu.max").write_text(f"{int(quota_cpus * 100000)} 100000")
            return d, d / "cgroup.procs"
    except OSError:
        return None
    return None


@pytest.fixture
def one_cpu_cgroup():
    made = make_cgroup(1.0)
    if made is None:
        pytest.skip("this machine does not let a test make a cgroup with a CPU quota")
    d, procs = made
    yield procs
    for _ in range(50):  # the worker has exited; its cgroup empties a moment later
        with contextlib.suppress(OSError):
            d.rmdir()
            return
        time.sleep(0.1)


def test_a_worker_under_a_one_cpu_quota_runs_one_thread(one_cpu_cgroup: Path,
                                                          tmp_engine_toml, nats_url,
                                                          tmp_path: Path) -> None:
    cfg = tmp_engine_toml()
    provision(cfg)
    log_path = tmp_path / "q1.log"

    def join_cgroup() -> None:  # in the child, before exec: torch never sees the host's CPUs
        one_cpu_cgroup.write_text(str(os.getpid()))

    with log_path.open("w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker", "run", "--config", str(cfg), "--worker-id", "q1"],
            env=worker_env(), stdout=log, stderr=subprocess.STDOUT, preexec_fn=join_cgroup)
    try:
        deadline = time.monotonic() + 120
        while '"worker_ready"' not in log_path.read_text():
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "worker not ready"
            time.sleep(0.2)
        jobs = generate(WorkloadSpec(num_jobs=40, seed=3, run_id="quota"))
        stats = asyncio.run(run_jobs(nats_url, jobs, run_id="quota", timeout_s=120,
                                     progress=False))
        assert len(stats.outcomes) == 40 and all(o.ok for o in stats.outcomes.values())
    finally:
        proc.terminate()
        proc.wait(30)
    logged = SimpleNamespace(log_path=log_path)
    budget = log_events(logged, "cpu_budget")[0]
    assert (budget["threads"], budget["source"], budget["quota_cpus"]) == (1, "cgroup", 1.0)
    assert budget["adaptive"] is False
    assert log_events(logged, "engine_ready")[0]["intra_op_threads"] == 1
