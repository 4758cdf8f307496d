"""Avatar preparation: geometry, masks, landmarkers, face parser, cache.

Everything runs for real on the CPU: OpenCV's Haar cascade on a real photo, onnxruntime
on a tiny model with DWPose's real signature, BiSeNet with random weights in the
reference checkpoint format, a tiny diffusers VAE for the latents.
"""

from __future__ import annotations

import json
import os
import time

import cv2
import numpy as np
import pytest
import torch
from skimage import data as skdata

from musetalk import avatar as av
from musetalk import blending as bl
from musetalk.face_parsing import (
    BiSeNet,
    FaceParser,
    load_face_parser,
    write_random_bisenet,
)
from musetalk.landmarks import (
    MEAN_FACE_IN_HAAR_BOX,
    HaarTemplateLandmarker,
    MultipleFacesError,
    OnnxLandmarker,
    decode_simcc,
    write_tiny_dwpose_onnx,
)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skdata.astronaut()


@pytest.fixture(scope="module")
def idle_frames(astronaut) -> np.ndarray:
    """A short idle clip: the photo shifted by a few pixels per frame."""
    shifts = [(0, 0), (2, 1), (4, 2), (3, 3), (1, 2), (-1, 1)]
    frames = []
    for dx, dy in shifts:
        m = np.float32([[1, 0, dx], [0, 1, dy]])
        frames.append(cv2.warpAffine(astronaut, m, (512, 512), borderMode=cv2.BORDER_REFLECT))
    return np.stack(frames)


def synthetic_landmarks(x0=200.0, y0=100.0, w=100.0, h=100.0) -> np.ndarray:
    return MEAN_FACE_IN_HAAR_BOX * [w, h] + [x0, y0]


