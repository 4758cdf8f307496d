"""RGB -> I420 on the device, in the same integer arithmetic as ``daemon.frames.rgb_to_i420``
(BT.601 limited range, libyuv's fixed point, chroma from the rounded 2x2 mean), so that a
generated box and the idle frame around it convert to identical colours."""

from __future__ import annotations

import torch


def rgb_to_i420_planes(rgb: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, H, W, 3) uint8 with even H and W -> Y (B, H, W), U and V (B, H/2, W/2) uint8."""
    if rgb.ndim != 4 or rgb.shape[-1] != 3 or rgb.shape[1] % 2 or rgb.shape[2] % 2:
        raise ValueError(f"expected (B, H, W, 3) with even H and W, got {tuple(rgb.shape)}")
    c = rgb.to(torch.int32)
    r, g, b = c[..., 0], c[..., 1], c[..., 2]
    y = torch.bitwise_right_shift(66 * r + 129 * g + 25 * b + 128, 8) + 16
    n, h, w, _ = c.shape
    blocks = c.view(n, h // 2, 2, w // 2, 2, 3).sum(dim=(2, 4))
    avg = torch.bitwise_right_shift(blocks + 2, 2)
    r, g, b = avg[..., 0], avg[..., 1], avg[..., 2]
    u = torch.bitwise_right_shift(-38 * r - 74 * g + 112 * b + 128, 8) + 128
    v = torch.bitwise_right_shift(112 * r - 94 * g - 18 * b + 128, 8) + 128
    return y.to(torch.uint8), u.to(torch.uint8), v.to(torch.uint8)


def pack_i420(y: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Planes of a batch -> (B, H*W*3/2) flat I420 rows (one contiguous copy-out)."""
    n = y.shape[0]
    return torch.cat([y.reshape(n, -1), u.reshape(n, -1), v.reshape(n, -1)], dim=1)
