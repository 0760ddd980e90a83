"""Liveness and readiness: two questions about the worker, answered from its own state.

- alive (`/healthz`): the process answers, no fault has been declared, and the executor
  thread, once started, is running. While the model loads or the broker connects the
  worker is alive but not ready. A fault (a dead or stalled executor, a broker gone too
  long) exits the process within 5 s by itself; failing this probe meanwhile is for humans
  and for the rare case the exit does not happen.
- ready (`/readyz`): connected to the broker, model loaded, executor running, serving, not
  draining. Workers pull, so nothing routes to them; readiness is for rollouts, compose's
  `depends_on` and humans, and the reason says which condition is missing.

Pure functions of a `WorkerView` (or None before a worker exists).
"""

from __future__ import annotations

from dataclasses import dataclass

from worker.ops.view import WorkerView


@dataclass(frozen=True, slots=True)
class Verdict:
    ok: bool
    reason: str  # short, stable, for humans and probes: "ready", "draining", ...

    def body(self) -> dict[str, object]:
        return {"ok": self.ok, "reason": self.reason}


def liveness(v: WorkerView | None) -> Verdict:
    if v is None:
        return Verdict(True, "loading model")
    if v.faulted:
        return Verdict(False, "fault: exiting")
    if not v.started:
        return Verdict(True, "starting")
    if v.executor_alive:
        return Verdict(True, "alive")
    return Verdict(False, "executor thread is not running")


def readiness(v: WorkerView | None, was_ready: bool = False) -> Verdict:
    """`was_ready`: the worker has been ready before, so not-ready-now means stopping."""
    if v is None:
        return Verdict(False, "loading model")
    if v.faulted:
        return Verdict(False, "fault: exiting")
    if v.draining:
        return Verdict(False, "draining")
    if (v.ready or was_ready) and not (v.started and v.executor_alive):
        return Verdict(False, "executor thread is not running")
    if not v.ready:
        if was_ready:
            return Verdict(False, "stopping")
        return Verdict(False, "connecting to the broker" if v.connected is None else "starting")
    if not v.connected:
        return Verdict(False, "broker disconnected")
    return Verdict(True, "ready")
