"""A real HTTP server on 127.0.0.1 for the fetch tests, counting requests per path."""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

from aiohttp import web

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@asynccontextmanager
async def counting_server(routes: dict[str, Handler]) -> AsyncIterator[tuple[int, Counter[str]]]:
    """Serves ``routes`` (path -> GET handler); yields (port, hits per request path)."""
    hits: Counter[str] = Counter()

    @web.middleware
    async def count(request, handler):
        hits[request.path] += 1
        return await handler(request)

    app = web.Application(middlewares=[count])
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield site._server.sockets[0].getsockname()[1], hits
    finally:
        await runner.cleanup()
