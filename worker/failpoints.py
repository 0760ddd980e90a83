"""Failpoints: named places in the code where a test can make the worker fail on purpose.

Off by default and free when off (one dict lookup). In the style of etcd's gofail, the
environment variable `FABRIC_FAILPOINTS` names points and actions, `;`-separated:

    FABRIC_FAILPOINTS="executor.step=raise@50;drain.publish=sleep(2.0)"

Actions: `raise` (RuntimeError), `hang` (block forever), `sleep(S)` (delay S seconds),
`exit(N)` (os._exit, like a crash). `@K` fires the action from the K-th hit on (default 1:
the first hit). Points in the code today: `executor.step` (before each forward),
`drain.publish` (before each Result publish), `ingress.fetch` (after each fetch).
"""

from __future__ import annotations

import os
import re
import threading
import time
from dataclasses import dataclass

_SPEC = re.compile(r"^(?P<name>[\w.]+)=(?P<action>raise|hang|sleep\((?P<s>[\d.]+)\)|exit\((?P<n>\d+)\))"
                   r"(?:@(?P<after>\d+))?$")


class FailpointError(RuntimeError):
    """Raised by a `raise` failpoint; its message names the point."""


@dataclass(slots=True)
class _Point:
    action: str
    arg: float
    after: int
    hits: int = 0


def parse(spec: str) -> dict[str, _Point]:
    points: dict[str, _Point] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        m = _SPEC.match(part)
        if not m:
            raise ValueError(f"FABRIC_FAILPOINTS: cannot parse {part!r} "
                             "(want name=raise|hang|sleep(S)|exit(N)[@K])")
        action = m["action"].split("(")[0]
        arg = float(m["s"] or m["n"] or 0)
        points[m["name"]] = _Point(action, arg, int(m["after"] or 1))
    return points


_points = parse(os.environ.get("FABRIC_FAILPOINTS", ""))
_lock = threading.Lock()


def hit(name: str) -> None:
    """Call at a failpoint; does nothing unless the environment armed this point."""
    p = _points.get(name)
    if p is None:
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
