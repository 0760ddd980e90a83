"""A peer on the same weights and jobs: transformers' own continuous batching.

`transformers` ships continuous batching (`model.generate_batch`, a paged KV cache and a
scheduler of its own); its documentation runs it as: a causal LM, a `GenerationConfig`,
a list of token-id prompts, `generate_batch`. That is what runs here, on the weights our
engine loads (a builtin model's seeded weights, copied by name into `LlamaForCausalLM`:
our decoder's parameters are named as Hugging Face's), on the same jobs the worker gets.

`generate_batch` takes one `max_new_tokens` for all its prompts, so the peer's workload
has ragged prompts and one generation length, and no job stops early (no end id on
either side): every job's useful tokens are its prompt and `max_new_tokens`, and tokens/s
compare like with like. On float32 on the CPU both sides' greedy tokens are equal (the
test checks it), so the peer is this model, not another one.
"""

from __future__ import annotations

import random
import time
from typing import Any

from loadgen.workload import JobSpec


def peer_jobs(n: int, max_new: int, seed: int, prompt_range: tuple[int, int] = (16, 512),
              run_id: str = "peer", vocab: int = 256) -> list[JobSpec]:
    """Ragged prompts (uniform in `prompt_range`), one generation length, no end id."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        k = rng.randint(*prompt_range)
        out.append(JobSpec(id=f"{run_id}-{i}", prompt=[rng.randrange(vocab) for _ in range(k)],
                           prompt_len=k, max_new_tokens=max_new, ignore_eos=True))
    return out


def hf_model(model: str, device: str, dtype: str) -> Any:
    """`LlamaForCausalLM` holding the weights our engine loads for `model`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from worker.engine.build import DTYPES
    from worker.model.checkpoint import load_model

    dt = DTYPES.get(dtype, torch.bfloat16)  # (fp8 is ours alone: the peer runs bf16)
    ours = load_model(model, torch.float32, torch.device("cpu"))
    a = ours.args
    cfg = LlamaConfig(vocab_size=a.vocab_size, hidden_size=a.dim, intermediate_size=a.ffn_dim,
                      num_hidden_layers=a.n_layers, num_attention_heads=a.n_heads,
                      num_key_value_heads=a.n_kv_heads, rms_norm_eps=a.norm_eps,
                      rope_theta=a.rope_theta, max_position_embeddings=a.max_position,
                      tie_word_embeddings=a.tie_embeddings, head_dim=a.hd)
    hf = LlamaForCausalLM(cfg).eval()
    state = {(k if k.startswith("lm_head") else f"model.{k}"): v.detach()
             for k, v in ours.model.hf_parameters().items()}
    missing, unexpected = hf.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"peer weights: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return hf.to(device=device, dtype=dt)


