"""NATS goes away and comes back: sessions keep streaming meanwhile, the daemon
reconnects by itself, /health says why it is unhealthy, and events flow again."""

from __future__ import annotations

import asyncio
import json
import time

import nats

from daemon.app import Daemon
from tests.conftest import NatsServerProcess
from tests.media import write_color_video
from tests.test_daemon import make_settings


async def test_sessions_survive_a_nats_outage(tmp_path):
    server = NatsServerProcess(tmp_path / "nats")
    server.start()
    video = tmp_path / "v.mp4"
    write_color_video(video, 10)
    daemon = Daemon(make_settings(server, tmp_path, video))
    await daemon.start()
    try:
        nc = await nats.connect(server.url)
        reply = json.loads((await nc.request("lipsync.session.start", json.dumps(
            {"v": 1, "session_id": "o1", "avatar_id": "colors"}).encode(), timeout=10)).data)
        assert reply["ok"]
        await nc.close()
        session = daemon.sessions["o1"]

        server.stop()
        deadline = time.monotonic() + 5
        while daemon.health_check()[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ok, reasons = daemon.health_check()
        assert not ok and "nats disconnected" in reasons
        tick = session.tick
        await asyncio.sleep(1.0)
        assert session.tick >= tick + 20  # still publishing at 25 fps with NATS away

        server.start()  # same port
        deadline = time.monotonic() + 15
        while not daemon.health_check()[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert daemon.health_check() == (True, [])
        nc = await nats.connect(server.url)
        events: list[dict] = []

        async def on_event(msg):
            events.append(json.loads(msg.data))

        await nc.subscribe("lipsync.events.o1", cb=on_event)
        await nc.flush()
        stop = json.loads((await nc.request("lipsync.session.stop", json.dumps(
            {"v": 1, "session_id": "o1"}).encode(), timeout=10)).data)
        assert stop["ok"]
        deadline = time.monotonic() + 5
        while not events and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert events and events[-1]["type"] == "stopped"
        await nc.close()
    finally:
        await daemon.shutdown()
        server.stop()
