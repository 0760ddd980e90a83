"""FP8 projections: float8_e4m3fn weights with a scale per output channel, activations
quantized per token on the fly, one `torch._scaled_mm` per projection.

What is quantized: the decoder layers' linear projections (the fused q/k/v, the output
projection, the fused gate/up, the down projection) -- nearly all the weights and FLOPs.
What is not: embeddings, norms, rotary, attention and the KV pool, the LM head, sampling;
they run in the compute dtype (bfloat16 on CUDA, float32 on the CPU, where `_scaled_mm`
runs e4m3 too, slowly: it is there to test the numerics).

Scales: a weight row's scale is its largest magnitude over e4m3's largest finite value
(448), so every row uses the format's whole range; a token's activation scale is the same
over its row. Per-token activation scales keep a job's result independent of its batch.
Quantizing a loaded model replaces one projection at a time, so no second full-precision
copy of the model is ever resident.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

E4M3 = torch.float8_e4m3fn
E4M3_MAX = torch.finfo(E4M3).max  # 448.0
_TINY = 1e-12  # an all-zero row keeps scale 1e-12/448 and quantizes to zeros
PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
# torch 2.13's CPU `_scaled_mm` takes another path below 8 rows, whose sums differ in the
# last bits from the same rows in a larger call (measured: equal from 8 rows on); padding
# to 8 keeps a job's tokens independent of how many rows share its step.
_MIN_ROWS = 8


def quantize_rows(x: Tensor) -> tuple[Tensor, Tensor]:
    """[R, K] -> (e4m3 [R, K], float32 scales [R, 1]) with x ~= q.float() * scale."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(_TINY) / E4M3_MAX
    q = (x.float() / scale).clamp(-E4M3_MAX, E4M3_MAX).to(E4M3)
    return q, scale


class FP8Linear(nn.Module):
    """`nn.Linear` with an e4m3 weight [N, K] and one float32 scale per output row."""

    def __init__(self, weight: Tensor, bias: Tensor | None, out_dtype: torch.dtype):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.register_buffer("weight", q)  # [N, K] row-major: its .t() is what _scaled_mm wants
        self.register_buffer("weight_scale", scale.view(1, -1))  # [1, N]
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(out_dtype),
                                                           requires_grad=False)
        self.out_dtype = out_dtype
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    @classmethod
    def from_quantized(cls, weight: Tensor, scale: Tensor, bias: Tensor | None,
                       out_dtype: torch.dtype) -> FP8Linear:
        """An already-quantized projection (an FP8 checkpoint): e4m3 [N, K], scale [N]."""
        m = cls.__new__(cls)
        nn.Module.__init__(m)
        m.register_buffer("weight", weight.to(E4M3))
        m.register_buffer("weight_scale", scale.float().reshape(1, -1))
        m.bias = None if bias is None else nn.Parameter(bias.to(out_dtype), requires_grad=False)
        m.out_dtype = out_dtype
        m.in_features, m.out_features = weight.shape[1], weight.shape[0]
        return m

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        xq, xs = quantize_rows(x.reshape(-1, shape[-1]))
        m = xq.shape[0]
        if m < _MIN_ROWS:  # see _MIN_ROWS: a row's result must not depend on its batch
            xq = torch.cat((xq, xq.new_zeros(_MIN_ROWS - m, xq.shape[1])))
            xs = torch.cat((xs, xs.new_ones(_MIN_ROWS - m, 1)))
        y = torch._scaled_mm(xq, self.weight.t(), scale_a=xs, scale_b=self.weight_scale,
                             out_dtype=self.out_dtype)[:m]
        if self.bias is not None:
            y = y + self.bias
        return y.view(*shape[:-1], self.out_features)

    def dequantized(self) -> Tensor:
        """The weight as the matmul sees it, in float32 (tests, and the bytes measure)."""
        return self.weight.float() * self.weight_scale.view(-1, 1)


def quantize_model(model: nn.Module, out_dtype: torch.dtype) -> int:
    """Replace every decoder projection with an FP8Linear, one at a time (each original
    weight is freed before the next is quantized). Returns how many were replaced."""
    n = 0
    for parent in list(model.modules()):
        for name in PROJECTIONS:
            lin = getattr(parent, name, None)
            if isinstance(lin, nn.Linear):
                with torch.no_grad():
                    setattr(parent, name, FP8Linear(lin.weight, lin.bias, out_dtype))
                del lin
                n += 1
    return n


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every parameter and persistent buffer (weights as they are resident)."""
    seen: set[int] = set()
    total = 0
    tables = {n for n, _ in model.named_buffers() if n.rsplit(".", 1)[-1].startswith("rope_")}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if name in tables or t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def linear_cos(a: Tensor, b: Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().float(), b.flatten().float(), dim=0))
