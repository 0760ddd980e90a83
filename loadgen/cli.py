"""`fabric-loadgen`: publish a seeded workload and report what came back.

Rule: the exit status is the verdict -- 0 only if every job got an ok Result (or a
cancelled one, for a job the run itself cancelled), 1 if any did not, 2 if the run could
not happen (bad flags, unreadable trace, broker unreachable) -- so scripts and CI can gate
on it. `demo` owns everything it starts (broker, worker) and stops all of it on the way
out, whether the run succeeded, failed, raised or was interrupted with Ctrl-C.

    fabric-loadgen run --nats-url nats://host:4222 --jobs 1000 --json out.json
    fabric-loadgen run --nats-url nats://host:4222 --workload bimodal --rate 20 \
        --metrics-url http://host:9400/metrics
    fabric-loadgen run --nats-url nats://host:4222 --chat --stop "###" --logprobs 2 \
        --cancel-fraction 0.1 --cancel-after-ms 200
    fabric-loadgen demo --jobs 300

docs/loadgen.md has every option of `run` and what each report field means.
"""

from __future__ import annotations

import argparse
import asyncio
import secrets
import signal
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import nats.errors

from loadgen import runargs
from loadgen.arrivals import Arrival, Burst
from loadgen.broker import EmbeddedNats
from loadgen.client import run_jobs
from loadgen.fleet import WorkerProcess, provision, write_engine_toml
from loadgen.report import build_report, format_report, write_report
from loadgen.runargs import UsageError
from loadgen.scrape import Scraper
from loadgen.sessions import SessionSpec, run_sessions
from loadgen.workload import WorkloadSpec, generate
from worker.engine.modes import RUNNER_MODES

__all__ = ["DEMO_ENGINE", "main"]

