"""The Stable Diffusion VAE (``stabilityai/sd-vae-ft-mse``) as MuseTalk uses it.

Encoder: once per avatar frame at preparation (masked and reference crops).
Decoder: once per generated frame; it is most of the per-frame compute.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import AutoencoderKL

# config.json of stabilityai/sd-vae-ft-mse. It has no scaling_factor: diffusers'
# default 0.18215 applies and is read back from ``vae.config.scaling_factor``.
SD_VAE_FT_MSE_CONFIG: dict = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

# Four blocks keep the factor-8 downsampling (256 -> 32) with a fraction of the width.
TINY_VAE_CONFIG: dict = {
    **SD_VAE_FT_MSE_CONFIG,
    "block_out_channels": [8, 16, 16, 16],
    "layers_per_block": 1,
    "norm_num_groups": 8,
}


def build_vae(config: dict) -> AutoencoderKL:
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return AutoencoderKL(**kwargs)


def load_vae(vae_dir: Path) -> AutoencoderKL:
    """``AutoencoderKL.from_pretrained`` on a local sd-vae-ft-mse folder (no network)."""
    try:
        vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True)
    except Exception as exc:  # diffusers raises OSError/ValueError/EnvironmentError variants
        raise ValueError(f"cannot load the VAE from {vae_dir}: {exc}") from exc
    if len(vae.config.block_out_channels) != 4 or vae.config.latent_channels != 4:
        raise ValueError(
            f"{vae_dir}/config.json: MuseTalk needs a 4-block, 4-channel VAE "
            "(factor 8: 256x256 -> 32x32), like stabilityai/sd-vae-ft-mse"
        )
    return vae.eval().requires_grad_(False)


def crops_to_vae_input(crops_u8: torch.Tensor, mask_lower_half: bool) -> torch.Tensor:
    """(B, 256, 256, 3) uint8 RGB -> (B, 3, 256, 256) float32 in [-1, 1], contiguous.

    The masked copy zeroes the lower half *before* normalization, so it becomes -1
    there, as the reference does.

    Contiguous on purpose: the permuted view is channels-last strided, the encoder's
    convolutions keep that layout, and its GroupNorms then lose precision (full-size
    VAE: latents off by 3.5e-4 relative L2 instead of 7e-7). The copy is made while the
    crops are still uint8, where it is cheapest.
    """
    x = crops_u8.permute(0, 3, 1, 2).contiguous().float() / 255.0
    if mask_lower_half:
        x = x.clone()
        x[:, :, x.shape[2] // 2 :, :] = 0.0
    return (x - 0.5) / 0.5


def decode_to_unit(vae: AutoencoderKL, latents: torch.Tensor) -> torch.Tensor:
    """Scaled latents (B, 4, 32, 32) -> image (B, 3, 256, 256) in [0, 1], VAE dtype."""
    image = vae.decode(latents / vae.config.scaling_factor).sample
    return (image / 2 + 0.5).clamp(0, 1)
