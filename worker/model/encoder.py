"""A BERT encoder that embeds packed sequences: no padding outside attention.

The dense layers (embeddings, q/k/v and output projections, FFN, LayerNorms), where nearly
all the FLOPs are, run once over every real token of a call, the sequences laid end to end
in one [T, dim] tensor. Attention is the only place sequences must be kept apart: it runs
per group of similar-length sequences, each padded only to its group's longest, the padded
keys masked. A sequence's embedding therefore does not depend on what it was batched with,
up to float rounding.

Supports what BERT checkpoints need: absolute position embeddings, token-type embeddings
(every token is type 0, as for a single text), post-norm layers, GELU (erf or tanh),
bidirectional attention; then mean, CLS or last-token pooling and optional L2
normalization, as sentence-transformers does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from worker.engine.lanes import group_by_length

POOLINGS = ("mean", "cls", "lasttoken")


@dataclass(frozen=True, slots=True)
class EncoderArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    ffn_dim: int
    max_position: int  # rows of the position table: the longest sequence, special tokens included
    type_vocab_size: int = 2
    norm_eps: float = 1e-12
    gelu: str = "none"  # F.gelu's `approximate`: "none" is BERT's erf, "tanh" gelu_new


@dataclass(frozen=True, slots=True)
class EncoderInfo:
    """What the engine needs to know about an embedding model."""

    max_seq_len: int  # tokens per text, special tokens included; min(positions, s-t's limit)
    dim: int  # values per embedding before a job's `dimensions` cuts them
    normalize: bool  # the checkpoint ends in a Normalize module: the default for jobs
    pooling: str  # one of POOLINGS


@dataclass(slots=True)
class AttnGroup:
    """One attention call: `n` sequences padded to `width` tokens.

    The group's sequences are packed rows `rows` (start, stop), one after another. When
    they all have `width` tokens the call reads that slice as it is; otherwise `gather`
    pads it and `keep` takes the real rows back out.
    """

    rows: tuple[int, int]
    n: int
    width: int
    gather: Tensor | None = None  # [n*width] packed row of each padded slot (padding: any real row)
    mask: Tensor | None = None  # [n, 1, 1, width] additive: 0 for a real key, -inf for padding
    keep: Tensor | None = None  # [stop-start] slots of the padded output that are real, in order


@dataclass(slots=True)
class Packed:
    """One call's sequences laid end to end, in group order; built on the host, then moved."""

    tokens: Tensor  # [T] int64
    positions: Tensor  # [T] int64 row of the position table of each token
    groups: list[AttnGroup]
    first: Tensor  # [B] packed row of each sequence's first token, in packed order
    lengths: Tensor  # [B] tokens of each sequence, in packed order
    seq_of_token: Tensor  # [T] packed index of the sequence each token belongs to
    order: Tensor  # [B] input index of each packed sequence


class Layer(nn.Module):
    """Post-norm: x = LN(x + attention(x)), then x = LN(x + FFN(x))."""

    def __init__(self, args: EncoderArgs):
        super().__init__()
        self.n_heads, self.hd, self.gelu = args.n_heads, args.dim // args.n_heads, args.gelu
        # q, k and v are one matmul: one read of x and one launch instead of three; the
        # checkpoint's query/key/value load into its row blocks (`checkpoint_parameters`).
        self.qkv = nn.Linear(args.dim, 3 * args.dim)
        self.o = nn.Linear(args.dim, args.dim)
        self.attn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.up = nn.Linear(args.dim, args.ffn_dim)
        self.down = nn.Linear(args.ffn_dim, args.dim)
        self.ffn_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)

    def forward(self, x: Tensor, groups: list[AttnGroup]) -> Tensor:
        t = x.shape[0]
        qkv = self.qkv(x).view(t, 3, self.n_heads, self.hd)  # [T, 3, H, D]
        x = self.attn_norm(x + self.o(self._attend(qkv, groups)))
        return self.ffn_norm(x + self.down(F.gelu(self.up(x), approximate=self.gelu)))

    def _attend(self, qkv: Tensor, groups: list[AttnGroup]) -> Tensor:
        t, _, h, d = qkv.shape
        out = torch.empty(t, h * d, dtype=qkv.dtype, device=qkv.device)
        for g in groups:
            a, b = g.rows
            x = qkv[a:b] if g.gather is None else qkv.index_select(0, g.gather)
            x = x.view(g.n, g.width, 3, h, d).permute(2, 0, 3, 1, 4)  # [3, n, H, W, D]
            # The mask is additive, not bool: on the CPU a bool mask sends SDPA to its
            # unfused path, ten times slower at these shapes.
            o = F.scaled_dot_product_attention(x[0], x[1], x[2], attn_mask=g.mask)  # [n, H, W, D]
            o = o.transpose(1, 2).reshape(g.n * g.width, h * d)
            out[a:b] = o if g.keep is None else o.index_select(0, g.keep)
        return out


