"""MuseTalk's own real-time flow, reproduced on this machine for a capacity ratio.

MuseTalk states its real-time speed with ``scripts/realtime_inference.py``
(TMElyralab/MuseTalk). Our capacity is only meaningful next to that figure measured on
the same card, so this module runs the same flow with the same architectures
(full-size random weights: speed does not depend on weight values):

1. whisper features for the WHOLE clip at once (30 s segments), the 50 tokens per
   frame cut from them, all kept on the device (``Avatar.inference``: the
   ``get_audio_feature`` / ``get_whisper_chunk`` phase, timed apart);
2. a GPU loop over batches of 20 frames (``datagen``): the ping-pong avatar's latents
   concatenated on the device, the eager fp16 UNet at timestep 0, the VAE decode, and
   ``decode_latents``' host conversion (fp16 to the host, ``*255``, round, uint8, BGR);
   every frame is put on a queue;
3. meanwhile ONE consumer thread (``process_frames``), per frame: a copy of the idle
   frame, ``cv2.resize`` of the 256x256 face to its face box, and
   ``get_image_blending``: PIL paste of the face into the blend box's crop, then of the
   crop into the frame through the mask. Images are not saved (``--skip_save_images``).

Frames/s is the frames over the wall time of phases 2+3 together, as the script
prints it; whisper time and the total are reported beside it. Two deliberate
differences: one batch runs before the timed phase (the script's first clip pays CUDA's
lazy initialisation; a capacity figure is about the steady state), and every frame is
blended (the script's consumer stops one frame early, at ``idx >= video_len - 1``).

    python -m musetalk.reference_flow --device cuda --frames 500 --json ref.json
    lipsync bench --reference-flow --frames 500
"""

from __future__ import annotations

import argparse
import json
import logging
import queue
import statistics
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from musetalk.audio import offline_tokens
from musetalk.models import MuseTalkModels, resolve_device, resolve_dtype
from musetalk.types import PreparedAvatar
from musetalk.whisper import SAMPLE_RATE, load_whisper_encoder, write_random_whisper

log = logging.getLogger(__name__)

FPS = 25
SIZES = ("full", "tiny")
# The script's consumer waits this long on an empty queue before looking again.
_QUEUE_POLL_S = 1.0


def blend_like_reference(
    image_bgr: np.ndarray, face_bgr: np.ndarray, face_box: Sequence[int], mask: np.ndarray,
    crop_box: Sequence[int],
) -> np.ndarray:
    """MuseTalk's ``get_image_blending``: the face (already at its face box's size) is
    pasted into the crop of ``crop_box``, and that crop back into the frame through
    ``mask`` (uint8, the crop box's size). BGR in, BGR out, through PIL as there."""
    body = Image.fromarray(image_bgr[:, :, ::-1])
    face = Image.fromarray(face_bgr[:, :, ::-1])
    x, y, x1, y1 = face_box
    x_s, y_s = crop_box[0], crop_box[1]
    face_large = body.crop(tuple(crop_box))
    mask_image = Image.fromarray(mask).convert("L")
    face_large.paste(face, (x - x_s, y - y_s, x1 - x_s, y1 - y_s))
    body.paste(face_large, (x_s, y_s), mask_image)
    return np.array(body)[:, :, ::-1]


def cycle(n: int) -> list[int]:
    """The script's avatar order: its frames forwards then backwards (``frame_list +
    frame_list[::-1]``), output frame i taking entry ``i % (2 n)``."""
    return list(range(n)) + list(range(n))[::-1]


