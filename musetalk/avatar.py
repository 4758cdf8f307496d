"""Avatar preparation (once per idle video) and its on-disk cache.

Pipeline: landmarks per frame (detections far from the video's usual face dropped) ->
face boxes (reference geometry, then temporal smoothing) -> 256x256 crops -> VAE latents
[masked 4 | reference 4] -> blend boxes and soft masks (face parsing when installed,
landmark polygon otherwise).

The daemon and ``lipsync render`` prepare the same way: :class:`PreparationTools` picks
the landmarker and face parser (and a video's shipped landmarks), :func:`prepare_avatar`
does the rest.

Cache layout (one directory per avatar, written atomically):

    meta.json        format version, key, model version, options, fps, shapes
    frames.npy       (N, H, W, 3) uint8 RGB
    face_boxes.npy   (N, 4) int32
    blend_boxes.npy  (N, 4) int32
    latents.npy      (N, 8, 32, 32) float16 or float32: the encoder's precision, named in meta.json
    masks.npy        all masks, flattened and concatenated, uint8
    mask_offsets.npy (N + 1,) int64; mask i is masks[off[i]:off[i+1]] shaped by blend box i

All arrays load memory-mapped, so opening a cached avatar costs file opens, not reads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from musetalk import blending
from musetalk.landmarks import Landmarker
from musetalk.types import FACE_SIZE, LATENT_SIZE, PreparedAvatar

log = logging.getLogger(__name__)

# 2: latents keep the encoder's dtype (version 1 stored float16 whatever the model ran in).
CACHE_FORMAT_VERSION = 2
META_FILE = "meta.json"
PARSE_SIZE = 512

EncodeLatents = Callable[[np.ndarray], np.ndarray]
# A tqdm-like factory: progress(total=N, desc=stage) -> an object with update(n), close().
Progress = Callable[..., Any]
LATENT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32))
SIDECAR_SUFFIX = ".landmarks.npy"


class CacheInvalid(Exception):
    """The cache directory is missing, from another format version, for another key, or
    holds latents of another precision than wanted."""


def latents_storage_dtype(dtype: Any) -> np.dtype:
    """How latents of ``dtype`` are kept: float16 stays float16, anything else becomes
    float32 (which holds float32 and bfloat16 exactly)."""
    return np.dtype(np.float16) if np.dtype(dtype) == np.float16 else np.dtype(np.float32)


class _Timer:
    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._t = time.perf_counter()
        self._start = self._t

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = (now - self._t) * 1000.0
        self._t = now

    def total(self) -> dict[str, float]:
        self.timings["total"] = (time.perf_counter() - self._start) * 1000.0
        return self.timings


class _NoProgress:
    def update(self, n: int = 1) -> None:
        pass

    def close(self) -> None:
        pass


def _bar(progress: Progress | None, total: int, stage: str) -> Any:
    return progress(total=total, desc=stage) if progress is not None else _NoProgress()


# ------------------------------------------------------------------ tools


@dataclass
class PreparationTools:
    """The networks preparation runs besides the VAE: the landmarker and the optional face
    parser, loaded once per process. ``landmarker`` is None where this OpenCV build has no
    face detector and no DWPose model is used: avatars then need shipped landmarks."""

    landmarker: Landmarker | None
    face_parser: Any = None

    @classmethod
    def load(cls, model_dir: str | Path, device: Any, *, landmarks: str = "auto",
             random_weights: bool = False) -> PreparationTools:
        """``landmarks``: "auto" (DWPose when installed), "onnx" or "opencv".

        With random weights, random landmark and parsing networks would put the face
        anywhere (the mouth lands on the collar and jumps from frame to frame): the
        bundled detector and the landmark mask are used instead, so the output stays
        watchable.
        """
        from musetalk.landmarks import HaarTemplateLandmarker, make_landmarker

        if random_weights:
            try:
                return cls(HaarTemplateLandmarker(), None)
            except RuntimeError as exc:
                log.warning("no bundled face detector in this OpenCV build: avatars need "
                            "landmark sidecars (%s)", exc)
                return cls(None, None)
        landmarker = make_landmarker(landmarks, model_dir)
        try:
            from musetalk.face_parsing import load_face_parser

            face_parser = load_face_parser(model_dir, device)
        except FileNotFoundError:
            log.warning("face-parsing model absent: blend masks use the landmark polygon "
                        "(lower quality); `lipsync models download` fetches it")
            face_parser = None
        return cls(landmarker, face_parser)

    def landmarker_for(self, video_path: str | Path | None, num_frames: int) -> Landmarker:
        """The landmarker for one video. A video may ship its landmarks as a sidecar
        ``<video>.landmarks.npy``, (frames, 68, 2), made with the bundled detector or a
        prepared pipeline: replaying them gives the same avatar without the detector
        (absent from some OpenCV builds). Real DWPose landmarks win when present."""
        from musetalk.landmarks import PrecomputedLandmarker

        quality = getattr(self.landmarker, "quality", "") if self.landmarker is not None else "none"
        if video_path is not None and (quality.startswith("opencv") or quality == "none"):
            sidecar = Path(f"{video_path}{SIDECAR_SUFFIX}")
            if sidecar.is_file():
                landmarks = np.load(sidecar)
                if len(landmarks) == num_frames:
                    return PrecomputedLandmarker(landmarks, f"{quality}, {sidecar.name}")
        if self.landmarker is None:
            raise ValueError(
                "no face detector in this OpenCV build and no landmark sidecar "
                f"(<video>{SIDECAR_SUFFIX}) for this video: install opencv-python-headless<5 "
                "or fetch the DWPose model with `lipsync models download`"
            )
        return self.landmarker


def detect_all(
    frames: np.ndarray,
    landmarker: Landmarker,
    max_missing_fraction: float = 0.5,
    outlier_tolerance: float | None = 0.6,
    progress: Progress | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 68, 2) landmarks for every frame and a bool array of frames that had a face.

    A frame without a face takes the landmarks of the nearest frame with one (earlier
    one on ties): the head barely moves between neighbouring frames of an idle video.
    A face whose centre lies more than ``outlier_tolerance`` face sizes from the median
    face, or whose size is off by more than that fraction, counts as not found: in an
    idle video that is a false detection (a pattern on clothes), not a head movement.
    """
    n = frames.shape[0]
    bar = _bar(progress, n, "landmarks")
    found: list[np.ndarray | None] = []
    for i in range(n):
        found.append(landmarker.detect(frames[i]))
        bar.update(1)
    bar.close()
    if outlier_tolerance is not None:
        found = _drop_outliers(found, outlier_tolerance)
    detected = np.array([f is not None for f in found])
    missing = int(n - detected.sum())
    if detected.sum() == 0:
        raise ValueError(
            f"no face found in any of the {n} frames of the idle video; it must show one "
            "frontal face, well lit, at least ~8% of the frame's height"
        )
    if missing / n > max_missing_fraction:
        raise ValueError(
            f"no face found in {missing} of {n} frames ({missing / n:.0%}, more than the "
            f"allowed {max_missing_fraction:.0%}); use an idle video where the face stays "
            "visible and frontal, or raise max_missing_fraction"
        )
    if missing:
        log.warning("no face in %d of %d frames; reusing the nearest detected face", missing, n)
    idx = np.flatnonzero(detected)
    out = np.empty((n, 68, 2), dtype=np.float64)
    for i in range(n):
        j = idx[np.argmin(np.abs(idx - i))]
        out[i] = found[j]
    return out, detected


