"""Subpixel upsampling (``musetalk.subpixel``): nearest 2x + 3x3 convolution computed as
one 2x2 convolution of the input. On the CPU: against diffusers' own ``Upsample2D``, in
the real UNet and VAE architectures (tiny random weights through the real loading code,
and the full-size decoder for the FLOP count), in the cropped decode and in the engine."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from diffusers.models.upsampling import Upsample2D

from musetalk import stages
from musetalk.cropped_decode import decode_rows, decoder_flops, plan_crop
from musetalk.engine import Engine
from musetalk.subpixel import SubpixelUpsample, covers, use_subpixel_upsampling
from musetalk.vae import SD_VAE_FT_MSE_CONFIG, TINY_VAE_CONFIG, build_vae
from tests.test_engine import make_avatar, model_dir, models, tokens  # noqa: F401 (fixtures)

torch.set_num_threads(1)


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 6, 1, 1), (3, 4, 4, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
@torch.inference_mode()
def test_it_is_the_upsampler_s_function(shape, channels_last):
    torch.manual_seed(0)
    b, c, h, w = shape
    up = Upsample2D(c, use_conv=True, out_channels=c + 3).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        up = up.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    expected = up(x)
    got = SubpixelUpsample(up)(x)
    assert got.shape == (b, c + 3, 2 * h, 2 * w)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    if channels_last and h * w > 1:
        assert got.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("shape", [(2, 8, 5, 7), (1, 6, 1, 1), (3, 4, 4, 9)])
@pytest.mark.parametrize("channels_last", [False, True])
@torch.inference_mode()
def test_the_transposed_form_is_the_upsampler_s_function(shape, channels_last):
    torch.manual_seed(0)
    b, c, h, w = shape
    up = Upsample2D(c, use_conv=True, out_channels=c + 3).double()
    x = torch.randn(shape, dtype=torch.float64)
    if channels_last:
        up = up.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    got = SubpixelUpsample(up, "transposed")(x)
    assert got.shape == (b, c + 3, 2 * h, 2 * w)
    torch.testing.assert_close(got, up(x), rtol=0, atol=1e-12)


def test_an_unknown_upsampling_form_is_refused(models):  # noqa: F811
    with pytest.raises(ValueError, match="form 'pixelshuffle' must be one of subpixel, transposed"):
        SubpixelUpsample(Upsample2D(4, use_conv=True), "pixelshuffle")
    with pytest.raises(ValueError, match="upsample 'fast' must be nearest, subpixel or transposed"):
        Engine(copy.deepcopy(models), upsample="fast")


@torch.inference_mode()
def test_another_output_size_goes_to_the_original():
    up = Upsample2D(4, use_conv=True).double()
    x = torch.randn(1, 4, 3, 3, dtype=torch.float64)
    sp = SubpixelUpsample(up)
    torch.testing.assert_close(sp(x, (7, 5)), up(x, (7, 5)), rtol=0, atol=0)
    torch.testing.assert_close(sp(x, (6, 6)), up(x), rtol=0, atol=1e-12)


def test_only_nearest_upsamplers_with_a_3x3_convolution_are_covered():
    assert covers(Upsample2D(4, use_conv=True))
    assert not covers(Upsample2D(4, use_conv=False))
    assert not covers(Upsample2D(4, use_conv_transpose=True))
    assert not covers(Upsample2D(4, use_conv=True, kernel_size=5, padding=2))
    with pytest.raises(ValueError, match="not nearest 2x"):
        SubpixelUpsample(Upsample2D(4, use_conv=False))


@pytest.mark.parametrize("form", ["subpixel", "transposed"])
@torch.inference_mode()
def test_the_models_compute_the_same_with_their_upsamplers_swapped(models, form):  # noqa: F811
    unet, vae = copy.deepcopy(models.unet), copy.deepcopy(models.vae)
    assert use_subpixel_upsampling(unet, form) == sum(b.upsamplers is not None for b in unet.up_blocks) > 0
    assert use_subpixel_upsampling(vae.decoder, form) == len(vae.decoder.up_blocks) - 1
    assert use_subpixel_upsampling(unet, form) == 0  # idempotent
    assert all(m.form == form for m in vae.decoder.modules() if isinstance(m, SubpixelUpsample))
    torch.manual_seed(1)
    latents = torch.randn(3, 8, 32, 32)
    audio = torch.from_numpy(np.stack([tokens(i) for i in range(3)]))
    t = torch.zeros((), dtype=torch.long)
    pred = stages.unet_step(models.unet, latents, audio, t)
    torch.testing.assert_close(stages.unet_step(unet, latents, audio, t), pred, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stages.decode(vae, pred), stages.decode(models.vae, pred), rtol=0, atol=1e-5)


@pytest.mark.parametrize("form", ["subpixel", "transposed"])
@torch.inference_mode()
def test_the_cropped_decode_is_the_same_with_subpixel_upsamplers(form):
    # In float64, so that the forms' different summation orders stay far below the
    # tolerances (in float32 a group's plain sum can cancel to 1e-3 of its terms); the
    # cropped GroupNorm itself computes in float32.
    torch.manual_seed(0)
    vae = build_vae(TINY_VAE_CONFIG).eval().double()
    swapped = copy.deepcopy(vae)
    use_subpixel_upsampling(swapped.decoder, form)
    z = torch.randn(2, 4, 32, 32, dtype=torch.float64)
    plan = plan_crop(vae.decoder, 104)
    assert plan_crop(swapped.decoder, 104) == plan
    whole, sums = decode_rows(vae, z, plan, record=True)
    _, sums_sp = decode_rows(swapped, z, plan, record=True)
    torch.testing.assert_close(sums_sp, sums, rtol=1e-9, atol=1e-9)
    cropped, _ = decode_rows(vae, z, plan, sums)
    cropped_sp, _ = decode_rows(swapped, z, plan, sums)
    torch.testing.assert_close(cropped_sp, cropped, rtol=0, atol=1e-5)
    torch.testing.assert_close(cropped_sp, whole, rtol=0, atol=1e-5)


def test_the_full_size_decoder_s_flops_drop_by_five_ninths_of_its_upsamplers():
    vae = build_vae(SD_VAE_FT_MSE_CONFIG)
    whole, cropped = plan_crop(vae.decoder, 0), plan_crop(vae.decoder, 96)
    before = decoder_flops(vae, whole), decoder_flops(vae, cropped)
    ups = [b.upsamplers[0].conv for b in vae.decoder.up_blocks[:-1]]
    # Upsampler convolutions of the whole decode: 64x64x512x512, 128x128x512x512, 256x256x256x256 (x9x2).
    up_flops = sum(2.0 * (64 * 2 ** i) ** 2 * c.in_channels * c.out_channels * 9 for i, c in enumerate(ups))
    use_subpixel_upsampling(vae.decoder)
    after = decoder_flops(vae, whole), decoder_flops(vae, cropped)
    # 2x2 kernels on (H/2 + 1) x (W/2 + 1) inputs with 4x the outputs: 16/36 of the
    # multiply-adds, plus the padded row and column.
    sub = sum(2.0 * (32 * 2 ** i + 1) ** 2 * c.in_channels * 4 * c.out_channels * 4 for i, c in enumerate(ups))
    assert after[0] == pytest.approx(before[0] - up_flops + sub, rel=1e-9)
    assert after[1] < before[1] * 0.9  # the cropped decode: about -15 %
    assert before[0] / 1e9 == pytest.approx(622.2, abs=0.1)
    # The transposed form: 4 of its 16 taps reach each output pixel, none reads padding.
    vae = build_vae(SD_VAE_FT_MSE_CONFIG)
    use_subpixel_upsampling(vae.decoder, "transposed")
    strided = sum(2.0 * (64 * 2 ** i) ** 2 * c.in_channels * c.out_channels * 4 for i, c in enumerate(ups))
    assert decoder_flops(vae, whole) == pytest.approx(before[0] - up_flops + strided, rel=1e-9)
    assert decoder_flops(vae, cropped) < after[1]


@torch.inference_mode()
def test_the_engine_s_boxes_match_with_subpixel_upsampling(models):  # noqa: F811
    avatar = make_avatar("anna", 3, 96, 128, (40, 20, 88, 68), seed=1)
    audio = np.stack([tokens(i) for i in range(3)])
    out = []
    for upsample in ("nearest", "subpixel", "transposed"):
        eng = Engine(copy.deepcopy(models), max_batch=4, upsample=upsample)
        eng.register_avatar(avatar)
        out.append(eng.launch(["anna"] * 3, [0, 1, 2], torch.from_numpy(audio), [1.0] * 3).boxes())
    assert [len(o) for o in out] == [3, 3, 3]
    for other in out[1:]:
        for a, b in zip(out[0], other):
            assert (a.x1, a.y1, a.x2, a.y2) == (b.x1, b.y1, b.x2, b.y2)
            for pa, pb in ((a.y, b.y), (a.u, b.u), (a.v, b.v)):
                assert np.abs(pa.astype(int) - pb.astype(int)).max() <= 1
    with pytest.raises(ValueError, match="upsample 'bicubic' must be nearest, subpixel or transposed"):
        Engine(models, upsample="bicubic")


def test_the_forms_bench_times_each_form_and_checks_it_against_nearest():
    from musetalk.subpixel import bench

    rows = bench([(2, 8, 5, 6)], iters=1, device="cpu", compiled=False)
    assert [r["shape"] for r in rows] == [[2, 8, 5, 6]]
    for form in ("nearest", "subpixel", "transposed"):
        assert rows[0][f"{form}_ms"] > 0 and rows[0][f"{form}_max_abs"] < 1e-4
