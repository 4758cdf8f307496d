"""A publisher that counts and drops: for load tests that measure the model side alone."""

from __future__ import annotations

from typing import Any

import numpy as np

from daemon.publishers.base import MediaFormat, Publisher


class NullPublisher(Publisher):
    def __init__(self, fmt: MediaFormat, session_id: str) -> None:
        self.fmt = fmt
        self.session_id = session_id
        self.frames = 0
        self.samples = 0

    async def start(self) -> dict[str, Any]:
        return {"kind": "none"}

    async def push(self, frame_rgba: np.ndarray, audio: np.ndarray) -> None:
        if frame_rgba.shape != (self.fmt.height, self.fmt.width, 4):
            raise ValueError(f"frame of shape {frame_rgba.shape}, expected {(self.fmt.height, self.fmt.width, 4)}")
        self.frames += 1
        self.samples += len(audio)

    async def aclose(self) -> None:
        pass
