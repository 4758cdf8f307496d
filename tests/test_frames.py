"""I420 frames: the host and device conversions agree bit for bit, and the engine's
box-only output composed into the idle frame equals the full-frame path exactly."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from daemon.frames import compose, i420_size, i420_to_rgb, planes, rgb_to_i420
from daemon.avatars import idle_i420
from musetalk.color import pack_i420, rgb_to_i420_planes
from musetalk.engine import Engine, buckets, even_boxes
from musetalk.types import FrameJob
from tests.test_engine import avatars, make_avatar, model_dir, models, tokens  # noqa: F401 (fixtures)

torch.set_num_threads(1)


def test_host_and_device_conversions_are_identical():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (3, 36, 50, 3), dtype=np.uint8)
    y, u, v = rgb_to_i420_planes(torch.from_numpy(rgb))
    packed = pack_i420(y, u, v).numpy()
    for i in range(3):
        np.testing.assert_array_equal(packed[i], rgb_to_i420(rgb[i]))


def test_conversion_is_bt601_limited_range():
    rng = np.random.default_rng(1)
    rgb = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    back = i420_to_rgb(rgb_to_i420(rgb), 32, 24)
    # Luma exact to rounding; chroma subsampling costs detail, so compare 2x2 means.
    mean = lambda a: a.astype(np.float32).reshape(12, 2, 16, 2, 3).mean(axis=(1, 3))  # noqa: E731
    assert np.abs(mean(back) - mean(rgb)).mean() < 6.0
    grey = np.full((4, 4, 3), 128, np.uint8)
    y, u, v = planes(rgb_to_i420(grey), 4, 4)
    assert (y == 126).all() and (u == 128).all() and (v == 128).all()
    white = rgb_to_i420(np.full((2, 2, 3), 255, np.uint8))
    assert list(white) == [235] * 4 + [128, 128]


def test_odd_sizes_have_rounded_up_chroma():
    rgb = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    out = rgb_to_i420(rgb)
    assert out.shape == (i420_size(7, 5),) == (7 * 5 + 2 * 4 * 3,)
    with pytest.raises(ValueError, match="uint8"):
        rgb_to_i420(rgb.astype(np.float32))


def test_even_boxes_hold_the_blend_box_on_whole_chroma_blocks():
    boxes = even_boxes(np.array([[3, 5, 10, 11], [0, 0, 7, 9]]), 9, 10)
    assert boxes.tolist() == [[2, 4, 8, 10], [0, 0, 8, 10]]


def test_buckets_pad_small_steps_to_fours_and_larger_ones_to_the_step():
    assert buckets(32) == [4, 8, 12, 16, 24, 32] and buckets(4) == [4] and buckets(1) == [1]
    assert buckets(64, 16) == [4, 8, 12, 16, 32, 48, 64] and buckets(10) == [4, 8, 10]
    # A finer step fills in above 12 only (the sizes a saturated GPU launches), never below.
    assert buckets(16, 4) == [4, 8, 12, 16]
    assert buckets(16, 1) == [4, 8, 12, 13, 14, 15, 16] and buckets(16, 2) == [4, 8, 12, 14, 16]
    assert buckets(20, 3) == [4, 8, 12, 15, 16, 18, 20]


def test_box_output_composed_into_the_idle_frame_equals_the_full_frame_path(models, avatars):
    odd = make_avatar("odd", 2, 61, 77, (21, 13, 57, 49), seed=5)  # odd sizes and box edges
    engine = Engine(models, max_batch=8)
    for av in (*avatars, odd):
        engine.register_avatar(av)
    jobs = [FrameJob("anna", 0, tokens(0)), FrameJob("ben", 1, tokens(1), blend=0.5),
            FrameJob("odd", 1, tokens(2)), FrameJob("anna", 2, tokens(3), blend=0.0)]
    full = engine.step(jobs)
    launched = engine.launch([j.avatar_key for j in jobs], [j.frame_index for j in jobs],
                             np.stack([j.audio_tokens for j in jobs]), [j.blend for j in jobs])
    assert launched.ready()
    boxes = launched.boxes()
    by_key = {av.key: av for av in (*avatars, odd)}
    for job, frame, box in zip(jobs, full, boxes):
        av = by_key[job.avatar_key]
        idle = idle_i420(av.frames)
        composed = compose(idle[box.frame_index], box, av.width, av.height)
        np.testing.assert_array_equal(composed, rgb_to_i420(frame[..., :3]))
        assert box.x1 % 2 == 0 and box.y1 % 2 == 0 and box.y.shape == (box.y2 - box.y1, box.x2 - box.x1)
    # blend 0: the box is the idle frame's own pixels, so the composed frame is the idle frame
    anna = by_key["anna"]
    np.testing.assert_array_equal(compose(idle_i420(anna.frames)[2], boxes[3], anna.width, anna.height),
                                  idle_i420(anna.frames)[2])
    # and a generated mouth really changed something
    assert not np.array_equal(compose(idle_i420(anna.frames)[0], boxes[0], anna.width, anna.height),
                              idle_i420(anna.frames)[0])


def test_launch_validates_its_batch(models, avatars):
    engine = Engine(models, max_batch=2)
    engine.register_avatar(avatars[0])
    with pytest.raises(ValueError, match="1..2 frames"):
        engine.launch(["anna"] * 3, [0, 1, 2], np.zeros((3, 50, 384), np.float32), [1, 1, 1])
    with pytest.raises(ValueError, match="tokens must be"):
        engine.launch(["anna"], [0], np.zeros((1, 10, 384), np.float32), [1])
    with pytest.raises(IndexError, match="frame_index 7"):
        engine.launch(["anna"], [7], np.zeros((1, 50, 384), np.float32), [1])


def test_host_conversion_equals_the_integer_formula_written_out():
    """The fast host conversion is the integer formula exactly (odd sizes too)."""
    rng = np.random.default_rng(3)
    for h, w in ((6, 8), (5, 7), (31, 2)):
        rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        c = rgb.astype(np.int64)
        want_y = ((66 * c[..., 0] + 129 * c[..., 1] + 25 * c[..., 2] + 128) >> 8) + 16
        p = np.pad(c, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        avg = (p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2, 3).sum(axis=(1, 3)) + 2) >> 2
        want_u = ((-38 * avg[..., 0] - 74 * avg[..., 1] + 112 * avg[..., 2] + 128) >> 8) + 128
        want_v = ((112 * avg[..., 0] - 94 * avg[..., 1] - 18 * avg[..., 2] + 128) >> 8) + 128
        y, u, v = planes(rgb_to_i420(rgb), w, h)
        np.testing.assert_array_equal(y, want_y)
        np.testing.assert_array_equal(u, want_u)
        np.testing.assert_array_equal(v, want_v)


def test_every_bucket_of_both_crop_plans_stays_compiled(monkeypatch):
    """The cropped decode compiles one static graph per bucket and plan, and the plans'
    functions are closures of one ``def``: one code object, whose compiled versions Dynamo
    caps (8 by default) before running the rest eagerly. ``allow_recompiles`` lifts the cap
    to what the engine's buckets need; checked with the real Dynamo and a backend that
    counts the graphs it is given."""
    import torch
    import torch._dynamo

    from musetalk.engine import allow_recompiles

    def plan_fn(scale: float):
        def crop_fn(x):  # one code object for every plan, as in the engine
            return x * scale + 1

        return crop_fn

    def compiled_graphs(limit_entries: int | None) -> int:
        torch._dynamo.reset()
        monkeypatch.setattr(torch._dynamo.config, "recompile_limit", 8)
        if limit_entries is not None:
            assert allow_recompiles(limit_entries) == max(8, limit_entries)
        graphs = []

        def counting(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

        fns = [torch.compile(plan_fn(s), backend=counting, dynamic=False) for s in (2.0, 3.0)]
        sizes = buckets(16, 1)
        for fn in fns:
            for b in sizes:
                assert torch.equal(fn(torch.ones(b, 3)), torch.ones(b, 3) * (2.0 if fn is fns[0] else 3.0) + 1)
        torch._dynamo.reset()
        return len(graphs)

    assert len(buckets(16, 1)) * 2 == 14
    assert compiled_graphs(None) == 8  # the default cap: the other 6 ran eagerly
    assert compiled_graphs(len(buckets(16, 1)) * 3 + 4) == 14
    assert allow_recompiles(4) == torch._dynamo.config.recompile_limit  # never lowered
