"""Real media made with PyAV for tests."""

from __future__ import annotations

from pathlib import Path

import av
import numpy as np

# Flat, well separated colours survive H.264 nearly unchanged: frame i is PALETTE[i].
PALETTE = np.array(
    [[230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48],
     [145, 30, 180], [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 190]],
    dtype=np.uint8,
)


def write_color_video(path: Path, num_frames: int, size=(64, 48), fps: int = 25) -> np.ndarray:
    """An H.264 MP4 whose frame i is flat PALETTE[i % len]; returns the frames (N,H,W,3)."""
    w, h = size
    frames = np.stack([np.broadcast_to(PALETTE[i % len(PALETTE)], (h, w, 3)) for i in range(num_frames)])
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": "10"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return frames


def decode_video_frames(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        fps = float(stream.average_rate or stream.guessed_rate or 0)
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
    return np.stack(frames), fps


def decode_audio(path: Path) -> tuple[np.ndarray, int]:
    """Mono float32 samples and the rate of the first audio stream."""
    with av.open(str(path)) as container:
        stream = container.streams.audio[0]
        rate = stream.rate
        chunks = [f.to_ndarray().reshape(-1) if f.format.is_planar is False else f.to_ndarray()[0]
                  for f in container.decode(stream)]
    return np.concatenate(chunks).astype(np.float32), rate


def nearest_palette_index(frame: np.ndarray) -> int:
    mean = frame.reshape(-1, 3).mean(axis=0)
    return int(np.argmin(np.abs(PALETTE.astype(np.float32) - mean).sum(axis=1)))