def run_hf_peer(model: str, device: str, dtype: str, jobs: list[JobSpec],
                cb_config: dict | None = None) -> dict[str, Any]:
    """The jobs through `generate_batch`, timed from the call to its return (its start-up
    warm-up included: it is part of serving the batch). `cb_config`: a
    `ContinuousBatchingConfig`'s fields (None: its defaults, as documented)."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    max_new = {j.max_new_tokens for j in jobs}
    if len(max_new) != 1:
        raise ValueError("generate_batch takes one max_new_tokens: give the peer one length")
    hf = hf_model(model, device, dtype)
    gen = GenerationConfig(max_new_tokens=max_new.pop(), do_sample=False, eos_token_id=None,
                           pad_token_id=0)
    cb = ContinuousBatchingConfig(**cb_config) if cb_config else None
    prompts = [list(j.prompt) for j in jobs]
    t0 = time.perf_counter()
    out = hf.generate_batch(prompts, generation_config=gen, continuous_batching_config=cb,
                            progress_bar=False)
    wall = time.perf_counter() - t0
    by_index = {int(k.rsplit("_", 1)[1]): v for k, v in out.items()}
    tokens = {jobs[i].id: list(v.generated_tokens) for i, v in by_index.items()}
    useful = sum(len(j.prompt) + len(tokens.get(j.id, ())) for j in jobs)
    return {"peer": f"transformers generate_batch ({_version()})", "jobs": len(jobs),
            "answered": len(tokens), "wall_s": wall, "useful_tokens": useful,
            "useful_tokens_per_s": useful / wall, "tokens": tokens}


def run_peer(cfg: Any, broker: Any, work: Any, log=print) -> dict[str, Any]:
    """The peer's jobs through this worker (the product's policy, the device's own runner:
    rung 5 on CUDA, rung 4 on the CPU) and through `generate_batch`, one after the other."""
    from loadgen.rung import run_rung

    jobs = peer_jobs(cfg.peer_jobs, cfg.peer_max_new, cfg.seed)
    log(f"peer: {len(jobs)} jobs through this worker ...")
    ours = run_rung(cfg, broker, work, "peer", "continuous", jobs, runner="auto")
    ours["rung"] = "pipelined" if cfg.device.startswith("cuda") else "continuous"
    ours.pop("completions", None)
    log(f"  {ours['useful_tokens_per_s']:.0f} useful tok/s; the same through generate_batch ...")
    hf = run_hf_peer(cfg.model, cfg.device, cfg.dtype, jobs)
    tokens = hf.pop("tokens")
    log(f"  {hf['useful_tokens_per_s']:.0f} useful tok/s ({hf['peer']})")
    return {"ours": ours, "hf": hf, "max_new_tokens": cfg.peer_max_new,
            "all_answered": hf["answered"] == len(jobs)
            and all(len(t) == cfg.peer_max_new for t in tokens.values())}


def _version() -> str:
    import transformers

    return f"transformers {transformers.__version__}"


def markdown(peer: dict[str, Any]) -> list[str]:
    if not peer:
        return []
    ours, hf = peer["ours"], peer["hf"]
    ratio = ours["useful_tokens_per_s"] / hf["useful_tokens_per_s"]
    return ["", f"Peer on the same weights and jobs ({hf['jobs']} ragged prompts, "
            f"{peer['max_new_tokens']} new tokens each, no end id):", "",
            "| system | useful tok/s | wall s |", "|---|---|---|",
            f"| this worker ({ours['rung']}) | {ours['useful_tokens_per_s']:,.0f} | "
            f"{ours['wall_s']:.1f} |",
            f"| {hf['peer']} | {hf['useful_tokens_per_s']:,.0f} | {hf['wall_s']:.1f} |",
            "", f"This worker / peer: **{ratio:.2f}x** (the peer answered every job in full: "
            f"{'yes' if peer['all_answered'] else 'NO'})."]


if __name__ == "__main__":
    # The peer alone (a device check runs it in its own time limit): python -m loadgen.peer
    import argparse
    import dataclasses
    import json
    from pathlib import Path

    from loadgen.broker import EmbeddedNats
    from loadgen.rung import BenchConfig

    ap = argparse.ArgumentParser(description="this worker vs transformers' generate_batch")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--model", default="builtin:1b")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--jobs", type=int, default=256)
    ap.add_argument("--max-new", type=int, default=128)
    ap.add_argument("--token-budget", type=int, default=65536)
    a = ap.parse_args()
    cfg = dataclasses.replace(BenchConfig(), model=a.model, device=a.device, dtype=a.dtype,
                              peer_jobs=a.jobs, peer_max_new=a.max_new,
                              token_budget=a.token_budget, low_water=a.token_budget * 3 // 4,
                              max_seq_len=512 + a.max_new)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "work").mkdir(exist_ok=True)
    with EmbeddedNats() as broker:
        result = run_peer(cfg, broker, a.out / "work")
    (a.out / "peer.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    (a.out / "peer.md").write_text("\n".join(markdown(result)) + "\n")
    print("\n".join(markdown(result)))
