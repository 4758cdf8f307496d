"""MuseTalk 1.5 UNet: diffusers ``UNet2DConditionModel`` built from ``musetalk.json``.

One call per frame at timestep 0 (single-step latent inpainting, not diffusion):
input [masked 4 | reference 4] x 32 x 32 latents, cross-attention on 50 audio tokens of
width 384, output 4 x 32 x 32 latents. Loading is kept apart from the forward pass.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

# musetalkV15/musetalk.json as published in TMElyralab/MuseTalk. ``sample_size`` is
# nominal: the real latent is 32x32 and the UNet is fully convolutional.
MUSETALK_UNET_CONFIG: dict = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0.dev0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 384,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 8,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ],
}

# Same topology with narrow channels: for CPU tests and formats, never for quality.
TINY_UNET_CONFIG: dict = {
    **MUSETALK_UNET_CONFIG,
    "block_out_channels": [32, 64, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
}



def build_unet(config: dict) -> UNet2DConditionModel:
    """Instantiate the UNet from a musetalk.json-style dict (keys starting with '_' ignored)."""
    kwargs = {k: v for k, v in config.items() if not k.startswith("_")}
    return UNet2DConditionModel(**kwargs)


def read_unet_config(config_path: Path) -> dict:
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read UNet config {config_path}: {exc}") from exc
    for key, want in (("in_channels", 8), ("out_channels", 4), ("cross_attention_dim", 384)):
        if config.get(key) != want:
            raise ValueError(
                f"{config_path}: {key} is {config.get(key)!r}, MuseTalk 1.5 needs {want}; "
                "this is not a MuseTalk musetalk.json"
            )
    return config


def load_unet(config_path: Path, weights_path: Path) -> UNet2DConditionModel:
    """Build the UNet from ``musetalk.json`` and load the plain state dict ``unet.pth`` (CPU)."""
    model = build_unet(read_unet_config(config_path))
    try:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a truncated/corrupt file
        raise ValueError(f"cannot load UNet weights {weights_path}: {exc}") from exc
    if not isinstance(state, dict):
        raise ValueError(f"{weights_path} holds a {type(state).__name__}, expected a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise ValueError(
            f"{weights_path} does not match the UNet described by {config_path}: "
            f"{str(exc).splitlines()[0]}"
        ) from exc
    return model.eval().requires_grad_(False)

