"""``output.sink = "livekit-local"``: the LiveKit publishing path without a room.

Every frame and its audio go through the same real SDK sources as the LiveKit publisher
(``LiveKitSources``): the I420 copy into a native buffer, the audio source's native
real-time queue. Nothing is sent anywhere, so a load test measures what publishing costs
the daemon without needing a LiveKit server. Without a room the audio queue still
drains at real time (a native 10 ms task), so the session's real-time pushes never wait.

The monotonic time of each video capture is kept (a bounded window), from which the load
test computes the published frame interval jitter.
"""

from __future__ import annotations

from collections import deque
from typing import Any

import numpy as np

from daemon.errors import PUBLISHER_FAILED, LipsyncError
from daemon.log import get_logger
from daemon.publishers.base import MediaFormat, Publisher
from daemon.publishers.livekit_sources import LiveKitSources

_log = get_logger(__name__)

# Capture times kept per session: ten minutes of frames, enough for any load-test round.
CAPTURE_WINDOW_S = 600


class LiveKitLocalPublisher(Publisher):
    variable_frame_interval = True  # every frame carries its tick's timestamp

    def __init__(self, fmt: MediaFormat, session_id: str, *, audio_queue_size_ms: int | None = None,
                 capture_window_s: float = CAPTURE_WINDOW_S) -> None:
        self._fmt = fmt
        self._audio_queue_size_ms = audio_queue_size_ms
        self._capture_window = max(2, int(capture_window_s * fmt.fps))
        self._log = _log.bind(session_id=session_id, sink="livekit-local")
        self._sources: LiveKitSources | None = None
        self._started = False
        self._closed = False
        self.frames_pushed = 0

    async def start(self) -> dict[str, Any]:
        if self._started or self._closed:
            raise LipsyncError(PUBLISHER_FAILED, "livekit-local sink was already started")
        self._started = True
        self._sources = LiveKitSources(self._fmt, audio_queue_size_ms=self._audio_queue_size_ms,
                                       capture_window=self._capture_window)
        return {"kind": "livekit-local"}

    async def push(self, frame: np.ndarray, audio: np.ndarray,
                   timestamp_us: int | None = None) -> None:
        if self._sources is None or self._closed:
            raise LipsyncError(PUBLISHER_FAILED, "livekit-local sink is not running")
        await self._sources.capture(frame, audio, timestamp_us)
        self.frames_pushed += 1

    @property
    def capture_times(self) -> deque[float]:
        """time.monotonic() right after each video capture, oldest first (bounded)."""
        return self._sources.capture_times if self._sources is not None else deque()

    @property
    def video_fps(self) -> float:
        return self._sources.video_fps if self._sources is not None else 0.0

    def drop_queued(self) -> None:
        if self._sources is not None:
            self._sources.clear()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._sources is not None:
            await self._sources.aclose()
            self._log.info("livekit_local_closed", frames_pushed=self.frames_pushed)
