"""The process heap's two knobs (worker/ops/heap.py) reach glibc where there is one."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt only")


@glibc
def test_arenas_are_bounded_and_the_heap_trims_in_a_fresh_process() -> None:
    code = ("from worker.ops import heap\n"
            "assert heap.bound_arenas(), 'mallopt refused'\n"
            "junk = [bytes(2000) for _ in range(50_000)]\n"
            "del junk\n"
            "print(heap.trim())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() in ("True", "False")  # pages handed back, or none free
