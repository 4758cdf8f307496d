"""Shared by the tools that run the daemon in-process and measure what it recorded
(`lipsync demo`, `lipsync loadtest`, `python -m daemon.soak`)."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import Settings
from daemon.log import configure_logging

SAMPLE_WAV = Path(__file__).parent / "assets" / "speech.wav"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def in_process_settings(settings: Settings, **sections: dict[str, Any]) -> Settings:
    """The settings for a daemon run inside a tool: its own embedded NATS on a free
    loopback port (so a running lipsyncd is not disturbed), health on a free port,
    console logs at WARNING; ``sections`` override fields section by section. Also
    configures logging accordingly."""
    o = settings.model_dump()
    o["nats"].update(url="embedded", embedded_port=free_port())
    o["http"]["port"] = 0
    o["logging"].update(format="console", level="WARNING")
    for section, fields in sections.items():
        o[section].update(fields)
    s = Settings(**o)
    configure_logging(s.logging.level, s.logging.format)
    if s.model.enabled:
        from daemon.log import quiet_model_libraries

        quiet_model_libraries()
    return s


@dataclass
class Recording:
    frames: int
    audio_s: float
    mouth_change: list[float]  # per frame: mean |frame - idle frame| inside the blend box
    voiced: np.ndarray  # per frame: its audio is above the pipeline's silence threshold


def read_recording(path: Path, idle: np.ndarray, blend_boxes: np.ndarray | None, fps: int) -> Recording:
    """Decode a session's MP4 frame by frame and measure, per video frame, how far the
    mouth is from the idle video (against the ping-pong idle frame of the same tick) and
    whether its audio is voiced, as the pipeline gates the mouth."""
    import av

    from daemon.session import pingpong_index
    from daemon.speech import SILENCE_DBFS, level_dbfs

    change: list[float] = []
    n = 0
    with av.open(str(path)) as c:
        for n, frame in enumerate(c.decode(video=0), start=1):
            if blend_boxes is not None:
                img = frame.to_ndarray(format="rgb24")
                i = pingpong_index(n - 1, len(idle))
                x1, y1, x2, y2 = blend_boxes[i]
                change.append(float(np.abs(img[y1:y2, x1:x2].astype(np.int16)
                                           - idle[i][y1:y2, x1:x2].astype(np.int16)).mean()))
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].rate
        audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)]).astype(np.float32)
    spf = rate // fps
    frames = audio[: len(audio) // spf * spf].reshape(-1, spf) * 32768.0  # int16 scale
    voiced = level_dbfs(frames) > SILENCE_DBFS
    return Recording(frames=n, audio_s=round(len(audio) / rate, 2), mouth_change=change, voiced=voiced)
