"""Where weights come from: a builtin seeded model, or a Hugging Face checkpoint directory.

A checkpoint is `config.json` + `*.safetensors` (+ optional `tokenizer.json`) of a
Llama-family decoder. Anything else is refused at start with a message that says what was
found and what is supported, so a wrong model never reaches the broker.

Chat: a checkpoint's own template (`worker.model.chat`) renders `messages` jobs; one
without a template has `chat=None` and such jobs are refused, and one whose template is
broken is refused at start. Builtin models get `BUILTIN_TEMPLATE`, ChatML whose markers
are plain text to the byte tokenizer, so chat jobs run end to end without a checkpoint.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from worker.model.chat import BUILTIN_TEMPLATE, ChatError, ChatTemplate, load_chat_template
from worker.model.decoder import (ModelArgs, Transformer, fused_parts, init_random, rope_inv_freq,
                                  rope_tables)
from worker.model.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

SUPPORTED_ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")

# Builtin models: the byte tokenizer's 258 ids rounded up to a multiple of 64.
BUILTINS: dict[str, ModelArgs] = {
    # For unit and integration tests: milliseconds per step on one core.
    "tiny": ModelArgs(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                      ffn_dim=176, max_position=4096),
    # The demo and benchmark load: ~6M parameters, real matmuls and attention.
    "small": ModelArgs(vocab_size=320, dim=384, n_layers=4, n_heads=6, n_kv_heads=2,
                       ffn_dim=1024, max_position=4096),
    # A Llama shape of ~1B parameters (0.97B): big enough to load a datacenter GPU, for the
    # GPU ladder (tests/gpu/device-check.sh). Seconds to build; far too slow for the CPU.
    "1b": ModelArgs(vocab_size=320, dim=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                    ffn_dim=8192, max_position=4096),
    # No layers: measures the broker path (ingress, admission, executor loop, drain) alone.
    "null": ModelArgs(vocab_size=320, dim=8, n_layers=0, n_heads=1, n_kv_heads=1,
                      ffn_dim=8, max_position=4096),
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
    chat: ChatTemplate | None = None  # renders `messages` jobs; None: the model has no template


def args_from_hf(cfg: dict, where: str) -> ModelArgs:
    archs = cfg.get("architectures") or []
    arch = next((a for a in archs if a in SUPPORTED_ARCHS), None)
    if arch is None:
        raise CheckpointError(
            f"{where}: architecture {archs or cfg.get('model_type')!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_ARCHS)})"
        )
    max_position = int(cfg.get("max_position_embeddings") or 4096)
    window = _sliding_window(cfg, arch)
    if window is not None and window < max_position:
        raise CheckpointError(f"{where}: sliding-window attention (window {window} < "
                              f"max_position_embeddings {max_position}) is not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise CheckpointError(f"{where}: hidden_act {cfg['hidden_act']!r} is not supported (silu)")
    # Llama's `attention_bias` puts a bias on q/k/v *and* o_proj, `mlp_bias` on the MLP;
    # Qwen2 always biases q/k/v and never o_proj; Mistral has none.
    llama_bias = arch == "LlamaForCausalLM" and bool(cfg.get("attention_bias"))
    theta, scaling = _rope(cfg, where)

    def need(key: str) -> int:
        if not isinstance(cfg.get(key), int):
            raise CheckpointError(f"{where}: config.json has no integer {key!r}")
        return cfg[key]

    n_heads = need("num_attention_heads")
    args = ModelArgs(
        vocab_size=need("vocab_size"),
        dim=need("hidden_size"),
        n_layers=need("num_hidden_layers"),
        n_heads=n_heads,
        n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
        ffn_dim=need("intermediate_size"),
        norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position=max_position,
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        attention_bias=arch == "Qwen2ForCausalLM" or llama_bias,
        o_proj_bias=llama_bias,
        mlp_bias=arch == "LlamaForCausalLM" and bool(cfg.get("mlp_bias")),
        head_dim=cfg.get("head_dim") or 0,
    )
    try:
        rope_inv_freq(args)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{where}: rope scaling {scaling}: {e}") from None
    return args


def _sliding_window(cfg: dict, arch: str) -> int | None:
    """The attention window the reference would apply, or None for full attention."""
    window = cfg.get("sliding_window")
    if window is None:
        return None
    if "sliding_attention" in (cfg.get("layer_types") or []):
        return int(window)
    if arch == "MistralForCausalLM":
        return int(window)
    # Qwen2 ignores `sliding_window` unless `use_sliding_window` is set.
    return int(window) if cfg.get("use_sliding_window") else None


def _rope(cfg: dict, where: str) -> tuple[float, dict | None]:
    """(theta, scaling) from either layout of config.json.

    transformers >= 5 writes `rope_parameters` with the theta inside; older versions wrote
    `rope_theta` and `rope_scaling` side by side. Reading only the old keys would load a
    new checkpoint with theta 10000 and no scaling: wrong tokens, no error.
    """
    params = cfg.get("rope_parameters")
    if params:
        if not ({"rope_type", "type", "rope_theta"} & params.keys()):
            raise CheckpointError(f"{where}: per-layer rope_parameters are not supported")
        theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = params
    else:
        theta, scaling = cfg.get("rope_theta", 10000.0), cfg.get("rope_scaling") or {}
    if float(scaling.get("partial_rotary_factor", 1.0)) != 1.0:
        raise CheckpointError(f"{where}: partial_rotary_factor is not supported")
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return float(theta), None
    # One spelling (`type` is the old name of `rope_type`), theta kept out: equal configs compare equal.
    rest = {k: v for k, v in scaling.items() if k not in ("type", "rope_type", "rope_theta")}
    return float(theta), {"rope_type": kind, **rest}


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def _eos_ids(path: Path, cfg: dict) -> tuple[int, ...]:
    """config.json's eos ids, then generation_config.json's (what HF generate stops at)."""
    gen_path = path / "generation_config.json"
    gen = _read_json(gen_path) if gen_path.is_file() else {}
    out: list[int] = []
    for eos in (cfg.get("eos_token_id"), gen.get("eos_token_id")):
        for i in eos if isinstance(eos, list) else [] if eos is None else [eos]:
            if int(i) not in out:
                out.append(int(i))
    return tuple(out)


def load_model(spec: str, dtype: torch.dtype, device: torch.device,
               fp8: bool = False) -> LoadedModel:
    """`dtype` is the compute dtype; with `fp8` a checkpoint already in FP8 loads as it is
    (the caller quantizes any other: `worker.model.fp8.quantize_model`)."""
    if spec.startswith("builtin:"):
        name = spec.removeprefix("builtin:")
        if name not in BUILTINS:
            raise CheckpointError(f"unknown builtin model {spec!r} (have: "
                                  + ", ".join(f"builtin:{n}" for n in BUILTINS) + ")")
        args = BUILTINS[name]
        model = Transformer(args)
        init_random(model, BUILTIN_SEED)
        model = model.to(device=device, dtype=dtype).eval()
        tok = ByteTokenizer()
        return LoadedModel(model, tok, args, spec, (ByteTokenizer.eos_id,),
                           ChatTemplate(BUILTIN_TEMPLATE, tok))
    return _load_hf(Path(spec), dtype, device, fp8)


def _weight_files(path: Path) -> list[Path]:
    """The shards an index names, or every *.safetensors file when there is no index.

    With an index, other files are ignored: some repositories ship a second copy of the
    weights under other names (Mistral's `consolidated.safetensors`).
    """
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = _read_json(index).get("weight_map") or {}
        files = sorted({path / f for f in weight_map.values()})
        absent = [f.name for f in files if not f.is_file()]
        if absent or not files:
            raise CheckpointError(f"{path}: {index.name} names shards that are not there: "
                                  f"{absent[:3] or 'none at all'}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        found = sorted(p.name for p in path.iterdir())[:8] if path.is_dir() else []
        raise CheckpointError(f"{path}: no *.safetensors weights (found {found}; "
                              "pytorch_model.bin and other pickles are not loaded)")
    return files


def _checkpoint_tensors(path: Path, files: list[Path]) -> dict[str, tuple[Path, str, tuple[int, ...]]]:
    """Our parameter name -> (file, name in the file, shape), from the headers alone."""
    from safetensors import safe_open

    out: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for key in st.keys():
                # Rotary inverse frequencies are sometimes saved; we compute our own.
                if key.endswith("rotary_emb.inv_freq"):
                    continue
                name = key.removeprefix("model.")
                if name in out:
                    raise CheckpointError(f"{path}: tensor {key!r} is in both "
                                          f"{out[name][0].name} and {f.name}")
                out[name] = (f, key, tuple(st.get_slice(key).get_shape()))
    return out


def _load_hf(path: Path, dtype: torch.dtype, device: torch.device, fp8: bool) -> LoadedModel:
    from safetensors import safe_open

    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        raise CheckpointError(f"{path}: no config.json (expected a Hugging Face model directory "
                              "or builtin:<name>)")
    cfg = _read_json(cfg_path)
    args = args_from_hf(cfg, str(path))
    prequantized = _fp8_checkpoint(path, cfg, fp8)
    tensors = _checkpoint_tensors(path, _weight_files(path))
    if args.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # a tied head is the embedding, whatever was saved
    with torch.device("meta"):
        model = Transformer(args).to(dtype)
        if prequantized:  # its projections as the file has them: e4m3 and scales, no more
            fp8_structure(model, dtype)
    params = model.hf_parameters()  # checkpoint names; a tied lm_head.weight is the embedding
    quantized = _fp8_tensors(model, args) if prequantized else {}
    missing = (params.keys() | quantized.keys()) - tensors.keys()
    unexpected = tensors.keys() - params.keys() - quantized.keys()
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config: missing "
                              f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    wrong = [f"{n} {tensors[n][2]} (config says {tuple(p.shape)})"
             for n, p in params.items() if tensors[n][2] != tuple(p.shape)]
    wrong += [f"{n} {tensors[n][2]} (config says {shape})" for n, (shape, _) in quantized.items()
              if tensors[n][2] not in shape]
    if wrong:
        raise CheckpointError(f"{path}: weights do not match the config: {wrong[:3]}")

    tok = _tokenizer(path, args)
    chat = _chat(path, tok)  # before the weights: a broken template fails start-up at once

    # Allocate once on the device in the target dtype, then copy tensor by tensor, so
    # neither the host nor the device ever holds a second copy of the model.
    model = model.to_empty(device=device)
    if args.tie_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty() unties shared parameters
    params = model.hf_parameters()  # fused projections: views of their row blocks
    by_file: dict[Path, list[str]] = {}
    for name in params:
        by_file.setdefault(tensors[name][0], []).append(name)
    with torch.no_grad():
        for f, names in by_file.items():
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name in names:
                    params[name].copy_(st.get_tensor(tensors[name][1]))
        if prequantized:
            _fill_fp8(model, args, tensors)
    # to_empty() left the rotary tables uninitialised: rebuild them.
    cos, sin = rope_tables(args)
    model.rope_cos, model.rope_sin = cos.to(device, dtype), sin.to(device, dtype)
    return LoadedModel(model.eval(), tok, args, str(path), _eos_ids(path, cfg), chat)


def _tokenizer(path: Path, args: ModelArgs) -> Tokenizer:
    try:
        tok = load_tokenizer(path)
    except Exception as e:  # the tokenizers library raises its own untyped errors
        raise CheckpointError(f"{path}: tokenizer.json cannot be read: {e}") from None
    if isinstance(tok, HFTokenizer) and tok.vocab_size > args.vocab_size:
        raise CheckpointError(f"{path}: tokenizer.json has {tok.vocab_size} ids but the model "
                              f"only {args.vocab_size}: text prompts could encode to ids the "
                              "model has no embedding for")
    return tok


def _chat(path: Path, tok: Tokenizer) -> ChatTemplate | None:
    try:
        return load_chat_template(path, tok)
    except ChatError as e:
        raise CheckpointError(f"{path}: {e}") from None


# -- checkpoints already in FP8 ------------------------------------------------------------


def _fp8_checkpoint(path: Path, cfg: dict, fp8: bool) -> bool:
    """Is this checkpoint's weights already FP8 (loaded as they are)? Any other quantization
    is refused: the loader would read its packed tensors as plain weights."""
    qc = cfg.get("quantization_config")
    if not qc:
        return False
    method = qc.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"{path}: quantization {method!r} is not supported (plain "
                              "float16/bfloat16/float32 checkpoints, or fp8)")
    if qc.get("weight_block_size"):
        raise CheckpointError(f"{path}: block-wise FP8 (weight_block_size "
                              f"{qc['weight_block_size']}) is not supported: per-tensor or "
                              "per-channel weight scales only")
    if qc.get("activation_scheme", "dynamic") != "dynamic":
        raise CheckpointError(f"{path}: activation_scheme {qc.get('activation_scheme')!r}: "
                              "activations are quantized per token at run time (dynamic) only")
    if not fp8:
        raise CheckpointError(f"{path}: an FP8 checkpoint loads with dtype \"fp8\"")
    return True


def fp8_structure(model: Transformer, dtype: torch.dtype) -> None:
    """Swap the projections for FP8Linear shells (on whatever device the model is: meta
    while loading), so no full-precision projection is ever allocated."""
    from worker.model.fp8 import E4M3, PROJECTIONS, FP8Linear

    for layer in model.layers:
        for parent in (layer.self_attn, layer.mlp):
            for name in PROJECTIONS:
                lin = getattr(parent, name, None)
                if isinstance(lin, nn.Linear):
                    w = lin.weight
                    setattr(parent, name, FP8Linear.from_quantized(
                        torch.empty(w.shape, dtype=E4M3, device=w.device),
                        torch.empty(w.shape[0], device=w.device),
                        None if lin.bias is None else lin.bias, dtype))


def _fp8_parts(model: Transformer, args: ModelArgs):
    """(layer index, module path, FP8Linear, [(checkpoint part name, rows)]) per projection."""
    parts = fused_parts(args)
    for i, layer in enumerate(model.layers):
        for kind, parent in (("self_attn", layer.self_attn), ("mlp", layer.mlp)):
            for name in ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"):
                mod = getattr(parent, name, None)
                if mod is not None:
                    rows = parts.get(name, ((name, mod.out_features),))
                    yield f"layers.{i}.{kind}", mod, rows


def _fp8_tensors(model: Transformer, args: ModelArgs) -> dict[str, tuple[tuple, str]]:
    """The FP8 tensors the file must hold: name -> (accepted shapes, kind)."""
    out: dict[str, tuple[tuple, str]] = {}
    for prefix, mod, rows in _fp8_parts(model, args):
        for part, n in rows:
            out[f"{prefix}.{part}.weight"] = (((n, mod.in_features),), "weight")
            out[f"{prefix}.{part}.weight_scale"] = (((), (1,), (n,), (n, 1)), "scale")
    return out


def _fill_fp8(model: Transformer, args: ModelArgs, tensors: dict) -> None:
    """Copy each part's e4m3 rows into its fused projection, its scale (per tensor or per
    channel) expanded to one per row."""
    from safetensors import safe_open

    def read(name: str) -> torch.Tensor:
        f, key, _ = tensors[name]
        with safe_open(str(f), framework="pt", device="cpu") as st:
            return st.get_tensor(key)

    for prefix, mod, rows in _fp8_parts(model, args):
        at = 0
        for part, n in rows:
            mod.weight[at:at + n].copy_(read(f"{prefix}.{part}.weight"))
            scale = read(f"{prefix}.{part}.weight_scale").float().reshape(-1)
            mod.weight_scale[0, at:at + n].copy_(scale.expand(n) if scale.numel() == 1 else scale)
            at += n