class _Blender:
    """The script's ``process_frames`` thread: takes decoded faces off the queue in
    order and blends each into the next frame of the ping-pong avatar."""

    def __init__(self, avatar: PreparedAvatar, total: int, keep: set[int]) -> None:
        self.frames_bgr = np.ascontiguousarray(avatar.frames[..., ::-1])  # cv2.imread gives BGR
        self.order = cycle(avatar.num_frames)
        self.face_boxes = [tuple(int(v) for v in b) for b in avatar.face_boxes]
        self.crop_boxes = [tuple(int(v) for v in b) for b in avatar.blend_boxes]
        self.masks = avatar.masks
        self.total = total
        self.keep = keep
        self.idx = 0
        self.blend_ms: list[float] = []
        self.samples: list[dict] = []
        self.error: BaseException | None = None
        self.stop = threading.Event()  # set by whichever side fails

    def run(self, frames: queue.Queue) -> None:
        try:
            while self.idx < self.total and not self.stop.is_set():
                try:
                    res_frame = frames.get(block=True, timeout=_QUEUE_POLL_S)
                except queue.Empty:
                    continue
                t = time.perf_counter()
                i = self.order[self.idx % len(self.order)]
                face_box = self.face_boxes[i]
                ori_frame = self.frames_bgr[i].copy()
                x1, y1, x2, y2 = face_box
                face = cv2.resize(res_frame.astype(np.uint8), (x2 - x1, y2 - y1))
                combined = blend_like_reference(ori_frame, face, face_box, self.masks[i], self.crop_boxes[i])
                self.blend_ms.append((time.perf_counter() - t) * 1000)
                if self.idx in self.keep:
                    self.samples.append({"frame": self.idx, "avatar_frame": i, "blended": combined,
                                         "idle": self.frames_bgr[i], "blend_box": self.crop_boxes[i]})
                self.idx += 1
        except BaseException as exc:  # handed to the producer, which stops and re-raises it
            self.error = exc
            self.stop.set()


def _decode_like_reference(models: MuseTalkModels, latents: torch.Tensor) -> np.ndarray:
    """``VAE.decode_latents``: (B, 4, 32, 32) -> (B, 256, 256, 3) uint8 BGR on the host,
    converted there as the script does (fp16 copy, then float, *255, round)."""
    image = models.vae.decode((1 / models.scaling_factor) * latents.to(models.vae.dtype)).sample
    image = (image / 2 + 0.5).clamp(0, 1)
    image = image.detach().cpu().permute(0, 2, 3, 1).float().numpy()
    image = (image * 255).round().astype("uint8")
    return image[..., ::-1]