# The demo's engine: the builtin small model on CPU. max_seq_len is the workload's
# longest prompt (1024) plus its largest max_new_tokens (64).
DEMO_ENGINE: dict[str, Any] = {
    "stream": "FABRIC_JOBS",
    "consumer": "fabric-workers",
    "model": "builtin:small",
    "device": "cpu",
    "dtype": "float32",
    "token_budget": 8192,
    "low_water": 6144,
    "max_seq_len": 1088,
}
# The worker's own drain period sits inside our bound on waiting for it, so an
# interrupted demo lets it nak its in-flight jobs before we resort to SIGKILL.
_WORKER_GRACE_S = 8.0
_STOP_WORKER_S = 10.0
# Exit statuses beyond the verdict: could not run at all, and Ctrl-C (as a shell
# reports a SIGINT death).
_EXIT_FAILED = 2
_EXIT_INTERRUPTED = 130


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fabric-loadgen", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    runargs.add_run(sub)

    demo = sub.add_parser("demo", help="broker + one CPU worker + a workload, on this host")
    demo.add_argument("--work-dir", type=Path,
                      help="keep engine.toml and logs here (default: a temp dir, deleted)")
    demo.add_argument("--ready-timeout-s", type=float, default=300.0,
                      help="how long the worker may take to load its model")
    runargs.add_common(demo, jobs=300)

    bench = sub.add_parser("bench", help="the benchmark ladder on an embedded broker")
    bench.add_argument("--out", type=Path, required=True, help="folder for JSON, markdown, PNG")
    bench.add_argument("--jobs", type=int, default=300)
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--model", default="builtin:small")
    bench.add_argument("--device", default="cpu")
    bench.add_argument("--dtype", default="float32")
    bench.add_argument("--token-budget", type=int, default=8192)
    bench.add_argument("--low-water", type=int, default=6144)
    bench.add_argument("--max-seq-len", type=int, default=1088)
    bench.add_argument("--rungs", default="",
                       help="comma-separated rung numbers (default 0-4 on the CPU, 0-5 on CUDA)")
    bench.add_argument("--serial-jobs", type=int, default=0,
                       help="run rung 0 on the first N jobs only (0 = all)")
    bench.add_argument("--null-jobs", type=int, default=20000,
                       help="jobs for the null-model broker-path run (0 = skip)")
    bench.add_argument("--sustained-s", type=float, default=0.0,
                       help="run each rung again under S seconds of sustained load (a closed "
                            "loop), read over the last three quarters (0 = skip)")
    bench.add_argument("--fleet-jobs", type=int, default=0,
                       help="a burst of N jobs to one vs two one-core workers on one consumer "
                            "(0 = skip)")
    bench.add_argument("--agent-sessions", type=int, default=0,
                       help="agent traffic: N sessions, with the prefix cache on, off, and "
                            "on two workers (0 = skip)")
    bench.add_argument("--priority-mix", type=runargs.int_pair, default=(0, 0),
                       metavar="BULK,URGENT",
                       help="a backlog of BULK default-priority jobs, then URGENT priority-0 "
                            "jobs published during it, on one worker and on two: each "
                            "priority's wait (e.g. 5000,200; default: skip)")
    bench.add_argument("--agent-turns", type=int, default=4)
    bench.add_argument("--agent-system-prompts", type=int, default=4)
    bench.add_argument("--agent-system-tokens", type=runargs.int_pair, default=(300, 700),
                       metavar="LO,HI")
    bench.add_argument("--agent-kv-pool-blocks", type=int, default=0,
                       help="the agent workers' KV pool in blocks (0 = the default size)")
    bench.add_argument("--agent-host-tier", action="store_true",
                       help="GPU: the agent table compares the host tier on and off "
                            "(--host-tier-gib 0) instead of the cache on, off and on two "
                            "workers; with a small --agent-kv-pool-blocks")
    bench.add_argument("--embed-model", default="",
                       help="an embedding checkpoint (sentence-transformers directory): the "
                            "embedding table -- worker, a SentenceTransformer consumer, the "
                            "kernel-only ceiling -- on the same texts (empty = skip)")
    bench.add_argument("--embed-jobs", type=int, default=2000, help="texts for the table")
    bench.add_argument("--host-path-steps", type=int, default=200,
                       help="the host path table: decode steps timed at batch 1, 32 and 256 "
                            "on builtin:null, by phase (0 = skip)")
    bench.add_argument("--peer-jobs", type=int, default=0,
                       help="a peer on the same weights and jobs: N ragged prompts through "
                            "this worker and through transformers' generate_batch (0 = skip)")
    bench.add_argument("--ceiling-runs", type=int, default=3,
                       help="kernel-only ceiling runs; the median is reported")
    bench.add_argument("--peer-max-new", type=int, default=128,
                       help="new tokens per peer job (generate_batch takes one length)")
    bench.add_argument("--fleet-sustained-s", type=float, default=0.0,
                       help="the same comparison under S seconds of sustained load, read over "
                            "the last three quarters (0 = skip)")
    soak = sub.add_parser("soak", help="one worker at saturation, resident memory over time")
    soak.add_argument("--out", type=Path, required=True)
    soak.add_argument("--duration", type=float, default=1800.0, help="seconds")
    soak.add_argument("--warmup-s", type=float, default=120.0)
    soak.add_argument("--model", default="builtin:small")
    soak.add_argument("--device", default="cpu")
    soak.add_argument("--dtype", default="float32")
    soak.add_argument("--runner", choices=("auto",) + RUNNER_MODES, default="auto",
                      help="the worker's runner (default: the device's own)")
    soak.add_argument("--token-budget", type=int, default=8192)
    soak.add_argument("--low-water", type=int, default=6144)
    soak.add_argument("--max-seq-len", type=int, default=1088)
    soak.add_argument("--mix", nargs="?", const="", default=None, metavar="NAME=SHARE,...",
                      help="every producer feature, drawn per job (chat, stops, schemas, json, "
                           "cancel shares; cancel_max_ms); no value: the default mix "
                           "(loadgen.mix); worker exits are recorded and the worker replaced")
    soak.add_argument("--outstanding", type=int, default=0,
                      help="jobs kept outstanding (0: enough to saturate the budget)")
    return p


def _cmd_agent(args: argparse.Namespace, run_id: str) -> int:
    given = [flag for flag, on in (
        ("--embed", args.embed), ("--chat", args.chat), ("--stop", args.stop),
        ("--logprobs", args.logprobs),
        ("--ignore-eos", args.ignore_eos), ("--json-jobs", args.json_jobs),
        ("--cancel-fraction", args.cancel_fraction)) if on]
    if given:
        raise UsageError(f"{', '.join(given)}: not for --workload agent")
    try:
        spec = SessionSpec(sessions=args.sessions, system_prompts=args.system_prompts,
                           turns=args.turns, system_tokens=args.system_tokens,
                           user_tokens=args.user_tokens, new_tokens=args.turn_new_tokens,
                           seed=args.seed, run_id=run_id)
    except ValueError as e:
        raise UsageError(str(e)) from None
    stats = asyncio.run(run_sessions(args.nats_url, spec, subject_prefix=args.subject_prefix,
                                     timeout_s=args.timeout_s, result_prefix=args.result_prefix,
                                     connect_options=runargs.connect_options(args)))
    report = build_report(stats)
    print(format_report(report), flush=True)
    if args.json is not None:
        print(f"report written to {write_report(report, args.json)}", flush=True)
    return _verdict(report)


