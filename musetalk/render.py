"""Offline rendering: idle video + speech file -> talking MP4 (``lipsync render``).

The same pieces the daemon uses, run over a whole file: its video decoder
(``musetalk.video``), its avatar preparation (``PreparationTools`` + ``prepare_avatar``),
reference (whole-utterance) whisper features, batched engine steps, then H.264 + AAC with
the speech muxed in. Video frames: floor(audio duration * fps); frame i shows avatar frame
i in ping-pong order (0, 1, .., N-1, N-1, .., 0, 0, 1, ..) as the reference does.
"""

from __future__ import annotations

import functools
import logging
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from tqdm.auto import tqdm

from musetalk.engine import Engine
from musetalk.models import load_models
from musetalk.types import FrameJob
from musetalk.video import VideoLimits, decode_frames
from musetalk.weights import write_random_weights

log = logging.getLogger(__name__)


@dataclass
class RenderResult:
    out_path: Path
    frames: int
    fps: float
    audio_seconds: float
    avatar_frames: int
    landmark_source: str
    timings_s: dict[str, float] = field(default_factory=dict)


def ping_pong(i: int, n: int) -> int:
    """Avatar frame for output frame ``i`` over an ``n``-frame idle video."""
    if n <= 1:
        return 0
    j = i % (2 * n)
    return j if j < n else 2 * n - 1 - j


def read_audio(path: Path) -> tuple[np.ndarray, int]:
    """Interleaved int16 samples (S, C) and the rate, in the file's own layout.

    Decoded with PyAV so that any container works (librosa cannot read MP4 without an
    ffmpeg binary).
    """
    try:
        container = av.open(str(path))
    except (av.FFmpegError, OSError) as exc:
        raise ValueError(f"cannot open the audio file {path}: {exc}") from exc
    with container:
        if not container.streams.audio:
            raise ValueError(f"{path} has no audio stream")
        stream = container.streams.audio[0]
        rate = stream.rate
        channels = stream.codec_context.layout.nb_channels
        layout = "mono" if channels == 1 else "stereo"
        resampler = av.AudioResampler(format="s16", layout=layout, rate=rate)
        chunks = []
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1, min(channels, 2)))
        for out in resampler.resample(None):
            chunks.append(out.to_ndarray().reshape(-1, min(channels, 2)))
    if not chunks:
        raise ValueError(f"{path}: the audio stream is empty")
    return np.concatenate(chunks).astype(np.int16), int(rate)


def _audio_tokens(features: np.ndarray, num_frames: int, fps: Fraction) -> np.ndarray:
    """(num_frames, 50, 384) tokens; exact for fractional rates such as 30000/1001."""
    from musetalk.audio import FEATURE_RATE, FEATURES_PER_FRAME, frame_tokens, padding_frames, window_tokens

    if fps.denominator == 1:
        return window_tokens(features, num_frames, int(fps))
    left, right = padding_frames(fps)
    pad = np.zeros((1,) + features.shape[1:], dtype=np.float32)
    padded = np.concatenate([np.repeat(pad, left, 0), features.astype(np.float32), np.repeat(pad, right, 0)])
    out = np.empty((num_frames, 50, features.shape[2]), dtype=np.float32)
    for f in range(num_frames):
        start = math.floor(f * FEATURE_RATE / fps)
        window = padded[start : start + FEATURES_PER_FRAME]
        if window.shape[0] < FEATURES_PER_FRAME:  # the last frames of a clipped tail
            window = np.concatenate([window, np.repeat(pad, FEATURES_PER_FRAME - window.shape[0], 0)])
        out[f] = frame_tokens(window)
    return out


def _write_mp4(
    out_path: Path,
    frames_iter,
    fps: Fraction,
    width: int,
    height: int,
    pcm: np.ndarray,
    rate: int,
    crf: int = 18,
) -> None:
    with av.open(str(out_path), "w") as out:
        vstream = out.add_stream("libx264", rate=fps)
        vstream.width, vstream.height, vstream.pix_fmt = width, height, "yuv420p"
        vstream.options = {"crf": str(crf)}
        layout = "mono" if pcm.shape[1] == 1 else "stereo"
        astream = out.add_stream("aac", rate=rate, layout=layout)
        for rgba in frames_iter:
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgba[:height, :width]), format="rgba")
            for packet in vstream.encode(frame):
                out.mux(packet)
        for packet in vstream.encode():
            out.mux(packet)
        chunk = 1024 * 8
        for start in range(0, len(pcm), chunk):
            block = np.ascontiguousarray(pcm[start : start + chunk]).reshape(1, -1)
            aframe = av.AudioFrame.from_ndarray(block, format="s16", layout=layout)
            aframe.sample_rate = rate
            for packet in astream.encode(aframe):
                out.mux(packet)
        for packet in astream.encode():
            out.mux(packet)


