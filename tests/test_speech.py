"""Live speech end to end on the CPU: tiny random-weight models written in the real file
formats and loaded through the real loading code, a real nats-server, a producer
streaming a speech WAV at real time, and the recorded MP4 decoded and checked.

The CPU runs the tiny model at about 10 frames/s, so these sessions use 10 fps (the
daemon's default is 25); every rule checked here is stated in frames, not milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from daemon.app import Daemon
from daemon.config import Settings
from daemon.producer import read_wav_mono16, stream_pcm
from daemon.session import pingpong_index
from daemon.speech import SILENCE_DBFS
from tests.conftest import free_port, until
from tests.media import decode_audio, decode_video_frames
from tests.producer_client import Client

SPEECH = Path(__file__).parent / "data" / "speech.wav"
FPS = 10
RATE = 22050


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    from musetalk.weights import write_random_weights

    root = tmp_path_factory.mktemp("models")
    write_random_weights(root, size="tiny")
    # Random face-parsing weights would give random masks: use the landmark mask.
    (root / "face-parse-bisent" / "79999_iter.pth").unlink()
    return root


@pytest.fixture(scope="module")
def idle_video(tmp_path_factory) -> Path:
    from daemon.demo_avatar import make_demo_video

    return make_demo_video(tmp_path_factory.mktemp("idle") / "idle.mp4", seconds=1.2, fps=FPS, size=256)


def speech_settings(nats_server, tmp_path: Path, models: Path, video: Path, **model) -> Settings:
    return Settings(
        nats={"url": nats_server.url},
        daemon={"state_dir": str(tmp_path / "state"), "shutdown_timeout_s": 10},
        http={"port": free_port()},
        fetch={"allow_file_urls": True},
        avatars={"face": {"idle_video_url": video.as_uri()}},
        model={"dir": str(models), "device": "cpu", "landmarks": "opencv", "max_batch": 8,
               "playout_delay_frames": 8, "blend_frames": 2, **model},
    )


@pytest.fixture
async def speech_daemon(nats_server, tmp_path, tiny_models, idle_video):
    d = Daemon(speech_settings(nats_server, tmp_path, tiny_models, idle_video))
    await d.start()
    yield d
    await d.shutdown()


async def start(client: Client, sid: str, fps: int = FPS) -> dict:
    reply = await client.request("lipsync.session.start", {
        "v": 1, "session_id": sid, "avatar_id": "face", "audio": {"sample_rate": RATE},
        "video": {"fps": fps}}, timeout=120)
    assert reply["ok"], reply
    await client.wait_event(sid, "ready")
    return reply


async def test_streamed_speech_is_recorded_in_sync(speech_daemon, client):
    reply = await start(client, "talk")
    session = speech_daemon.sessions["talk"]
    avatar = session.speech.avatar
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    await asyncio.sleep(0.5)
    await stream_pcm(client.nc, "lipsync", "talk", pcm, rate, realtime=True, chunk_ms=40)
    await client.nc.publish("lipsync.control.talk", json.dumps({"op": "flush"}).encode())
    finished = await client.wait_event("talk", "playback_finished", timeout=30)
    assert finished["interrupted"] is False
    assert finished["position_s"] == pytest.approx(math.ceil(len(pcm) * FPS / rate) / FPS)
    await asyncio.sleep(0.3)
    stats = session.speech.stats()
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "talk"})
    await client.wait_event("talk", "stopped")
    types = [e["type"] for e in client.events_of("talk")]
    assert types == ["ready", "speaking", "playback_finished", "stopped"], types

    # Every frame of the utterance was played: generated in time, or (when this shared
    # CPU was too slow) the idle frame of that tick. Speed is a benchmark matter.
    counts = stats["counts"]
    assert counts["speech"] + counts["fallback"] == math.ceil(len(pcm) * FPS / rate), stats
    assert counts["speech"] >= 5, stats
    assert stats["latency_ms"]["n"] > 0 and stats["latency_ms"]["p50"] > 0

    frames, fps = decode_video_frames(Path(reply["output"]["path"]))
    audio, audio_rate = decode_audio(Path(reply["output"]["path"]))
    assert fps == FPS and audio_rate == RATE
    # Audio and video tracks have the same length within one frame.
    assert abs(len(frames) / FPS - len(audio) / audio_rate) <= 1 / FPS + 1024 / audio_rate

    # Speech frames differ from the idle frame of the same tick only inside the blend box:
    # outside it they differ no more than idle frames do (re-encoding noise).
    idle = avatar.frames
    outside, inside_max, inside_mean = {}, 0.0, {}
    for tick, frame in enumerate(frames):
        ref = idle[pingpong_index(tick, len(idle))].astype(np.int16)
        diff = np.abs(frame.astype(np.int16) - ref).mean(axis=2)
        x1, y1, x2, y2 = avatar.blend_boxes[pingpong_index(tick, len(idle))]
        inside = diff[y1:y2, x1:x2].copy()
        # H.264 codes 16x16 macroblocks: a changed mouth touches the blocks it straddles.
        m = 16
        diff[max(0, y1 - m):y2 + m, max(0, x1 - m):x2 + m] = 0
        outside[tick] = float(np.percentile(diff, 99.5))
        inside_max = max(inside_max, float(inside.max()))
        inside_mean[tick] = float(inside.mean())
    # The first ticks are idle for sure (no audio was sent yet): their difference is the
    # re-encoding noise; a frame whose mouth differs clearly more was generated.
    noise = max(inside_mean[t] for t in range(8))
    changed = [t for t, v in inside_mean.items() if v > noise + 1.0]
    assert inside_max > 40 and changed, inside_max
    unchanged = [v for t, v in outside.items() if t not in changed]
    assert max(outside[t] for t in changed) <= max(unchanged) + 3.0, (outside, changed)

    # Per-frame audio level at the sink, as the pipeline gates the mouth.
    spf = audio_rate // FPS
    levels = [20 * math.log10(max(1e-9, float(np.sqrt(np.mean(audio[i * spf:(i + 1) * spf] ** 2)))))
              for i in range(len(audio) // spf)]
    voiced = [i for i, db in enumerate(levels) if db > SILENCE_DBFS]
    # A/V offset at the sink: the first changed mouth vs the first voiced audio frame,
    # at most one frame apart (the lips may lead by one frame).
    assert abs(changed[0] - voiced[0]) <= 1, (changed, voiced)
    # ...and the mouth is back to idle within 2 frames after the voice ends.
    assert changed[-1] <= voiced[-1] + 2, (changed, voiced)


async def _ticks_past(session, tick: int, timeout: float = 10.0) -> None:
    """Until the session's frame clock has published ``tick``."""
    deadline = time.monotonic() + timeout
    while session.tick <= tick:
        assert time.monotonic() < deadline, f"the frame loop stopped at tick {session.tick}"
        await asyncio.sleep(0.01)


