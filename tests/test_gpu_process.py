"""The model in its own process (``daemon.gpu_process = true``): the daemon's edge and
a real ``python -m daemon.gpu_server`` child on the CPU with tiny random weights, talking
through shared-memory rings; the recording decoded and checked; the server killed
mid-utterance (SIGKILL) and restarted under a session that keeps playing."""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from daemon.app import Daemon
from daemon.config import Settings
from daemon.producer import read_wav_mono16, stream_pcm
from tests.conftest import until as _until
from tests.media import decode_audio, decode_video_frames
from tests.test_speech import FPS, RATE, SPEECH, idle_video, speech_settings, start, tiny_models  # noqa: F401


@pytest.fixture
async def split_daemon(nats_server, tmp_path, tiny_models, idle_video):
    base = speech_settings(nats_server, tmp_path, tiny_models, idle_video)
    settings = Settings.model_validate({**base.model_dump(), "daemon": {**base.daemon.model_dump(), "gpu_process": True}})
    d = Daemon(settings)
    await d.start()
    yield d
    await d.shutdown()


async def test_a_session_speaks_through_the_gpu_server_process(split_daemon, client):
    host = split_daemon.engine_host
    assert type(host).__name__ == "GpuServerHost" and host.alive()
    assert host.pid is not None and host.pid != os.getpid()
    reply = await start(client, "remote")
    session = split_daemon.sessions["remote"]
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    await stream_pcm(client.nc, "lipsync", "remote", pcm, rate, realtime=True, chunk_ms=40)
    await client.nc.publish("lipsync.control.remote", json.dumps({"op": "flush"}).encode())
    finished = await client.wait_event("remote", "playback_finished", timeout=40)
    assert finished["interrupted"] is False
    counts = session.speech.stats()["counts"]
    assert counts["speech"] + counts["fallback"] == math.ceil(len(pcm) * FPS / rate), counts
    assert counts["speech"] >= 5, counts  # generated in the other process, in time
    # The server's status record carries its budget and the terms it is made of.
    budget_s, parts = host.processing_budget()
    assert parts["sessions"] >= 1 and parts["bucket"] >= 1 and parts["step_ms"] > 0
    assert budget_s * 1000 == pytest.approx(
        parts["round_interval_ms"] + parts["round_ms"] + 2 * parts["step_ms"] + parts["margin_ms"]
        + parts["queue_ms"])
    info = await host.refresh_info()
    # Every frame that needed the model and was shown generated was made by the server.
    assert info["frames_generated"] >= counts["needed"] - counts["fallback"], (info, counts)
    assert info["gpu_process"]["restarts"] == 0 and info["device"] == "cpu"
    # The server process holds the GIL hand-off to the configured bound, as the edge does
    # (Python's own default is 5 ms).
    assert info["gpu_process"]["gil_switch_ms"] == split_daemon.settings.daemon.gil_switch_ms != 5.0
    # ... and keeps what its start made out of later full collections (daemon.gc_freeze).
    assert split_daemon.settings.daemon.gc_freeze and info["gpu_process"]["gc_frozen"] > 10000
    # /metrics: the steps' histograms come from the server's process, once each family.
    import aiohttp

    http = split_daemon.settings.http
    async with aiohttp.ClientSession() as web:
        async with web.get(f"http://{http.host}:{http.port}/metrics") as resp:
            text = await resp.text()
    steps = [ln for ln in text.splitlines() if ln.startswith("lipsync_gpu_step_seconds_count")]
    assert len(steps) == 1 and float(steps[0].split()[-1]) >= 1, steps
    assert text.count("# TYPE lipsync_gpu_step_seconds histogram") == 1
    assert "lipsync_gpu_server_up 1.0" in text
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "remote"})
    await client.wait_event("remote", "stopped")

    # The boxes came back through the ring and were written into the idle frames: the
    # recording's mouth region changes where speech frames were shown, A/V lengths agree.
    frames, fps = decode_video_frames(Path(reply["output"]["path"]))
    audio, audio_rate = decode_audio(Path(reply["output"]["path"]))
    assert fps == FPS and abs(len(frames) / FPS - len(audio) / audio_rate) <= 1 / FPS + 1024 / audio_rate
    avatar = session.speech.avatar
    x1, y1, x2, y2 = avatar.blend_boxes[0]
    first = frames[0][y1:y2, x1:x2].astype(np.int16)
    assert max(float(np.abs(f[y1:y2, x1:x2].astype(np.int16) - first).mean()) for f in frames) > 10


