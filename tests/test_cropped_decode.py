"""The cropped VAE decode (``musetalk.cropped_decode``) and its validation per avatar,
on the CPU with tiny random weights through the real loading code (and the full-size
architecture, random weights, for the FLOP count and the row arithmetic)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from musetalk.cropped_decode import decode_rows, decode_to_unit_rows, decoder_flops, first_visible_row, plan_crop
from musetalk.engine import Engine
from musetalk.vae import SD_VAE_FT_MSE_CONFIG, TINY_VAE_CONFIG, build_vae
from tests.test_engine import make_avatar, model_dir, models, tokens  # noqa: F401 (fixtures)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_vae():
    torch.manual_seed(0)
    return build_vae(TINY_VAE_CONFIG).eval()


@torch.inference_mode()
def test_the_whole_plan_is_the_decoder_itself(tiny_vae):
    z = torch.randn(2, 4, 32, 32)
    expected = tiny_vae.decode(z / tiny_vae.config.scaling_factor).sample
    out, sums = decode_rows(tiny_vae, z, plan_crop(tiny_vae.decoder, 0))
    assert sums is None and torch.equal(out, expected)


@torch.inference_mode()
def test_a_crop_with_the_frames_own_sums_gives_the_visible_rows_of_the_whole_decode(tiny_vae):
    z = torch.randn(3, 4, 32, 32)
    expected = tiny_vae.decode(z / tiny_vae.config.scaling_factor).sample
    plan = plan_crop(tiny_vae.decoder, 104)
    recorded, sums = decode_rows(tiny_vae, z, plan, record=True)
    assert torch.equal(recorded, expected[:, :, 104:])  # recording is the whole decode
    assert sums.shape == (3, plan.layers, plan.groups, 2)
    cropped, _ = decode_rows(tiny_vae, z, plan, sums)
    assert cropped.shape == (3, 3, 256 - 104, 256)
    torch.testing.assert_close(cropped, expected[:, :, 104:], rtol=0, atol=2e-4)
    # The [0, 1] faces: the rows the crop leaves out are 0, the rest the decoder's.
    unit = decode_to_unit_rows(tiny_vae, z, plan, sums)
    assert unit.shape == (3, 3, 256, 256) and torch.count_nonzero(unit[:, :, :104]) == 0
    # Another frame's sums (another mouth): close but not exact, which is why it is validated.
    off, _ = decode_rows(tiny_vae, z, plan, sums.roll(1, dims=0))
    assert (off - expected[:, :, 104:]).abs().max() > 1e-3


def test_the_plan_starts_each_stage_its_convolutions_above_the_rows_it_must_deliver():
    vae = build_vae(SD_VAE_FT_MSE_CONFIG)  # full-size architecture (random weights): real stages
    plan = plan_crop(vae.decoder, 104)
    # 256-row stage: upsampler conv + 3 resnets (6 convs) + conv_out = 8 rows up; 128: 7; 64: 7;
    # each start rounded down to an even row (48 - 7 = 41 -> 40; 20 - 7 = 13 -> 12).
    assert plan.starts == (0, 12, 40, 96)
    assert plan.layers == 19 and plan.groups == 32
    assert plan.boundaries[-1] == 103  # conv_norm_out: rows below it feed conv_out's 104..
    whole, cropped = decoder_flops(vae, plan_crop(vae.decoder, 0)), decoder_flops(vae, plan)
    assert 615e9 < whole < 630e9  # the decoder's ~622 GFLOP a frame at 256x256
    assert cropped < 0.75 * whole
    with pytest.raises(ValueError, match="visible_row"):
        plan_crop(vae.decoder, 256)


def _engine(models, crop_row: int, decode: str = "auto") -> Engine:
    return Engine(models, max_batch=4, decode=decode, crop_row=crop_row)


@pytest.fixture(scope="module")
def avatar():
    # Mask from the middle of the face box (4 ramp rows above): face rows from ~108 of 256.
    return make_avatar("anna", 3, 96, 128, (40, 20, 88, 68), seed=1)


def test_first_visible_row_follows_the_mask_and_the_face_box(models, avatar):
    eng = _engine(models, 96)
    eng.register_avatar(avatar)
    av = eng._avatars["anna"]
    # Box row 20 + 24 - 4 is face row 20 of 48: (20 + 0.5) * 256 / 48 - 0.5 = 108.8.
    assert first_visible_row(av.masks, av.geometry) == 108


def test_validation_accepts_a_crop_that_covers_the_blend_and_the_step_then_uses_it(models, avatar):
    eng = _engine(models, 96)
    eng.register_avatar(avatar)
    figures = eng.measure_crop("anna", frames=3)
    assert figures["first_visible_row"] == 108 and figures["crop_row"] == 96
    assert figures["accepted"] is True and figures["reason"] is None, figures
    assert 0 <= figures["mean_abs"] <= 1.0 and figures["max_abs"] >= figures["mean_abs"]
    whole = [np.concatenate([b.y.ravel(), b.u.ravel(), b.v.ravel()]) for b in eng.launch(["anna"] * 3, [0, 1, 2], np.stack([tokens(i) for i in range(3)]),
                                        [1.0] * 3).boxes()]
    eng.enable_crop("anna", figures["sums"])
    cropped = [np.concatenate([b.y.ravel(), b.u.ravel(), b.v.ravel()]) for b in eng.launch(["anna"] * 3, [0, 1, 2], np.stack([tokens(i) for i in range(3)]),
                                          [1.0] * 3).boxes()]
    diffs = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(whole, cropped)]
    assert any(d.max() > 0 for d in diffs)  # the crop did run
    assert max(float(d.mean()) for d in diffs) <= 1.0


def test_validation_refuses_a_crop_row_below_the_first_row_the_blend_shows(models, avatar):
    eng = _engine(models, 160)  # computes face rows 160.. only; the blend shows 108..
    eng.register_avatar(avatar)
    figures = eng.measure_crop("anna")
    assert figures["accepted"] is False and "sums" not in figures
    assert "rows from 108" in figures["reason"] and "model.decode_crop_row" in figures["reason"]
    # Not only the geometry: decoded both ways, the boxes differ well beyond the bound.
    assert figures["mean_abs"] > 1.0, figures
    # Forced ("cropped"): still refused, the rows are missing.
    forced = _engine(models, 160, decode="cropped")
    forced.register_avatar(avatar)
    assert forced.measure_crop("anna")["accepted"] is False


def test_validation_refuses_when_the_cached_sums_do_not_fit_the_avatar(models, avatar):
    eng = _engine(models, 96)
    eng.crop_tolerance = 1e-6  # a bound no approximation meets
    eng.register_avatar(avatar)
    figures = eng.measure_crop("anna")
    assert figures["accepted"] is False and "model.decode_tolerance" in figures["reason"]
    assert figures["mean_abs"] > 1e-6


def test_a_mixed_batch_decodes_whole_until_every_avatar_in_it_is_validated(models, avatar):
    other = make_avatar("ben", 2, 80, 72, (10, 12, 50, 60), seed=2)
    eng = _engine(models, 96)
    eng.register_avatar(avatar)
    eng.register_avatar(other)
    args = (["anna", "ben"], [0, 1], np.stack([tokens(0), tokens(1)]), [1.0, 1.0])
    before = [np.concatenate([b.y.ravel(), b.u.ravel(), b.v.ravel()]) for b in eng.launch(*args).boxes()]
    eng.enable_crop("anna", eng.measure_crop("anna")["sums"])
    mixed = [np.concatenate([b.y.ravel(), b.u.ravel(), b.v.ravel()]) for b in eng.launch(*args).boxes()]  # ben not validated: whole decode
    assert all(np.array_equal(a, b) for a, b in zip(before, mixed))
    with pytest.raises(ValueError, match="do not fit"):
        eng.enable_crop("ben", torch.zeros(1, 2, 3, 2))


def test_the_full_mode_has_no_crop(models):
    eng = _engine(models, 96, decode="full")
    assert eng.crop_plan is None
    with pytest.raises(ValueError, match="off"):
        eng.measure_crop("anna")
    with pytest.raises(ValueError, match="auto, full or cropped"):
        _engine(models, 96, decode="sometimes")


def _count_calls(eng: Engine) -> dict[str, int]:
    """Counts the decodes a step runs: whole, the first crop plan, the higher one."""
    calls = {"whole": 0, "low": 0, "high": 0}
    for name, attr in (("whole", "_decode_fn"), ("low", "_crop_fn"), ("high", "_crop_high_fn")):
        fn = getattr(eng, attr)

        def counted(*args, _fn=fn, _name=name):
            calls[_name] += 1
            return _fn(*args)

        setattr(eng, attr, counted)
    return calls


def test_a_higher_crop_plan_serves_the_avatars_it_covers_and_steps_take_the_lower_when_mixed(models, avatar):
    """crop_row_high: anna's blend starts at face row 108, so a second plan from 104 is
    validated and used for her; one from 112 is refused for her (the first stays); a step
    with an avatar without the higher plan runs the first plan's decode."""
    with pytest.raises(ValueError, match="above crop_row"):
        Engine(models, max_batch=4, decode="auto", crop_row=96, crop_row_high=96)
    eng = Engine(models, max_batch=4, decode="auto", crop_row=96, crop_row_high=104)
    eng.register_avatar(avatar)
    figures = eng.measure_crop("anna", frames=3)
    assert figures["accepted"] is True and figures["high"]["accepted"] is True, figures
    assert figures["high"]["crop_row"] == 104 and figures["high"]["reason"] is None
    assert 0 <= figures["high"]["mean_abs"] <= 1.0
    low, high = eng.crop_plan, eng.crop_plan_high
    assert figures["sums"].shape[1] == low.layers and figures["sums_high"].shape[1] == high.layers
    assert eng.decoder_flops(True, high=True) < eng.decoder_flops(True) < eng.decoder_flops(False)
    eng.enable_crop("anna", figures["sums"], figures["sums_high"])
    calls = _count_calls(eng)
    args = (["anna"] * 3, [0, 1, 2], np.stack([tokens(i) for i in range(3)]), [1.0] * 3)
    eng.launch(*args).boxes()
    assert calls == {"whole": 0, "low": 0, "high": 1}
    # Another avatar with the first plan only: the mixed step decodes under the first plan.
    other = make_avatar("ben", 2, 80, 72, (10, 12, 50, 60), seed=2)
    eng.register_avatar(other)
    eng.enable_crop("ben", torch.zeros(2, low.layers, low.groups, 2))
    eng.launch(["anna", "ben"], [0, 1], np.stack([tokens(0), tokens(1)]), [1.0, 1.0]).boxes()
    assert calls == {"whole": 0, "low": 1, "high": 1}
    with pytest.raises(ValueError, match="higher plan"):
        eng.enable_crop("ben", torch.zeros(2, low.layers, low.groups, 2), torch.zeros(2, 1, 1, 2))

    too_high = Engine(models, max_batch=4, decode="auto", crop_row=96, crop_row_high=112)
    too_high.register_avatar(avatar)
    figures = too_high.measure_crop("anna", frames=3)
    assert figures["accepted"] is True and figures["high"]["accepted"] is False and "sums_high" not in figures
    assert "rows from 108" in figures["high"]["reason"] and "model.decode_crop_row_high" in figures["high"]["reason"]
    too_high.enable_crop("anna", figures["sums"], None)
    calls = _count_calls(too_high)
    too_high.launch(*args).boxes()
    assert calls == {"whole": 0, "low": 1, "high": 0}


def test_the_warm_up_runs_every_decode_and_leaves_no_sums_behind(models):
    eng = Engine(models, max_batch=4, decode="auto", crop_row=96, crop_row_high=104)
    calls = _count_calls(eng)
    timings = eng.warmup(box=96, frame=128)
    assert set(timings) == {1, 4}
    # Per size: whole, first plan, higher plan once each, then three timed steps (higher).
    assert calls == {"whole": 2, "low": 2, "high": 2 + 6}, calls
    assert "\x00warmup" not in eng._avatars
