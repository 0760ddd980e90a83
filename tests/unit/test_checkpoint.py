"""Loading a Hugging Face checkpoint directory, and refusing one we cannot serve correctly.

Checkpoints here are written by hand (our own model's seeded weights under HF names, and
an HF-style config.json), so these tests need neither transformers nor a download; that
the loaded model computes what transformers computes is test_hf_reference's job. Every
refusal is a CheckpointError whose message names what was found.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worker.model.checkpoint import BUILTINS, CheckpointError, args_from_hf, load_model
from worker.engine.build import EngineError, build_engine
from worker.model.decoder import Transformer, init_random
from worker.model.tokenizer import ByteTokenizer, HFTokenizer

CPU = torch.device("cpu")


def hf_config(arch: str = "LlamaForCausalLM", **over) -> dict:
    """A tiny config.json as transformers >= 5 writes it (theta inside rope_parameters)."""
    cfg = {
        "architectures": [arch], "model_type": arch.removesuffix("ForCausalLM").lower(),
        "vocab_size": 300, "hidden_size": 64, "intermediate_size": 176,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "max_position_embeddings": 256, "rms_norm_eps": 1e-6, "hidden_act": "silu",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
        "tie_word_embeddings": False, "eos_token_id": None,
    }
    cfg.update(over)
    return cfg


def hf_state(cfg: dict) -> dict[str, torch.Tensor]:
    """Seeded weights for `cfg` under the names transformers saves them with."""
    model = Transformer(args_from_hf(cfg, "test"))
    init_random(model, seed=7)
    # A tied head is listed once, as the embedding: transformers does not save it either.
    state = {n: t.detach().clone() for n, t in model.hf_parameters().items()}
    return {n if n == "lm_head.weight" else f"model.{n}": t for n, t in state.items()}


def write_checkpoint(path: Path, cfg: dict, state: dict[str, torch.Tensor] | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file(state if state is not None else hf_state(cfg), str(path / "model.safetensors"))
    return path


def load(path: Path, dtype: torch.dtype = torch.float32):
    return load_model(str(path), dtype, CPU)


# -- loading ---------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"])
def test_loads_every_saved_tensor(tmp_path: Path, arch: str) -> None:
    cfg = hf_config(arch)
    state = hf_state(cfg)
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # older exports
    loaded = load(write_checkpoint(tmp_path, cfg, state))
    params = loaded.model.hf_parameters()
    for name, t in state.items():
        if not name.endswith("inv_freq"):
            assert torch.equal(params[name.removeprefix("model.")], t), name
    assert loaded.args.attention_bias == (arch == "Qwen2ForCausalLM")
    assert loaded.eos_ids == ()


def test_fused_projections_are_loaded_through_their_checkpoint_names() -> None:
    model = Transformer(BUILTINS["tiny"])
    params = model.hf_parameters()
    assert {"layers.1.self_attn.q_proj.weight", "layers.1.self_attn.k_proj.weight",
            "layers.1.self_attn.v_proj.weight", "layers.1.mlp.gate_proj.weight",
            "layers.1.mlp.up_proj.weight"} <= params.keys()
    assert not [n for n in params if "qkv_proj" in n or "gate_up_proj" in n]
    assert sum(p.numel() for p in params.values()) == sum(p.numel() for p in model.parameters())
    # Each name is a view of its rows of the fused weight: a load writes it in place.
    attn, mlp = model.layers[1].self_attn, model.layers[1].mlp
    q, k, _ = attn.qkv_split
    with torch.no_grad():
        params["layers.1.self_attn.k_proj.weight"].fill_(3.0)
        params["layers.1.mlp.up_proj.weight"].fill_(-2.0)
    fused = attn.qkv_proj.weight
    assert (fused[q:q + k] == 3.0).all() and not (fused[:q] == 3.0).any()
    assert not (fused[q + k:] == 3.0).any()
    half = mlp.gate_up_proj.weight.shape[0] // 2
    assert (mlp.gate_up_proj.weight[half:] == -2.0).all()
    assert not (mlp.gate_up_proj.weight[:half] == -2.0).any()


def test_tied_embeddings_share_storage_and_ignore_a_saved_head(tmp_path: Path) -> None:
    cfg = hf_config("Qwen2ForCausalLM", tie_word_embeddings=True)
    state = hf_state(cfg)
    state["lm_head.weight"] = torch.zeros(300, 64)  # a stale copy some exporters write
    model = load(write_checkpoint(tmp_path, cfg, state), torch.bfloat16).model
    assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    assert torch.equal(model.embed_tokens.weight.float(),
                       state["model.embed_tokens.weight"].bfloat16().float())
    assert model.rope_cos.dtype == torch.bfloat16 and model.rope_cos.isfinite().all()


def test_both_config_layouts_read_the_same(tmp_path: Path) -> None:
    """transformers < 5 wrote rope_theta and rope_scaling; >= 5 writes rope_parameters."""
    new = hf_config(rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 5e5})
    old = hf_config(rope_theta=5e5, rope_scaling={"type": "linear", "factor": 4.0})
    del old["rope_parameters"]
    a, b = args_from_hf(new, "new"), args_from_hf(old, "old")
    assert a == b
    assert a.rope_theta == 5e5 and a.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_sharded_checkpoint_loads_the_shards_its_index_names(tmp_path: Path) -> None:
    cfg = hf_config()
    state = hf_state(cfg)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    names = sorted(state)
    weight_map = {}
    for i in range(3):
        shard = f"model-{i + 1:05d}-of-00003.safetensors"
        part = {n: state[n] for n in names[i::3]}
        save_file(part, str(tmp_path / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    # Mistral's repositories ship the same weights again under other names: not ours to load.
    save_file({"tok_embeddings.weight": torch.zeros(2)}, str(tmp_path / "consolidated.safetensors"))
    params = load(tmp_path).model.hf_parameters()
    assert all(torch.equal(params[n.removeprefix("model.")], state[n]) for n in state)


def test_eos_ids_come_from_config_and_generation_config(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, hf_config(eos_token_id=2))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2, 9]}))
    assert load(tmp_path).eos_ids == (2, 7, 9)


# -- tokenizers ------------------------------------------------------------------------


def bpe_tokenizer(vocab_size: int):
    """A byte-level BPE (lossless for any text) trained here, with a BOS post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog, hello world"] * 8,
                            trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A",
                                                       special_tokens=[("<s>", 0)])
    return tok


