"""`fabric-worker`: run a worker, provision the broker, or check a config.

Start-up order is deliberate: parse and check the config, then build the engine (load
the weights, allocate the KV pool), and only then connect to the broker. A bad config or
a model that does not fit exits with a message naming the field (exit 2) before any
connection is made, and a worker never holds messages while it is still loading.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import os
import re
import socket
import sys

import structlog

from worker.engine.modes import POLICIES, RUNNER_MODES
from worker.ops import log as logsetup
from worker.ops import heap
from worker.ops.cpu import IdleCpus, cpu_budget
from worker.config import ConfigError, EngineConfig, cfg_summary, config_hash, load_config
from worker.broker.connection import ConnectError, Security, connect
from worker.broker.topology import Topology, TopologyError, provision
from schemas.models import is_subject

EXIT_CONFIG = 2  # bad config, model, topology or credentials: fix and restart, retrying will not help
EXIT_FATAL = 1  # a fault at run time: held jobs were nak'd; restart me


def _topology(cfg: EngineConfig, args: argparse.Namespace) -> Topology:
    return Topology(jobs_stream=cfg.stream, consumer=cfg.consumer,
                    results_prefix=args.result_prefix, ack_wait_s=args.ack_wait_s,
                    replicas=getattr(args, "replicas", 1),
                    max_ack_pending=getattr(args, "max_ack_pending", 20000),
                    max_deliver=getattr(args, "max_deliver", 5),
                    js_domain=args.js_domain or None, cancel_subject=args.cancel_subject,
                    partitions=getattr(args, "partitions", 16))


def _domain_name(text: str) -> str:
    if text and not re.fullmatch(r"[A-Za-z0-9_-]+", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JetStream domain name "
                                         "(letters, digits, '-' and '_')")
    return text


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, help="engine config (TOML, the nine fields)")
    p.add_argument("--log-level", default=os.environ.get("FABRIC_LOG_LEVEL", "info"))
    p.add_argument("--log-format", choices=["auto", "json", "console"],
                   default=os.environ.get("FABRIC_LOG_FORMAT", "auto"))
    p.add_argument("--result-prefix", default="fabric.results.",
                   help="a job's reply_to must start with this")
    p.add_argument("--ack-wait-s", type=float, default=30.0)
    p.add_argument("--cancel-subject", type=_subject,
                   default=os.environ.get("FABRIC_CANCEL_SUBJECT", "fabric.cancel"),
                   help='core NATS subject of cancel messages, {"ids": [job id, ...]} '
                        "(or FABRIC_CANCEL_SUBJECT; default fabric.cancel); provision makes "
                        "a stream keep them")
    p.add_argument("--js-domain", type=_domain_name, default=os.environ.get("FABRIC_JS_DOMAIN", ""),
                   help="JetStream domain that holds the streams (or FABRIC_JS_DOMAIN), e.g. a "
                        "hub's, when connecting through a leaf node; default: the server's own")
    p.add_argument("--connect-give-up-s", type=float,
                   default=float(os.environ.get("FABRIC_CONNECT_GIVE_UP_S", 30.0)),
                   help="first connect: retry this long, then exit 2 (a refusal exits at once)")
    # Secrets: files, or the environment (FABRIC_NATS_PASSWORD, FABRIC_NATS_TOKEN); never a
    # flag's value, which any user on the host can read from the process list.
    p.add_argument("--user", help="NATS user (or FABRIC_NATS_USER); password: FABRIC_NATS_PASSWORD")
    p.add_argument("--creds", help="NATS credentials file (or FABRIC_NATS_CREDS)")
    p.add_argument("--nkey-seed", help="NKey seed file (or FABRIC_NATS_NKEY_SEED)")
    p.add_argument("--tls-ca", help="CA bundle to verify the server (or FABRIC_TLS_CA)")
    p.add_argument("--tls-cert", help="client certificate (or FABRIC_TLS_CERT)")
    p.add_argument("--tls-key", help="client key (or FABRIC_TLS_KEY)")


def _subject(value: str) -> str:
    if not is_subject(value):
        raise argparse.ArgumentTypeError(f"{value!r} is not a NATS subject (dot-separated "
                                         "tokens, no spaces, no wildcards)")
    return value


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fabric-worker", description=__doc__.splitlines()[0])
    sp = ap.add_subparsers(dest="cmd", required=True)
    run = sp.add_parser("run", help="serve jobs until SIGTERM")
    _common(run)
    run.add_argument("--worker-id", default=f"{socket.gethostname()}-{os.getpid()}")
    run.add_argument("--metrics-port", type=int, default=int(os.environ.get("FABRIC_METRICS_PORT", 0)),
                     help="Prometheus /metrics, /healthz, /readyz (0 = off)")
    run.add_argument("--grace-s", type=float, default=30.0, help="SIGTERM drain period")
    run.add_argument("--solo-from-attempt", type=int, default=3,
                     help="a job on this delivery or later runs alone (suspected poison)")
    run.add_argument("--step-timeout-s", type=float, default=60.0,
                     help="jobs in flight and no executor step finished this long: fatal (a hang)")
    run.add_argument("--broker-give-up-s", type=float, default=120.0,
                     help="broker unreachable this long: fatal")
    run.add_argument("--publish-give-up-s", type=float, default=60.0,
                     help="retry a Result publish this long, then nak the job")
    run.add_argument("--cpus", default=os.environ.get("FABRIC_CPUS", ""),
                     help="pin the worker to these CPU ids (comma-separated), e.g. one core each")
    run.add_argument("--threads", type=int, default=int(os.environ.get("FABRIC_THREADS", 0)),
                     help="intra-op threads (or FABRIC_THREADS; default: the CPUs the worker "
                          "may use, by affinity and cgroup quota, adapted on the CPU to what "
                          "runs fastest when it shares its cores)")
    run.add_argument("--served-model-name", action="append", metavar="NAME",
                     help="a name an OpenAI line's model may give (repeatable; default: the "
                          "configured model and its directory's name)")
    run.add_argument("--burst", action="store_true",
                     help="exit 0 once the consumer has nothing pending and nothing is held")
    run.add_argument("--max-step-tokens", type=int, default=None)
    run.add_argument("--gil-switch-ms", type=_positive, default=1.0,
                     help="Python's thread switch interval (default 1 ms; Python's own is 5)")
    # The KV pool is sized by memory; token_budget bounds only what is in flight.
    run.add_argument("--kv-pool-blocks", type=int, default=int(os.environ.get(
        "FABRIC_KV_POOL_BLOCKS", 0)), help="KV pool size in blocks (default: --kv-pool-gib, "
        "else on CUDA --kv-memory-fraction of the memory free after the weights, on the CPU "
        "4 x token_budget); at least token_budget, the rest is prefix cache")
    run.add_argument("--kv-pool-gib", type=float, default=float(os.environ.get(
        "FABRIC_KV_POOL_GIB", 0)), help="KV pool size in GiB (instead of blocks)")
    run.add_argument("--kv-memory-fraction", type=_positive, default=float(os.environ.get(
        "FABRIC_KV_MEMORY_FRACTION", 0.8)), help="CUDA: share of the memory free after the "
        "weights the KV pool takes (default 0.8)")
    run.add_argument("--host-tier-gib", type=float, default=None, help="CUDA: pinned host "
                     "memory for KV blocks evicted from the device pool (default 4; 0 = none)")
    # Benchmark ladder only (fabric-loadgen bench): the same worker with an older policy.
    run.add_argument("--policy", choices=POLICIES, default="continuous", help=argparse.SUPPRESS)
    # Benchmark only: every job computes its whole prompt (what prefix caching buys).
    run.add_argument("--no-prefix-cache", action="store_true", help=argparse.SUPPRESS)
    run.add_argument("--runner", choices=("auto",) + RUNNER_MODES, default="auto",
                     help="how steps reach the device: pipelined = one pinned, asynchronous "
                          "copy per step and CUDA graphs for decode steps; eager = tensors as "
                          "built (default auto: pipelined on CUDA, eager on the CPU)")
    prov = sp.add_parser("provision", help="create the streams and the consumer (idempotent)")
    _common(prov)
    prov.add_argument("--replicas", type=int, default=1)
    prov.add_argument("--max-ack-pending", type=int, default=20000)
    prov.add_argument("--partitions", type=int, default=16,
                      help="session partitions (a consumer each; workers find the number in "
                           "the stream): several per worker the fleet may have")
    prov.add_argument("--max-deliver", type=int, default=5,
                      help="deliveries per job; the last one dead-letters it instead of running it")
    dlq = sp.add_parser("dlq", help="list or replay dead letters (operator credentials)")
    _common(dlq)
    dlq.add_argument("action", choices=["list", "replay"])
    dlq.add_argument("--seq", type=int, action="append", default=[],
                     help="replay only this DLQ sequence (repeatable)")
    dlq.add_argument("--all", action="store_true", help="replay every dead letter of the stream")
    dlq.add_argument("--keep", action="store_true", help="replay without deleting the dead letter")
    chk = sp.add_parser("check-config", help="validate the config and exit")
    _common(chk)
    return ap


def _security(args: argparse.Namespace) -> Security:
    return Security.from_env(user=args.user, creds_file=args.creds, nkey_seed_file=args.nkey_seed,
                             tls_ca=args.tls_ca, tls_cert=args.tls_cert, tls_key=args.tls_key)


async def _provision(cfg: EngineConfig, args: argparse.Namespace) -> int:
    nc = await connect(cfg.nats_url, "fabric-provision", _security(args), args.connect_give_up_s)
    topo = _topology(cfg, args)
    try:
        for line in await provision(nc.jetstream(domain=topo.js_domain), topo):
            print(line)
    finally:
        await nc.close()
    return 0


async def _dlq(cfg: EngineConfig, args: argparse.Namespace) -> int:
    from worker.broker.deadletters import list_dead_letters, replay

    topo = _topology(cfg, args)
    nc = await connect(cfg.nats_url, "fabric-dlq", _security(args), args.connect_give_up_s)
    try:
        js = nc.jetstream(domain=topo.js_domain)
        records = await list_dead_letters(js, topo)
        if args.action == "list":
            print(f"# {len(records)} dead letter(s) on {topo.dlq_stream} {topo.dlq_subject}")
            print("# seq\tdead_at\tjob\tsubject\tdeliveries\tworker\terror")
            for r in records:
                print(r.line())
            return 0
        if not args.all and not args.seq:
            print("fabric-worker: dlq replay needs --seq N (repeatable) or --all", file=sys.stderr)
            return EXIT_CONFIG
        chosen = records if args.all else [r for r in records if r.seq in set(args.seq)]
        missing = set(args.seq) - {r.seq for r in chosen}
        for line in await replay(js, topo, chosen, keep=args.keep):
            print(line)
        if missing:
            print(f"fabric-worker: no dead letter with seq {sorted(missing)}", file=sys.stderr)
            return 1
        return 0
    finally:
        await nc.close()


# Young-generation collections every this many net allocations (Python's default is 700).
GC_GEN0 = 20_000


def _settle_heap() -> None:
    """Freeze what start-up made and collect young garbage in bigger, rarer passes.

    Once the model is loaded the process holds about 200,000 tracked objects, nearly all
    of them for good, and a full collection walks every one with the GIL held, stopping
    the event loop and the executor alike. `gc.freeze()` takes everything alive now out of
    the collector's sight; the bigger young generation makes the collections that remain
    rarer. Reference cycles made later are still collected (docs/bench/README.md has the
    measurements)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_GEN0, 50, 100)