async def test_a_killed_gpu_server_is_restarted_while_the_session_keeps_playing(split_daemon, client):
    host = split_daemon.engine_host
    await start(client, "crash")
    session = split_daemon.sessions["crash"]
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    speaking = asyncio.create_task(stream_pcm(client.nc, "lipsync", "crash", pcm, rate, realtime=True, chunk_ms=40))
    await client.wait_event("crash", "speaking", timeout=20)
    await _until(lambda: session.speech.stats()["counts"]["speech"] >= 2, 20, "no generated frame before the kill")
    first_pid = host.pid
    os.kill(first_pid, signal.SIGKILL)
    tick = session.tick
    # The frame clock runs in the edge: frames keep going out while the server is gone.
    await _until(lambda: session.tick >= tick + 5, 5, "the session stopped publishing")
    # Restarting: /livez stays ok (the watchdog must not kill the daemon), /health says why.
    assert split_daemon.liveness()[0] is True
    await _until(lambda: not split_daemon.health_check()[0], 5, "health did not notice")
    assert any("GPU-server process" in r for r in split_daemon.health_check()[1])
    err = await client.wait_event("crash", "error", timeout=10)
    assert err["code"] == "generation_failed" and "GPU server process exited" in err["message"]
    await _until(lambda: host.alive() and host.pid != first_pid, 60, "the GPU server was not restarted")
    assert host.restarts == 1
    assert split_daemon.metrics.gpu_server_restarts._value.get() == 1
    await speaking
    await client.nc.publish("lipsync.control.crash", json.dumps({"op": "flush"}).encode())
    await client.wait_event("crash", "playback_finished", timeout=40)
    # The next utterance generates again, in the new server.
    before = session.speech.stats()["counts"]["speech"]
    await stream_pcm(client.nc, "lipsync", "crash", pcm[: rate * 2], rate, realtime=True, chunk_ms=40,
                     seq_start=100_000)
    await client.nc.publish("lipsync.control.crash", json.dumps({"op": "flush"}).encode())
    await _until(lambda: len(client.events_of("crash", "playback_finished")) >= 2, 40, "no second utterance")
    assert session.speech.stats()["counts"]["speech"] > before
    assert session.loop_alive()
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "crash"})
    await client.wait_event("crash", "stopped")


async def test_a_clear_crosses_to_the_gpu_server_within_a_frame(split_daemon, client):
    host = split_daemon.engine_host
    await start(client, "hush")
    session = split_daemon.sessions["hush"]
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    await stream_pcm(client.nc, "lipsync", "hush", pcm, rate, realtime=False)  # all of it: frames queue up
    await client.wait_event("hush", "speaking", timeout=20)
    await _until(lambda: session.speech.stats()["counts"]["speech"] >= 2, 20, "no generated frame")
    tick = session.tick
    assert (await client.request("lipsync.control.hush", {"op": "clear"}))["ok"]
    ev = await client.wait_event("hush", "playback_finished", timeout=5)
    assert ev["interrupted"] is True and session.tick - tick <= 2
    # The cancel reached the server: it holds no frame of the utterance any more.
    pending = []
    for _ in range(100):
        pending.append((await host.refresh_info())["pending_frames"])
        if pending[-1] == 0:
            break
        await asyncio.sleep(0.02)
    assert pending[-1] == 0, pending
    assert session.tick - tick <= 3, pending  # by the session's own frames (10 fps), not wall time
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "hush"})
    await client.wait_event("hush", "stopped")


