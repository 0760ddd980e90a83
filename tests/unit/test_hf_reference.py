"""Our loader and engine against a reference nobody here wrote: Hugging Face transformers.

Each checkpoint is made in the test from a tiny config with seeded random weights (no
download) and saved in safetensors by `save_pretrained`. Loaded through our engine, ragged
prompts prefilled and decoded together must give each prompt the greedy tokens that
`transformers` generates for it alone, and the same prefill logits. The configs cover what
a Llama-family loader can get silently wrong: grouped-query attention, rope theta, linear
and llama3 rope scaling, a head_dim that is not hidden/heads, q/k/v bias, tied embeddings,
sharded weights, and both transformers config layouts (the installed one writes them).
"""

from __future__ import annotations

import dataclasses
import math
import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from worker.engine.build import Engine, build_engine

from worker.engine.step import generate  # noqa: E402
from worker.engine.sequence import Request  # noqa: E402

VOCAB = 300
NEW_TOKENS = 10
BASE = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    # No eos anywhere: neither side may stop early, so every token is compared.
    bos_token_id=None, eos_token_id=None, pad_token_id=None,
    attn_implementation="eager",  # the plainest reference path
)
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
# id: (architecture, config overrides, save_pretrained kwargs)
CASES: dict[str, tuple[str, dict, dict]] = {
    "llama-gqa": ("Llama", dict(rope_theta=500000.0), {}),
    # Wavelengths on both sides of 16/4..16 positions: scaled, smoothed and kept bands.
    "llama-rope-llama3": ("Llama", dict(rope_scaling=LLAMA3_SCALING, num_key_value_heads=1), {}),
    "llama-rope-linear": ("Llama", dict(rope_scaling={"rope_type": "linear", "factor": 4.0}), {}),
    # attention_bias biases q/k/v and o_proj; mlp_bias the three MLP projections.
    "llama-biases": ("Llama", dict(attention_bias=True, mlp_bias=True), {}),
    "mistral-head-dim": ("Mistral", dict(sliding_window=None, head_dim=32), {}),
    "qwen2-bias-tied": ("Qwen2", dict(tie_word_embeddings=True, rope_theta=1e6), {}),
    "qwen2-sharded": ("Qwen2", dict(rope_theta=1e6), dict(max_shard_size="40KB")),
}


