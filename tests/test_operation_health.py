"""Liveness apart from readiness apart from everything: one session's output down must not
stop the systemd watchdog (a restart would kill every session on the GPU) nor fail
/livez; that session ends itself after output.unhealthy_budget_s; /readyz follows NATS,
draining and capacity."""

from __future__ import annotations

import asyncio
import os
import socket
import tempfile
import time
from pathlib import Path

import aiohttp
import pytest

from daemon.app import Daemon
from tests.test_daemon import color_video, make_settings, start_body  # noqa: F401 (fixture)
from tests.test_publishers import FakeConnector

LIVEKIT = {"url": "wss://lk.example.test", "api_key": "devkey",
           "api_secret": "a-secret-long-enough-for-hs256-0123456789", "reconnect_max_backoff_s": 0.2}


async def get(port: int, path: str) -> tuple[int, dict]:
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}{path}") as resp:
            return resp.status, await resp.json()


@pytest.fixture
def notify_socket(monkeypatch):
    """A unix datagram socket where sd_notify messages land (what systemd listens on);
    a short path: unix socket paths are limited to ~108 bytes."""
    folder = tempfile.mkdtemp(prefix="lsn", dir="/tmp")
    path = os.path.join(folder, "n.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.setblocking(False)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # a ping every 0.2 s
    yield sock
    sock.close()
    os.unlink(path)
    os.rmdir(folder)


async def next_watchdog(sock: socket.socket, timeout: float = 2.0) -> float:
    """Wait for the next WATCHDOG=1 (other notifications skipped); its arrival time."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(timeout):
        while True:
            data = await loop.sock_recv(sock, 4096)
            if b"WATCHDOG=1" in data.split(b"\n"):
                return time.monotonic()


async def livekit_daemon(nats_server, tmp_path: Path, video: Path, client, budget_s: float):
    connector = FakeConnector()
    settings = make_settings(nats_server, tmp_path, video, livekit=LIVEKIT,
                             output={"unhealthy_budget_s": budget_s})
    d = Daemon(settings, room_connector=connector)
    await d.start()
    reply = await client.request("lipsync.session.start", start_body("lk", livekit={"room": "r1"}))
    assert reply["ok"], reply
    return d, connector


def discard_pending(sock: socket.socket) -> None:
    """Drop the notifications already queued: only pings sent from now on count."""
    while True:
        try:
            sock.recv(4096)
        except BlockingIOError:
            return


def take_room_down(connector: FakeConnector) -> None:
    """The room drops and every reconnect fails: the session's output stays down."""
    connector.fail_next = 10**6
    connector.rooms[0].drop()


async def test_watchdog_and_livez_go_on_while_a_session_output_is_down(
        nats_server, tmp_path, color_video, client, notify_socket):  # noqa: F811
    d, connector = await livekit_daemon(nats_server, tmp_path, color_video, client, budget_s=30)
    port = d.settings.http.port
    try:
        await next_watchdog(notify_socket)
        take_room_down(connector)
        assert not d.sessions["lk"].publisher_healthy
        discard_pending(notify_socket)
        # Pings keep coming, one per heartbeat (0.2 s), for well over a second of outage.
        down_at = time.monotonic()
        pings = [await next_watchdog(notify_socket) for _ in range(7)]
        assert pings[-1] - down_at > 1.0
        assert not d.sessions["lk"].publisher_healthy  # still down: no recovery hid it
        assert d.liveness() == (True, [])
        status, body = await get(port, "/livez")
        assert status == 200 and body == {"status": "ok", "reasons": []}
        status, body = await get(port, "/health")
        assert status == 503 and any("lk: output down" in r for r in body["reasons"])
        status, body = await get(port, "/readyz")  # one session of three: room left
        assert status == 200, body
        assert "lk" in d.sessions and not client.events_of("lk", "stopped")
    finally:
        await d.shutdown()


async def test_livez_fails_when_the_event_loop_stalls(nats_server, tmp_path, color_video, notify_socket):  # noqa: F811
    d = Daemon(make_settings(nats_server, tmp_path, color_video))
    await d.start()
    try:
        await next_watchdog(notify_socket)
        time.sleep(3.2)  # holds the event loop: no heartbeat, no ping
        ok, reasons = d.liveness()
        assert not ok and reasons == ["event loop stalled"]
        discard_pending(notify_socket)  # none sent during the stall; older ones dropped
        await next_watchdog(notify_socket)  # the heartbeat resumes once the loop is free
        assert d.liveness() == (True, [])
    finally:
        await d.shutdown()


async def test_a_session_whose_output_stays_down_ends_itself(nats_server, tmp_path, color_video, client):  # noqa: F811
    d, connector = await livekit_daemon(nats_server, tmp_path, color_video, client, budget_s=0.5)
    try:
        t = time.monotonic()
        take_room_down(connector)
        err = await client.wait_event("lk", "error", code="publisher_failed", timeout=5)
        assert time.monotonic() - t >= 0.5
        assert "output.unhealthy_budget_s = 0.5 s" in err["message"] and "down for" in err["message"]
        stopped = await client.wait_event("lk", "stopped", timeout=5)
        assert stopped["reason"] == "error"
        assert len(client.events_of("lk", "error")) == 1  # reported once
        deadline = time.monotonic() + 5
        while "lk" in d.sessions and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert "lk" not in d.sessions
        assert d.liveness() == (True, []) and d.readiness() == (True, [])
        assert d.health_check() == (True, [])
    finally:
        await d.shutdown()


async def test_a_brief_outage_within_the_budget_leaves_the_session(nats_server, tmp_path, color_video, client):  # noqa: F811
    d, connector = await livekit_daemon(nats_server, tmp_path, color_video, client, budget_s=2.0)
    try:
        connector.fail_next = 2
        connector.rooms[0].drop()
        deadline = time.monotonic() + 5
        while len(connector.rooms) < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert d.sessions["lk"].publisher_healthy
        await asyncio.sleep(2.2)  # past the budget measured from the outage's start
        assert "lk" in d.sessions and not client.events_of("lk", "error")
    finally:
        await d.shutdown()


async def test_readyz_follows_capacity_and_draining(nats_server, tmp_path, color_video, client):  # noqa: F811
    settings = make_settings(nats_server, tmp_path, color_video,
                             daemon={"state_dir": str(tmp_path / "state"), "capacity_fps": 25,
                                     "shutdown_timeout_s": 5})
    d = Daemon(settings)
    await d.start()
    port = d.settings.http.port
    try:
        assert await get(port, "/readyz") == (200, {"status": "ok", "reasons": []})
        assert (await client.request("lipsync.session.start", start_body("f1")))["ok"]
        status, body = await get(port, "/readyz")
        assert status == 503 and len(body["reasons"]) == 1 and "at capacity" in body["reasons"][0]
        assert (await get(port, "/livez"))[0] == 200 and (await get(port, "/health"))[0] == 200
        await client.request("lipsync.session.stop", {"v": 1, "session_id": "f1"})
        assert await get(port, "/readyz") == (200, {"status": "ok", "reasons": []})
        await d.drain()
        status, body = await get(port, "/readyz")
        assert status == 503 and "not accepting sessions (draining)" in body["reasons"]
        assert (await get(port, "/livez"))[0] == 200
    finally:
        await d.shutdown()
