"""Decoding an idle video to RGB frames, within limits: the one decoder behind the daemon's
avatars (``daemon.avatars.decode_video`` adds its config's caps and error codes) and
``lipsync render``.

Decoding stops as soon as a limit is passed, so a huge file costs at most the limits in
memory. Every failure is a :class:`VideoError` whose message names the video and, where
the caller named the limit (a config field), what to change.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

# Frame rates outside this range are container junk (0, 90000, ...), not a video's rate.
MIN_FPS, MAX_FPS = 0.5, 240

# What an idle video may be. Each demuxer and decoder FFmpeg runs on a file is attack
# surface, so only the formats real uploads use are opened: FFmpeg's demuxer names
# (container.format.name) and canonical codec names.
ALLOWED_FORMATS = {"mov,mp4,m4a,3gp,3g2,mj2": "MP4/MOV", "matroska,webm": "WebM/Matroska"}
ALLOWED_CODECS = {"h264": "H.264", "hevc": "HEVC", "vp8": "VP8", "vp9": "VP9"}


class VideoError(ValueError):
    """The file is not a usable idle video; the message says why and what to change."""


@dataclass(frozen=True)
class VideoLimits:
    max_width: int = 1920
    max_height: int = 1920
    max_seconds: float = 120.0
    max_frames: int = 3000
    min_seconds: float = 0.0
    # The rate assumed when the container has none usable.
    fallback_fps: float = 25.0
    # How the caller names each limit ("max_seconds" -> "fetch.max_video_s"), so that an
    # error says which setting to raise; a limit without a name is only stated.
    names: Mapping[str, str] = field(default_factory=dict)
    # Decoder threads (0: FFmpeg's choice, one per core). Bounded where a process has an
    # address-space limit: every thread reserves its stack.
    threads: int = 0
    # Only these containers and video codecs are decoded (None: any FFmpeg can read).
    formats: frozenset[str] | None = frozenset(ALLOWED_FORMATS)
    codecs: frozenset[str] | None = frozenset(ALLOWED_CODECS)


@dataclass(frozen=True, eq=False)
class Video:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    rate: Fraction  # exact, e.g. 30000/1001

    @property
    def fps(self) -> float:
        return float(self.rate)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def duration_s(self) -> float:
        return self.num_frames / self.fps


def decode_frames(path: str | Path, limits: VideoLimits | None = None, label: str | None = None) -> Video:
    """Every frame of the first video stream of ``path``, as RGB. Blocking.

    ``label`` names the video in error messages (default: the path).
    """
    limits = limits or VideoLimits()
    label = label or str(path)
    try:
        # Local files only: a container must not make FFmpeg open other files or URLs
        # (MOV data references, playlists).
        container = av.open(str(path), mode="r", options={"protocol_whitelist": "file"})
    except (av.FFmpegError, OSError) as exc:
        raise VideoError(f"{label} is not a readable video file ({_short_error(exc)})") from None
    with container:
        _check_format(label, container.format.name, limits)
        if not container.streams.video:
            found = ", ".join(s.type for s in container.streams) or "no streams"
            raise VideoError(f"{label} has no video stream (found: {found})")
        stream = container.streams.video[0]
        ctx = stream.codec_context
        if ctx is None:  # PyAV gives no codec context when FFmpeg has no decoder for it
            raise VideoError(f"{label}: its video codec is not supported by this FFmpeg build")
        _check_codec(label, ctx.codec.canonical_name, limits)
        if limits.threads > 0:
            ctx.thread_count = limits.threads
        width, height = int(ctx.width or 0), int(ctx.height or 0)
        _check_size(label, width, height, limits)
        rate = stream.average_rate or stream.guessed_rate
        rate = Fraction(rate) if rate and MIN_FPS <= float(rate) <= MAX_FPS else None
        if rate is None:
            rate = Fraction(limits.fallback_fps).limit_denominator(1001)
        fps = float(rate)
        known_s = _known_duration(stream, container)
        if known_s is not None and known_s > limits.max_seconds + 1.0 / fps:
            raise _too_long(label, known_s, limits)

        max_frames = min(limits.max_frames, int(limits.max_seconds * fps + 1.5))
        expected = stream.frames if 0 < stream.frames <= max_frames else 64
        buffer = _FrameBuffer(expected)
        try:
            for frame in container.decode(stream):
                if buffer.count >= max_frames:
                    if buffer.count >= limits.max_frames:
                        raise VideoError(
                            f"{label} has more than {limits.max_frames} frames; "
                            + _raise_or(limits, "max_frames", "use a shorter video")
                        )
                    raise _too_long(label, (buffer.count + 1) / fps, limits)
                if frame.width != width or frame.height != height:
                    width, height = frame.width, frame.height
                    _check_size(label, width, height, limits)
                    if buffer.count:
                        raise VideoError(f"{label} changes its frame size mid-stream")
                buffer.append(frame.to_ndarray(format="rgb24"))
        except av.FFmpegError as exc:
            raise VideoError(
                f"{label}: cannot decode its {stream.codec_context.name} video ({_short_error(exc)})"
            ) from None

    if buffer.count == 0:
        raise VideoError(f"{label} has a video stream but no decodable frames")
    video = Video(frames=buffer.result(), rate=rate)
    if video.duration_s < limits.min_seconds:
        raise VideoError(
            f"{label} is {video.duration_s:.2f} s long ({video.num_frames} frames), shorter than "
            f"{_limit(limits, 'min_seconds', f'{limits.min_seconds:g} s')}"
        )
    return video


class _FrameBuffer:
    """Frames in one preallocated array, grown by doubling; avoids np.stack's 2x peak."""

    def __init__(self, capacity: int) -> None:
        self._capacity = max(1, capacity)
        self._data: np.ndarray | None = None
        self.count = 0

    def append(self, frame: np.ndarray) -> None:
        if self._data is None:
            self._data = np.empty((self._capacity, *frame.shape), dtype=np.uint8)
        elif self.count == self._data.shape[0]:
            grown = np.empty((self.count * 2, *self._data.shape[1:]), dtype=np.uint8)
            grown[: self.count] = self._data
            self._data = grown
        self._data[self.count] = frame
        self.count += 1

    def result(self) -> np.ndarray:
        assert self._data is not None
        if self.count == self._data.shape[0]:
            return self._data
        return self._data[: self.count].copy()  # drop the unused tail's memory