def randomize(model: torch.nn.Module, seed: int) -> None:
    """Unit-scale weights (HF's 0.02 init makes near-ties), non-trivial norms and biases."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / math.sqrt(p.shape[-1]))


def prompts(seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(n)] for n in (1, 6, 17, 40)]


def req(key: int, prompt: list[int]) -> Request:
    return Request.greedy(key, prompt, NEW_TOKENS, seed=key)


def new_engine(path: Path, dtype: str = "float32") -> Engine:
    return build_engine(str(path), "cpu", dtype, token_budget=1024, max_seq_len=128)


def prefill_logits(engine: Engine, ps: list[list[int]]) -> list[torch.Tensor]:
    """Our next-token logits after each prompt, all prompts prefilled in one step."""
    sched, runner = engine.scheduler(), engine.runner()
    for i, p in enumerate(ps):
        sched.add(req(i, p), 0.0)
    plan = sched.schedule()
    assert not plan.decode and len(plan.rows) == len(ps), "expected one prefill step for all"
    inp = runner.prepare(plan).inp
    with torch.inference_mode():
        logits = engine.loaded.model(inp, engine.pool.tensor)  # [B, V]
    for i in range(len(ps)):
        engine.pool.blocks.release(i)  # never decoded: hand the blocks back directly
    by_key = {s.req.key: logits[j] for j, s in enumerate(plan.rows)}
    return [by_key[i] for i in range(len(ps))]


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """(reference model, checkpoint dir, our float32 engine) for one config."""
    arch, overrides, save_kw = CASES[request.param]
    cfg = getattr(transformers, f"{arch}Config")(**{**BASE, **overrides})
    torch.manual_seed(0)
    ref = getattr(transformers, f"{arch}ForCausalLM")(cfg).eval()
    randomize(ref, seed=sum(map(ord, request.param)))
    path = tmp_path_factory.mktemp(request.param)
    ref.save_pretrained(path, **save_kw)  # safetensors is the default format
    assert ref.generation_config.eos_token_id is None
    return ref, path, new_engine(path)


def test_checkpoint_is_what_the_case_says(case) -> None:
    ref, path, engine = case
    assert engine.loaded.eos_ids == ()
    assert engine.loaded.args.tie_embeddings == ref.config.tie_word_embeddings
    model = engine.loaded.model
    if engine.loaded.args.tie_embeddings:
        assert model.lm_head.weight.data_ptr() == model.embed_tokens.weight.data_ptr()
    if (path / "model.safetensors.index.json").exists():
        assert len(list(path.glob("model-*.safetensors"))) >= 3


def test_prefill_logits_match_transformers(case) -> None:
    ref, _, engine = case
    ps = prompts(seed=1)
    ours = prefill_logits(engine, ps)
    for i, p in enumerate(ps):
        with torch.no_grad():
            theirs = ref(torch.tensor([p])).logits[0, -1].float()  # [V]
        err = (ours[i] - theirs).abs().max().item()
        assert torch.allclose(ours[i], theirs, rtol=1e-4, atol=1e-4), (
            f"prompt {i} (length {len(p)}): max |ours - transformers| = {err:.2e}")


@pytest.mark.parametrize("runner", ["eager", "pipelined"])
def test_greedy_tokens_match_transformers(case, runner) -> None:
    """Both runners: the pipelined one decodes through the fixed-shape forward that a CUDA
    graph replays, so every config's attention variant is checked there too."""
    ref, _, engine = case
    engine = dataclasses.replace(engine, runner_mode=runner)
    ps = prompts(seed=2)
    ours = {c.key: c for c in generate(engine, [req(i, p) for i, p in enumerate(ps)])}
    for i, p in enumerate(ps):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=NEW_TOKENS, pad_token_id=0)
        theirs = out[0, len(p):].tolist()
        assert len(theirs) == NEW_TOKENS
        assert ours[i].tokens == theirs, f"prompt {i} (length {len(p)}) differs"
        assert ours[i].finish_reason == "length"


def test_bfloat16_load_runs(case) -> None:
    """Converted at load; not bit-equal to float32, but the same function of the prompt."""
    ref, path, _ = case
    engine = new_engine(path, "bfloat16")
    model = engine.loaded.model
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    ps = prompts(seed=3)
    done = generate(engine, [req(i, p) for i, p in enumerate(ps)])
    assert sorted(c.key for c in done) == list(range(len(ps)))
    assert all(len(c.tokens) == NEW_TOKENS and max(c.tokens) < VOCAB for c in done)
    for i, ours in enumerate(prefill_logits(engine, ps)):
        with torch.no_grad():
            theirs = ref(torch.tensor([ps[i]])).logits[0, -1]  # [V] float32
        corr = torch.corrcoef(torch.stack([ours.float(), theirs]))[0, 1].item()
        assert corr > 0.99, f"prompt {i}: bfloat16 logits correlate {corr:.3f} with float32"


