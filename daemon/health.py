"""HTTP /health and /metrics on a loopback port."""

from __future__ import annotations

from typing import Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from daemon.log import get_logger
from daemon.metrics import Metrics

log = get_logger(__name__)


class HealthServer:
    """``check()`` returns (healthy, reasons); /health answers 200 or 503 with them."""

    def __init__(self, host: str, port: int, metrics: Metrics,
                 check: Callable[[], tuple[bool, list[str]]]) -> None:
        self.host = host
        self.port = port
        self.metrics = metrics
        self.check = check
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        sockets = site._server.sockets if site._server else []  # the bound port when 0 was asked
        if sockets:
            self.port = sockets[0].getsockname()[1]
        log.info("health server listening", url=f"http://{self.host}:{self.port}/health")

    async def _health(self, _: web.Request) -> web.Response:
        ok, reasons = self.check()
        return web.json_response(
            {"status": "ok" if ok else "unavailable", "reasons": reasons}, status=200 if ok else 503
        )

    async def _metrics(self, _: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