def render_offline(
    video_path: str | Path,
    audio_path: str | Path,
    out_path: str | Path,
    models_dir: str | Path,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    progress: bool | None = None,
    random_weights: str | None = None,
    *,
    batch_size: int = 16,
    landmarks: str = "auto",
    extra_margin: int = 10,
    parsing_mode: str = "jaw",
    video_limits: VideoLimits | None = None,
) -> RenderResult:
    """Render ``audio_path`` spoken by the person of ``video_path`` into ``out_path``.

    ``random_weights`` ("tiny" or "full") writes random weights in the real formats to
    a temporary folder and uses them instead of ``models_dir``: for trying the pipeline
    without downloads (the mouth is noise then). ``landmarks``, ``extra_margin`` and
    ``parsing_mode`` are the daemon's ``model.*`` settings of the same names.
    ``progress``: progress bars on stderr; None shows them when stderr is a terminal.
    """
    from musetalk.audio import offline_features, resample_to_16k
    from musetalk.avatar import PreparationTools, prepare_avatar
    from musetalk.whisper import load_whisper_encoder

    video_path, audio_path, out_path = Path(video_path), Path(audio_path), Path(out_path)
    if progress is None:
        progress = sys.stderr.isatty()
    bars = functools.partial(tqdm, unit="frame", disable=not progress)
    timings: dict[str, float] = {}
    # The inputs first: a bad file is reported before the models load.
    t = time.perf_counter()
    video = decode_frames(video_path, video_limits)
    fps = video.rate
    pcm, rate = read_audio(audio_path)
    timings["decode"] = time.perf_counter() - t

    with tempfile.TemporaryDirectory() as tmp:
        if random_weights is not None:
            models_dir = write_random_weights(Path(tmp) / "models", size=random_weights)
        models_dir = Path(models_dir)

        t = time.perf_counter()
        models = load_models(models_dir, device, dtype)
        encoder = load_whisper_encoder(models_dir / "whisper-tiny", models.device, models.dtype)
        timings["load_models"] = time.perf_counter() - t

        t = time.perf_counter()
        tools = PreparationTools.load(models_dir, models.device, landmarks=landmarks,
                                      random_weights=random_weights is not None)
        avatar = prepare_avatar(
            video.frames, video.fps, landmarker=tools.landmarker_for(video_path, video.num_frames),
            encode_latents=models.encode_latents, face_parser=tools.face_parser,
            extra_margin=extra_margin, parsing_mode=parsing_mode, key=video_path.stem or "avatar",
            progress=bars,
        )
        timings["prepare_avatar"] = time.perf_counter() - t

        t = time.perf_counter()
        mono = pcm.mean(axis=1).round().astype(np.int16) if pcm.shape[1] > 1 else pcm[:, 0]
        pcm16k = resample_to_16k(mono, rate)
        # floor(duration * fps) in exact arithmetic: samples * fps / rate.
        num_frames = math.floor(Fraction(len(mono)) * fps / rate)
        features = offline_features(encoder, pcm16k)
        tokens = _audio_tokens(features, num_frames, fps)
        timings["audio_features"] = time.perf_counter() - t

        engine = Engine(models, max_batch=batch_size)
        engine.register_avatar(avatar)
        width, height = avatar.width - avatar.width % 2, avatar.height - avatar.height % 2
        if (width, height) != (avatar.width, avatar.height):
            log.info("cropping %dx%d to %dx%d: H.264 4:2:0 needs even sizes",
                     avatar.width, avatar.height, width, height)

        def generated():
            bar = bars(total=num_frames, desc="render")
            for start in range(0, num_frames, batch_size):
                jobs = [
                    FrameJob(avatar.key, ping_pong(i, avatar.num_frames), tokens[i])
                    for i in range(start, min(start + batch_size, num_frames))
                ]
                yield from engine.step(jobs)
                bar.update(len(jobs))
            bar.close()

        t = time.perf_counter()
        out_path.parent.mkdir(parents=True, exist_ok=True)
        _write_mp4(out_path, generated(), fps, width, height, pcm, rate)
        timings["generate_and_encode"] = time.perf_counter() - t

    return RenderResult(
        out_path=out_path,
        frames=num_frames,
        fps=float(fps),
        audio_seconds=len(mono) / rate,
        avatar_frames=avatar.num_frames,
        landmark_source=avatar.landmark_source,
        timings_s=timings,
    )
