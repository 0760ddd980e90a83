"""Liveness and readiness: two questions about the worker, answered from its own state.

- alive (`/healthz`): the process answers, no fault has been declared, and the executor
  thread, once started, is running. While the model loads or the broker connects the
  worker is alive but not ready. A fault (a dead or stalled executor, a broker gone too
  long) exits the process within 5 s by itself; failing this probe meanwhile is for humans
  and for the rare case the exit does not happen.
- ready (`/readyz`): connected to the broker, model loaded, executor running, serving, not
  draining. Workers pull, so nothing routes to them; readiness is for rollouts, compose's
  `depends_on` and humans, and the reason says which condition is missing.

Pure functions of a Worker (or None before one exists); they read attributes the worker
sets as it goes (`nc`, `executor`, `ready`, `draining`, `fault`) and never call into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str  # short, stable, for humans and probes: "ready", "draining", ...

    def body(self) -> dict[str, object]:
        return {"ok": self.ok, "reason": self.reason}


def liveness(worker: Any | None) -> Verdict:
    if worker is None:
        return Verdict(True, "loading model")
    if getattr(worker, "fault", None) is not None:
        return Verdict(False, "fault: exiting")
    ex = getattr(worker, "executor", None)
    if ex is None:
        return Verdict(True, "starting")
    if ex.alive:
        return Verdict(True, "alive")
    return Verdict(False, "executor thread is not running")


def readiness(worker: Any | None, was_ready: bool = False) -> Verdict:
    """`was_ready`: the worker has been ready before, so not-ready-now means stopping."""
    if worker is None:
        return Verdict(False, "loading model")
    if getattr(worker, "fault", None) is not None:
        return Verdict(False, "fault: exiting")
    if worker.draining:
        return Verdict(False, "draining")
    nc = getattr(worker, "nc", None)
    ex = getattr(worker, "executor", None)
    if (worker.ready or was_ready) and (ex is None or not ex.alive):
        return Verdict(False, "executor thread is not running")
    if not worker.ready:
        if was_ready:
            return Verdict(False, "stopping")
        return Verdict(False, "connecting to the broker" if nc is None else "starting")
    if nc is None or not nc.is_connected:
        return Verdict(False, "broker disconnected")
    return Verdict(True, "ready")
