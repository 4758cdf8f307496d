"""The one small interface every publisher implements."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class MediaFormat:
    width: int
    height: int
    fps: int
    sample_rate: int  # audio published at the session's input rate

    @property
    def samples_per_frame(self) -> float:
        return self.sample_rate / self.fps


class Publisher(abc.ABC):
    """Receives the session's output one video frame at a time, each with the audio
    samples that play during that frame, so audio and video leave in lockstep.

    The session paces calls by a monotonic clock (one ``push`` per frame period);
    ``push`` must not block longer than about one frame period.
    """

    @abc.abstractmethod
    async def start(self) -> dict[str, Any]:
        """Connect / open, publish the tracks; return where the output goes (sent to
        producers in the start reply and the ready event). Raises LipsyncError."""

    @abc.abstractmethod
    async def push(self, frame_rgba: np.ndarray, audio: np.ndarray) -> None:
        """frame_rgba: (H, W, 4) uint8; audio: (n,) int16 mono at format.sample_rate."""

    @abc.abstractmethod
    async def aclose(self) -> None:
        """Flush and release everything; safe to call twice."""

    @property
    def healthy(self) -> bool:
        return True