def test_exposition_text_splits_by_family():
    from daemon.metrics import families

    text = ("# HELP a_seconds A\n# TYPE a_seconds histogram\na_seconds_bucket{le=\"1\"} 2.0\n"
            "a_seconds_count 2.0\n# HELP b B\n# TYPE b gauge\nb 1.0\n")
    assert families(text, ("a_seconds",), keep=True).splitlines() == [
        "# HELP a_seconds A", "# TYPE a_seconds histogram", 'a_seconds_bucket{le="1"} 2.0', "a_seconds_count 2.0"]
    assert families(text, ("a_seconds",), keep=False) == "# HELP b B\n# TYPE b gauge\nb 1.0\n"


async def test_a_second_session_of_one_video_sends_no_frames_and_releases_balance(split_daemon, client,
                                                                                monkeypatch):
    import daemon.gpu_client as gpu_client

    saves = []
    real_save = np.save
    monkeypatch.setattr(gpu_client.np, "save", lambda path, *a, **k: (saves.append(path), real_save(path, *a, **k)))
    host = split_daemon.engine_host
    await start(client, "one")
    await start(client, "two")
    assert len(saves) == 1  # the second start named the video the server holds
    assert (await host.refresh_info())["avatars"] == 1
    for sid in ("one", "two"):
        await client.request("lipsync.session.stop", {"v": 1, "session_id": sid})
        await client.wait_event(sid, "stopped")
    # Every holder released in the server too: nothing held, the frames dropped with it.
    await _until(lambda: not host._avatar_refs, 5, "the edge still holds the avatar")
    assert (await host.refresh_info())["avatars"] == 0
    assert not list((split_daemon.settings.daemon.state_dir / "gpu-server" / "videos").iterdir())
    await start(client, "three")
    assert len(saves) == 2
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "three"})
    await client.wait_event("three", "stopped")


def _edge_with_a_small_inbox(capacity: int):
    """A ``GpuServerHost`` with a real ring as its inbox (no server: the test reads it)."""
    from daemon.gpu_client import GpuServerHost
    from daemon.metrics import Metrics
    from daemon.shm_ring import Ring

    host = GpuServerHost(Settings(), Metrics())
    host._inbox, host._ready = Ring.create(capacity), True
    host._inbox_records = host._inbox_writer(host._inbox)
    return host


async def test_records_the_inbox_has_no_room_for_wait_in_order_and_none_is_lost():
    from daemon import gpu_wire as wire

    host = _edge_with_a_small_inbox(8192)
    try:
        chunks = [np.full(640, i, dtype=np.float32) for i in range(12)]  # 2.6 kB records: 3 fit
        for i, pcm in enumerate(chunks):
            host._write(wire.AUDIO, *wire.audio(7, 1, pcm))
            if i == 5:
                pcm[:] = -1  # the caller's buffer is reused: what waits is a copy
        assert host.dropped_records == 0 and host.backlogged_records == 9 and host._inbox_records.waiting == 9
        got = []
        deadline = time.monotonic() + 5
        while len(got) < len(chunks):  # the server's side: read what is there, the edge refills
            assert time.monotonic() < deadline, f"{len(got)} of {len(chunks)} records arrived"
            while (record := host._inbox.read()) is not None:
                got.append(record)
            await asyncio.sleep(0.01)
        assert [k for k, _ in got] == [wire.AUDIO] * 12
        for i, (_, payload) in enumerate(got):
            idx, utt, pcm = wire.read_audio(payload)
            assert (idx, utt) == (7, 1) and pcm.shape == (640,) and np.all(pcm == i), i
        records = host._inbox_records
        assert not records.waiting and records.waiting_bytes == 0 and records._timer is None
    finally:
        host._clear_backlog()
        host._inbox.close()


