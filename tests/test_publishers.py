"""Publishers: the MP4 file sink (decoded back with PyAV), the LiveKit publisher, the
livekit-local sink and the factory that picks one from the settings. Frames are I420
(daemon.frames), made from known RGB pictures."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import signal
import socket
import time
from pathlib import Path
from typing import Any, Callable

import av
import numpy as np
import pytest
from livekit import api, rtc
from pydantic import SecretStr
from structlog.testing import capture_logs

from daemon.config import LiveKitSection, OutputSection, Settings
from daemon.errors import INVALID_MESSAGE, PUBLISHER_FAILED, LipsyncError
from daemon.frames import i420_size, rgb_to_i420
from daemon.publishers.base import MediaFormat
from daemon.publishers.factory import make_publisher
from daemon.publishers.filesink import FileSinkPublisher
from daemon.publishers.livekit import LiveKitPublisher, RtcRoomConnector, mint_token
from daemon.publishers.livekit_local import LiveKitLocalPublisher
from daemon.publishers.livekit_sources import LiveKitSources, audio_queue_ms
from daemon.publishers.null import NullPublisher

FPS = 25
RATE = 24_000
SPF = RATE // FPS  # 960 audio samples per video frame

# 64 flat colours on a 4-level grid: neighbours differ by 64 per channel, far beyond
# what H.264 at crf 20 moves a flat block.
LEVELS = (32, 96, 160, 224)
PALETTE = np.array([(r, g, b) for r in LEVELS for g in LEVELS for b in LEVELS], np.uint8)


def flat_frame(index: int, width: int, height: int) -> np.ndarray:
    """I420 of a picture filled with PALETTE[index]."""
    return rgb_to_i420(np.ascontiguousarray(np.broadcast_to(PALETTE[index], (height, width, 3))))


def structured_picture() -> np.ndarray:
    """A 64x48 RGB picture with structure in both directions and in every channel: four
    coloured quadrants, a horizontal grey ramp across the bottom and a vertical bar."""
    img = np.zeros((48, 64, 3), np.uint8)
    img[:20, :32] = (200, 40, 40)
    img[:20, 32:] = (40, 180, 60)
    img[20:36, :32] = (50, 70, 210)
    img[20:36, 32:] = (230, 210, 40)
    img[36:] = np.linspace(16, 235, 64).astype(np.uint8)[None, :, None]
    img[:36, 28:36] = (250, 250, 250)
    return img


def tone_from(start_frame: int, frames: int) -> np.ndarray:
    """Silence, then a 440 Hz tone from ``start_frame`` on: its onset in the decoded
    file shows where audio sits relative to the video timeline."""
    t = np.arange(frames * SPF) / RATE
    audio = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    audio[: start_frame * SPF] = 0
    return audio


def decode(path: Path) -> tuple[list[av.VideoFrame], np.ndarray, float, float]:
    with av.open(str(path)) as container:
        video = [f for f in container.decode(video=0)]
    with av.open(str(path)) as container:
        audio_frames = list(container.decode(audio=0))
        duration = container.duration / av.time_base
    audio = np.concatenate([f.to_ndarray().reshape(-1) for f in audio_frames])
    return video, audio, duration, float(audio_frames[0].time)


# -- file sink ------------------------------------------------------------------------


async def test_file_sink_writes_decodable_mp4_with_aligned_audio(tmp_path: Path) -> None:
    frames = 50
    fmt = MediaFormat(width=64, height=48, fps=FPS, sample_rate=RATE)
    sink = FileSinkPublisher(tmp_path / "rec" / "s1.mp4", fmt, "s1")
    info = await sink.start()
    assert info == {"kind": "file", "path": str(tmp_path / "rec" / "s1.mp4")}
    audio = tone_from(25, frames)
    for i in range(frames):
        await sink.push(flat_frame(i, 64, 48), audio[i * SPF : (i + 1) * SPF])
    await sink.aclose()
    assert sink.healthy

    video, pcm, duration, audio_start = decode(tmp_path / "rec" / "s1.mp4")
    assert len(video) == frames
    assert [round(f.time, 3) for f in video] == [round(i / FPS, 3) for i in range(frames)]
    for i, f in enumerate(video):
        rgb = f.to_ndarray(format="rgb24").astype(int)
        assert rgb.shape == (48, 64, 3)
        # Mean colour picks out the pushed palette entry; pixels stay close to it.
        nearest = np.argmin(np.abs(PALETTE.astype(int) - rgb.mean(axis=(0, 1))).sum(axis=1))
        assert nearest == i, f"frame {i} decoded as palette colour {nearest}"
        assert np.abs(rgb - PALETTE[i].astype(int)).max() <= 24
    assert duration == pytest.approx(frames / FPS, abs=0.05)

    # AAC pads the last packet to a full 1024-sample frame.
    assert frames * SPF <= pcm.size < frames * SPF + 1024
    assert audio_start == pytest.approx(0.0, abs=1e-6)
    onset = int(np.argmax(np.abs(pcm) > 0.05))
    assert onset / RATE == pytest.approx(25 / FPS, abs=0.005), "audio drifted from video"
    spectrum = np.abs(np.fft.rfft(pcm[onset + 1024 : onset + 1024 + RATE // 2]))
    peak_hz = np.argmax(spectrum) * RATE / (RATE // 2)
    assert peak_hz == pytest.approx(440, abs=4)


async def test_file_sink_recording_decodes_to_the_pushed_picture(tmp_path: Path) -> None:
    """I420 from daemon.frames.rgb_to_i420 is encoded as it is: the decoded frame is the
    RGB picture it was made from, up to chroma subsampling and H.264 at crf 20."""
    picture = structured_picture()
    fmt = MediaFormat(width=64, height=48, fps=FPS, sample_rate=16_000)
    sink = FileSinkPublisher(tmp_path / "pic.mp4", fmt, "pic")
    await sink.start()
    for _ in range(3):
        await sink.push(rgb_to_i420(picture), np.zeros(640, np.int16))
    await sink.aclose()
    video, _, _, _ = decode(tmp_path / "pic.mp4")
    assert len(video) == 3
    rgb = video[-1].to_ndarray(format="rgb24").astype(int)
    error = np.abs(rgb - picture.astype(int))
    assert error.mean() < 4, f"mean error {error.mean():.1f}"
    # Away from colour edges (where 2x2 chroma blocks mix two colours) every pixel is close.
    for y1, y2, x1, x2 in ((2, 18, 2, 26), (2, 18, 38, 62), (22, 34, 2, 26), (22, 34, 38, 62), (38, 48, 0, 64)):
        assert error[y1:y2, x1:x2].max() <= 24, (y1, x1)
    # The planes are not swapped: the quadrants keep their hue.
    assert rgb[10, 10].argmax() == 0 and rgb[10, 50].argmax() == 1 and rgb[28, 10].argmax() == 2


async def test_file_sink_pads_odd_sizes_to_even(tmp_path: Path) -> None:
    fmt = MediaFormat(width=65, height=49, fps=FPS, sample_rate=16_000)
    sink = FileSinkPublisher(tmp_path / "odd.mp4", fmt, "odd")
    await sink.start()
    picture = np.zeros((49, 65, 3), np.uint8)
    picture[:, :32, 0] = 224  # left half red, right half green: the padding repeats green
    picture[:, 32:, 1] = 224
    frame = rgb_to_i420(picture)
    for _ in range(5):
        # Idle frames may come without audio: the sink fills silence.
        await sink.push(frame, np.zeros(0, np.int16))
    await sink.aclose()

    video, pcm, _, _ = decode(tmp_path / "odd.mp4")
    assert len(video) == 5
    rgb = video[-1].to_ndarray(format="rgb24").astype(int)
    assert rgb.shape == (50, 66, 3)
    assert np.abs(rgb[10:40, 40:, :] - [0, 224, 0]).max() <= 24
    assert np.abs(rgb[10:40, :28, :] - [224, 0, 0]).max() <= 24
    assert np.abs(rgb[:, 65] - [0, 224, 0]).max() <= 32  # the added column
    assert np.abs(rgb[49, 40:] - [0, 224, 0]).max() <= 32  # the added row
    assert 5 * 16_000 // FPS <= pcm.size < 5 * 16_000 // FPS + 1024
    assert np.abs(pcm).max() < 1e-3


async def test_file_sink_close_is_idempotent_and_push_after_close_fails(tmp_path: Path) -> None:
    fmt = MediaFormat(width=32, height=32, fps=FPS, sample_rate=16_000)
    sink = FileSinkPublisher(tmp_path / "c.mp4", fmt, "c")
    await sink.start()
    await sink.push(flat_frame(3, 32, 32), np.zeros(640, np.int16))
    # An RGBA picture (the old frame format) is refused, saying what is expected.
    with pytest.raises(ValueError, match=f"I420 uint8 of {i420_size(32, 32)} bytes for 32x32"):
        await sink.push(np.zeros((32, 32, 4), np.uint8), np.zeros(640, np.int16))
    await asyncio.gather(sink.aclose(), sink.aclose())
    await sink.aclose()
    with pytest.raises(LipsyncError) as err:
        await sink.push(flat_frame(3, 32, 32), np.zeros(640, np.int16))
    assert err.value.code == PUBLISHER_FAILED
    video, _, _, _ = decode(tmp_path / "c.mp4")
    assert len(video) == 1
    # Closing a sink that never started is a no-op.
    await FileSinkPublisher(tmp_path / "never.mp4", fmt, "n").aclose()


async def test_file_sink_start_errors_say_what_to_change(tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    sink = FileSinkPublisher(blocker / "x.mp4", MediaFormat(32, 32, FPS, 16_000), "e")
    with pytest.raises(LipsyncError) as err:
        await sink.start()
    assert err.value.code == PUBLISHER_FAILED
    assert "recordings_dir" in err.value.message

    # AAC has no 1 kHz mode: rejected when the encoders open, not at the first push.
    sink = FileSinkPublisher(tmp_path / "y.mp4", MediaFormat(32, 32, FPS, 1000), "e")
    with pytest.raises(LipsyncError, match="1000 Hz"):
        await sink.start()


async def test_file_sink_reports_a_failed_writer_once(tmp_path: Path) -> None:
    """A real write failure: the file size limit (EFBIG) stands in for a full disk."""
    fmt = MediaFormat(width=64, height=64, fps=FPS, sample_rate=16_000)
    rng = np.random.default_rng(0)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    with capture_logs() as logs:
        sink = FileSinkPublisher(tmp_path / "full.mp4", fmt, "full")
        await sink.start()
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, old_limit[1]))
        try:
            for _ in range(40):  # noise frames do not compress: ~10 kB each
                await sink.push(rng.integers(0, 256, i420_size(64, 64), np.uint8),
                                np.zeros(640, np.int16))
            await sink.aclose()
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
            signal.signal(signal.SIGXFSZ, old_handler)
    assert not sink.healthy
    failures = [e for e in logs if e["event"] == "file_sink_failed"]
    assert len(failures) == 1
    assert failures[0]["session_id"] == "full"
    assert "File too large" in failures[0]["error"]


# -- LiveKit --------------------------------------------------------------------------

KEY = SecretStr("APIkey123")
SECRET = SecretStr("s3cr3t-that-must-never-leak-0123456789abcdef")


class FakeParticipant:
    def __init__(self) -> None:
        self.published: list[tuple[rtc.LocalTrack, rtc.TrackPublishOptions]] = []

    async def publish_track(self, track: rtc.LocalTrack, options: rtc.TrackPublishOptions) -> Any:
        self.published.append((track, options))
        return track


class FakeRoom:
    def __init__(self, on_disconnected: Callable[[str], None]) -> None:
        self.local_participant = FakeParticipant()
        self.on_disconnected = on_disconnected
        self.disconnect_calls = 0

    async def disconnect(self) -> None:
        self.disconnect_calls += 1

    def drop(self) -> None:
        """What the server going away looks like from the client."""
        self.on_disconnected("SERVER_SHUTDOWN")


class FakeConnector:
    """Test double for the room connection only (no LiveKit server can run here); the
    sources, tracks, frames and synchronizer the publisher feeds are the real SDK's."""

    def __init__(self, fail_next: int = 0, hang: bool = False, error: str = "refused") -> None:
        self.calls: list[tuple[str, str, float]] = []
        self.rooms: list[FakeRoom] = []
        self.fail_next = fail_next
        self.hang = hang
        self.error = error

    async def connect(self, url: str, token: str, *, timeout_s: float,
                      on_disconnected: Callable[[str], None]) -> FakeRoom:
        self.calls.append((url, token, timeout_s))
        if self.hang:
            await asyncio.sleep(3600)
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionRefusedError(self.error.replace("TOKEN", token))
        room = FakeRoom(on_disconnected)
        self.rooms.append(room)
        return room


