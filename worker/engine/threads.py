"""Where CPU-parallel work may run: never on the process's main thread (see `off_main`)."""

from __future__ import annotations

import threading


def off_main(fn, *args, **kwargs):
    """`fn(*args, **kwargs)` on a short-lived thread, so this process's main thread never
    runs a parallel CPU op (loading a model, allocating and filling the runner's buffers).

    Why: with GNU OpenMP (torch's CPU backend on Linux) every thread that runs a parallel op
    keeps a team of worker threads, and once the process has more OpenMP threads than CPUs,
    idle team threads sleep and every later parallel op pays futex wake-ups. A model loaded
    on the event loop's thread leaves a second team beside the executor's, and the
    executor's small ops become several times slower. A thread that exits takes its team
    with it, so the executor's is the only one left."""
    box: list = []

    def run() -> None:
        try:
            box.append(fn(*args, **kwargs))
        except BaseException as e:  # noqa: BLE001 - re-raised on the caller's thread
            box.append(e)

    t = threading.Thread(target=run, name="off-main")
    t.start()
    t.join()
    if isinstance(box[0], BaseException):
        raise box[0]
    return box[0]
