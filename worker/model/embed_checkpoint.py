"""Embedding checkpoints: a sentence-transformers directory around a BERT encoder.

A directory with `modules.json` is an embedding model. It is served only if its modules are
ones we compute exactly as sentence-transformers does: a Transformer (BERT weights in
safetensors, a `tokenizer.json`), a Pooling by mean, CLS or last token, and an optional
Normalize. Anything else (a Dense layer, max pooling, a default prompt, a rotary or
relative-position model, a tokenizer transformers would rebuild differently) is refused at
load with an `EncoderCheckpointError` naming the directory and what was wrong, so a model
that would embed differently never reaches the broker.

Text is tokenized as sentence-transformers tokenizes it: the tokenizer's own special tokens
added, lower-cased first when `sentence_bert_config.json` says `do_lower_case`, and cut to
the model's limit (special tokens kept) only when the caller allows it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from worker.model.checkpoint import CheckpointError
from worker.model.encoder import POOLINGS, Encoder, EncoderArgs, EncoderInfo

# RoBERTa and XLM-R compute the same layers, but transformers >= 5 rebuilds their
# tokenizers' pre-tokenization from its own classes, not tokenizer.json, so which ids
# sentence-transformers makes for them depends on its version: not served until checked.
MODEL_TYPES = ("bert",)
GELUS = {"gelu": "none", "gelu_new": "tanh", "gelu_pytorch_tanh": "tanh"}  # -> F.gelu approximate
# Tensors an encoder does not use: the NSP pooler, pre-training heads, saved index buffers.
UNUSED = ("pooler.", "cls.")
UNUSED_SUFFIXES = ("position_ids", "token_type_ids")
# Tokenizer classes transformers builds from tokenizer.json as written, as we do.
VERBATIM_TOKENIZERS = ("PreTrainedTokenizerFast", "TokenizersBackend")
# sentence-transformers' legacy pooling flags (<= 5.x configs) and the mode each turns on.
LEGACY_POOLING = {"pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max",
                  "pooling_mode_mean_tokens": "mean", "pooling_mode_mean_sqrt_len_tokens":
                  "mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens": "weightedmean",
                  "pooling_mode_lasttoken": "lasttoken"}


class EncoderCheckpointError(CheckpointError):
    """An embedding checkpoint we will not serve: `path` is the directory, `reason` why."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = path, reason


class TextTooLong(ValueError):
    """A text has more tokens than the model takes and the caller did not allow cutting it."""

    def __init__(self, num_tokens: int, max_tokens: int):
        super().__init__(f"input has {num_tokens} tokens, more than the model's {max_tokens}; "
                         "shorten it or allow truncation")
        self.num_tokens, self.max_tokens = num_tokens, max_tokens


@dataclass(slots=True)
class Encoded:
    ids: list[int]  # special tokens included, at most max_seq_len of them
    truncated: bool  # the text had more tokens and was cut to max_seq_len