def _run(cfg: EngineConfig, args: argparse.Namespace, log) -> int:
    cpus = {int(c) for c in args.cpus.split(",")} if args.cpus else None
    if cpus:
        # Before torch starts its thread pool: every thread it makes inherits the mask.
        os.sched_setaffinity(0, cpus)
    # Before any thread starts: every thread that allocates would otherwise get an arena.
    heap.bound_arenas()
    budget = cpu_budget(args.threads or None, cpus)
    if cfg.model == "builtin:null" and not budget.explicit:
        # The null model has nothing to compute in parallel: one intra-op thread, or an
        # OpenMP team spins on another core and takes it from the broker path it measures.
        budget = dataclasses.replace(budget, threads=1, source="null model", explicit=True)
    # Size OpenMP's pool before torch starts it (an operator's OMP_NUM_THREADS stays).
    os.environ.setdefault("OMP_NUM_THREADS", str(budget.threads))
    adapt = not budget.explicit and budget.threads > 1 and cfg.device == "cpu"
    log.info("cpu_budget", **budget.describe(), adaptive=adapt)
    # The event loop and the executor thread share one GIL. When the loop wakes (a socket is
    # readable) while the executor runs Python, it waits up to the switch interval before it
    # may run: at Python's 5 ms the broker path stalls for whole milliseconds per wake-up.
    sys.setswitchinterval(args.gil_switch_ms / 1000)
    import torch

    from worker.app import Worker
    from worker.options import Options, served_names
    from worker.engine.build import EngineError, KvSizing, build_engine_off_main

    torch.set_num_threads(budget.threads)
    # The CPUs nobody used while the model loads: the thread governor's start (a lone worker
    # starts with a thread per core; one loading beside a busy or loading neighbour, at one).
    idle_while_loading = IdleCpus(cpus) if adapt else None
    obs = None
    if args.metrics_port:
        # Listen before the model loads, so /healthz answers (and /readyz says why not) early.
        from worker.ops.http import start_http
        obs = start_http(args.metrics_port)

    try:
        engine = build_engine_off_main(cfg.model, cfg.device, cfg.dtype, cfg.token_budget,
                                       cfg.max_seq_len, max_step_tokens=args.max_step_tokens,
                                       policy=args.policy, runner=args.runner,
                                       prefix_cache=not args.no_prefix_cache,
                                       kv=KvSizing(args.kv_pool_blocks, args.kv_pool_gib,
                                                   args.kv_memory_fraction, args.host_tier_gib))
    except EngineError as e:
        print(f"fabric-worker: engine config {args.config}: {e}", file=sys.stderr)
        return EXIT_CONFIG
    if args.policy in ("serial", "window"):
        # Rungs 0 and 1 predate the token budget's hysteresis: admit as room frees up.
        cfg = cfg.model_copy(update={"low_water": cfg.token_budget - 1})
    if args.policy != "continuous":
        log.warning("bench_policy", policy=args.policy, low_water=cfg.low_water)
    _settle_heap()
    log.info("engine_ready", model=engine.loaded.name, task=engine.task,
             params=engine.loaded.args.num_params(),
             kv_pool_mib=round(engine.pool.nbytes / 2**20, 1), kv_blocks=engine.pool.num_blocks,
             kv_budget_blocks=cfg.token_budget // engine.block_size,
             **(engine.pool.describe() if engine.task == "generate" else {}),
             block_size=engine.block_size, max_step_tokens=engine.max_step_tokens,
             runner=engine.runner_mode, prefix_cache=engine.pool.blocks.caching,
             intra_op_threads=torch.get_num_threads(),
             gil_switch_ms=round(sys.getswitchinterval() * 1e3, 3), gc_frozen=gc.get_freeze_count(),
             gc_thresholds=gc.get_threshold())
    opts = Options(worker_id=args.worker_id, grace_s=args.grace_s,
                   solo_from_attempt=args.solo_from_attempt, burst=args.burst,
                   connect_give_up_s=args.connect_give_up_s, step_timeout_s=args.step_timeout_s,
                   broker_give_up_s=args.broker_give_up_s, publish_give_up_s=args.publish_give_up_s,
                   threads=budget.threads, adapt_threads=adapt,
                   start_spare=idle_while_loading() if idle_while_loading else 0.0,
                   served=served_names(cfg.model, args.served_model_name))
    worker = Worker(cfg, opts, engine, _topology(cfg, args), _security(args))
    if obs is not None:
        obs.attach(worker)
    code = asyncio.run(worker.run())
    if code == EXIT_FATAL:
        # Everything held is nak'd and flushed: leave now. A normal interpreter exit would
        # wait for whatever is stuck (a hung device call, a helper thread), and the exit
        # watchdog would have to end it anyway.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logsetup.configure(args.log_level, args.log_format)
    log = structlog.get_logger("cli")
    try:
        cfg = load_config(args.config)
    except ConfigError as e:
        print(f"fabric-worker: {e}", file=sys.stderr)
        return EXIT_CONFIG
    log.info("config_loaded", **cfg_summary(cfg))
    try:
        if args.cmd == "check-config":
            print(f"config ok ({config_hash(cfg)})")
            return 0
        if args.cmd == "provision":
            return asyncio.run(_provision(cfg, args))
        if args.cmd == "dlq":
            return asyncio.run(_dlq(cfg, args))
        return _run(cfg, args, log)
    except (TopologyError, ConnectError) as e:
        print(f"fabric-worker: {e}", file=sys.stderr)
        return EXIT_CONFIG


if __name__ == "__main__":
    sys.exit(main())