async def test_past_its_bound_the_backlog_drops_and_says_so(monkeypatch, capsys):
    from daemon import gpu_client
    from daemon import gpu_wire as wire

    monkeypatch.setattr(gpu_client, "BACKLOG_BYTES", 6000)
    host = _edge_with_a_small_inbox(8192)
    host._streams["s-3"] = gpu_client._Stream(3, 25, lambda results: None)
    try:
        for i in range(7):  # three fit the ring, two wait (5.1 kB), two are dropped
            host._write(wire.AUDIO, *wire.audio(3, 0, np.zeros(640, dtype=np.float32)))
        assert (host.backlogged_records, host.dropped_records) == (2, 2)
        out = capsys.readouterr()
        logged = out.out + out.err
        assert "records wait in order" in logged and "records are dropped until it reads again" in logged
        assert logged.count("s-3") == 2, logged  # the first wait and the first drop, naming the session
        # Once the server reads again the backlog drains, and says so.
        while host._inbox.read() is not None:
            pass
        await asyncio.sleep(0.05)
        assert not host._inbox_records.waiting and "the GPU server reads again" in "".join(capsys.readouterr())
        host._write(wire.AUDIO, *wire.audio(3, 0, np.zeros(640, dtype=np.float32)))
        assert host.dropped_records == 2  # room again: written
        assert host.device_info()["gpu_process"]["dropped_records"] == 2
        # A server that is gone takes nothing of what waited for it: counted as dropped.
        for _ in range(4):
            host._write(wire.AUDIO, *wire.audio(3, 0, np.zeros(640, dtype=np.float32)))
        assert host._inbox_records.waiting == 2
        host._clear_backlog()
        assert host.dropped_records == 4 + 2 and not host._inbox_records.waiting and host._inbox_records._timer is None
    finally:
        host._inbox.close()


async def test_a_paused_gpu_server_loses_no_audio_record(nats_server, tmp_path, tiny_models, idle_video, client,
                                                          monkeypatch):
    """The server process stopped (SIGSTOP) for longer than its inbox holds (here 32 kB,
    half a second of audio): the edge keeps the records in order and hands them over
    when the server runs again; none is dropped and the session speaks on."""
    from daemon import gpu_client

    monkeypatch.setattr(gpu_client, "INBOX_BYTES", 32 * 1024)
    base = speech_settings(nats_server, tmp_path, tiny_models, idle_video)
    d = Daemon(Settings.model_validate({**base.model_dump(), "daemon": {**base.daemon.model_dump(), "gpu_process": True}}))
    await d.start()
    try:
        host = d.engine_host
        assert host._inbox.capacity == 32 * 1024
        await start(client, "pause")
        session = d.sessions["pause"]
        pcm, rate = read_wav_mono16(SPEECH, RATE)
        speaking = asyncio.create_task(stream_pcm(client.nc, "lipsync", "pause", pcm, rate, realtime=True,
                                                  chunk_ms=40))
        await _until(lambda: session.speech.stats()["counts"]["speech"] >= 2, 20, "no generated frame before the pause")
        os.kill(host.pid, signal.SIGSTOP)
        try:
            await _until(lambda: host._inbox_records.waiting >= 10, 10, "the inbox did not fill")
            assert host.dropped_records == 0
        finally:
            os.kill(host.pid, signal.SIGCONT)
        await _until(lambda: not host._inbox_records.waiting, 20, "the backlog was not handed over")
        # The server saw its inbox nearly full and its loop held up by the pause.
        await _until(lambda: (host.device_info()["gpu_process"]["inbox_used_max"] or 0) > host._inbox.capacity // 2,
                     10, "the server did not report its inbox's fill")
        assert host.device_info()["gpu_process"]["loop_lag_ms_max"] >= 100
        await speaking
        await client.nc.publish("lipsync.control.pause", json.dumps({"op": "flush"}).encode())
        await client.wait_event("pause", "playback_finished", timeout=60)
        assert host.dropped_records == 0 and host.backlogged_records >= 10
        counts = session.speech.stats()["counts"]
        assert counts["speech"] + counts["fallback"] == math.ceil(len(pcm) * FPS / rate), counts
        assert session.loop_alive() and host.alive() and host.restarts == 0
    finally:
        await d.shutdown()
