"""The observability port: `/metrics`, `/healthz` and `/readyz` on one small HTTP server.

Rule: the server runs on its own daemon threads and only reads; the event loop and the
executor never wait for a scrape or a probe. It can start before the worker exists (while
the model loads it answers `/healthz` 200 and `/readyz` 503 "loading model") and is
pointed at the worker with `attach`.

The bind address is `FABRIC_METRICS_ADDR` (default 0.0.0.0, all interfaces: probes and
scrapers come from outside the container); an IPv6 literal binds IPv6.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import structlog
from prometheus_client.exposition import choose_encoder

from worker.ops.health import Verdict, liveness, readiness
from worker.ops.metrics import Observed, new_registry, register_worker

log = structlog.get_logger("http")

DEFAULT_ADDR = "0.0.0.0"
EXIT_CONFIG = 2  # the port cannot be bound: an option to fix, not a crash to retry


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # a slow scraper never holds the process open
    observer: Observer


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    timeout = 10  # a client that never sends its request gives its thread back

    def do_GET(self) -> None:
        obs = self.server.observer
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept"))
            try:
                body = encoder(obs.registry)
            except Exception as e:  # noqa: BLE001 - a broken collector fails the scrape, not us
                log.warning("metrics_scrape_failed", error=repr(e))
                self._send(500, b"scrape failed\n", "text/plain; charset=utf-8")
                return
            self._send(200, body, content_type)
        elif path == "/healthz":
            self._verdict(obs.liveness())
        elif path == "/readyz":
            self._verdict(obs.readiness())
        else:
            self._send(404, b"not found: try /metrics, /healthz, /readyz\n",
                       "text/plain; charset=utf-8")

    def _verdict(self, v: Verdict) -> None:
        self._send(200 if v.ok else 503, json.dumps(v.body()).encode() + b"\n",
                   "application/json")

    def _send(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # probes every few seconds would drown the job logs


class Observer:
    """The HTTP server and the registry it serves; `attach` the worker when it exists."""

    def __init__(self, port: int, addr: str | None = None):
        self.registry = new_registry()
        self.worker: Observed | None = None
        self._was_ready = False
        addr = addr or os.environ.get("FABRIC_METRICS_ADDR") or DEFAULT_ADDR
        cls = _Server6 if ":" in addr else _Server
        self._server = cls((addr, port), _Handler)
        self._server.observer = self
        self.addr, self.port = self._server.server_address[:2]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={
            "poll_interval": 0.5}, name="observe-http", daemon=True)

    def start(self) -> Observer:
        self._thread.start()
        log.info("observe_listening", addr=self.addr, port=self.port,
                 paths=["/metrics", "/healthz", "/readyz"])
        return self

    def attach(self, worker: Observed) -> None:
        register_worker(self.registry, worker)
        self.worker = worker

    def liveness(self) -> Verdict:
        return liveness(self.worker.view() if self.worker is not None else None)

    def readiness(self) -> Verdict:
        v = readiness(self.worker.view() if self.worker is not None else None, self._was_ready)
        self._was_ready = self._was_ready or v.ok
        return v

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def start_http(port: int, addr: str | None = None) -> Observer:
    """Listen now, before there is a worker; exits with status 2 if the port is taken."""
    try:
        return Observer(port, addr).start()
    except OSError as e:
        print(f"fabric-worker: --metrics-port {port}: cannot listen "
              f"({e.strerror or e})", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG) from None
