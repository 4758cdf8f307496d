"""Loading MuseTalk's UNet and VAE onto a device, and the preparation-time VAE encode."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from diffusers.utils.torch_utils import randn_tensor

from musetalk.types import FACE_SIZE, LATENT_SIZE
from musetalk.unet import load_unet
from musetalk.vae import crops_to_vae_input, load_vae
from musetalk.weights import ModelFileError, require

log = logging.getLogger(__name__)

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use 'cpu'")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """fp16/bf16 on CUDA as asked (fp16 by default); fp32 on the CPU, where half
    precision convolutions are slow or missing."""
    if isinstance(dtype, str):
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}: use one of {', '.join(_DTYPES)}")
        dtype = _DTYPES[dtype]
    if device.type != "cuda":
        if dtype not in (None, torch.float32):
            log.info("using float32 on %s instead of %s", device, dtype)
        return torch.float32
    return dtype or torch.float16


@dataclass
class MuseTalkModels:
    unet: UNet2DConditionModel
    vae: AutoencoderKL
    device: torch.device
    dtype: torch.dtype

    @property
    def scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latents_dtype(self) -> np.dtype:
        """The host dtype that keeps all of the model's latent precision: float16 for a
        float16 model, float32 otherwise (numpy has no bfloat16; float32 holds it exactly)."""
        return np.dtype(np.float16) if self.dtype == torch.float16 else np.dtype(np.float32)

    @torch.inference_mode()
    def encode_latents(
        self, crops: np.ndarray, seed: int = 0, batch_size: int = 16, pad_batches: bool | None = None
    ) -> np.ndarray:
        """Face crops (B, 256, 256, 3) uint8 RGB -> (B, 8, 32, 32) latents in
        ``latents_dtype`` (float32 for a float32 model: a float16 copy would round away
        precision the model then runs with).

        Channels are [masked 4 | reference 4], each ``scaling_factor *
        vae.encode(x).latent_dist.sample()`` as the reference does; the sample noise
        comes from a generator seeded with ``seed`` so that a cached avatar is
        reproducible. ``pad_batches`` (default: on CUDA) runs a short last batch padded
        to ``batch_size``: the same latents, one batch shape.
        """
        crops = np.asarray(crops)
        if crops.ndim != 4 or crops.shape[1:] != (FACE_SIZE, FACE_SIZE, 3) or crops.dtype != np.uint8:
            raise ValueError(
                f"encode_latents needs uint8 crops of shape (B, {FACE_SIZE}, {FACE_SIZE}, 3), "
                f"got {crops.dtype} {crops.shape}"
            )
        generator = torch.Generator(device=self.device).manual_seed(seed)
        out = np.empty((len(crops), 8, LATENT_SIZE, LATENT_SIZE), dtype=self.latents_dtype)
        for start in range(0, len(crops), batch_size):
            chunk = torch.from_numpy(crops[start : start + batch_size]).to(self.device)
            n = chunk.shape[0]
            masked = crops_to_vae_input(chunk, mask_lower_half=True)
            reference = crops_to_vae_input(chunk, mask_lower_half=False)
            pad = batch_size - n if (self.device.type == "cuda" if pad_batches is None else pad_batches) else 0
            if pad:
                # One batch shape on CUDA (a new one starts cuDNN's algorithm search, GIL
                # held, while other sessions speak); the VAE's rows are independent.
                zeros = masked.new_zeros(pad, *masked.shape[1:])
                masked, reference = torch.cat([masked, zeros]), torch.cat([reference, zeros])
            dist = self.vae.encode(torch.cat([masked, reference]).to(self.dtype)).latent_dist
            if pad:
                rows = torch.cat([torch.arange(n), batch_size + torch.arange(n)]).to(self.device)
                mean, std = dist.mean[rows], dist.std[rows]
            else:
                mean, std = dist.mean, dist.std
            # DiagonalGaussianDistribution.sample's draw, for the real rows only: the
            # latents do not depend on the padding.
            noise = randn_tensor(mean.shape, generator=generator, device=self.device, dtype=dist.parameters.dtype)
            z = (self.scaling_factor * (mean + std * noise)).float()
            out[start : start + n] = torch.cat([z[:n], z[n:]], dim=1).cpu().numpy()
        return out


def load_models(
    model_dir: Path, device: str | torch.device = "auto", dtype: str | torch.dtype | None = None
) -> MuseTalkModels:
    """UNet (musetalkV15) and VAE (sd-vae-ft-mse) from ``model_dir``, on ``device``.

    A missing or unreadable file raises ModelFileError naming it and the download command.
    """
    model_dir = Path(model_dir)
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    paths = require(model_dir, ["unet_config", "unet", "vae_config", "vae"])
    try:
        unet = load_unet(paths["unet_config"], paths["unet"])
    except ValueError as exc:
        raise ModelFileError(paths["unet"], str(exc), model_dir) from exc
    try:
        vae = load_vae(paths["vae"].parent)
    except ValueError as exc:
        raise ModelFileError(paths["vae"], str(exc), model_dir) from exc
    unet.to(dev, dt)
    vae.to(dev, dt)
    return MuseTalkModels(unet=unet, vae=vae, device=dev, dtype=dt)