async def test_clear_interrupts_within_a_frame(speech_daemon, client):
    """A clear ends the utterance by the next frames: the event says so, the worker holds
    nothing for it, and the recording has voice before the clear and silence from two
    frames after it until the next utterance."""
    reply = await start(client, "cut")
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    session = speech_daemon.sessions["cut"]
    await stream_pcm(client.nc, "lipsync", "cut", pcm, rate, realtime=True, chunk_ms=40)
    await client.wait_event("cut", "speaking", timeout=20)
    await _ticks_past(session, session.tick + 8)
    tick = session.tick
    reply_clear = await client.request("lipsync.control.cut", {"op": "clear"})
    assert reply_clear["ok"]
    cleared_at = session.tick
    ev = await client.wait_event("cut", "playback_finished", timeout=5)
    assert ev["interrupted"] is True and ev["position_s"] > 0
    assert cleared_at - tick <= 2  # frames of the session's own clock, not wall time
    assert not session.speech.speaking
    idle_before = session.frame_counts.get("idle", 0)
    await _ticks_past(session, cleared_at + 4)
    assert session.frame_counts.get("idle", 0) >= idle_before + 2
    assert speech_daemon.engine_host.device_info()["pending_frames"] == 0
    # The session is still usable: a new utterance plays to its end.
    next_from = session.tick
    await stream_pcm(client.nc, "lipsync", "cut", pcm[: rate // 2], rate, realtime=False, seq_start=10_000)
    await client.nc.publish("lipsync.control.cut", json.dumps({"op": "flush"}).encode())
    deadline = time.monotonic() + 20
    done: list[dict] = []
    while time.monotonic() < deadline and not done:
        done = [e for e in client.events_of("cut", "playback_finished") if not e["interrupted"]]
        await asyncio.sleep(0.05)
    assert done and done[0]["position_s"] == pytest.approx(math.ceil(rate // 2 * FPS / rate) / FPS)
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "cut"})
    await client.wait_event("cut", "stopped")

    # The recording: one frame of audio per tick from tick 0 (a frame of slack each side
    # for the encoder's priming).
    audio, audio_rate = decode_audio(Path(reply["output"]["path"]))
    spf = audio_rate // FPS

    def level(frames: range) -> float:
        part = audio[frames.start * spf:frames.stop * spf]
        return 20 * math.log10(max(1e-9, float(np.sqrt(np.mean(part ** 2)))))

    assert level(range(tick - 6, tick)) > SILENCE_DBFS  # speech was playing
    assert level(range(cleared_at + 3, next_from)) < -60  # silence after the clear
    assert level(range(next_from, len(audio) // spf)) > SILENCE_DBFS  # the next utterance played


@pytest.mark.parametrize("fault", ["illegal-access", "out-of-memory"])
async def test_failing_generation_step_shows_idle_and_reports(speech_daemon, client, fault):
    """A step raising (a CUDA fault, or CUDA running out of memory: torch's own
    exception type, raised here on the CPU): idle frames, one error event, the session
    and the worker go on."""
    await start(client, "boom")
    host = speech_daemon.engine_host
    # The utterance plays 3 s after it arrives: on a loaded runner its frames would
    # otherwise be dropped as too late before any step is tried (and nothing fails).
    speech_daemon.sessions["boom"].speech.delay_frames = 3 * FPS

    def broken(jobs):
        if fault == "out-of-memory":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        raise RuntimeError("CUDA error: an illegal memory access (injected)")

    host.worker.step_fn = broken
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    await stream_pcm(client.nc, "lipsync", "boom", pcm[: rate], rate, realtime=False)
    await client.nc.publish("lipsync.control.boom", json.dumps({"op": "flush"}).encode())
    err = await client.wait_event("boom", "error", timeout=20)
    assert err["code"] == "generation_failed" and "injected" in err["message"]
    await client.wait_event("boom", "playback_finished", timeout=20)
    session = speech_daemon.sessions["boom"]
    counts = session.speech.stats()["counts"]
    assert counts["speech"] == 0 and counts["fallback"] > 0
    assert session.loop_alive()
    # One error event for the utterance, not one per frame.
    assert len(client.events_of("boom", "error")) == 1
    host.worker.step_fn = None
    assert host.alive()


async def test_two_sessions_speak_at_once_and_share_steps(speech_daemon, client):
    """Two live sessions, speaking together: their frames go through shared batched
    steps (the scheduler mixes sessions), and each plays its own utterance to the end."""
    for sid in ("duo1", "duo2"):
        await start(client, sid)
    host = speech_daemon.engine_host
    seen_sessions: list[int] = []
    real_next = host.worker.scheduler.next_batch

    def recording_next(max_batch, **options):
        batch = real_next(max_batch, **options)
        if batch:
            seen_sessions.append(len({p.session_id for p in batch}))
        return batch

    host.worker.scheduler.next_batch = recording_next
    try:
        pcm, rate = read_wav_mono16(SPEECH, RATE)
        half = pcm[: int(rate * 1.5)]
        await asyncio.gather(*(stream_pcm(client.nc, "lipsync", sid, half, rate, realtime=True)
                               for sid in ("duo1", "duo2")))
        for sid in ("duo1", "duo2"):
            await client.nc.publish(f"lipsync.control.{sid}", json.dumps({"op": "flush"}).encode())
        for sid in ("duo1", "duo2"):
            ev = await client.wait_event(sid, "playback_finished", timeout=30)
            assert ev["interrupted"] is False
            assert ev["position_s"] == pytest.approx(math.ceil(len(half) * FPS / rate) / FPS)
            assert speech_daemon.sessions[sid].speech.counts["speech"] > 0
    finally:
        del host.worker.scheduler.next_batch
    assert max(seen_sessions) == 2, seen_sessions  # at least one step served both sessions


async def test_idle_video_without_a_face_is_refused_clearly(nats_server, tmp_path, tiny_models, client):
    from tests.media import write_color_video

    faceless = tmp_path / "colors.mp4"
    write_color_video(faceless, 10, size=(128, 96))
    settings = speech_settings(nats_server, tmp_path, tiny_models, faceless)
    d = Daemon(settings)
    await d.start()
    try:
        reply = await client.request("lipsync.session.start", {
            "v": 1, "session_id": "noface", "avatar_id": "face", "audio": {"sample_rate": RATE}}, timeout=60)
        assert reply["ok"] is False and reply["error"]["code"] == "avatar_preparation_failed"
        assert "no face" in reply["error"]["message"]
        assert not d.sessions and d.engine_host.device_info()["avatars"] == 0
    finally:
        await d.shutdown()


async def test_clear_then_stop_still_reports_the_interruption(speech_daemon, client):
    await start(client, "cs")
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    await stream_pcm(client.nc, "lipsync", "cs", pcm[: rate], rate, realtime=False)
    await client.wait_event("cs", "speaking", timeout=20)
    # Back to back on one connection: the clear's event must not be lost to the stop.
    await client.nc.publish("lipsync.control.cs", json.dumps({"op": "clear"}).encode())
    await client.nc.publish("lipsync.session.stop", json.dumps({"v": 1, "session_id": "cs"}).encode())
    await client.wait_event("cs", "stopped", timeout=10)
    types = [e["type"] for e in client.events_of("cs")]
    assert types[-2:] == ["playback_finished", "stopped"], types
    assert client.events_of("cs", "playback_finished")[0]["interrupted"] is True


async def test_concurrent_sessions_of_one_avatar_share_one_preparation(speech_daemon, client):
    host = speech_daemon.engine_host
    registered: list[str] = []
    real_register = host.engine.register_avatar

    def counting_register(avatar, **kw):
        registered.append(avatar.key)
        return real_register(avatar, **kw)

    host.engine.register_avatar = counting_register
    try:
        await asyncio.gather(start(client, "sh1"), start(client, "sh2"))
        assert len(registered) == 1  # one preparation and registration for both
        key = speech_daemon.sessions["sh1"].speech.avatar.key
        assert speech_daemon.sessions["sh2"].speech.avatar.key == key
        assert host._avatar_refs[key] == 2
        await client.request("lipsync.session.stop", {"v": 1, "session_id": "sh1"})
        assert host._avatar_refs[key] == 1 and host.device_info()["avatars"] == 1
        await client.request("lipsync.session.stop", {"v": 1, "session_id": "sh2"})
        assert key not in host._avatar_refs and host.device_info()["avatars"] == 0
        assert not host.engine.has_avatar(key)
    finally:
        del host.engine.register_avatar


async def _one_chunk_utterance(client: Client, speech, sid: str):
    """Send one 40 ms chunk of voice (no flush) and wait for its utterance to be placed."""
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    chunk = pcm[rate // 2: rate // 2 + rate * 40 // 1000]
    await stream_pcm(client.nc, "lipsync", sid, chunk, rate, realtime=False, chunk_ms=40)
    for _ in range(100):
        if speech.utterances:
            break
        await asyncio.sleep(0.02)
    return chunk, speech.utterances[0]


async def test_the_first_sample_plays_at_its_due_time_not_at_the_next_tick(nats_server, tmp_path, tiny_models,
                                                                           idle_video, client):
    """Without a fixed playout delay an utterance is placed by its audio context and the
    processing budget: it starts at the tick before that moment with the difference as
    leading silence, so its first sample plays at the due time exactly (not up to a frame
    later), and the mouth is generated from the same padded audio."""
    d = Daemon(speech_settings(nats_server, tmp_path, tiny_models, idle_video, playout_delay_frames=None))
    await d.start()
    try:
        await start(client, "lead")
        speech = d.sessions["lead"].speech
        chunk, utt = await _one_chunk_utterance(client, speech, "lead")
        placement = speech.last_placement
        lead, arrived, _ = utt.arrivals[0]  # the first chunk's first sample: after the lead
        assert 0 <= lead < RATE // FPS and lead / RATE * 1000 == pytest.approx(placement["lead_ms"], abs=0.1)
        assert not utt.audio.slice(0, lead).any()
        assert np.array_equal(utt.audio.slice(lead, lead + len(chunk)), chunk)
        plays_at = d.sessions["lead"].tick_time(utt.start_tick) + lead / RATE
        due = (placement["context_ms"] + placement["budget_ms"]) / 1000
        assert plays_at - arrived == pytest.approx(due, abs=2 / RATE + 1e-3)  # ms-rounded figures
        # Positions are the producer's audio, without the lead: speech starts where its
        # first sample plays; the whole 40 ms chunk played (to the end of its last frame).
        speaking = await client.wait_event("lead", "speaking", timeout=30)
        assert speaking["session_position_s"] == pytest.approx(utt.start_tick / FPS + lead / RATE, abs=1e-3)
        finished = await client.wait_event("lead", "playback_finished", timeout=30)  # auto-flush
        frames = math.ceil((lead + len(chunk)) * FPS / RATE)
        assert finished["position_s"] == pytest.approx(frames / FPS - lead / RATE, abs=1e-3)
    finally:
        await d.shutdown()


async def test_on_a_livekit_sink_speech_starts_on_a_tick_moved_onto_its_due_time(nats_server, tmp_path, tiny_models,
                                                                                idle_video, client):
    """A sink that keeps each frame's timestamp (the real LiveKit sources, without a room):
    instead of leading silence, the idle tick before the utterance is cut short by the
    distance from its due time to the tick before it, and the clock moves earlier by as
    much. The first sample plays when due, no silence is taken from the frames' budget,
    and the audio stays continuous: every push holds exactly the audio of the interval up
    to the next frame's timestamp."""
    settings = speech_settings(nats_server, tmp_path, tiny_models, idle_video, playout_delay_frames=None)
    settings.output.sink = "livekit-local"
    d = Daemon(settings)
    await d.start()
    try:
        await start(client, "rephase")
        session = d.sessions["rephase"]
        pushes: list[tuple[int, int]] = []  # (audio samples, timestamp_us) of every push
        real_push = session._publisher.push

        async def recorded(frame, audio, timestamp_us=None):
            pushes.append((audio.size, timestamp_us))
            await real_push(frame, audio, timestamp_us=timestamp_us)

        session._publisher.push = recorded
        speech = session.speech
        chunk, utt = await _one_chunk_utterance(client, speech, "rephase")
        placement = speech.last_placement
        # The rephase asked for, exactly (the placement's figure is rounded to 0.1 ms).
        earlier = session._rephase_s
        assert placement["rephase_ms"] == pytest.approx(1000 * earlier, abs=0.05)
        assert placement["lead_ms"] == 0 and utt.lead == 0 and 0 <= earlier < 1 / FPS
        first_sample, arrived, _ = utt.arrivals[0]
        assert first_sample == 0 and np.array_equal(utt.audio.slice(0, len(chunk)), chunk)
        # Its tick once the clock has moved (the idle tick before it is still to come).
        assert session.rephases == 0 and utt.start_tick > session.next_tick
        start_tick, plays_at = utt.start_tick, session.tick_time(utt.start_tick) - earlier
        due = (placement["context_ms"] + placement["budget_ms"]) / 1000
        assert plays_at - arrived == pytest.approx(due, abs=1 / RATE + 1e-3)  # ms-rounded figures
        speaking = await client.wait_event("rephase", "speaking", timeout=30)
        # Applied at an idle tick before the utterance: the clock moved, once.
        assert session.rephases == (1 if earlier else 0)
        assert session.rephased_s == pytest.approx(earlier, abs=1 / RATE + 1e-4)
        assert session.tick_time(start_tick) == pytest.approx(plays_at, abs=1 / RATE + 1e-6)
        # The media timeline runs that much behind tick / fps (where speech started: the
        # lone chunk's last frame waited for more audio, sliding the start, until auto-flush).
        assert speaking["session_position_s"] == pytest.approx(utt.start_tick / FPS - session.rephased_s, abs=1e-3)
        await client.wait_event("rephase", "playback_finished", timeout=30)  # auto-flush
        # Continuous audio: each push carries the audio up to the next frame's timestamp
        # (one interval, the rephased one, shorter than a frame).
        spf = RATE // FPS
        intervals = [(b[1] - a[1]) / 1e6 for a, b in zip(pushes, pushes[1:])]
        assert len(intervals) > 10
        for (samples, _), interval in zip(pushes, intervals):
            assert samples / RATE == pytest.approx(interval, abs=2e-6)
        short = [n for n, _ in pushes if n != spf]
        assert short == ([spf - round(earlier * RATE)] if earlier else []), short
    finally:
        await d.shutdown()


async def test_a_cached_avatar_starts_while_another_is_being_prepared(speech_daemon, client):
    """The second start of an avatar reads the prepared avatar from disk and the decoded
    video kept in memory: it neither decodes again nor waits for a preparation of
    another avatar (here one holding the preparation lock the whole time)."""
    host = speech_daemon.engine_host
    await start(client, "c1")
    assert "avatar_prepare_ms" in speech_daemon.sessions["c1"].info.timings_ms
    decoded = speech_daemon.sessions["c1"].video
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "c1"})
    assert speech_daemon.store.stats()["kept"] == 1
    async with host._prepare_lock:  # another avatar's preparation, as long as it takes
        await asyncio.wait_for(start(client, "c2"), timeout=30)
    again = speech_daemon.sessions["c2"].info.timings_ms
    assert "avatar_cache_ms" in again and "avatar_prepare_ms" not in again
    assert speech_daemon.sessions["c2"].video is decoded  # kept, not decoded again
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "c2"})


async def test_the_partial_last_frame_plays_with_the_mouth_closed(speech_daemon, client):
    """MuseTalk makes floor(seconds * fps) frames; audio reaching into one more frame
    plays it with the avatar's own frame (not a fallback, not a stale mouth)."""
    await start(client, "tail")
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    cut = pcm[: int(rate * 0.8) + rate // (2 * FPS)]  # 8.5 frames of loud speech
    await stream_pcm(client.nc, "lipsync", "tail", cut, rate, realtime=True)
    await client.nc.publish("lipsync.control.tail", json.dumps({"op": "flush"}).encode())
    ev = await client.wait_event("tail", "playback_finished", timeout=30)
    assert ev["position_s"] == ev["utterance_position_s"] == pytest.approx(9 / FPS)  # every sample played
    spoke = client.events_of("tail", "speaking")[0]
    assert spoke["position_s"] == spoke["session_position_s"] > 0 and spoke["utterance_position_s"] == 0
    # Both clocks: it ended 9 frames (or a tick more) after it started on the session clock.
    assert ev["session_position_s"] - spoke["session_position_s"] == pytest.approx(9 / FPS, abs=1.01 / FPS)
    speech = speech_daemon.sessions["tail"].speech
    played = [r for r in speech.frame_records if r.kind in ("speech", "fallback")]
    assert len(played) == 9
    assert played[-1].kind == "speech" and not played[-1].needed and not played[-1].generated
    assert speech.counts["needed"] <= 8  # the 9th frame never needed the model


async def test_a_cpu_picks_a_frame_rate_it_can_sustain(speech_daemon, client):
    """No fps in the start message, a device that cannot make 25 frames/s: the session
    runs at the rate measured at start, and its speech shows a moving mouth."""
    host = speech_daemon.engine_host
    assert host.one_session_fps is not None and host.one_session_fps < 25
    reply = await client.request("lipsync.session.start", {
        "v": 1, "session_id": "auto", "avatar_id": "face", "audio": {"sample_rate": RATE}}, timeout=120)
    assert reply["ok"], reply
    ready = await client.wait_event("auto", "ready")
    assert ready["fps"] == host.default_fps == max(1, int(host.one_session_fps)) < 25
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    await stream_pcm(client.nc, "lipsync", "auto", pcm[: rate * 2], rate, realtime=True)
    await client.nc.publish("lipsync.control.auto", json.dumps({"op": "flush"}).encode())
    await client.wait_event("auto", "playback_finished", timeout=30)
    counts = speech_daemon.sessions["auto"].speech.counts
    assert counts["speech"] > counts["fallback"], counts
    # The per-utterance figure is in the metrics too.
    finished = [s.value for m in speech_daemon.metrics.utterance_generated.collect() for s in m.samples
                if s.name.endswith("_count")]
    assert finished and finished[0] >= 1


def test_an_utterance_that_mostly_fell_back_says_why_once():
    import structlog

    from daemon.metrics import Metrics
    from daemon.speech import SpeechPipeline, Utterance

    class _Session:
        deps = type("Deps", (), {"metrics": Metrics()})()

    class _Host:
        one_session_fps = 6.5

        def device_info(self):
            return {"device": "cpu"}

    p = SpeechPipeline.__new__(SpeechPipeline)
    p.session, p.host, p.fps = _Session(), _Host(), 25
    p.log = structlog.get_logger()
    mostly_idle = Utterance(id=0, start_tick=0, needed=40, fallbacks=31)
    fine = Utterance(id=1, start_tick=0, needed=40, fallbacks=3)
    with structlog.testing.capture_logs() as logs:
        p._report_degraded(mostly_idle)
        p._report_degraded(fine)
    warnings = [e for e in logs if e["log_level"] == "warning"]
    assert len(warnings) == 1
    text = warnings[0]["event"]
    assert "31 of 40" in text and "6.5 frames/s" in text and "25 fps" in text and "video.fps" in text


async def test_a_stalled_loop_restarts_its_clock_instead_of_bursting(speech_daemon, client):
    """The event loop blocked for 0.6 s mid-utterance (6 frames at 10 fps): the frame
    loop restarts its clock at the next tick and goes on at its rate, not with six frames
    at once that run ahead of the audio still waiting to be read (each an underrun)."""
    await start(client, "stall")
    session = speech_daemon.sessions["stall"]
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    await asyncio.sleep(0.3)
    speaking = asyncio.create_task(stream_pcm(client.nc, "lipsync", "stall", pcm, rate, realtime=True, chunk_ms=40))
    await asyncio.sleep(1.2)
    stalled_at = time.time()
    time.sleep(0.6)  # noqa: ASYNC251 - the stall under test: the daemon shares this loop
    await speaking
    await client.nc.publish("lipsync.control.stall", json.dumps({"op": "flush"}).encode())
    finished = await client.wait_event("stall", "playback_finished", timeout=30)
    assert finished["interrupted"] is False
    assert session.clock_restarts == 1
    assert session.speech.counts["underrun"] == 0, session.speech.counts
    after = [r.published_wall for r in session.speech.frame_records if r.published_wall >= stalled_at]
    gaps = np.diff(after)
    # One frame goes out late at once when the loop resumes; every later one keeps the rate.
    assert len(gaps) > 10 and (gaps < 0.5 / FPS).sum() <= 1, np.round(gaps[:12], 3)
    await client.request("lipsync.session.stop", {"v": 1, "session_id": "stall"})
    await client.wait_event("stall", "stopped")


class _LateSteps:
    """The engine's steps with their boxes held back ``delay_s`` after launch (a device
    far behind), installed on the in-process engine for the duration of a ``with``."""

    def __init__(self, engine, delay_s: float) -> None:
        self.engine, self.delay_s, self.launch = engine, delay_s, engine.launch

    def __enter__(self) -> "_LateSteps":
        delay_s, launch = self.delay_s, self.launch

        class Late:
            def __init__(self, inner):
                self.inner, self.until = inner, time.monotonic() + delay_s

            def ready(self) -> bool:
                return time.monotonic() >= self.until and self.inner.ready()

            def boxes(self):
                time.sleep(max(0.0, self.until - time.monotonic()))
                return self.inner.boxes()

            def gpu_seconds(self):
                return self.inner.gpu_seconds()

        self.engine.launch = lambda *args, **kwargs: Late(launch(*args, **kwargs))
        return self

    def __exit__(self, *exc) -> None:
        self.engine.launch = self.launch


async def _speak_one_second(client, session_id: str) -> float:
    """One second of the sample speech in real time, then flush; the wall time its
    playback_finished came."""
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    await stream_pcm(client.nc, "lipsync", session_id, pcm[:rate], rate, realtime=True)
    await client.nc.publish(f"lipsync.control.{session_id}", json.dumps({"op": "flush"}).encode())
    await client.wait_event(session_id, "playback_finished", timeout=30)
    return time.time()


async def test_frames_made_after_their_tick_are_counted_and_how_late(speech_daemon, client):
    """A step whose boxes come back 1.5 s after launch (a device far behind, beyond any
    processing budget the session planned with):
    its frames' ticks go out as fallbacks, and when the boxes come the session records
    each as late, with how long after its tick; the worker counts them as done after
    their deadline. (The loadtest splits its lost frames by these.) At 4 fps, well within
    what a slow 2-core CPU makes (about 6 frames/s for one session; at 10 fps a busy CI
    machine dropped every frame before its step as too late, so none came back late)."""
    await start(client, "slow", fps=4)
    host = speech_daemon.engine_host
    speech = speech_daemon.sessions["slow"].speech
    done_late0 = host.late_frames[1]
    with _LateSteps(host.engine, 1.5):
        await _speak_one_second(client, "slow")
        # The last late boxes come back (a slow CPU: seconds).
        await until(lambda: speech.late_results, 10, lambda: f"no late box came back: {speech.stats()['counts']}")
    late = list(speech.late_results)
    assert late, speech.stats()["counts"]
    assert all(0.0 < after < 4.0 for _, after in late), late
    assert host.late_frames[1] - done_late0 >= 1  # the worker saw steps end after their frames' deadlines


async def test_boxes_that_come_after_their_utterance_finished_still_count_as_late(speech_daemon, client):
    """Boxes held two seconds: the utterance finishes (its last ticks went out as
    fallbacks) while its last steps still run; their boxes are late frames all the same,
    not dropped as an interrupted utterance's would be."""
    await start(client, "tail", fps=4)
    speech = speech_daemon.sessions["tail"].speech
    with _LateSteps(speech_daemon.engine_host.engine, 2.0):
        finished = await _speak_one_second(client, "tail")
        await until(lambda: any(wall > finished for wall, _ in speech.late_results), 15,
                    lambda: f"no box came after the finish: {list(speech.late_results)}")
    after_finish = [after for wall, after in speech.late_results if wall > finished]
    assert after_finish and all(after > 0.0 for after in after_finish), list(speech.late_results)
    assert not speech.utterances  # it had finished: these came for no utterance in play