def _known_duration(stream: Any, container: Any) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / av.time_base
    return None


def _limit(limits: VideoLimits, key: str, value: str) -> str:
    """'fetch.max_video_s = 120 s' when the caller named the limit, else '120 s'."""
    name = limits.names.get(key)
    return f"{name} = {value}" if name else value


def _raise_or(limits: VideoLimits, key: str, otherwise: str) -> str:
    name = limits.names.get(key)
    return f"raise {name} or {otherwise}" if name else otherwise


def _check_size(label: str, width: int, height: int, limits: VideoLimits) -> None:
    if width <= 0 or height <= 0:
        raise VideoError(f"{label} has a video stream without a frame size")
    if width > limits.max_width or height > limits.max_height:
        names = [limits.names.get("max_width"), limits.names.get("max_height")]
        allowed = f"{limits.max_width}x{limits.max_height}"
        if all(names):
            raise VideoError(
                f"{label} is {width}x{height}, larger than {names[0]} x {names[1]} = {allowed}; "
                "scale the video down or raise those settings"
            )
        raise VideoError(f"{label} is {width}x{height}, larger than {allowed}; scale the video down")


def _check_format(label: str, name: str, limits: VideoLimits) -> None:
    if limits.formats is not None and name not in limits.formats:
        accepted = ", ".join(ALLOWED_FORMATS.get(f, f) for f in sorted(limits.formats))
        raise VideoError(f"{label} is a {name!r} file; accepted containers: {accepted} "
                         "(re-encode it, e.g. to an H.264 MP4)")


def _check_codec(label: str, name: str, limits: VideoLimits) -> None:
    if limits.codecs is not None and name not in limits.codecs:
        accepted = ", ".join(ALLOWED_CODECS.get(c, c) for c in sorted(limits.codecs))
        raise VideoError(f"{label} has {name!r} video; accepted codecs: {accepted} "
                         "(re-encode it, e.g. to an H.264 MP4)")


def _too_long(label: str, seconds: float, limits: VideoLimits) -> VideoError:
    max_s = _limit(limits, "max_seconds", f"{limits.max_seconds:g} s")
    name = limits.names.get("max_seconds")
    return VideoError(
        f"{label} is longer than {max_s} (at least {seconds:.1f} s); trim it"
        + (f" or raise {name}" if name else "")
    )


def _short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__