def _workload(args: argparse.Namespace, run_id: str) -> WorkloadSpec:
    return WorkloadSpec(num_jobs=args.jobs, seed=args.seed, run_id=run_id, text=args.text)


def _publish_and_report(args: argparse.Namespace, nats_url: str, run_id: str,
                        subject_prefix: str = "fabric.jobs.", *,
                        spec: WorkloadSpec | None = None, arrival: Arrival = Burst(),
                        metrics_urls: list[str] | None = None,
                        **client_options: Any) -> dict[str, Any]:
    jobs = generate(spec or _workload(args, run_id))
    scraper = None
    if metrics_urls:
        scraper = Scraper(metrics_urls, period_s=args.metrics_period_s).start()
        for url, why in scraper.last_error.items():
            print(f"warning: cannot scrape {url} ({why}); will keep trying", file=sys.stderr,
                  flush=True)
    try:
        stats = asyncio.run(run_jobs(
            nats_url, jobs, run_id=run_id, subject_prefix=subject_prefix,
            timeout_s=args.timeout_s, progress=not args.no_progress, arrival=arrival,
            **client_options,
        ))
    finally:
        if scraper is not None:
            scraper.stop()
    report = build_report(stats, scraper.summary() if scraper is not None else None)
    print(format_report(report), flush=True)
    if args.json is not None:
        print(f"report written to {write_report(report, args.json)}", flush=True)
    return report


def _verdict(report: dict[str, Any]) -> int:
    # A cancelled Result answers a cancel the run sent; more of them than it sent are not.
    answered = report["jobs_ok"] + report["jobs_cancelled"]
    ours = report["jobs_cancelled"] <= report["cancels_sent"]
    return 0 if answered == report["jobs_total"] and ours else 1


def _cmd_run(args: argparse.Namespace) -> int:
    run_id = args.run_id or f"run-{secrets.token_hex(4)}"
    if args.workload == "agent":
        return _cmd_agent(args, run_id)
    spec, arrival = runargs.run_workload(args, run_id)
    if args.metrics_period_s <= 0:
        raise UsageError("--metrics-period-s must be > 0")
    return _verdict(_publish_and_report(
        args, args.nats_url, run_id, args.subject_prefix, spec=spec, arrival=arrival,
        metrics_urls=runargs.metrics_urls(args.metrics_url), result_prefix=args.result_prefix,
        connect_options=runargs.connect_options(args), as_json=args.json_jobs,
        cancel_subject=args.cancel_subject))


