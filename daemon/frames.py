"""Video frames as the publishers receive them: I420 (planar YUV 4:2:0), one flat array.

Layout of a W x H frame (the layout LiveKit's ``VideoBufferType.I420`` and FFmpeg's
``yuv420p`` read): the Y plane (H rows of W bytes), then U and V, each ceil(H/2) rows of
ceil(W/2) bytes. Colours are BT.601 limited range in libyuv's fixed-point arithmetic;
chroma is computed from the rounded mean of each 2x2 block (an odd last row/column is
replicated). The same integer formula runs on the GPU for generated mouth boxes
(``musetalk.color``), so idle pixels and generated pixels convert identically.

A generated frame leaves the GPU as a box (``musetalk.types.GeneratedBox``): the I420 planes of the blended
region only, on even coordinates, so that its chroma blocks are whole. The session
writes it into a copy of the avatar's idle I420 frame (``compose``).
"""

from __future__ import annotations

import numpy as np

from musetalk.types import GeneratedBox  # numpy only: no torch on this side


def i420_size(width: int, height: int) -> int:
    cw, ch = (width + 1) // 2, (height + 1) // 2
    return width * height + 2 * cw * ch


def planes(frame: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Views (Y, U, V) into a flat I420 frame."""
    cw, ch = (width + 1) // 2, (height + 1) // 2
    n = width * height
    y = frame[:n].reshape(height, width)
    u = frame[n : n + cw * ch].reshape(ch, cw)
    v = frame[n + cw * ch : n + 2 * cw * ch].reshape(ch, cw)
    return y, u, v


_Y_COEFFS = np.array([66, 129, 25], np.float32)
_UV_COEFFS = np.array([[-38, 112], [-74, -94], [112, -18]], np.float32)


def rgb_to_i420(rgb: np.ndarray) -> np.ndarray:
    """(H, W, 3 or 4) uint8 RGB(A) -> flat I420 uint8 of ``i420_size(W, H)`` bytes.

    The integer formula (``(66R + 129G + 25B + 128) >> 8`` and so on) evaluated with
    float32 matrix products: every intermediate is an integer below 2**24, so the result
    is exact, and floor division equals the arithmetic shift, negatives included."""
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise ValueError(f"expected (H, W, 3|4) uint8, got {rgb.dtype} {rgb.shape}")
    h, w = rgb.shape[:2]
    c = rgb[..., :3]
    out = np.empty(i420_size(w, h), dtype=np.uint8)
    y, u, v = planes(out, w, h)
    y[:] = np.floor((c.astype(np.float32) @ _Y_COEFFS + 128) / 256) + 16
    eh, ew = h + (h & 1), w + (w & 1)
    c16 = c.astype(np.uint16)
    if (eh, ew) != (h, w):
        c16 = np.pad(c16, ((0, eh - h), (0, ew - w), (0, 0)), mode="edge")
    block = c16[0::2, 0::2] + c16[1::2, 0::2] + c16[0::2, 1::2] + c16[1::2, 1::2]
    avg = ((block + 2) >> 2).astype(np.float32)
    uv = np.floor((avg @ _UV_COEFFS + 128) / 256) + 128
    u[:] = uv[..., 0]
    v[:] = uv[..., 1]
    return out


def i420_to_rgb(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """Flat I420 -> (H, W, 3) uint8 RGB (BT.601 limited range); for checks and previews."""
    y, u, v = planes(frame, width, height)
    yf = y.astype(np.float32) - 16.0
    uf = np.repeat(np.repeat(u.astype(np.float32) - 128.0, 2, 0), 2, 1)[:height, :width]
    vf = np.repeat(np.repeat(v.astype(np.float32) - 128.0, 2, 0), 2, 1)[:height, :width]
    r = 1.164 * yf + 1.596 * vf
    g = 1.164 * yf - 0.392 * uf - 0.813 * vf
    b = 1.164 * yf + 2.017 * uf
    return np.clip(np.stack([r, g, b], -1).round(), 0, 255).astype(np.uint8)


def even_box(x1: int, y1: int, x2: int, y2: int, width: int, height: int) -> tuple[int, int, int, int]:
    """The smallest box on even coordinates that holds (x1, y1, x2, y2), inside the
    frame (the right/bottom edge may be the frame's odd edge)."""
    return x1 - (x1 & 1), y1 - (y1 & 1), min(width, x2 + (x2 & 1)), min(height, y2 + (y2 & 1))


def compose(idle: np.ndarray, box: GeneratedBox, width: int, height: int) -> np.ndarray:
    """A new I420 frame: the idle frame with the box written in (the idle frame is only
    read)."""
    frame = idle.copy()
    fy, fu, fv = planes(frame, width, height)
    fy[box.y1 : box.y2, box.x1 : box.x2] = box.y
    cx1, cy1 = box.x1 // 2, box.y1 // 2
    fu[cy1 : cy1 + box.u.shape[0], cx1 : cx1 + box.u.shape[1]] = box.u
    fv[cy1 : cy1 + box.v.shape[0], cx1 : cx1 + box.v.shape[1]] = box.v
    return frame