class Encoder(nn.Module):
    def __init__(self, args: EncoderArgs, pooling: str, normalize: bool):
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling {pooling!r} is not one of {POOLINGS}")
        self.args, self.pooling, self.normalize = args, pooling, normalize
        self.word = nn.Embedding(args.vocab_size, args.dim)
        self.position = nn.Embedding(args.max_position, args.dim)
        self.token_type = nn.Embedding(args.type_vocab_size, args.dim)
        self.emb_norm = nn.LayerNorm(args.dim, eps=args.norm_eps)
        self.layers = nn.ModuleList(Layer(args) for _ in range(args.n_layers))

    def checkpoint_parameters(self) -> dict[str, Tensor]:
        """Our parameters under BertModel's names; the fused q/k/v weight appears as views
        of its row blocks, so copying a checkpoint tensor into its entry writes it in place."""
        out = {"embeddings.word_embeddings.weight": self.word.weight,
               "embeddings.position_embeddings.weight": self.position.weight,
               "embeddings.token_type_embeddings.weight": self.token_type.weight,
               "embeddings.LayerNorm.weight": self.emb_norm.weight,
               "embeddings.LayerNorm.bias": self.emb_norm.bias}
        for i, layer in enumerate(self.layers):
            pre = f"encoder.layer.{i}."
            for leaf in ("weight", "bias"):
                q, k, v = getattr(layer.qkv, leaf).chunk(3, dim=0)
                out |= {f"{pre}attention.self.query.{leaf}": q,
                        f"{pre}attention.self.key.{leaf}": k,
                        f"{pre}attention.self.value.{leaf}": v,
                        f"{pre}attention.output.dense.{leaf}": getattr(layer.o, leaf),
                        f"{pre}attention.output.LayerNorm.{leaf}": getattr(layer.attn_norm, leaf),
                        f"{pre}intermediate.dense.{leaf}": getattr(layer.up, leaf),
                        f"{pre}output.dense.{leaf}": getattr(layer.down, leaf),
                        f"{pre}output.LayerNorm.{leaf}": getattr(layer.ffn_norm, leaf)}
        return out

    @torch.inference_mode()
    def embed(self, seqs: list[list[int]], groups: list[list[int]] | None = None,
              normalize: bool | None = None) -> Tensor:
        """Pooled embeddings [len(seqs), dim] float32, in input order.

        `groups` says which sequence indices share an attention call (each index exactly
        once); by default sequences are grouped by length (`group_by_length`). `normalize`
        defaults to the checkpoint's; the engine passes False when jobs decide for
        themselves (`finish`).
        """
        if not seqs:
            return torch.empty(0, self.args.dim, device=self.word.weight.device)
        if groups is None:
            groups = group_by_length([len(s) for s in seqs])
        p = self.pack(seqs, groups)
        x = self.forward(p)  # [T, dim]
        if self.pooling == "mean":
            sums = torch.zeros(len(seqs), x.shape[1], dtype=torch.float32, device=x.device)
            sums.index_add_(0, p.seq_of_token, x.float())
            pooled = sums / p.lengths.unsqueeze(1)  # [B, dim]
        elif self.pooling == "cls":
            pooled = x.index_select(0, p.first).float()
        else:
            pooled = x.index_select(0, p.first + p.lengths - 1).float()
        out = torch.empty_like(pooled).index_copy_(0, p.order, pooled)
        if self.normalize if normalize is None else normalize:
            out = F.normalize(out, p=2, dim=-1)
        return out

    def forward(self, p: Packed) -> Tensor:
        """Final hidden states [T, dim] of the packed tokens."""
        x = self.word(p.tokens) + self.position(p.positions) + self.token_type.weight[0]
        x = self.emb_norm(x)
        for layer in self.layers:
            x = layer(x, p.groups)
        return x

    def pack(self, seqs: list[list[int]], groups: list[list[int]]) -> Packed:
        """Lay the sequences end to end in group order and describe each attention call."""
        order = [i for g in groups for i in g]
        if sorted(order) != list(range(len(seqs))) or not all(groups):
            raise ValueError(f"groups must be non-empty and hold each of the {len(seqs)} "
                             "sequence indices once")
        lengths = [len(seqs[i]) for i in order]
        if min(lengths) < 1 or max(lengths) > self.args.max_position:
            raise ValueError(f"sequence lengths must be 1..{self.args.max_position} tokens "
                             f"(got {min(lengths)}..{max(lengths)})")
        tokens = torch.tensor([t for i in order for t in seqs[i]], dtype=torch.int64)
        if int(tokens.min()) < 0 or int(tokens.max()) >= self.args.vocab_size:
            raise ValueError(f"token ids must be 0..{self.args.vocab_size - 1}")
        lens = torch.tensor(lengths, dtype=torch.int64)
        first = torch.cumsum(lens, 0) - lens
        seq_of_token = torch.repeat_interleave(torch.arange(len(order)), lens)
        positions = torch.arange(tokens.shape[0]) - first[seq_of_token]  # [T]
        attn, start, k = [], 0, 0
        for g in groups:
            g_lens = lens[k:k + len(g)]
            width, stop = int(g_lens.max()), start + int(g_lens.sum())
            if int(g_lens.min()) == width:
                attn.append(AttnGroup((start, stop), len(g), width))
            else:
                slot = torch.arange(width).unsqueeze(0)  # [1, W]
                real = slot < g_lens.unsqueeze(1)  # [n, W]
                g_first = first[k:k + len(g)].unsqueeze(1)  # [n, 1]
                mask = torch.zeros(real.shape).masked_fill_(~real, float("-inf"))
                attn.append(AttnGroup((start, stop), len(g), width,
                                      gather=torch.where(real, g_first + slot, g_first).view(-1),
                                      mask=mask.view(len(g), 1, 1, width),
                                      keep=real.view(-1).nonzero().squeeze(1)))
            start, k = stop, k + len(g)
        dev, dtype = self.word.weight.device, self.word.weight.dtype
        for g in attn:
            g.gather = None if g.gather is None else g.gather.to(dev, non_blocking=True)
            g.mask = None if g.mask is None else g.mask.to(dev, dtype, non_blocking=True)
            g.keep = None if g.keep is None else g.keep.to(dev, non_blocking=True)
        return Packed(tokens.to(dev), positions.to(dev), attn, first.to(dev), lens.to(dev),
                      seq_of_token.to(dev), torch.tensor(order, dtype=torch.int64, device=dev))


def finish(embeddings: Tensor, dimensions: int | None, normalize: bool) -> Tensor:
    """A job's vectors from pooled ones: the first `dimensions` values (Matryoshka), then
    unit length if asked. Cutting after normalizing would leave vectors shorter than 1."""
    if dimensions is not None:
        if not 1 <= dimensions <= embeddings.shape[-1]:
            raise ValueError(f"dimensions must be 1..{embeddings.shape[-1]}, got {dimensions}")
        embeddings = embeddings[..., :dimensions]
    return F.normalize(embeddings, p=2, dim=-1) if normalize else embeddings