def _synthetic_speech(frames: int) -> np.ndarray:
    """Exactly ``frames`` video frames of 16 kHz audio: noise under a syllable-rate
    envelope (whisper's cost depends on the length only)."""
    n = frames * SAMPLE_RATE // FPS
    t = np.arange(n) / SAMPLE_RATE
    rng = np.random.default_rng(0)
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 4 * t)
    return (0.1 * envelope * rng.standard_normal(n)).astype(np.float32)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def run_reference_flow(
    device: str | torch.device = "cuda",
    frames: int = 500,
    size: str = "full",
    batch: int = 20,
    *,
    keep_frames: Sequence[int] = (),
) -> dict:
    """Run the flow once over ``frames`` video frames; returns its figures.

    ``keep_frames``: output frame indices whose blended frame (with its idle frame and
    blend box, BGR) is returned under ``"samples"``, for checking the blend.
    """
    from musetalk.bench import _synthetic_avatar, build_random_models

    if isinstance(frames, bool) or not isinstance(frames, int) or frames < 1:
        raise ValueError(f"frames must be a positive integer, got {frames!r}")
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got {batch!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {', '.join(SIZES)}, got {size!r}")
    bad = [k for k in keep_frames if not 0 <= k < frames]
    if bad:
        raise ValueError(f"keep_frames {bad} lie outside the {frames} frames")
    dev = resolve_device(device)
    dtype = resolve_dtype("float16", dev)  # the script halves everything; float32 on a CPU
    models = build_random_models(dev, dtype, size)
    avatar = _synthetic_avatar(models)

    with tempfile.TemporaryDirectory() as tmp:
        whisper = load_whisper_encoder(write_random_whisper(Path(tmp) / "whisper", size), dev, dtype)

    offline_tokens(whisper, _synthetic_speech(FPS), FPS)  # warm-up, untimed
    pcm = _synthetic_speech(frames)
    _sync(dev)
    t0 = time.perf_counter()
    tokens = torch.from_numpy(offline_tokens(whisper, pcm, FPS)).to(dev, dtype)
    _sync(dev)
    whisper_s = time.perf_counter() - t0
    if tokens.shape[0] != frames:
        raise RuntimeError(f"whisper gave tokens for {tokens.shape[0]} frames, expected {frames}")

    latent_cycle = [torch.from_numpy(avatar.latents[i][None].astype(np.float32)).to(dev, dtype)
                    for i in cycle(avatar.num_frames)]
    timesteps = torch.tensor([0], device=dev)

    def generate(idx: range) -> np.ndarray:
        """One ``datagen`` batch through the UNet and the decode, as the script's loop."""
        whisper_batch = torch.stack([tokens[i] for i in idx])
        latent_batch = torch.cat([latent_cycle[i % len(latent_cycle)] for i in idx], dim=0)
        pred = models.unet(latent_batch.to(dev, models.unet.dtype), timesteps,
                           encoder_hidden_states=whisper_batch).sample
        return _decode_like_reference(models, pred)

    generate(range(min(batch, frames)))  # warm-up, untimed

    blender = _Blender(avatar, frames, set(keep_frames))
    faces: queue.Queue = queue.Queue()
    consumer = threading.Thread(target=blender.run, args=(faces,), name="reference-blend", daemon=True)
    consumer.start()
    t0 = time.perf_counter()
    try:
        for start in range(0, frames, batch):
            if blender.stop.is_set():
                break
            for face in generate(range(start, min(frames, start + batch))):
                faces.put(face)
        gpu_loop_s = time.perf_counter() - t0
    except BaseException:
        blender.stop.set()  # else the consumer waits forever for frames that never come
        raise
    finally:
        consumer.join()
    generation_s = time.perf_counter() - t0
    if blender.error is not None:
        raise RuntimeError(f"the blending thread failed: {blender.error!r}") from blender.error

    result = {
        "flow": "MuseTalk scripts/realtime_inference.py: whole-clip whisper, eager UNet + VAE decode "
                f"in batches of {batch}, per-frame cv2.resize + PIL blend on one consumer thread",
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": str(dtype).removeprefix("torch."),
        "weights": f"random, {size} size",
        "avatar": f"synthetic {avatar.width}x{avatar.height}, {avatar.num_frames} frames in ping-pong",
        "frames": frames,
        "batch": batch,
        "blended_frames": blender.idx,
        "warmup_batches": 1,
        "cv2_threads": cv2.getNumThreads(),
        "whisper_s": round(whisper_s, 4),
        "generation_s": round(generation_s, 4),
        "generation_frames_per_s": round(frames / generation_s, 2),
        "gpu_loop_s": round(gpu_loop_s, 4),
        "blend_ms_per_frame": round(statistics.mean(blender.blend_ms), 3),
        "total_s": round(whisper_s + generation_s, 4),
        "total_frames_per_s": round(frames / (whisper_s + generation_s), 2),
    }
    if keep_frames:
        result["samples"] = blender.samples
    return result


def format_result(result: dict) -> str:
    return (
        f"reference flow on {result['device']} ({result['dtype']}, {result['weights']}): "
        f"{result['frames']} frames, batch {result['batch']}: "
        f"{result['generation_frames_per_s']} frames/s generation+blend "
        f"({result['generation_s']} s; GPU loop {result['gpu_loop_s']} s, "
        f"blend {result['blend_ms_per_frame']} ms/frame), whisper {result['whisper_s']} s, "
        f"total {result['total_frames_per_s']} frames/s"
    )


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options the flow takes beside --device and --size (shared with musetalk.bench)."""
    p.add_argument("--frames", type=_positive_int, default=500, help="video frames to generate (default 500)")
    p.add_argument("--reference-batch", type=_positive_int, default=20,
                   help="frames per GPU batch (the script's --batch_size, default 20)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def write_result(result: dict, json_path: Path | None) -> None:
    """Print the figures (one line, then JSON) and write the JSON to ``json_path``."""
    text = json.dumps({k: v for k, v in result.items() if k != "samples"}, indent=1)
    if json_path:
        json_path.write_text(text)
    print(format_result(result), flush=True)
    print(text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", default="full", choices=SIZES)
    add_arguments(p)
    p.add_argument("--json", type=Path)
    a = p.parse_args(argv)
    write_result(run_reference_flow(a.device, a.frames, a.size, a.reference_batch), a.json)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    main()