def _drop_outliers(found: list[np.ndarray | None], tolerance: float) -> list[np.ndarray | None]:
    present = [f for f in found if f is not None]
    if len(present) < 3:
        return found
    centres = np.array([(f.min(0) + f.max(0)) / 2 for f in present])
    sizes = np.array([float(np.max(f.max(0) - f.min(0))) for f in present])
    med_c, med_s = np.median(centres, axis=0), float(np.median(sizes))
    out: list[np.ndarray | None] = []
    dropped = 0
    for f in found:
        if f is not None:
            c = (f.min(0) + f.max(0)) / 2
            s = float(np.max(f.max(0) - f.min(0)))
            if np.linalg.norm(c - med_c) > tolerance * med_s or abs(s / med_s - 1) > tolerance:
                f = None
                dropped += 1
        out.append(f)
    if dropped:
        log.warning("ignored %d face detections far from the video's usual face position", dropped)
    return out


def prepare_avatar(
    frames: np.ndarray,
    fps: float,
    *,
    landmarker: Landmarker,
    encode_latents: EncodeLatents,
    face_parser: Any = None,
    extra_margin: int = 10,
    parsing_mode: str = "jaw",
    max_missing_fraction: float = 0.5,
    outlier_tolerance: float | None = 0.6,
    key: str,
    smooth_window: int = 5,
    cheek_width: int = 90,
    batch_size: int = 16,
    progress: Progress | None = None,
) -> PreparedAvatar:
    """Prepare every frame of an idle video for generation.

    ``encode_latents`` maps (B, 256, 256, 3) uint8 RGB crops to (B, 8, 32, 32) latents
    [masked 4 | reference 4], already scaled; they are kept in its precision (float16
    stays float16, float32 and anything else is kept as float32). ``face_parser`` has
    ``parse((B, 512, 512, 3) uint8) -> (B, 512, 512) uint8`` labels; without it the
    blend masks come from the landmark polygon. ``progress`` (a tqdm-like factory) gets
    one bar per stage: landmarks, latents, masks.
    """
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected (N, H, W, 3) uint8 RGB frames, got {frames.shape} {frames.dtype}")
    if frames.shape[0] == 0:
        raise ValueError("the idle video has no frames")
    if parsing_mode not in ("jaw", "raw"):
        raise ValueError(f"unknown parsing_mode {parsing_mode!r}: use 'jaw' or 'raw'")
    n, h, w, _ = frames.shape
    timer = _Timer()

    landmarks, _ = detect_all(frames, landmarker, max_missing_fraction, outlier_tolerance, progress)
    timer.lap("landmarks")

    raw_boxes = np.array(
        [blending.face_box_from_landmarks(landmarks[i], w, h, extra_margin) for i in range(n)], dtype=np.int32
    )
    face_boxes = blending.smooth_boxes(raw_boxes, w, h, window=smooth_window)
    squares = [blending.blend_square(tuple(b)) for b in face_boxes]
    timer.lap("boxes")

    crops = np.stack([blending.crop_face(frames[i], tuple(face_boxes[i])) for i in range(n)])
    timer.lap("crops")

    latents: np.ndarray | None = None
    bar = _bar(progress, n, "latents")
    for i in range(0, n, batch_size):
        out = np.asarray(encode_latents(crops[i : i + batch_size]))
        if out.shape != (min(batch_size, n - i), 8, LATENT_SIZE, LATENT_SIZE):
            raise ValueError(f"encode_latents returned shape {out.shape}, expected (B, 8, {LATENT_SIZE}, {LATENT_SIZE})")
        if latents is None:
            latents = np.empty((n, 8, LATENT_SIZE, LATENT_SIZE), dtype=latents_storage_dtype(out.dtype))
        latents[i : i + out.shape[0]] = out
        bar.update(out.shape[0])
    bar.close()
    timer.lap("latents")

    bar = _bar(progress, n, "masks")
    blend_boxes, masks = _masks(
        frames, face_boxes, squares, landmarks, face_parser, parsing_mode, cheek_width, batch_size, bar
    )
    bar.close()
    timer.lap("masks")

    source = getattr(landmarker, "quality", type(landmarker).__name__)
    source += " + " + ("bisenet-" + parsing_mode if face_parser is not None else "landmark-mask")
    return PreparedAvatar(
        key=key,
        fps=float(fps),
        frames=frames,
        face_boxes=face_boxes,
        blend_boxes=blend_boxes,
        masks=masks,
        latents=latents,
        landmark_source=source,
        timings_ms=timer.total(),
    )


