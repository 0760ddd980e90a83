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
import ssl
import sys
import tempfile
from pathlib import Path
from typing import Any

import nats.errors

from loadgen.arrivals import Arrival, Burst, Closed, poisson, replay
from loadgen.broker import EmbeddedNats
from loadgen.client import CANCEL_SUBJECT, RESULT_PREFIX, run_jobs
from loadgen.fleet import WorkerProcess, provision, write_engine_toml
from loadgen.report import build_report, format_report, write_report
from loadgen.scrape import Scraper
from loadgen.sessions import SessionSpec, run_sessions
from loadgen.trace import TraceError, load_trace
from loadgen.workload import Bimodal, LogNormal, Uniform, WorkloadSpec, generate
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
_RUN_JOBS = 1000  # `run --jobs` when not given and not replaying a trace


class UsageError(Exception):
    """Flags that do not make a run: said in one line, exit 2."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fabric-loadgen", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser, jobs: int) -> None:
        sp.add_argument("--jobs", type=int, default=jobs, help="number of jobs")
        sp.add_argument("--seed", type=int, default=0, help="workload seed")
        sp.add_argument("--text", action="store_true", help="text prompts, not token ids")
        sp.add_argument("--timeout-s", type=float, default=600.0,
                        help="bound on the whole run, from the first publish")
        sp.add_argument("--json", type=Path, help="also write the report here as JSON")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    run = sub.add_parser("run", help="publish a workload against an existing deployment",
                         description="Publish a seeded workload to any deployment and report "
                         "throughput, latency, errors, padding and budget occupancy. "
                         "See docs/loadgen.md.")
    run.add_argument("--nats-url", required=True)
    run.add_argument("--subject-prefix", default="fabric.jobs.",
                     help="jobs go to <prefix><run-id>; the stream must capture it")
    run.add_argument("--result-prefix", default=RESULT_PREFIX,
                     help="Results come back on <prefix><run-id>; the worker's --result-prefix")
    run.add_argument("--run-id", help="default: run-<random hex>")
    common(run, jobs=None)
    w = run.add_argument_group("workload (job shapes)")
    w.add_argument("--workload", choices=["lognormal", "uniform", "bimodal", "trace", "agent"],
                   default="lognormal")
    w.add_argument("--prompt-median", type=float, default=90.0, help="lognormal: median tokens")
    w.add_argument("--prompt-sigma", type=float, default=0.8, help="lognormal: sigma of log")
    w.add_argument("--prompt-min", type=int, default=4, help="lognormal, uniform: shortest")
    w.add_argument("--prompt-max", type=int, default=1024, help="lognormal, uniform: longest")
    w.add_argument("--min-new-tokens", type=int, default=1, help="lognormal, uniform")
    w.add_argument("--max-new-tokens", type=int, default=64, help="lognormal, uniform")
    w.add_argument("--doc-share", type=float, default=0.2,
                   help="bimodal: share of 600-1000 token documents")
    w.add_argument("--trace", type=Path, help="trace: file of arrival_s,prompt_tokens,"
                   "max_new_tokens (CSV or JSON Lines)")
    j = run.add_argument_group("what each job asks (not for --workload agent)")
    j.add_argument("--embed", action="store_true",
                   help="embedding jobs (task embed, truncate on) of word texts, the length "
                        "law in about-tokens: for an embedding worker")
    j.add_argument("--chat", action="store_true",
                   help="send messages (a fixed system message, the text prompt as the "
                        "user's) instead of a prompt; implies --text")
    j.add_argument("--stop", action="append", default=[], metavar="STRING",
                   help="sampling.stop of every job (repeatable, up to 8)")
    j.add_argument("--logprobs", type=int, default=0, metavar="N",
                   help="sampling.logprobs of every job: the N most likely tokens (0-20)")
    j.add_argument("--ignore-eos", action="store_true",
                   help="sampling.ignore_eos: generate max_new_tokens whatever the model says")
    j.add_argument("--json-jobs", action="store_true",
                   help="publish jobs as JSON objects, not msgpack (Results come back as JSON)")
    j.add_argument("--cancel-fraction", type=float, default=0.0, metavar="F",
                   help="cancel this share of the jobs (chosen from --seed)")
    j.add_argument("--cancel-after-ms", type=float, default=0.0, metavar="MS",
                   help="send each cancel this long after its job was published")
    j.add_argument("--cancel-subject", default=CANCEL_SUBJECT,
                   help="the workers' --cancel-subject")
    g = run.add_argument_group("agent traffic (--workload agent: sessions sharing system "
                               "prompts, each turn sent when the last one's Result is back)")
    g.add_argument("--sessions", type=int, default=32, help="concurrent sessions")
    g.add_argument("--system-prompts", type=int, default=4, help="distinct system prompts")
    g.add_argument("--turns", type=int, default=4, help="jobs per session")
    g.add_argument("--system-tokens", type=_range, default=(300, 700), metavar="LO,HI",
                   help="a system prompt's length in tokens, uniform")
    g.add_argument("--user-tokens", type=_range, default=(8, 32), metavar="LO,HI",
                   help="a user message's length in tokens, uniform")
    g.add_argument("--turn-new-tokens", type=_range, default=(16, 48), metavar="LO,HI",
                   help="max_new_tokens of each turn, uniform")
    a = run.add_argument_group("arrivals (when jobs are published)")
    a.add_argument("--arrival", choices=["burst", "closed", "open", "trace"],
                   help="default: closed with --concurrency, open with --rate, trace for "
                   "--workload trace, else burst")
    a.add_argument("--concurrency", type=int, help="closed: jobs kept outstanding")
    a.add_argument("--rate", type=float, help="open: Poisson arrivals, jobs/s")
    a.add_argument("--speed", type=float, help="trace: replay this many times faster (1)")
    m = run.add_argument_group("worker metrics")
    m.add_argument("--metrics-url", action="append", default=[], metavar="URL[,URL...]",
                   help="the workers' Prometheus endpoints, scraped during the run")
    m.add_argument("--metrics-period-s", type=float, default=0.25)
    c = run.add_argument_group("broker security (or user:password@ in --nats-url)")
    c.add_argument("--creds", help="NATS credentials file")
    c.add_argument("--tls-ca", help="CA bundle to verify the server")
    c.add_argument("--tls-cert", help="client certificate")
    c.add_argument("--tls-key", help="client key")

    demo = sub.add_parser("demo", help="broker + one CPU worker + a workload, on this host")
    demo.add_argument("--work-dir", type=Path,
                      help="keep engine.toml and logs here (default: a temp dir, deleted)")
    demo.add_argument("--ready-timeout-s", type=float, default=300.0,
                      help="how long the worker may take to load its model")
    common(demo, jobs=300)

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
    bench.add_argument("--agent-turns", type=int, default=4)
    bench.add_argument("--agent-system-prompts", type=int, default=4)
    bench.add_argument("--agent-system-tokens", type=_range, default=(300, 700),
                       metavar="LO,HI")
    bench.add_argument("--embed-model", default="",
                       help="an embedding checkpoint (sentence-transformers directory): the "
                            "embedding table -- worker, a SentenceTransformer consumer, the "
                            "kernel-only ceiling -- on the same texts (empty = skip)")
    bench.add_argument("--embed-jobs", type=int, default=2000, help="texts for the table")
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


def _range(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI") from None
    return lo, hi


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
                                     connect_options=_connect_options(args)))
    report = build_report(stats)
    print(format_report(report), flush=True)
    if args.json is not None:
        print(f"report written to {write_report(report, args.json)}", flush=True)
    return _verdict(report)


def _workload(args: argparse.Namespace, run_id: str) -> WorkloadSpec:
    return WorkloadSpec(num_jobs=args.jobs, seed=args.seed, run_id=run_id, text=args.text)


def _run_workload(args: argparse.Namespace, run_id: str) -> tuple[WorkloadSpec, Arrival]:
    """`run`'s flags as a workload and an arrival process; UsageError if they clash."""
    trace = None
    if args.workload == "trace":
        if args.trace is None:
            raise UsageError("--workload trace needs --trace FILE")
        try:
            trace = load_trace(args.trace)
        except TraceError as e:
            raise UsageError(str(e)) from None
    elif args.trace is not None:
        raise UsageError("--trace is for --workload trace")
    jobs = args.jobs if args.jobs is not None else (len(trace.rows) if trace else _RUN_JOBS)
    if trace is not None and jobs > len(trace.rows):
        raise UsageError(f"{args.trace} has {len(trace.rows)} rows; --jobs {jobs} is more")
    try:
        spec = WorkloadSpec(
            num_jobs=jobs, seed=args.seed, run_id=run_id, text=args.text,
            min_new_tokens=args.min_new_tokens, max_new_tokens=args.max_new_tokens,
            prompt_lengths=(Uniform(args.prompt_min, args.prompt_max)
                            if args.workload == "uniform" else
                            LogNormal(args.prompt_median, args.prompt_sigma, args.prompt_min,
                                      args.prompt_max)),
            shape=(Bimodal(doc_share=args.doc_share) if args.workload == "bimodal" else trace),
            chat=args.chat, stop=tuple(args.stop), logprobs=args.logprobs, embed=args.embed,
            ignore_eos=args.ignore_eos, cancel_fraction=args.cancel_fraction,
            cancel_after_ms=args.cancel_after_ms)
        if not 0 <= spec.min_new_tokens <= spec.max_new_tokens or jobs < 0:
            raise ValueError("need --jobs >= 0 and 0 <= --min-new-tokens <= --max-new-tokens")
    except ValueError as e:
        raise UsageError(str(e)) from None

    implied = [n for n, flag in (("closed", args.concurrency), ("open", args.rate),
                                 ("trace", args.speed)) if flag is not None]
    if len(implied) > 1:
        raise UsageError(f"--concurrency, --rate and --speed are for different arrivals "
                         f"({', '.join(implied)}); give one")
    arrival = args.arrival or (implied[0] if implied else
                               "trace" if trace is not None else "burst")
    if implied and implied[0] != arrival:
        flag = {"closed": "--concurrency", "open": "--rate", "trace": "--speed"}[implied[0]]
        raise UsageError(f"{flag} is for --arrival {implied[0]}, not --arrival {arrival}")
    try:
        if arrival == "closed":
            if args.concurrency is None:
                raise UsageError("--arrival closed needs --concurrency N")
            return spec, Closed(args.concurrency)
        if arrival == "open":
            if args.rate is None:
                raise UsageError("--arrival open needs --rate R (jobs/s)")
            return spec, poisson(jobs, args.rate, args.seed)
        if arrival == "trace":
            if trace is None:
                raise UsageError("--arrival trace replays a trace's times: needs --workload "
                                 "trace --trace FILE")
            return spec, replay(trace.arrivals_s[:jobs], args.speed or 1.0)
    except ValueError as e:
        raise UsageError(str(e)) from None
    return spec, Burst()


