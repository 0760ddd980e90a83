"""`fabric-loadgen`: publish a seeded workload and report what came back.

Rule: the exit status is the verdict -- 0 only if every job got an ok Result, 1 if
any did not, 2 if the run could not happen -- so scripts and CI can gate on it. `demo` owns everything it starts (broker, worker) and
stops all of it on the way out, whether the run succeeded, failed, raised or was
interrupted with Ctrl-C.

    fabric-loadgen run --nats-url nats://host:4222 --jobs 1000 --json out.json
    fabric-loadgen demo --jobs 300
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

from loadgen.broker import EmbeddedNats
from loadgen.client import run_jobs
from loadgen.fleet import WorkerProcess, provision, write_engine_toml
from loadgen.report import build_report, format_report, write_report
from loadgen.workload import WorkloadSpec, generate

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
    "low_water": 4096,
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

    def common(sp: argparse.ArgumentParser, jobs: int) -> None:
        sp.add_argument("--jobs", type=int, default=jobs, help="number of jobs")
        sp.add_argument("--seed", type=int, default=0, help="workload seed")
        sp.add_argument("--text", action="store_true", help="text prompts, not token ids")
        sp.add_argument("--timeout-s", type=float, default=600.0,
                        help="bound on the whole run, from the first publish")
        sp.add_argument("--json", type=Path, help="also write the report here as JSON")
        sp.add_argument("--no-progress", action="store_true", help="no progress bar")

    run = sub.add_parser("run", help="publish a workload against an existing deployment")
    run.add_argument("--nats-url", required=True)
    run.add_argument("--subject-prefix", default="fabric.jobs.")
    run.add_argument("--run-id", help="default: run-<random hex>")
    common(run, jobs=1000)

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
    bench.add_argument("--low-water", type=int, default=4096)
    bench.add_argument("--max-seq-len", type=int, default=1088)
    bench.add_argument("--rungs", default="0,1,2,3,4", help="comma-separated rung numbers")
    bench.add_argument("--serial-jobs", type=int, default=0,
                       help="run rung 0 on the first N jobs only (0 = all)")
    bench.add_argument("--null-jobs", type=int, default=20000,
                       help="jobs for the null-model broker-path run (0 = skip)")
    bench.add_argument("--fleet-jobs", type=int, default=0,
                       help="jobs for one vs two one-core workers on one consumer (0 = skip)")
    return p


def _workload(args: argparse.Namespace, run_id: str) -> WorkloadSpec:
    return WorkloadSpec(num_jobs=args.jobs, seed=args.seed, run_id=run_id, text=args.text)


def _publish_and_report(args: argparse.Namespace, nats_url: str, run_id: str,
                        subject_prefix: str = "fabric.jobs.") -> dict[str, Any]:
    jobs = generate(_workload(args, run_id))
    stats = asyncio.run(run_jobs(
        nats_url, jobs, run_id=run_id, subject_prefix=subject_prefix,
        timeout_s=args.timeout_s, progress=not args.no_progress,
    ))
    report = build_report(stats)
    print(format_report(report), flush=True)
    if args.json is not None:
        print(f"report written to {write_report(report, args.json)}", flush=True)
    return report


def _verdict(report: dict[str, Any]) -> int:
    return 0 if report["jobs_ok"] == report["jobs_total"] else 1


def _cmd_run(args: argparse.Namespace) -> int:
    run_id = args.run_id or f"run-{secrets.token_hex(4)}"
    return _verdict(_publish_and_report(args, args.nats_url, run_id, args.subject_prefix))


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


def _cmd_bench(args: argparse.Namespace) -> int:
    from loadgen.bench import BenchConfig, run_bench

    cfg = BenchConfig(jobs=args.jobs, seed=args.seed, model=args.model, device=args.device,
                      dtype=args.dtype, token_budget=args.token_budget, low_water=args.low_water,
                      max_seq_len=args.max_seq_len,
                      rungs=tuple(int(r) for r in args.rungs.split(",") if r),
                      serial_jobs=args.serial_jobs, null_jobs=args.null_jobs,
                      fleet_jobs=args.fleet_jobs)
    result = run_bench(cfg, args.out, log=lambda m: print(m, file=sys.stderr, flush=True))
    print((args.out / "ladder.md").read_text(), end="")
    return 0 if all(r["jobs_ok"] == r["jobs"] for r in result["rungs"].values()) else 1


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = {"run": _cmd_run, "demo": _cmd_demo, "bench": _cmd_bench}[args.command]
    # SIGTERM (docker stop, kill, a CI timeout) takes the Ctrl-C path, so the demo's
    # finally blocks stop the worker and broker instead of orphaning them.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        return command(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return _EXIT_INTERRUPTED
    except (RuntimeError, ConnectionError, TimeoutError, nats.errors.Error) as exc:
        # Expected failures (broker unreachable, worker never ready) get one message,
        # not a traceback; anything else is a bug and keeps its traceback.
        print(f"fabric-loadgen: {type(exc).__name__}: {exc}", file=sys.stderr)
        return _EXIT_FAILED
