"""The records that cross the executor's boundary, and the executor's own view of a job.

`Request` goes in (plain data, no NATS message: the executor never sees the broker),
`Completion` comes out, `Sequence` lives in between and is owned by the executor thread.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from worker.engine.blocks import Reservation, padded_tokens


@dataclass(slots=True)
class Request:
    key: int  # unique per worker process; the event loop maps it back to the NATS message
    prompt: list[int]  # token ids, already validated against the vocabulary
    max_new_tokens: int  # >= 1 (zero-token jobs never reach the executor)
    reserved_tokens: int  # prompt + max_new_tokens rounded up to KV blocks (the budget unit)
    temperature: float
    top_k: int
    top_p: float
    seed: int  # folded to 32 bits
    stop_ids: frozenset[int]
    solo: bool = False  # run in a batch of its own (suspected poison job)
    # The prompt's full blocks' content keys (`worker.engine.blocks.block_hashes`), and the
    # blocks admission reserved for the job; None: the scheduler reserves them itself.
    hashes: tuple[bytes, ...] = ()
    reservation: Reservation | None = None
    ignore_eos: bool = False  # the model's end-of-sequence ids do not end it
    logprobs: int = 0  # with n > 0, record each sampled token's logprob and the top n
    watch: bool = False  # report its tokens as they come (the loop matches stop strings)
    # Structured output: the job's grammar matcher (worker.model.grammar), advanced by each
    # token; its mask constrains every token sampled, and its end ends the job.
    grammar: Any = None
    job_id: str = ""  # the producer's id: for job-specific failpoints only

    @classmethod
    def greedy(cls, key: int, prompt: list[int], max_new_tokens: int, seed: int = 0,
               block_size: int = 16) -> Request:
        """Temperature 0, no stop ids, KV reserved for the whole job: benchmarks and tests."""
        return cls(key=key, prompt=prompt, max_new_tokens=max_new_tokens,
                   reserved_tokens=padded_tokens(len(prompt) + max_new_tokens, block_size),
                   temperature=0.0, top_k=0, top_p=1.0, seed=seed, stop_ids=frozenset())


@dataclass(slots=True)
class Completion:
    key: int
    tokens: list[int]  # generated ids, a stop token included
    finish_reason: str  # "length" | "stop" | "cancelled" | "error" (then `error` says why)
    computed_tokens: int  # token rows this job occupied in forwards, padding included
    first_token_at: float  # time.monotonic() when the first token was sampled
    cached_tokens: int = 0  # prompt tokens whose KV it found computed (by a job before it)
    # Requests with logprobs: [tokens, 1 + 2n] float32 rows, (chosen token's logprob, the
    # top n ids, their logprobs), one per generated token.
    logprobs: np.ndarray | None = None
    embedding: np.ndarray | None = None  # embed jobs: the pooled vector, float32, not normalized
    # A failure that belongs to this job alone (its grammar, its logprobs): (error code, why).
    # The job ends with it; nothing else in the batch is touched.
    error: tuple[str, str] | None = None


@dataclass(slots=True, eq=False)  # one job's state: compared (and found in lists) by identity
class Sequence:
    req: Request
    blocks: tuple[int, ...]  # its KV blocks, in position order (some shared by content)
    slots: np.ndarray  # [reserved_tokens] int64 flat KV slots, in position order
    lane: int  # prefill lane: prompts of similar length share attention calls
    waiting_since: float  # monotonic; the oldest lane head is prefilled first
    keys: list[bytes] = field(default_factory=list)  # content keys of its full blocks so far
    generated: list[int] = field(default_factory=list)
    start: int = 0  # its first prompt token computed at prefill (before it: KV was there)
    cached: int = 0  # prompt tokens whose KV was there (start, or one more: the last token
    # of a prompt found whole is computed for its logits, its KV not written again)
    computed_tokens: int = 0
    first_token_at: float = 0.0
    logprobs: list[np.ndarray] = field(default_factory=list)  # rows, requests that asked
    # Static batching (the ladder's policies) only: finished, still computing padding rows.
    done: bool = False
    # Overlapped steps (pipelined runner) only: steps launched with this sequence whose
    # token the host has not seen yet, and whether it has finished (later rows are waste).
    pending: int = 0
    retired: bool = False
    # Structured output: the allowed-token bitmask ([ceil(V / 32)] int32) its newest row was
    # sampled under, checked against the token that came back; and the failure that ends
    # it at its next token, when one of its own parts failed: (error code, why).
    mask: np.ndarray | None = None
    failed: tuple[str, str] | None = None
    row: int = -1  # its row in the scheduler's persistent batch (worker.engine.batch); -1: none

    @property
    def num_tokens(self) -> int:
        """Tokens whose position exists: the prompt plus everything sampled so far."""
        return len(self.req.prompt) + len(self.generated)

    @property
    def next_index(self) -> int:
        """Position of the next token to sample, counting tokens still on the device."""
        return len(self.req.prompt) + len(self.generated) + self.pending
