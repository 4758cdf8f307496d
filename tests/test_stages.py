"""Each MuseTalk stage alone (musetalk.stages), against the reference math."""

from __future__ import annotations

import numpy as np
import torch

from musetalk import stages
from musetalk.audio import frame_tokens
from musetalk.vae import decode_to_unit
from tests.test_engine import model_dir, models  # noqa: F401 (fixtures)

torch.set_num_threads(1)


def test_tokens_from_windows_equals_the_reference_windowing():
    windows = np.random.default_rng(0).standard_normal((3, 10, 5, 384)).astype(np.float32)
    got = stages.tokens_from_windows(torch.from_numpy(windows)).numpy()
    for i in range(3):
        np.testing.assert_allclose(got[i], frame_tokens(windows[i]), atol=1e-6)


def test_unet_step_and_decode_are_the_models_calls(models):
    torch.manual_seed(0)
    latents, tokens = torch.randn(2, 8, 32, 32), torch.randn(2, 50, 384)
    t0 = torch.zeros((), dtype=torch.long)
    with torch.inference_mode():
        pred = stages.unet_step(models.unet, latents, tokens, t0)
        assert pred.shape == (2, 4, 32, 32)
        torch.testing.assert_close(pred, models.unet(latents, t0, encoder_hidden_states=tokens).sample)
        face = stages.decode(models.vae, pred)
        assert face.shape == (2, 3, 256, 256) and float(face.min()) >= 0 and float(face.max()) <= 1
        torch.testing.assert_close(face, decode_to_unit(models.vae, pred))


def test_paste_blends_only_inside_the_mask_and_face_box():
    rng = np.random.default_rng(1)
    base = torch.from_numpy(rng.integers(0, 256, (2, 40, 40, 3), dtype=np.uint8))
    mask = torch.zeros((2, 40, 40), dtype=torch.uint8)
    mask[:, 20:, :] = 255
    face = torch.ones((2, 3, 256, 256))  # white
    # Box at (100, 100); face box (110, 110)-(130, 130): inside the box at 10..30.
    geometry = torch.tensor([[100, 100, 140, 140, 110, 110, 130, 130]] * 2, dtype=torch.float32)
    out = stages.paste(face, base, mask, geometry, torch.tensor([1.0, 0.0]))
    np.testing.assert_array_equal(out[1].numpy(), base[1].numpy())  # blend 0: the idle pixels
    changed = (out[0] != base[0]).any(-1).numpy()
    assert changed[20:30, 10:30].all() and (out[0].numpy()[20:30, 10:30] == 255).all()
    assert not changed[:20].any() and not changed[30:].any() and not changed[:, :10].any()
