"""Where weights come from: a builtin seeded model, or a Hugging Face checkpoint directory.

A checkpoint is `config.json` + `*.safetensors` (+ optional `tokenizer.json`) of a
Llama-family decoder. Anything else is refused at start with a message that says what was
found and what is supported, so a wrong model never reaches the broker.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.model import ModelArgs, Transformer, init_random, rope_inv_freq, rope_tables
from worker.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# Builtin models: the byte tokenizer's 258 ids rounded up to a multiple of 64.
BUILTINS: dict[str, ModelArgs] = {
    # For unit and integration tests: milliseconds per step on one core.
    "tiny": ModelArgs(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=176, max_position=4096),
    # The demo and benchmark load: ~6M parameters, real matmuls and attention.
    "small": ModelArgs(vocab_size=320, dim=384, n_layers=4, n_heads=6, n_kv_heads=2,
                       ffn_dim=1024, max_position=4096),
}
BUILTIN_SEED = 1234


class CheckpointError(ValueError):
    """The `model` field names something we cannot load; the message says why."""


@dataclass(slots=True)
class LoadedModel:
    model: Transformer
    tokenizer: Tokenizer
    args: ModelArgs
    name: str
    eos_ids: tuple[int, ...]  # generation stops at these unless the job says otherwise


def args_from_hf(cfg: dict, where: str) -> ModelArgs:
    archs = cfg.get("architectures") or []
    if not any(a in SUPPORTED_ARCHS for a in archs):
        raise CheckpointError(
            f"{where}: architecture {archs or cfg.get('model_type')!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    if cfg.get("use_sliding_window") or (
        cfg.get("sliding_window") and cfg["sliding_window"] < cfg.get("max_position_embeddings", 0)
    ):
        raise CheckpointError(f"{where}: sliding-window attention is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    n_heads = cfg["num_attention_heads"]
    args = ModelArgs(
        vocab_size=cfg["vocab_size"],
        dim=cfg["hidden_size"],
        n_layers=cfg["num_hidden_layers"],
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        ffn_dim=cfg["intermediate_size"],
        norm_eps=cfg.get("rms_norm_eps", 1e-6),
        rope_theta=float(cfg.get("rope_theta", 10000.0)),
        rope_scaling=cfg.get("rope_scaling"),
        max_position=cfg.get("max_position_embeddings", 4096),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=bool(cfg.get("attention_bias", "Qwen2ForCausalLM" in archs)),
        head_dim=cfg.get("head_dim") or 0,
    )
    try:
        rope_inv_freq(args)
    except ValueError as e:
        raise CheckpointError(f"{where}: {e}") from None
    return args


def _eos_ids(cfg: dict) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def load_model(spec: str, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise CheckpointError(f"unknown builtin model {spec!r} (have: "
                                  + ", ".join(f"builtin:{n}" for n in BUILTINS) + ")")
        args = BUILTINS[name]
        model = Transformer(args)
        init_random(model, BUILTIN_SEED)
        model = model.to(device=device, dtype=dtype).eval()
        return LoadedModel(model, ByteTokenizer(), args, spec, (ByteTokenizer.eos_id,))
    return _load_hf(Path(spec), dtype, device)


def _load_hf(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedModel:
    from safetensors.torch import load_file

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory "
                              "or builtin:<name>)")
    cfg = json.loads(cfg_path.read_text())
    args = args_from_hf(cfg, str(path))
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors weights")
    with torch.device("meta"):
        model = Transformer(args)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        for name, t in load_file(str(f), device="cpu").items():
            state[name.removeprefix("model.")] = t.to(dtype)
    if args.tie_embeddings:
        state.pop("lm_head.weight", None)
    expected = {n for n, _ in model.named_parameters()}
    missing, unexpected = expected - state.keys(), state.keys() - expected
    # Rotary inverse frequencies are sometimes saved; we compute our own.
    unexpected = {n for n in unexpected if not n.endswith("rotary_emb.inv_freq")}
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    model = model.to_empty(device=device)
    model.load_state_dict({n: state[n] for n in expected}, strict=False, assign=False)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight
    # to_empty() left the rotary tables uninitialised: rebuild them.
    cos, sin = rope_tables(args)
    model.rope_cos, model.rope_sin = cos.to(device), sin.to(device)
    model = model.to(dtype=dtype).eval()
    return LoadedModel(model, load_tokenizer(path), args, str(path), _eos_ids(cfg))
