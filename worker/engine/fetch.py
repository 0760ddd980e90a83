"""The step's one sync: its sampled tokens (and logprob rows, when asked) on their way to the host.

Rule: the only device-to-host transfer of a step is what the scheduler needs to decide who
finished. On CUDA the copies go into two alternating pinned buffers followed by an event,
and `Launched.wait` syncs on that event only, so a step launched after it keeps the device
busy meanwhile; on the CPU it is `tolist`. Logprobs are computed on the device in the step
(`token_logprobs`) and ride the same wait.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from worker.engine.scheduler import StepPlan


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, n: int) -> torch.Tensor:
    """[B, 1 + 2n] float32: each row's sampled token's logprob, then the ids and logprobs of
    its n most likely tokens (log-softmax of the raw logits, before temperature or top-k/p
    shape them). Ids travel as float32, exact below 2**24 (every vocabulary in use)."""
    logp = logits.float().log_softmax(dim=-1)  # [B, V]
    chosen = logp.gather(1, tokens[:, None])  # [B, 1]
    top = logp.topk(n, dim=-1)
    return torch.cat((chosen, top.indices.float(), top.values), dim=1)


class Launched:
    """A step on the device: its sampled tokens there, on their way to the host."""

    __slots__ = ("plan", "tokens", "_pending", "_logprobs", "_rows")

    def __init__(self, plan: StepPlan, tokens: torch.Tensor, pending: Callable[[], list[int]],
                 logprobs: Callable[[], np.ndarray | None] = lambda: None):
        self.plan = plan
        self.tokens = tokens
        self._pending = pending
        self._logprobs = logprobs
        self._rows: dict[int, int] | None = None

    @property
    def logprobs(self) -> np.ndarray | None:
        """[B, 1 + 2n] logprob rows (`token_logprobs`) after `wait`; None: none asked."""
        return self._logprobs()

    @property
    def row_of(self) -> dict[int, int]:
        """Job key -> its row in this step's output."""
        if self._rows is None:
            self._rows = {s.req.key: i for i, s in enumerate(self.plan.rows)}
        return self._rows

    def wait(self) -> list[int]:
        return self._pending()


class Fetch:
    """Device-to-host copies of sampled tokens into two alternating pinned buffers, each
    copy followed by an event; `wait` syncs on that event only (not the whole device), so
    a step launched after it keeps the device busy meanwhile. On the CPU: `tolist`."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._bufs: list[torch.Tensor] = []
        self._lp_bufs: list[torch.Tensor] = []  # logprob rows, the same way, when asked
        self._turn = 0

    def start(self, tokens: torch.Tensor, lp: torch.Tensor | None = None
              ) -> tuple[Callable[[], list[int]], Callable[[], np.ndarray | None]]:
        """(wait for the tokens, read the logprob rows after that wait)."""
        if not self.cuda:
            return tokens.tolist, (lambda: None) if lp is None else lp.numpy
        n = tokens.shape[0]
        self._turn ^= 1
        self._bufs = _pinned(self._bufs, (n,), torch.int64)
        host = self._bufs[self._turn][:n]
        host.copy_(tokens, non_blocking=True)
        host_lp = None
        if lp is not None:  # copied before the event, so the one wait covers both
            self._lp_bufs = _pinned(self._lp_bufs, tuple(lp.shape), torch.float32)
            host_lp = self._lp_bufs[self._turn][:n, :lp.shape[1]]
            host_lp.copy_(lp, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))

        def wait() -> list[int]:
            event.synchronize()
            return host.tolist()

        return wait, (lambda: None) if host_lp is None else (lambda: host_lp.numpy().copy())


def _pinned(bufs: list[torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype
            ) -> list[torch.Tensor]:
    """Two alternating pinned host buffers holding at least `shape` (rows, then columns),
    reallocated (rarely: doubled rows) only when too small."""
    if len(bufs) == 2 and all(b >= s for b, s in zip(bufs[0].shape, shape)):
        return bufs
    size = (max(1024, 2 * shape[0]),) + tuple(max(s, 41) for s in shape[1:])
    return [torch.empty(size, dtype=dtype, pin_memory=True) for _ in range(2)]