def _connect_options(args: argparse.Namespace) -> dict[str, Any]:
    """nats.connect keywords for `run`'s security flags (none given: none)."""
    opts: dict[str, Any] = {}
    if args.creds:
        opts["user_credentials"] = args.creds
    if args.tls_ca or args.tls_cert:
        if bool(args.tls_cert) != bool(args.tls_key):
            raise UsageError("--tls-cert and --tls-key go together")
        try:
            ctx = ssl.create_default_context(cafile=args.tls_ca)
            if args.tls_cert:
                ctx.load_cert_chain(args.tls_cert, args.tls_key)
        except (OSError, ssl.SSLError) as e:
            raise UsageError(f"TLS files: {e}") from None
        opts["tls"] = ctx
    return opts


def _metrics_urls(values: list[str]) -> list[str]:
    urls = [u.strip() for v in values for u in v.split(",") if u.strip()]
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise UsageError(f"--metrics-url {u!r}: expected http(s)://host:port/metrics")
    return urls


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
    spec, arrival = _run_workload(args, run_id)
    if args.metrics_period_s <= 0:
        raise UsageError("--metrics-period-s must be > 0")
    return _verdict(_publish_and_report(
        args, args.nats_url, run_id, args.subject_prefix, spec=spec, arrival=arrival,
        metrics_urls=_metrics_urls(args.metrics_url), result_prefix=args.result_prefix,
        connect_options=_connect_options(args), as_json=args.json_jobs,
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
    from loadgen.bench import BenchConfig
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
    from loadgen.bench import BenchConfig, default_rungs, run_bench

    cfg = BenchConfig(jobs=args.jobs, seed=args.seed, model=args.model, device=args.device,
                      dtype=args.dtype, token_budget=args.token_budget, low_water=args.low_water,
                      max_seq_len=args.max_seq_len,
                      rungs=tuple(int(r) for r in args.rungs.split(",") if r)
                      or default_rungs(args.device),
                      serial_jobs=args.serial_jobs, null_jobs=args.null_jobs,
                      fleet_jobs=args.fleet_jobs, fleet_sustained_s=args.fleet_sustained_s,
                      sustained_s=args.sustained_s, agent_sessions=args.agent_sessions,
                      agent_turns=args.agent_turns,
                      agent_system_prompts=args.agent_system_prompts,
                      agent_system_tokens=args.agent_system_tokens,
                      embed_model=args.embed_model, embed_jobs=args.embed_jobs)
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
