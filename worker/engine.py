"""Building the device-side engine from the config, and running it offline.

`build_engine` does everything that can fail before the worker touches the broker: load
the weights, check that the budget and the longest job fit the model and the device, and
allocate the KV pool once. `generate` runs requests to completion in the calling thread
with the same scheduler and runner the executor uses; tests and the kernel-only
benchmark ceiling use it.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import torch

from worker.checkpoint import LoadedModel, load_model
from worker.kv import KVPool, blocks_for
from worker.lanes import LANE_MIN_WIDTH
from worker.runner import RUNNER_MODES, Launched, Runner, Step
from worker.scheduler import Policy, Scheduler, StepPlan
from worker.sequence import Completion, Request

BLOCK_SIZE = LANE_MIN_WIDTH
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class EngineError(ValueError):
    """The engine cannot start with this config; the message names the field."""


@dataclass(slots=True)
class Engine:
    loaded: LoadedModel
    pool: KVPool
    device: torch.device
    block_size: int
    max_step_tokens: int  # packed tokens per forward
    policy: Policy = "continuous"  # benchmark ladder only; the product is "continuous"
    runner_mode: str = "eager"  # worker.runner.RUNNER_MODES; "pipelined" is CUDA's default
    max_seq_len: int = 0  # the longest job (prompt + generation); bounds decode graph shapes

    def scheduler(self, overlap: bool = False) -> Scheduler:
        return Scheduler(self.pool.allocator, self.block_size, self.max_step_tokens,
                         self.loaded.eos_ids, policy=self.policy, overlap=overlap)

    @property
    def overlaps(self) -> bool:
        """Whether the executor launches a step before reading the last one's tokens."""
        return self.runner_mode == "pipelined" and self.policy == "continuous"

    def runner(self) -> Runner:
        runner = Runner(self.loaded.model, self.pool.tensor, self.device, self.runner_mode,
                        self.block_size, self.max_seq_len,
                        max_batch=min(512, self.pool.num_blocks))
        if runner.graphs is not None:
            runner.graphs.self_check()
        return runner


def resolve_runner(mode: str, device: torch.device) -> str:
    """`auto`: pipelined (pinned staging, decode graphs) on CUDA, eager on the CPU, where a
    fixed-shape step only adds padding and a copy buys nothing."""
    if mode == "auto":
        return "pipelined" if device.type == "cuda" else "eager"
    if mode not in RUNNER_MODES:
        raise EngineError(f"runner: {mode!r} is not one of auto, {', '.join(RUNNER_MODES)}")
    return mode


def resolve_device(name: str) -> torch.device:
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EngineError(f"device: {name!r} requested but CUDA is not available here")
        idx = dev.index or 0
        if idx >= torch.cuda.device_count():
            raise EngineError(f"device: {name!r} but only {torch.cuda.device_count()} GPU(s)")
        return torch.device("cuda", idx)
    if dev.type != "cpu":
        raise EngineError(f"device: {name!r} is not supported (cpu or cuda:N)")
    return dev


def build_engine(model: str, device: str, dtype: str, token_budget: int, max_seq_len: int,
                 max_step_tokens: int | None = None, policy: Policy = "continuous",
                 runner: str = "auto") -> Engine:
    from worker.checkpoint import CheckpointError

    dev = resolve_device(device)
    mode = resolve_runner(runner, dev)
    dt = DTYPES[dtype]
    try:
        loaded = load_model(model, dt, dev)
    except CheckpointError as e:
        raise EngineError(f"model: {e}") from None
    if max_seq_len > loaded.args.max_position:
        raise EngineError(f"max_seq_len: {max_seq_len} is over the model's "
                          f"{loaded.args.max_position} positions")
    # Every job is rounded up to whole blocks, so the pool holds the whole budget exactly.
    num_blocks = blocks_for(token_budget, BLOCK_SIZE)
    need = num_blocks * BLOCK_SIZE * KVPool.bytes_per_token(loaded.args, dt)
    if dev.type == "cuda":
        free, _total = torch.cuda.mem_get_info(dev)
        if need > free * 0.9:
            raise EngineError(f"token_budget: the KV pool needs {need / 2**30:.1f} GiB, "
                              f"{free / 2**30:.1f} GiB free on {dev}")
    pool = KVPool(loaded.args, num_blocks, BLOCK_SIZE, dt, dev)
    # A step is the running batch (at most one row per admitted job) plus whole prompts; the
    # cap keeps one step's activations bounded while letting the longest prompt through.
    step_cap = max_step_tokens or max(max_seq_len, 2048)
    return Engine(loaded, pool, dev, BLOCK_SIZE, step_cap, policy, mode, max_seq_len)


def build_engine_off_main(*args, **kwargs) -> Engine:
    """`build_engine` on a short-lived thread (`off_main`)."""
    return off_main(build_engine, *args, **kwargs)


def off_main(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on a short-lived thread, so this process's main thread never
    runs a parallel CPU op (loading a model, allocating and filling the runner's buffers).

    Why: with GNU OpenMP (torch's CPU backend on Linux) every thread that runs a parallel op
    keeps a team of worker threads, and once the process manages more OpenMP threads than
    there are CPUs, idle team threads stop spinning and sleep -- every later parallel op then
    pays futex wake-ups. Loading a model runs big parallel ops; done on the event loop's
    (main) thread, it leaves a second team beside the executor's, and on this 2-core machine
    each small op on the executor thread went from about 7 to about 60 us and the builtin
    model's serving rate fell by a third (measured in-process: 5,500 vs 3,750 tokens/s).
    The pipelined runner's buffers did the same (zero-filling 160k logits is a parallel op):
    built on the main thread, rung 5 ran 27 % below rung 4 on the CPU. A thread that exits
    takes its team with it, so the executor's is the only one left."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box.append(e)

    t = threading.Thread(target=run, name="off-main")
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]


def generate(engine: Engine, reqs: list[Request]) -> list[Completion]:
    """Run requests to completion in this thread, all admitted at once (they must fit)."""
    sched, runner = engine.scheduler(), engine.runner()
    sched.add_all(reqs, time.monotonic())
    done: list[Completion] = []
    while sched.has_work():
        plan = sched.schedule()
        done.extend(sched.postprocess(plan, runner.run(runner.prepare(plan)), time.monotonic()))
    return done


def turn(sched: Scheduler, runner: Runner, plan: StepPlan,
         inflight: Launched | None) -> tuple[Step | None, Launched | None, list[Completion]]:
    """One step of the executor's loop, overlapped when the scheduler overlaps
    (`overlapped_turn`), else prepare, run and postprocess `plan` (`inflight` stays None)."""
    if sched.overlap:
        return overlapped_turn(sched, runner, plan, inflight)
    step = runner.prepare(plan)
    return step, None, sched.postprocess(plan, runner.run(step), time.monotonic())


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
            else sched.postprocess(inflight.plan, inflight.wait(), time.monotonic()))
    return step, launched, done