def lk_publisher(connector: Any, fmt: MediaFormat | None = None, **kw: Any) -> LiveKitPublisher:
    return LiveKitPublisher(
        url="wss://lk.example.test",
        api_key=KEY,
        api_secret=SECRET,
        room="room-1",
        identity="avatar-s1",
        fmt=fmt or MediaFormat(width=64, height=48, fps=FPS, sample_rate=RATE),
        session_id="s1",
        token_ttl_s=600,
        reconnect_max_backoff_s=0.2,
        connect_timeout_s=kw.pop("connect_timeout_s", 2.0),
        room_connector=connector,
        reconnect_initial_backoff_s=0.05,
        **kw,
    )


def assert_published_av(room: FakeRoom) -> None:
    published = room.local_participant.published
    assert len(published) == 2
    kinds = {type(track): options.source for track, options in published}
    assert kinds == {
        rtc.LocalVideoTrack: rtc.TrackSource.SOURCE_CAMERA,
        rtc.LocalAudioTrack: rtc.TrackSource.SOURCE_MICROPHONE,
    }


async def push_realtime(pub: LiveKitPublisher | LiveKitLocalPublisher, frames: int,
                        start: int = 0) -> float:
    """Pushes at the session's pace; returns the slowest push in seconds."""
    t0 = time.monotonic()
    slowest = 0.0
    audio = tone_from(0, 1)
    for i in range(frames):
        await asyncio.sleep(max(0.0, t0 + i / FPS - time.monotonic()))
        began = time.monotonic()
        await pub.push(flat_frame((start + i) % 64, 64, 48), audio)
        slowest = max(slowest, time.monotonic() - began)
    return slowest