def _cmd_demo(args: argparse.Namespace) -> int:
    keep = args.work_dir is not None
    work_dir = args.work_dir or Path(tempfile.mkdtemp(prefix="fabric-demo-"))
    work_dir.mkdir(parents=True, exist_ok=True)
    broker = EmbeddedNats(store_dir=work_dir / "jetstream")
    worker: WorkerProcess | None = None
    report: dict[str, Any] | None = None
    try:
        broker.start()
        config = write_engine_toml(
            work_dir / "engine.toml", {"nats_url": broker.url, **DEMO_ENGINE}
        )
        print(f"broker {broker.url}  config {config}", file=sys.stderr, flush=True)
        provision(config)
        worker = WorkerProcess(
            config, worker_id="demo-0", log_path=work_dir / "worker.log",
            extra_args=["--grace-s", str(_WORKER_GRACE_S)],
        )
        worker.start()
        worker.wait_ready(args.ready_timeout_s)
        print(f"worker demo-0 ready (pid {worker.pid})", file=sys.stderr, flush=True)
        report = _publish_and_report(args, broker.url, f"demo-{secrets.token_hex(4)}")
    finally:
        # Worker first: it drains against a live broker, then the broker goes.
        if worker is not None:
            code = worker.terminate(grace_s=_STOP_WORKER_S)
            print(f"worker exited {code}", file=sys.stderr, flush=True)
            # A worker that died before ready already put its log tail in the error.
            if report is not None and code != 0:
                print(f"worker log tail:\n{worker.log_tail()}", file=sys.stderr, flush=True)
        broker.close()
        if keep:
            print(f"logs kept in {work_dir}", file=sys.stderr, flush=True)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)
    return _verdict(report)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_soak(args: argparse.Namespace) -> int:
    from loadgen.rung import BenchConfig
    from loadgen.soak import run_soak

    from loadgen.mix import parse_mix

    cfg = BenchConfig(model=args.model, device=args.device, dtype=args.dtype,
                      token_budget=args.token_budget, low_water=args.low_water,
                      max_seq_len=args.max_seq_len)
    try:
        mix = None if args.mix is None else parse_mix(args.mix)
    except ValueError as e:
        print(f"fabric-loadgen soak: {e}", file=sys.stderr)
        return 2
    r = run_soak(cfg, args.duration, args.out, warmup_s=args.warmup_s,
                 log=lambda m: print(m, file=sys.stderr, flush=True), runner=args.runner,
                 mix=mix, outstanding=args.outstanding or None)
    g = r["rss"]
    for e in r["worker_exits"]:
        print(f"worker exit at {e['at_s']} s, code {e['code']}: {e['why']}")
    print(f"soak {args.duration:.0f} s: {r['jobs_published']} jobs published, {r['jobs_ok']} ok, "
          f"{r['jobs_cancelled']} cancelled, {r['jobs_error']} errors "
          f"{r['errors_by_code'] or ''}, {r['jobs_unanswered']} unanswered, "
          f"{r['duplicates']} duplicates, {len(r['worker_exits'])} worker exits; "
          f"{r['useful_tokens_per_s']:.0f} useful tok/s; worker RSS after warm-up: median "
          f"{g['baseline_rss_mib']:.1f} -> {g['final_rss_mib']:.1f} MiB "
          f"({100 * g['growth_fraction']:+.2f}%), fitted trend {100 * g['trend_fraction']:+.2f}% "
          f"over the run, peak {g['first_half_max_mib']:.1f} -> {g['second_half_max_mib']:.1f} MiB "
          f"(first half, second half), range {g['min_rss_mib']:.1f}-{g['max_rss_mib']:.1f} MiB")
    clean = (r["duplicates"] == 0 and r["jobs_unanswered"] == 0 and not r["worker_exits"])
    # Mixed traffic has errors by design (a schema the output cannot meet in time ends
    # `length`, not an error; cancels are counted apart): there, a job answered once is
    # the verdict. Plain traffic has no reason for any error.
    return 0 if clean and (mix is not None or r["jobs_error"] == 0) else 1


def _cmd_bench(args: argparse.Namespace) -> int:
    from loadgen.bench import default_rungs, run_bench
    from loadgen.rung import BenchConfig

    cfg = BenchConfig(jobs=args.jobs, seed=args.seed, model=args.model, device=args.device,
                      dtype=args.dtype, token_budget=args.token_budget, low_water=args.low_water,
                      max_seq_len=args.max_seq_len,
                      rungs=tuple(int(r) for r in args.rungs.split(",") if r)
                      or default_rungs(args.device),
                      serial_jobs=args.serial_jobs, null_jobs=args.null_jobs,
                      fleet_jobs=args.fleet_jobs, fleet_sustained_s=args.fleet_sustained_s,
                      sustained_s=args.sustained_s, agent_sessions=args.agent_sessions,
                      priority_mix=args.priority_mix,
                      agent_turns=args.agent_turns,
                      agent_system_prompts=args.agent_system_prompts,
                      agent_system_tokens=args.agent_system_tokens,
                      agent_kv_pool_blocks=args.agent_kv_pool_blocks,
                      agent_host_tier=args.agent_host_tier,
                      embed_model=args.embed_model, embed_jobs=args.embed_jobs,
                      host_path_steps=args.host_path_steps, peer_jobs=args.peer_jobs,
                      peer_max_new=args.peer_max_new, ceiling_runs=args.ceiling_runs)
    result = run_bench(cfg, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    print((args.out / "ladder.md").read_text(), end="")
    return 0 if all(r["jobs_ok"] == r["jobs"] for r in result["rungs"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"run": _cmd_run, "demo": _cmd_demo, "bench": _cmd_bench,
               "soak": _cmd_soak}[args.command]
    # SIGTERM (docker stop, kill, a CI timeout) takes the Ctrl-C path, so the demo's
    # finally blocks stop the worker and broker instead of orphaning them.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return command(args)
    except UsageError as exc:
        print(f"fabric-loadgen {args.command}: {exc}", file=sys.stderr)
        return _EXIT_FAILED
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except (RuntimeError, ConnectionError, TimeoutError, nats.errors.Error) as exc:
        # Expected failures (broker unreachable, worker never ready) get one message,
        # not a traceback; anything else is a bug and keeps its traceback.
        print(f"fabric-loadgen: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_FAILED
