"""The broker connection: credentials, TLS, the first connect with backoff, reconnects after.

The first connect is retried with exponential backoff for a bounded time (a worker that
starts before its broker should wait, not crash-loop); after that nats-py reconnects on
its own, forever, while the worker holds its engine and its in-flight jobs. Secrets come
from options or the environment, never from the engine config, and are never logged.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_delay, wait_exponential

log = structlog.get_logger("connection")


@dataclass(frozen=True, slots=True)
class Security:
    creds_file: str | None = None  # NATS credentials file (JWT + NKey seed)
    user: str | None = None
    password: str | None = None
    token: str | None = None
    nkey_seed_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_env(cls, environ: dict[str, str] | os._Environ = os.environ, **cli: str | None):
        """CLI values win over FABRIC_NATS_* / FABRIC_TLS_* environment variables."""
        env = {
            "creds_file": "FABRIC_NATS_CREDS", "user": "FABRIC_NATS_USER",
            "password": "FABRIC_NATS_PASSWORD", "token": "FABRIC_NATS_TOKEN",
            "nkey_seed_file": "FABRIC_NATS_NKEY_SEED", "tls_ca": "FABRIC_TLS_CA",
            "tls_cert": "FABRIC_TLS_CERT", "tls_key": "FABRIC_TLS_KEY",
        }
        return cls(**{k: cli.get(k) or environ.get(v) or None for k, v in env.items()})

    def describe(self) -> dict[str, object]:
        """What is configured, without a single secret: safe to log."""
        return {"auth": ("creds" if self.creds_file else "nkey" if self.nkey_seed_file
                         else "user" if self.user else "token" if self.token else "none"),
                "tls": bool(self.tls_ca or self.tls_cert)}

    def tls_context(self) -> ssl.SSLContext | None:
        if not (self.tls_ca or self.tls_cert):
            return None
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=self.tls_ca)
        if self.tls_cert:
            ctx.load_cert_chain(self.tls_cert, self.tls_key)
        return ctx

    def connect_kwargs(self) -> dict[str, object]:
        kw: dict[str, object] = {}
        if self.creds_file:
            kw["user_credentials"] = self.creds_file
        if self.nkey_seed_file:
            kw["nkeys_seed"] = self.nkey_seed_file
        if self.user:
            kw["user"], kw["password"] = self.user, self.password or ""
        if self.token:
            kw["token"] = self.token
        if (ctx := self.tls_context()) is not None:
            kw["tls"] = ctx
        return kw


class ConnectError(RuntimeError):
    pass


async def connect(urls: str, name: str, security: Security, give_up_after_s: float,
                  on_event: Callable[[str], Awaitable[None]] | None = None) -> Client:
    async def _cb(event: str) -> None:
        log.warning(f"broker_{event}")
        if on_event:
            await on_event(event)

    async def disconnected() -> None:
        await _cb("disconnected")

    async def reconnected() -> None:
        await _cb("reconnected")

    async def closed() -> None:
        await _cb("closed")

    async def error(e: Exception) -> None:
        log.warning("broker_error", error=repr(e))

    servers = [u.strip() for u in urls.split(",") if u.strip()]
    try:
        async for attempt in AsyncRetrying(
            stop=stop_after_delay(give_up_after_s),
            wait=wait_exponential(multiplier=0.2, max=5.0),
            retry=retry_if_exception_type((OSError, TimeoutError, nats.errors.NoServersError)),
            reraise=True,
        ):
            with attempt:
                return await nats.connect(
                    servers=servers, name=name, connect_timeout=2,
                    allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                    ping_interval=5, max_outstanding_pings=3,
                    disconnected_cb=disconnected, reconnected_cb=reconnected,
                    closed_cb=closed, error_cb=error, **security.connect_kwargs(),
                )
    except Exception as e:
        raise ConnectError(f"cannot connect to {len(servers)} server(s) "
                           f"within {give_up_after_s:.0f}s: {e!r}") from e
    raise ConnectError("unreachable")