def test_token_grants_only_publishing_to_the_room() -> None:
    token = mint_token(KEY, SECRET, "room-1", "avatar-s1", 600)
    claims = api.TokenVerifier(KEY.get_secret_value(), SECRET.get_secret_value()).verify(token)
    assert claims.identity == "avatar-s1"
    video = claims.video
    assert video is not None
    assert (video.room, video.room_join) == ("room-1", True)
    assert (video.can_publish, video.can_subscribe, video.can_publish_data) == (True, False, False)
    with pytest.raises(Exception):
        api.TokenVerifier(KEY.get_secret_value(), "another-secret-of-32-bytes-or-more").verify(token)


async def test_livekit_start_publishes_both_tracks_and_pushes_in_real_time() -> None:
    connector = FakeConnector()
    pub = lk_publisher(connector)
    info = await pub.start()
    assert info == {"kind": "livekit", "room": "room-1", "identity": "avatar-s1"}
    assert pub.healthy
    (url, token, timeout_s), = connector.calls
    assert (url, timeout_s) == ("wss://lk.example.test", 2.0)
    claims = api.TokenVerifier(KEY.get_secret_value(), SECRET.get_secret_value()).verify(token)
    assert claims.video is not None and claims.video.room == "room-1"
    assert_published_av(connector.rooms[0])

    slowest = await push_realtime(pub, 30)
    assert slowest < 1 / FPS, f"a push took {slowest * 1000:.1f} ms, over one frame period"
    assert pub.frames_pushed == 30 and pub.frames_dropped == 0
    assert pub.video_fps == pytest.approx(FPS, rel=0.2)
    with pytest.raises(ValueError, match="uint8"):
        await pub.push(np.zeros((48, 64, 3), np.uint8), np.zeros(0, np.int16))
    await pub.aclose()


