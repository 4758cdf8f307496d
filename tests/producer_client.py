"""A producer for tests: request/reply with the daemon and a recorder of its events."""

from __future__ import annotations

import asyncio
import json
import time

import nats


class Client:
    """A producer: request/reply helper plus a recorder of every event."""

    def __init__(self, nc) -> None:
        self.nc = nc
        self.events: list[dict] = []
        self.errors: list[dict] = []

    @classmethod
    async def connect(cls, url: str) -> "Client":
        client = cls(await nats.connect(url))
        await client.nc.subscribe("lipsync.events.>", cb=client._on_event)
        await client.nc.subscribe("lipsync.errors", cb=client._on_error)
        await client.nc.flush()
        return client

    async def _on_event(self, msg) -> None:
        self.events.append(json.loads(msg.data))

    async def _on_error(self, msg) -> None:
        self.errors.append(json.loads(msg.data))

    async def request(self, subject: str, body, timeout: float = 20.0) -> dict:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        deadline = time.monotonic() + 5
        while True:
            try:
                msg = await self.nc.request(subject, data, timeout=timeout)
                return json.loads(msg.data)
            except nats.errors.NoRespondersError:
                # Seen once on a loaded 2-core box right after a daemon start; a producer
                # retries the same way while a daemon (re)starts.
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)

    async def wait_event(self, sid: str, type_: str, timeout: float = 10.0, **match) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for ev in self.events:
                if ev.get("session_id") == sid and ev.get("type") == type_ and all(
                    ev.get(k) == v for k, v in match.items()
                ):
                    return ev
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {type_} event for {sid} ({match}); got {self.events[-5:]}")

    def events_of(self, sid: str, type_: str | None = None) -> list[dict]:
        return [e for e in self.events if e.get("session_id") == sid and (type_ is None or e["type"] == type_)]
