"""Data shared between avatar preparation, audio features and the engine.

Plain containers: numpy on the host, so that they can be cached on disk and handed to
the daemon without importing torch types into its signatures.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# MuseTalk works on 256x256 face crops and 32x32x4 latents (VAE factor 8).
FACE_SIZE = 256
LATENT_SIZE = 32
AUDIO_TOKENS = 50  # 10 feature frames x 5 whisper hidden states
AUDIO_DIM = 384  # whisper-tiny d_model


@dataclass
class PreparedAvatar:
    """Everything the engine needs about one idle video, per frame.

    ``face_boxes[i]`` is the region of ``frames[i]`` that the 256x256 face crop maps to
    (x1, y1, x2, y2, exclusive ends). ``blend_boxes[i]`` is the larger region (1.5x the
    face box, clipped to the frame) over which ``masks[i]`` (uint8 0..255, shape
    (y2-y1, x2-x1) of the blend box) mixes the generated face into the frame.
    ``latents[i]`` is [masked 4 | reference 4] x 32 x 32, already scaled by the VAE's
    scaling factor.
    """

    key: str
    fps: float
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    face_boxes: np.ndarray  # (N, 4) int32
    blend_boxes: np.ndarray  # (N, 4) int32
    masks: list[np.ndarray]  # N x (bh, bw) uint8
    latents: np.ndarray  # (N, 8, 32, 32) float16 or float32 (the encoder's precision)
    landmark_source: str = "unknown"
    timings_ms: dict[str, float] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])


@dataclass
class FrameJob:
    """One frame to generate: which avatar frame, which audio, how strongly to blend.

    ``blend`` in [0, 1] scales the blend mask: 0 returns the idle frame untouched, 1 the
    full MuseTalk mouth. Ramping it over a few frames fades speech in and out.
    """

    avatar_key: str
    frame_index: int
    audio_tokens: np.ndarray  # (50, 384) float32
    blend: float = 1.0


@dataclass
class GeneratedBox:
    """A generated frame as it leaves the device: the I420 planes of its box.

    (x1, y1)-(x2, y2) is the avatar frame's blend box widened to even coordinates; y is
    (y2-y1, x2-x1), u and v are half that in each direction. Written into the idle I420
    frame ``frame_index`` of the avatar, it gives the generated frame.
    """

    avatar_key: str
    frame_index: int
    x1: int
    y1: int
    x2: int
    y2: int
    y: np.ndarray
    u: np.ndarray
    v: np.ndarray
