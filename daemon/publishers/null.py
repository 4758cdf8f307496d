"""A publisher that counts and drops: for load tests that measure the model side alone."""

from __future__ import annotations

from typing import Any

import numpy as np

from daemon.publishers.base import MediaFormat, Publisher, check_frame


class NullPublisher(Publisher):
    def __init__(self, fmt: MediaFormat, session_id: str) -> None:
        self.fmt = fmt
        self.session_id = session_id
        self.frames = 0
        self.samples = 0

    async def start(self) -> dict[str, Any]:
        return {"kind": "none"}

    async def push(self, frame: np.ndarray, audio: np.ndarray,
                   timestamp_us: int | None = None) -> None:
        check_frame(frame, self.fmt)
        self.frames += 1
        self.samples += len(audio)

    async def aclose(self) -> None:
        pass
