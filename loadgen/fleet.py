"""A local fleet: real `fabric-worker` processes, started the way production starts them.

Rule: every worker process this module starts is stopped by it -- `terminate()` sends
SIGTERM and waits a bounded grace before SIGKILL, and a finalizer (also run at
interpreter exit) kills whatever a crashed caller left behind. Workers run in their own
session, so a Ctrl-C at the terminal reaches only the caller, which then shuts the
fleet down in order instead of every process racing its own handler.

Workers are run as `python -m worker` with this interpreter, which needs no console
script on PATH; the child's PYTHONPATH leads with the directory this process imports
`worker` from, so parent and child always run the same code.
"""

from __future__ import annotations

import collections
import importlib.util
import json
import os
import signal
import subprocess
import sys
import threading
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = ["ENGINE_KEYS", "WorkerProcess", "provision", "worker_env", "write_engine_toml"]

# The nine engine fields, in the order DESIGN.md lists them; the worker rejects others.
ENGINE_KEYS = (
    "nats_url",
    "stream",
    "consumer",
    "model",
    "device",
    "dtype",
    "token_budget",
    "low_water",
    "max_seq_len",
)
# What marks a worker ready to take jobs in its log (a structlog `event`).
READY_EVENT = "worker_ready"
# Log lines kept in memory for error messages; the full log goes to the file.
_TAIL_LINES = 40


def write_engine_toml(path: str | os.PathLike[str], fields: Mapping[str, object]) -> Path:
    """Write an engine config. Strings are written as JSON strings, which TOML accepts
    as basic strings; ints and floats as themselves. No key is checked here: a config
    the worker would reject is a useful test input."""
    lines = []
    for key, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError(f"{key}: engine values are str, int or float, got {value!r}")
        lines.append(f"{key} = {json.dumps(value)}")
    out = Path(path)
    out.write_text("\n".join(lines) + "\n")
    return out


def worker_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for a worker child: ours, unbuffered (so its ready line is not stuck
    in a pipe buffer), with the `worker` package we see first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONUNBUFFERED"] = "1"
    spec = importlib.util.find_spec("worker")
    if spec is not None and spec.origin is not None:
        root = str(Path(spec.origin).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(
            [root, *filter(None, [env.get("PYTHONPATH")])]
        )
    if extra:
        env.update(extra)
    return env


def provision(
    config_path: str | os.PathLike[str],
    *,
    timeout_s: float = 60.0,
    extra_args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> None:
    """Run `fabric-worker provision` (idempotent: creates streams and the consumer).
    `extra_args` go to the command as given (e.g. `--ack-wait-s 2 --max-deliver 3`)."""
    proc = subprocess.run(
        [sys.executable, "-m", "worker", "provision", "--config", str(config_path), *extra_args],
        env=worker_env(env),
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )
    if proc.returncode != 0:
        raise RuntimeError(
            f"provision exited {proc.returncode}:\n{proc.stdout}{proc.stderr}"
        )


def _kill_if_running(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class WorkerProcess:
    """One `fabric-worker run` subprocess whose log is tee'd to a file."""

    def __init__(
        self,
        config_path: str | os.PathLike[str],
        *,
        worker_id: str,
        log_path: str | os.PathLike[str],
        metrics_port: int = 0,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.worker_id = worker_id
        self.log_path = Path(log_path)
        self._argv = [
            sys.executable, "-m", "worker", "run",
            "--config", str(config_path),
            "--worker-id", worker_id,
            "--metrics-port", str(metrics_port),
            *extra_args,
        ]  # fmt: skip
        self._env = worker_env(env)
        self._proc: subprocess.Popen | None = None
        self._reader: threading.Thread | None = None
        self._ready = threading.Event()
        self._tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
        self._finalizer: weakref.finalize | None = None

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def returncode(self) -> int | None:
        return self._proc.poll() if self._proc is not None else None

    def start(self) -> WorkerProcess:
        if self._proc is not None:
            raise RuntimeError("a WorkerProcess starts once; make a new one")
        self._proc = subprocess.Popen(
            self._argv,
            env=self._env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._finalizer = weakref.finalize(self, _kill_if_running, self._proc)
        self._reader = threading.Thread(
            target=self._pump, name=f"log-{self.worker_id}", daemon=True
        )
        self._reader.start()
        return self

    def wait_ready(self, timeout_s: float = 120.0) -> None:
        """Block until the worker logs `worker_ready`; raise if it exits or times out."""
        assert self._proc is not None, "start() first"
        # Poll in short waits so a worker that dies before it is ready fails fast.
        waited_s = 0.0
        while not self._ready.wait(0.1):
            waited_s += 0.1
            if self._proc.poll() is not None:
                self._join_reader()
                raise RuntimeError(
                    f"worker {self.worker_id} exited {self._proc.returncode} before "
                    f"ready; log tail:\n{self.log_tail()}"
                )
            if waited_s >= timeout_s:
                raise TimeoutError(
                    f"worker {self.worker_id} not ready after {timeout_s}s; "
                    f"log tail:\n{self.log_tail()}"
                )

    def terminate(self, grace_s: float = 10.0) -> int | None:
        """SIGTERM (the worker drains), SIGKILL after grace_s; returns the exit code."""
        if self._proc is None:
            return None
        if self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._join_reader()
        return self._proc.returncode

    def wait(self, timeout_s: float | None = None) -> int:
        """Block until the worker exits on its own (raises subprocess.TimeoutExpired)."""
        assert self._proc is not None, "start() first"
        code = self._proc.wait(timeout=timeout_s)
        self._join_reader()
        return code

    def kill(self) -> int | None:
        """SIGKILL: what a crash looks like to the broker."""
        if self._proc is None:
            return None
        _kill_if_running(self._proc)
        self._join_reader()
        return self._proc.returncode

    def log_tail(self) -> str:
        return "".join(self._tail)

    def _pump(self) -> None:
        # Reading the pipe continuously is also what keeps a chatty worker from
        # blocking on a full pipe buffer.
        assert self._proc is not None and self._proc.stdout is not None
        with open(self.log_path, "ab") as log:
            for raw in self._proc.stdout:
                log.write(raw)
                log.flush()
                line = raw.decode(errors="replace")
                self._tail.append(line)
                if not self._ready.is_set() and READY_EVENT in line:
                    self._ready.set()

    def _join_reader(self) -> None:
        if self._reader is not None:
            self._reader.join(timeout=5.0)
