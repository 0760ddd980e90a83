"""Decode steps at fixed shapes, and on CUDA one captured graph per shape.

A decode-only step of a small model is launch-bound on a GPU: each layer is a few dozen
small kernels, and launching them from Python costs more than running them. A CUDA graph
replays the whole forward as one launch, but it bakes in every shape and every address.
So a decode step of B sequences whose longest context is K runs here as a step of
(Bb, Kb) = (the batch bucket >= B, the context bucket >= K), from buffers allocated once:

- inputs live at fixed addresses: token ids, positions, KV write slots and context
  lengths [Bb], and a block table [Bb, Kb / block_size] from which the graph itself
  computes the KV slots to gather and the attention mask (so the host sends a block id
  per 16 tokens, not a slot and a mask bit per token);
- padding rows (B..Bb) read one scratch key and write to the scratch slot, like the
  padding rows of static batching, so they never touch a live sequence;
- the logits land in a fixed buffer outside the graphs' memory pool; sampling runs
  eagerly on them (its branches depend on the batch's parameters).

Graphs are captured lazily, the first time a shape is seen, into one shared memory pool,
up to `max_graphs` of them; a shape beyond that runs the same fixed-shape forward eagerly.
Lazily, not all at start-up as nano-vllm does for its one dimension (batch): with two
dimensions there are up to 21 x 9 shapes for a 1088-token job limit, most of which a
workload never meets, and torch.compile's CUDA-graph trees make the same choice. The price
is one capture (a synchronize and one recorded forward) the first time each shape occurs.

When it pays (`choose`): one attention group padded to the longest context reads more KV
than the eager path's length groups, which in turn launch more kernels (about
`ATTN_LAUNCHES` per group and layer, beside `DENSE_LAUNCHES` per layer for everything
else). A shape is taken when the extra KV traffic, at `bandwidth` bytes/s, costs less than
the launches it saves at `launch_s` each. The defaults are estimates (a datacenter GPU and
PyTorch's eager launch cost; the CPU's memory and per-op overhead), meant to be tuned with
the ladder's rung 5: for the builtin models nearly every step pays on a GPU, for a 7B model
only steps whose contexts are of similar length do.

On the CPU the same fixed-shape forward runs without capture, which is how it is tested
against the eager path; on CUDA the first capture is checked against that forward before
graphs are trusted (`self_check`): if capture fails or disagrees, the runner decodes through
the packed forward instead, and `disabled` says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from worker.engine.lanes import group_by_length
from worker.model.decoder import AttnGroup, StepInput, Transformer

Ints = list[int] | np.ndarray

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 80, 96, 112, 128, 160, 192, 224, 256,
                 320, 384, 448, 512)
DENSE_LAUNCHES = 37  # eager kernels per layer outside attention (norms, fused projections, rope)
ATTN_LAUNCHES = 6  # eager kernels per attention group and layer (gather, SDPA, copy out)
KV_PASSES = 4  # times a gathered key/value is moved (gather write and read, GQA repeat, matmul)
# (bandwidth bytes/s, launch seconds): what one padded KV byte and one saved launch cost
COSTS = {"cuda": (1.0e12, 6e-6), "cpu": (2.0e10, 1.5e-5)}


def ctx_buckets(max_ctx: int, block_size: int) -> tuple[int, ...]:
    """64, 128, 192, 256, 384, 512, 768, 1024, ...: each at most 1.5x the one before, all
    whole KV blocks, the last exactly `max_ctx` rounded up to a block."""
    top = -(-max_ctx // block_size) * block_size
    steps = {2**i for i in range(6, 24)} | {3 * 2**i for i in range(6, 24)}
    return tuple(sorted({k for k in steps if k < top} | {top}))


def bucket(n: int, buckets: tuple[int, ...]) -> int | None:
    for b in buckets:
        if b >= n:
            return b
    return None


@dataclass(slots=True)
class GraphStep:
    """A decode step prepared for the fixed-shape path (what `Runner.prepare` returns)."""

    key: tuple[int, int]  # (Bb, Kb)
    batch: int  # real rows B
    staged: Tensor  # [n] int64 on the device: the fixed buffer's used prefix, padding included


class DecodeGraphs:
    def __init__(self, model: Transformer, kv: Tensor, device: torch.device, block_size: int,
                 max_ctx: int, max_batch: int = BATCH_BUCKETS[-1], capture: bool | None = None,
                 max_graphs: int = 96, bandwidth: float | None = None,
                 launch_s: float | None = None):
        self.model, self.kv, self.device, self.bs = model, kv, device, block_size
        self.capture = device.type == "cuda" if capture is None else capture
        self.batch_buckets = tuple(b for b in BATCH_BUCKETS if b < max_batch) + (max_batch,)
        self.ctx_buckets = ctx_buckets(max_ctx, block_size)
        self.max_graphs = max_graphs
        bw, ls = COSTS["cuda" if device.type == "cuda" else "cpu"]
        self.bandwidth, self.launch_s = bandwidth or bw, launch_s or ls
        self.n_layers = model.args.n_layers
        self.kv_bytes = kv[0, 0].numel() * kv.element_size() * self.n_layers  # per token
        mb, nb = self.batch_buckets[-1], self.ctx_buckets[-1] // block_size
        self._mb, self._nb = mb, nb
        # One int64 buffer: tokens, positions, write slots, context lengths [mb] each, then
        # the block table [mb, nb]. A step sends its used prefix (rows < Bb of the table).
        self._buf = torch.zeros(4 * mb + mb * nb, dtype=torch.int64, device=device)
        self.tokens, self.positions, self.write_slots, self.ctx = self._buf[:4 * mb].view(4, mb)
        self.table = self._buf[4 * mb:].view(mb, nb)
        self.logits = torch.zeros(mb, model.args.vocab_size, dtype=torch.float32, device=device)
        self._ar_k = torch.arange(self.ctx_buckets[-1], device=device)
        self._ar_bs = torch.arange(block_size, device=device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self._pool = None
        self.replays = 0  # steps that replayed a graph
        self.eager_steps = 0  # fixed-shape steps run without a graph (CPU, or over max_graphs)
        self.disabled: str | None = None  # why graphs were switched off, if they were

    @property
    def status(self) -> str:
        """For the start-up log and the ladder: what decode steps will do."""
        if self.disabled:
            return f"off: {self.disabled}"
        return "captured lazily" if self.capture else "fixed shapes, no capture"

    # -- host side ----------------------------------------------------------------------

    def choose(self, ctx: list[int] | np.ndarray, groups: int | None = None
               ) -> tuple[int, int] | None:
        """The (Bb, Kb) shape for a decode step with these context lengths, or None when the
        eager path is the better one (too big, or padding that costs more than launches).
        `groups`: the attention calls the eager path would make (default: by length)."""
        bb = bucket(len(ctx), self.batch_buckets)
        kb = bucket(max(ctx), self.ctx_buckets)
        if bb is None or kb is None:
            return None
        extra_bytes = (bb * kb - int(sum(ctx))) * self.kv_bytes * KV_PASSES
        if groups is None:
            groups = len(group_by_length(list(ctx)))
        launches = self.n_layers * (DENSE_LAUNCHES + ATTN_LAUNCHES * groups)
        if extra_bytes / self.bandwidth > launches * self.launch_s:
            return None
        return bb, kb

    def host_inputs(self, key: tuple[int, int], tokens: Ints, positions: Ints, write_slots: Ints,
                    ctx: Ints, table: np.ndarray) -> np.ndarray:
        """The fixed buffer's used prefix for this step, padding rows included: [4*mb + Bb*nb].
        `table`: [B, >= Kb/bs] each row's KV block ids (past its context: anything)."""
        bb, kb = key
        mb, nb, b = self._mb, self._nb, len(ctx)
        out = np.zeros(4 * mb + bb * nb, dtype=np.int64)
        head = out[:4 * mb].reshape(4, mb)
        head[0, :b] = tokens
        head[1, :b] = positions
        head[2, :b] = write_slots  # padding rows: 0 = KVPool.SCRATCH_SLOT
        head[3, :b] = ctx
        head[3, b:bb] = 1  # padding rows attend to the scratch slot alone (never an empty row)
        out_table = out[4 * mb:].reshape(bb, nb)
        nblocks = -(-np.asarray(ctx, dtype=np.int64) // self.bs)  # [B]
        used = np.arange(kb // self.bs)[None, :] < nblocks[:, None]  # [B, Kb/bs]
        k = min(table.shape[1], kb // self.bs)  # columns past every row's context: unused
        out_table[:b, :k] = np.where(used[:, :k], table[:, :k], 0)
        return out

    # -- device side --------------------------------------------------------------------

    def _forward(self, key: tuple[int, int]) -> None:
        bb, kb = key
        nb = kb // self.bs
        slots = (self.table[:bb, :nb, None] * self.bs + self._ar_bs).reshape(bb, kb)
        mask = (self._ar_k[:kb][None, :] < self.ctx[:bb, None])[:, None, None, :]
        inp = StepInput(tokens=self.tokens[:bb], positions=self.positions[:bb],
                        write_slots=self.write_slots[:bb],
                        groups=[AttnGroup(kv_slots=slots, mask=mask, rows=(0, bb))])
        self.logits[:bb].copy_(self.model(inp, self.kv))

    def _pad_only(self, bb: int) -> None:
        """Every row a padding row: what the buffers hold while a graph is captured, so the
        warm-up forward writes only to the scratch slot."""
        self._buf.zero_()
        self.ctx[:bb] = 1

    def _capture(self, key: tuple[int, int]) -> torch.cuda.CUDAGraph:
        self._pad_only(key[0])
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            self._forward(key)  # warm-up: lazy kernel and workspace initialisation
        torch.cuda.current_stream(self.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._forward(key)
        if self._pool is None:
            self._pool = graph.pool()
        self.graphs[key] = graph
        return graph

    @torch.inference_mode()
    def run(self, step: GraphStep, feed: tuple[Tensor, Tensor] | None = None) -> Tensor:
        """Logits [B, V] for the step's real rows. `feed`: (rows, token ids) already on the
        device (the previous step's output, when steps overlap) to write over the staged
        placeholders."""
        graph = None
        if self.capture and not self.disabled:
            graph = self.graphs.get(step.key)
            if graph is None and len(self.graphs) < self.max_graphs:
                graph = self._capture(step.key)  # before the inputs go in: capture pads them
        n = step.staged.shape[0]
        self._buf[:n].copy_(step.staged)
        if feed is not None:
            self.tokens.index_copy_(0, *feed)
        if graph is not None:
            graph.replay()
            self.replays += 1
        else:
            self._forward(step.key)
            self.eager_steps += 1
        return self.logits[:step.batch]

    @torch.inference_mode()
    def self_check(self) -> str | None:
        """Capture the smallest shape and compare its replay with the same forward run
        eagerly; on any failure graphs are disabled and the reason returned (and kept)."""
        if not self.capture:
            return None
        key = (self.batch_buckets[0], self.ctx_buckets[0])
        try:
            graph = self._capture(key)
            self._pad_only(key[0])
            graph.replay()
            got = self.logits[:key[0]].clone()
            self._forward(key)
            want = self.logits[:key[0]]
            if not torch.allclose(got, want, rtol=1e-3, atol=1e-3):
                raise RuntimeError(f"replay differs from eager by "
                                   f"{(got - want).abs().max().item():.3g}")
        except Exception as e:  # noqa: BLE001 - reported, and the eager path serves
            self.graphs.clear()
            self.disabled = f"{type(e).__name__}: {e}"
        return self.disabled
