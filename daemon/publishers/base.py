"""The one small interface every publisher implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np

from daemon.frames import i420_size


@dataclass(frozen=True)
class MediaFormat:
    width: int
    height: int
    fps: int
    sample_rate: int  # audio published at the session's input rate

    @property
    def samples_per_frame(self) -> float:
        return self.sample_rate / self.fps

    @property
    def frame_bytes(self) -> int:
        """Size of one I420 frame (daemon.frames)."""
        return i420_size(self.width, self.height)


def check_frame(frame: Any, fmt: MediaFormat) -> None:
    """Raises ValueError unless ``frame`` is one flat I420 frame of ``fmt``'s size: a
    wrong buffer handed to the native SDK would be read past its end."""
    expected = fmt.frame_bytes
    if (not isinstance(frame, np.ndarray) or frame.dtype != np.uint8 or frame.ndim != 1
            or frame.size != expected):
        got = (f"{frame.dtype} {frame.shape}" if isinstance(frame, np.ndarray)
               else type(frame).__name__)
        raise ValueError(
            f"frame must be flat I420 uint8 of {expected} bytes for {fmt.width}x{fmt.height} "
            f"(daemon.frames.i420_size), got {got}"
        )


class Publisher(abc.ABC):
    """Receives the session's output one video frame at a time, each with the audio
    samples that play during that frame, so audio and video leave in lockstep.

    Frames are I420 (``daemon.frames``): the layout LiveKit and the H.264 encoder take
    as they are, so no sink converts colours. The session paces calls by a monotonic
    clock (one ``push`` per frame period); ``push`` must not block longer than about one
    frame period. The caller may reuse its buffers once ``push`` returns.
    """

    @abc.abstractmethod
    async def start(self) -> dict[str, Any]:
        """Connect / open, publish the tracks; return where the output goes (sent to
        producers in the start reply and the ready event). Raises LipsyncError."""

    @abc.abstractmethod
    async def push(self, frame: np.ndarray, audio: np.ndarray,
                   timestamp_us: int | None = None) -> None:
        """frame: flat I420 uint8 of ``format.frame_bytes`` (Y, then U, then V);
        audio: (n,) int16 mono at format.sample_rate; timestamp_us: when the frame is
        due, in microseconds on the ``time.monotonic()`` clock and increasing (the
        session passes its tick's due time), None for the time of the call. Sinks with
        a timeline of their own (the MP4's frame count) ignore it."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Flush and release everything; safe to call twice."""

    # Whether the sink keeps each frame's own timestamp (LiveKit does; an MP4 counts
    # frames at a constant rate). Only such a sink lets the session move its frame clock
    # a little earlier when speech starts (Session.rephase): one shorter frame interval.
    variable_frame_interval = False

    def drop_queued(self) -> None:
        """Forget media pushed but not yet played out (an interrupt: the listener must
        not hear the cut utterance's last queued audio). Sinks without a queue: nothing."""

    @property
    def healthy(self) -> bool:
        return True
