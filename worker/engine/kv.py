"""The KV cache: one tensor allocated at start-up, handed out in fixed-size blocks.

The pool holds `num_blocks` blocks of `block_size` token slots for every layer; which
job holds which block, and which blocks keep a prefix's KV for the next job, is
`worker.engine.blocks.BlockPool`'s business.
"""

from __future__ import annotations

import torch

from worker.engine.blocks import BlockPool
from worker.model.decoder import ModelArgs


class KVPool:
    """k/v for every layer: `tensor` is [L, S, 2, Hkv, D], S = (num_blocks + 1) * block_size.

    Block 0 is scratch (`SCRATCH_SLOT` lies in it): rows that are padding, never a real
    token, write their k/v there.
    """

    SCRATCH_SLOT = 0

    def __init__(self, args: ModelArgs, num_blocks: int, block_size: int,
                 dtype: torch.dtype, device: torch.device, caching: bool = True):
        self.block_size = block_size
        self.num_blocks = num_blocks
        slots = (num_blocks + 1) * block_size
        self.tensor = torch.zeros(
            (args.n_layers, slots, 2, args.n_kv_heads, args.hd), dtype=dtype, device=device
        )
        self.blocks = BlockPool(num_blocks, block_size, first=1, caching=caching)

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    @staticmethod
    def bytes_per_token(args: ModelArgs, dtype: torch.dtype) -> int:
        return args.n_layers * 2 * args.n_kv_heads * args.hd * torch.finfo(dtype).bits // 8
