"""One host-to-device copy per step: a step's metadata packed into a pinned buffer.

A step's inputs are a dozen small numpy arrays (token ids, positions, KV slots, masks,
sampling parameters). Copied one by one they cost a dozen copies, and copied from pageable
memory each `non_blocking=True` copy is in fact synchronous: the host waits for the device
before it can launch the next kernel. Here they are laid end to end (64-byte aligned) in a
page-locked host buffer and sent in one asynchronous copy into one device buffer; the
tensors the model reads are views of that device buffer.

Two host buffers alternate, each guarded by an event recorded after its copy, so the host
never overwrites bytes a copy in flight is still reading. The device buffer is reused every
step: the next step's copy is queued on the same stream after this step's kernels, so it
cannot overtake them. The buffers grow (doubling) if a step needs more; they never shrink.

On the CPU the same code runs with ordinary memory (tests exercise the packing); the
runner's eager CPU path does not stage at all (`torch.from_numpy` is already free there).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

ALIGN = 64
_TORCH = {np.dtype(np.int64): torch.int64, np.dtype(np.int32): torch.int32,
          np.dtype(np.float32): torch.float32, np.dtype(np.bool_): torch.bool}


def _round_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class Stager:
    def __init__(self, device: torch.device, capacity: int = 1 << 16):
        self.device = device
        self.pinned = device.type == "cuda"
        self.copies = 0  # host-to-device copies made (one per stage call)
        self._alloc(capacity)

    def _alloc(self, capacity: int) -> None:
        self.capacity = capacity
        self._host = [torch.empty(capacity, dtype=torch.uint8, pin_memory=self.pinned)
                      for _ in range(2)]
        self._host_np = [h.numpy() for h in self._host]
        self._events: list[torch.cuda.Event | None] = [None, None]
        self._dev = torch.empty(capacity, dtype=torch.uint8, device=self.device)
        self._turn = 0

    def stage(self, arrays: list[np.ndarray]) -> list[Tensor]:
        """Device tensors equal to `arrays` (same dtypes and shapes), after one copy."""
        offsets, at = [], 0
        for a in arrays:
            if a.dtype not in _TORCH:
                raise TypeError(f"cannot stage {a.dtype} (have {', '.join(map(str, _TORCH))})")
            offsets.append(at)
            at += _round_up(a.nbytes)
        if at > self.capacity:
            self._alloc(max(at, 2 * self.capacity))
        i = self._turn = self._turn ^ 1
        if self._events[i] is not None:
            self._events[i].synchronize()  # the copy that last read this host buffer is done
        host = self._host_np[i]
        for a, off in zip(arrays, offsets):
            host[off:off + a.nbytes] = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
        if at:
            self._dev[:at].copy_(self._host[i][:at], non_blocking=self.pinned)
        if self.pinned:
            ev = self._events[i] = self._events[i] or torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.device))
        self.copies += 1
        return [self._dev[off:off + a.nbytes].view(_TORCH[a.dtype]).view(a.shape)
                for a, off in zip(arrays, offsets)]
