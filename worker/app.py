"""The worker process: wires the stages together and owns their lifecycle.

Ingress -> pending queue -> admission -> executor thread -> completion drain. This module
owns the state that crosses stages (what is pending, what is in flight, which messages
are held) on the event loop, and the two ways out:

- graceful (SIGTERM, SIGINT, burst mode done): stop fetching, nak what was never admitted
  so the fleet takes it at once, let in-flight jobs finish within the grace period, nak the
  rest, flush, exit 0;
- fatal (the executor died, or anything that leaves the device in doubt): a watchdog
  forces the exit within 5 s whatever hangs; stop fetching, nak every held message and
  flush so the broker redelivers them now, not after the ack wait; exit 1.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import threading
import time
from collections import deque
from dataclasses import dataclass

import structlog
from nats.aio.msg import Msg

from schemas import ErrorCode, ErrorInfo, FinishReason, Result, Timing, Usage
from worker.admission import Admission
from worker.config import EngineConfig
from worker.connection import Security, connect
from worker.drain import Delivery, Drain, Settle
from worker.engine import Engine
from worker.executor import Executor, StepReport
from worker.ingress import Ingress, Limits, Outcome, Ticket, Validator
from worker.sequence import Completion
from worker.stats import WorkerStats
from worker.topology import Topology, verify

log = structlog.get_logger("worker")

FATAL_EXIT_S = 4.5  # the watchdog's deadline from the fault; the contract is under 5 s


@dataclass(frozen=True, slots=True)
class Options:
    """Everything that is not an engine field: identity, timing, policy knobs with defaults."""

    worker_id: str
    grace_s: float = 30.0  # SIGTERM: how long in-flight jobs may take to finish
    fetch_batch: int = 256  # most messages one pull asks for
    solo_from_attempt: int = 3  # a job delivered this often runs alone (suspected poison)
    connect_give_up_s: float = 30.0
    burst: bool = False  # exit once the consumer has nothing pending and nothing is held
    max_step_tokens: int | None = None


class Worker:
    def __init__(self, cfg: EngineConfig, opts: Options, engine: Engine, topo: Topology,
                 security: Security):
        self.cfg, self.opts, self.engine, self.topo, self.security = cfg, opts, engine, topo, security
        self.admission = Admission(cfg.token_budget, cfg.low_water)
        self.pending: deque[Ticket] = deque()
        self.pending_tokens = 0
        self.inflight: dict[int, Ticket] = {}
        self.held: dict[int, Msg] = {}  # id(msg) -> msg for every message not yet settled
        self.stats = WorkerStats()
        self.limits = Limits(vocab_size=engine.loaded.args.vocab_size, max_seq_len=cfg.max_seq_len,
                             budget_tokens=cfg.token_budget, block_size=engine.block_size,
                             reply_prefix=topo.results_prefix)
        self._rng = random.Random()
        self._stop: asyncio.Future[str] | None = None
        self.ready = False
        self.draining = False

    # -- wiring ----------------------------------------------------------------------

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = loop.create_future()
        self.nc = await connect(self.cfg.nats_url, self.opts.worker_id, self.security,
                                self.opts.connect_give_up_s)
        self.js = self.nc.jetstream()
        await verify(self.js, self.topo)
        sub = await self.js.pull_subscribe_bind(durable=self.topo.consumer, stream=self.topo.jobs_stream)
        self.executor = Executor(
            self.engine,
            on_complete=lambda c: loop.call_soon_threadsafe(self._on_completions, c),
            on_step=self._on_step,
            on_fatal=lambda e: loop.call_soon_threadsafe(self.stop, f"fatal: {e!r}"),
            backlog=lambda: len(self.pending),
        )
        in_flight_jobs = self.cfg.token_budget // self.engine.block_size
        self.drain = Drain(self.js, maxsize=in_flight_jobs + 2 * self.opts.fetch_batch + 1024)
        self.ingress = Ingress(sub, Validator(self.limits, self.engine.loaded.tokenizer),
                               self._room, self._on_ticket, self._on_outcome)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop, sig.name)
        self.executor.start()
        tasks = [self._supervised(c) for c in (self.drain.run(), self._heartbeats())]
        ingress_task = self._supervised(self.ingress.run())
        if self.opts.burst:
            tasks.append(self._supervised(self._burst_watch()))
        self.ready = True
        log.info("worker_ready", worker=self.opts.worker_id)
        reason = await self._stop
        self.ready = False
        if reason.startswith("fatal"):
            code = await self._teardown_fatal(reason, ingress_task)
        else:
            code = await self._teardown_graceful(reason, ingress_task)
        for t in tasks:
            t.cancel()
        log.info("worker_summary", worker=self.opts.worker_id, exit_reason=reason, exit_code=code,
                 **self.stats.summary())
        return code

    def _supervised(self, coro) -> asyncio.Task:
        """A stage task that ends with an exception takes the worker down: fatal, not silent."""
        task = asyncio.create_task(coro, name=coro.__qualname__)

        def check(t: asyncio.Task) -> None:
            if not t.cancelled() and t.exception() is not None:
                log.error("stage_failed", stage=t.get_name(), error=repr(t.exception()))
                self.stop(f"fatal: {t.get_name()} failed: {t.exception()!r}")
        task.add_done_callback(check)
        return task

    def stop(self, reason: str) -> None:
        if self._stop is not None and not self._stop.done():
            log.info("worker_stopping", reason=reason)
            self._stop.set_result(reason)

    # -- ingress and admission ---------------------------------------------------------

    def _room(self) -> int:
        if self.draining:
            return 0
        free = self.cfg.token_budget - self.pending_tokens
        return min(self.opts.fetch_batch, free // self.engine.block_size)

    def _hold(self, msg: Msg, attempt: int) -> None:
        self.held[id(msg)] = msg
        if attempt > 1:
            self.stats.redelivered += 1

    def _on_ticket(self, t: Ticket) -> None:
        self._hold(t.msg, t.attempt)
        if self.draining:
            self._nak(t.msg)
            return
        self.pending.append(t)
        self.pending_tokens += t.reserved_tokens
        self._admit()

    def _admit(self) -> None:
        admitted = self.admission.admit(self.pending, lambda t: t.reserved_tokens)
        if admitted:
            now = time.monotonic()
            reqs = []
            for t in admitted:
                self.pending_tokens -= t.reserved_tokens
                t.admitted_at = now
                self.inflight[t.key] = t
                seed = t.job.sampling.seed
                reqs.append(t.request(self._rng.getrandbits(63) if seed is None else seed,
                                      solo=t.attempt >= self.opts.solo_from_attempt))
            self.executor.submit(reqs)
            self.ingress.room_changed.set()
        self.stats.occupancy(self.admission.occupancy, queued=bool(self.pending))

    def _on_outcome(self, o: Outcome) -> None:
        self._hold(o.msg, o.attempt)
        now = time.monotonic()
        ok = o.error is None
        res = Result(id=o.job_id, ok=ok, finish_reason=o.finish_reason, error=o.error,
                     usage=Usage(prompt_tokens=o.prompt_tokens),
                     timing=Timing(total_ms=(now - o.arrived_at) * 1e3),
                     worker=self.opts.worker_id, attempt=o.attempt)
        self._count(res)
        log.info("job_rejected" if not ok else "job_answered_at_edge", job=o.job_id,
                 attempt=o.attempt, code=o.error.code.value if o.error else None,
                 reason=o.error.message if o.error else None)
        self._deliver(o.msg, res, o.reply_to, Settle.TERM if o.terminate else Settle.ACK)

    # -- completions -------------------------------------------------------------------

    def _on_step(self, r: StepReport) -> None:
        # Executor thread: only this thread writes the step counters.
        self.stats.on_step(r)

    def _on_completions(self, comps: list[Completion]) -> None:
        now = time.monotonic()
        tok = self.engine.loaded.tokenizer
        for c in comps:
            t = self.inflight.pop(c.key)
            self.admission.release(t.reserved_tokens)
            ok = c.error is None
            res = Result(
                id=t.job.id, ok=ok, tokens=c.tokens,
                text=tok.decode(c.tokens) if ok else None,
                finish_reason=FinishReason(c.finish_reason),
                error=None if ok else ErrorInfo(code=ErrorCode.INTERNAL, message=c.error or ""),
                usage=Usage(prompt_tokens=len(t.prompt), completion_tokens=len(c.tokens),
                            padded_tokens=c.computed_tokens),
                timing=Timing(queued_ms=(t.admitted_at - t.arrived_at) * 1e3,
                              first_token_ms=(c.first_token_at - t.arrived_at) * 1e3,
                              total_ms=(now - t.arrived_at) * 1e3),
                worker=self.opts.worker_id, attempt=t.attempt,
            )
            self._count(res)
            self.stats.on_result(res)
            self._deliver(t.msg, res, t.job.reply_to, Settle.ACK if ok else Settle.NAK)
        self._admit()

    def _count(self, res: Result) -> None:
        if res.ok:
            self.stats.jobs_ok += 1
        else:
            self.stats.jobs_error += 1
            self.stats.errors_by_code[res.error.code.value] += 1

    def _deliver(self, msg: Msg, res: Result, reply_to: str | None, settle: Settle) -> None:
        def done(_as_asked: bool) -> None:
            self.held.pop(id(msg), None)
        self.drain.put(Delivery(msg, res, reply_to, settle, on_done=done))

    def _nak(self, msg: Msg) -> None:
        self.held.pop(id(msg), None)
        self.stats.naked += 1
        asyncio.ensure_future(_quiet(msg.nak()))

    # -- background duties -------------------------------------------------------------

    async def _heartbeats(self) -> None:
        """Tell the broker held jobs are alive, so the ack wait can be short."""
        period = max(1.0, self.topo.ack_wait_s / 3)
        while True:
            await asyncio.sleep(period)
            for msg in list(self.held.values()):
                await _quiet(msg.in_progress())

    async def _burst_watch(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self.held:
                continue
            info = await self.js.consumer_info(self.topo.jobs_stream, self.topo.consumer)
            if info.num_pending == 0 and info.num_ack_pending == 0 and not self.held:
                self.stop("burst: queue empty")
                return

    # -- the ways out ------------------------------------------------------------------

    async def _stop_ingress(self, task: asyncio.Task, wait_s: float) -> None:
        self.draining = True
        self.ingress.stop()
        try:
            await asyncio.wait_for(task, wait_s)
        except (asyncio.TimeoutError, asyncio.CancelledError):
            pass
        for t in self.pending:
            self._nak(t.msg)
        self.pending.clear()
        self.pending_tokens = 0

    async def _teardown_graceful(self, reason: str, ingress_task: asyncio.Task) -> int:
        await self._stop_ingress(ingress_task, self.ingress.fetch_timeout_s + 1.0)
        deadline = time.monotonic() + self.opts.grace_s
        while self.inflight and time.monotonic() < deadline and self.executor.alive:
            await asyncio.sleep(0.05)
        self.executor.stop(timeout_s=2.0)
        for t in list(self.inflight.values()):
            self._nak(t.msg)
        self.inflight.clear()
        await self.drain.flush(timeout_s=5.0)
        await self._close()
        return 0

    async def _teardown_fatal(self, reason: str, ingress_task: asyncio.Task) -> int:
        fault_at = time.monotonic()
        threading.Thread(target=_watchdog, args=(fault_at,), daemon=True).start()
        await self._stop_ingress(ingress_task, 1.0)
        for msg in list(self.held.values()):
            self._nak(msg)
        self.inflight.clear()
        try:
            await asyncio.wait_for(self.nc.flush(), 1.0)
        except Exception as e:  # noqa: BLE001 - we are leaving either way; the watchdog bounds it
            log.warning("flush_failed", error=repr(e))
        await self._close()
        log.error("worker_fatal", reason=reason, teardown_s=round(time.monotonic() - fault_at, 3))
        return 1

    async def _close(self) -> None:
        try:
            await asyncio.wait_for(self.nc.flush(), 2.0)
            await asyncio.wait_for(self.nc.close(), 2.0)
        except Exception as e:  # noqa: BLE001 - closing a broken connection may fail; unacked = redelivered
            log.warning("close_failed", error=repr(e))


async def _quiet(aw) -> None:
    try:
        await aw
    except Exception as e:  # noqa: BLE001 - the broker redelivers what we could not settle
        log.debug("settle_failed", error=repr(e))


def _watchdog(fault_at: float) -> None:
    time.sleep(max(0.0, FATAL_EXIT_S - (time.monotonic() - fault_at)))
    os._exit(1)