async def test_livekit_reconnects_with_backoff_and_republishes() -> None:
    connector = FakeConnector()
    pub = lk_publisher(connector)
    with capture_logs() as logs:
        await pub.start()
        first = connector.rooms[0]
        connector.fail_next = 2  # the first two reconnect attempts are refused
        first.drop()
        assert not pub.healthy
        # Pushes keep being accepted while away; they are dropped and counted.
        await push_realtime(pub, 5)
        assert pub.frames_dropped >= 1
        deadline = time.monotonic() + 3
        while not pub.healthy and time.monotonic() < deadline:
            await pub.push(flat_frame(0, 64, 48), np.zeros(SPF, np.int16))
            await asyncio.sleep(1 / FPS)
        assert pub.healthy
        assert len(connector.calls) == 4  # start, two refusals, success
        assert first.disconnect_calls == 1
        second = connector.rooms[1]
        assert_published_av(second)
        # Fresh tracks on the same sources.
        assert {id(t) for t, _ in second.local_participant.published}.isdisjoint(
            id(t) for t, _ in first.local_participant.published
        )
        # Each attempt mints its own token (one minted at start may have expired).
        verifier = api.TokenVerifier(KEY.get_secret_value(), SECRET.get_secret_value())
        assert all(verifier.verify(token).identity == "avatar-s1"
                   for _, token, _ in connector.calls)
        pushed = pub.frames_pushed
        await push_realtime(pub, 5)
        assert pub.frames_pushed == pushed + 5
        # A late event from the old room changes nothing.
        first.drop()
        assert pub.healthy
        await pub.aclose()
    events = [e["event"] for e in logs]
    assert events.count("livekit_reconnect_failed") == 2
    assert "livekit_reconnected" in events
    assert pub.reconnects == 1
    assert SECRET.get_secret_value() not in repr(logs)


async def test_livekit_aclose_releases_everything_once() -> None:
    connector = FakeConnector()
    pub = lk_publisher(connector)
    await pub.start()
    await push_realtime(pub, 3)
    await asyncio.gather(pub.aclose(), pub.aclose())
    await pub.aclose()
    assert not pub.healthy
    assert connector.rooms[0].disconnect_calls == 1
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    with pytest.raises(LipsyncError):
        await pub.push(flat_frame(0, 64, 48), np.zeros(SPF, np.int16))
    # Dropping the room after close does not start a reconnect.
    connector.rooms[0].drop()
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]

    # A reconnect in flight is cancelled by the close, not left behind.
    connector = FakeConnector()
    pub = lk_publisher(connector)
    await pub.start()
    connector.hang = True
    connector.rooms[0].drop()
    await asyncio.sleep(0.05)
    assert [t for t in asyncio.all_tasks() if t.get_name() == "livekit-reconnect"]
    await pub.aclose()
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_livekit_start_failure_hides_secrets_and_releases() -> None:
    connector = FakeConnector(fail_next=1, error="handshake failed for wss://x/rtc?access_token=TOKEN")
    pub = lk_publisher(connector)
    with pytest.raises(LipsyncError) as err:
        await pub.start()
    assert err.value.code == PUBLISHER_FAILED
    token = connector.calls[0][1]
    assert token not in err.value.message and "***" in err.value.message
    assert SECRET.get_secret_value() not in err.value.message
    assert not pub.healthy
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_livekit_start_times_out() -> None:
    pub = lk_publisher(FakeConnector(hang=True), connect_timeout_s=0.3)
    began = time.monotonic()
    with pytest.raises(LipsyncError, match="within 0.3 s") as err:
        await pub.start()
    assert time.monotonic() - began < 1.0
    assert err.value.code == PUBLISHER_FAILED


