"""Audio conditioning for MuseTalk 1.5: whisper features -> 50 tokens per video frame.

Offline (the reference): whole 30 s segments through whisper, features concatenated,
then ``window_tokens``. Streaming (``StreamingAudioFeatures``): the same segments, but
each segment is re-encoded from the audio received so far (zero-padded to 30 s, exactly
as the reference pads its last segment), so a streamed frame differs from the offline
one only by the audio that had not arrived yet when it was emitted. See docs/AUDIO.md.

Pure functions here are numpy only; torch is used through ``WhisperAudioEncoder``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import soxr

from musetalk.types import AUDIO_DIM, AUDIO_TOKENS
from musetalk.whisper import (
    HOP_LENGTH,
    N_FFT,
    SAMPLE_RATE,
    WINDOW_FEATURES,
    WINDOW_MEL_FRAMES,
    WINDOW_SAMPLES,
    WhisperAudioEncoder,
)

FEATURE_RATE = 50  # whisper feature frames per second
SAMPLES_PER_FEATURE = SAMPLE_RATE // FEATURE_RATE  # 320
HIDDEN_STATES = 5  # embeddings + 4 encoder layers
CONTEXT_FRAMES = 2  # video frames of audio context on each side
FEATURES_PER_FRAME = 2 * (2 * CONTEXT_FRAMES + 1)  # 10 feature frames per video frame
_LOG_FLOOR = -10.0  # log10 of whisper's mel floor (1e-10): the value of silence


# --------------------------------------------------------------------------- pure math


def positional_encoding(length: int = AUDIO_TOKENS, d_model: int = AUDIO_DIM) -> np.ndarray:
    """Sinusoidal encoding added to the 50 audio tokens: [length, d_model] float32."""
    position = np.arange(length, dtype=np.float64)[:, None]
    div = np.exp(np.arange(0, d_model, 2, dtype=np.float64) * (-math.log(10000.0) / d_model))
    pe = np.zeros((length, d_model), dtype=np.float64)
    pe[:, 0::2] = np.sin(position * div)
    pe[:, 1::2] = np.cos(position * div)
    return pe.astype(np.float32)


_PE = positional_encoding()


def num_video_frames(num_samples_16k: int, fps: int = 25) -> int:
    """floor(seconds * fps), in exact integer arithmetic."""
    return (int(num_samples_16k) * int(fps)) // SAMPLE_RATE


def num_feature_frames(num_samples_16k: int) -> int:
    """floor(seconds * 50): the feature frames the reference keeps."""
    return int(num_samples_16k) // SAMPLES_PER_FEATURE


def padding_frames(fps: int = 25) -> tuple[int, int]:
    """Zero feature frames added (left, right): padding_nums * 2 and padding_nums * 3 * 2."""
    padding_nums = math.ceil(FEATURE_RATE / fps)
    return padding_nums * CONTEXT_FRAMES, padding_nums * 3 * CONTEXT_FRAMES


def frame_feature_start(frame: int, fps: int = 25) -> int:
    """Index, in the unpadded feature sequence, of frame ``frame``'s first feature frame.

    The window starts at floor(frame * 50 / fps) in the left-padded sequence; may be < 0.
    """
    return (int(frame) * FEATURE_RATE) // int(fps) - padding_frames(fps)[0]


def frame_tokens(window: np.ndarray) -> np.ndarray:
    """[10, 5, 384] feature window -> [50, 384] tokens (token = frame * 5 + layer) + PE."""
    if window.shape != (FEATURES_PER_FRAME, HIDDEN_STATES, AUDIO_DIM):
        raise ValueError(f"feature window must be [10, 5, 384], got {window.shape}")
    return window.reshape(AUDIO_TOKENS, AUDIO_DIM).astype(np.float32) + _PE


def window_tokens(features: np.ndarray, num_frames: int, fps: int = 25) -> np.ndarray:
    """The reference windowing: features [T, 5, 384] -> tokens [num_frames, 50, 384]."""
    features = np.asarray(features, dtype=np.float32)
    if features.ndim != 3 or features.shape[1:] != (HIDDEN_STATES, AUDIO_DIM):
        raise ValueError(f"features must be [T, 5, 384], got {features.shape}")
    left, right = padding_frames(fps)
    zeros = np.zeros((1, HIDDEN_STATES, AUDIO_DIM), dtype=np.float32)
    padded = np.concatenate([np.repeat(zeros, left, 0), features, np.repeat(zeros, right, 0)])
    out = np.empty((num_frames, AUDIO_TOKENS, AUDIO_DIM), dtype=np.float32)
    for f in range(num_frames):
        start = (f * FEATURE_RATE) // fps
        window = padded[start : start + FEATURES_PER_FRAME]
        if window.shape[0] != FEATURES_PER_FRAME:
            raise ValueError(
                f"frame {f} needs feature frames up to {start + FEATURES_PER_FRAME} of the padded "
                f"sequence but only {padded.shape[0]} exist: {num_frames} frames at {fps} fps need "
                f"about {num_frames * FEATURE_RATE // fps} feature frames, got {features.shape[0]}"
            )
        out[f] = frame_tokens(window)
    return out


# --------------------------------------------------------------------------- offline


def offline_features(encoder: WhisperAudioEncoder, pcm16k: np.ndarray) -> np.ndarray:
    """Reference features [floor(seconds * 50), 5, 384] of a whole utterance."""
    pcm16k = np.asarray(pcm16k, dtype=np.float32)
    parts = []
    for start in range(0, len(pcm16k), WINDOW_SAMPLES):
        mel = encoder.log_mel(pcm16k[start : start + WINDOW_SAMPLES])
        parts.append(encoder.reference_hidden_states(mel[None])[0])
    if not parts:
        return np.zeros((0, HIDDEN_STATES, encoder.d_model), dtype=np.float32)
    return np.concatenate(parts)[: num_feature_frames(len(pcm16k))]


def offline_tokens(encoder: WhisperAudioEncoder, pcm16k: np.ndarray, fps: int = 25) -> np.ndarray:
    """Reference tokens [floor(seconds * fps), 50, 384] of a whole utterance."""
    return window_tokens(offline_features(encoder, pcm16k), num_video_frames(len(pcm16k), fps), fps)


# --------------------------------------------------------------------------- resampling


def _pcm_to_float(pcm: np.ndarray) -> np.ndarray:
    pcm = np.asarray(pcm)
    if pcm.dtype == np.int16:
        return pcm.astype(np.float32) / 32768.0
    if pcm.dtype.kind == "f":
        return pcm.astype(np.float32)
    raise TypeError(f"PCM must be int16 (s16le) or float, got {pcm.dtype}")


def resample_to_16k(pcm: np.ndarray, rate: int) -> np.ndarray:
    """Whole-utterance resampling of mono int16 PCM to float32 [-1, 1) at 16 kHz."""
    x = _pcm_to_float(pcm)
    if int(rate) == SAMPLE_RATE:
        return x
    return soxr.resample(x, int(rate), SAMPLE_RATE, quality="HQ").astype(np.float32)


class StreamResampler:
    """Chunked resampling of mono int16 PCM to float32 16 kHz, one utterance at a time."""

    def __init__(self, rate: int):
        if not 1000 <= int(rate) <= 384000:
            raise ValueError(f"sample rate {rate} Hz is out of range (1000..384000)")
        self.rate = int(rate)
        self._stream: soxr.ResampleStream | None = None
        self.reset()

    def reset(self) -> None:
        """Drop buffered audio (interrupt) and start a new utterance."""
        self._stream = None
        if self.rate != SAMPLE_RATE:
            self._stream = soxr.ResampleStream(self.rate, SAMPLE_RATE, 1, dtype="float32", quality="HQ")

    def push(self, pcm: np.ndarray) -> np.ndarray:
        x = _pcm_to_float(pcm)
        if self._stream is None:
            return x
        return self._stream.resample_chunk(x, last=False)

    def flush(self) -> np.ndarray:
        """The samples the filter still holds, at the end of an utterance; then resets."""
        if self._stream is None:
            return np.zeros(0, dtype=np.float32)
        out = self._stream.resample_chunk(np.zeros(0, dtype=np.float32), last=True)
        self.reset()
        return out


# --------------------------------------------------------------------------- streaming


class _SegmentMel:
    """Whisper's log-mel of one 30 s segment, computed incrementally as audio arrives.

    Matches ``WhisperFeatureExtractor`` on the segment zero-padded to 30 s: centered STFT
    (reflect padding at both ends of the 30 s buffer), power, mel, log10 floor 1e-10,
    then the window-wide max - 8 clamp and (x + 4) / 4. STFT frames whose 400 samples
    have all arrived are kept; only the others are recomputed.
    """

    def __init__(self, mel_filters: np.ndarray):
        self.mel_filters_t = np.ascontiguousarray(np.asarray(mel_filters, dtype=np.float64).T)
        self.samples = np.zeros(WINDOW_SAMPLES, dtype=np.float32)
        self.n = 0
        self.raw = np.full((self.mel_filters_t.shape[0], WINDOW_MEL_FRAMES), _LOG_FLOOR, dtype=np.float32)
        self._stable = 0
        self._window = np.hanning(N_FFT + 1)[:-1]  # periodic Hann, as whisper

    @property
    def full(self) -> bool:
        return self.n >= WINDOW_SAMPLES

    def append(self, x: np.ndarray) -> int:
        take = min(len(x), WINDOW_SAMPLES - self.n)
        self.samples[self.n : self.n + take] = x[:take]
        self.n += take
        return take

    def _stable_frames(self) -> int:
        if self.n >= WINDOW_SAMPLES:
            return WINDOW_MEL_FRAMES
        # Frame i reads samples 160i-200 .. 160i+199 (reflected below 0).
        half = N_FFT // 2
        return 0 if self.n <= half else min(WINDOW_MEL_FRAMES, (self.n - half - 1) // HOP_LENGTH + 1)

    def _update(self) -> None:
        half = N_FFT // 2
        start = self._stable
        stop = min(WINDOW_MEL_FRAMES, -(-(self.n + half) // HOP_LENGTH))
        if stop > start:
            pos = np.arange(start * HOP_LENGTH, (stop - 1) * HOP_LENGTH + N_FFT) - half
            pos = np.abs(pos)
            last = WINDOW_SAMPLES - 1
            pos = np.where(pos > last, 2 * last - pos, pos)
            signal = self.samples[pos].astype(np.float64)
            frames = np.lib.stride_tricks.sliding_window_view(signal, N_FFT)[::HOP_LENGTH]
            power = np.abs(np.fft.rfft(frames * self._window, n=N_FFT, axis=-1)) ** 2
            mel = self.mel_filters_t @ power.T
            self.raw[:, start:stop] = np.log10(np.maximum(mel, 1e-10))
        self._stable = self._stable_frames()

    def normalized(self) -> np.ndarray:
        self._update()
        return (np.maximum(self.raw, self.raw.max() - 8.0) + 4.0) / 4.0


@dataclass
class _EncodeJob:
    stream: StreamingAudioFeatures
    segment: int
    samples_at: int  # the segment's sample count the job encodes
    start: int  # first feature frame (inside the segment) of the window
    mel: np.ndarray  # [n_mels, 2 * window]
    keep: tuple[int, int]  # feature frames (inside the segment) the frames need


@dataclass
class _CachedFeatures:
    segment: int
    samples_at: int
    start: int
    features: np.ndarray  # [k, 5, d] for feature frames start .. start + k of the segment

    @property
    def stop(self) -> int:
        return self.start + self.features.shape[0]


class StreamingAudioFeatures:
    """Tokens of video frames as soon as their audio has arrived, for one utterance stream.

    ``push`` 16 kHz float32 audio in chunks of any size; each returns the [50, 384]
    tokens of the frames that became computable, in order. Frame f is computable once
    audio up to the end of its last feature frame (120 ms after its start at 25 fps)
    plus ``lookahead_frames`` frames has arrived. ``flush`` ends the utterance (the
    remaining frames up to floor(seconds * fps), right context zero-padded as offline);
    the next ``push`` starts a new one. ``reset`` drops everything (interrupt).

    ``window_s`` is the encoder window: 30 (default) re-encodes the current 30 s
    segment (the reference's own window, so the left context equals offline); a shorter
    window encodes only the recent ``window_s`` seconds with the same positional
    embeddings (cheaper, a little further from offline).
    """

    def __init__(
        self,
        encoder: WhisperAudioEncoder,
        fps: int = 25,
        lookahead_frames: int = 0,
        window_s: float = 30.0,
    ):
        if int(fps) != fps or not 1 <= fps <= FEATURE_RATE:
            raise ValueError(f"fps must be an integer in 1..{FEATURE_RATE}, got {fps}")
        if lookahead_frames < 0:
            raise ValueError("lookahead_frames must be >= 0")
        self.window_features = int(round(window_s * FEATURE_RATE))
        if not 50 <= self.window_features <= WINDOW_FEATURES:
            raise ValueError(f"window_s must be in 1..30 s, got {window_s}")
        self.encoder = encoder
        self.fps = int(fps)
        self.lookahead_frames = int(lookahead_frames)
        self._lookahead_samples = -(-self.lookahead_frames * SAMPLE_RATE // self.fps)
        # Features one group of frames may span: leaves a quarter of a short window
        # for right context and some left context inside the window.
        span = (self.window_features * 3) // 4 - FEATURES_PER_FRAME
        self._group_frames = max(1, span * self.fps // FEATURE_RATE)
        self.reset()

    # -- public API

    def reset(self) -> None:
        """Drop all audio, features and counters (interrupt)."""
        self._segments: dict[int, _SegmentMel] = {}
        self._cache: list[_CachedFeatures] = []
        self._ended = False
        self.samples_received = 0
        self.frames_emitted = 0

    def push(self, pcm16k: np.ndarray) -> list[np.ndarray]:
        return push_many([(self, pcm16k)])[0]

    def flush(self) -> list[np.ndarray]:
        """Emit the remaining frames of the utterance; the next push starts a new one."""
        return _step_streams([(self, None, True)])[0]

    @property
    def frames_total(self) -> int:
        """Frames the utterance has so far if it ended now: floor(seconds * fps)."""
        return num_video_frames(self.samples_received, self.fps)

    # -- internals, in the order a step runs them

    def _accept(self, pcm16k: np.ndarray | None) -> None:
        if self._ended:
            self.reset()
        if pcm16k is None:
            return
        x = np.asarray(pcm16k, dtype=np.float32).reshape(-1)
        while len(x):
            index = self.samples_received // WINDOW_SAMPLES
            segment = self._segments.get(index)
            if segment is None:
                segment = self._segments[index] = _SegmentMel(self.encoder.mel_filters)
            taken = segment.append(x)
            self.samples_received += taken
            x = x[taken:]

    def _ready_end(self, final: bool) -> int:
        total = self.frames_total
        if final:
            return total
        f = self.frames_emitted
        while f < total and self._samples_needed(f) <= self.samples_received:
            f += 1
        return f

    def _samples_needed(self, frame: int) -> int:
        end = frame_feature_start(frame, self.fps) + FEATURES_PER_FRAME
        return end * SAMPLES_PER_FEATURE + self._lookahead_samples

    def _groups(self, final: bool) -> list[tuple[int, int]]:
        end = self._ready_end(final)
        return [(f, min(end, f + self._group_frames)) for f in range(self.frames_emitted, end, self._group_frames)]

    def _feature_span(self, first: int, last: int, final: bool) -> tuple[int, int]:
        """Feature frames [lo, hi) that hold real audio for frames first..last."""
        lo = frame_feature_start(first, self.fps)
        hi = frame_feature_start(last, self.fps) + FEATURES_PER_FRAME
        limit = num_feature_frames(self.samples_received) if final else hi
        return max(lo, 0), min(hi, limit)

    def _segment_ranges(self, lo: int, hi: int):
        for seg in range(lo // WINDOW_FEATURES, -(-hi // WINDOW_FEATURES)):
            base = seg * WINDOW_FEATURES
            yield seg, max(lo, base) - base, min(hi, base + WINDOW_FEATURES) - base

    def _lookup(self, segment: int, start: int, stop: int) -> _CachedFeatures | None:
        n = self._segments[segment].n
        for entry in self._cache:
            if entry.segment == segment and entry.samples_at == n and entry.start <= start and stop <= entry.stop:
                return entry
        return None

    def _plan(self, final: bool) -> list[_EncodeJob]:
        jobs: list[_EncodeJob] = []
        width = self.window_features
        for first, end in self._groups(final):
            lo, hi = self._feature_span(first, end - 1, final)
            if hi <= lo:
                continue
            for seg, start, stop in self._segment_ranges(lo, hi):
                if self._lookup(seg, start, stop) is not None:
                    continue
                covering = [j for j in jobs if j.segment == seg and j.start <= start and stop <= j.start + width]
                if covering:
                    covering[0].keep = (min(covering[0].keep[0], start), max(covering[0].keep[1], stop))
                    continue
                # A short window keeps a quarter of itself after the newest needed feature
                # (zero-padded future, as a segment's tail is offline) and the rest as left
                # context; it never leaves the segment, so positions match offline.
                window_start = min(start, max(0, stop + width // 4 - width), WINDOW_FEATURES - width)
                mel = self._segments[seg].normalized()[:, 2 * window_start : 2 * (window_start + width)]
                jobs.append(_EncodeJob(self, seg, self._segments[seg].n, window_start, mel, (start, stop)))
        return jobs

    def _store(self, job: _EncodeJob, features: np.ndarray) -> None:
        """``features`` are the window's rows job.keep[0] .. job.keep[1] (segment
        coordinates): only what the frames need leaves the device."""
        self._cache = [e for e in self._cache if e.segment != job.segment or e.samples_at == job.samples_at]
        self._cache.append(_CachedFeatures(job.segment, job.samples_at, job.keep[0], features))

    def _emit(self, final: bool) -> list[np.ndarray]:
        tokens: list[np.ndarray] = []
        for first, end in self._groups(final):
            f_lo = frame_feature_start(first, self.fps)
            f_hi = frame_feature_start(end - 1, self.fps) + FEATURES_PER_FRAME
            window = np.zeros((f_hi - f_lo, HIDDEN_STATES, self.encoder.d_model), dtype=np.float32)
            lo, hi = self._feature_span(first, end - 1, final)
            for seg, start, stop in self._segment_ranges(lo, hi) if hi > lo else ():
                entry = self._lookup(seg, start, stop)
                if entry is None:
                    raise RuntimeError(f"features {start}..{stop} of segment {seg} were not encoded")
                dst = seg * WINDOW_FEATURES + start - f_lo
                window[dst : dst + stop - start] = entry.features[start - entry.start : stop - entry.start]
            for f in range(first, end):
                s = frame_feature_start(f, self.fps) - f_lo
                tokens.append(frame_tokens(window[s : s + FEATURES_PER_FRAME]))
            self.frames_emitted = end
        self._forget()
        if final:
            self._ended = True
        return tokens

    def _forget(self) -> None:
        """Keep only what the next frames can still need: bounded memory per stream."""
        keep_from = max(0, frame_feature_start(self.frames_emitted, self.fps))
        current = self.samples_received // WINDOW_SAMPLES
        first_seg = min(keep_from // WINDOW_FEATURES, current)
        for seg in [s for s in self._segments if s < first_seg]:
            del self._segments[seg]
        kept = []
        for e in self._cache:
            if e.segment < first_seg:
                continue
            base = e.segment * WINDOW_FEATURES
            # Features past the audio at encode time are only needed at a flush, which
            # reads at most up to the last received feature frame.
            stop = min(e.stop, -(-e.samples_at // SAMPLES_PER_FEATURE) + 1)
            start = max(e.start, keep_from - base)
            if stop > start and (start > e.start or stop < e.stop):
                e = _CachedFeatures(e.segment, e.samples_at, start, e.features[start - e.start : stop - e.start].copy())
            if stop > start:
                kept.append(e)
        self._cache = kept


def _step_streams(requests: Sequence[tuple[StreamingAudioFeatures, np.ndarray | None, bool]]) -> list[list[np.ndarray]]:
    """Accept audio for several streams, run their encodes batched, emit their frames."""
    for stream, pcm, _ in requests:
        stream._accept(pcm)
    jobs = [job for stream, _, final in requests for job in stream._plan(final)]
    by_encoder_and_width: dict[tuple[int, int], list[_EncodeJob]] = {}
    for job in jobs:
        by_encoder_and_width.setdefault((id(job.stream.encoder), job.mel.shape[-1]), []).append(job)
    for batch in by_encoder_and_width.values():
        encoder = batch[0].stream.encoder
        keep = [(j.keep[0] - j.start, j.keep[1] - j.start) for j in batch]
        features = encoder.encode_batch(np.stack([j.mel for j in batch]), [j.start for j in batch], keep=keep)
        for job, feats in zip(batch, features):
            job.stream._store(job, feats)
    return [stream._emit(final) for stream, _, final in requests]


def push_many(items: Sequence[tuple[StreamingAudioFeatures, np.ndarray]]) -> list[list[np.ndarray]]:
    """``push`` for several streams with one batched encoder call (per window width)."""
    return _step_streams([(stream, pcm, False) for stream, pcm in items])


def flush_many(streams: Sequence[StreamingAudioFeatures]) -> list[list[np.ndarray]]:
    """``flush`` for several streams with one batched encoder call."""
    return _step_streams([(stream, None, True) for stream in streams])


# --------------------------------------------------------------------------- measurement


def stream_tokens(
    encoder: WhisperAudioEncoder,
    pcm16k: np.ndarray,
    chunk_samples: int,
    fps: int = 25,
    lookahead_frames: int = 0,
    window_s: float = 30.0,
) -> np.ndarray:
    """Tokens [floor(seconds * fps), 50, 384] of an utterance pushed in fixed-size chunks."""
    stream = StreamingAudioFeatures(encoder, fps=fps, lookahead_frames=lookahead_frames, window_s=window_s)
    tokens: list[np.ndarray] = []
    for start in range(0, len(pcm16k), chunk_samples):
        tokens += stream.push(pcm16k[start : start + chunk_samples])
    tokens += stream.flush()
    if not tokens:
        return np.zeros((0, AUDIO_TOKENS, AUDIO_DIM), dtype=np.float32)
    return np.stack(tokens)


def token_errors(streamed: np.ndarray, offline: np.ndarray) -> dict[str, float]:
    """Per-frame max abs and relative L2 error of streamed tokens against offline ones.

    The relative error divides by the norm of the offline features (tokens minus the
    positional encoding, which both share exactly).
    """
    if streamed.shape != offline.shape:
        raise ValueError(f"shapes differ: streamed {streamed.shape}, offline {offline.shape}")
    diff = (streamed - offline).reshape(len(offline), -1)
    signal = (offline - _PE).reshape(len(offline), -1)
    max_abs = np.abs(diff).max(axis=1)
    rel_l2 = np.linalg.norm(diff, axis=1) / np.maximum(np.linalg.norm(signal, axis=1), 1e-12)
    return {
        "max_abs_max": float(max_abs.max()),
        "max_abs_mean": float(max_abs.mean()),
        "rel_l2_max": float(rel_l2.max()),
        "rel_l2_mean": float(rel_l2.mean()),
    }


def _main() -> None:
    import argparse
    import tempfile
    import time
    from pathlib import Path

    import soundfile as sf

    from musetalk.whisper import load_whisper_encoder, write_random_whisper

    parser = argparse.ArgumentParser(description="Measure streamed vs offline MuseTalk audio tokens.")
    parser.add_argument("--wav", default="tests/data/speech.wav")
    parser.add_argument("--model", help="whisper folder; default: random weights of --size")
    parser.add_argument("--size", choices=("full", "tiny"), default="full")
    parser.add_argument("--chunks-ms", default="20,40,100")
    parser.add_argument("--lookahead", default="0,2")
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    pcm, rate = sf.read(args.wav, dtype="int16")
    x = resample_to_16k(pcm, rate)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model) if args.model else write_random_whisper(Path(tmp), args.size)
        encoder = load_whisper_encoder(model_dir, device=args.device)
        offline = offline_tokens(encoder, x)
        for chunk_ms in [int(c) for c in args.chunks_ms.split(",")]:
            for look in [int(v) for v in args.lookahead.split(",")]:
                t0 = time.perf_counter()
                streamed = stream_tokens(encoder, x, 16 * chunk_ms, lookahead_frames=look, window_s=args.window_s)
                errors = token_errors(streamed, offline)
                print(
                    f"size={args.size} window_s={args.window_s} chunk={chunk_ms}ms lookahead={look} "
                    f"frames={len(streamed)} "
                    + " ".join(f"{k}={v:.3g}" for k, v in errors.items())
                    + f" wall={time.perf_counter() - t0:.1f}s",
                    flush=True,
                )


if __name__ == "__main__":
    _main()