def _masks(
    frames: np.ndarray,
    face_boxes: np.ndarray,
    squares: list[blending.Box],
    landmarks: np.ndarray,
    face_parser: Any,
    parsing_mode: str,
    cheek_width: int,
    batch_size: int,
    bar: Any,
) -> tuple[np.ndarray, list[np.ndarray]]:
    n, h, w, _ = frames.shape
    blend_boxes = np.empty((n, 4), dtype=np.int32)
    masks: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        idx = range(start, min(n, start + batch_size))
        labels = None
        if face_parser is not None:
            # The parser sees the whole blend square (black outside the frame) at 512x512.
            batch = np.stack(
                [
                    cv2.resize(blending.crop_square(frames[i], squares[i]), (PARSE_SIZE, PARSE_SIZE), interpolation=cv2.INTER_LINEAR)
                    for i in idx
                ]
            )
            labels = face_parser.parse(batch)
        for k, i in enumerate(idx):
            sq = squares[i]
            side = sq[2] - sq[0]
            fx1, fy1, fx2, fy2 = (int(v) for v in face_boxes[i])
            face_rel = (fx1 - sq[0], fy1 - sq[1], fx2 - sq[0], fy2 - sq[1])
            if labels is not None:
                m = blending.mask_from_parsing(labels[k], side, face_rel, mode=parsing_mode, cheek_width=cheek_width)
            else:
                m = blending.mask_from_landmarks(landmarks[i] - [sq[0], sq[1]], side, face_rel)
            box, m = blending.clip_square(m, sq, w, h)
            blend_boxes[i] = box
            masks.append(m)
        bar.update(len(idx))
    return blend_boxes, masks


