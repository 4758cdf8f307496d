"""Publishers: the MP4 file sink (decoded back with PyAV), the LiveKit publisher and the
factory that picks one from the settings."""

from __future__ import annotations

import asyncio
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
from daemon.publishers.base import MediaFormat
from daemon.publishers.factory import make_publisher
from daemon.publishers.filesink import FileSinkPublisher
from daemon.publishers.livekit import LiveKitPublisher, RtcRoomConnector, mint_token

FPS = 25
RATE = 24_000
SPF = RATE // FPS  # 960 audio samples per video frame

# 64 flat colours on a 4-level grid: neighbours differ by 64 per channel, far beyond
# what H.264 at crf 20 moves a flat block.
LEVELS = (32, 96, 160, 224)
PALETTE = np.array([(r, g, b) for r in LEVELS for g in LEVELS for b in LEVELS], np.uint8)


def flat_frame(index: int, width: int, height: int) -> np.ndarray:
    frame = np.empty((height, width, 4), np.uint8)
    frame[..., :3] = PALETTE[index]
    frame[..., 3] = 255
    return frame


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


async def test_file_sink_pads_odd_sizes_to_even(tmp_path: Path) -> None:
    fmt = MediaFormat(width=65, height=49, fps=FPS, sample_rate=16_000)
    sink = FileSinkPublisher(tmp_path / "odd.mp4", fmt, "odd")
    await sink.start()
    frame = np.zeros((49, 65, 4), np.uint8)
    frame[..., 3] = 255
    frame[:, :32, 0] = 224  # left half red, right half green: the padding repeats green
    frame[:, 32:, 1] = 224
    for _ in range(5):
        # Idle frames may come without audio: the sink fills silence.
        await sink.push(frame, np.zeros(0, np.int16))
    await sink.aclose()

    video, pcm, _, _ = decode(tmp_path / "odd.mp4")
    assert len(video) == 5
    rgb = video[-1].to_ndarray(format="rgb24").astype(int)
    assert rgb.shape == (50, 66, 3)
    assert np.abs(rgb[10:40, 40:, :] - [0, 224, 0]).max() <= 24
    assert np.abs(rgb[:, 65] - [0, 224, 0]).max() <= 32  # the added column
    assert 5 * 16_000 // FPS <= pcm.size < 5 * 16_000 // FPS + 1024
    assert np.abs(pcm).max() < 1e-3


async def test_file_sink_close_is_idempotent_and_push_after_close_fails(tmp_path: Path) -> None:
    fmt = MediaFormat(width=32, height=32, fps=FPS, sample_rate=16_000)
    sink = FileSinkPublisher(tmp_path / "c.mp4", fmt, "c")
    await sink.start()
    await sink.push(flat_frame(3, 32, 32), np.zeros(640, np.int16))
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
                await sink.push(rng.integers(0, 256, (64, 64, 4), np.uint8),
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


async def push_realtime(pub: LiveKitPublisher, frames: int, start: int = 0) -> float:
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
    before = {t for t in asyncio.all_tasks() if t is not asyncio.current_task()}
    assert before, "the synchronizer's capture task should be running"
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
