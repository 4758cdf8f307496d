"""Numerical fidelity of avatar preparation: the VAE input layout and the precision the
latents keep from the encoder to the disk cache and back."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from musetalk import avatar as av
from musetalk.bench import _idle_video, build_random_models
from musetalk.landmarks import HaarTemplateLandmarker
from musetalk.vae import TINY_VAE_CONFIG, build_vae, crops_to_vae_input


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_vae_input_is_contiguous_and_encodes_like_a_contiguous_input():
    """A channels-last strided input costs the encoder's GroupNorms precision (tiny VAE
    on the CPU: 4.4e-6 relative L2; full size on a GPU: 3.5e-4). A contiguous input
    encodes exactly like an independently built contiguous copy."""
    crops = np.random.default_rng(0).integers(0, 256, (2, 256, 256, 3), dtype=np.uint8)
    reference = np.ascontiguousarray(crops.astype(np.float32).transpose(0, 3, 1, 2) / 255.0)
    masked = reference.copy()
    masked[:, :, 128:, :] = 0.0
    for mask, want in ((False, reference), (True, masked)):
        x = crops_to_vae_input(torch.from_numpy(crops), mask_lower_half=mask)
        assert x.is_contiguous(), f"mask_lower_half={mask}: strides {x.stride()}"
        np.testing.assert_allclose(x.numpy(), (want - 0.5) / 0.5, rtol=0, atol=1e-6)

    torch.manual_seed(0)
    vae = build_vae(TINY_VAE_CONFIG).eval()
    with torch.inference_mode():
        ours = vae.encode(crops_to_vae_input(torch.from_numpy(crops), False)).latent_dist.mean
        ref = vae.encode(torch.from_numpy((reference - 0.5) / 0.5)).latent_dist.mean
    assert _rel_l2(ours, ref) < 1e-6


@pytest.fixture(scope="module")
def float32_models():
    return build_random_models(torch.device("cpu"), torch.float32, "tiny")


@pytest.fixture(scope="module")
def float32_avatar(float32_models):
    frames = _idle_video(0.12)  # 3 frames of a real face
    return av.prepare_avatar(
        frames, 25.0, landmarker=HaarTemplateLandmarker(),
        encode_latents=float32_models.encode_latents, key="fp32",
    )


def test_float32_model_keeps_float32_latents_through_the_cache(float32_models, float32_avatar, tmp_path):
    assert float32_models.latents_dtype == np.float32
    latents = float32_avatar.latents
    assert latents.dtype == np.float32
    # Really float32 values, not float16 ones widened: a float16 round trip changes them.
    assert not np.array_equal(latents, latents.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(latents, float32_models.encode_latents(av.face_crops(float32_avatar)))

    d = tmp_path / "fp32"
    av.save_prepared(float32_avatar, d)
    assert json.loads((d / av.META_FILE).read_text())["latents_dtype"] == "float32"
    loaded = av.load_prepared(d, key="fp32", latents_dtype=float32_models.latents_dtype)
    assert loaded.latents.dtype == np.float32
    np.testing.assert_array_equal(loaded.latents, latents)
    again, cached = av.load_or_prepare(
        d, "fp32", lambda: pytest.fail("a valid float32 cache was rebuilt"),
        latents_dtype=float32_models.latents_dtype,
    )
    assert cached and np.array_equal(again.latents, latents)


def test_a_float16_cache_is_not_reused_for_a_float32_model(float32_models, float32_avatar, tmp_path):
    d = tmp_path / "fp16"
    narrowed = av.PreparedAvatar(**{**vars(float32_avatar), "latents": float32_avatar.latents.astype(np.float16)})
    av.save_prepared(narrowed, d)
    assert av.load_prepared(d).latents.dtype == np.float16  # stored as it was, not widened
    with pytest.raises(av.CacheInvalid, match="float16 latents; the model needs float32"):
        av.load_prepared(d, key="fp32", latents_dtype=np.float32)

    calls = []

    def prepare():
        calls.append(1)
        return float32_avatar

    out, cached = av.load_or_prepare(d, "fp32", prepare, latents_dtype=float32_models.latents_dtype)
    assert not cached and calls == [1] and out.latents.dtype == np.float32
    out, cached = av.load_or_prepare(d, "fp32", prepare, latents_dtype=np.float32)
    assert cached and calls == [1]
    np.testing.assert_array_equal(out.latents, float32_avatar.latents)
    # A float16 model may use the wider cache: the engine casts on upload.
    assert av.load_prepared(d, latents_dtype=np.float16).latents.dtype == np.float32


def test_a_version_1_cache_is_rebuilt(float32_avatar, tmp_path):
    """Version 1 caches stored float16 latents whatever the model ran in, and do not say so."""
    d = tmp_path / "v1"
    av.save_prepared(float32_avatar, d)
    meta = json.loads((d / av.META_FILE).read_text())
    meta["format_version"] = 1
    del meta["latents_dtype"]
    (d / av.META_FILE).write_text(json.dumps(meta))
    with pytest.raises(av.CacheInvalid, match="format version 1"):
        av.load_prepared(d)