# ---------------------------------------------------------------------------- cache


def avatar_cache_key(content_hash: str, model_version: str, options: dict[str, Any]) -> str:
    """Stable key of one prepared avatar: video content, models, and preparation options."""
    payload = json.dumps(
        {"format": CACHE_FORMAT_VERSION, "content": content_hash, "model": model_version, "options": options},
        sort_keys=True,
        separators=(",", ":"),
        default=str,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def save_prepared(
    avatar: PreparedAvatar,
    directory: str | Path,
    *,
    model_version: str = "",
    options: dict[str, Any] | None = None,
) -> Path:
    """Write the avatar to ``directory`` (replaced atomically: readers never see half a cache).

    Latents are written in their own precision (float16 or float32), never narrowed.
    """
    directory = Path(directory)
    latents = np.asarray(avatar.latents)
    if latents.dtype not in LATENT_DTYPES:
        latents = latents.astype(latents_storage_dtype(latents.dtype))
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
    try:
        sizes = [int(m.size) for m in avatar.masks]
        offsets = np.zeros(len(sizes) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(sizes)
        flat = np.concatenate([m.reshape(-1) for m in avatar.masks]) if avatar.masks else np.zeros(0, np.uint8)
        np.save(tmp / "frames.npy", np.ascontiguousarray(avatar.frames, dtype=np.uint8))
        np.save(tmp / "face_boxes.npy", np.asarray(avatar.face_boxes, dtype=np.int32))
        np.save(tmp / "blend_boxes.npy", np.asarray(avatar.blend_boxes, dtype=np.int32))
        np.save(tmp / "latents.npy", latents)
        np.save(tmp / "masks.npy", flat.astype(np.uint8))
        np.save(tmp / "mask_offsets.npy", offsets)
        meta = {
            "format_version": CACHE_FORMAT_VERSION,
            "key": avatar.key,
            "model_version": model_version,
            "options": options or {},
            "fps": avatar.fps,
            "num_frames": avatar.num_frames,
            "latents_dtype": latents.dtype.name,
            "height": avatar.height,
            "width": avatar.width,
            "landmark_source": avatar.landmark_source,
            "timings_ms": avatar.timings_ms,
        }
        (tmp / META_FILE).write_text(json.dumps(meta, indent=1, default=str))
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old.{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def read_cache_meta(directory: str | Path) -> dict[str, Any]:
    path = Path(directory) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CacheInvalid(f"no avatar cache at {directory}") from e
    except (OSError, json.JSONDecodeError) as e:
        raise CacheInvalid(f"unreadable avatar cache metadata {path}: {e}") from e
    if meta.get("format_version") != CACHE_FORMAT_VERSION:
        raise CacheInvalid(
            f"avatar cache {directory} has format version {meta.get('format_version')}, "
            f"this build reads version {CACHE_FORMAT_VERSION}"
        )
    return meta


def load_prepared(
    directory: str | Path, *, key: str | None = None, mmap: bool = True, latents_dtype: Any = None
) -> PreparedAvatar:
    """Open a cached avatar. Raises :class:`CacheInvalid` when it must be rebuilt.

    ``latents_dtype``: the precision the model wants (``MuseTalkModels.latents_dtype``).
    A cache of narrower latents (float16 for a float32 model) is invalid: widening them
    back would not restore what was rounded away. Wider ones are fine (the engine casts
    them down on upload). None accepts any.
    """
    directory = Path(directory)
    meta = read_cache_meta(directory)
    if key is not None and meta.get("key") != key:
        raise CacheInvalid(f"avatar cache {directory} is for key {meta.get('key')}, wanted {key}")
    stored = meta.get("latents_dtype")
    if stored not in {d.name for d in LATENT_DTYPES}:
        raise CacheInvalid(f"avatar cache {directory} names latents dtype {stored!r}, not float16 or float32")
    if latents_dtype is not None:
        wanted = latents_storage_dtype(latents_dtype)
        if np.dtype(stored).itemsize < wanted.itemsize:
            raise CacheInvalid(
                f"avatar cache {directory} holds {stored} latents; the model needs {wanted.name}"
            )
    mode = "r" if mmap else None
    try:
        frames = np.load(directory / "frames.npy", mmap_mode=mode)
        face_boxes = np.load(directory / "face_boxes.npy")
        blend_boxes = np.load(directory / "blend_boxes.npy")
        latents = np.load(directory / "latents.npy", mmap_mode=mode)
        flat = np.load(directory / "masks.npy", mmap_mode=mode)
        offsets = np.load(directory / "mask_offsets.npy")
    except (OSError, ValueError) as e:
        raise CacheInvalid(f"avatar cache {directory} is incomplete or corrupt: {e}") from e
    n = int(meta["num_frames"])
    if frames.shape[0] != n or latents.shape != (n, 8, LATENT_SIZE, LATENT_SIZE) or offsets.shape != (n + 1,):
        raise CacheInvalid(f"avatar cache {directory} has inconsistent array shapes")
    if latents.dtype.name != stored:
        raise CacheInvalid(f"avatar cache {directory}: latents.npy is {latents.dtype}, meta.json says {stored}")
    masks = []
    for i in range(n):
        x1, y1, x2, y2 = (int(v) for v in blend_boxes[i])
        masks.append(flat[offsets[i] : offsets[i + 1]].reshape(y2 - y1, x2 - x1))
    return PreparedAvatar(
        key=meta["key"],
        fps=float(meta["fps"]),
        frames=frames,
        face_boxes=face_boxes,
        blend_boxes=blend_boxes,
        masks=masks,
        latents=latents,
        landmark_source=meta.get("landmark_source", "unknown"),
        timings_ms=dict(meta.get("timings_ms", {})),
    )


def evict_prepared(root: str | Path, max_bytes: int, keep: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """Delete the least recently used prepared avatars under ``root`` (one directory
    each, its mtime the last use) until the rest fit in ``max_bytes``; never those named
    in ``keep`` (in use). Returns the names deleted."""
    entries = []
    for directory in Path(root).iterdir() if Path(root).is_dir() else []:
        if not directory.is_dir() or directory.name.startswith("."):
            continue
        try:
            size = sum(f.stat().st_size for f in directory.iterdir() if f.is_file())
            entries.append((directory.stat().st_mtime, size, directory))
        except OSError:
            continue
    total = sum(size for _, size, _ in entries)
    removed = []
    for _, size, directory in sorted(entries):
        if total <= max_bytes:
            break
        if directory.name in keep:
            continue
        shutil.rmtree(directory, ignore_errors=True)
        total -= size
        removed.append(directory.name)
    return removed


def load_cached(directory: str | Path, key: str, *, latents_dtype: Any = None) -> PreparedAvatar | None:
    """The cached avatar when valid for ``key`` (and, when given, holding latents at least
    as precise as ``latents_dtype``), else None (the reason logged)."""
    try:
        avatar = load_prepared(directory, key=key, latents_dtype=latents_dtype)
    except CacheInvalid as e:
        log.info("no usable avatar cache: %s", e)
        return None
    os.utime(directory)  # used now: evicted last (evict_prepared)
    return avatar


def load_or_prepare(
    directory: str | Path,
    key: str,
    prepare: Callable[[], PreparedAvatar],
    *,
    model_version: str = "",
    options: dict[str, Any] | None = None,
    latents_dtype: Any = None,
) -> tuple[PreparedAvatar, bool]:
    """The cached avatar (``load_cached``), else a fresh one (saved). Returns (avatar, from_cache)."""
    avatar = load_cached(directory, key, latents_dtype=latents_dtype)
    if avatar is not None:
        return avatar, True
    avatar = prepare()
    save_prepared(avatar, directory, model_version=model_version, options=options)
    return avatar, False


def face_crops(avatar: PreparedAvatar) -> np.ndarray:
    """The 256x256 crops of a prepared avatar (recomputed; they are not cached)."""
    return np.stack(
        [blending.crop_face(avatar.frames[i], tuple(avatar.face_boxes[i])) for i in range(avatar.num_frames)]
    ).reshape(-1, FACE_SIZE, FACE_SIZE, 3)
