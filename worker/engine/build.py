"""Building the device-side engine from the config.

`build_engine` does everything that can fail before the worker touches the broker: load
the weights, check that the budget and the longest job fit the model and the device, and
allocate the KV pool once. The pool is sized by memory (`KvSizing`), never below the
budget: what in-flight jobs do not hold is prefix cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from worker.engine.blocks import blocks_for
from worker.engine.embedder import BlocksOnly, EmbedArgs, EmbedEngine, EmbedModel
from worker.engine.hosttier import worth_loading
from worker.engine.kv import KVPool
from worker.engine.ladder import make_scheduler
from worker.engine.lanes import LANE_MIN_WIDTH
from worker.engine.modes import RUNNER_MODES
from worker.engine.runner import Runner
from worker.engine.scheduler import Scheduler
from worker.engine.threads import off_main
from worker.model.checkpoint import CheckpointError, LoadedModel, load_model
from worker.model.fp8 import quantize_model
from worker.model.embed_checkpoint import is_encoder_checkpoint, load_encoder

BLOCK_SIZE = LANE_MIN_WIDTH
CPU_POOL_PER_BUDGET = 4  # the CPU pool's default: this many budgets' worth of blocks
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
    policy: str = "continuous"  # worker.engine.modes.POLICIES; others are the ladder's
    runner_mode: str = "eager"  # worker.engine.modes.RUNNER_MODES; "pipelined" is CUDA's default
    max_seq_len: int = 0  # the longest job (prompt + generation); bounds decode graph shapes
    budget_blocks: int = 0  # token_budget in blocks: the most a step's jobs hold
    task = "generate"  # what its jobs ask for (an embedding checkpoint: EmbedEngine, "embed")

    def scheduler(self, overlap: bool = False) -> Scheduler:
        return make_scheduler(self.policy, self.pool.blocks, self.block_size,
                              self.max_step_tokens, self.loaded.eos_ids, overlap=overlap)

    @property
    def overlaps(self) -> bool:
        """Whether the executor launches a step before reading the last one's tokens."""
        return self.runner_mode == "pipelined" and self.policy == "continuous"

    def runner(self) -> Runner:
        runner = Runner(self.loaded.model, self.pool.tensor, self.device, self.runner_mode,
                        self.block_size, self.max_seq_len,
                        max_batch=min(512, self.budget_blocks or self.pool.num_blocks))
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


@dataclass(frozen=True, slots=True)
class KvSizing:
    """How big the KV pool and the host tier are; every field has a default that works."""

    pool_blocks: int = 0  # the device pool in blocks; 0: by `pool_gib` or the device's default
    pool_gib: float = 0.0  # the device pool in GiB; 0: the default
    memory_fraction: float = 0.8  # CUDA's default: this share of the memory free after weights
    host_gib: float | None = None  # the host tier (CUDA only); None: 4 GiB on CUDA, 0 on CPU


