"""Failpoints: named places in the code where a test can make the worker fail on purpose.

Off by default and free when off (one dict lookup). In the style of etcd's gofail, the
environment variable `FABRIC_FAILPOINTS` names points and actions, `;`-separated:

    FABRIC_FAILPOINTS="executor.step=raise@50;publisher.publish=sleep(2.0)"
    FABRIC_FAILPOINTS="executor.step=raise:job=poison-"

A name may appear more than once; its actions run in order on each hit (for example
`executor.step=sleep(0.05);executor.step=raise@40`: slow steps, then a fault).

Actions: `raise` (RuntimeError), `hang` (block forever), `sleep(S)` (delay S seconds),
`exit(N)` (os._exit, like a crash). `@K` fires the action from the K-th hit on (default 1:
the first hit). `:job=PREFIX` makes the point job-specific: only a hit whose call site
reports a job id starting with PREFIX counts (and fires), so a test can make one marked
job kill every worker that runs it -- the poison job of the failure table.

Points in the code today: `executor.step` (before each forward; the worker reports the ids
of the jobs decoding in that step), `publisher.publish` (before each Result publish, with its
job id), `ingress.fetch` (after each fetch, with the fetched job ids unknown: no filter),
`grammar.advance` (before a structured-output job's token is fed to its grammar; a `raise`
there is that job's failure alone, `grammar_failed`), `stops.feed` (before a job's new token
is fed to its stop-string matcher on the event loop, with its job id: `stop_failed`).
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

_SPEC = re.compile(r"^(?P<name>[\w.]+)=(?P<action>raise|hang|sleep\((?P<s>[\d.]+)\)|exit\((?P<n>\d+)\))"
                   r"(?:@(?P<after>\d+))?(?::job=(?P<job>[^\s;]+))?$")


class FailpointError(RuntimeError):
    """Raised by a `raise` failpoint; its message names the point."""


@dataclass(slots=True)
class _Point:
    action: str
    arg: float
    after: int
    job_prefix: str | None = None  # None: every hit counts
    hits: int = 0


def parse(spec: str) -> dict[str, list[_Point]]:
    points: dict[str, list[_Point]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        m = _SPEC.match(part)
        if not m:
            raise ValueError(f"FABRIC_FAILPOINTS: cannot parse {part!r} "
                             "(want name=raise|hang|sleep(S)|exit(N)[@K][:job=PREFIX])")
        action = m["action"].split("(")[0]
        arg = float(m["s"] or m["n"] or 0)
        points.setdefault(m["name"], []).append(_Point(action, arg, int(m["after"] or 1), m["job"]))
    return points


_points = parse(os.environ.get("FABRIC_FAILPOINTS", ""))
_lock = threading.Lock()


def hit(name: str, jobs: Callable[[], Iterable[str]] | None = None) -> None:
    """Call at a failpoint; does nothing unless the environment armed this point.

    `jobs` (called only when the point is armed with a job filter) returns the ids of the
    jobs this hit concerns."""
    for p in _points.get(name, ()):
        _fire(name, p, jobs)


def _fire(name: str, p: _Point, jobs: Callable[[], Iterable[str]] | None) -> None:
    if p.job_prefix is not None:
        if jobs is None or not any(j.startswith(p.job_prefix) for j in jobs()):
            return
    with _lock:
        p.hits += 1
        if p.hits < p.after:
            return
    if p.action == "raise":
        raise FailpointError(f"failpoint {name} fired (hit {p.hits})")
    if p.action == "sleep":
        time.sleep(p.arg)
    elif p.action == "hang":
        threading.Event().wait()
    elif p.action == "exit":
        os._exit(int(p.arg))


def armed() -> list[str]:
    return sorted(_points)
