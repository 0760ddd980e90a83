"""The worker's control on plain data: the intake (fetch sizing, the admission loop,
deadlines), the loop's watch, the fault and its exit watchdog, and the Result builders.
No NATS, no model: a message is a stand-in with the attributes that are read.
"""

from __future__ import annotations

import asyncio
import threading
import time
from types import SimpleNamespace

import pytest

from schemas import ErrorCode, ErrorInfo, FinishReason, Job, decode_result
from worker.admission import Intake
from worker.broker.replies import JobTimes, completion_payload, dead_letter, edge_result
from worker.broker.validate import Outcome, Ticket
from worker.engine.blocks import BlockPool, block_hashes, padded_tokens
from worker.engine.sequence import Completion
from worker.lifecycle import FaultKind, Lifecycle, Watch

BUDGET, LOW, MAX_SEQ, BLOCK = 4096, 2048, 1088, 16


def intake(fetch_batch: int = 64, solo_from: int = 3) -> Intake:
    return Intake(BlockPool(BUDGET // BLOCK, BLOCK), BUDGET, LOW, MAX_SEQ, fetch_batch, solo_from)


def done(i: Intake, t: Ticket) -> None:
    """The executor finished `t`: its blocks go back to the pool, then the loop hears of it."""
    i.pool.release(t.key)
    i.finished(t.key)


def fill(i: Intake) -> None:
    """Hold the whole budget (an earlier job that is still running)."""
    i.pool.reserve(-1, (), i.budget_blocks)
    i.admission.holding = True


class Msg(SimpleNamespace):
    """A JetStream delivery's readable parts."""


_keys = iter(range(1, 1 << 30))


def ticket(tokens: int = 100, attempt: int = 1, deadline_s: float | None = None,
           job_id: str | None = None) -> Ticket:
    key = next(_keys)
    # A prompt of its own per job, so nothing is shared (test_prefix.py shares).
    job = Job(id=job_id or f"j{key}", prompt=[key % 200 + 1] * (tokens - 10), max_new_tokens=10,
              reply_to="fabric.results.t", deadline_s=deadline_s)
    return Ticket(msg=Msg(key=key), job=job, key=key, attempt=attempt, prompt=job.prompt,
                  reserved_tokens=padded_tokens(tokens, BLOCK), arrived_at=time.monotonic(),
                  hashes=tuple(block_hashes(job.prompt, BLOCK)))


def arrive(i: Intake, t: Ticket, last_fetch_len: int = 64) -> bool:
    i.hold(t.msg, t.attempt, last_fetch_len)
    return i.offer(t)


# -- fetch sizing ------------------------------------------------------------------------


def test_a_new_worker_pulls_one_message_until_one_brings_a_healthy_job() -> None:
    i = intake()
    assert i.cautious and i.room() == 1  # a restart: a crash's redeliveries lead the queue
    arrive(i, ticket(), last_fetch_len=1)
    assert not i.cautious and i.room() > 1


def test_a_suspect_makes_the_worker_cautious_and_while_it_runs_nothing_is_pulled() -> None:
    i = intake(solo_from=3)
    arrive(i, ticket(), last_fetch_len=1)
    assert i.room() > 1
    suspect = ticket(attempt=3)
    arrive(i, suspect)
    assert i.cautious and i.room() == 1
    got = i.admit(time.monotonic(), time.time())
    assert suspect in got.run and i.solo_inflight == 1 and i.room() == 0
    done(i, suspect)
    assert i.solo_inflight == 0 and i.room() == 1


def test_the_pull_is_sized_to_one_admission_group_by_the_recent_job_size() -> None:
    i = intake(fetch_batch=1000)
    i.cautious = False
    # pending_cap = budget - low water; the estimate starts at 256 tokens a job.
    assert i.pending_cap_tokens == BUDGET - LOW
    assert i.room() == (BUDGET - LOW) // 256
    for _ in range(200):  # jobs of 112 tokens, admitted as they come, pull the estimate down
        arrive(i, ticket(112))
        done(i, i.admit(time.monotonic(), time.time()).run[0])
    assert (BUDGET - LOW) // 140 < i.room() <= (BUDGET - LOW) // 112
    fill(i)  # nothing is admitted: the pending queue fills to its cap
    while i.room():
        arrive(i, ticket(112))
    assert i.pending_tokens >= i.pending_cap_tokens - 2 * 112


def test_the_pull_never_takes_more_messages_than_the_held_bound() -> None:
    i = intake(fetch_batch=64)
    i.cautious = False
    for n in range(i.held_cap - 3):
        i.hold(Msg(key=-n), 1, 64)
    assert i.room() == 3
    i.draining = True
    assert i.room() == 0


def test_a_job_fetched_while_draining_is_kept_for_the_nak() -> None:
    i = intake()
    i.draining = True
    t = ticket()
    assert not arrive(i, t) and i.refused == [t.msg] and not i.pending
    assert i.take_unadmitted() == [t.msg] and i.refused == []


# -- the admission loop ------------------------------------------------------------------


def test_admission_admits_a_group_then_holds_until_low_water() -> None:
    i = intake()
    tickets = [ticket(1000) for _ in range(6)]  # 1008 padded tokens each
    for t in tickets:
        arrive(i, t)
    first = i.admit(1.0, time.time())
    assert first.run == tickets[:4] and not first.expired
    assert i.admission.holding and i.busy_since == 1.0
    assert [t.admitted_at for t in first.run] == [1.0] * 4
    assert i.pending_tokens == 2 * 1008
    done(i, tickets[0])  # 3024 in flight: above low water, still holding
    assert not i.admit(2.0, time.time())
    done(i, tickets[1])  # 2016: at low water, the next group enters
    assert i.admit(3.0, time.time()).run == tickets[4:]
    assert i.busy_since == 1.0  # never idle in between
    assert i.finished(12345) is None  # unknown (already finished) keys are ignored


def test_a_job_that_expired_waiting_is_answered_and_its_room_goes_to_the_next() -> None:
    i = intake()
    now = time.time()
    big = ticket(2000)
    late = ticket(2000, deadline_s=now - 1)  # never reserved: its room goes to `after`
    after = ticket(2000)
    for t in (big, late, after):
        arrive(i, t)
    got = i.admit(1.0, now)
    assert got.run == [big, after] and got.expired == [late]
    assert i.in_flight_tokens == big.reserved_tokens + after.reserved_tokens
    assert i.pending_tokens == 0 and late.key not in i.inflight


def test_pending_jobs_past_their_deadline_are_swept() -> None:
    i = intake()
    now = time.time()
    fill(i)  # nothing admits
    keep, late = ticket(200, deadline_s=now + 60), ticket(300, deadline_s=now - 1)
    for t in (keep, late):
        arrive(i, t)
    assert i.expire_pending(now) == [late]
    assert list(i.pending) == [keep] and i.pending_tokens == keep.reserved_tokens
    assert i.expire_pending(now) == []


# -- the loop's watch ------------------------------------------------------------------


def test_the_watch_names_a_dead_executor_a_stall_and_a_lost_broker() -> None:
    w = Watch(step_timeout_s=60, broker_give_up_s=120)
    assert w.check(100.0, True, 5, 90.0, True) is None
    assert w.check(100.0, False, 0, 0.0, True)[0] is FaultKind.EXECUTOR_GONE
    kind, detail = w.check(200.0, True, 5, 100.0, True)
    assert kind is FaultKind.EXECUTOR_STALLED and "5 jobs in flight" in detail
    assert w.check(200.0, True, 0, 100.0, True) is None  # idle is not a stall
    assert w.check(300.0, True, 0, 0.0, False) is None  # disconnected: the clock starts
    assert w.check(400.0, True, 0, 0.0, False) is None
    assert w.check(400.0, True, 0, 0.0, True) is None  # back in time: the clock resets
    assert w.check(500.0, True, 0, 0.0, False) is None
    kind, detail = w.check(621.0, True, 0, 0.0, False)
    assert kind is FaultKind.BROKER_UNREACHABLE and detail == "broker unreachable for 121s"


# -- the fault ---------------------------------------------------------------------------


def test_the_first_fault_wins_and_the_exit_watchdog_fires_from_the_fault() -> None:
    exits: list[tuple[int, float]] = []
    fired = threading.Event()

    def fake_exit(code: int) -> None:
        exits.append((code, time.monotonic()))
        fired.set()

    life = Lifecycle(exit_s=0.2, exit_fn=fake_exit)
    life.declare(FaultKind.EXECUTOR_STALLED, "executor stalled: no step finished in 61.0s")
    life.declare(FaultKind.BROKER_UNREACHABLE, "broker unreachable for 121s")
    assert life.fault.kind is FaultKind.EXECUTOR_STALLED
    assert life.fault.reason == "fatal: executor stalled: no step finished in 61.0s"
    assert fired.wait(5)
    time.sleep(0.3)
    assert len(exits) == 1 and exits[0][0] == 1
    assert 0.15 <= exits[0][1] - life.fault.at < 2.0


def test_a_stop_resolves_once_with_its_reason_and_a_fault_after_it_changes_nothing() -> None:
    async def run() -> tuple[str, bool]:
        life = Lifecycle(exit_s=60, exit_fn=lambda code: None)
        life.bind(asyncio.get_running_loop())
        assert not life.stopping
        life.stop("SIGTERM")
        life.stop("burst: queue empty")
        return await life.wait(), life.stopping

    assert asyncio.run(run()) == ("SIGTERM", True)


def test_a_fault_from_another_thread_ends_the_wait_with_its_reason() -> None:
    async def run() -> str:
        life = Lifecycle(exit_s=60, exit_fn=lambda code: None)
        life.bind(asyncio.get_running_loop())
        threading.Thread(target=life.declare,
                         args=(FaultKind.EXECUTOR_FAILED, "executor failed: boom")).start()
        return await asyncio.wait_for(life.wait(), 5)

    assert asyncio.run(run()) == "fatal: executor failed: boom"


# -- what goes on the wire ---------------------------------------------------------------


def test_a_completion_becomes_a_result_with_the_jobs_timings() -> None:
    t = ticket(40, attempt=2, job_id="job-7")
    t.arrived_at, t.admitted_at = 10.0, 10.5
    c = Completion(key=t.key, tokens=[5, 6, 7], finish_reason="stop", computed_tokens=33,
                   first_token_at=11.0)
    times = JobTimes.of(t, c, now=12.0)
    assert (times.queued_ms, times.first_token_ms, times.total_ms) == (500.0, 1000.0, 2000.0)
    r = decode_result(completion_payload(t, c, "abc", "w-1", times))
    assert (r.id, r.ok, r.tokens, r.text, r.finish_reason) == ("job-7", True, [5, 6, 7], "abc",
                                                               FinishReason.STOP)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.padded_tokens) == (30, 3, 33)
    assert (r.timing.queued_ms, r.timing.first_token_ms, r.timing.total_ms) == (500, 1000, 2000)
    assert (r.worker, r.attempt) == ("w-1", 2)


def test_an_edge_answer_and_a_dead_letter_carry_their_provenance() -> None:
    md = SimpleNamespace(stream="JOBS", sequence=SimpleNamespace(stream=42))
    msg = Msg(data=b"\x81\xa2id\xa1x", subject="fabric.jobs.a", metadata=md)
    why = "delivered 5 times (max_deliver 5) without an answer"
    o = Outcome(msg, "x", "fabric.results.t", 5, 3.0, FinishReason.ERROR,
                ErrorInfo(code=ErrorCode.POISON, message=why), dead_letter=why)
    res = edge_result(o, "w-1", now=3.25)
    assert (res.ok, res.error.code, res.timing.total_ms, res.attempt) == (
        False, ErrorCode.POISON, 250.0, 5)
    dl = dead_letter(o, "fabric.dlq.JOBS", "w-1", now_unix=1700000000.0)
    assert dl.subject == "fabric.dlq.JOBS" and dl.data == msg.data
    assert dl.headers == {
        "Nats-Msg-Id": "JOBS:42", "Fabric-Job-Id": "x", "Fabric-Stream": "JOBS",
        "Fabric-Stream-Seq": "42", "Fabric-Subject": "fabric.jobs.a", "Fabric-Deliveries": "5",
        "Fabric-Error": why, "Fabric-Worker": "w-1", "Fabric-Dead-At": "1700000000.000"}


@pytest.mark.parametrize("attempt", [1, 2])
def test_only_suspects_run_solo(attempt: int) -> None:
    i = intake(solo_from=2)
    t = ticket(attempt=attempt)
    assert i.is_solo(t) == (attempt >= 2)


def test_jobs_sharing_a_prefix_cost_the_budget_what_they_add() -> None:
    i = intake()
    system = list(range(1, 1001))  # 62 full blocks shared by every job
    tickets = []
    for n in range(8):
        t = ticket(20)
        prompt = system + [n + 1] * 10
        t.job = t.job.model_copy(update={"prompt": prompt})
        t.prompt, t.hashes = prompt, tuple(block_hashes(prompt, BLOCK))
        t.reserved_tokens = padded_tokens(len(prompt) + 10, BLOCK)  # 1024: 4 would fill it
        tickets.append(t)
        arrive(i, t)
    got = i.admit(1.0, time.time())
    assert got.run == tickets and not i.admission.holding  # all eight, in one budget
    assert i.in_flight_tokens == (64 + 7 * 2) * BLOCK  # the prefix once, two blocks each after
    assert [t.reservation.shared for t in tickets] == [0] + [62] * 7
    i.pool.check()


# -- priorities in the pending queue --------------------------------------------------


def _prio(priority: int, arrived_at: float | None = None) -> Ticket:
    t = ticket()
    t.job.priority = priority
    if arrived_at is not None:
        t.arrived_at = arrived_at
    return t


def test_pending_is_ordered_by_priority_and_fifo_within_one() -> None:
    i = intake()
    order = [5, 9, 5, 0, 9, 3, 0, 5]
    ts = [_prio(p) for p in order]
    for t in ts:
        assert arrive(i, t)
    got = [t.key for t in i.pending]
    want = [t.key for t in sorted(ts, key=lambda t: t.job.priority)]  # sorted() is stable
    assert got == want
    assert i.pending_tokens == sum(t.reserved_tokens for t in ts)
    # Admission takes them in that order.
    assert [t.key for t in i.admit(time.monotonic(), time.time()).run] == want[:len(i.inflight)]


def test_an_urgent_job_never_overtakes_one_that_waited_past_the_bound() -> None:
    from worker.broker.ingress import STARVE_AFTER_S
    i = intake()
    now = time.monotonic()
    old = _prio(9, arrived_at=now - STARVE_AFTER_S - 1)  # waited past the bound
    young = _prio(9, arrived_at=now - 0.1)
    for t in (old, young):
        assert arrive(i, t)
    urgent = _prio(0, arrived_at=now)
    assert arrive(i, urgent)
    assert [t.key for t in i.pending] == [old.key, urgent.key, young.key]
