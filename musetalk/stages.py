"""The stages of one MuseTalk 1.5 frame as small functions on device tensors, each
testable alone; ``musetalk.engine`` composes them into a batched step.

audio tokens (``tokens_from_windows``) -> UNet at timestep 0 (``unet_step``) -> VAE decode
to [0, 1] (``decode``) -> blend into the avatar's blend box (``paste``) -> I420
(``musetalk.color``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from musetalk.audio import positional_encoding
from musetalk.types import AUDIO_DIM, AUDIO_TOKENS
from musetalk.vae import decode_to_unit

_PE: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}


def tokens_from_windows(windows: torch.Tensor) -> torch.Tensor:
    """[B, 10, 5, 384] feature windows -> [B, 50, 384] tokens (token = frame * 5 + layer)
    plus the sinusoidal positional encoding, in the windows' dtype (added in float32)."""
    if windows.shape[1:] != (10, 5, AUDIO_DIM):
        raise ValueError(f"feature windows must be [B, 10, 5, {AUDIO_DIM}], got {tuple(windows.shape)}")
    key = (windows.device, windows.dtype)
    pe = _PE.get(key)
    if pe is None:
        pe = _PE[key] = torch.from_numpy(positional_encoding()).to(windows.device)
    flat = windows.reshape(windows.shape[0], AUDIO_TOKENS, AUDIO_DIM).float() + pe
    return flat.to(windows.dtype)


def unet_step(unet, latents: torch.Tensor, tokens: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """One single-step inpainting call: [B, 8, 32, 32] latents + [B, 50, 384] tokens ->
    [B, 4, 32, 32] predicted latents."""
    return unet(latents, timestep, encoder_hidden_states=tokens).sample


def decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Predicted (scaled) latents -> [B, 3, 256, 256] faces in [0, 1]."""
    return decode_to_unit(vae, latents)


def paste(face: torch.Tensor, base: torch.Tensor, mask: torch.Tensor, geometry: torch.Tensor,
          blend: torch.Tensor) -> torch.Tensor:
    """Blend decoded faces into their boxes: (B, Hb, Wb, 3) uint8 RGB.

    face: [B, 3, 256, 256] in [0, 1]; base: (B, Hb, Wb, 3) uint8, the idle pixels of each
    box; mask: (B, Hb, Wb) uint8 soft mask; geometry: (B, 8) float32, the box origin
    (x1, y1, _, _) then the face box (x1, y1, x2, y2) in frame coordinates; blend: (B,)
    in [0, 1] scaling the mask. As the reference, the face is quantized to uint8 before it
    is resized (bilinear with cv2.resize's half-pixel mapping) to the face box.
    """
    n, hb, wb = mask.shape
    dev = face.device
    face = (torch.nan_to_num(face.float(), nan=0.5) * 255).round()
    bx1, by1, fx1, fy1 = geometry[:, 0], geometry[:, 1], geometry[:, 4], geometry[:, 5]
    fw, fh = geometry[:, 6] - fx1, geometry[:, 7] - fy1
    u = torch.arange(wb, device=dev, dtype=torch.float32)
    v = torch.arange(hb, device=dev, dtype=torch.float32)
    fx = (bx1 - fx1)[:, None] + u[None, :]  # (B, Wb) face-box x of each box column
    fy = (by1 - fy1)[:, None] + v[None, :]  # (B, Hb)
    gx = (2 * (fx + 0.5) / fw[:, None] - 1)[:, None, :].expand(n, hb, wb)
    gy = (2 * (fy + 0.5) / fh[:, None] - 1)[:, :, None].expand(n, hb, wb)
    resized = F.grid_sample(face, torch.stack([gx, gy], dim=-1), mode="bilinear",
                            padding_mode="border", align_corners=False).round().permute(0, 2, 3, 1)
    inside = ((fx >= 0) & (fx < fw[:, None]))[:, None, :] & ((fy >= 0) & (fy < fh[:, None]))[:, :, None]
    weight = ((mask.float() / 255.0) * blend.clamp(0, 1)[:, None, None] * inside)[..., None]
    base_f = base.float()
    mixed = torch.lerp(base_f, resized, weight).round().clamp_(0, 255)
    # Where the weight is zero the result is the idle pixel itself, bit for bit.
    return torch.where(weight > 0, mixed, base_f).to(torch.uint8)
