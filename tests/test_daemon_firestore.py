"""Session starts whose avatar comes from Firestore (the real client against the real
emulator on loopback), end to end over NATS."""

from __future__ import annotations

import json
from pathlib import Path

from daemon.app import Daemon
from tests.firestore_emulator import (  # noqa: F401  (fixtures)
    EMULATOR_PROJECT,
    avatars_collection,
    firestore_emulator_host,
)
from tests.producer_client import Client
from tests.test_daemon import make_settings

PROJECT = EMULATOR_PROJECT


async def test_firestore_avatars_over_nats(nats_server, tmp_path: Path, avatars_collection):
    from tests.media import write_color_video

    avatars = avatars_collection

    video = tmp_path / "anna.mp4"
    write_color_video(video, 8)
    avatars.document("anna").set({"idle_video_url": video.as_uri()})
    avatars.document("novideo").set({"name": "no video here"})
    settings = make_settings(nats_server, tmp_path, video, firestore={"project": PROJECT, "timeout_s": 2})
    daemon = Daemon(settings)
    await daemon.start()
    client = await Client.connect(nats_server.url)
    try:
        async def start(avatar: str) -> dict:
            return await client.request("lipsync.session.start", json.dumps(
                {"v": 1, "session_id": f"fs-{avatar}", "avatar_id": avatar}).encode())

        ok = await start("anna")
        assert ok["ok"] and (ok["width"], ok["height"]) == (64, 48)
        missing = await start("ghost")
        assert missing["error"]["code"] == "unknown_avatar"
        assert "ghost" in missing["error"]["message"] and "avatars" in missing["error"]["message"]
        nofield = await start("novideo")
        assert nofield["error"]["code"] == "avatar_without_video"
        assert "idle_video_url" in nofield["error"]["message"]
        assert set(daemon.sessions) == {"fs-anna"}
        assert daemon.sessions["fs-anna"].loop_alive()
    finally:
        await client.nc.close()
        await daemon.shutdown()


async def test_firestore_unreachable_is_a_clear_error(nats_server, tmp_path: Path, monkeypatch):
    from tests.conftest import free_port
    from tests.media import write_color_video

    video = tmp_path / "v.mp4"
    write_color_video(video, 2)
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", f"127.0.0.1:{free_port()}")  # nothing listens
    settings = make_settings(nats_server, tmp_path, video, firestore={"project": PROJECT, "timeout_s": 1})
    daemon = Daemon(settings)
    await daemon.start()
    client = await Client.connect(nats_server.url)
    try:
        reply = await client.request("lipsync.session.start", json.dumps(
            {"v": 1, "session_id": "fs-down", "avatar_id": "anna"}).encode())
        assert reply["error"]["code"] == "firestore_unavailable"
        assert PROJECT in reply["error"]["message"]
        assert not daemon.sessions
    finally:
        await client.nc.close()
        await daemon.shutdown()