async def test_livekit_sources_hand_the_sdk_the_i420_picture_with_increasing_timestamps() -> None:
    """A local track on the source (the SDK runs without a server) receives exactly the
    pushed picture, every frame, in order; timestamps must increase."""
    fmt = MediaFormat(width=64, height=48, fps=FPS, sample_rate=RATE)
    sources = LiveKitSources(fmt)
    stream = rtc.VideoStream(rtc.LocalVideoTrack.create_video_track("v", sources.video))
    received: list[tuple[int, np.ndarray]] = []

    async def read() -> None:
        async for event in stream:
            buffer = event.frame.convert(rtc.VideoBufferType.I420)
            received.append((event.timestamp_us, np.frombuffer(buffer.data, np.uint8).copy()))

    reader = asyncio.create_task(read())
    picture = structured_picture()
    frames = [rgb_to_i420(np.roll(picture, 4 * i, axis=1)) for i in range(8)]
    frames[3].setflags(write=False)  # a shared, read-only idle frame works as well
    t0 = int(time.monotonic() * 1e6)
    for i, frame in enumerate(frames):
        await sources.capture(frame, tone_from(0, 1), t0 + i * 1_000_000 // FPS)
        await asyncio.sleep(1 / FPS)
    with pytest.raises(ValueError, match="increase"):
        await sources.capture(frames[0], np.zeros(0, np.int16), t0)
    with pytest.raises(ValueError, match="I420"):
        await sources.capture(np.zeros((48, 64, 4), np.uint8), np.zeros(0, np.int16), None)
    deadline = time.monotonic() + 2
    while len(received) < len(frames) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    await stream.aclose()
    reader.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await reader
    await sources.aclose()
    assert len(received) == len(frames)
    for (_, got), sent in zip(received, frames):
        assert np.array_equal(got, sent)
    stamps = np.diff([ts for ts, _ in received])
    assert (stamps > 0).all()
    assert len(sources.capture_times) == len(frames)


async def test_livekit_sources_audio_is_paced_at_real_time_without_a_room() -> None:
    """The audio source's native queue drains 10 ms at a time with no room: real-time
    pushes never wait, and a burst is held back to real time past the queue's 200 ms."""
    fmt = MediaFormat(width=64, height=48, fps=FPS, sample_rate=RATE)
    sources = LiveKitSources(fmt, audio_queue_size_ms=200)
    stream = rtc.AudioStream(rtc.LocalAudioTrack.create_audio_track("a", sources.audio),
                             sample_rate=RATE, num_channels=1)
    heard: list[np.ndarray] = []

    async def listen() -> None:
        async for event in stream:
            heard.append(np.frombuffer(event.frame.data, np.int16).copy())

    listener = asyncio.create_task(listen())
    frame = flat_frame(0, 64, 48)
    audio = tone_from(0, FPS)  # one second
    began = time.monotonic()
    slowest = 0.0
    for i in range(FPS):
        t = time.monotonic()
        await sources.capture(frame, audio[i * SPF : (i + 1) * SPF], None)
        slowest = max(slowest, time.monotonic() - t)
    burst_s = time.monotonic() - began
    await asyncio.sleep(0.4)
    await stream.aclose()
    listener.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await listener
    await sources.aclose()
    assert 0.6 < burst_s < 1.3, f"1 s of audio pushed at once took {burst_s:.2f} s"
    assert slowest < 2 / FPS
    pcm = np.concatenate(heard)
    voiced = np.flatnonzero(np.abs(pcm) > 100)
    # All of it played out, contiguous: nothing dropped, no gap inserted.
    assert voiced[-1] - voiced[0] == pytest.approx(FPS * SPF, abs=SPF // 4)


async def test_livekit_local_sink_captures_every_frame_at_real_time() -> None:
    fmt = MediaFormat(width=64, height=48, fps=FPS, sample_rate=RATE)
    pub = LiveKitLocalPublisher(fmt, "local1")
    assert await pub.start() == {"kind": "livekit-local"}
    with pytest.raises(LipsyncError):
        await pub.start()
    slowest = await push_realtime(pub, 30)
    assert slowest < 1 / FPS, f"a push took {slowest * 1000:.1f} ms, over one frame period"
    assert pub.frames_pushed == 30
    times = np.array(pub.capture_times)
    assert len(times) == 30
    intervals = np.diff(times)
    assert np.median(intervals) == pytest.approx(1 / FPS, rel=0.15)
    assert pub.video_fps == pytest.approx(FPS, rel=0.15)
    with pytest.raises(ValueError, match="I420"):
        await pub.push(np.zeros((48, 64, 4), np.uint8), np.zeros(SPF, np.int16))
    await asyncio.gather(pub.aclose(), pub.aclose())
    with pytest.raises(LipsyncError) as err:
        await pub.push(flat_frame(0, 64, 48), np.zeros(SPF, np.int16))
    assert err.value.code == PUBLISHER_FAILED
    assert not [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]


async def test_null_sink_checks_the_frame_size() -> None:
    pub = NullPublisher(MediaFormat(65, 49, FPS, RATE), "n")
    await pub.push(np.zeros(i420_size(65, 49), np.uint8), np.zeros(SPF, np.int16))
    assert (pub.frames, pub.samples) == (1, SPF)
    with pytest.raises(ValueError, match=f"{i420_size(65, 49)} bytes for 65x49"):
        await pub.push(np.zeros(65 * 49 * 3 // 2, np.uint8), np.zeros(0, np.int16))


def closed_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_real_room_connector_to_closed_port_fails_clearly() -> None:
    url = f"ws://127.0.0.1:{closed_loopback_port()}"
    pub = LiveKitPublisher(
        url=url, api_key=KEY, api_secret=SECRET, room="room-1", identity="avatar-s1",
        fmt=MediaFormat(64, 48, FPS, RATE), session_id="s1", token_ttl_s=600,
        reconnect_max_backoff_s=1.0, connect_timeout_s=5.0, room_connector=RtcRoomConnector(),
    )
    began = time.monotonic()
    with pytest.raises(LipsyncError) as err:
        await pub.start()
    assert time.monotonic() - began < 5.5
    assert err.value.code == PUBLISHER_FAILED
    assert url in err.value.message
    assert SECRET.get_secret_value() not in err.value.message
    assert not pub.healthy


# -- factory --------------------------------------------------------------------------


def settings(tmp_path: Path, **livekit: Any) -> Settings:
    return Settings(
        output=OutputSection(sink="livekit" if livekit else "file", recordings_dir=tmp_path),
        livekit=LiveKitSection(**livekit),
    )


FMT = MediaFormat(64, 48, FPS, RATE)


def test_factory_file_sink_names_a_recording_per_session(tmp_path: Path) -> None:
    pub = make_publisher(settings(tmp_path), "sess-1", FMT, None, None)
    assert isinstance(pub, FileSinkPublisher)
    path = pub._path
    assert path.parent == tmp_path
    assert path.name.startswith("sess-1-") and path.suffix == ".mp4"


def test_factory_livekit_local_needs_no_room_or_credentials(tmp_path: Path) -> None:
    s = Settings(output=OutputSection(sink="livekit-local"))
    assert s.sink_kind() == "livekit-local"
    assert isinstance(make_publisher(s, "s1", FMT, None, None), LiveKitLocalPublisher)


def test_factory_livekit_needs_a_room(tmp_path: Path) -> None:
    s = settings(tmp_path, url="wss://lk", api_key=KEY, api_secret=SECRET)
    with pytest.raises(LipsyncError) as err:
        make_publisher(s, "s1", FMT, None, None)
    assert err.value.code == INVALID_MESSAGE
    assert "livekit" in err.value.message and "room" in err.value.message


def test_factory_livekit_names_missing_credentials(tmp_path: Path) -> None:
    s = settings(tmp_path, url="wss://lk", api_secret=SECRET)
    with pytest.raises(LipsyncError) as err:
        make_publisher(s, "s1", FMT, "room-1", None)
    assert err.value.code == PUBLISHER_FAILED
    assert "livekit.api_key" in err.value.message
    assert "LIPSYNC_LIVEKIT__API_KEY" in err.value.message
    assert "api_secret" not in err.value.message


async def test_factory_livekit_defaults_the_identity(tmp_path: Path) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.get_secret_value() + "\n")
    s = settings(tmp_path, url="wss://lk", api_key=KEY, api_secret_file=secret_file)
    connector = FakeConnector()
    pub = make_publisher(s, "s1", FMT, "room-9", None, room_connector=connector)
    assert isinstance(pub, LiveKitPublisher)
    assert await pub.start() == {"kind": "livekit", "room": "room-9", "identity": "avatar-s1"}
    claims = api.TokenVerifier(KEY.get_secret_value(), SECRET.get_secret_value()).verify(
        connector.calls[0][1]
    )
    assert claims.identity == "avatar-s1" and claims.video.room == "room-9"
    await pub.aclose()


def test_factory_reads_each_secret_file_once_per_start(tmp_path: Path, monkeypatch) -> None:
    """One read per start: the credential check and the token use the same secret (a
    file rotated between two reads could not make them differ)."""
    import daemon.config as config

    secret_file = tmp_path / "secret"
    secret_file.write_text(SECRET.get_secret_value() + "\n")
    s = settings(tmp_path, url="wss://lk", api_key=KEY, api_secret_file=secret_file)
    reads: list[Path] = []
    real = config._read_secret_file

    def counting(path):
        if path is not None:
            reads.append(path)
        return real(path)

    monkeypatch.setattr(config, "_read_secret_file", counting)
    pub = make_publisher(s, "s1", FMT, "room-9", None, room_connector=FakeConnector())
    assert isinstance(pub, LiveKitPublisher) and reads == [secret_file]


@pytest.mark.parametrize("reason", ["DUPLICATE_IDENTITY", "PARTICIPANT_REMOVED", "ROOM_DELETED"])
async def test_livekit_terminal_disconnects_end_the_session_instead_of_retrying(reason) -> None:
    """Two sessions of one identity would kick each other out forever: a reason no
    reconnect can cure is not retried, and the next push raises it (the frame loop
    then ends the session with that error)."""
    connector = FakeConnector()
    pub = lk_publisher(connector)
    await pub.start()
    connector.rooms[0].on_disconnected(reason)
    await asyncio.sleep(0.3)  # several backoff periods: nothing may reconnect
    assert len(connector.calls) == 1 and not pub.healthy
    with pytest.raises(LipsyncError) as info:
        await pub.push(flat_frame(0, 64, 48), np.zeros(SPF, np.int16))
    assert info.value.code == "publisher_failed" and reason in info.value.message
    assert "room-1" in info.value.message and "avatar-s1" in info.value.message
    await pub.aclose()


async def test_dropping_the_queue_forgets_audio_not_yet_played() -> None:
    """An interrupt: the AudioSource's queued samples go (the real SDK source, no room)."""
    pub = LiveKitLocalPublisher(MediaFormat(width=64, height=48, fps=FPS, sample_rate=RATE), "s1",
                                audio_queue_size_ms=1000)
    await pub.start()
    for i in range(12):  # 480 ms of audio pushed at once
        await pub.push(flat_frame(i, 64, 48), np.full(SPF, 3000, np.int16))
    source = pub._sources.audio
    assert source.queued_duration > 0.2
    pub.drop_queued()
    assert source.queued_duration < 0.05
    await pub.aclose()


async def test_a_burst_of_frames_never_puts_audio_more_than_a_short_queue_behind_its_video() -> None:
    """After a stall the session may push frames faster than real time. Video has no
    queue in the SDK, audio has one: the queue is one frame plus 20 ms (60 ms at 25 fps),
    and a full queue makes the capture wait, so the next video frame waits with it. The
    audio queued when each frame is captured (how far its voice trails it) stays within
    that bound (the real SDK source, no room)."""
    assert audio_queue_ms(25) == 60 and audio_queue_ms(10) == 120 and audio_queue_ms(30) == 60
    pub = LiveKitLocalPublisher(MediaFormat(width=64, height=48, fps=FPS, sample_rate=RATE), "s1")
    await pub.start()
    source = pub._sources.audio
    trailing = []
    for i in range(25):  # a second of frames, pushed as fast as the sources take them
        trailing.append(source.queued_duration)
        await pub.push(flat_frame(i, 64, 48), np.full(SPF, 3000, np.int16))
    # Slack: one 10 ms drain period, and 5 ms for the wall clock the SDK reads the queue
    # by (70.017 ms was seen on a busy machine). Without the bound the second of frames
    # would queue ~1 s.
    assert max(trailing) <= 0.060 + 0.010 + 0.005, trailing
    assert max(trailing) >= 0.020, trailing  # the burst did fill the queue: it held video back
    await pub.aclose()


def lk_settings(tmp_path: Path, **livekit: Any) -> Settings:
    return Settings(daemon={"state_dir": str(tmp_path / "state")}, output={"sink": "livekit"},
                    livekit={"url": "wss://lk.example.test", "api_key": "APIkey123",
                             "api_secret": SECRET.get_secret_value(), **livekit})


def test_rooms_and_identities_outside_the_configured_patterns_are_refused(tmp_path: Path) -> None:
    s = lk_settings(tmp_path, room_pattern=r"support-\d+", identity_pattern=r"avatar-[a-z0-9-]+")
    assert isinstance(make_publisher(s, "s1", FMT, "support-42", None), LiveKitPublisher)  # avatar-s1
    for room, identity, field in (("admin", None, "room_pattern"), ("support-42x", None, "room_pattern"),
                                  ("support-42", "CEO", "identity_pattern")):
        with pytest.raises(LipsyncError) as info:
            make_publisher(s, "s1", FMT, room, identity)
        assert info.value.code == INVALID_MESSAGE and f"livekit.{field}" in info.value.message
    with pytest.raises(ValueError, match="regular expression"):
        lk_settings(tmp_path, room_pattern="(")


def test_minted_tokens_may_publish_only_camera_and_microphone() -> None:
    claims = api.TokenVerifier(KEY.get_secret_value(), SECRET.get_secret_value()).verify(
        mint_token(KEY, SECRET, "room-1", "avatar-s1", 600))
    assert claims.video is not None and sorted(claims.video.can_publish_sources) == ["camera", "microphone"]


async def test_an_orchestrator_token_is_used_as_given_and_no_secret_is_needed(tmp_path: Path) -> None:
    """The orchestrator mints the token (here with its own key); the daemon holds none."""
    other_secret = SecretStr("the-orchestrators-own-secret-0123456789")
    token = mint_token(SecretStr("orchKey"), other_secret, "room-7", "avatar-from-orch", 600)
    s = Settings(daemon={"state_dir": str(tmp_path / "state")}, output={"sink": "livekit"},
                 livekit={"url": "wss://lk.example.test", "tokens_from_orchestrator": True})
    assert s.livekit_problem() is None  # no key or secret configured, and that is fine
    connector = FakeConnector()
    pub = make_publisher(s, "s7", FMT, "room-7", None, token, room_connector=connector)
    info = await pub.start()
    assert info["identity"] == "avatar-from-orch" and connector.calls[0][1] == token
    await pub.aclose()
    with pytest.raises(LipsyncError, match="needs livekit.token"):
        make_publisher(s, "s8", FMT, "room-7", None)
    with pytest.raises(LipsyncError, match="grants room 'room-7'") as info:
        make_publisher(s, "s9", FMT, "room-8", None, token)
    assert token not in info.value.message
    with pytest.raises(LipsyncError, match="not a LiveKit join token"):
        make_publisher(s, "s9", FMT, "room-7", None, "x" * 40)


async def test_after_a_stall_the_audio_queue_catches_up_on_silence_never_on_voice() -> None:
    """The SDK's audio queue stops draining while it is empty: one late tick leaves it
    that far behind the session's clock for good, every later capture waits for room and
    the voice trails its video (measured: 30 ms waits forever after one 50 ms stall at
    25 fps). The sources cut the lag from the next silence, never from voice (the real
    SDK source at real time, no room). A loaded runner may add late ticks of its own:
    each is a fresh lag, measured and cut the same way, so a capture may wait only right
    after a late tick."""
    pub = LiveKitLocalPublisher(MediaFormat(width=64, height=48, fps=FPS, sample_rate=RATE), "s1")
    await pub.start()
    sources = pub._sources
    period = 1 / FPS
    waits: list[float] = []
    late: list[float] = []  # how late each push started
    t0 = time.monotonic() + 0.05
    for n in range(70):
        delay = t0 + n * period - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if n == 10:
            time.sleep(0.05)  # a stalled frame loop: this tick goes out 50 ms late
        voice = n < 40
        audio = np.full(SPF, 3000, np.int16) if voice else np.zeros(SPF, np.int16)
        t = time.monotonic()
        late.append(t - (t0 + n * period))
        await pub.push(flat_frame(n % 64, 64, 48), audio, timestamp_us=round((t0 + n * period) * 1e6))
        waits.append(time.monotonic() - t)
        if n == 39:
            voice_cut, behind = sources.silence_cut_s, sources.behind_s
        if n == 41:  # the lag is over one frame: its cut spans the first two silent pushes
            first_cut = sources.silence_cut_s
    await pub.aclose()

    # A capture held by the queue waits for at least one of its 10 ms drain steps; a
    # busy runner's own slowness (a few ms a push) is not a wait for the queue.
    drain_step = 0.010

    def waited_on_its_own(span: range) -> list[int]:
        """Ticks in ``span`` whose capture waited for the queue though no tick just before
        was late."""
        return [n for n in span if waits[n] >= drain_step and max(late[max(0, n - 2):n + 1]) < drain_step]

    assert waited_on_its_own(range(10)) == [], (waits[:10], late[:10])  # on the clock: room
    # Behind: during the voice the captures wait (nothing of the voice is cut) ...
    assert voice_cut == 0 and sorted(waits[15:40])[12] > 0.015, waits[15:40]
    # ... the lag the waits tell is the stall's (and any late tick since), ...
    assert behind >= 0.035, behind
    if max(late[11:40]) < drain_step:
        assert behind == pytest.approx(0.05, abs=0.015)
    # ... the first silence takes it out (to the sample, unless a tick since added lag of
    # its own), and the captures no longer wait.
    if max(late[40:42]) < drain_step:
        assert first_cut == pytest.approx(behind, abs=1 / RATE)
    else:
        assert first_cut >= behind - 1 / RATE
    assert waited_on_its_own(range(45, 70)) == [], (waits[45:], late[45:])
