"""One step of the executor's loop, and running requests to completion offline.

`turn` is the executor's step (schedule is the caller's; this is run and postprocess),
overlapped when the scheduler overlaps. `generate` runs requests to completion in the
calling thread with the same scheduler and runner the executor uses; tests and the
kernel-only benchmark ceiling use it.
"""

from __future__ import annotations

import time

from worker.engine.build import Engine
from worker.engine.fetch import Launched
from worker.engine.runner import Runner, Step
from worker.engine.scheduler import Scheduler, StepPlan
from worker.engine.sequence import Completion, Request


def generate(engine: Engine, reqs: list[Request]) -> list[Completion]:
    """Run requests to completion in this thread, all admitted at once (they must fit)."""
    sched, runner = engine.scheduler(), engine.runner()
    sched.add_all(reqs, time.monotonic())
    done: list[Completion] = []
    while sched.has_work():
        plan = sched.schedule()
        launched = runner.launch(runner.prepare(plan))
        tokens = launched.wait()
        done.extend(sched.postprocess(plan, tokens, time.monotonic(), launched.logprobs))
    return done


def turn(sched: Scheduler, runner: Runner, plan: StepPlan,
         inflight: Launched | None) -> tuple[Step | None, Launched | None, list[Completion]]:
    """One step of the executor's loop, overlapped when the scheduler overlaps
    (`overlapped_turn`), else prepare, run and postprocess `plan` (`inflight` stays None)."""
    if sched.overlap:
        return overlapped_turn(sched, runner, plan, inflight)
    if not plan:  # everything it held was ended between the check for work and this step
        return None, None, []
    step = runner.prepare(plan)
    launched = runner.launch(step)
    tokens = launched.wait()
    return step, None, sched.postprocess(plan, tokens, time.monotonic(), launched.logprobs)


def overlapped_turn(sched: Scheduler, runner: Runner, plan: StepPlan,
                    inflight: Launched | None) -> tuple[Step | None, Launched | None,
                                                        list[Completion]]:
    """One turn of the overlapped loop: launch `plan` (if it has rows), then read and
    postprocess the step launched before it, which ran on the device meanwhile.

    Returns the prepared step, the launched one (the next turn's `inflight`) and the
    completions of the step read. An empty plan only reads `inflight` (to end the loop).
    """
    step = runner.prepare(plan, inflight) if plan else None
    launched = runner.launch(step, inflight) if step is not None else None
    if launched is not None:
        sched.launched(plan)
    done = ([] if inflight is None
            else sched.postprocess(inflight.plan, inflight.wait(), time.monotonic(),
                                   inflight.logprobs))
    return step, launched, done
