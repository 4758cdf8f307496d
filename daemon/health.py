"""HTTP /livez, /readyz, /health and /metrics on a loopback port.

Three questions, three answers: /livez "is the process worth keeping?" (what systemd's
watchdog also goes by: a restart kills every session on the GPU, so one session's
trouble must never fail it); /readyz "should it get new sessions?" (for a balancer);
/health "is everything well?", every session's output included (for people and alerts).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.log import get_logger
from daemon.metrics import Metrics

log = get_logger(__name__)

Check = Callable[[], tuple[bool, list[str]]]


class HealthServer:
    """Each check returns (ok, reasons); its path answers 200 or 503 with them.
    ``live`` and ``ready`` default to ``check`` when not given. ``details`` adds fields
    to every answer; ``metrics_text`` replaces the registry's text on /metrics (lipsyncd's
    supervisor: its processes merged); ``port_file`` gets the bound port."""

    def __init__(self, host: str, port: int, metrics: Metrics | None, check: Check,
                 live: Check | None = None, ready: Check | None = None,
                 details: Callable[[], dict] | None = None,
                 metrics_text: Callable[[], Awaitable[str]] | None = None, port_file: Path | None = None) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.details = details
        self.metrics_text = metrics_text
        self.port_file = port_file
        self.checks: dict[str, Check] = {"/health": check, "/livez": live or check, "/readyz": ready or check}
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        for path, check in self.checks.items():
            app.router.add_get(path, self._answer(check))
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # the bound port when 0 was asked
        if sockets:
            self.port = sockets[0].getsockname()[1]
        if self.port_file is not None:
            self.port_file.write_text(f"{self.port}\n")
        log.info("health server listening", url=f"http://{self.host}:{self.port}/health",
                 paths=sorted(self.checks))

    def _answer(self, check: Check) -> Callable[[web.Request], Awaitable[web.Response]]:
        async def handler(_: web.Request) -> web.Response:
            ok, reasons = check()
            return web.json_response(
                {"status": "ok" if ok else "unavailable", "reasons": reasons,
                 **(self.details() if self.details is not None else {})}, status=200 if ok else 503
            )

        return handler

    async def _metrics(self, _: web.Request) -> web.Response:
        if self.metrics_text is not None:
            text = await self.metrics_text()
            return web.Response(body=text.encode(), headers={"Content-Type": CONTENT_TYPE_LATEST})
        assert self.metrics is not None
        body = generate_latest(self.metrics.registry)
        if self.metrics.remote is not None:
            # Families the GPU-server process fills: its figures, not this registry's zeros.
            from daemon.metrics import families

            try:
                remote = await asyncio.wait_for(self.metrics.remote(), timeout=2)
            except Exception:  # down or restarting: the families are left out this scrape
                remote = ""
            names = self.metrics.remote_families
            body = (families(body.decode(), names, keep=False) + families(remote, names, keep=True)).encode()
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