def tiny_vae_encoder():
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        norm_num_groups=4,
        latent_channels=4,
        sample_size=256,
    ).eval()
    scale = vae.config.scaling_factor

    @torch.inference_mode()
    def encode(crops: np.ndarray) -> np.ndarray:
        # The engine's contract: [masked 4 | reference 4], lower half zeroed before normalising.
        x = torch.from_numpy(crops).permute(0, 3, 1, 2).float() / 255.0
        masked = x.clone()
        masked[:, :, x.shape[2] // 2 :, :] = 0
        ref = vae.encode(x * 2 - 1).latent_dist.mode() * scale
        msk = vae.encode(masked * 2 - 1).latent_dist.mode() * scale
        return torch.cat([msk, ref], dim=1).numpy()

    return encode


# ------------------------------------------------------------------ boxes


def test_face_box_matches_reference_formula():
    lm = synthetic_landmarks()
    lm_i = lm.astype(np.int32)
    max_y = lm_i[:, 1].max()
    mid = lm_i[29, 1]
    expected = (lm_i[:, 0].min(), mid - (max_y - mid), lm_i[:, 0].max(), max_y + 10)
    assert bl.face_box_from_landmarks(lm, 512, 512, extra_margin=10) == tuple(int(v) for v in expected)


def test_face_box_by_hand_and_clipping():
    lm = np.zeros((68, 2))
    lm[:, 0] = np.linspace(100, 200, 68)
    lm[:, 1] = 150
    lm[29] = (150, 150)
    lm[8] = (150, 230)  # chin
    # y2 = 230 + 10, y1 = 150 - (230 - 150) = 70
    assert bl.face_box_from_landmarks(lm, 512, 512, extra_margin=10) == (100, 70, 200, 240)
    # Near the frame's edges the box is clipped, never negative or past the frame.
    assert bl.face_box_from_landmarks(lm - [0, 100], 512, 512) == (100, 0, 200, 140)
    assert bl.face_box_from_landmarks(lm, 512, 235) == (100, 70, 200, 235)


def test_smoothing_reduces_jitter_without_shrinking():
    rng = np.random.default_rng(1)
    base = np.array([200, 100, 300, 230], dtype=np.float64)
    boxes = np.tile(base, (40, 1)) + rng.normal(0, 3, size=(40, 1)) * [1, 1, 1, 1] + rng.normal(0, 2, size=(40, 4))
    boxes = boxes.round().astype(np.int32)
    smoothed = bl.smooth_boxes(boxes, 512, 512, window=5)

    def jitter(b):
        centre = np.stack([(b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2], 1)
        return np.abs(np.diff(centre, axis=0)).mean()

    assert jitter(smoothed) < 0.6 * jitter(boxes)
    raw_w, raw_h = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    sm_w, sm_h = smoothed[:, 2] - smoothed[:, 0], smoothed[:, 3] - smoothed[:, 1]
    assert np.all(sm_w >= np.floor(raw_w * 0.98) - 1)
    assert np.all(sm_h >= np.floor(raw_h * 0.98) - 1)
    # A still head stays exactly where it is.
    still = np.tile(np.array([200, 100, 300, 230], np.int32), (7, 1))
    assert np.array_equal(bl.smooth_boxes(still, 512, 512), still)


def test_blend_box_geometry():
    face = (200, 100, 300, 240)  # w 100, h 140 -> s = int(70 * 1.5) = 105, centre (250, 170)
    assert bl.blend_square(face) == (145, 65, 355, 275)
    assert bl.blend_box(face, 512, 512) == (145, 65, 355, 275)
    # Clipped at the frame's borders; the square itself keeps its size.
    assert bl.blend_box((10, 5, 110, 145), 512, 512) == (0, 0, 165, 180)
    assert bl.blur_kernel_size(210) == 21 and bl.blur_kernel_size(100) == 11


# ------------------------------------------------------------------ masks


def _check_mask(mask, square, face_rel):
    side = square[2] - square[0]
    assert mask.dtype == np.uint8 and mask.shape == (side, side)
    assert mask.max() == 255
    r = bl.blur_kernel_size(side) // 2
    # Nothing above the middle row of the square (beyond the blur's reach)...
    assert mask[: side // 2 - r].max() == 0
    # ... nor outside the face box.
    fx1, fy1, fx2, fy2 = face_rel
    assert mask[:, : max(0, fx1 - r)].max() == 0
    assert mask[:, fx2 + r :].max() == 0
    assert mask[fy2 + r :].max() == 0
    # A soft edge: intermediate values exist.
    assert np.count_nonzero((mask > 10) & (mask < 245)) > side


def test_mask_from_landmarks_properties():
    lm = synthetic_landmarks()
    face = bl.face_box_from_landmarks(lm, 512, 512)
    sq = bl.blend_square(face)
    face_rel = (face[0] - sq[0], face[1] - sq[1], face[2] - sq[0], face[3] - sq[1])
    mask = bl.mask_from_landmarks(lm - [sq[0], sq[1]], sq[2] - sq[0], face_rel)
    _check_mask(mask, sq, face_rel)
    # The mouth is fully generated, the nose tip is not pasted at full strength.
    mouth = (lm[57] + lm[51]) / 2 - [sq[0], sq[1]]
    assert mask[int(mouth[1]), int(mouth[0])] == 255
    nose = lm[33] - [sq[0], sq[1]] - [0, 2]
    assert mask[int(nose[1]), int(nose[0])] < 255


def _fake_labels() -> np.ndarray:
    """Parsing labels drawn like a frontal face in a 512 blend square."""
    lab = np.zeros((512, 512), np.uint8)
    cv2.ellipse(lab, (256, 250), (120, 160), 0, 0, 360, 1, -1)  # skin
    cv2.ellipse(lab, (256, 270), (20, 45), 0, 0, 360, 10, -1)  # nose
    cv2.ellipse(lab, (256, 345), (45, 10), 0, 0, 360, 12, -1)  # upper lip
    cv2.ellipse(lab, (256, 362), (45, 10), 0, 0, 360, 13, -1)  # lower lip
    return lab


def test_mask_from_parsing_jaw_and_raw():
    labels = _fake_labels()
    side = 210
    face_rel = (55, 40, 155, 190)
    sq = (0, 0, side, side)
    jaw = bl.mask_from_parsing(labels, side, face_rel, mode="jaw")
    raw = bl.mask_from_parsing(labels, side, face_rel, mode="raw")
    _check_mask(jaw, sq, face_rel)
    _check_mask(raw, sq, face_rel)
    # The jaw dilation grows the chin downwards: more mask below the skin ellipse's bottom.
    chin_rows = slice(int(410 / 512 * side), int(430 / 512 * side))
    assert jaw[chin_rows].sum() > raw[chin_rows].sum()
    # Region level: the jaw mode drops the nose, keeps the lips.
    region = bl.region_from_parsing(labels, "jaw")
    assert region[300, 256] == 0 and region[345, 256] == 255
    with pytest.raises(ValueError, match="jaw"):
        bl.mask_from_parsing(labels, side, face_rel, mode="neck")


def test_crop_face_and_paste_back(astronaut):
    face = (182, 71, 264, 173)
    crop = bl.crop_face(astronaut, face)
    assert crop.shape == (256, 256, 3) and crop.dtype == np.uint8
    sq = bl.blend_square(face)
    box, mask = bl.clip_square(np.full((sq[3] - sq[1], sq[2] - sq[0]), 255, np.uint8), sq, 512, 512)
    # Pasting the unchanged crop back barely changes the frame; blend 0 changes nothing.
    out = bl.paste_face(astronaut, crop, face, box, mask)
    assert np.abs(out.astype(int) - astronaut).mean() < 2.0
    assert np.array_equal(bl.paste_face(astronaut, 255 - crop, face, box, mask, blend=0.0), astronaut)


# ------------------------------------------------------------------ landmarkers


def test_haar_template_finds_astronaut(astronaut):
    lm = HaarTemplateLandmarker().detect(astronaut)
    assert lm is not None and lm.shape == (68, 2)
    # The astronaut's mouth is near (223, 150) and her face spans x ~180..270.
    mouth = lm[48:60].mean(0)
    assert abs(mouth[0] - 223) < 15 and abs(mouth[1] - 150) < 15
    assert 165 < lm[:, 0].min() < 200 and 245 < lm[:, 0].max() < 285
    assert HaarTemplateLandmarker.quality == "opencv-fallback (lower quality)"
    assert HaarTemplateLandmarker().detect(np.zeros((256, 256, 3), np.uint8)) is None


def test_multiple_faces_policy(astronaut):
    two = np.concatenate([astronaut, astronaut], axis=1)
    lm = HaarTemplateLandmarker(multi_face="largest").detect(two)
    assert lm is not None
    with pytest.raises(MultipleFacesError, match="one person"):
        HaarTemplateLandmarker(multi_face="error").detect(two)


def test_onnx_landmarker_real_code_path(tmp_path, astronaut):
    path = write_tiny_dwpose_onnx(tmp_path / "dwpose" / "dw-ll_ucoco_384.onnx")
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [(i.name, i.shape, i.type) for i in sess.get_inputs()] == [("input", [1, 3, 384, 288], "tensor(float)")]
    assert [(o.name, o.shape) for o in sess.get_outputs()] == [("simcc_x", [1, 133, 576]), ("simcc_y", [1, 133, 768])]

    lmk = OnnxLandmarker(tmp_path, intra_op_threads=1)
    lm = lmk.detect(astronaut)
    assert lm is not None and lm.shape == (68, 2)
    assert np.all(lm >= 0) and np.all(lm[:, 0] <= 511) and np.all(lm[:, 1] <= 511)
    assert lmk.detect(np.zeros((300, 300, 3), np.uint8)) is None


def test_decode_simcc_maps_peaks_to_pixels():
    sx = np.zeros((133, 576), np.float32)
    sy = np.zeros((133, 768), np.float32)
    sx[:, 100] = 1
    sy[:, 301] = 1
    pts = decode_simcc(sx, sy)
    assert np.allclose(pts, [50.0, 150.5])


def test_missing_dwpose_error_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="dw-ll_ucoco_384.onnx.*lipsync models download"):
        OnnxLandmarker(tmp_path)


# ------------------------------------------------------------------ face parsing


def test_bisenet_loads_reference_key_format(tmp_path):
    path = write_random_bisenet(tmp_path / "face-parse-bisent" / "79999_iter.pth")
    state = torch.load(path, weights_only=True)
    # Keys of face-parsing.PyTorch's BiSeNet(19).
    for k in (
        "cp.resnet.conv1.weight",
        "cp.resnet.layer2.0.downsample.0.weight",
        "cp.arm16.conv_atten.weight",
        "cp.conv_avg.conv.weight",
        "ffm.convblk.conv.weight",
        "conv_out.conv_out.weight",
        "conv_out16.conv.bn.running_mean",
        "conv_out32.conv_out.weight",
    ):
        assert k in state
    assert state["conv_out.conv_out.weight"].shape == (19, 256, 1, 1)
    # Old checkpoints lack BatchNorm step counters; they must still load.
    torch.save({k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}, path)
    parser = load_face_parser(tmp_path, "cpu")
    labels = parser.parse(np.zeros((1, 512, 512, 3), np.uint8))
    assert labels.shape == (1, 512, 512) and labels.dtype == np.uint8 and labels.max() < 19
    torch.save({"not": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="not a face-parsing"):
        load_face_parser(tmp_path)


def test_missing_bisenet_error_names_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="79999_iter.pth.*lipsync models download"):
        load_face_parser(tmp_path)


# ------------------------------------------------------------------ prepare + cache


class _SkinParser:
    """Stands in for BiSeNet's *output* only: random weights give meaningless labels,
    and the real weights cannot be downloaded here. The network itself is tested above."""

    def parse(self, faces):
        return np.stack([_fake_labels() for _ in faces])


@pytest.fixture(scope="module")
def prepared(idle_frames):
    return av.prepare_avatar(
        idle_frames,
        25.0,
        landmarker=HaarTemplateLandmarker(),
        encode_latents=tiny_vae_encoder(),
        key="k1",
        batch_size=4,
    )


def test_prepare_avatar(prepared, idle_frames):
    n = idle_frames.shape[0]
    assert prepared.num_frames == n and prepared.fps == 25.0
    assert prepared.latents.shape == (n, 8, 32, 32) and prepared.latents.dtype == np.float32  # a float32 (CPU) encoder keeps its precision
    assert np.isfinite(prepared.latents).all()
    # Masked half differs from the reference half.
    assert not np.allclose(prepared.latents[:, :4], prepared.latents[:, 4:])
    assert prepared.face_boxes.dtype == np.int32 and prepared.blend_boxes.shape == (n, 4)
    for i in range(n):
        fx1, fy1, fx2, fy2 = prepared.face_boxes[i]
        bx1, by1, bx2, by2 = prepared.blend_boxes[i]
        assert bx1 <= fx1 < fx2 <= bx2 and by1 <= fy1 < fy2 <= by2
        assert prepared.masks[i].shape == (by2 - by1, bx2 - bx1)
        assert prepared.masks[i].max() == 255
    # Every (smoothed) box stays on the face of its own frame.
    lmk = HaarTemplateLandmarker()
    for i in range(n):
        lm = lmk.detect(idle_frames[i])
        raw = bl.face_box_from_landmarks(lm, 512, 512)
        assert np.abs(prepared.face_boxes[i] - np.array(raw)).max() <= 6
    assert "opencv-fallback" in prepared.landmark_source
    assert {"landmarks", "boxes", "crops", "latents", "masks", "total"} <= set(prepared.timings_ms)


def test_prepare_with_face_parser(idle_frames):
    out = av.prepare_avatar(
        idle_frames[:2],
        25.0,
        landmarker=HaarTemplateLandmarker(),
        encode_latents=lambda c: np.zeros((len(c), 8, 32, 32), np.float32),
        face_parser=_SkinParser(),
        key="k2",
    )
    assert "bisenet-jaw" in out.landmark_source
    assert all(m.max() == 255 for m in out.masks)


def test_prepare_with_real_bisenet_random_weights(tmp_path, idle_frames):
    torch.manual_seed(0)
    parser = FaceParser(BiSeNet(), "cpu", batch_size=1)
    out = av.prepare_avatar(
        idle_frames[:1],
        25.0,
        landmarker=HaarTemplateLandmarker(),
        encode_latents=lambda c: np.zeros((len(c), 8, 32, 32), np.float32),
        face_parser=parser,
        key="k3",
    )
    assert out.masks[0].dtype == np.uint8 and out.masks[0].shape[0] > 0


def test_no_face_is_a_clear_error():
    blank = np.zeros((3, 128, 128, 3), np.uint8)
    with pytest.raises(ValueError, match="no face found in any of the 3 frames"):
        av.prepare_avatar(
            blank, 25.0, landmarker=HaarTemplateLandmarker(), encode_latents=lambda c: None, key="x"
        )


def test_missing_fraction_and_nearest_reuse(idle_frames):
    frames = idle_frames[:4].copy()
    frames[1] = 0  # one faceless frame of four: reused from a neighbour
    lms, detected = av.detect_all(frames, HaarTemplateLandmarker(), max_missing_fraction=0.5)
    assert detected.tolist() == [True, False, True, True]
    assert np.array_equal(lms[1], lms[0])
    frames[2] = 0
    frames[3] = 0
    with pytest.raises(ValueError, match="3 of 4 frames"):
        av.detect_all(frames, HaarTemplateLandmarker(), max_missing_fraction=0.5)


def test_cache_round_trip(tmp_path, prepared):
    d = tmp_path / "avatar"
    av.save_prepared(prepared, d, model_version="musetalk-1.5", options={"extra_margin": 10})
    loaded = av.load_prepared(d, key="k1")
    assert loaded.key == prepared.key and loaded.fps == prepared.fps
    assert np.array_equal(loaded.frames, prepared.frames)
    assert np.array_equal(loaded.face_boxes, prepared.face_boxes)
    assert np.array_equal(loaded.blend_boxes, prepared.blend_boxes)
    assert np.array_equal(loaded.latents, prepared.latents)
    assert len(loaded.masks) == len(prepared.masks)
    assert all(np.array_equal(a, b) for a, b in zip(loaded.masks, prepared.masks))
    assert loaded.landmark_source == prepared.landmark_source
    # Saving again replaces the directory in one step.
    av.save_prepared(prepared, d)
    assert av.load_prepared(d).num_frames == prepared.num_frames


def test_cache_version_mismatch_rebuilds(tmp_path, prepared):
    d = tmp_path / "avatar"
    av.save_prepared(prepared, d)
    meta = json.loads((d / "meta.json").read_text())
    meta["format_version"] = av.CACHE_FORMAT_VERSION + 1
    (d / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(av.CacheInvalid, match="format version"):
        av.load_prepared(d)
    calls = []

    def rebuild():
        calls.append(1)
        return prepared

    out, cached = av.load_or_prepare(d, "k1", rebuild)
    assert not cached and calls == [1] and out is prepared
    out, cached = av.load_or_prepare(d, "k1", rebuild)
    assert cached and calls == [1]
    # A different key (other video, models or options) is a miss too.
    _, cached = av.load_or_prepare(d, "other", rebuild)
    assert not cached and calls == [1, 1]


def test_prepared_avatars_are_evicted_least_recently_used_first(tmp_path, prepared):
    root = tmp_path / "avatars"
    for i, name in enumerate(("old", "in-use", "recent")):
        av.save_prepared(prepared, root / name)
        os.utime(root / name, (1000 + i, 1000 + i))  # old < in-use < recent
    one = sum(f.stat().st_size for f in (root / "old").iterdir())
    # Loading from the cache counts as a use: "old" becomes the most recent.
    av.load_or_prepare(root / "old", prepared.key, lambda: prepared)
    assert av.evict_prepared(root, 10 * one) == []  # everything fits
    removed = av.evict_prepared(root, int(2.5 * one), keep={"in-use"})
    # Room for two: "recent" is now the least recently used that is not in use.
    assert removed == ["recent"] and sorted(p.name for p in root.iterdir()) == ["in-use", "old"]
    assert av.evict_prepared(root, 0, keep={"in-use", "old"}) == []


def test_cache_key_is_stable():
    a = av.avatar_cache_key("abc", "musetalk-1.5", {"extra_margin": 10, "mode": "jaw"})
    b = av.avatar_cache_key("abc", "musetalk-1.5", {"mode": "jaw", "extra_margin": 10})
    assert a == b and len(a) == 32
    assert a != av.avatar_cache_key("abc", "musetalk-1.5", {"extra_margin": 12, "mode": "jaw"})
    assert a != av.avatar_cache_key("abd", "musetalk-1.5", {"extra_margin": 10, "mode": "jaw"})


def test_cache_of_250_frames_loads_memory_mapped(tmp_path):
    from musetalk.types import PreparedAvatar

    n = 250
    rng = np.random.default_rng(0)
    frames = np.broadcast_to(rng.integers(0, 255, (1, 512, 512, 3), dtype=np.uint8), (n, 512, 512, 3))
    boxes = np.tile(np.array([150, 50, 300, 250], np.int32), (n, 1))
    avatar = PreparedAvatar(
        key="big",
        fps=25.0,
        frames=frames,
        face_boxes=boxes,
        blend_boxes=boxes,
        masks=[np.full((200, 150), i % 256, np.uint8) for i in range(n)],
        latents=np.zeros((n, 8, 32, 32), np.float16),
    )
    av.save_prepared(avatar, tmp_path / "big")
    t = time.perf_counter()
    loaded = av.load_prepared(tmp_path / "big", key="big")
    elapsed = time.perf_counter() - t
    assert loaded.num_frames == n and loaded.masks[7][0, 0] == 7
    print(f"load_prepared, 250 frames of 512x512: {elapsed * 1000:.1f} ms")
    # What makes loading fast is that the big arrays are memory-mapped, not read (speed
    # itself is measured in docs/BENCHMARKS.md, not asserted here).
    assert isinstance(loaded.frames, np.memmap) and isinstance(loaded.latents, np.memmap)


class _ScriptedLandmarker:
    """Replays given landmarks through the Landmarker protocol: a real detector cannot be
    made to produce one specific false detection on demand."""

    quality = "scripted"

    def __init__(self, per_frame):
        self.per_frame = list(per_frame)
        self.i = 0

    def detect(self, frame_rgb):
        out = self.per_frame[self.i]
        self.i += 1
        return out


def test_false_detection_far_away_is_dropped():
    face = synthetic_landmarks()
    wrong = synthetic_landmarks(x0=380, y0=300, w=120, h=120)
    script = [face, face + 1, wrong, face + 2, face]
    lms, detected = av.detect_all(np.zeros((5, 8, 8, 3), np.uint8), _ScriptedLandmarker(script))
    assert detected.tolist() == [True, True, False, True, True]
    assert np.array_equal(lms[2], face + 1)
    # Disabled, the far face is kept.
    _, detected = av.detect_all(np.zeros((5, 8, 8, 3), np.uint8), _ScriptedLandmarker(script), outlier_tolerance=None)
    assert detected.all()
