"""Builds daemon/assets/demo.mp4, the avatar that works with no configuration.

The face is scikit-image's ``astronaut.png`` (public domain, NASA). It drifts and
breathes by a few pixels on a sine, one period per clip, so that the idle loop is
seamless and the face tracker sees motion like a real idle video. scikit-image is needed
only to regenerate the file: the daemon reads the committed mp4.

    python -m daemon.demo_avatar daemon/assets/demo.mp4
"""

from __future__ import annotations

import argparse
import math
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

# x/y drift in pixels and zoom amplitude: small enough to read as a still, live head.
_DRIFT_PX = (3.0, 2.0)
_ZOOM = 0.012
_CRF = 20


def _face(size: int) -> np.ndarray:
    try:
        from skimage import data
    except ImportError:
        raise SystemExit(
            "scikit-image is needed to build the demo avatar: pip install scikit-image"
        ) from None
    image = data.astronaut()  # (512, 512, 3) uint8 RGB
    if image.shape[:2] != (size, size):
        image = cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(image)


def demo_frames(seconds: float = 4.0, fps: int = 25, size: int = 512) -> list[np.ndarray]:
    face = _face(size)
    count = max(1, round(seconds * fps))
    center = (size * 0.43, size * 0.27)  # zoom around the face, not the image center
    frames = []
    for i in range(count):
        phase = 2.0 * math.pi * i / count  # whole periods: frame `count` equals frame 0
        scale = 1.0 + _ZOOM * (1.0 - math.cos(phase)) / 2.0
        matrix = cv2.getRotationMatrix2D(center, 0.0, scale)
        matrix[0, 2] += _DRIFT_PX[0] * math.sin(phase)
        matrix[1, 2] += _DRIFT_PX[1] * math.sin(2.0 * phase)
        frames.append(
            cv2.warpAffine(
                face, matrix, (size, size), flags=cv2.INTER_LINEAR,
                borderMode=cv2.BORDER_REFLECT_101,
            )
        )
    return frames


def make_demo_video(path: Path, seconds: float = 4.0, fps: int = 25, size: int = 512) -> Path:
    """Write the demo avatar to ``path`` (H.264, yuv420p, mp4) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width = size
        stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(_CRF), "preset": "slow", "tune": "stillimage"}
        for image in demo_frames(seconds, fps, size):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo avatar video (mp4).")
    parser.add_argument("out", type=Path, help="output file, e.g. daemon/assets/demo.mp4")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--fps", type=int, default=25)
    parser.add_argument("--size", type=int, default=512)
    args = parser.parse_args(argv)
    out = make_demo_video(args.out, args.seconds, args.fps, args.size)
    print(f"{out}: {out.stat().st_size} bytes")


if __name__ == "__main__":
    main()
