"""A session's two LiveKit sources, and how one frame and its audio enter them.

Shared by the LiveKit publisher (which publishes tracks of these sources in a room) and
the livekit-local sink (which never joins one), so both pay the same costs:
``VideoSource.capture_frame`` copies the I420 planes into a native buffer during the
call, and ``AudioSource.capture_frame`` appends to the source's native queue, which a
native task drains 10 ms at a time at real time whether or not a room is connected. That
queue makes a capture wait only while more than ``audio_queue_size_ms`` is queued, so
pushes at the session's real-time pace never wait.

The queue is kept short: one frame's audio plus two 10 ms drain periods
(``audio_queue_ms``). Video has no queue (a capture is sent as it comes), so whatever
audio waits in the queue plays that much after its frame; when the session pushes a
burst (frames late after a stall), a full queue makes the capture wait, which holds the
next video frame back too: lips and voice never part by more than the queue.

The native queue does not drain while it is empty, so a late tick leaves it behind the
session's clock for good (every later capture waits for room). The wait tells how far
behind; that much is cut from the next silence (``behind_s``), never from voice.

Video is captured here, with the caller's timestamp, rather than through
``rtc.AVSynchronizer``: its ``push(frame, timestamp)`` keeps the timestamp for its own
bookkeeping and captures with ``timestamp_us=0`` (the SDK then stamps the wall clock at
capture), and its pacing task would add a second clock and queue behind the session's,
which already paces every push.
"""

from __future__ import annotations

import math
import time
from collections import deque

import numpy as np
from livekit import rtc

from daemon.publishers.base import MediaFormat, check_frame


def audio_queue_ms(fps: int) -> int:
    """The audio queue for a session's frame rate: a frame's audio and two 10 ms drain
    periods, in the SDK's 10 ms steps (60 ms at 25 fps, 120 ms at 10 fps)."""
    return 10 * math.ceil((1000 / fps + 20) / 10)


class LiveKitSources:
    def __init__(self, fmt: MediaFormat, *, audio_queue_size_ms: int | None = None,
                 capture_window: int | None = None) -> None:
        """Must be built on the event loop (the audio source binds to it).
        ``audio_queue_size_ms``: default ``audio_queue_ms(fmt.fps)``.
        ``capture_window``: how many video capture times to keep (default: one second's)."""
        if audio_queue_size_ms is None:
            audio_queue_size_ms = audio_queue_ms(fmt.fps)
        if audio_queue_size_ms <= 0 or audio_queue_size_ms % 10:
            raise ValueError(f"audio_queue_size_ms must be a positive multiple of 10, got {audio_queue_size_ms}")
        self.fmt = fmt
        self.video = rtc.VideoSource(fmt.width, fmt.height)
        self.audio = rtc.AudioSource(fmt.sample_rate, 1, queue_size_ms=audio_queue_size_ms)
        self._queue_s = audio_queue_size_ms / 1000
        # Audio queued beyond the session's clock: the native queue stops draining while
        # it is empty (a late tick), and runs that much behind the clock from then on.
        # Cut from the next silence (``capture``), so voice and video meet again.
        self.behind_s = 0.0
        self.silence_cut_s = 0.0  # in total
        # time.monotonic() right after each video capture: the published frame rate and
        # its interval jitter, as the SDK received the frames.
        self.capture_times: deque[float] = deque(maxlen=capture_window or fmt.fps + 1)
        self._last_timestamp_us = 0
        self._closed = False

    async def capture(self, frame: np.ndarray, audio: np.ndarray, timestamp_us: int | None) -> None:
        """One frame and its audio into the sources (see Publisher.push)."""
        check_frame(frame, self.fmt)
        if timestamp_us is None:
            ts = max(int(time.monotonic() * 1e6), self._last_timestamp_us + 1)
        else:
            ts = int(timestamp_us)
        if ts <= self._last_timestamp_us:
            # 0 would make the SDK stamp the wall clock instead; a repeated or earlier
            # time would make WebRTC drop the frame.
            raise ValueError(f"timestamp_us must increase from frame to frame and be > 0: "
                             f"got {ts} after {self._last_timestamp_us}")
        self._last_timestamp_us = ts
        self.video.capture_frame(
            rtc.VideoFrame(self.fmt.width, self.fmt.height, rtc.VideoBufferType.I420,
                           _native_readable(frame)),
            timestamp_us=ts,
        )
        self.capture_times.append(time.monotonic())
        samples = np.ascontiguousarray(audio, dtype=np.int16).reshape(-1)
        rate = self.fmt.sample_rate
        if self.behind_s > 0 and samples.size and not samples.any():
            cut = min(samples.size, round(self.behind_s * rate))
            samples = samples[cut:]
            self.behind_s = max(0.0, self.behind_s - cut / rate)
            self.silence_cut_s += cut / rate
        if samples.size:
            t = time.monotonic()
            await self.audio.capture_frame(rtc.AudioFrame(samples.tobytes(), rate, 1, samples.size))
            waited = time.monotonic() - t
            if waited > 0.002:
                # The queue was full: it returned once this frame fitted, so it now holds
                # the whole queue, where on the clock it would hold this frame less the
                # wait. (Measured with the real SDK: after one 50 ms stall at 25 fps with a
                # 60 ms queue, every later capture waited 30 ms: 30 + 60 - 40 = 50 behind.)
                self.behind_s = waited + self._queue_s - samples.size / rate

    def clear(self) -> None:
        """Forget the queued audio (an interrupt): the queue is back on the clock."""
        self.audio.clear_queue()
        self.behind_s = 0.0

    @property
    def video_fps(self) -> float:
        """Video frames per second captured over the last ``capture_window`` frames."""
        times = self.capture_times
        if len(times) < 2 or times[-1] <= times[0]:
            return 0.0
        return (len(times) - 1) / (times[-1] - times[0])

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        await self.audio.aclose()
        await self.video.aclose()


def _native_readable(frame: np.ndarray) -> memoryview | bytes:
    """The frame's memory for the SDK, which copies it during ``capture_frame``: a view
    when the SDK can take its address (writable, contiguous), else one copy (the SDK
    cannot take the address of a read-only view, e.g. an avatar's shared idle frame)."""
    if frame.flags.writeable and frame.flags.c_contiguous:
        return memoryview(frame)
    return frame.tobytes()
