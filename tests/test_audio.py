"""Audio features: windowing math, whisper loading, offline vs streamed tokens, resampling."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from musetalk.audio import (
    StreamingAudioFeatures,
    StreamResampler,
    _SegmentMel,
    flush_many,
    num_feature_frames,
    num_video_frames,
    offline_features,
    offline_tokens,
    positional_encoding,
    push_many,
    resample_to_16k,
    stream_tokens,
    token_errors,
    window_tokens,
)
from musetalk.whisper import load_whisper_encoder, write_random_whisper

torch.set_num_threads(1)

SPEECH_WAV = Path(__file__).parent / "data" / "speech.wav"

# Streamed vs offline, tiny random whisper, 30 s window (docs/AUDIO.md has the
# measurements): worst frame 0.075 max abs, 1.0% relative L2 without lookahead.
MAX_ABS_TOL = 0.12
REL_L2_TOL = 0.02


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return write_random_whisper(tmp_path_factory.mktemp("whisper_tiny"), "tiny", seed=0)


@pytest.fixture(scope="module")
def encoder(tiny_dir):
    return load_whisper_encoder(tiny_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def speech16k() -> np.ndarray:
    pcm, rate = sf.read(SPEECH_WAV, dtype="int16")
    assert pcm.ndim == 1 and 2.0 < len(pcm) / rate < 4.0
    return resample_to_16k(pcm, rate)


# --------------------------------------------------------------------------- pure math


def test_positional_encoding_values_by_hand():
    pe = positional_encoding(50, 384)
    assert pe.shape == (50, 384) and pe.dtype == np.float32
    assert pe[0, 0] == 0.0 and pe[0, 1] == 1.0
    assert pe[1, 0] == pytest.approx(math.sin(1.0), abs=1e-6)
    assert pe[1, 1] == pytest.approx(math.cos(1.0), abs=1e-6)
    # Column 2i uses frequency 10000^(-2i/384).
    assert pe[3, 2] == pytest.approx(math.sin(3 * 10000 ** (-2 / 384)), abs=1e-6)
    assert pe[3, 3] == pytest.approx(math.cos(3 * 10000 ** (-2 / 384)), abs=1e-6)
    assert pe[49, 382] == pytest.approx(math.sin(49 * 10000 ** (-382 / 384)), abs=1e-6)
    assert pe[49, 383] == pytest.approx(math.cos(49 * 10000 ** (-382 / 384)), abs=1e-6)


def _direct_tokens_25fps(features: np.ndarray, num_frames: int) -> np.ndarray:
    """MUSETALK.md written out: frame f, block j, layer l = feature 2f-4+j (0 outside)."""
    pe = positional_encoding()
    out = np.zeros((num_frames, 50, 384), dtype=np.float32)
    for f in range(num_frames):
        for j in range(10):
            t = 2 * f - 4 + j
            for layer in range(5):
                value = features[t, layer] if 0 <= t < len(features) else 0.0
                out[f, j * 5 + layer] = value + pe[j * 5 + layer]
    return out


def test_window_tokens_index_layout():
    seconds = 1.3
    num_frames = num_video_frames(int(seconds * 16000), 25)
    t_feat = num_feature_frames(int(seconds * 16000))
    assert (num_frames, t_feat) == (32, 65)
    # Every (frame, layer, channel) value is distinct and nonzero, so any index slip shows.
    t, layer, ch = np.meshgrid(np.arange(t_feat), np.arange(5), np.arange(384), indexing="ij")
    features = (1 + t * 1000 + layer * 100 + ch * 0.01).astype(np.float32)
    tokens = window_tokens(features, num_frames, fps=25)
    assert tokens.shape == (num_frames, 50, 384)
    np.testing.assert_array_equal(tokens, _direct_tokens_25fps(features, num_frames))
    raw = tokens - positional_encoding()
    # Frame 0 starts with 4 zero feature frames, then features 0..5.
    assert np.all(raw[0, :20] == 0) and raw[0, 20, 0] == 1.0
    # Frame 10 block 0 layer 0 = feature 16; token 7 = block 1, layer 2 = feature 17.
    assert raw[10, 0, 0] == features[16, 0, 0] and raw[10, 7, 5] == features[17, 2, 5]


def test_window_tokens_random_features_match_direct():
    rng = np.random.default_rng(1)
    features = rng.standard_normal((101, 5, 384)).astype(np.float32)
    np.testing.assert_allclose(window_tokens(features, 50), _direct_tokens_25fps(features, 50), atol=1e-6)


def test_window_tokens_rejects_too_few_features():
    with pytest.raises(ValueError, match="feature frames"):
        window_tokens(np.zeros((10, 5, 384), np.float32), 40)


def test_frame_counts_floor_seconds():
    assert num_video_frames(40000, 25) == 62  # 2.5 s -> 62.5 -> 62
    assert num_video_frames(31999, 25) == 49  # 1.9999 s
    assert num_video_frames(32000, 25) == 50
    assert num_video_frames(16000, 30) == 30
    assert num_video_frames(15999, 30) == 29
    assert num_feature_frames(40000) == 125
    assert num_feature_frames(319) == 0 and num_feature_frames(320) == 1


# --------------------------------------------------------------------------- whisper


def test_offline_features_shapes_through_real_loader(encoder, speech16k):
    x = speech16k[: int(1.3 * 16000) + 100]
    feats = offline_features(encoder, x)
    assert feats.shape == (65, 5, 384) and feats.dtype == np.float32
    assert np.isfinite(feats).all() and np.abs(feats).max() > 0
    tokens = offline_tokens(encoder, x)
    assert tokens.shape == (32, 50, 384)


def test_encode_batch_equals_reference_forward(encoder, speech16k):
    mel = encoder.log_mel(speech16k)[None]
    reference = encoder.reference_hidden_states(mel)
    own = encoder.encode_batch(mel)
    assert own.shape == reference.shape == (1, 1500, 5, 384)
    np.testing.assert_allclose(own, reference, atol=1e-5)
    # A shorter window gets its positions from the offset.
    part = encoder.encode_batch(np.repeat(mel[:, :, 200:400], 2, 0), [100, 0])
    assert part.shape == (2, 100, 5, 384)
    assert not np.allclose(part[0], part[1])


def test_incremental_mel_matches_feature_extractor(encoder, speech16k):
    rng = np.random.default_rng(0)
    segment = _SegmentMel(encoder.mel_filters)
    pos = 0
    while pos < len(speech16k):
        step = int(rng.integers(1, 3000))
        segment.append(speech16k[pos : pos + step])
        pos += step
        if rng.random() < 0.3:
            segment.normalized()  # intermediate results must not spoil later ones
    np.testing.assert_allclose(segment.normalized(), encoder.log_mel(speech16k), atol=1e-4)
    # A full 30 s segment: the end of the window is reflect-padded as in the extractor.
    full = np.tile(speech16k, 10)[:480000]
    segment = _SegmentMel(encoder.mel_filters)
    segment.append(full[:300000])
    segment.normalized()
    segment.append(full[300000:])
    np.testing.assert_allclose(segment.normalized(), encoder.log_mel(full), atol=1e-4)


def test_missing_and_corrupt_files(tiny_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="lipsync models download"):
        load_whisper_encoder(tmp_path / "nowhere")
    for name in ("config.json", "model.safetensors", "preprocessor_config.json"):
        broken = tmp_path / f"missing_{name}"
        shutil.copytree(tiny_dir, broken)
        (broken / name).unlink()
        with pytest.raises(FileNotFoundError, match=rf"{name}.*lipsync models download"):
            load_whisper_encoder(broken)
    corrupt = tmp_path / "corrupt_weights"
    shutil.copytree(tiny_dir, corrupt)
    (corrupt / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match=r"model.safetensors.*lipsync models download"):
        load_whisper_encoder(corrupt)
    (corrupt / "model.safetensors").unlink()
    shutil.copy(tiny_dir / "model.safetensors", corrupt / "model.safetensors")
    (corrupt / "config.json").write_text("{ truncated")
    with pytest.raises(ValueError, match=r"config.json.*lipsync models download"):
        load_whisper_encoder(corrupt)


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize(("chunk_ms", "lookahead"), [(20, 0), (100, 2)])
def test_streaming_matches_offline(encoder, speech16k, chunk_ms, lookahead):
    x = speech16k[4000 : 4000 + 9800]  # 0.6125 s of speech -> 15 frames
    offline = offline_tokens(encoder, x)
    streamed = stream_tokens(encoder, x, 16 * chunk_ms, lookahead_frames=lookahead)
    assert streamed.shape == offline.shape == (15, 50, 384)
    errors = token_errors(streamed, offline)
    assert errors["max_abs_max"] < MAX_ABS_TOL and errors["rel_l2_max"] < REL_L2_TOL, errors
    # Order: every streamed frame is nearest to its own offline frame.
    distances = np.linalg.norm((streamed[:, None] - offline[None]).reshape(15, 15, -1), axis=-1)
    assert list(distances.argmin(axis=1)) == list(range(15))


def test_frames_appear_when_their_audio_has_arrived(encoder):
    stream = StreamingAudioFeatures(encoder, fps=25, window_s=2.0)
    x = np.zeros(16000, np.float32)
    # Frame 0 needs features 0..5: 6 * 320 = 1920 samples (120 ms).
    assert stream.push(x[:1919]) == []
    assert len(stream.push(x[1919:1920])) == 1
    # Each further 640 samples (one frame at 25 fps) makes one more frame ready.
    assert len(stream.push(x[1920:1920 + 640 * 3])) == 3
    assert (stream.frames_emitted, stream.samples_received) == (4, 1920 + 1920)
    ahead = StreamingAudioFeatures(encoder, fps=25, lookahead_frames=2, window_s=2.0)
    assert ahead.push(x[: 1920 + 1279]) == [] and len(ahead.push(x[:1])) == 1


@pytest.mark.parametrize("fps", [25, 30])
@pytest.mark.parametrize("samples", [8531, 16000, 20911])
def test_flush_emits_floor_seconds_times_fps(encoder, fps, samples):
    rng = np.random.default_rng(samples)
    x = (0.1 * rng.standard_normal(samples)).astype(np.float32)
    stream = StreamingAudioFeatures(encoder, fps=fps, window_s=2.0)
    total = 0
    for start in range(0, samples, 700):
        total += len(stream.push(x[start : start + 700]))
    assert total < num_video_frames(samples, fps)
    total += len(stream.flush())
    assert total == stream.frames_emitted == num_video_frames(samples, fps)
    assert stream.flush() == []  # nothing left to emit


def test_reset_and_new_utterance_after_flush(encoder, speech16k):
    x = speech16k[:8000]
    fresh = StreamingAudioFeatures(encoder, window_s=2.0)
    expected = fresh.push(x) + fresh.flush()

    stream = StreamingAudioFeatures(encoder, window_s=2.0)
    assert len(stream.push(speech16k[20000:26000])) > 0
    stream.reset()
    assert (stream.frames_emitted, stream.samples_received) == (0, 0)
    got = stream.push(x) + stream.flush()
    np.testing.assert_array_equal(np.stack(got), np.stack(expected))
    # After a flush the next push starts a new utterance at frame 0.
    again = stream.push(x) + stream.flush()
    np.testing.assert_array_equal(np.stack(again), np.stack(expected))


def test_push_many_batches_sessions(encoder, speech16k):
    a, b = speech16k[:6000], speech16k[9000:15000]
    singles = [StreamingAudioFeatures(encoder, window_s=2.0) for _ in range(2)]
    batched = [StreamingAudioFeatures(encoder, window_s=2.0) for _ in range(2)]
    calls = []
    original = encoder.encode_batch

    def counting_encode(mel, offsets=None, keep=None):
        calls.append(mel.shape[0])
        return original(mel, offsets, keep=keep)

    expected = [[], []]
    got = [[], []]
    for start in range(0, 6000, 1600):
        expected[0] += singles[0].push(a[start : start + 1600])
        expected[1] += singles[1].push(b[start : start + 1600])
        encoder.encode_batch = counting_encode
        try:
            out = push_many([(batched[0], a[start : start + 1600]), (batched[1], b[start : start + 1600])])
        finally:
            del encoder.encode_batch
        got[0] += out[0]
        got[1] += out[1]
    for i, tail in enumerate(flush_many(batched)):
        got[i] += tail
        expected[i] += singles[i].flush()
    assert calls and all(size == 2 for size in calls)
    for i in range(2):
        assert len(got[i]) == len(expected[i]) == num_video_frames(6000, 25)
        np.testing.assert_allclose(np.stack(got[i]), np.stack(expected[i]), atol=1e-5)


def test_short_window_encodes_bounded_windows(encoder, speech16k):
    widths = []
    original = encoder.encode_batch

    def spying_encode(mel, offsets=None, keep=None):
        widths.append(mel.shape[-1])
        return original(mel, offsets, keep=keep)

    encoder.encode_batch = spying_encode
    try:
        tokens = stream_tokens(encoder, speech16k, 640, window_s=1.0)
    finally:
        del encoder.encode_batch
    assert len(tokens) == num_video_frames(len(speech16k), 25)
    assert set(widths) == {100}  # 1 s of features = 100 mel frames, whatever the utterance length
    assert np.isfinite(tokens).all()


def test_utterance_longer_than_30_s(encoder, speech16k):
    rng = np.random.default_rng(3)
    x = np.tile(speech16k, 11)[: int(31.3 * 16000)]
    x = x + 0.01 * rng.standard_normal(len(x)).astype(np.float32)
    offline = offline_tokens(encoder, x)
    assert offline.shape == (782, 50, 384)
    stream = StreamingAudioFeatures(encoder)
    streamed = []
    for chunk in (x[:470000], x[470000:479000]):
        streamed += stream.push(chunk)
    emitted_before_the_end = len(streamed)
    assert emitted_before_the_end == (479000 - 1920) // 640 + 1
    streamed += stream.push(x[479000:])  # the rest, across the 30 s boundary, in one go
    # Memory stays bounded: at most two 30 s segments of audio and two windows of features.
    assert len(stream._segments) <= 2
    assert sum(e.features.shape[0] for e in stream._cache) <= 2 * 1500
    streamed += stream.flush()
    streamed = np.stack(streamed)
    assert streamed.shape == offline.shape
    errors = token_errors(streamed, offline)
    assert errors["max_abs_max"] < MAX_ABS_TOL and errors["rel_l2_max"] < REL_L2_TOL, errors
    # Frames emitted once all the audio had arrived, including those whose features span
    # both segments (745..751), see exactly the offline context: they must be equal.
    np.testing.assert_allclose(streamed[emitted_before_the_end:], offline[emitted_before_the_end:], atol=2e-5)


# --------------------------------------------------------------------------- resampling


@pytest.mark.parametrize("rate", [8000, 11025, 16000, 22050, 24000, 32000, 44100, 48000])
def test_resampler_lengths(rate):
    rng = np.random.default_rng(rate)
    n = int(rate * 1.37)
    t = np.arange(n) / rate
    pcm = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    expected = n * 16000 / rate
    whole = resample_to_16k(pcm, rate)
    assert whole.dtype == np.float32 and abs(len(whole) - expected) <= 1
    resampler = StreamResampler(rate)
    parts, pos = [], 0
    while pos < n:
        step = int(rng.integers(1, rate // 10))
        parts.append(resampler.push(pcm[pos : pos + step]))
        pos += step
    parts.append(resampler.flush())
    streamed = np.concatenate(parts)
    assert streamed.dtype == np.float32 and abs(len(streamed) - expected) <= 1
    assert np.abs(streamed).max() < 1.0 and np.abs(streamed).max() > 0.2
    # The resampler is ready for the next utterance after a flush.
    assert abs(len(np.concatenate([resampler.push(pcm), resampler.flush()])) - expected) <= 1


def test_resampler_rejects_wrong_sample_type():
    with pytest.raises(TypeError, match="int16"):
        StreamResampler(24000).push(np.zeros(10, np.int32))
