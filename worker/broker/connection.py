"""The broker connection: credentials, TLS, the first connect with backoff, reconnects after.

The first connect is retried for a bounded time (a worker that starts before its broker
should wait, not crash-loop) unless the server refuses us (credentials, TLS), which no
retry fixes; after that nats-py reconnects on its own while the worker holds its engine
and its in-flight jobs (the worker itself declares the broker lost past a bound). Secrets come
from options or the environment, never from the engine config, and are never logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import nats
import structlog
from nats.aio.client import Client

from worker.config import redact_url

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


# Errors that another attempt with the same settings cannot fix: fail the first connect at
# once (exit 2) rather than retry for the whole give-up period.
_REFUSED = (nats.errors.AuthorizationError, nats.errors.InvalidUserCredentialsError,
            nats.errors.SecureConnRequiredError, nats.errors.SecureConnWantedError,
            ssl.SSLCertVerificationError, FileNotFoundError)


def _refused(e: BaseException) -> bool:
    if isinstance(e, ssl.SSLError) and not isinstance(e, (ssl.SSLEOFError, ssl.SSLZeroReturnError)):
        return True  # a handshake the server or we rejected: certificates, CA, protocol
    return isinstance(e, _REFUSED) or "authorization violation" in str(e).lower()


async def connect(urls: str, name: str, security: Security, give_up_after_s: float,
                  on_event: Callable[[str], Awaitable[None]] | None = None) -> Client:
    """Connect once with backoff for at most `give_up_after_s`; reconnect forever after.

    nats-py retries a first connect forever when reconnects are allowed, so the bound is a
    wall-clock one around it, and a refusal (bad credentials, TLS verification) ends it
    early. Error texts are passed through `redact_url`: a URL may carry a password."""
    connected = False
    refused: asyncio.Future[BaseException] = asyncio.get_running_loop().create_future()

    async def _cb(event: str) -> None:
        log.warning(f"broker_{event}")
        if on_event:
            await on_event(event)

    async def disconnected() -> None:
        if connected:
            await _cb("disconnected")

    async def reconnected() -> None:
        await _cb("reconnected")

    async def closed() -> None:
        if connected:
            await _cb("closed")

    async def error(e: Exception) -> None:
        log.warning("broker_error", error=redact_url(repr(e)))
        if not connected and _refused(e) and not refused.done():
            refused.set_result(e)

    servers = [u.strip() for u in urls.split(",") if u.strip()]
    nc = Client()
    kwargs = dict(servers=servers, name=name, connect_timeout=2,
                  allow_reconnect=True, max_reconnect_attempts=-1, reconnect_time_wait=0.5,
                  ping_interval=5, max_outstanding_pings=3,
                  disconnected_cb=disconnected, reconnected_cb=reconnected,
                  closed_cb=closed, error_cb=error)
    try:
        kwargs.update(security.connect_kwargs())
    except (OSError, ssl.SSLError, ValueError) as e:
        raise ConnectError(f"cannot load TLS files: {e}") from None
    attempt = asyncio.ensure_future(nc.connect(**kwargs))
    done, _ = await asyncio.wait({attempt, refused}, timeout=give_up_after_s,
                                 return_when=asyncio.FIRST_COMPLETED)
    if attempt in done and attempt.exception() is None:
        connected = True
        refused.cancel()
        return nc
    attempt.cancel()
    refused.cancel()
    with contextlib.suppress(BaseException):
        await attempt
    with contextlib.suppress(Exception):
        await nc.close()
    where = f"{len(servers)} server(s) ({redact_url(urls)})"
    if attempt in done:
        why = repr(attempt.exception())
    elif refused.done() and not refused.cancelled():
        raise ConnectError(f"{where} refused the connection: "
                           f"{redact_url(repr(refused.result()))}")
    else:
        why = redact_url(repr(nc.last_error)) if nc.last_error else "timed out"
    raise ConnectError(f"cannot connect to {where} within {give_up_after_s:.0f}s: "
                       f"{redact_url(why)}")
