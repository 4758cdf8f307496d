"""The generation engine on the CPU with tiny random weights in the real file formats.

Weights are written by ``write_random_weights(size="tiny")`` and read back through the
real loading code (``load_models``). Avatars are built directly (frames, boxes, masks,
latents) so that the expected pixels are known exactly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from musetalk.engine import Engine
from musetalk.models import MuseTalkModels, load_models
from musetalk.types import FrameJob, PreparedAvatar
from musetalk.vae import decode_to_unit
from musetalk.weights import ModelFileError, write_random_weights

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return write_random_weights(tmp_path_factory.mktemp("models"), size="tiny", seed=0)


@pytest.fixture(scope="module")
def models(model_dir) -> MuseTalkModels:
    return load_models(model_dir, "cpu", "float32")


def make_avatar(key: str, n: int, h: int, w: int, face: tuple[int, int, int, int], seed: int) -> PreparedAvatar:
    rng = np.random.default_rng(seed)
    frames = rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
    fx1, fy1, fx2, fy2 = face
    side = int(max(fx2 - fx1, fy2 - fy1) * 0.75)
    cx, cy = (fx1 + fx2) // 2, (fy1 + fy2) // 2
    bx1, by1 = max(cx - side, 0), max(cy - side, 0)
    bx2, by2 = min(cx + side, w), min(cy + side, h)
    face_boxes, blend_boxes, masks = [], [], []
    for i in range(n):
        # Shift the boxes per frame so that the engine's per-frame geometry is exercised.
        dx = i % 2
        face_boxes.append((fx1 + dx, fy1, fx2 + dx, fy2))
        blend_boxes.append((bx1, by1, bx2, by2))
        m = np.zeros((by2 - by1, bx2 - bx1), dtype=np.uint8)
        # Lower half of the face box fully on, with a soft ramp above it.
        top = fy1 + (fy2 - fy1) // 2 - by1
        m[top : fy2 - by1, fx1 + dx - bx1 : fx2 + dx - bx1] = 255
        m[top - 4 : top, fx1 + dx - bx1 : fx2 + dx - bx1] = 100
        masks.append(m)
    latents = rng.standard_normal((n, 8, 32, 32)).astype(np.float16)
    return PreparedAvatar(
        key=key,
        fps=25.0,
        frames=frames,
        face_boxes=np.array(face_boxes, dtype=np.int32),
        blend_boxes=np.array(blend_boxes, dtype=np.int32),
        masks=masks,
        latents=latents,
    )


def tokens(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((50, 384)).astype(np.float32)


def weight_region(av: PreparedAvatar, i: int) -> np.ndarray:
    """Pixels of frame i that the blend may change: mask > 0 inside the face box."""
    h, w = av.height, av.width
    region = np.zeros((h, w), dtype=bool)
    bx1, by1, bx2, by2 = av.blend_boxes[i]
    region[by1:by2, bx1:bx2] = av.masks[i] > 0
    inside = np.zeros((h, w), dtype=bool)
    fx1, fy1, fx2, fy2 = av.face_boxes[i]
    inside[max(fy1, 0) : fy2, max(fx1, 0) : fx2] = True
    return region & inside


@pytest.fixture(scope="module")
def avatars():
    return (
        make_avatar("anna", 3, 96, 128, (40, 20, 88, 68), seed=1),
        make_avatar("ben", 2, 80, 72, (10, 12, 50, 60), seed=2),
    )


@pytest.fixture(scope="module")
def engine(models, avatars) -> Engine:
    eng = Engine(models, max_batch=8)
    for av in avatars:
        assert eng.register_avatar(av) > 0
    return eng


# ------------------------------------------------------------------ loading


def test_missing_unet_weights_names_the_file(model_dir, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(model_dir, broken)
    (broken / "musetalkV15" / "unet.pth").unlink()
    with pytest.raises(ModelFileError) as err:
        load_models(broken, "cpu")
    assert "musetalkV15/unet.pth" in str(err.value)
    assert "lipsync models download" in str(err.value)


def test_missing_vae_config_names_the_file(model_dir, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(model_dir, broken)
    (broken / "sd-vae-ft-mse" / "config.json").unlink()
    with pytest.raises(ModelFileError, match=r"sd-vae-ft-mse/config\.json.*lipsync models download"):
        load_models(broken, "cpu")


def test_corrupt_unet_weights_name_the_file(model_dir, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(model_dir, broken)
    (broken / "musetalkV15" / "unet.pth").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ModelFileError, match=r"unet\.pth"):
        load_models(broken, "cpu")


def test_wrong_unet_config_is_refused(model_dir, tmp_path):
    broken = tmp_path / "models"
    shutil.copytree(model_dir, broken)
    cfg_path = broken / "musetalkV15" / "musetalk.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["in_channels"] = 4
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(ModelFileError, match=r"musetalk\.json.*in_channels"):
        load_models(broken, "cpu")


def test_cpu_always_loads_float32(model_dir):
    m = load_models(model_dir, "cpu", "float16")
    assert m.dtype == torch.float32
    assert next(m.unet.parameters()).dtype == torch.float32


# ------------------------------------------------------------------ networks


def test_unet_and_vae_shapes(models):
    with torch.inference_mode():
        latents = torch.randn(2, 8, 32, 32)
        audio = torch.randn(2, 50, 384)
        pred = models.unet(latents, torch.zeros((), dtype=torch.long), encoder_hidden_states=audio).sample
        assert pred.shape == (2, 4, 32, 32)
        image = decode_to_unit(models.vae, pred)
    assert image.shape == (2, 3, 256, 256)
    assert float(image.min()) >= 0.0 and float(image.max()) <= 1.0
    assert models.scaling_factor == pytest.approx(0.18215)


def test_encode_latents_masks_the_lower_half(models):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 256, 256, 3), dtype=np.uint8)
    b = a.copy()
    b[:, 128:] = rng.integers(0, 256, (1, 128, 256, 3), dtype=np.uint8)  # only the lower half differs
    lat = models.encode_latents(np.concatenate([a, b]), seed=3)
    assert lat.shape == (2, 8, 32, 32) and lat.dtype == np.float32  # the CPU model runs float32
    # Masked halves see identical inputs (lower half zeroed) and the same seeded noise...
    # ...but noise differs per batch position, so encode each alone for the comparison.
    la = models.encode_latents(a, seed=3)
    lb = models.encode_latents(b, seed=3)
    np.testing.assert_array_equal(la[:, :4], lb[:, :4])
    assert np.abs(la[:, 4:].astype(np.float32) - lb[:, 4:].astype(np.float32)).max() > 1e-3
    # Reproducible for a given seed.
    np.testing.assert_array_equal(models.encode_latents(a, seed=3), la)


def test_padded_encode_batches_give_the_same_latents(models):
    """CUDA pads a short last batch (one batch shape for cuDNN): the same latents, the
    same seeded noise, as the unpadded batches."""
    crops = np.random.default_rng(4).integers(0, 256, (5, 256, 256, 3), dtype=np.uint8)
    plain = models.encode_latents(crops, seed=2, batch_size=4, pad_batches=False)  # batches of 4 and 1
    padded = models.encode_latents(crops, seed=2, batch_size=4, pad_batches=True)  # the 1 runs as 4
    assert padded.shape == plain.shape == (5, 8, 32, 32)
    np.testing.assert_allclose(padded, plain, atol=1e-4)


def test_encode_latents_rejects_wrong_crops(models):
    with pytest.raises(ValueError, match="256, 256, 3"):
        models.encode_latents(np.zeros((1, 128, 128, 3), np.uint8))


# ------------------------------------------------------------------ engine


def test_mixed_batch_changes_only_the_blend_region(engine, avatars):
    anna, ben = avatars
    jobs = [
        FrameJob("anna", 0, tokens(0)),
        FrameJob("ben", 1, tokens(1)),
        FrameJob("anna", 2, tokens(2)),
        FrameJob("ben", 0, tokens(3), blend=0.5),
    ]
    out = engine.step(jobs)
    assert len(out) == 4
    for job, frame in zip(jobs, out):
        av = anna if job.avatar_key == "anna" else ben
        assert frame.shape == (av.height, av.width, 4) and frame.dtype == np.uint8
        assert (frame[..., 3] == 255).all()
        idle = av.frames[job.frame_index]
        region = weight_region(av, job.frame_index)
        np.testing.assert_array_equal(frame[..., :3][~region], idle[~region])
        changed = (frame[..., :3][region] != idle[region]).any(axis=-1)
        assert changed.mean() > 0.8, "the generated mouth should replace most masked pixels"


def test_blend_zero_returns_the_idle_frame(engine, avatars):
    out = engine.step([FrameJob("anna", 1, tokens(5), blend=0.0), FrameJob("ben", 1, tokens(6), blend=0.0)])
    np.testing.assert_array_equal(out[0], engine.idle_frame("anna", 1))
    np.testing.assert_array_equal(out[1][..., :3], avatars[1].frames[1])


def test_full_blend_is_the_resized_decoded_face(models, engine, avatars):
    """With mask 255 and blend 1 the face box holds cv2.resize(decoded face)."""
    anna = avatars[0]
    audio = tokens(7)
    frame = engine.step([FrameJob("anna", 0, audio)])[0]
    with torch.inference_mode():
        lat = torch.from_numpy(anna.latents[:1].astype(np.float32))
        pred = models.unet(lat, torch.zeros((), dtype=torch.long), encoder_hidden_states=torch.from_numpy(audio)[None]).sample
        face = (decode_to_unit(models.vae, pred)[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    fx1, fy1, fx2, fy2 = anna.face_boxes[0]
    want = cv2.resize(face, (fx2 - fx1, fy2 - fy1), interpolation=cv2.INTER_LINEAR)
    bx1, by1 = anna.blend_boxes[0][:2]
    full = anna.masks[0] == 255
    ys, xs = np.nonzero(full)
    got = frame[ys + by1, xs + bx1, :3].astype(int)
    ref = want[ys + by1 - fy1, xs + bx1 - fx1].astype(int)
    # cv2 works in fixed point, the engine in float: at most one level apart.
    assert np.abs(got - ref).max() <= 1


def test_batches_are_split_at_max_batch(models, avatars):
    sizes: list[int] = []

    class Recording(Engine):
        def _run_batch(self, jobs):
            sizes.append(len(jobs))
            return super()._run_batch(jobs)

    small = Recording(models, max_batch=2)
    for av in avatars:
        small.register_avatar(av)
    jobs = [FrameJob("anna" if i % 2 else "ben", i % 2, tokens(10 + i)) for i in range(5)]
    split = small.step(jobs)
    assert sizes == [2, 2, 1]
    whole = Engine(models, max_batch=8)
    for av in avatars:
        whole.register_avatar(av)
    together = whole.step(jobs)
    for a, b in zip(split, together):
        # Different batch sizes may pick different CPU kernels: allow one level of rounding.
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_bad_jobs_are_refused(engine):
    with pytest.raises(KeyError, match="nobody"):
        engine.step([FrameJob("nobody", 0, tokens(0))])
    with pytest.raises(IndexError, match="frame_index 9"):
        engine.step([FrameJob("anna", 9, tokens(0))])
    with pytest.raises(ValueError, match="audio_tokens"):
        engine.step([FrameJob("anna", 0, np.zeros((10, 384), np.float32))])
    assert engine.step([]) == []


def test_register_rejects_mismatched_mask(models, avatars):
    av = make_avatar("bad", 1, 64, 64, (16, 16, 48, 48), seed=3)
    av.masks[0] = av.masks[0][:-1]
    with pytest.raises(ValueError, match="mask"):
        Engine(models).register_avatar(av)


def test_unregister_and_idle_frame(models, avatars):
    eng = Engine(models)
    eng.register_avatar(avatars[1])
    idle = eng.idle_frame("ben", 3)  # wraps around the 2 frames
    np.testing.assert_array_equal(idle[..., :3], avatars[1].frames[1])
    assert (idle[..., 3] == 255).all()
    eng.unregister_avatar("ben")
    assert not eng.has_avatar("ben")
    with pytest.raises(KeyError):
        eng.idle_frame("ben", 0)


# ------------------------------------------------------------------ offline render


def _write_idle_video(path: Path, n: int, fps: int = 25) -> None:
    import av
    from skimage import data

    base = cv2.resize(data.astronaut(), (160, 160), interpolation=cv2.INTER_AREA)
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = 160, 160, "yuv420p"
        for i in range(n):
            shift = np.float32([[1, 0, i % 3], [0, 1, 0]])
            frame = cv2.warpAffine(base, shift, (160, 160), borderMode=cv2.BORDER_REFLECT)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def _write_wav(path: Path, seconds: float, rate: int = 22050) -> np.ndarray:
    import soundfile as sf

    t = np.arange(int(seconds * rate)) / rate
    pcm = (0.3 * np.sin(2 * np.pi * 220 * t) * np.sin(2 * np.pi * 3 * t) * 32767).astype(np.int16)
    sf.write(path, pcm, rate, subtype="PCM_16")
    return pcm


def test_render_offline_end_to_end(model_dir, tmp_path):
    import av

    from musetalk.render import ping_pong, render_offline

    models = tmp_path / "models"
    shutil.copytree(model_dir, models)
    # Random landmark/parsing weights would put the face anywhere: use the real Haar
    # detector and the landmark-polygon masks (the documented fallbacks).
    for name in ("dwpose/dw-ll_ucoco_384.onnx", "face-parse-bisent/79999_iter.pth"):
        (models / name).unlink(missing_ok=True)
    video, audio, out = tmp_path / "idle.mp4", tmp_path / "speech.wav", tmp_path / "talking.mp4"
    _write_idle_video(video, 6)
    seconds = 0.77  # floor(0.77 * 25) = 19 frames: more than the 6-frame idle video
    _write_wav(audio, seconds)

    result = render_offline(video, audio, out, models, device="cpu", progress=False, batch_size=8)

    assert result.frames == 19 and result.avatar_frames == 6
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
        assert container.streams.audio[0].codec_context.name == "aac"
        assert container.streams.audio[0].rate == 22050
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(decoded) == 19
    assert decoded[0].shape == (160, 160, 3)
    assert [ping_pong(i, 6) for i in range(14)] == [0, 1, 2, 3, 4, 5, 5, 4, 3, 2, 1, 0, 0, 1]


def test_fractional_frame_rates_are_windowed_exactly():
    from fractions import Fraction

    from musetalk.audio import frame_tokens, window_tokens
    from musetalk.render import _audio_tokens

    feats = np.random.default_rng(0).standard_normal((120, 5, 384)).astype(np.float32)
    np.testing.assert_array_equal(_audio_tokens(feats, 40, Fraction(25)), window_tokens(feats, 40, 25))
    ntsc = Fraction(30000, 1001)
    tokens = _audio_tokens(feats, 60, ntsc)
    # Frame 59 starts at floor(59 * 50 / 29.97) = 98 of the sequence padded by 4 in front.
    padded = np.concatenate([np.zeros((4, 5, 384), np.float32), feats, np.zeros((12, 5, 384), np.float32)])
    np.testing.assert_array_equal(tokens[59], frame_tokens(padded[98:108]))


# ------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cuda_step_matches_cpu(model_dir, models, avatars, compiled):
    """fp16 on the GPU (pinned copy-out, bucket padding when compiled) against fp32 on the CPU."""
    gpu = Engine(load_models(model_dir, "cuda", "float16"), max_batch=4, compile=compiled)
    cpu = Engine(models, max_batch=4)
    for av in avatars:
        gpu.register_avatar(av)
        cpu.register_avatar(av)
    jobs = [FrameJob("anna", 0, tokens(20)), FrameJob("ben", 1, tokens(21)), FrameJob("anna", 2, tokens(22))]
    for _ in range(2):  # the second compiled call replays the CUDA graphs
        got = gpu.step(jobs)
    want = cpu.step(jobs)
    for job, g, w in zip(jobs, got, want):
        av = avatars[0] if job.avatar_key == "anna" else avatars[1]
        region = weight_region(av, job.frame_index)
        np.testing.assert_array_equal(g[..., :3][~region], av.frames[job.frame_index][~region])
        diff = np.abs(g.astype(int) - w.astype(int))[region]
        assert diff.mean() < 2.0, f"fp16 GPU and fp32 CPU differ by {diff.mean():.2f} levels on average"


def test_caller_rgba_frames_are_shared_not_copied(models, engine, avatars):
    av = avatars[0]
    rgba = np.concatenate([av.frames, np.full((*av.frames.shape[:3], 1), 255, np.uint8)], axis=-1)
    rgba.setflags(write=False)  # as the daemon hands it over: shared, read only
    shared = Engine(models, max_batch=8)
    shared.register_avatar(av, frames_rgba=rgba)
    assert shared._avatars[av.key].frames_rgba is rgba
    jobs = [FrameJob(av.key, 2, tokens(7))]
    np.testing.assert_array_equal(shared.step(jobs)[0], engine.step(jobs)[0])
    with pytest.raises(ValueError, match="frames_rgba"):
        shared.register_avatar(av, frames_rgba=rgba[:, :, :, :3])


def test_a_fused_step_gives_the_same_frames_as_the_two_stage_step(models, engine, avatars):
    # model.fuse_step runs the UNet and the decode as one function (one graph on CUDA).
    fused = Engine(models, max_batch=8, fuse_step=True)
    for av in avatars:
        fused.register_avatar(av)
    jobs = [FrameJob("anna", 0, tokens(0)), FrameJob("ben", 1, tokens(1), blend=0.5)]
    for a, b in zip(engine.step(jobs), fused.step(jobs)):
        np.testing.assert_array_equal(a, b)
