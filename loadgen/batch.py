"""`fabric-batch`: an OpenAI Batch API input file through the fleet, and its output file back.

    fabric-batch submit requests.jsonl --nats-url nats://host:4222 [--wait]
    fabric-batch collect requests.jsonl --out output.jsonl [--errors errors.jsonl]

Rule: the broker is the only state. A batch is named by its file's bytes (or `--batch`):
its lines go to `fabric.jobs.batch.<name>` with `Nats-Msg-Id: <name>:<custom_id>` and
`reply_to` `fabric.results.batch.<name>`. `submit` first reads what those subjects already
hold (lines published, lines answered) and publishes only the rest, so running it again
(after a crash, or twice) publishes nothing twice, long after the duplicate window. `collect` reads the results
stream's copy of the reply subject from its start, writes one line per custom_id (status
200 to `--out`, anything else to `--errors`) and stops when every id of the file has one;
after a crash it appends what its files lack. Exit status: 0 every line collected (or
submitted), 1 not all in `--timeout-s`, 2 bad input file or no broker.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy
from tqdm import tqdm

from loadgen.batchfile import BadBatchFile, BatchFile, OutputFile, read_batch
from loadgen.client import connect

JOBS_PREFIX = "fabric.jobs.batch."
RESULTS_PREFIX = "fabric.results.batch."
WINDOW = 512  # publishes awaiting their acks at once
FLUSH_EVERY_S = 1.0  # collect: output files are fsynced this often (and at the end)


def subjects(batch: BatchFile) -> tuple[str, str]:
    return JOBS_PREFIX + batch.name, RESULTS_PREFIX + batch.name


async def read_subject(js, subject: str, on_msg: Callable[[Msg], None],
                       until: Callable[[], bool] | None = None, timeout_s: float = 60.0) -> None:
    """Every message the stream holds on `subject`, oldest first, to `on_msg`; then, with
    `until`, go on reading new ones until it is true (or the timeout)."""
    stream = await js.find_stream_name_by_subject(subject)
    info = await js.stream_info(stream, subjects_filter=subject)
    held = (info.state.subjects or {}).get(subject, 0)
    if held == 0 and until is None:
        return
    caught_up = asyncio.Event()
    seen = 0

    async def cb(msg: Msg) -> None:
        nonlocal seen
        seen += 1
        on_msg(msg)
        if (until is None and (seen >= held or msg.metadata.num_pending == 0)) or (
                until is not None and until()):
            caught_up.set()

    sub = await js.subscribe(subject, cb=cb, ordered_consumer=True,
                             deliver_policy=DeliverPolicy.ALL)
    try:
        if until is not None and until():
            return
        await asyncio.wait_for(caught_up.wait(), timeout_s)
    finally:
        with contextlib.suppress(Exception):
            await sub.unsubscribe()


async def submit(js, batch: BatchFile, wait: bool, timeout_s: float) -> int:
    jobs, replies = subjects(batch)
    published: set[str] = set()
    prefix = f"{batch.name}:"
    await read_subject(js, jobs, lambda m: published.add(
        (m.headers or {}).get("Nats-Msg-Id", "").removeprefix(prefix)), timeout_s=timeout_s)
    # Answered lines too: a work-queue jobs stream forgets a job once it is acked.
    await read_subject(js, replies, lambda m: published.add(json.loads(m.data)["custom_id"]),
                       timeout_s=timeout_s)
    todo = [line for line in batch.lines if line["custom_id"] not in published]
    print(f"batch {batch.name}: {len(batch.lines)} lines, {len(batch.lines) - len(todo)} "
          f"already published, publishing {len(todo)} to {jobs}", file=sys.stderr)
    gate = asyncio.Semaphore(WINDOW)
    bar = tqdm(total=len(todo), desc="submit", unit="line", disable=None)

    async def one(line: dict) -> None:
        data = json.dumps({**line, "reply_to": replies}, separators=(",", ":"),
                          ensure_ascii=False).encode()
        try:
            for attempt in range(5):
                try:
                    await js.publish(jobs, data, headers={
                        "Nats-Msg-Id": prefix + line["custom_id"]})
                    break
                except Exception:  # noqa: BLE001 - a retry is safe: the Msg-Id dedupes it
                    if attempt == 4:
                        raise
                    await asyncio.sleep(0.5 * (attempt + 1))
        finally:
            gate.release()
            bar.update()

    tasks = []
    for line in todo:
        await gate.acquire()
        tasks.append(asyncio.create_task(one(line)))
    await asyncio.gather(*tasks)
    bar.close()
    if not wait:
        return 0
    return await _wait_answered(js, batch, timeout_s)


async def _wait_answered(js, batch: BatchFile, timeout_s: float) -> int:
    """Until the reply subject holds a line per request (a count: collect dedupes)."""
    _, replies = subjects(batch)
    stream = await js.find_stream_name_by_subject(replies)
    bar = tqdm(total=len(batch.lines), desc="answered", unit="line", disable=None)
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            info = await js.stream_info(stream, subjects_filter=replies)
            n = (info.state.subjects or {}).get(replies, 0)
            bar.update(min(n, len(batch.lines)) - bar.n)
            if n >= len(batch.lines):
                return 0
            await asyncio.sleep(0.5)
    finally:
        bar.close()
    return 1


async def collect(js, batch: BatchFile, out: Path, errors: Path, timeout_s: float) -> int:
    _, replies = subjects(batch)
    want = set(batch.ids)
    ok, bad = OutputFile(out), OutputFile(errors)
    done = (ok.ids | bad.ids) & want
    bar = tqdm(total=len(want), initial=len(done), desc="collect", unit="line", disable=None)
    flushed = [time.monotonic()]

    def on_msg(msg: Msg) -> None:
        line = json.loads(msg.data)
        cid = line.get("custom_id")
        if cid not in want or cid in done:
            return  # another batch's, or a copy (a replay past the duplicate window)
        response = line.get("response") or {}
        (ok if response.get("status_code") == 200 else bad).write(cid, msg.data)
        done.add(cid)
        bar.update()
        if time.monotonic() - flushed[0] >= FLUSH_EVERY_S:
            ok.flush()
            bad.flush()
            flushed[0] = time.monotonic()

    try:
        if len(done) < len(want):
            with contextlib.suppress(asyncio.TimeoutError):
                await read_subject(js, replies, on_msg, until=lambda: len(done) >= len(want),
                                   timeout_s=timeout_s)
    finally:
        ok.close()
        bad.close()
        bar.close()
    missing = len(want) - len(done)
    print(f"batch {batch.name}: {len(ok.ids & want)} ok in {out}, {len(bad.ids & want)} failed "
          f"in {errors}, {missing} missing", file=sys.stderr)
    return 0 if missing == 0 else 1


def _name(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise argparse.ArgumentTypeError("a batch name is 1-64 letters, digits, - or _")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fabric-batch", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("submit", "collect"):
        c = sub.add_parser(name)
        c.add_argument("file", type=Path, help="the batch input file (JSONL)")
        c.add_argument("--nats-url", default="nats://127.0.0.1:4222")
        c.add_argument("--batch", type=_name,
                       help="the batch's name (default: from the file's bytes)")
        c.add_argument("--timeout-s", type=float, default=24 * 3600.0)
        if name == "submit":
            c.add_argument("--wait", action="store_true",
                           help="return once every line is answered, not once published")
        else:
            c.add_argument("--out", type=Path, required=True)
            c.add_argument("--errors", type=Path,
                           help="lines that are not status 200 (default: OUT.errors.jsonl)")
    return p


async def _run(args: argparse.Namespace, batch: BatchFile) -> int:
    nc = await connect(args.nats_url, name=f"fabric-batch-{args.command}")
    try:
        js = nc.jetstream()
        if args.command == "submit":
            return await submit(js, batch, args.wait, args.timeout_s)
        errors = args.errors or args.out.with_suffix(".errors.jsonl")
        return await collect(js, batch, args.out, errors, args.timeout_s)
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        batch = read_batch(args.file, args.batch)
    except BadBatchFile as e:
        print(e, file=sys.stderr)
        return 2
    except OSError as e:
        print(f"{args.file}: {e}", file=sys.stderr)
        return 2
    try:
        return asyncio.run(_run(args, batch))
    except ConnectionError as e:
        print(e, file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
