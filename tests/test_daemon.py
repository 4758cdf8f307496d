"""The daemon end to end over a real nats-server: sessions, idle video into the local MP4
sink, every bad input answered with its error and harmless to a live session."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import aiohttp
import nats
import numpy as np
import pytest

from daemon.app import Daemon
from daemon.config import Settings
from daemon.session import pingpong_index
from tests.conftest import free_port
from tests.media import decode_video_frames, nearest_palette_index, write_color_video

NUM_SOURCE_FRAMES = 6


@pytest.fixture
def color_video(tmp_path: Path) -> Path:
    path = tmp_path / "idle.mp4"
    write_color_video(path, NUM_SOURCE_FRAMES, size=(64, 48))
    return path


def make_settings(nats_server, tmp_path: Path, color_video: Path, **extra) -> Settings:
    cfg = dict(
        nats={"url": nats_server.url, "subject_prefix": "lipsync"},
        daemon={"state_dir": str(tmp_path / "state"), "max_sessions": 3, "shutdown_timeout_s": 5},
        http={"port": free_port()},
        model={"enabled": False},
        fetch={"allow_file_urls": True},
        avatars={
            "colors": {"idle_video_url": color_video.as_uri()},
            "missing": {"idle_video_url": (tmp_path / "nope.mp4").as_uri()},
            "notvideo": {"idle_video_url": (tmp_path / "bytes.mp4").as_uri()},
        },
    )
    (tmp_path / "bytes.mp4").write_bytes(b"this is not a video" * 100)
    cfg.update(extra)
    return Settings(**cfg)


def start_body(sid: str, **kw) -> dict:
    body = {"v": 1, "session_id": sid, "avatar_id": "colors", "audio": {"sample_rate": 16000}}
    body.update(kw)
    return body


@pytest.fixture
async def daemon(nats_server, tmp_path, color_video):
    d = Daemon(make_settings(nats_server, tmp_path, color_video))
    await d.start()
    yield d
    await d.shutdown()


async def test_idle_session_lands_in_mp4_with_pingpong_frames(daemon, client):
    reply = await client.request("lipsync.session.start", start_body("s1"))
    assert reply["ok"] is True and reply["existing"] is False
    assert (reply["width"], reply["height"], reply["fps"]) == (64, 48, 25)
    path = Path(reply["output"]["path"])
    ready = await client.wait_event("s1", "ready")
    assert ready["output"] == reply["output"]
    assert set(ready["timings_ms"]) >= {"resolve_ms", "video_ms", "publisher_ms", "total_ms"}
    t_ready = time.monotonic()
    await asyncio.sleep(2.0)
    stop = await client.request("lipsync.session.stop", {"v": 1, "session_id": "s1"})
    elapsed = time.monotonic() - t_ready
    assert stop == {"ok": True, "session_id": "s1"}
    stopped = await client.wait_event("s1", "stopped")
    assert stopped["reason"] == "requested"
    assert "s1" not in daemon.sessions

    frames, fps = decode_video_frames(path)
    assert fps == 25
    # Frames published between ready and stop, at 25 fps: within one frame (plus the
    # frame the loop emits at t=0 and the stop round trip).
    assert abs(len(frames) - elapsed * 25) <= 2, (len(frames), elapsed)
    got = [nearest_palette_index(f) for f in frames]
    want = [pingpong_index(i, NUM_SOURCE_FRAMES) for i in range(len(frames))]
    assert got == want


async def test_start_is_idempotent_and_conflicts_are_refused(daemon, client):
    first = await client.request("lipsync.session.start", start_body("same"))
    again = await client.request("lipsync.session.start", start_body("same"))
    assert first["ok"] and again["ok"] and again["existing"] is True
    assert again["output"] == first["output"]
    other = await client.request("lipsync.session.start", start_body("same", audio={"sample_rate": 24000}))
    assert other["ok"] is False and other["error"]["code"] == "session_conflict"
    assert len(client.events_of("same", "ready")) == 1


BAD_STARTS = [
    (b"{not json", "bad_json"),
    (b"[1,2]", "bad_json"),
    (json.dumps({"v": 2, "session_id": "x", "avatar_id": "colors"}).encode(), "unsupported_version"),
    (json.dumps({"session_id": "x", "avatar_id": "colors"}).encode(), "unsupported_version"),
    (json.dumps({"v": 1, "avatar_id": "colors"}).encode(), "invalid_message"),
    (json.dumps({"v": 1, "session_id": "x", "avatar_id": "colors", "extra": 1}).encode(), "invalid_message"),
    (json.dumps({"v": 1, "session_id": "x"}).encode(), "invalid_message"),
    (json.dumps({"v": 1, "session_id": "x", "avatar_id": "colors", "audio": {"sample_rate": 12345}}).encode(),
     "invalid_message"),
    (json.dumps({"v": 1, "session_id": "../etc", "avatar_id": "colors"}).encode(), "invalid_session_id"),
    (json.dumps({"v": 1, "session_id": "a" * 129, "avatar_id": "colors"}).encode(), "invalid_session_id"),
    (json.dumps({"v": 1, "session_id": "x y", "avatar_id": "colors"}).encode(), "invalid_session_id"),
    (json.dumps({"v": 1, "session_id": "x", "avatar_id": "nobody"}).encode(), "unknown_avatar"),
    (json.dumps({"v": 1, "session_id": "x", "avatar_id": "missing"}).encode(), "video_fetch_failed"),
    (json.dumps({"v": 1, "session_id": "x", "avatar_id": "notvideo"}).encode(), "video_invalid"),
    (json.dumps({"v": 1, "session_id": "x", "idle_video_url": "ftp://example/x.mp4"}).encode(), "url_not_allowed"),
]


async def test_bad_starts_get_clear_errors_and_leave_live_session_alone(daemon, client):
    live = await client.request("lipsync.session.start", start_body("live"))
    assert live["ok"]
    frames_before = daemon.sessions["live"].tick
    for body, code in BAD_STARTS:
        reply = await client.request("lipsync.session.start", body)
        assert reply["ok"] is False, body
        assert reply["error"]["code"] == code, (body, reply)
        assert len(reply["error"]["message"]) > 10
    # Errors of failed starts leave nothing behind.
    assert set(daemon.sessions) == {"live"}
    await asyncio.sleep(0.2)
    assert daemon.sessions["live"].tick > frames_before
    assert daemon.sessions["live"].loop_alive()
    # The message names what to change.
    reply = await client.request("lipsync.session.start", json.dumps(
        {"v": 1, "session_id": "x", "avatar_id": "nobody"}).encode())
    assert "nobody" in reply["error"]["message"]


async def test_plain_publish_errors_become_error_events(daemon, client):
    await client.nc.publish("lipsync.session.start", json.dumps(
        {"v": 1, "session_id": "pp", "avatar_id": "nobody"}).encode())
    ev = await client.wait_event("pp", "error")
    assert ev["code"] == "unknown_avatar"
    await client.nc.publish("lipsync.session.start", b"garbage")
    deadline = time.monotonic() + 5
    while not client.errors and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert client.errors and client.errors[0]["code"] == "bad_json"
    # A plain-publish start that works sends ready.
    await client.nc.publish("lipsync.session.start", json.dumps(start_body("pp2")).encode())
    await client.wait_event("pp2", "ready")


async def test_audio_and_control_validation(daemon, client):
    assert (await client.request("lipsync.session.start", start_body("a1")))["ok"]
    nc = client.nc
    # Audio for an unknown session: one error event, not one per chunk.
    for _ in range(5):
        await nc.publish("lipsync.audio.ghost", b"\x00\x00" * 160)
    await client.wait_event("ghost", "error", code="unknown_session")
    await asyncio.sleep(0.2)
    assert len(client.events_of("ghost", "error")) == 1
    # Odd-length PCM.
    await nc.publish("lipsync.audio.a1", b"\x00" * 321)
    ev = await client.wait_event("a1", "error", code="audio_invalid")
    assert "odd" in ev["message"]
    # Bad and duplicate sequence numbers.
    await nc.publish("lipsync.audio.a1", b"\x00\x00" * 160, headers={"Lipsync-Seq": "abc"})
    await client.wait_event("a1", "error", code="audio_invalid")
    await nc.publish("lipsync.audio.a1", b"\x00\x00" * 160, headers={"Lipsync-Seq": "5"})
    await nc.publish("lipsync.audio.a1", b"\x00\x00" * 160, headers={"Lipsync-Seq": "5"})
    await asyncio.sleep(0.2)
    dup = [e for e in client.events_of("a1", "error") if "not above" in e["message"]]
    assert len(dup) == 1
    # A gap in the sequence is filled with silence and counted.
    await nc.publish("lipsync.audio.a1", b"\x00\x00" * 160, headers={"Lipsync-Seq": "8"})
    await nc.flush()
    await asyncio.sleep(0.2)
    assert daemon.sessions["a1"].inbox.gap_messages == 2
    # A jump of over 0.5 s is not padded: the chunk is taken and the producer told.
    await nc.publish("lipsync.audio.a1", b"\x00\x00" * 160, headers={"Lipsync-Seq": "500"})
    ev = await client.wait_event("a1", "error", code="audio_gap")
    assert "8 to 500" in ev["message"]
    assert daemon.sessions["a1"].inbox.gap_messages == 2
    # Control: bad op, bad JSON, unknown session.
    reply = await client.request("lipsync.control.a1", {"op": "dance"})
    assert reply["ok"] is False and reply["error"]["code"] == "invalid_message"
    assert "op" in reply["error"]["message"]
    await nc.publish("lipsync.control.a1", b"nope")
    await client.wait_event("a1", "error", code="bad_json")
    await nc.publish("lipsync.control.nobody", json.dumps({"op": "flush"}).encode())
    await client.wait_event("nobody", "error", code="unknown_session")
    reply = await client.request("lipsync.control.a1", {"op": "flush"})
    assert reply == {"ok": True, "session_id": "a1", "op": "flush"}
    # Stop for an unknown session.
    reply = await client.request("lipsync.session.stop", {"v": 1, "session_id": "nobody"})
    assert reply["ok"] is False and reply["error"]["code"] == "unknown_session"
    assert daemon.sessions["a1"].loop_alive()


async def test_audio_buffer_is_bounded_with_an_error(nats_server, tmp_path, color_video, client):
    settings = make_settings(nats_server, tmp_path, color_video, audio={"max_buffer_s": 1.0})
    d = Daemon(settings)
    await d.start()
    try:
        assert (await client.request("lipsync.session.start", start_body("big")))["ok"]
        chunk = b"\x01\x00" * 8000  # 0.5 s at 16 kHz
        for _ in range(3):
            await client.nc.publish("lipsync.audio.big", chunk)
        ev = await client.wait_event("big", "error", code="audio_buffer_full")
        assert "max_buffer_s" in ev["message"]
        session = d.sessions["big"]
        assert session.inbox.buffered_samples + session.speech.pending_samples() <= 16000
    finally:
        await d.shutdown()


async def test_capacity_status_health_and_metrics(daemon, client):
    for sid in ("c1", "c2", "c3"):
        assert (await client.request("lipsync.session.start", start_body(sid)))["ok"]
    full = await client.request("lipsync.session.start", start_body("c4"))
    assert full["error"]["code"] == "at_capacity"
    status = await client.request("lipsync.status", b"")
    assert status["active"] == 3 and status["capacity"] == 3 and status["accepting"] is True
    assert {s["session_id"] for s in status["sessions"]} == {"c1", "c2", "c3"}
    # nats micro: the service answers $SRV.PING / INFO.
    info = await client.request("$SRV.INFO.lipsync", b"")
    assert info["name"] == "lipsync"
    assert {e["subject"] for e in info["endpoints"]} >= {"lipsync.session.start", "lipsync.status"}
    port = daemon.settings.http.port
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/health") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ok"
        async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
            text = await resp.text()
            assert "lipsync_sessions_active 3.0" in text
            assert 'lipsync_errors_total{code="at_capacity"} 1.0' in text


async def test_health_reports_nats_loss(daemon):
    ok, reasons = daemon.health_check()
    assert ok and reasons == []
    await daemon.nc.close()
    ok, reasons = daemon.health_check()
    assert not ok and "nats disconnected" in reasons


async def test_shutdown_sends_stopped_and_refuses_new_sessions(nats_server, tmp_path, color_video, client):
    d = Daemon(make_settings(nats_server, tmp_path, color_video))
    await d.start()
    assert (await client.request("lipsync.session.start", start_body("z1")))["ok"]
    t = time.monotonic()
    await d.shutdown()
    assert time.monotonic() - t < d.settings.daemon.shutdown_timeout_s
    ev = await client.wait_event("z1", "stopped")
    assert ev["reason"] == "shutdown"
    await d.shutdown()  # twice is fine
    assert not d.sessions


async def test_two_daemons_share_starts_and_only_the_owner_answers(nats_server, tmp_path, color_video, client):
    """One daemon per GPU: starts are spread by the queue group; stop/audio/control reach
    every daemon and only the owner acts (report_unknown_sessions = false)."""
    daemons = []
    for i in range(2):
        (tmp_path / f"d{i}").mkdir(exist_ok=True)
        s = make_settings(nats_server, tmp_path / f"d{i}", color_video, nats={
            "url": nats_server.url, "report_unknown_sessions": False},
            daemon={"state_dir": str(tmp_path / f"d{i}" / "state"), "max_sessions": 12})
        d = Daemon(s)
        await d.start()
        daemons.append(d)
    try:
        # 12 starts: the queue group picks a member at random, so all 12 land on one
        # daemon with probability 2 / 4096; then this test fails, as it must.
        sids = [f"m{i}" for i in range(12)]
        for sid in sids:
            assert (await client.request("lipsync.session.start", start_body(sid)))["ok"]
        owned = [set(d.sessions) for d in daemons]
        assert owned[0] | owned[1] == set(sids) and not owned[0] & owned[1]
        assert owned[0] and owned[1], f"every start landed on one daemon: {owned}"
        for sid in sids:
            reply = await client.request("lipsync.session.stop", {"v": 1, "session_id": sid})
            assert reply == {"ok": True, "session_id": sid}
        await client.nc.publish("lipsync.audio.nobody", b"\x00\x00" * 10)
        await asyncio.sleep(0.3)
        assert not client.events_of("nobody")
    finally:
        for d in daemons:
            await d.shutdown()


async def test_livekit_unreachable_is_a_clear_start_error(nats_server, tmp_path, color_video, client):
    """The real rtc.Room against a closed loopback port: no LiveKit server runs here."""
    from tests.conftest import free_port

    settings = make_settings(nats_server, tmp_path, color_video, livekit={
        "url": f"ws://127.0.0.1:{free_port()}", "api_key": "devkey", "api_secret": "s3cret-value-long-enough-for-hs256-keys",
        "connect_timeout_s": 3})
    d = Daemon(settings)
    await d.start()
    try:
        no_room = await client.request("lipsync.session.start", start_body("lk0"))
        assert no_room["error"]["code"] == "invalid_message" and "room" in no_room["error"]["message"]
        reply = await client.request("lipsync.session.start", start_body("lk1", livekit={"room": "r1"}))
        assert reply["ok"] is False and reply["error"]["code"] == "publisher_failed"
        assert "127.0.0.1" in reply["error"]["message"]
        assert "s3cret-value" not in json.dumps(reply)
        assert not d.sessions
    finally:
        await d.shutdown()


async def test_concurrent_starts_of_one_id_leave_one_session(daemon, client):
    """Three starts for one id in flight at once, the first failing: the next one
    creates the session, the third finds it (idempotent); nothing is orphaned."""
    bodies = [start_body("race", avatar_id="missing"), start_body("race"), start_body("race")]
    replies = await asyncio.gather(*(client.request("lipsync.session.start", b) for b in bodies))
    assert replies[0]["ok"] is False and replies[0]["error"]["code"] == "video_fetch_failed"
    assert replies[1]["ok"] and replies[1]["existing"] is False
    assert replies[2]["ok"] and replies[2]["existing"] is True
    assert list(daemon.sessions) == ["race"]
    assert len(client.events_of("race", "ready")) == 1


async def test_without_a_model_speech_plays_over_the_idle_video(daemon, client, tmp_path):
    """model.enabled = false: the protocol works the same (speaking, playback_finished),
    the audio is published in lockstep with the idle frames."""
    from tests.media import decode_audio

    reply = await client.request("lipsync.session.start", start_body("nm", audio={"sample_rate": 16000}))
    t = np.arange(16000) / 16000
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 300 * t)).astype("<i2")  # 1 s
    for i in range(25):
        await client.nc.publish("lipsync.audio.nm", tone[i * 640:(i + 1) * 640].tobytes(),
                                headers={"Lipsync-Seq": str(i)})
    await client.nc.publish("lipsync.control.nm", b'{"op": "flush"}')
    ev = await client.wait_event("nm", "playback_finished", timeout=10)
    assert ev == {**ev, "interrupted": False, "position_s": 1.0}
    assert client.events_of("nm", "speaking")
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "nm"})
    audio, rate = decode_audio(Path(reply["output"]["path"]))
    loud = np.flatnonzero(np.abs(audio) > 0.1)
    assert rate == 16000 and len(loud)
    assert (loud[-1] - loud[0]) / rate == pytest.approx(1.0, abs=0.05)  # the whole second, once


async def test_livekit_session_and_health_while_the_room_is_down(nats_server, tmp_path, color_video, client):
    """A LiveKit session through the daemon: the room connection is the test double (no
    LiveKit server can run here); sources, tracks and AVSynchronizer are the SDK's.
    While the room is down /health is 503 with the reason, and 200 once reconnected."""
    from tests.test_publishers import FakeConnector

    connector = FakeConnector()
    settings = make_settings(nats_server, tmp_path, color_video, livekit={
        "url": "wss://lk.example.test", "api_key": "devkey",
        "api_secret": "a-secret-long-enough-for-hs256-0123456789", "reconnect_max_backoff_s": 0.3})
    d = Daemon(settings, room_connector=connector)
    await d.start()
    try:
        reply = await client.request("lipsync.session.start", start_body("lk", livekit={"room": "r1"}))
        assert reply["ok"] and reply["output"] == {"kind": "livekit", "room": "r1", "identity": "avatar-lk"}
        await asyncio.sleep(0.3)
        assert d.health_check() == (True, [])
        connector.fail_next = 2
        connector.rooms[0].drop()
        ok, reasons = d.health_check()
        assert not ok and any("lk: output down" in r for r in reasons)
        deadline = time.monotonic() + 10
        while not d.health_check()[0] and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert d.health_check() == (True, []) and len(connector.rooms) == 2
        assert d.sessions["lk"].loop_alive()
    finally:
        await d.shutdown()


async def test_full_daemons_leave_the_start_queue(nats_server, tmp_path, color_video, client):
    """Two daemons of one group, two sessions each: a full daemon stops taking starts,
    so every start lands where there is room, and a fifth is taken by no daemon (the
    request times out; the producer retries later or elsewhere)."""
    daemons = []
    for i in range(2):
        (tmp_path / f"q{i}").mkdir()
        s = make_settings(nats_server, tmp_path / f"q{i}", color_video,
                          nats={"url": nats_server.url, "report_unknown_sessions": False},
                          daemon={"state_dir": str(tmp_path / f"q{i}" / "state"), "max_sessions": 2})
        d = Daemon(s)
        await d.start()
        daemons.append(d)
    try:
        for i in range(4):
            reply = await client.request("lipsync.session.start", start_body(f"cap{i}"))
            assert reply["ok"], reply
        assert sorted(len(d.sessions) for d in daemons) == [2, 2]
        with pytest.raises(nats.errors.TimeoutError):
            await client.nc.request("lipsync.session.start", json.dumps(start_body("cap4")).encode(), timeout=1)
        assert all("cap4" not in d.sessions for d in daemons)
        assert (await client.request("lipsync.session.stop", {"v": 1, "session_id": "cap0"}))["ok"]
        reply = await client.request("lipsync.session.start", start_body("cap4"))
        assert reply["ok"]
    finally:
        for d in daemons:
            await d.shutdown()


async def test_shutdown_drain_lets_the_utterance_finish(nats_server, tmp_path, color_video, client):
    """Shutdown waits (up to daemon.drain_utterances_s) for speaking sessions to finish
    their utterance, then sends `stopped`."""
    d = Daemon(make_settings(nats_server, tmp_path, color_video))
    await d.start()
    await client.request("lipsync.session.start", start_body("dr"))
    tone = (0.3 * 32767 * np.sin(2 * np.pi * 300 * np.arange(16000) / 16000)).astype("<i2")
    await client.nc.publish("lipsync.audio.dr", tone.tobytes())
    await client.nc.publish("lipsync.control.dr", b'{"op": "flush"}')
    await client.nc.flush()
    await asyncio.sleep(0.1)
    assert d.sessions["dr"].speech.speaking
    await d.shutdown()
    await client.wait_event("dr", "stopped")
    types = [e["type"] for e in client.events_of("dr")]
    assert types[-3:] == ["speaking", "playback_finished", "stopped"], types
    assert client.events_of("dr", "playback_finished")[0]["interrupted"] is False


async def test_registry_keeps_one_owner_per_session_id(nats_server, tmp_path, color_video, client):
    """Two daemons sharing a JetStream KV registry (the real one, on the test server):
    a start of a live id that lands on the other daemon is refused, and the id is free
    again once the owner stops it."""
    from schemas import SessionStart

    daemons = []
    for i in range(2):
        (tmp_path / f"r{i}").mkdir()
        s = make_settings(nats_server, tmp_path / f"r{i}", color_video,
                          nats={"url": nats_server.url, "report_unknown_sessions": False,
                                "registry_bucket": "lipsync_sessions_test"},
                          daemon={"state_dir": str(tmp_path / f"r{i}" / "state")})
        d = Daemon(s)
        await d.start()
        daemons.append(d)
    try:
        replies: list[dict] = []

        async def reply(body: bytes) -> None:
            replies.append(json.loads(body))

        start = SessionStart.model_validate(start_body("one"))
        await daemons[0]._start_session(start, reply)  # what the queue group would do
        await daemons[1]._start_session(start, reply)
        assert replies[0]["ok"] is True
        assert replies[1]["error"]["code"] == "session_conflict"
        assert "another daemon" in replies[1]["error"]["message"]
        assert "one" in daemons[0].sessions and "one" not in daemons[1].sessions
        await daemons[0]._close_session(daemons[0].sessions["one"], "requested")
        await daemons[1]._start_session(start, reply)
        assert replies[2]["ok"] is True and "one" in daemons[1].sessions
    finally:
        for d in daemons:
            await d.shutdown()
