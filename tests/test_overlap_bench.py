"""The two-stream probe (``musetalk.overlap_bench``): its rows on the CPU with tiny
weights, its refusal without a GPU, and on a GPU (``-m gpu``) that the captured parts
compute what the daemon's functions compute. Its figures mean something only on a GPU
(docs/BENCHMARKS.md)."""

from __future__ import annotations

import json

import pytest
import torch

from musetalk.overlap_bench import main, measure


def test_the_probe_reports_each_part_and_both_forms_per_batch(tmp_path):
    out = tmp_path / "overlap.json"
    assert main(["--device", "cpu", "--size", "tiny", "--batches", "1,3", "--steps", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["crop_row"] == 108
    assert [row["batch"] for row in result["rows"]] == [1, 3]
    for row in result["rows"]:
        assert min(row["unet_ms"], row["decode_ms"], row["serial_ms"], row["overlap_ms"]) > 0
        assert row["overlap_ms"] == row["serial_ms"] and row["saving_ms"] == 0  # no second stream on a CPU
        assert row["serial_ms_per_frame"] == pytest.approx(row["serial_ms"] / row["batch"], rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for a machine without CUDA")
def test_without_a_gpu_the_probe_says_so_instead_of_measuring(capsys):
    assert main(["--batches", "2"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_a_decode_without_a_crop_row_is_refused():
    with pytest.raises(ValueError, match="crop row"):
        measure([1], 1, device="cpu", size="tiny", crop_row=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_captured_parts_compute_what_the_daemon_s_functions_do():
    from musetalk.bench import build_random_models
    from musetalk.engine import AUDIO_DIM, AUDIO_TOKENS, LATENT_SIZE, Engine
    from musetalk.overlap_bench import _Part, _timed_overlap

    dev = torch.device("cuda")
    models = build_random_models(dev, torch.float16, "tiny")
    engine = Engine(models, compile=False, channels_last=True, max_batch=4, decode="cropped", crop_row=108,
                    upsample="transposed")
    plan = engine.crop_plan
    with torch.inference_mode():
        latents = torch.randn(4, 8, LATENT_SIZE, LATENT_SIZE, device=dev, dtype=torch.float16)
        tokens = torch.randn(4, AUDIO_TOKENS, AUDIO_DIM, device=dev, dtype=torch.float16)
        sums = torch.zeros((4, plan.layers, plan.groups, 2), device=dev)
        unet = _Part(torch.compile(engine._unet_fn, dynamic=False), (latents, tokens), True)
        decode = _Part(torch.compile(engine._crop_fn, dynamic=False), (unet.output.clone(), sums), True)
        assert unet.graph is not None and decode.graph is not None
        want_pred = engine._unet_fn(latents, tokens)
        want_image = engine._crop_fn(decode.inputs[0], sums)
        assert _timed_overlap(unet, decode, 4) > 0
        torch.cuda.synchronize()
        assert torch.allclose(unet.output.float(), want_pred.float(), atol=2e-2)
        assert torch.allclose(decode.output.float(), want_image.float(), atol=2e-2)