class EmbedTokenizer:
    """Text -> ids for an embedding model, as sentence-transformers makes them."""

    def __init__(self, path: Path, max_seq_len: int, lower_case: bool, side: str):
        from tokenizers import Tokenizer
        from tokenizers.normalizers import Lowercase, Sequence

        # Two copies, because truncation is state of a tokenizer and threads share this one.
        self._full, self._cut = Tokenizer.from_file(str(path)), Tokenizer.from_file(str(path))
        for tok in (self._full, self._cut):
            tok.no_padding()  # tokenizer.json often pads to a fixed width; we pack instead
            tok.no_truncation()
            norm = tok.normalizer
            # sentence-transformers prepends Lowercase unless one is there already.
            if lower_case and not (isinstance(norm, Lowercase) or isinstance(norm, Sequence)
                                   and any(isinstance(n, Lowercase) for n in norm)):
                tok.normalizer = Sequence([Lowercase()] + ([] if norm is None else [norm]))
        self._cut.enable_truncation(max_seq_len, direction=side)
        self.max_seq_len = max_seq_len
        self.vocab_size = max(self._full.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    def encode(self, text: str, truncate: bool) -> Encoded:
        return self.encode_batch([text], truncate)[0]

    def encode_batch(self, texts: list[str], truncate: bool) -> list[Encoded]:
        """Raises TextTooLong for the first text over the limit when `truncate` is False."""
        if truncate:
            return [Encoded(e.ids, bool(e.overflowing)) for e in self._cut.encode_batch(texts)]
        out = [Encoded(e.ids, False) for e in self._full.encode_batch(texts)]
        for e in out:
            if len(e.ids) > self.max_seq_len:
                raise TextTooLong(len(e.ids), self.max_seq_len)
        return out


@dataclass(slots=True)
class LoadedEncoder:
    model: Encoder
    tokenizer: EmbedTokenizer
    info: EncoderInfo
    name: str


def is_encoder_checkpoint(path: Path | str) -> bool:
    """A sentence-transformers directory: the worker serves embeddings, not generation."""
    return (Path(path) / "modules.json").is_file()


def load_encoder(path: Path, dtype: torch.dtype, device: torch.device) -> LoadedEncoder:
    path = Path(path)
    if not is_encoder_checkpoint(path):
        raise EncoderCheckpointError(path, "no modules.json (not a sentence-transformers "
                                     "directory)")
    body, pooling_dir, normalize = _modules(path)
    cfg = _read_json(path, body / "config.json")
    args = encoder_args(cfg, path)
    sbert = _read_json(path, body / "sentence_bert_config.json", missing_ok=True)
    _check_sentence_config(path, sbert, _read_json(
        path, path / "config_sentence_transformers.json", missing_ok=True))
    pooling = _pooling(path, _read_json(path, pooling_dir / "config.json"), args.dim)
    tok_cfg = _read_json(path, body / "tokenizer_config.json", missing_ok=True)
    info = EncoderInfo(_max_seq_len(args, sbert, tok_cfg), args.dim, normalize, pooling)
    tok = _tokenizer(path, body, args, info, sbert, tok_cfg)
    model = _load_weights(path, body, args, pooling, normalize, dtype, device)
    return LoadedEncoder(model, tok, info, str(path))


def encoder_args(cfg: dict, path: Path) -> EncoderArgs:
    kind = cfg.get("model_type")
    if kind not in MODEL_TYPES:
        raise EncoderCheckpointError(path, f"model_type {kind!r} is not supported "
                                     f"(supported: {', '.join(MODEL_TYPES)})")
    if cfg.get("position_embedding_type", "absolute") != "absolute":
        raise EncoderCheckpointError(path, "position_embedding_type "
                                     f"{cfg['position_embedding_type']!r} is not supported "
                                     "(absolute)")
    if cfg.get("hidden_act", "gelu") not in GELUS:
        raise EncoderCheckpointError(path, f"hidden_act {cfg['hidden_act']!r} is not supported "
                                     f"({', '.join(GELUS)})")
    if cfg.get("is_decoder") or cfg.get("add_cross_attention"):
        raise EncoderCheckpointError(path, "a decoder configuration (is_decoder / "
                                     "add_cross_attention) is not an encoder")
    if cfg.get("quantization_config"):
        raise EncoderCheckpointError(path, "quantized checkpoints are not supported")

    def need(key: str) -> int:
        if not isinstance(cfg.get(key), int) or cfg[key] < 1:
            raise EncoderCheckpointError(path, f"config.json has no positive integer {key!r}")
        return cfg[key]

    dim, heads = need("hidden_size"), need("num_attention_heads")
    if dim % heads:
        raise EncoderCheckpointError(path, f"hidden_size {dim} is not a multiple of "
                                     f"num_attention_heads {heads}")
    args = EncoderArgs(
        vocab_size=need("vocab_size"), dim=dim, n_layers=need("num_hidden_layers"),
        n_heads=heads, ffn_dim=need("intermediate_size"),
        max_position=need("max_position_embeddings"),
        type_vocab_size=int(cfg.get("type_vocab_size", 2)),
        norm_eps=float(cfg.get("layer_norm_eps", 1e-12)),
        gelu=GELUS[cfg.get("hidden_act", "gelu")])
    if args.max_position < 2 or args.type_vocab_size < 1:
        raise EncoderCheckpointError(path, f"max_position_embeddings {args.max_position} and "
                                     f"type_vocab_size {args.type_vocab_size} leave no room "
                                     "for a text")
    return args


def _modules(path: Path) -> tuple[Path, Path, bool]:
    """(Transformer directory, Pooling directory, whether a Normalize follows), or refuse."""
    try:
        mods = json.loads((path / "modules.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EncoderCheckpointError(path, f"modules.json cannot be read as JSON: {e}") from None
    if not isinstance(mods, list) or not mods:
        raise EncoderCheckpointError(path, "modules.json is not a non-empty JSON list of modules")
    # sentence-transformers >= 6 writes its own module paths, older ones
    # `sentence_transformers.models.X`: the class name is what tells what the module does.
    kinds = [str(m.get("type", "")).rsplit(".", 1)[-1] if isinstance(m, dict) else "?"
             for m in mods]
    if kinds not in (["Transformer", "Pooling"], ["Transformer", "Pooling", "Normalize"]):
        raise EncoderCheckpointError(path, f"modules {kinds} are not supported (supported: "
                                     "Transformer, Pooling, then optionally Normalize)")
    if not all(str(m["type"]).startswith("sentence_transformers.") for m in mods):
        raise EncoderCheckpointError(path, "custom module code is not run: "
                                     f"{[m['type'] for m in mods]}")
    body, pooling = (path / str(m.get("path", "")) for m in mods[:2])
    if len(mods) == 3:
        norm_dir = path / str(mods[2].get("path", ""))
        norm = _read_json(path, norm_dir / "config.json", missing_ok=True)
        if norm.get("module_input_name", "sentence_embedding") != "sentence_embedding":
            raise EncoderCheckpointError(path, "a Normalize of token embeddings is not supported")
    return body, pooling, len(mods) == 3


def _pooling(path: Path, cfg: dict, dim: int) -> str:
    width = cfg.get("embedding_dimension", cfg.get("word_embedding_dimension"))
    if width is not None and width != dim:
        raise EncoderCheckpointError(path, f"pooling expects {width}-wide token embeddings, "
                                     f"the model makes {dim}")
    mode = cfg.get("pooling_mode")
    if mode is None:  # the legacy flags; none set means mean, as sentence-transformers reads it
        mode = [m for key, m in LEGACY_POOLING.items() if cfg.get(key)] or ["mean"]
    modes = [mode] if isinstance(mode, str) else list(mode)
    if len(modes) != 1 or modes[0] not in POOLINGS:
        raise EncoderCheckpointError(path, f"pooling {'+'.join(map(str, modes))} is not "
                                     f"supported (supported: {', '.join(POOLINGS)})")
    return modes[0]


def _check_sentence_config(path: Path, sbert: dict, st: dict) -> None:
    """Refuse settings under which sentence-transformers would embed a text differently."""
    task = sbert.get("transformer_task", "feature-extraction")
    if task != "feature-extraction":
        raise EncoderCheckpointError(path, f"transformer_task {task!r} is not supported "
                                     "(feature-extraction)")
    multi = [k for k in ("query_expansion", "query_length", "document_length") if sbert.get(k)]
    if multi:
        raise EncoderCheckpointError(path, f"multi-vector settings {multi} are not supported")
    if st.get("model_type", "SentenceTransformer") != "SentenceTransformer":
        raise EncoderCheckpointError(path, f"a {st['model_type']} is not an embedding model")
    if st.get("default_prompt_name"):
        raise EncoderCheckpointError(path, f"default prompt {st['default_prompt_name']!r} is not "
                                     "supported: texts would embed without it")


def _max_seq_len(args: EncoderArgs, sbert: dict, tok_cfg: dict) -> int:
    """sentence-transformers' limit (its config, else the tokenizer's), within the positions."""
    limit = sbert.get("max_seq_length") or tok_cfg.get("model_max_length")
    if isinstance(limit, (int, float)) and 1 < limit < args.max_position:
        return int(limit)
    return args.max_position


def _tokenizer(path: Path, body: Path, args: EncoderArgs, info: EncoderInfo, sbert: dict,
               tok_cfg: dict) -> EmbedTokenizer:
    file = body / "tokenizer.json"
    if not file.is_file():
        raise EncoderCheckpointError(path, "no tokenizer.json (slow tokenizers are not loaded)")
    _check_tokenizer(path, _read_json(path, file), tok_cfg)
    side = tok_cfg.get("truncation_side", "right")
    if side not in ("left", "right"):
        raise EncoderCheckpointError(path, f"truncation_side {side!r} is not left or right")
    try:
        tok = EmbedTokenizer(file, info.max_seq_len, bool(sbert.get("do_lower_case")), side)
    except Exception as e:  # the tokenizers library raises its own untyped errors
        raise EncoderCheckpointError(path, f"tokenizer.json cannot be read: {e}") from None
    if tok.vocab_size > args.vocab_size:
        raise EncoderCheckpointError(path, f"tokenizer.json has {tok.vocab_size} ids but the model "
                                     f"only {args.vocab_size}")
    return tok


def _check_tokenizer(path: Path, spec: dict, tok_cfg: dict) -> None:
    """Refuse a tokenizer.json that transformers would not tokenize with as written.

    We tokenize with tokenizer.json as written. transformers >= 5 does too for a generic
    tokenizer class, but rebuilds a BertTokenizer from tokenizer_config.json (normalizer,
    pre-tokenizer, WordPiece settings; `do_lower_case` defaults to True) keeping only the
    vocabulary and post-processor. Where the two disagree, sentence-transformers' ids depend
    on the transformers version and neither choice is safe.
    """
    cls = tok_cfg.get("tokenizer_class") or "BertTokenizer"  # what AutoTokenizer picks for bert
    if cls in VERBATIM_TOKENIZERS:
        return
    if cls not in ("BertTokenizer", "BertTokenizerFast"):
        raise EncoderCheckpointError(path, f"tokenizer_class {cls!r} is not supported "
                                     f"(BertTokenizer, {', '.join(VERBATIM_TOKENIZERS)})")
    lower, strip = tok_cfg.get("do_lower_case", True), tok_cfg.get("strip_accents")
    implied = {"normalizer": "BertNormalizer", "clean_text": True, "lowercase": lower,
               "handle_chinese_chars": tok_cfg.get("tokenize_chinese_chars", True),
               "strip_accents": lower if strip is None else strip,  # None: strip when lower-casing
               "pre_tokenizer": "BertPreTokenizer", "model": "WordPiece",
               "unk_token": tok_cfg.get("unk_token", "[UNK]"), "continuing_subword_prefix": "##",
               "max_input_chars_per_word": 100}
    norm, model = spec.get("normalizer") or {}, spec.get("model") or {}
    written = {"normalizer": norm.get("type"), "clean_text": norm.get("clean_text"),
               "lowercase": norm.get("lowercase"),
               "handle_chinese_chars": norm.get("handle_chinese_chars"),
               "strip_accents": norm.get("lowercase") if norm.get("strip_accents") is None
               else norm.get("strip_accents"),
               "pre_tokenizer": (spec.get("pre_tokenizer") or {}).get("type"),
               "model": model.get("type"), "unk_token": model.get("unk_token"),
               "continuing_subword_prefix": model.get("continuing_subword_prefix"),
               "max_input_chars_per_word": model.get("max_input_chars_per_word")}
    differ = {k: (written[k], implied[k]) for k in implied if written[k] != implied[k]}
    if differ:
        raise EncoderCheckpointError(path, "tokenizer.json and tokenizer_config.json disagree "
                                     "(setting: (tokenizer.json, tokenizer_config.json)): "
                                     f"{differ}")


def _load_weights(path: Path, body: Path, args: EncoderArgs, pooling: str, normalize: bool,
                  dtype: torch.dtype, device: torch.device) -> Encoder:
    from safetensors import safe_open

    files = sorted(body.glob("*.safetensors"))
    if not files:
        raise EncoderCheckpointError(path, "no *.safetensors weights (pytorch_model.bin and "
                                     "other pickles are not loaded)")
    tensors: dict[str, tuple[Path, str, tuple[int, ...]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as st:
            for key in st.keys():
                name = _our_name(key)
                if name is None:
                    continue
                if name in tensors:
                    raise EncoderCheckpointError(path, f"tensor {name!r} is in the "
                                                 "checkpoint twice")
                tensors[name] = (f, key, tuple(st.get_slice(key).get_shape()))
    with torch.device("meta"):
        model = Encoder(args, pooling, normalize).to(dtype)
    params = model.checkpoint_parameters()
    missing, unexpected = params.keys() - tensors.keys(), tensors.keys() - params.keys()
    if missing or unexpected:
        raise EncoderCheckpointError(path, f"weights do not match the config: missing "
                                     f"{sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}")
    wrong = [f"{n} {tensors[n][2]} (config says {tuple(p.shape)})"
             for n, p in params.items() if tensors[n][2] != tuple(p.shape)]
    if wrong:
        raise EncoderCheckpointError(path, f"weights do not match the config: {wrong[:3]}")
    # Allocate once on the device, then copy tensor by tensor: no second copy anywhere.
    model = model.to_empty(device=device)
    params = model.checkpoint_parameters()
    with torch.no_grad():
        for f in files:
            with safe_open(str(f), framework="pt", device="cpu") as st:
                for name, (src, key, _) in tensors.items():
                    if src == f:
                        params[name].copy_(st.get_tensor(key))
    return model.eval()


def _our_name(key: str) -> str | None:
    """A checkpoint tensor's BertModel name, or None for one the encoder does not use."""
    key = key.removeprefix("bert.")  # BertForMaskedLM and the like wrap the encoder
    if key.startswith(UNUSED) or key.endswith(UNUSED_SUFFIXES):
        return None
    # TF-era checkpoints name LayerNorm parameters gamma and beta (transformers renames them).
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta",
                                                                      "LayerNorm.bias")


def _read_json(path: Path, file: Path, missing_ok: bool = False) -> dict:
    if not file.exists():
        if missing_ok:
            return {}
        raise EncoderCheckpointError(path, f"no {file.relative_to(path)}")
    try:
        data = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise EncoderCheckpointError(path, f"{file.name} cannot be read as JSON: {e}") from None
    if not isinstance(data, dict):
        raise EncoderCheckpointError(path, f"{file.name} is not a JSON object")
    return data
