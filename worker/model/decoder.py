"""A Llama-family decoder whose attention reads and writes a paged KV pool.

The model never owns its cache and never pads: every forward runs on a *packed* row of
tokens (all sequences of a step laid end to end), so the dense layers — where nearly all
the FLOPs are — do no wasted work. Attention is the only place sequences meet their own
history; the caller describes it with `AttnGroup`s (which query rows, which KV slots, and a
mask), so grouping policy lives in the scheduler, not here.

Supports what Llama, Mistral and Qwen2 checkpoints need: RMSNorm, rotary embeddings
(default, linear and llama3 scaling) in Hugging Face's rotate-half layout, grouped-query
attention through `scaled_dot_product_attention`, SwiGLU, optional q/k/v bias, tied or
untied embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass(frozen=True, slots=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # HF `rope_scaling` dict (linear / llama3) or None
    max_position: int = 4096  # rotary table length; jobs longer than this are refused
    tie_embeddings: bool = False
    attention_bias: bool = False  # Qwen2 puts a bias on q/k/v (Llama's attention_bias too)
    o_proj_bias: bool = False  # Llama's attention_bias also biases o_proj
    mlp_bias: bool = False
    head_dim: int = 0  # 0 = dim // n_heads

    @property
    def hd(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    def num_params(self) -> int:
        hd = self.hd
        attn = self.dim * hd * (2 * self.n_heads + 2 * self.n_kv_heads)
        mlp = 3 * self.dim * self.ffn_dim
        emb = self.vocab_size * self.dim * (1 if self.tie_embeddings else 2)
        return self.n_layers * (attn + mlp + 2 * self.dim) + emb + self.dim


@dataclass(slots=True)
class AttnGroup:
    """One batched attention call: `Bg` sequences, each with up to Q queries and K keys.

    Decode groups (one query per sequence) are laid out as a contiguous run of packed rows
    `rows = (start, stop)`: queries and outputs are then slices, not gathers. Prefill
    groups pad their prompts to the longest and use the index tensors.
    """

    kv_slots: Tensor  # [Bg, K] int64 flat slots of the KV pool (padding points at scratch)
    # Decode: [Bg, 1, 1, K] bool, True = attend (lengths differ within a group). Prefill: None,
    # plain causal attention: a real query row never reaches a key past its own position, so
    # the right padding of shorter prompts is invisible to it, and the kernel skips the
    # masked half instead of computing it; or, when prompts start after a cached prefix,
    # [Bg, 1, Q, K] bool: query i of sequence b sees keys up to its own position.
    mask: Tensor | None
    rows: tuple[int, int] | None = None  # decode: packed rows start..stop, one per sequence
    q_rows: Tensor | None = None  # prefill: [Bg, Q] rows of the packed tokens (padding -> 0)
    # A prefix every sequence of the group holds in the same KV blocks (cascade attention):
    # [P] its slots, positions 0..P-1, read once for all the group's queries; `kv_slots` and
    # `mask` then cover only the keys after it.
    shared_slots: Tensor | None = None
    out_rows: Tensor | None = None  # prefill: [N] packed rows that receive output
    out_sel: Tensor | None = None  # prefill: [N] positions in the flattened [Bg*Q] output


@dataclass(slots=True)
class StepInput:
    """Everything one forward needs; built by the runner, read by the model."""

    tokens: Tensor  # [T] int64, packed
    positions: Tensor  # [T] int64 position of each token in its own sequence
    write_slots: Tensor  # [T] int64 flat KV slot each token's k/v is written to
    groups: list[AttnGroup] = field(default_factory=list)
    logit_rows: Tensor | None = None  # [B] rows whose next-token logits are wanted


def fused_parts(args: ModelArgs) -> dict[str, tuple[tuple[str, int], ...]]:
    """Each fused projection's row blocks, in order: the checkpoint's name and row count."""
    q, kv = args.n_heads * args.hd, args.n_kv_heads * args.hd
    return {"qkv_proj": (("q_proj", q), ("k_proj", kv), ("v_proj", kv)),
            "gate_up_proj": (("gate_proj", args.ffn_dim), ("up_proj", args.ffn_dim))}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalise in float32 as HF does, so half-precision runs match the reference.
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


def rope_inv_freq(args: ModelArgs) -> Tensor:
    hd = args.hd
    inv = 1.0 / (args.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float64) / hd))
    sc = args.rope_scaling
    kind = (sc or {}).get("rope_type", (sc or {}).get("type", "default"))
    if kind == "default":
        return inv.float()
    if kind == "linear":
        return (inv / float(sc["factor"])).float()
    if kind == "llama3":
        factor = float(sc["factor"])
        lo, hi = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        lo_wl, hi_wl = old / lo, old / hi
        smooth = (old / wavelen - lo) / (hi - lo)
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        mid = (1 - smooth) * inv / factor + smooth * inv
        is_mid = (wavelen <= lo_wl) & (wavelen >= hi_wl)
        return torch.where(is_mid, mid, scaled).float()
    raise ValueError(f"unsupported rope_scaling type {kind!r} (supported: default, linear, llama3)")


def rope_tables(args: ModelArgs) -> tuple[Tensor, Tensor]:
    """cos, sin [max_position, D] in float32."""
    inv = rope_inv_freq(args)
    ang = torch.outer(torch.arange(args.max_position, dtype=torch.float32), inv)  # [P, D/2]
    ang = torch.cat((ang, ang), dim=-1)  # [P, D]
    return ang.cos(), ang.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    # x [T, H, D]; cos/sin [T, 1, D]; HF's rotate-half layout.
    half = x.shape[-1] // 2
    rot = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rot * sin


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        hd, b = args.hd, args.attention_bias
        self.n_heads, self.n_kv, self.hd = args.n_heads, args.n_kv_heads, hd
        # q, k and v are one matmul (vLLM's QKVParallelLinear, gpt-fast's wqkv): one read of
        # x and one launch instead of three; checkpoints load into its row blocks by their
        # own names (`Transformer.hf_parameters`).
        self.qkv_split = tuple(rows for _, rows in fused_parts(args)["qkv_proj"])
        self.qkv_proj = nn.Linear(args.dim, sum(self.qkv_split), bias=b)
        self.o_proj = nn.Linear(args.n_heads * hd, args.dim, bias=args.o_proj_bias)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, inp: StepInput) -> Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split(self.qkv_split, dim=-1)
        q = apply_rope(q.view(t, self.n_heads, self.hd), cos, sin)  # [T, H, D]
        k = apply_rope(k.view(t, self.n_kv, self.hd), cos, sin)  # [T, Hkv, D]
        v = v.view(t, self.n_kv, self.hd)  # [T, Hkv, D]
        # kv [S, 2, Hkv, D]: this layer's pool, slot-major so that one slot's key and value
        # are one row: writes and gathers are single index ops along dim 0, the fast path.
        flat = kv.view(kv.shape[0], -1)  # [S, 2*Hkv*D]
        flat.index_copy_(0, inp.write_slots, torch.stack((k, v), 1).to(kv.dtype).view(t, -1))
        out = torch.empty(t, self.n_heads * self.hd, dtype=x.dtype, device=x.device)
        for g in inp.groups:
            bg, nk = g.kv_slots.shape
            # (reshape: a decode group's key table may be a narrower view of a wider one)
            kvg = flat.index_select(0, g.kv_slots.reshape(-1)).view(bg, nk, 2, self.n_kv, self.hd)
            kg = kvg[:, :, 0].transpose(1, 2)  # [Bg, Hkv, K, D]
            vg = kvg[:, :, 1].transpose(1, 2)  # [Bg, Hkv, K, D]
            if g.rows is not None:
                a, b = g.rows
                qg = q[a:b].unsqueeze(2)  # [Bg, H, 1, D]
                if g.shared_slots is None:
                    og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask,
                                                        enable_gqa=True)
                else:
                    og = self._cascade(qg, kg, vg, g.mask, flat, g.shared_slots)
                out[a:b] = og.view(b - a, self.n_heads * self.hd)
            else:
                nq = g.q_rows.shape[1]
                qg = q.index_select(0, g.q_rows.view(-1)).view(bg, nq, self.n_heads, self.hd)
                qg = qg.transpose(1, 2)  # [Bg, H, Q, D]
                if g.shared_slots is not None:
                    og = self._cascade(qg, kg, vg, g.mask, flat, g.shared_slots)
                else:
                    # Plain causal when every prompt starts at 0 (the kernel skips the
                    # masked half); an explicit mask when some start after a cached prefix.
                    og = F.scaled_dot_product_attention(qg, kg, vg, attn_mask=g.mask,
                                                        is_causal=g.mask is None,
                                                        enable_gqa=True)  # [Bg, H, Q, D]
                og = og.transpose(1, 2).reshape(bg * nq, self.n_heads * self.hd)  # [Bg*Q, H*D]
                out.index_copy_(0, g.out_rows, og.index_select(0, g.out_sel))
        return self.o_proj(out)


    def _cascade(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, flat: Tensor,
                 shared_slots: Tensor) -> Tensor:
        """Attention over a prefix the group shares, read once, and each sequence's own keys
        after it, merged by their log-sum-exps: softmax over all keys, exactly, with the
        shared prefix's KV gathered and multiplied once for every query of the group
        instead of once per sequence. q [Bg, H, Q, D]; k, v [Bg, Hkv, K, D] (own keys)."""
        bg, h, nq, d = q.shape
        o_own, l_own = self._attend(q, k, v, mask)  # [Bg, H, Q, D], [Bg, H, Q]
        p = shared_slots.shape[0]
        kvp = flat.index_select(0, shared_slots).view(1, p, 2, self.n_kv, self.hd)
        kp = kvp[:, :, 0].transpose(1, 2)  # [1, Hkv, P, D]
        vp = kvp[:, :, 1].transpose(1, 2)  # [1, Hkv, P, D]
        qp = q.transpose(0, 1).reshape(1, h, bg * nq, d)  # every query of the group at once
        o_pre, l_pre = self._attend(qp, kp, vp, None)  # every query sees the whole prefix
        o_pre = o_pre.view(h, bg, nq, d).transpose(0, 1)  # [Bg, H, Q, D]
        l_pre = l_pre.view(h, bg, nq).transpose(0, 1)  # [Bg, H, Q]
        top = torch.maximum(l_own, l_pre)
        w_own, w_pre = torch.exp(l_own - top), torch.exp(l_pre - top)  # [Bg, H, Q]
        out = (o_own * w_own[..., None] + o_pre * w_pre[..., None]) / (w_own + w_pre)[..., None]
        return out.to(q.dtype)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor,
                mask: Tensor | None) -> tuple[Tensor, Tensor]:
        """Softmax attention and its log-sum-exp (float32), grouped-query: q head j*G + r
        reads kv head j. q [B, H, Q, D]; k, v [B, Hkv, K, D]; mask [B, 1, Q, K] bool or None.
        -> out [B, H, Q, D] float32, lse [B, H, Q] float32."""
        b, h, nq, d = q.shape
        g = h // self.n_kv
        qg = q.reshape(b, self.n_kv, g * nq, d).float()
        s = torch.matmul(qg, k.float().transpose(-1, -2)) * d ** -0.5  # [B, Hkv, G*Q, K]
        if mask is not None:
            s = s.view(b, self.n_kv, g, nq, -1).masked_fill(~mask[:, :, None], float("-inf"))
            s = s.view(b, self.n_kv, g * nq, -1)
        top = s.amax(dim=-1, keepdim=True)  # [B, Hkv, G*Q, 1]: every row has a key it sees
        e = s.sub_(top).exp_()  # one exp, in place
        z = e.sum(dim=-1, keepdim=True)  # [B, Hkv, G*Q, 1]
        out = torch.matmul(e, v.float()).div_(z)  # [B, Hkv, G*Q, D]: divide D, not K, values
        return out.view(b, h, nq, d), (top + z.log()).view(b, h, nq)


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        b = args.mlp_bias
        # gate and up are one matmul (vLLM's MergedColumnParallelLinear): one launch and one
        # read of x instead of two.
        self.gate_up_proj = nn.Linear(args.dim, 2 * args.ffn_dim, bias=b)
        self.down_proj = nn.Linear(args.ffn_dim, args.dim, bias=b)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, kv: Tensor, inp: StepInput) -> Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, inp)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Parameter names follow Hugging Face's LlamaForCausalLM, so checkpoints load by name."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rope_tables(args)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def hf_parameters(self) -> dict[str, Tensor]:
        """The parameters under Hugging Face's names, in module order; a fused projection
        appears as views of its row blocks (`q_proj`, `k_proj`, `v_proj` of `qkv_proj`), so
        copying a checkpoint tensor into its entry writes the fused weight in place."""
        parts = fused_parts(self.args)
        out: dict[str, Tensor] = {}
        for name, p in self.named_parameters():  # a tied lm_head is listed once, as the embedding
            path, leaf = name.rsplit(".", 1)
            parent, _, mod = path.rpartition(".")
            if mod not in parts:
                out[name] = p
                continue
            names, rows = zip(*parts[mod])
            for part, view in zip(names, p.split(rows, dim=0)):
                out[f"{parent}.{part}.{leaf}"] = view
        return out

    def forward(self, inp: StepInput, kv_pool: Tensor) -> Tensor:
        """kv_pool [L, S, 2, Hkv, D]; returns logits [B, V] for `inp.logit_rows` (float32)."""
        x = self.embed_tokens(inp.tokens)  # [T, dim]
        cos = self.rope_cos[inp.positions].unsqueeze(1).to(x.dtype)  # [T, 1, D]
        sin = self.rope_sin[inp.positions].unsqueeze(1).to(x.dtype)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, kv_pool[i], inp)
        if inp.logit_rows is not None:
            x = x[inp.logit_rows]  # [B, dim]: only rows that sample pay for the vocab matmul
        return self.lm_head(self.norm(x)).float()


def init_random(model: Transformer, seed: int) -> None:
    """Seeded init so builtin models are the same on every machine without a download."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # by checkpoint name: the same weights whether projections are fused
        for name, p in model.hf_parameters().items():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                p.fill_(1.0)
            elif name.endswith(".bias"):
                p.zero_()
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * (1.0 / math.sqrt(p.shape[-1])))
