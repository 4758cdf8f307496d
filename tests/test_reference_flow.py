"""MuseTalk's realtime_inference flow (musetalk.reference_flow) with tiny random models
on the CPU: the figures it reports, and that every frame really went through the blend."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from musetalk.reference_flow import blend_like_reference, run_reference_flow
from tests.test_cli import lipsync

KEYS = {
    "flow", "device", "torch", "dtype", "weights", "avatar", "frames", "batch", "blended_frames",
    "warmup_batches", "cv2_threads", "whisper_s", "generation_s", "generation_frames_per_s",
    "gpu_loop_s", "blend_ms_per_frame", "total_s", "total_frames_per_s",
}


@pytest.fixture(scope="module")
def flow():
    # 30 frames in batches of 20: one full batch and a partial last one.
    return run_reference_flow("cpu", frames=30, size="tiny", keep_frames=(0, 29))


def test_reports_every_figure(flow):
    assert KEYS <= set(flow)
    assert flow["device"] == "cpu" and flow["dtype"] == "float32" and flow["weights"] == "random, tiny size"
    assert flow["frames"] == 30 and flow["blended_frames"] == 30 and flow["batch"] == 20
    for key in ("generation_frames_per_s", "total_frames_per_s"):
        assert math.isfinite(flow[key]) and flow[key] > 0, key
    assert flow["total_frames_per_s"] < flow["generation_frames_per_s"]  # the total includes whisper
    assert flow["whisper_s"] > 0 and flow["total_s"] == pytest.approx(flow["whisper_s"] + flow["generation_s"], abs=1e-3)
    assert 0 < flow["gpu_loop_s"] <= flow["generation_s"]
    json.dumps({k: v for k, v in flow.items() if k != "samples"})  # what --json writes


def test_blended_frames_differ_from_idle_only_inside_the_blend_box(flow):
    assert [s["frame"] for s in flow["samples"]] == [0, 29]
    # Frame 29 of a 50-frame ping-pong avatar is avatar frame 29; frame 0 is frame 0.
    assert [s["avatar_frame"] for s in flow["samples"]] == [0, 29]
    for sample in flow["samples"]:
        blended, idle = sample["blended"], sample["idle"]
        assert blended.shape == idle.shape == (512, 512, 3) and blended.dtype == np.uint8
        x1, y1, x2, y2 = sample["blend_box"]
        changed = np.any(blended != idle, axis=2)
        outside = changed.copy()
        outside[y1:y2, x1:x2] = False
        assert not outside.any(), "pixels changed outside the blend box"
        # The synthetic mask keeps the upper half of the box: the mouth lands below it.
        assert changed[y1 + (y2 - y1) // 2 : y2, x1:x2].sum() > 1000
        assert not changed[y1 : y1 + (y2 - y1) // 2].any()


def test_blend_pastes_the_face_through_the_mask():
    """``get_image_blending`` on known pixels: the face lands in its face box where the
    mask is 255, the frame stays where it is 0, and a 128 mask mixes them."""
    image = np.full((40, 40, 3), 10, np.uint8)
    face = np.full((10, 10, 3), 210, np.uint8)
    mask = np.zeros((20, 20), np.uint8)
    mask[10:, :] = 255
    mask[10:, :7] = 128  # crop columns 0-6: frame columns 10-16, the face starts at 15
    out = blend_like_reference(image, face, (15, 15, 25, 25), mask, (10, 10, 30, 30))
    assert (out[20:25, 20:25] == 210).all()  # face box, mask 255
    assert (out[15:20, 15:25] == 10).all()  # face box, mask 0
    assert (abs(out[20:25, 10:15].astype(int) - 10) <= 1).all()  # mask 128 outside the face: frame
    assert (out[20:25, 15] == 110).all()  # mask 128 inside the face: half and half
    assert (out[:10] == 10).all() and (out[30:] == 10).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"frames": 0}, "frames must be a positive integer"),
    ({"batch": 0}, "batch must be a positive integer"),
    ({"size": "huge"}, "size must be one of full, tiny"),
    ({"keep_frames": (5,), "frames": 5}, r"keep_frames \[5\] lie outside the 5 frames"),
])
def test_bad_arguments_are_clear_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_reference_flow("cpu", **{"size": "tiny", **kwargs})


def test_cli_runs_the_reference_flow(tmp_path):
    out_json = tmp_path / "ref.json"
    out = lipsync("bench", "--reference-flow", "--size", "tiny", "--device", "cpu", "--frames", "20",
                  "--json", str(out_json), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert KEYS <= set(result) and "samples" not in result
    assert result["frames"] == result["blended_frames"] == 20
    assert result["generation_frames_per_s"] > 0
    assert "frames/s generation+blend" in out.stdout
    bad = lipsync("bench", "--reference-flow", "--frames", "0", "--device", "cpu")
    assert bad.returncode == 2 and "must be at least 1" in bad.stderr