@pytest.mark.parametrize("runner", ["eager", "pipelined"])
def test_greedy_tokens_match_transformers_with_shared_prefixes(case, runner) -> None:
    """Prompts sharing prefixes (on and just off a block boundary, a prompt that is a
    strict prefix of another), run twice: first together (one computes the shared prefix
    in the step the others read it), then again from the cache, through cascade attention."""
    ref, _, engine = case
    engine = dataclasses.replace(engine, runner_mode=runner)
    engine.pool.blocks.drop_cached()
    rng = random.Random(11)
    system = [rng.randrange(VOCAB) for _ in range(48)]
    ps = [system + [rng.randrange(VOCAB) for _ in range(n)] for n in (5, 16, 17, 40)]
    ps += [system[:32], system[:33], system + ps[0][48:] + [1, 2, 3]]
    for round_ in range(2):
        ours = {c.key: c for c in generate(engine, [req(i, p) for i, p in enumerate(ps)])}
        assert sum(c.cached_tokens for c in ours.values()) >= (32 if round_ == 0 else 200)
        for i, p in enumerate(ps):
            ids = torch.tensor([p])
            with torch.no_grad():
                out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                   max_new_tokens=NEW_TOKENS, pad_token_id=0)
            assert ours[i].tokens == out[0, len(p):].tolist(), f"round {round_} prompt {i}"


@pytest.mark.parametrize("runner", ["eager", "pipelined"])
def test_logprobs_match_transformers_scores(case, runner) -> None:
    """Each generated token's logprob and the top 5, against the log-softmax of the logits
    `transformers` returns for the same greedy generation."""
    ref, _, engine = case
    engine = dataclasses.replace(engine, runner_mode=runner)
    ps = prompts(seed=4)
    n = 5
    ours = {c.key: c for c in generate(engine, [dataclasses.replace(req(i, p), logprobs=n)
                                                for i, p in enumerate(ps)])}
    for i, p in enumerate(ps):
        ids = torch.tensor([p])
        with torch.no_grad():
            out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                               max_new_tokens=NEW_TOKENS, pad_token_id=0, output_logits=True,
                               return_dict_in_generate=True)
        logp = torch.stack(out.logits)[:, 0].float().log_softmax(-1)  # [T, V]
        theirs = out.sequences[0, len(p):]
        rows = torch.from_numpy(ours[i].logprobs)
        assert ours[i].tokens == theirs.tolist()
        chosen = logp.gather(1, theirs[:, None])[:, 0]
        assert torch.allclose(rows[:, 0], chosen, atol=1e-4), f"prompt {i}: chosen logprobs"
        top = logp.topk(n, dim=-1)
        assert (rows[:, 1:1 + n].long() == top.indices).all(), f"prompt {i}: top ids"
        assert torch.allclose(rows[:, 1 + n:], top.values, atol=1e-4), f"prompt {i}: top values"


def test_generation_config_eos_ends_generation_like_transformers(case, tmp_path) -> None:
    """The checkpoint's `generation_config.json` eos ids (a list here) stop generation where
    `transformers` stops; `ignore_eos` runs on to max_new_tokens."""
    ref, path, engine = case
    p = prompts(seed=5)[2]
    ids = torch.tensor([p])
    with torch.no_grad():
        free = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                            max_new_tokens=NEW_TOKENS, pad_token_id=0)[0, len(p):].tolist()
    eos = [free[4], VOCAB - 1]  # one the model makes a few tokens in, one it may not
    ckpt = tmp_path / "with-eos"
    ckpt.mkdir()
    for f in path.iterdir():
        (ckpt / f.name).symlink_to(f)
    (ckpt / "generation_config.json").unlink(missing_ok=True)
    (ckpt / "generation_config.json").write_text(f'{{"eos_token_id": {eos}}}')
    ours = new_engine(ckpt)
    assert set(eos) <= set(ours.loaded.eos_ids)
    with torch.no_grad():
        theirs = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                              max_new_tokens=NEW_TOKENS, pad_token_id=0,
                              eos_token_id=eos)[0, len(p):].tolist()
    (stopped,) = generate(ours, [req(0, p)])
    assert stopped.tokens == theirs == free[:free.index(eos[0]) + 1]
    assert stopped.finish_reason == "stop"
    (ignored,) = generate(ours, [dataclasses.replace(req(0, p), ignore_eos=True)])
    assert ignored.tokens == free and ignored.finish_reason == "length"
