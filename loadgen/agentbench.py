"""The agent table of `fabric-loadgen bench --agent-sessions N`: what the prefix cache buys.

Rule: agent traffic (`loadgen.sessions`: sessions sharing system prompts, each turn the last
one plus its reply) on rung 4's worker five ways -- prefix cache on and off; one one-core
worker with two workers' pool; two one-core workers sharing the consumers, with sessions
named (the fleet as one cache) and anonymous -- so the cache's worth and the fleet's are
ratios on one workload.
Beside the hit rate each run got: the KV pool it had and the hit rate a cache that never
evicts would have given on the same traffic (`unbounded_hit_fraction`). With
`agent_host_tier` (GPU workers, a small pool) the two runs are the cache with its host
tier and without, and the table adds blocks found by tier and copied out by when.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung
from loadgen.sessions import SessionSpec
from loadgen.workload import WorkloadSpec, generate
from worker.engine.blocks import block_hashes


def run_agent(cfg: BenchConfig, broker: EmbeddedNats, work: Path, log,
              partial=lambda: None, out: dict[str, Any] | None = None) -> dict[str, Any]:
    """Agent traffic on rung 4's worker: prefix caching on, off (`--no-prefix-cache`); one
    one-core worker with two workers' pool; two one-core workers whose jobs name their
    session (each turn goes to the worker that holds the session's KV), and the same two
    with anonymous sessions (a turn lands where its history is about half the time)."""
    spec = SessionSpec(sessions=cfg.agent_sessions, system_prompts=cfg.agent_system_prompts,
                       turns=cfg.agent_turns, system_tokens=cfg.agent_system_tokens,
                       seed=cfg.seed)
    if spec.longest_job() > cfg.max_seq_len:
        raise ValueError(f"agent jobs reach {spec.longest_job()} tokens, over max_seq_len "
                         f"{cfg.max_seq_len}: fewer turns or shorter system prompts")
    # Filled in place (`out`), so the caller's partial results hold every run so far.
    out = {} if out is None else out
    out["spec"] = dataclasses.asdict(spec)
    pool = ("--kv-pool-blocks", str(cfg.agent_kv_pool_blocks)) if cfg.agent_kv_pool_blocks else ()
    runs = ((("cache", ("",), pool, spec), ("no_tier", ("",), (*pool, "--host-tier-gib", "0"), spec))
            if cfg.agent_host_tier else
            (("cache", ("",), pool, spec), ("no_cache", ("",), (*pool, "--no-prefix-cache"), spec),
             ("one_core", ("0",), None, spec), ("two_workers", ("0", "1"), pool, spec),
             ("two_workers_anonymous", ("0", "1"), pool, dataclasses.replace(spec, named=False)),
             ("two_workers_kill9", ("0", "1"), pool, spec)))
    for label, cpus, args, sp in runs:
        if args is None:  # one worker on one core, with the pool two workers have together
            args = ("--kv-pool-blocks", str(2 * out["cache"]["kv_blocks"]))
        kill = {}
        if label == "two_workers_kill9":
            # The second worker killed with SIGKILL halfway through the named-session run
            # (its jobs come back after a 5 s ack wait): nothing may be lost.
            kill = {"kill_after_s": out["two_workers"]["wall_s"] / 2, "ack_wait_s": 5.0}
        log(f"agent traffic, {label.replace('_', ' ')}: {spec.sessions} sessions x "
            f"{spec.turns} turns ...")
        r = run_rung(cfg, broker, work, f"agent{label.replace('_', '')}", "continuous", [],
                     cpus=cpus, sessions=sp, worker_args=args, **kill)
        r.pop("completions")
        r["unbounded_hit_fraction"] = unbounded_hit_fraction(r.pop("token_log"), r["block_size"])
        out[label] = r
        partial()
        log(f"  {r['useful_tokens_per_s']:.0f} useful tok/s, prompt from cache "
            f"{r['cache_hit_fraction']:.3f} (unbounded {r['unbounded_hit_fraction']:.3f}), "
            f"KV pool {r['kv_blocks']} blocks, RSS {r['rss_mib']} MiB")
    other = "no_tier" if cfg.agent_host_tier else "no_cache"
    out["ratio"] = out["cache"]["useful_tokens_per_s"] / out[other]["useful_tokens_per_s"]
    if cfg.agent_host_tier:
        return out
    one, two = out["one_core"], out["two_workers"]
    out["fleet_ratio"] = two["useful_tokens_per_s"] / one["useful_tokens_per_s"]
    out["fleet_hit_ratio"] = (two["cache_hit_fraction"] / one["cache_hit_fraction"]
                              if one["cache_hit_fraction"] else 0.0)
    # What a miss costs: the ragged workload (nothing shared) with the cache on and off.
    jobs = generate(WorkloadSpec(num_jobs=cfg.jobs, seed=cfg.seed, run_id="ragged"))
    for label, args in (("ragged_cache", ()), ("ragged_no_cache", ("--no-prefix-cache",))):
        log(f"ragged traffic, {label.replace('_', ' ')}: {len(jobs)} jobs ...")
        r = run_rung(cfg, broker, work, label.replace("_", ""), "continuous", jobs,
                     worker_args=args)
        r.pop("completions")
        out[label] = r
        partial()
        log(f"  {r['useful_tokens_per_s']:.0f} useful tok/s")
    out["ragged_ratio"] = (out["ragged_cache"]["useful_tokens_per_s"]
                           / out["ragged_no_cache"]["useful_tokens_per_s"])
    return out


def unbounded_hit_fraction(token_log: list[tuple[str, list[int]]], block_size: int) -> float:
    """The share of prompt tokens a prefix cache that never evicts would have served on the
    same traffic: a job's leading full blocks that a job sent before it reserved, or an
    answered one computed (its prompt and reply but the newest token), never the whole
    prompt (its last token is computed for its logits), as the worker counts them."""
    known: set[bytes] = set()
    hit = total = 0
    for event, tokens in token_log:
        if event == "done":
            known.update(block_hashes(tokens[:-1], block_size))
            continue
        keys = block_hashes(tokens, block_size)
        n = next((i for i, k in enumerate(keys) if k not in known), len(keys))
        hit += min(n * block_size, len(tokens) - 1)
        total += len(tokens)
        known.update(keys)
    return hit / total if total else 0.0


def markdown(a: dict[str, Any]) -> list[str]:
    """The agent table of ladder.md."""
    sp = a["spec"]
    lines = ["", f"Agent traffic ({sp['sessions']} sessions x {sp['turns']} turns, "
             f"{sp['system_prompts']} system prompts of {sp['system_tokens'][0]}-"
             f"{sp['system_tokens'][1]} tokens, each turn's prompt the last one plus "
             "its reply and a user message):", "",
             "| worker | useful tok/s | jobs/s | prompt from cache | unbounded cache would | "
             "KV pool blocks (budget) | RSS MiB | p50 / p99 latency ms |",
             "|---|---|---|---|---|---|---|---|"]
    labels = [k for k in ("cache", "no_tier", "no_cache", "one_core", "two_workers",
                          "two_workers_anonymous", "two_workers_kill9") if k in a]
    for label in labels:
        r = a[label]
        lat = r["latency_ms"]
        lines.append(f"| {label.replace('_', ' ')} | {r['useful_tokens_per_s']:,.0f} | "
                     f"{r['jobs_per_s']:.1f} | {100 * r['cache_hit_fraction']:.1f}% | "
                     f"{100 * r.get('unbounded_hit_fraction', 0):.1f}% | "
                     f"{r.get('kv_blocks')} ({r.get('kv_budget_blocks')}) | {r.get('rss_mib')} | "
                     f"{lat['p50']:,.0f} / {lat['p99']:,.0f} |")
    if "no_tier" in a:
        lines += ["", f"Host tier on over off: {a['ratio']:.2f}x useful tokens/s.", "",
                  "| worker | device hits | host hits | copied out ahead | at eviction | "
                  "device evictions | host tier blocks |", "|---|---|---|---|---|---|---|"]
        for label in labels:
            kv = a[label].get("kv") or {}
            lines.append(f"| {label.replace('_', ' ')} | {kv.get('hits')} | "
                         f"{kv.get('host_hits')} | {kv.get('written_ahead')} | "
                         f"{kv.get('spilled_at_eviction')} | {kv.get('evictions')} | "
                         f"{kv.get('host_blocks')} |")
        return lines
    lines += ["", f"Prefix caching on over off: {a['ratio']:.2f}x useful tokens/s."]
    if "fleet_ratio" in a:
        lines.append(f"Two one-core workers with sessions over one one-core worker with their "
                     f"pools together: {a['fleet_ratio']:.2f}x useful tokens/s, "
                     f"{100 * a['fleet_hit_ratio']:.0f}% of its prompt tokens from cache "
                     f"(anonymous sessions: {100 * a['two_workers_anonymous']['cache_hit_fraction']:.1f}%"
                     f" from cache).")
    if "two_workers_kill9" in a:
        k = a["two_workers_kill9"]
        lines.append(f"Two workers, one killed with SIGKILL after {k['killed_after_s']:.1f} s: "
                     f"{k['jobs_ok']} of {k['jobs']} jobs answered ok, "
                     f"{k['results_stored']} Results kept by the results stream, "
                     f"{k.get('redelivered')} jobs redelivered to the survivor "
                     f"({k['duplicates_on_reply_subject']} answered twice on the reply subject; "
                     f"the stream's duplicate window keeps one).")
    if "ragged_ratio" in a:
        lines.append(f"Ragged traffic (nothing shared), cache on over off: "
                     f"{a['ragged_cache']['useful_tokens_per_s']:,.0f} / "
                     f"{a['ragged_no_cache']['useful_tokens_per_s']:,.0f} useful tok/s = "
                     f"{a['ragged_ratio']:.2f}x.")
    return lines
