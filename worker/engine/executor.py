"""The executor: the one thread that owns the model, the KV pool and the device.

Work comes in through `submit` (a bounded hand-off, thread-safe), results go out through
a callback the event loop provides (it must not block: the event loop side uses
`call_soon_threadsafe`). The loop is schedule, run, postprocess; with the pipelined
runner it is schedule, launch, then postprocess the step launched before (overlap: the
device runs step N+1 while the host reads step N's tokens and builds N+2, see
`worker.engine.scheduler`). The thread never awaits,
never touches NATS, and treats any exception as fatal: it reports it through `on_fatal`
and stops, because a device in an unknown state must not serve another job. A failure that
belongs to one job (its grammar, its logprobs) is not such a state: the scheduler ends that
job alone with an error Completion, and the rest of the batch goes on.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog
import torch

from worker.ops import failpoints
from worker.engine.build import Engine
from worker.engine.governor import ThreadGovernor
from worker.engine.fetch import Launched
from worker.engine.scheduler import StepPlan
from worker.engine.sequence import Completion, Request
from worker.engine.step import overlapped_turn, turn
from worker.engine.threads import off_main

log = structlog.get_logger("executor")


@dataclass(slots=True)
class StepReport:
    """What one step did; the metrics and the benchmark read these."""

    prefill_seqs: int
    decode_seqs: int
    rows: int  # packed token rows through the dense layers
    attn_real: int  # attention query x key pairs needed
    attn_padded: int  # attention pairs computed, padding included
    step_s: float
    idle_s: float  # time the executor waited for work before this step
    idle_while_queued_s: float  # part of idle_s during which jobs waited upstream
    graphed: bool = False  # a fixed-shape decode step (pipelined runner)
    mask_s: float = 0.0  # host time filling structured-output masks (0: none constrained)


class Executor:
    def __init__(self, engine: Engine,
                 on_complete: Callable[[list[Completion]], None],
                 on_step: Callable[[StepReport], None],
                 on_fatal: Callable[[BaseException], None],
                 backlog: Callable[[], int] = lambda: 0,
                 failpoint: Callable[[str], None] = failpoints.hit,
                 governor: ThreadGovernor | None = None,
                 on_progress: Callable[[list[tuple[int, int]]], None] = lambda _: None):
        self.pool = engine.pool
        # Intra-op threads: fixed (torch's count when the thread starts), or chosen by
        # measurement (`governor`, CPU workers whose count was not set explicitly).
        self.governor = governor
        self.threads = governor.threads if governor else torch.get_num_threads()
        args = engine.loaded.args
        # An attention pair's cost in token rows: 4*dim flops a layer against 2 per parameter.
        self._attn_per_row = 2 * args.dim * args.n_layers / max(1, args.num_params())
        self.runner = off_main(engine.runner)  # its buffers: no OpenMP team on this thread
        self.overlap = engine.overlaps
        self._inflight: Launched | None = None  # overlap: the step on the device
        g = self.runner.graphs
        log.info("runner_ready", mode=self.runner.mode, overlap=self.overlap,
                 intra_op_threads=self.threads, adaptive_threads=governor is not None,
                 decode_graphs=None if g is None else g.status,
                 batch_buckets=None if g is None else list(g.batch_buckets),
                 ctx_buckets=None if g is None else list(g.ctx_buckets))
        self.scheduler = engine.scheduler(overlap=self.overlap)
        self._inbox: queue.Queue[list[Request]] = queue.Queue(maxsize=1024)
        self._ends: queue.SimpleQueue[tuple[int, str, tuple[str, str] | None]] = queue.SimpleQueue()
        self._on_complete = on_complete
        self._on_progress = on_progress  # (key, token) of watched requests, each step
        self._on_step = on_step
        self._on_fatal = on_fatal
        self._backlog = backlog  # jobs waiting for admission upstream (read, never written)
        self._failpoint = failpoint
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="executor", daemon=True)

    # -- called from the event loop --------------------------------------------------

    def start(self) -> None:
        self._thread.start()

    def submit(self, reqs: list[Request]) -> None:
        # Admission bounds what is in flight by tokens, so this never blocks in practice;
        # the queue bound is a second line of defence against a bug upstream.
        self._inbox.put(reqs, timeout=5.0)

    def end(self, key: int, reason: str, error: tuple[str, str] | None = None) -> None:
        """End a job at the next step boundary (cancelled, a stop string found, or "error":
        a part of it failed on the loop, `error` = (code, why)); its Completion says
        `reason` and holds the tokens so far. A key not held is ignored."""
        self._ends.put((key, reason, error))
        self._inbox.put_nowait([])  # wake it if it is waiting for work

    def stop(self, timeout_s: float) -> bool:
        """Ask the thread to stop after its current step; True if it ended in time."""
        self._stop.set()
        self._inbox.put_nowait([])  # wake it if it is waiting for work
        self._thread.join(timeout_s)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # -- read from other threads (unlocked: a stale value, never a wrong one) ----------

    def running_keys(self) -> list[int]:
        """The keys of the sequences in the running batch."""
        return [seq.req.key for seq in list(self.scheduler.running)]

    @property
    def running_jobs(self) -> int:
        return len(self.scheduler.running)

    # -- the thread --------------------------------------------------------------------

    def _take(self, block: bool) -> None:
        try:
            reqs = self._inbox.get(timeout=0.1) if block else self._inbox.get_nowait()
            while True:
                self.scheduler.add_all(reqs, time.monotonic())
                reqs = self._inbox.get_nowait()
        except queue.Empty:
            pass
        if not self._ends.empty():
            self._end_asked()

    def _end_asked(self) -> None:
        done = []
        while True:
            try:
                key, reason, error = self._ends.get_nowait()
            except queue.Empty:
                break
            if (c := self.scheduler.end(key, reason, time.monotonic(), error)) is not None:
                done.append(c)
        if done:
            self._on_complete(done)

    def _main(self) -> None:
        try:
            if self.runner.device.type == "cuda":
                torch.cuda.set_device(self.runner.device)  # this thread's kernels, streams, events
            if self.governor is not None:
                torch.set_num_threads(self.threads)  # OpenMP's count is per thread: this one's
            idle_since: float | None = None
            idle_queued = 0.0
            while not self._stop.is_set():
                if not self.scheduler.has_work():
                    t0 = time.monotonic()
                    idle_since = idle_since or t0
                    queued = self._backlog() > 0
                    self._take(block=True)
                    if queued:
                        idle_queued += time.monotonic() - t0
                    continue
                self._take(block=False)
                idle_s = time.monotonic() - idle_since if idle_since else 0.0
                idle_since = None
                self._step(idle_s, idle_queued)
                idle_queued = 0.0
            if self._inflight is not None:  # stopping: report the step already computed
                self._finish_inflight()
        except BaseException as e:  # noqa: BLE001 - any failure here is fatal by design
            log.error("executor_failed", error=repr(e))
            self._on_fatal(e)

    def _finish_inflight(self) -> None:
        _, _, done = overlapped_turn(self.scheduler, self.runner, StepPlan(), self._inflight)
        self._inflight = None
        if done:
            self._on_complete(done)

    def _step(self, idle_s: float, idle_queued_s: float) -> None:
        t0 = time.perf_counter()
        plan = self.scheduler.schedule()
        self._failpoint("executor.step")
        # Overlapped: launch this step, then read the previous one's tokens while the device
        # runs (an empty plan: everything running is in flight and ends there).
        step, self._inflight, done = turn(self.scheduler, self.runner, plan, self._inflight)
        if done:
            self._on_complete(done)
        if self.scheduler.progress:
            progress, self.scheduler.progress = self.scheduler.progress, []
            self._on_progress(progress)
        if step is None:
            return
        shape = step.shape
        step_s = time.perf_counter() - t0
        self._on_step(StepReport(
            prefill_seqs=sum(len(lane) for lane in plan.prefill), decode_seqs=len(plan.decode),
            rows=shape.rows, attn_real=shape.attn_real, attn_padded=shape.attn_padded,
            graphed=shape.graphed, mask_s=shape.mask_s,
            step_s=step_s, idle_s=idle_s, idle_while_queued_s=idle_queued_s,
        ))
        if self.governor is not None:
            self._govern(shape.rows + shape.attn_padded * self._attn_per_row, step_s)

    def _govern(self, work: float, step_s: float) -> None:
        g = self.governor
        decided = g.last
        n = g.on_step(work, step_s)
        if n is not None:
            torch.set_num_threads(n)
            self.threads = n
        if g.last is not decided:
            # A change is news; a probe that confirms the count is not.
            changed = decided is None or g.last.threads != decided.threads
            (log.info if changed else log.debug)(
                "intra_op_threads", threads=g.last.threads, reason=g.last.reason,
                work_per_s={k: round(v) for k, v in sorted(g.last.rates.items())})
