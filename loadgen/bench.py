"""The benchmark ladder: each rung one scheduler decision, measured side by side in one run.

Rule: same machine, same model, same seeded workload, same worker binary, one run. A rung
is only a policy switch on the worker (`--policy`, benchmark-only), so the difference
between two rungs is attributable to that decision and nothing else:

  0 serial       one job at a time
  1 window       static batches of whatever arrived (up to 32), padded to the longest
                 prompt, run to the longest generation; admission refills as room frees
  2 budget       static batches formed by token-budget admission with hysteresis
  3 lanes        static batches taken from one length lane (pad-minimal prompts)
  4 continuous   sequences join and leave at step boundaries, packed (no padding)
  5 pipelined    rung 4's scheduler with the pipelined runner: each step's metadata in one
                 pinned asynchronous copy, decode steps replayed as CUDA graphs

Every rung runs at saturation: the whole workload is published at once and the broker
holds the backlog. With `sustained_s` every rung runs again under a closed loop that keeps
more jobs outstanding than the budget admits, read over its last three quarters (a burst
ends in a tail; continuous work does not); the fleet comparison can run both ways too.

Beside the ladder: the kernel-only ceiling (the same engine in this process, no broker, no
event loop; the better of a phased and a continuous schedule, see `loadgen.ceiling`, so the
gap the worker leaves is a number) and a null-model run (the broker path alone: ingress,
admission, executor loop and drain with no model compute; the jobs are published before
the worker starts, so the figure is the worker's, see `loadgen.backlog`). The other tables
are modules of their own (`loadgen.fleetbench`, `loadgen.agentbench`, `loadgen.embedbench`),
each a set of runs made the same way (`loadgen.rung`); this module runs them in order and
writes ladder.json, ladder.md and ladder.png.

Rungs 0-4 run the eager runner, so the scheduler's decisions are measured apart from the
device plumbing; rung 5 changes only the runner (`--runner pipelined`). It is a GPU rung:
on a CPU the "device" is the same cores, a copy buys nothing and a fixed-shape decode step
only adds padding, so it is not in the default CPU ladder (`--rungs 0,1,2,3,4,5` runs it).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from loadgen import agentbench, embedbench, fleetbench, hostpath, peer, prioritybench
from loadgen.broker import EmbeddedNats
from loadgen.ceiling import kernel_ceiling
from loadgen.rung import BenchConfig, machine, run_backlog, run_rung, run_sustained
from loadgen.workload import Uniform, WorkloadSpec, generate

NULL_BUDGET = 65536  # 4096 one-block jobs in flight: the budget never limits the null run
# rung -> (name, scheduler policy, runner mode)
RUNGS: dict[int, tuple[str, str, str]] = {
    0: ("serial", "serial", "eager"), 1: ("window", "window", "eager"),
    2: ("budget", "budget", "eager"), 3: ("lanes", "lanes", "eager"),
    4: ("continuous", "continuous", "eager"), 5: ("pipelined", "continuous", "pipelined")}


def default_rungs(device: str) -> tuple[int, ...]:
    return tuple(RUNGS) if device.startswith("cuda") else (0, 1, 2, 3, 4)


def run_bench(cfg: BenchConfig, out: Path, log=print) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    work.mkdir(exist_ok=True)

    def partial(result: dict[str, Any]) -> None:
        # Everything measured so far, so a run cut short (a lent machine's time limit)
        # still leaves its figures; ladder.json replaces it at the end.
        (out / "ladder.partial.json").write_text(json.dumps(result, indent=2, default=str) + "\n")

    result: dict[str, Any] = {"machine": machine(), "config": dataclasses.asdict(cfg),
                              "rungs": {}}
    with EmbeddedNats() as broker:
        for rung, (label, policy, runner) in RUNGS.items():
            if rung not in cfg.rungs:
                continue
            n = cfg.serial_jobs if rung == 0 and cfg.serial_jobs else cfg.jobs
            jobs = generate(WorkloadSpec(num_jobs=n, seed=cfg.seed, run_id=f"r{rung}"))
            log(f"rung {rung} ({label}): {n} jobs ...")
            r = run_rung(cfg, broker, work, f"r{rung}", policy, jobs, runner=runner)
            r["rung"] = label
            result["rungs"][str(rung)] = r
            partial(result)
            log(f"  {r['useful_tokens_per_s']:.0f} useful tok/s, padding {r['padding_fraction']:.3f}")
            if cfg.sustained_s:
                log(f"rung {rung} ({label}): {cfg.sustained_s:.0f} s sustained ...")
                r = run_sustained(cfg, broker, work, f"s{rung}", policy, cfg.sustained_s,
                                  runner=runner)
                r["rung"] = label
                result.setdefault("sustained", {})[str(rung)] = r
                partial(result)
                log(f"  {r['sustained']['useful_tokens_per_s']:.0f} useful tok/s sustained")
        if cfg.null_jobs:
            # Small jobs under a big budget: the broker path is measured, not the budget.
            jobs = generate(WorkloadSpec(num_jobs=cfg.null_jobs, seed=cfg.seed, run_id="null",
                                         prompt_lengths=Uniform(4, 12), max_new_tokens=1))
            log(f"null model: {cfg.null_jobs} jobs ...")
            null_cfg = dataclasses.replace(cfg, token_budget=NULL_BUDGET, low_water=NULL_BUDGET // 2)
            r = run_backlog(null_cfg, broker, work, "null", jobs, model="builtin:null")
            result["null_model"] = r
            partial(result)
            log(f"  {r['jobs_per_s']:.0f} jobs/s ({r['unique']} of {r['jobs']} answered, "
                f"{r['results'] - r['unique']} duplicates)")
        if cfg.fleet_jobs or cfg.fleet_sustained_s:
            result["fleet"] = fleetbench.run_fleet(cfg, broker, work, log, partial=lambda: partial(result))
        if cfg.agent_sessions:
            agentbench.run_agent(cfg, broker, work, log, partial=lambda: partial(result),
                                 out=result.setdefault("agent", {}))
        if cfg.priority_mix[0]:
            bulk, urgent = cfg.priority_mix
            rows = result.setdefault("priority_mix", [])
            for cpus in (("",), ("0", "1")):
                log(f"priorities, {len(cpus)} worker(s): {bulk} bulk jobs, {urgent} urgent ...")
                r = prioritybench.run_priority_mix(cfg, broker, work, f"prio{len(cpus)}", bulk,
                                                   urgent, cpus)
                rows.append(r)
                partial(result)
                log(f"  urgent wait p99 {r['wait_ms'].get('0', {}).get('p99', 0):.0f} ms, bulk "
                    f"done in {r['bulk_done_s']} s, {r['answered']} answered, "
                    f"{r['duplicates']} duplicates")
        if cfg.embed_model:
            result["embed"] = embedbench.run_embed(cfg, broker, work, log, partial=lambda: partial(result))
        if cfg.peer_jobs:
            result["peer"] = peer.run_peer(cfg, broker, work, log)
            partial(result)
    if cfg.host_path_steps:
        log("host path (builtin:null, batch 1, 32, 256) ...")
        result["host_path"] = hostpath.host_path_table(steps=cfg.host_path_steps,
                                                       device=cfg.device)
        partial(result)
    jobs = generate(WorkloadSpec(num_jobs=cfg.jobs, seed=cfg.seed, run_id="r4"))
    top = result["rungs"].get("4", {}).get("completions", {})
    log(f"kernel-only ceiling ({cfg.ceiling_runs} runs, median) ...")
    # One run swings by 10-30 % with whatever else the machine does; the median of a few
    # is what the rungs are compared with, and every run is kept in the JSON.
    runs = sorted((kernel_ceiling(cfg, jobs, {f"r4-{k}": v for k, v in top.items()})
                   for _ in range(cfg.ceiling_runs)), key=lambda c: c["useful_tokens_per_s"])
    for c in runs:
        c.pop("lengths")
    ceiling = dict(runs[len(runs) // 2])
    ceiling["runs_useful_tokens_per_s"] = [c["useful_tokens_per_s"] for c in runs]
    result["ceiling"] = ceiling
    log(f"  {ceiling['useful_tokens_per_s']:.0f} useful tok/s "
        f"(runs: {', '.join(f'{c:.0f}' for c in ceiling['runs_useful_tokens_per_s'])}; "
        f"schedules: {', '.join(c['schedule'] for c in runs)})")
    for r in result["rungs"].values():
        r.pop("completions", None)
    (out / "ladder.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "ladder.partial.json").unlink(missing_ok=True)
    (out / "ladder.md").write_text(markdown(result))
    chart(result, out / "ladder.png")
    return result


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    ceil = result["ceiling"]["useful_tokens_per_s"]
    base = result["rungs"].get("1", {}).get("useful_tokens_per_s")
    serial = result["rungs"].get("0", {}).get("useful_tokens_per_s")
    lines = [f"Machine: {m['cpu']}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch "
             f"{m['torch']}, commit {m['commit']}", "",
             "| rung | policy | useful tok/s | x window | x serial | % of ceiling | padding | "
             "occupancy while queued | executor busy | device busy | p50 / p99 latency ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for k, r in sorted(result["rungs"].items()):
        tps = r["useful_tokens_per_s"]
        occ = r["budget_occupancy_while_queued"]
        busy = r.get("executor_busy_fraction")
        dev = r.get("device_busy_fraction")
        x = f"{tps / base:.2f}" if base else "-"
        xs = f"{tps / serial:.1f}" if serial else "-"
        lines.append(
            f"| {k} | {r.get('rung', r['policy'])} | {tps:,.0f} | {x} | {xs} | "
            f"{100 * tps / ceil:.1f}% | "
            f"{100 * r['padding_fraction']:.1f}% | {'-' if occ is None else f'{100 * occ:.1f}%'} | "
            f"{'-' if busy is None else f'{100 * busy:.1f}%'} | "
            f"{'-' if dev is None else f'{100 * dev:.1f}%'} | "
            f"{r['latency_ms']['p50']:,.0f} / {r['latency_ms']['p99']:,.0f} |")
    runs = ", ".join(f"{c:,.0f}" for c in result["ceiling"].get("runs_useful_tokens_per_s", []))
    sched = result["ceiling"].get("schedule", "phased")
    lines.append(f"| - | kernel-only ceiling ({sched}; median of {runs}) | {ceil:,.0f} | | | "
                 "100% | 0.0% | | | | |")
    sus = result.get("sustained", {})
    if sus:
        first = next(iter(sus.values()))
        w = first["sustained"]
        sbase = sus.get("1", {}).get("sustained", {}).get("useful_tokens_per_s")
        sserial = sus.get("0", {}).get("sustained", {}).get("useful_tokens_per_s")
        secs = result["config"]["sustained_s"]
        lines += ["", f"Sustained load: each rung again for {secs:.0f} s "
                  f"of a closed loop keeping {first['outstanding']} jobs outstanding, "
                  f"read over {w['start_s']:.0f}-{w['end_s']:.0f} s:", "",
                  "| rung | policy | useful tok/s | x window | x serial | % of ceiling | jobs/s |",
                  "|---|---|---|---|---|---|---|"]
        for k, r in sorted(sus.items()):
            tps = r["sustained"]["useful_tokens_per_s"]
            lines.append(f"| {k} | {r['rung']} | {tps:,.0f} | "
                         f"{f'{tps / sbase:.2f}' if sbase else '-'} | "
                         f"{f'{tps / sserial:.1f}' if sserial else '-'} | "
                         f"{100 * tps / ceil:.1f}% | {r['sustained']['jobs_per_s']:.1f} |")
    graphed = {k: r for k, r in sorted(result["rungs"].items()) if r.get("runner") == "pipelined"}
    for k, r in graphed.items():
        frac = r.get("graphed_step_fraction")
        lines += ["", f"Rung {k} runner: decode graphs {r.get('decode_graphs')}; fixed-shape "
                  f"decode steps {'-' if frac is None else f'{100 * frac:.1f}%'} of all steps."]
    lines += fleetbench.markdown(result.get("fleet", {}))
    if "agent" in result:
        lines += agentbench.markdown(result["agent"])
    if result.get("priority_mix"):
        lines += prioritybench.markdown(result["priority_mix"])
    if "embed" in result:
        lines += embedbench.markdown(result["embed"])
    lines += peer.markdown(result.get("peer", {}))
    if "host_path" in result:
        lines += ["", "Host path: the executor's own work per decode step, the model excluded "
                  "(builtin:null), by phase, in ms (median):", "",
                  hostpath.render(result["host_path"]).rstrip()]
    if "null_model" in result:
        n = result["null_model"]
        lines += ["", f"Null model (broker path alone): {n['jobs_per_s']:,.0f} jobs/s through one "
                  f"worker ({n['jobs']:,} jobs published first, timed by the results stream; "
                  f"{n['unique']:,} answered, {n['results'] - n['unique']} duplicates)."]
    return "\n".join(lines) + "\n"


def chart(result: dict[str, Any], path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # the `bench` extra is not installed: JSON and markdown still written
    names = [f"{k} {r.get('rung', r['policy'])}" for k, r in sorted(result["rungs"].items())]
    names.append("ceiling")
    vals = [r["useful_tokens_per_s"] for _, r in sorted(result["rungs"].items())]
    vals.append(result["ceiling"]["useful_tokens_per_s"])
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.bar(names, vals, color=["#888"] * (len(vals) - 1) + ["#2a6"])
    ax.set_ylabel("useful tokens/s")
    m = result["machine"]
    ax.set_title(f"Inference Fabric ladder — {m['gpu'] or m['cpu']} ({m['cores']} cores)",
                 fontsize=9)
    for i, v in enumerate(vals):
        ax.text(i, v, f"{v:,.0f}", ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