def test_tokenizer_json_is_used_for_text(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, hf_config())
    ref = bpe_tokenizer(290)
    ref.save(str(tmp_path / "tokenizer.json"))
    tok = load(tmp_path).tokenizer
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == ref.get_vocab_size()
    ids = tok.encode("hello world")
    assert ids == ref.encode("hello world").ids
    assert ids[0] == 0 and len(ids) < len("hello world")  # BOS, then merged tokens, not bytes
    text = "the lazy fox says hé ✓"
    assert tok.decode(tok.encode(text)) == text  # BOS skipped, bytes round-trip
    assert tok.decode([5, 10**6, 6]) == ref.decode([5, 6])  # an unknown id never raises


def test_byte_tokenizer_without_tokenizer_json(tmp_path: Path) -> None:
    tok = load(write_checkpoint(tmp_path, hf_config())).tokenizer
    assert isinstance(tok, ByteTokenizer)
    assert tok.encode("hé") == [104, 195, 169] and tok.decode([104, 195, 169]) == "hé"


def test_tokenizer_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, hf_config(vocab_size=200))
    bpe_tokenizer(290).save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(CheckpointError, match=r"tokenizer.json has 290 ids but the model only 200"):
        load(tmp_path)


def test_unreadable_tokenizer_is_refused(tmp_path: Path) -> None:
    write_checkpoint(tmp_path, hf_config())
    (tmp_path / "tokenizer.json").write_text('{"model": "not a tokenizer"}')
    with pytest.raises(CheckpointError, match=r"tokenizer.json cannot be read"):
        load(tmp_path)


# -- refusals --------------------------------------------------------------------------


def _drop(name: str) -> Callable[[Path], None]:
    def act(path: Path) -> None:
        state = load_file(str(path / "model.safetensors"))
        del state[name]
        save_file(state, str(path / "model.safetensors"))
    return act


def _add(name: str, shape: tuple[int, ...]) -> Callable[[Path], None]:
    def act(path: Path) -> None:
        state = load_file(str(path / "model.safetensors"))
        save_file({**state, name: torch.zeros(shape)}, str(path / "model.safetensors"))
    return act


def _only_pickle(path: Path) -> None:
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"\x80\x02")


def _index_without_shards(path: Path) -> None:
    weight_map = {"model.embed_tokens.weight": "model-00001-of-00002.safetensors"}
    (path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


YARN = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4,
        "original_max_position_embeddings": 64}
