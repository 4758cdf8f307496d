"""NATS connection: embedded server or configured servers, auth, reconnect forever.

Subjects live here too, so that one prefix setting moves the whole protocol.
"""

from __future__ import annotations

import random
import ssl
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from nats.aio.client import Client as NatsClient

from daemon.config import NatsSection
from daemon.errors import LipsyncError
from daemon.log import get_logger, redact_url, redact_urls_in

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


def reconnect_delay(cfg: NatsSection) -> Callable[[list[Any], dict[str, Any]], tuple[Any, float]]:
    """nats-py's reconnect_to_server_handler: the server tried least so far (the pool in
    turn), after reconnect_time_wait_s plus a random jitter."""

    def choose(servers: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
        server = min(servers, key=lambda s: s.reconnects) if servers else None
        return server, cfg.reconnect_time_wait_s + random.uniform(0, cfg.reconnect_jitter_s)

    return choose


def connect_options(
    cfg: NatsSection,
    servers: list[str],
    callbacks: dict[str, Callable[..., Awaitable[None]]],
    name: str = "lipsyncd",
) -> dict[str, Any]:
    """The keyword arguments of ``nats.Client.connect``: reconnect forever, and a fast
    liveness check. nats-py's default PING every 120 s would leave a frozen server or a
    half-open link unnoticed for minutes while events pile up unsent; here it is given
    up after about ping_interval_s x (max_outstanding_pings + 1)."""
    kwargs: dict[str, Any] = dict(
        servers=servers,
        name=name,
        allow_reconnect=True,
        max_reconnect_attempts=-1,
        reconnect_time_wait=cfg.reconnect_time_wait_s,
        reconnect_to_server_handler=reconnect_delay(cfg),
        ping_interval=cfg.ping_interval_s,
        max_outstanding_pings=cfg.max_outstanding_pings,
        connect_timeout=max(1, int(cfg.connect_timeout_s)),
        # Events published while NATS is away wait here (bytes) until it is back.
        pending_size=8 * 1024 * 1024,
        # Our own events match <prefix>.*.* too: the server need not send them back.
        no_echo=True,
        **callbacks,
        **auth_options(cfg),
    )
    return kwargs


def auth_options(cfg: NatsSection) -> dict[str, Any]:
    """The credentials and TLS keyword arguments of ``nats.Client.connect``, from the
    nats section: the daemon and the ``lipsync`` CLI both connect with these."""
    kwargs: dict[str, Any] = {}
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
    return kwargs


async def connect(
    cfg: NatsSection,
    servers: list[str],
    on_state: Callable[[bool], Awaitable[None] | None] | None = None,
    name: str = "lipsyncd",
) -> NatsClient:
    """Connect, then reconnect forever: sessions keep streaming while NATS is away."""

    nc = NatsClient()
    shown = [redact_url(s) for s in servers]

    async def disconnected() -> None:
        if nc.is_draining or nc.is_closed:
            return  # our own drain/close at shutdown
        log.warning("nats disconnected; reconnecting", servers=shown)
        if on_state:
            await _maybe_await(on_state(False))

    async def reconnected() -> None:
        url = nc.connected_url
        log.info("nats reconnected", server=redact_url(url.geturl()) if url is not None else None)
        if on_state:
            await _maybe_await(on_state(True))

    async def closed() -> None:
        # The client reconnects forever, so this is our own close at shutdown, or a
        # server that refused us for good (auth): either way nothing reconnects now.
        log.info("nats connection closed", servers=shown)
        if on_state:
            await _maybe_await(on_state(False))

    async def error(exc: Exception) -> None:
        # The client reports connection errors here while it retries; one line each.
        log.warning("nats client error", error=redact_urls_in(str(exc)) or type(exc).__name__)

    kwargs = connect_options(cfg, servers, dict(disconnected_cb=disconnected, reconnected_cb=reconnected,
                                                closed_cb=closed, error_cb=error), name=name)
    log.info("connecting to nats", servers=shown)
    try:
        await nc.connect(**kwargs)
    except Exception as exc:
        # nats-py names the server in some of its messages: never with its password.
        raise LipsyncError("nats_unavailable", f"cannot connect to NATS at {', '.join(shown)}: "
                           f"{redact_urls_in(str(exc)) or type(exc).__name__} (check nats.url and "
                           "that the server runs)") from None
    log.info("nats connected", servers=shown)
    return nc


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if value is not None:
        await value
