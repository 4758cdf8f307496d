"""NATS connection: embedded server or configured servers, auth, reconnect forever.

Subjects live here too, so that one prefix setting moves the whole protocol.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from nats.aio.client import Client as NatsClient

from daemon.config import NatsSection
from daemon.log import get_logger

log = get_logger(__name__)


@dataclass(frozen=True)
class Subjects:
    prefix: str

    @property
    def start(self) -> str:
        return f"{self.prefix}.session.start"

    @property
    def stop(self) -> str:
        return f"{self.prefix}.session.stop"

    @property
    def session_wildcard(self) -> str:
        """<prefix>.audio.<sid> and <prefix>.control.<sid> (and the start/stop subjects,
        which the handler ignores)."""
        return f"{self.prefix}.*.*"

    def events(self, session_id: str) -> str:
        return f"{self.prefix}.events.{session_id}"

    def session_of(self, subject: str) -> str:
        """The last token of an audio/control subject: the session id (unvalidated)."""
        return subject.rsplit(".", 1)[-1]


def _tls_context(cfg: NatsSection) -> ssl.SSLContext | None:
    if not (cfg.tls_ca_file or cfg.tls_cert_file):
        return None
    ctx = ssl.create_default_context(cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None)
    if cfg.tls_cert_file:
        ctx.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file) if cfg.tls_key_file else None)
    return ctx


async def connect(
    cfg: NatsSection,
    servers: list[str],
    on_state: Callable[[bool], Awaitable[None] | None] | None = None,
    name: str = "lipsyncd",
) -> NatsClient:
    """Connect, then reconnect forever: sessions keep streaming while NATS is away."""

    nc = NatsClient()

    async def disconnected() -> None:
        if nc.is_draining or nc.is_closed:
            return  # our own drain/close at shutdown
        log.warning("nats disconnected; reconnecting")
        if on_state:
            await _maybe_await(on_state(False))

    async def reconnected() -> None:
        log.info("nats reconnected")
        if on_state:
            await _maybe_await(on_state(True))

    async def error(exc: Exception) -> None:
        # The client reports connection errors here while it retries; one line each.
        log.warning("nats client error", error=str(exc) or type(exc).__name__)

    kwargs: dict[str, Any] = dict(
        servers=servers,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=1,
        connect_timeout=max(1, int(cfg.connect_timeout_s)),
        disconnected_cb=disconnected,
        reconnected_cb=reconnected,
        error_cb=error,
        # Events published while NATS is away wait here (bytes) until it is back.
        pending_size=8 * 1024 * 1024,
        # Our own events match <prefix>.*.* too: the server need not send them back.
        no_echo=True,
    )
    if cfg.user:
        kwargs["user"] = cfg.user
    if cfg.password:
        kwargs["password"] = cfg.password.get_secret_value()
    if cfg.token:
        kwargs["token"] = cfg.token.get_secret_value()
    if cfg.creds_file:
        kwargs["user_credentials"] = str(cfg.creds_file)
    if cfg.nkey_seed_file:
        kwargs["nkeys_seed"] = str(cfg.nkey_seed_file)
    tls = _tls_context(cfg)
    if tls is not None:
        kwargs["tls"] = tls
    await nc.connect(**kwargs)
    log.info("nats connected", servers=[_redact(s) for s in servers])
    return nc


def _redact(url: str) -> str:
    """Drop user:password@ from a URL before it is logged."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if value is not None:
        await value