REFUSALS = [
    pytest.param({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, None,
                 r"architecture \['GPT2LMHeadModel'\] is not supported \(supported: "
                 r"LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM\)", id="gpt2"),
    pytest.param({}, lambda p: (p / "config.json").unlink(), r"no config.json", id="no-config"),
    pytest.param({}, lambda p: (p / "config.json").write_text("{'not': json}"),
                 r"config.json: cannot be read as JSON", id="config-not-json"),
    pytest.param({}, _only_pickle, r"no \*\.safetensors weights \(found \['config.json', "
                 r"'pytorch_model.bin'\]", id="no-safetensors"),
    pytest.param({}, _drop("model.layers.1.mlp.down_proj.weight"),
                 r"missing \['layers.1.mlp.down_proj.weight'\], unexpected \[\]",
                 id="missing-tensor"),
    pytest.param({}, _add("model.layers.0.self_attn.q_proj.bias", (64,)),
                 r"missing \[\], unexpected \['layers.0.self_attn.q_proj.bias'\]",
                 id="unexpected-tensor"),
    pytest.param({"vocab_size": 320}, None,
                 r"embed_tokens.weight \(300, 64\) \(config says \(320, 64\)\)", id="wrong-shape"),
    pytest.param({}, _index_without_shards,
                 r"model.safetensors.index.json names shards that are not there: "
                 r"\['model-00001-of-00002.safetensors'\]", id="index-without-shards"),
    pytest.param({"rope_parameters": YARN}, None, r"unsupported rope_scaling type 'yarn'",
                 id="rope-yarn"),
    pytest.param({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, None,
                 r"rope scaling .*'low_freq_factor'", id="rope-llama3-incomplete"),
    pytest.param({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
                 None, r"partial_rotary_factor", id="partial-rotary"),
    pytest.param({"architectures": ["MistralForCausalLM"], "sliding_window": 128}, None,
                 r"sliding-window attention \(window 128 < max_position_embeddings 256\)",
                 id="mistral-sliding-window"),
    pytest.param({"architectures": ["Qwen2ForCausalLM"], "sliding_window": 64,
                  "use_sliding_window": True}, None, r"sliding-window", id="qwen2-sliding-window"),
    pytest.param({"quantization_config": {"quant_method": "gptq", "bits": 4}}, None,
                 r"quantization .gptq. is not supported", id="quantized"),
    pytest.param({"hidden_act": "gelu"}, None, r"hidden_act 'gelu' is not supported",
                 id="gelu"),
    pytest.param({"hidden_size": None}, None, r"config.json has no integer 'hidden_size'",
                 id="no-hidden-size"),
]


@pytest.mark.parametrize(("cfg_update", "act", "match"), REFUSALS)
def test_refused_with_a_clear_message(tmp_path: Path, cfg_update: dict,
                                      act: Callable[[Path], None] | None, match: str) -> None:
    write_checkpoint(tmp_path, hf_config())
    (tmp_path / "config.json").write_text(json.dumps({**hf_config(), **cfg_update}))
    if act is not None:
        act(tmp_path)
    with pytest.raises(CheckpointError, match=match) as err:
        load(tmp_path)
    assert str(tmp_path) in str(err.value)


@pytest.mark.parametrize("cfg", [
    hf_config("MistralForCausalLM", sliding_window=None),
    hf_config("MistralForCausalLM", sliding_window=256),  # covers every position: full attention
    hf_config("Qwen2ForCausalLM", sliding_window=64, use_sliding_window=False),  # Qwen2 ignores it
], ids=["mistral-none", "mistral-window-covers-all", "qwen2-window-off"])
def test_windows_that_change_nothing_are_accepted(tmp_path: Path, cfg: dict) -> None:
    load(write_checkpoint(tmp_path, cfg))


def test_engine_reports_the_refusal_under_the_model_field(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"^model: .*no config.json"):
        build_engine(str(tmp_path), "cpu", "float32", token_budget=256, max_seq_len=128)
    with pytest.raises(EngineError, match=r"^max_seq_len: 512 is over the model's 256"):
        build_engine(str(write_checkpoint(tmp_path / "m", hf_config())), "cpu", "float32",
                     token_budget=1024, max_seq_len=512)


def test_the_gpu_ladders_builtin_is_a_1b_llama_shape() -> None:
    """builtin:1b is only built on a GPU (the device check); its shape is checked here."""
    from worker.model.checkpoint import BUILTINS

    args = BUILTINS["1b"]
    assert 0.9e9 <= args.num_params() <= 1.1e9
    assert args.hd == 64 and args.n_heads % args.n_kv_heads == 0
