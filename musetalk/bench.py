"""Engine benchmark with full-size random weights (speed does not depend on weight values).

Measures, per dtype and batch size: ms per engine step (UNet + VAE decode + paste-back
+ copy of the RGBA frames to the host) and frames/s, split by stage with CUDA events;
and the preparation time of an idle video (landmarks + VAE encode + masks).
``--reference-flow`` instead runs only MuseTalk's own real-time flow
(``musetalk.reference_flow``), the figure our capacity is stated against.

    python -m musetalk.bench --device cuda --json bench.json
    python -m musetalk.bench --device cuda --reference-flow --frames 500 --json ref.json
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from musetalk import reference_flow
from musetalk.engine import Engine
from musetalk.models import MuseTalkModels, resolve_device, resolve_dtype
from musetalk.types import FrameJob, PreparedAvatar
from musetalk.unet import MUSETALK_UNET_CONFIG, TINY_UNET_CONFIG, build_unet
from musetalk.vae import SD_VAE_FT_MSE_CONFIG, TINY_VAE_CONFIG, build_vae

log = logging.getLogger(__name__)


def build_random_models(device: torch.device, dtype: torch.dtype, size: str = "full") -> MuseTalkModels:
    """The real architectures with random weights, built directly on ``device``."""
    unet_cfg = MUSETALK_UNET_CONFIG if size == "full" else TINY_UNET_CONFIG
    vae_cfg = SD_VAE_FT_MSE_CONFIG if size == "full" else TINY_VAE_CONFIG
    torch.manual_seed(0)
    with torch.device(device):
        unet = build_unet(unet_cfg)
        vae = build_vae(vae_cfg)
    unet = unet.to(dtype).eval().requires_grad_(False)
    vae = vae.to(dtype).eval().requires_grad_(False)
    return MuseTalkModels(unet=unet, vae=vae, device=device, dtype=dtype)


def _idle_video(seconds: float, fps: int = 25, size: int = 512) -> np.ndarray:
    """A real face (scikit-image's public-domain astronaut) with a slow sway, RGB uint8."""
    import cv2
    from skimage import data

    base = cv2.resize(data.astronaut(), (size, size), interpolation=cv2.INTER_AREA)
    n = int(seconds * fps)
    frames = np.empty((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        shift = np.float32([[1, 0, 3 * np.sin(i / 12)], [0, 1, 2 * np.cos(i / 15)]])
        frames[i] = cv2.warpAffine(base, shift, (size, size), borderMode=cv2.BORDER_REFLECT)
    return frames


class _FixedLandmarker:
    """The mean face at the astronaut's face position, for machines without a detector."""

    quality = "bench-fixed"

    def detect(self, frame_rgb: np.ndarray) -> np.ndarray:
        from musetalk.landmarks import MEAN_FACE_IN_HAAR_BOX

        h, w = frame_rgb.shape[:2]
        x1, y1, x2, y2 = 0.346 * w, 0.129 * h, 0.531 * w, 0.314 * h
        return MEAN_FACE_IN_HAAR_BOX * [x2 - x1, y2 - y1] + [x1, y1]


def _prepare(models: MuseTalkModels, frames: np.ndarray, fps: int) -> tuple[PreparedAvatar, dict]:
    from musetalk.avatar import prepare_avatar
    from musetalk.landmarks import HaarTemplateLandmarker

    parser = None
    info = {"landmarks": "HaarTemplateLandmarker", "face_parser": None}
    try:
        from musetalk.face_parsing import load_face_parser, write_random_bisenet

        with tempfile.TemporaryDirectory() as tmp:
            write_random_bisenet(Path(tmp) / "79999_iter.pth")
            parser = load_face_parser(tmp, models.device)
        info["face_parser"] = "BiSeNet (random weights, full size)"
    except Exception as exc:  # the bench still measures the rest without it
        log.warning("face parser unavailable for the bench: %s", exc)
    try:
        landmarker = HaarTemplateLandmarker()
    except RuntimeError as exc:
        # OpenCV 5 builds lack the Haar cascade: time everything but the detection.
        log.warning("no Haar detector (%s): landmarks fixed, detection not timed", exc)
        landmarker = _FixedLandmarker()
        info["landmarks"] = "fixed template (detection not timed: no Haar cascade in this OpenCV)"
    if models.device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    avatar = prepare_avatar(
        frames, fps, landmarker=landmarker, encode_latents=models.encode_latents,
        face_parser=parser, key="bench",
    )
    if models.device.type == "cuda":
        torch.cuda.synchronize()
    info["seconds"] = time.perf_counter() - t0
    info["stages_ms"] = dict(avatar.timings_ms)
    return avatar, info


def _synthetic_avatar(models: MuseTalkModels, n: int = 50, size: int = 512) -> PreparedAvatar:
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    face = (156, 140, 356, 380)
    blend = (106, 110, 406, 410)
    mask = np.zeros((300, 300), np.uint8)
    mask[150:, :] = 255
    return PreparedAvatar(
        key="bench", fps=25.0, frames=frames,
        face_boxes=np.array([face] * n, np.int32), blend_boxes=np.array([blend] * n, np.int32),
        masks=[mask] * n, latents=rng.standard_normal((n, 8, 32, 32)).astype(np.float16),
    )


def _time_engine(engine: Engine, avatar: PreparedAvatar, batch: int, warmup: int, iters: int) -> dict:
    rng = np.random.default_rng(batch)
    audio = rng.standard_normal((batch, 50, 384)).astype(np.float32)
    jobs = [FrameJob(avatar.key, i % avatar.num_frames, audio[i]) for i in range(batch)]
    engine.record_timings = False
    for _ in range(warmup):
        engine.step(jobs)
    walls = []
    for _ in range(iters):
        t0 = time.perf_counter()
        engine.step(jobs)
        walls.append((time.perf_counter() - t0) * 1000)
    engine.record_timings = True
    stages: dict[str, list[float]] = {}
    for _ in range(max(3, iters // 2)):
        engine.step(jobs)
        for k, v in engine.last_timings_ms.items():
            stages.setdefault(k, []).append(v)
    engine.record_timings = False
    ms = statistics.median(walls)
    return {
        "batch": batch,
        "ms_per_batch": round(ms, 3),
        "frames_per_s": round(batch * 1000 / ms, 1),
        **{f"{k}_ms": round(statistics.median(v), 3) for k, v in stages.items()},
    }


def run_bench(
    device: str = "cuda",
    dtypes: tuple[str, ...] = ("float16", "bfloat16"),
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64),
    compile: bool = False,
    prep_seconds: float = 10,
    *,
    compile_batch_sizes: tuple[int, ...] = (8, 32),
    channels_last_batch_sizes: tuple[int, ...] = (),
    warmup: int = 3,
    iters: int = 10,
    size: str = "full",
) -> dict:
    dev = resolve_device(device)
    result: dict = {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "weights": f"random, {size} size",
        "eager": [],
        "compiled": [],
        "channels_last": [],
    }
    frames = _idle_video(prep_seconds) if prep_seconds > 0 else None
    for name in dtypes:
        dtype = resolve_dtype(name, dev)
        models = build_random_models(dev, dtype, size)
        if name == dtypes[0]:
            result["unet_params_m"] = round(sum(p.numel() for p in models.unet.parameters()) / 1e6, 1)
            result["vae_decoder_params_m"] = round(
                sum(p.numel() for p in models.vae.decoder.parameters()) / 1e6, 1
            )
        avatar = None
        if frames is not None and name == dtypes[0]:
            try:
                avatar, prep = _prepare(models, frames, 25)
                prep.update(frames=len(frames), size="512x512", dtype=name)
                result["preparation"] = prep
            except Exception as exc:
                log.exception("avatar preparation failed in the bench")
                result["preparation"] = {"error": f"{type(exc).__name__}: {exc}"}
        if avatar is None:
            avatar = _synthetic_avatar(models)
        engine = Engine(models, max_batch=max(batch_sizes))
        engine.register_avatar(avatar)
        for b in batch_sizes:
            row = {"dtype": name, **_time_engine(engine, avatar, b, warmup, iters)}
            result["eager"].append(row)
            print(_fmt(row), flush=True)
        if channels_last_batch_sizes:
            cl = Engine(models, max_batch=max(channels_last_batch_sizes), channels_last=True)
            cl.register_avatar(avatar)
            for b in channels_last_batch_sizes:
                row = {"dtype": name, "channels_last": True, **_time_engine(cl, avatar, b, warmup, iters)}
                result["channels_last"].append(row)
                print(_fmt(row), flush=True)
            models.unet.to(memory_format=torch.contiguous_format)
            models.vae.to(memory_format=torch.contiguous_format)
        if compile and dev.type == "cuda" and name == dtypes[0]:
            for b in compile_batch_sizes:
                try:
                    eng = Engine(models, max_batch=b, compile=True, channels_last=True)
                    eng.register_avatar(avatar)
                    t0 = time.perf_counter()
                    eng.step([FrameJob(avatar.key, 0, np.zeros((50, 384), np.float32))] * b)
                    compile_s = time.perf_counter() - t0
                    row = {"dtype": name, "compile_s": round(compile_s, 1),
                           **_time_engine(eng, avatar, b, warmup, iters)}
                    print(_fmt(row), flush=True)
                except Exception as exc:  # keep the eager figures when compiling fails
                    log.exception("compiled run failed at batch %d", b)
                    row = {"dtype": name, "batch": b, "error": f"{type(exc).__name__}: {exc}"[:500]}
                result["compiled"].append(row)
                models.unet.to(memory_format=torch.contiguous_format)
                models.vae.to(memory_format=torch.contiguous_format)
        del engine, models
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return result


def _fmt(row: dict) -> str:
    tag = "compiled" if "compile_s" in row else ("channels_last" if row.get("channels_last") else "eager")
    return (
        f"{row['dtype']:>9} {tag:>13} B={row['batch']:>3}  {row['ms_per_batch']:9.2f} ms  "
        f"{row['frames_per_s']:8.1f} fps  unet {row.get('unet_ms', 0):7.2f}  "
        f"vae {row.get('vae_decode_ms', 0):7.2f}  paste {row.get('paste_ms', 0):6.2f}  "
        f"copy {row.get('copy_out_ms', 0):6.2f}"
    )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtypes", default="float16,bfloat16")
    p.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--compile-batch-sizes", default="8,32")
    p.add_argument("--channels-last-batch-sizes", default="")
    p.add_argument("--prep-seconds", type=float, default=10)
    p.add_argument("--size", default="full", choices=("full", "tiny"))
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--json", type=Path)
    p.add_argument("--reference-flow", action="store_true",
                   help="run only MuseTalk's realtime_inference flow (uses --device, --size, --frames, "
                        "--reference-batch, --json)")
    reference_flow.add_arguments(p)
    a = p.parse_args(argv)
    if a.reference_flow:
        try:
            res = reference_flow.run_reference_flow(a.device, a.frames, a.size, a.reference_batch)
        except (ValueError, RuntimeError) as exc:  # no CUDA, bad sizes: say what to change
            raise SystemExit(f"reference flow: {exc}") from None
        reference_flow.write_result(res, a.json)
        return
    ints = lambda s: tuple(int(x) for x in s.split(",") if x)  # noqa: E731
    res = run_bench(
        a.device, tuple(a.dtypes.split(",")), ints(a.batch_sizes), a.compile, a.prep_seconds,
        compile_batch_sizes=ints(a.compile_batch_sizes),
        channels_last_batch_sizes=ints(a.channels_last_batch_sizes), iters=a.iters, size=a.size,
    )
    text = json.dumps(res, indent=1)
    if a.json:
        a.json.write_text(text)
    print(text)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
