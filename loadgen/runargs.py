"""`fabric-loadgen run`'s flags, and what they make: a workload, an arrival process, a connection.

Rule: every clash between flags is found here, before anything is published, and said in
one line as a `UsageError` (the command exits 2). docs/loadgen.md has every option.
"""

from __future__ import annotations

import argparse
import ssl
from pathlib import Path
from typing import Any

from loadgen.arrivals import Arrival, Burst, Closed, poisson, replay
from loadgen.client import CANCEL_SUBJECT, RESULT_PREFIX
from loadgen.trace import TraceError, load_trace
from loadgen.workload import Bimodal, LogNormal, Uniform, WorkloadSpec

_RUN_JOBS = 1000  # `run --jobs` when not given and not replaying a trace


class UsageError(Exception):
    """Flags that do not make a run: said in one line, exit 2."""


def add_common(sp: argparse.ArgumentParser, jobs: int) -> None:
    """The options `run` and `demo` share."""
    sp.add_argument("--jobs", type=int, default=jobs, help="number of jobs")
    sp.add_argument("--seed", type=int, default=0, help="workload seed")
    sp.add_argument("--text", action="store_true", help="text prompts, not token ids")
    sp.add_argument("--timeout-s", type=float, default=600.0,
                    help="bound on the whole run, from the first publish")
    sp.add_argument("--json", type=Path, help="also write the report here as JSON")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_run(sub: argparse._SubParsersAction) -> None:
    """The `run` subcommand and its flags."""
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
    add_common(run, jobs=None)
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
    g.add_argument("--system-tokens", type=int_pair, default=(300, 700), metavar="LO,HI",
                   help="a system prompt's length in tokens, uniform")
    g.add_argument("--user-tokens", type=int_pair, default=(8, 32), metavar="LO,HI",
                   help="a user message's length in tokens, uniform")
    g.add_argument("--turn-new-tokens", type=int_pair, default=(16, 48), metavar="LO,HI",
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


def int_pair(text: str) -> tuple[int, int]:
    try:
        lo, hi = (int(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI") from None
    return lo, hi


def run_workload(args: argparse.Namespace, run_id: str) -> tuple[WorkloadSpec, Arrival]:
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


def connect_options(args: argparse.Namespace) -> dict[str, Any]:
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


def metrics_urls(values: list[str]) -> list[str]:
    urls = [u.strip() for v in values for u in v.split(",") if u.strip()]
    for u in urls:
        if not u.startswith(("http://", "https://")):
            raise UsageError(f"--metrics-url {u!r}: expected http(s)://host:port/metrics")
    return urls