def pool_blocks(sizing: KvSizing, budget_blocks: int, block_bytes: int,
                free_bytes: int | None) -> tuple[int, str]:
    """The device pool's size in blocks and where it came from. `free_bytes`: the device
    memory free after the weights (None: the CPU, whose default is a few budgets)."""
    if sizing.pool_blocks:
        n, why = sizing.pool_blocks, "kv_pool_blocks"
    elif not block_bytes:  # a model without layers (builtin:null) keeps no KV
        return budget_blocks, "token_budget (no KV)"
    elif sizing.pool_gib:
        n, why = int(sizing.pool_gib * 2**30 // block_bytes), "kv_pool_gib"
    elif free_bytes is not None:
        if not 0 < sizing.memory_fraction < 1:
            raise EngineError(f"kv_memory_fraction: {sizing.memory_fraction} is not in (0, 1)")
        n, why = int(free_bytes * sizing.memory_fraction // block_bytes), "kv_memory_fraction"
    else:
        return CPU_POOL_PER_BUDGET * budget_blocks, f"{CPU_POOL_PER_BUDGET} x token_budget"
    if n < budget_blocks:
        raise EngineError(f"{why}: the KV pool of {n} blocks ({n * block_bytes / 2**30:.2f} GiB) "
                          f"is smaller than token_budget's {budget_blocks}")
    if free_bytes is not None and n * block_bytes > free_bytes * 0.95:
        raise EngineError(f"{why}: the KV pool needs {n * block_bytes / 2**30:.1f} GiB, "
                          f"{free_bytes / 2**30:.1f} GiB free")
    return n, why


def min_load_blocks(num_params: int, block_bytes: int) -> int:
    """The shortest host hit worth reading back rather than recomputing, by a rough model:
    a PCIe copy at 20 GB/s after 20 us of latency against a prefill at 100 TFLOP/s (2
    FLOPs per parameter per token). A small model recomputes; a large one always copies."""
    prefill_s = 2 * num_params * BLOCK_SIZE / 1e14
    for n in range(1, 65):
        if worth_loading(n, block_bytes, 20e9, 20e-6, prefill_s):
            return n
    return 1 << 30


def build_engine(model: str, device: str, dtype: str, token_budget: int, max_seq_len: int,
                 max_step_tokens: int | None = None, policy: str = "continuous",
                 runner: str = "auto", prefix_cache: bool = True,
                 kv: KvSizing = KvSizing()) -> Engine | EmbedEngine:
    dev = resolve_device(device)
    mode = resolve_runner(runner, dev)
    # fp8: the decoder's projections in e4m3 (worker.model.fp8); everything else, the KV
    # pool included, in the compute dtype -- bfloat16 on CUDA, float32 on the CPU.
    fp8 = dtype == "fp8"
    dt = (torch.bfloat16 if dev.type == "cuda" else torch.float32) if fp8 else DTYPES[dtype]
    if not model.startswith("builtin:") and is_encoder_checkpoint(model):
        if fp8:
            raise EngineError("dtype: fp8 is for generation models; an embedding model runs "
                              "in bfloat16, float16 or float32")
        return _embed_engine(model, dev, dt, token_budget, max_seq_len, max_step_tokens)
    try:
        loaded = load_model(model, dt, dev, fp8=fp8)
    except CheckpointError as e:
        raise EngineError(f"model: {e}") from None
    if fp8:
        quantize_model(loaded.model, dt)
    if max_seq_len > loaded.args.max_position:
        raise EngineError(f"max_seq_len: {max_seq_len} is over the model's "
                          f"{loaded.args.max_position} positions")
    # Every job is rounded up to whole blocks, so the budget is whole blocks; the pool
    # holds at least that, and the rest is cache.
    budget_blocks = blocks_for(token_budget, BLOCK_SIZE)
    block_bytes = BLOCK_SIZE * KVPool.bytes_per_token(loaded.args, dt)
    free = torch.cuda.mem_get_info(dev)[0] if dev.type == "cuda" else None
    num_blocks, sized_by = pool_blocks(kv, budget_blocks, block_bytes, free)
    host_gib = kv.host_gib if kv.host_gib is not None else 4.0 * (dev.type == "cuda")
    if host_gib and dev.type != "cuda":
        raise EngineError("host_tier_gib: the host tier is for GPU workers (on the CPU the "
                          "device pool is host memory already)")
    # Prefix caching is the product's; the ladder's older policies predate it (their
    # padding rows would also write into shared blocks), and `prefix_cache=False` is the
    # benchmark's way to measure what it buys.
    caching = prefix_cache and policy == "continuous"
    min_load = min_load_blocks(loaded.args.num_params(), block_bytes)
    # No host tier for a model that would never read one back (builtin:*), or keeps no KV.
    host_blocks = int(host_gib * 2**30 // block_bytes) if block_bytes and min_load <= 64 else 0
    pool = KVPool(loaded.args, num_blocks, BLOCK_SIZE, dt, dev, caching=caching,
                  host_blocks=host_blocks, sized_by=sized_by)
    pool.blocks.min_load_blocks = min_load
    # A step is the running batch (at most one row per admitted job) plus whole prompts; the
    # cap keeps one step's activations bounded while letting the longest prompt through.
    step_cap = max_step_tokens or max(max_seq_len, 2048)
    return Engine(loaded, pool, dev, BLOCK_SIZE, step_cap, policy, mode, max_seq_len,
                  budget_blocks)


def _embed_engine(model: str, dev: torch.device, dt: torch.dtype, token_budget: int,
                  max_seq_len: int, max_step_tokens: int | None) -> EmbedEngine:
    """An embedding worker's engine: the encoder, and the block pool as the admission unit
    (no KV: a job's blocks are its input's, held until its step)."""
    try:
        loaded = load_encoder(Path(model), dt, dev)
    except CheckpointError as e:
        raise EngineError(f"model: {e}") from None
    limit = loaded.info.max_seq_len
    if max_seq_len > limit:
        raise EngineError(f"max_seq_len: {max_seq_len} is over the embedding model's limit of "
                          f"{limit} tokens")
    step_cap = max_step_tokens or max(max_seq_len, 2048)
    return EmbedEngine(EmbedModel(loaded, EmbedArgs(loaded)),
                       BlocksOnly(blocks_for(token_budget, BLOCK_SIZE), BLOCK_SIZE), dev,
                       BLOCK_SIZE, step_cap, max_seq_len=max_seq_len)


def build_engine_off_main(*args, **kwargs) -> Engine:
    """`build_engine` on a short-lived thread (`off_main`)."""
    return off_main(build_engine, *args, **kwargs)
