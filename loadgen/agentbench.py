"""The agent table of `fabric-loadgen bench --agent-sessions N`: what the prefix cache buys.

Rule: agent traffic (`loadgen.sessions`: sessions sharing system prompts, each turn the last
one plus its reply) on rung 4's worker three ways -- prefix cache on, off, and on two
one-core workers sharing the consumer -- so the cache's worth is a ratio on one workload.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from loadgen.broker import EmbeddedNats
from loadgen.rung import BenchConfig, run_rung
from loadgen.sessions import SessionSpec


def run_agent(cfg: BenchConfig, broker: EmbeddedNats, work: Path, log,
              partial=lambda: None) -> dict[str, Any]:
    """Agent traffic on rung 4's worker: prefix caching on, off (`--no-prefix-cache`), and
    on two one-core workers sharing the consumer (sessions spread over both, so a session's
    next turn lands on the worker that holds its prefix about half the time)."""
    spec = SessionSpec(sessions=cfg.agent_sessions, system_prompts=cfg.agent_system_prompts,
                       turns=cfg.agent_turns, system_tokens=cfg.agent_system_tokens,
                       seed=cfg.seed)
    if spec.longest_job() > cfg.max_seq_len:
        raise ValueError(f"agent jobs reach {spec.longest_job()} tokens, over max_seq_len "
                         f"{cfg.max_seq_len}: fewer turns or shorter system prompts")
    out: dict[str, Any] = {"spec": dataclasses.asdict(spec)}
    for label, cpus, args in (("cache", ("",), ()), ("no_cache", ("",), ("--no-prefix-cache",)),
                              ("two_workers", ("0", "1"), ())):
        log(f"agent traffic, {label.replace('_', ' ')}: {spec.sessions} sessions x "
            f"{spec.turns} turns ...")
        r = run_rung(cfg, broker, work, f"agent{label.replace('_', '')}", "continuous", [],
                     cpus=cpus, sessions=spec, worker_args=args)
        r.pop("completions")
        out[label] = r
        partial()
        log(f"  {r['useful_tokens_per_s']:.0f} useful tok/s, prompt from cache "
            f"{r['cache_hit_fraction']:.3f}")
    out["ratio"] = out["cache"]["useful_tokens_per_s"] / out["no_cache"]["useful_tokens_per_s"]
    return out


def markdown(a: dict[str, Any]) -> list[str]:
    """The agent table of ladder.md."""
    sp = a["spec"]
    lines = ["", f"Agent traffic ({sp['sessions']} sessions x {sp['turns']} turns, "
             f"{sp['system_prompts']} system prompts of {sp['system_tokens'][0]}-"
             f"{sp['system_tokens'][1]} tokens, each turn's prompt the last one plus "
             "its reply and a user message):", "",
             "| worker | useful tok/s | jobs/s | prompt from cache | p50 / p99 latency ms |",
             "|---|---|---|---|---|"]
    for label in ("cache", "no_cache", "two_workers"):
        r = a[label]
        lat = r["latency_ms"]
        lines.append(f"| {label.replace('_', ' ')} | {r['useful_tokens_per_s']:,.0f} | "
                     f"{r['jobs_per_s']:.1f} | {100 * r['cache_hit_fraction']:.1f}% | "
                     f"{lat['p50']:,.0f} / {lat['p99']:,.0f} |")
    lines += ["", f"Prefix caching on over off: {a['ratio']:.2f}x useful tokens/s."]
    return lines
