"""Device-resident streaming tokens (musetalk/audio_gpu.py) against the offline reference
and StreamingAudioFeatures, through the real loader with the tiny random whisper."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from musetalk.audio import (
    num_video_frames,
    offline_tokens,
    resample_to_16k,
    stream_tokens,
    token_errors,
)
from musetalk.audio_gpu import (
    GpuAudioStreams,
    changed_columns,
    drain,
    encoder_buckets,
    gpu_stream_tokens,
    log_mel_device,
    log_spec_device,
    normalize_log_mel,
)
from musetalk.whisper import WINDOW_SAMPLES, load_whisper_encoder, write_random_whisper

SPEECH_WAV = Path(__file__).parent / "data" / "speech.wav"

# The bounds tests/test_audio.py holds StreamingAudioFeatures (30 s window) to.
MAX_ABS_TOL = 0.12
REL_L2_TOL = 0.02


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    model_dir = write_random_whisper(tmp_path_factory.mktemp("whisper_tiny"), "tiny", seed=0)
    return load_whisper_encoder(model_dir, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def speech16k() -> np.ndarray:
    pcm, rate = sf.read(SPEECH_WAV, dtype="int16")
    return resample_to_16k(pcm, rate)


@pytest.fixture(scope="module")
def short_speech(speech16k) -> np.ndarray:
    return speech16k[4000 : 4000 + 9800]  # 0.6125 s -> 15 frames


@pytest.fixture(scope="module")
def references(encoder, short_speech):
    return offline_tokens(encoder, short_speech), stream_tokens(encoder, short_speech, 320)


@pytest.fixture(scope="module")
def long_signal() -> np.ndarray:
    """31.3 s of tones and noise: crosses the 30 s segment boundary."""
    rng = np.random.default_rng(3)
    t = np.arange(int(31.3 * 16000)) / 16000
    freq = 200 + 150 * np.sin(2 * np.pi * 0.3 * t)
    x = 0.3 * np.sin(2 * np.pi * np.cumsum(freq) / 16000) * (0.5 + 0.5 * np.sin(2 * np.pi * 2.1 * t))
    return (x + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


def _collect(out: dict, slot: int) -> np.ndarray:
    return np.stack(out[slot])


# --------------------------------------------------------------------------- log-mel


def test_device_log_mel_equals_feature_extractor(encoder, speech16k):
    window = torch.hann_window(400, periodic=True)
    filters = torch.from_numpy(np.ascontiguousarray(encoder.mel_filters.T, dtype=np.float32))
    full = np.tile(speech16k, 10)[:WINDOW_SAMPLES]  # reflect padding at the window's end too
    cases = [speech16k, speech16k[:5000], full, np.zeros(3000, np.float32)]
    batch = np.zeros((len(cases), WINDOW_SAMPLES), np.float32)
    for row, x in zip(batch, cases):
        row[: len(x)] = x
    mel = log_mel_device(torch.from_numpy(batch), filters, window).numpy()
    assert mel.shape == (4, 80, 3000) and mel.dtype == np.float32
    for got, x in zip(mel, cases):
        np.testing.assert_allclose(got, encoder.log_mel(x), atol=1e-5)
    # Each item is normalized by its own maximum, as the extractor does per segment.
    assert not np.allclose(mel[0, :, :100], mel[2, :, :100])


def test_device_hidden_states_equal_reference_forward(encoder, speech16k):
    mel = encoder.log_mel(speech16k)[None]
    states = encoder.device_hidden_states(torch.from_numpy(mel))
    assert isinstance(states, torch.Tensor) and states.shape == (1, 1500, 5, 384)
    np.testing.assert_allclose(states.numpy(), encoder.reference_hidden_states(mel), atol=1e-5)
    with pytest.raises(ValueError, match="3000"):
        encoder.device_hidden_states(torch.zeros(1, 80, 200))


# --------------------------------------------------------------------------- streaming


@pytest.mark.parametrize("chunk_ms", [20, 40])
def test_streamed_tokens_match_offline_and_host_streaming(encoder, short_speech, references, chunk_ms):
    offline, host_streamed = references
    got = gpu_stream_tokens(encoder, short_speech, 16 * chunk_ms)
    assert got.shape == offline.shape == (15, 50, 384)
    errors = token_errors(got, offline)
    assert errors["max_abs_max"] < MAX_ABS_TOL and errors["rel_l2_max"] < REL_L2_TOL, errors
    assert errors["max_abs_max"] > 1e-4  # frames made before their future arrived differ a little
    distances = np.linalg.norm((got[:, None] - offline[None]).reshape(15, 15, -1), axis=-1)
    assert list(distances.argmin(axis=1)) == list(range(15))
    # The same audio at the same frames as the host path: the same tokens.
    np.testing.assert_allclose(got, host_streamed, atol=1e-5)
    # The last frame is made at the flush, with all the audio: exactly offline.
    np.testing.assert_allclose(got[-1], offline[-1], atol=1e-5)


def test_frames_appear_when_their_audio_has_arrived(encoder):
    streams = GpuAudioStreams(encoder, max_streams=2, ring_frames=8)
    slot = streams.open()
    x = np.zeros(16000, np.float32)
    # Frame 0 needs features 0..5: 6 * 320 = 1920 samples (120 ms).
    streams.push(slot, x[:1919])
    assert streams.round() == [] and streams.frames_ready(slot) == 0
    streams.push(slot, x[1919:1920])
    assert streams.round() == [(slot, 0, 1)]
    streams.push(slot, x[1920 : 1920 + 640 * 3])  # one more frame per 640 samples
    assert streams.round() == [(slot, 1, 3)]
    assert (streams.frames_ready(slot), streams.samples_received(slot), streams.frames_total(slot)) == (4, 3840, 6)
    assert streams.round() == []  # nothing new: no work
    ahead = GpuAudioStreams(encoder, max_streams=1, lookahead_frames=2)
    other = ahead.open()
    ahead.push(other, x[: 1920 + 1279])
    assert ahead.round() == []
    ahead.push(other, x[:1])
    assert ahead.round() == [(other, 0, 1)]


@pytest.mark.parametrize("fps", [25, 30])
def test_flush_makes_floor_seconds_times_fps(encoder, fps):
    samples = 8531
    x = (0.1 * np.random.default_rng(fps).standard_normal(samples)).astype(np.float32)
    streams = GpuAudioStreams(encoder, fps=fps, max_streams=1)
    slot = streams.open()
    streams.push(slot, x)
    before = drain(streams)
    assert 0 < streams.frames_ready(slot) < num_video_frames(samples, fps)
    streams.flush(slot)
    assert drain(streams) == 1 and before == 1
    assert streams.frames_ready(slot) == streams.frames_total(slot) == num_video_frames(samples, fps)
    assert streams.flushed(slot) and streams.round() == []


def test_several_slots_in_one_round_equal_each_alone(encoder, speech16k):
    rng = np.random.default_rng(5)
    audio = [speech16k[:6000], speech16k[9000:17000], (0.1 * rng.standard_normal(5000)).astype(np.float32)]
    # (utterance, start, stop) pushed per step, then the utterances flushed after the step.
    steps = [([(0, 0, 4000), (1, 0, 3000), (2, 0, 5000)], [2]), ([(0, 4000, 6000), (1, 3000, 8000)], [0]), ([], [1])]

    def run(streams: GpuAudioStreams, which: list[int]) -> dict[int, np.ndarray]:
        slots = {u: streams.open() for u in which}
        out: dict[int, list] = {}
        for pushes, flushes in steps:
            for u, start, stop in pushes:
                if u in slots:
                    streams.push(slots[u], audio[u][start:stop])
            for u in flushes:
                if u in slots:
                    streams.flush(slots[u])
            drain(streams, out)
        return {u: np.stack(out[slot]) for u, slot in slots.items()}

    batch_sizes = []
    original = encoder.device_hidden_states

    def counting(mel, *args, **kwargs):
        batch_sizes.append(mel.shape[0])
        return original(mel, *args, **kwargs)

    encoder.device_hidden_states = counting
    try:
        together = run(GpuAudioStreams(encoder, max_streams=4, ring_frames=16), [0, 1, 2])
    finally:
        del encoder.device_hidden_states
    assert batch_sizes[0] == 3  # one encoder call for all three slots
    for u in range(3):
        alone = run(GpuAudioStreams(encoder, max_streams=1, ring_frames=16), [u])[u]
        assert together[u].shape == alone.shape == (num_video_frames(len(audio[u])), 50, 384)
        np.testing.assert_allclose(together[u], alone, atol=1e-5)


def test_utterance_longer_than_30_s_streamed(encoder, long_signal):
    x = long_signal
    offline = offline_tokens(encoder, x)
    assert offline.shape == (782, 50, 384)
    streams = GpuAudioStreams(encoder, max_streams=1, ring_frames=256)
    slot = streams.open()
    out: dict[int, list] = {}
    for chunk in (x[:470000], x[470000:479000]):
        streams.push(slot, chunk)
        drain(streams, out)
    before_the_end = streams.frames_ready(slot)
    assert before_the_end == (479000 - 1920) // 640 + 1
    streams.push(slot, x[479000:])  # the rest, across the 30 s boundary, in one go
    drain(streams, out)
    streams.flush(slot)
    drain(streams, out)
    got = _collect(out, slot)
    assert got.shape == offline.shape
    errors = token_errors(got, offline)
    assert errors["max_abs_max"] < MAX_ABS_TOL and errors["rel_l2_max"] < REL_L2_TOL, errors
    # Frames made once all the audio was in, including those whose features span both
    # segments (745..751), see exactly the offline context.
    np.testing.assert_allclose(got[before_the_end:], offline[before_the_end:], atol=2e-5)


def test_burst_waits_for_the_ring_and_crosses_the_boundary_exactly(encoder, long_signal):
    x = long_signal
    offline = offline_tokens(encoder, x)
    ring = 100
    streams = GpuAudioStreams(encoder, max_streams=1, ring_frames=ring)
    slot = streams.open()
    streams.push(slot, x)  # faster than real time: the whole utterance at once
    streams.flush(slot)
    assert streams.round() == [(slot, 0, ring)]
    got = list(streams.tokens[slot].numpy().copy())
    assert streams.round() == []  # nothing consumed: the ring is full, its rows are kept
    streams.consumed(slot, 30)
    assert streams.round() == [(slot, ring, 30)]  # rows of frames 0..29 reused
    got += [streams.tokens[slot, f % ring].numpy().copy() for f in range(ring, ring + 30)]
    np.testing.assert_array_equal(streams.tokens[slot, 30:].numpy(), np.stack(got[30:ring]))
    streams.consumed(slot, ring + 30)
    out: dict[int, list] = {slot: got}
    drain(streams, out)
    got = _collect(out, slot)
    assert got.shape == offline.shape
    # Every frame was made with all the audio in: offline, across the boundary too.
    np.testing.assert_allclose(got, offline, atol=2e-5)


def test_changed_columns_are_those_whose_windows_see_the_new_samples():
    rng = np.random.default_rng(5)
    window = torch.hann_window(400, periodic=True)
    filters = torch.from_numpy(rng.random((80, 201)).astype(np.float32))
    audio = torch.zeros(WINDOW_SAMPLES)
    before = log_spec_device(audio[None], filters, window)[0]
    for old, new in ((0, 640), (5000, 5640), (479000, WINDOW_SAMPLES), (100, 101)):
        changed = audio.clone()
        changed[old:new] = torch.from_numpy(rng.uniform(0.1, 0.5, new - old).astype(np.float32))
        after = log_spec_device(changed[None], filters, window)[0]
        moved = torch.nonzero((after != before).any(dim=0)).flatten()
        first, stop = changed_columns(old, new)
        assert len(moved) and first <= int(moved.min()) and int(moved.max()) < stop, (old, new, first, stop)
        assert stop - first <= (new - old) // 160 + 5  # no more than the windows touched
    assert changed_columns(0, 0)[0] == 0 and changed_columns(479990, WINDOW_SAMPLES)[1] == 3000


def _mel_pair(streams: GpuAudioStreams, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
    kept = normalize_log_mel(streams._log_spec[slot : slot + 1])[0]
    whole = log_mel_device(streams._audio[slot : slot + 1], streams._mel_filters_t, streams._window)[0]
    return kept, whole


def test_incremental_log_mel_equals_the_whole_stft_after_every_round(encoder, long_signal, speech16k):
    """Uneven chunks, a burst, a reset, a new utterance and a 30 s rollover: after every
    round the kept columns are those of the whole segment's STFT."""
    streams = GpuAudioStreams(encoder, max_streams=2, ring_frames=1024)
    a, b = streams.open(), streams.open()
    rng = np.random.default_rng(1)
    pos = 0
    for _ in range(12):
        n = int(rng.integers(1, 3000))
        streams.push(a, long_signal[pos : pos + n])
        streams.push(b, speech16k[pos : pos + n])
        pos += n
        drain(streams)
        for slot in (a, b):
            kept, whole = _mel_pair(streams, slot)
            torch.testing.assert_close(kept, whole, atol=1e-4, rtol=0)
    streams.reset(b)  # barge-in: the next utterance starts from silence
    streams.push(b, speech16k[:700])
    streams.push(a, long_signal[pos:])  # a burst across the segment boundary
    streams.flush(a)
    drain(streams)
    for slot in (a, b):
        kept, whole = _mel_pair(streams, slot)
        torch.testing.assert_close(kept, whole, atol=1e-4, rtol=0)
    assert streams.frames_ready(a) == num_video_frames(len(long_signal), 25)


def test_incremental_log_mel_gives_the_whole_stft_tokens(encoder, long_signal):
    def tokens(incremental: bool) -> np.ndarray:
        streams = GpuAudioStreams(encoder, max_streams=1, ring_frames=1024)
        streams.incremental_mel = incremental
        slot = streams.open()
        out: dict[int, list] = {}
        for start in range(0, len(long_signal), 16000):
            streams.push(slot, long_signal[start : start + 16000])
            drain(streams, out)
        streams.flush(slot)
        drain(streams, out)
        return _collect(out, slot)

    kept, whole = tokens(True), tokens(False)
    assert kept.shape == whole.shape == (782, 50, 384)
    np.testing.assert_allclose(kept, whole, atol=1e-4)


# --------------------------------------------------------------------------- lifecycle


def test_reset_and_new_utterance_after_flush(encoder, speech16k):
    x = speech16k[:8000]

    def utterance(streams: GpuAudioStreams, slot: int) -> np.ndarray:
        out: dict[int, list] = {}
        streams.push(slot, x)
        drain(streams, out)
        streams.flush(slot)
        drain(streams, out)
        return _collect(out, slot)

    fresh = GpuAudioStreams(encoder, max_streams=1)
    expected = utterance(fresh, fresh.open())

    streams = GpuAudioStreams(encoder, max_streams=1)
    slot = streams.open()
    streams.push(slot, speech16k[20000:32000])  # longer than x: leftovers would show
    assert drain(streams) == 1
    streams.reset(slot)
    assert (streams.frames_ready(slot), streams.samples_received(slot), streams.flushed(slot)) == (0, 0, False)
    np.testing.assert_array_equal(utterance(streams, slot), expected)
    # After a flush whose frames are all made and consumed the next push starts frame 0.
    np.testing.assert_array_equal(utterance(streams, slot), expected)
    # Not consumed yet: a new utterance would overwrite rows still in use.
    streams.push(slot, x)
    streams.flush(slot)
    streams.round()
    with pytest.raises(RuntimeError, match="reset"):
        streams.push(slot, x)
    streams.reset(slot)
    streams.push(slot, x[:100])
    assert streams.samples_received(slot) == 100


def test_slots_errors_and_bad_input(encoder):
    streams = GpuAudioStreams(encoder, max_streams=2, ring_frames=4)
    a, b = streams.open(), streams.open()
    assert (a, b) == (0, 1)
    with pytest.raises(RuntimeError, match="all 2 audio streams are in use.*max_streams"):
        streams.open()
    streams.close(a)
    assert streams.open() == a
    with pytest.raises(TypeError, match="float32"):
        streams.push(a, np.zeros(10, np.int16))
    with pytest.raises(ValueError, match="1-D"):
        streams.push(a, np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="finite"):
        streams.push(a, np.array([0.0, np.nan], np.float32))
    with pytest.raises(ValueError, match="0..1"):
        streams.push(5, np.zeros(10, np.float32))
    streams.close(b)
    with pytest.raises(ValueError, match="not open"):
        streams.push(b, np.zeros(10, np.float32))
    with pytest.raises(ValueError, match="only 0 are made"):
        streams.consumed(a, 1)
    with pytest.raises(ValueError, match="not in the ring"):
        streams.token_index(a, 0)
    assert streams.round() == []
    with pytest.raises(ValueError, match="fps"):
        GpuAudioStreams(encoder, fps=0)
    with pytest.raises(ValueError, match="ring_frames"):
        GpuAudioStreams(encoder, ring_frames=0)
    with pytest.raises(ValueError, match="max_streams"):
        GpuAudioStreams(encoder, max_streams=0)
    with pytest.raises(ValueError, match="lookahead_frames"):
        GpuAudioStreams(encoder, lookahead_frames=-1)


def test_encoder_buckets_step_by_at_most_half():
    assert encoder_buckets(1) == [1]
    assert encoder_buckets(8) == [1, 2, 4, 6, 8]
    assert encoder_buckets(100) == [1, 2, 4, *range(6, 33, 2), 40, 48, 56, 64, 80, 96, 120]
    sizes = encoder_buckets(1000)
    assert sizes[-1] >= 1000 and sizes == sorted(set(sizes))
    assert all(b / a <= 2 for a, b in zip(sizes, sizes[1:])) and all(b / a <= 1.5 for a, b in zip(sizes[2:], sizes[3:]))
    # Up to 32 encodes (a round of 32 sessions) no batch is padded by more than one item.
    assert all(b - a <= 2 for a, b in zip(sizes, sizes[1:]) if b <= 32)


def test_padded_encoder_batches_give_the_same_tokens(encoder, speech16k):
    """Buckets pad the encoder batch with silent rows (on CUDA, so that cuDNN's search
    happens at warm-up): the padding changes no token."""
    out = {}
    for buckets in (False, True):
        streams = GpuAudioStreams(encoder, max_streams=8, batch_buckets=buckets)
        assert streams.bucket(3) == (4 if buckets else 3) and streams.bucket(5) == (6 if buckets else 5)
        assert sorted(streams.warm()) == ([1, 2, 4, 6, 8] if buckets else [1])
        slots = [streams.open() for _ in range(3)]
        got: dict[int, list[np.ndarray]] = {}
        for part in range(3):  # three rounds of three slots: batches of 3 padded to 4
            for i, slot in enumerate(slots):
                start = 3000 * i + 3200 * part
                streams.push(slot, speech16k[start : start + 3200])
            drain(streams, got)
        out[buckets] = [np.stack(got[slot]) for slot in slots]
    for plain, padded in zip(out[False], out[True]):
        assert plain.shape == padded.shape and len(plain) >= 8
        np.testing.assert_allclose(padded, plain, atol=1e-5)


# --------------------------------------------------------------------------- GPU


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_rounds_match_cpu_and_never_sync(tmp_path, encoder, speech16k, long_signal):
    cuda_encoder = load_whisper_encoder(write_random_whisper(tmp_path, "tiny", seed=0), device="cuda")
    x = speech16k[4000:13800]
    np.testing.assert_allclose(
        gpu_stream_tokens(cuda_encoder, x, 640), gpu_stream_tokens(encoder, x, 640), atol=1e-3
    )
    streams = GpuAudioStreams(cuda_encoder, max_streams=4, ring_frames=64)
    slots = [streams.open() for _ in range(4)]
    streams.push(slots[0], long_signal[: WINDOW_SAMPLES - 3200])  # crosses 30 s during the checked rounds
    drain(streams)
    torch.cuda.synchronize()
    made = 0
    torch.cuda.set_sync_debug_mode("error")
    try:
        for r in range(12):
            for i, slot in enumerate(slots):
                start = (WINDOW_SAMPLES - 3200 if i == 0 else 0) + r * 640
                streams.push(slot, long_signal[start : start + 640])
            for slot, first, count in streams.round():
                streams.consumed(slot, first + count)
                made += count
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert made >= 4 * 10 and streams.frames_ready(slots[0]) > 750


def test_short_window_equals_the_host_streaming_path(encoder):
    """A CPU's short encoder window: the same tokens as StreamingAudioFeatures with the
    same window (they choose the same window per frame group)."""
    from musetalk.audio import StreamingAudioFeatures
    from musetalk.audio_gpu import GpuAudioStreams, drain

    rng = np.random.default_rng(11)
    pcm = (0.1 * rng.standard_normal(16000 * 6)).astype(np.float32)
    host = StreamingAudioFeatures(encoder, fps=25, window_s=4.0)
    gpu = GpuAudioStreams(encoder, fps=25, max_streams=1, window_s=4.0)
    slot = gpu.open()
    want, got = [], {}
    for start in range(0, len(pcm), 640):
        want += host.push(pcm[start:start + 640])
        gpu.push(slot, pcm[start:start + 640])
        drain(gpu, got)
    want += host.flush()
    gpu.flush(slot)
    drain(gpu, got)
    assert len(got[slot]) == len(want) == 150
    np.testing.assert_allclose(np.stack(got[slot]), np.stack(want), atol=2e-4)
    with pytest.raises(ValueError, match="window_s"):
        GpuAudioStreams(encoder, window_s=0.5)


# --------------------------------------------------------------------------- last layer on the read rows


def test_last_layer_on_rows_equals_the_whole_layer_there(encoder, speech16k):
    mel = torch.from_numpy(np.stack([encoder.log_mel(speech16k), encoder.log_mel(speech16k[3000:])]))
    whole = encoder.device_hidden_states(mel)
    rows = torch.tensor([[0, 1, 2, 700, 1499], [40, 41, 42, 43, 44]])
    pruned = encoder.device_hidden_states(mel, rows=rows)
    assert pruned.shape == whole.shape == (2, 1500, 5, 384)
    # The first four states are the whole encoder's everywhere.
    np.testing.assert_allclose(pruned[:, :, :4].numpy(), whole[:, :, :4].numpy(), atol=1e-6)
    for b in range(2):
        np.testing.assert_allclose(pruned[b, rows[b], 4].numpy(), whole[b, rows[b], 4].numpy(), atol=1e-5)
        others = np.setdiff1d(np.arange(1500), rows[b].numpy())
        assert not pruned[b, others, 4].any()  # never computed, never read
    # The last state depends on every position (keys and values of the whole window).
    assert not torch.allclose(whole[0, rows[0], 4], whole[1, rows[0], 4])


def test_compiled_encode_equals_the_eager_one_and_writes_into_out(encoder, speech16k):
    """``compiled=True`` (torch.compile, on the CPU Inductor's C++ kernels here; on CUDA the
    rounds' CUDA graphs capture it) gives the eager states, whole and on rows, into ``out``;
    a second batch size runs without failing (one dynamic compile serves the buckets)."""
    mel = torch.from_numpy(np.stack([encoder.log_mel(speech16k), encoder.log_mel(speech16k[3000:])]))
    rows = torch.tensor([[0, 1, 2, 700] + list(range(1400, 1412)), list(range(40, 56))])
    eager = encoder.device_hidden_states(mel, rows=rows)
    out = torch.full_like(eager, 7.0)
    got = encoder.device_hidden_states(mel, rows=rows, out=out, compiled=True)
    assert got.data_ptr() == out.data_ptr()
    np.testing.assert_allclose(out.numpy(), eager.numpy(), atol=1e-5)
    assert not out[0, 3, 4].any()  # a row not asked for: zero, as eager
    one = encoder.device_hidden_states(mel[1:], rows=rows[1:], compiled=True)
    np.testing.assert_allclose(one.numpy(), eager[1:].numpy(), atol=1e-5)


def test_streams_with_the_last_layer_pruned_give_the_whole_encoders_tokens(encoder, speech16k, long_signal):
    """Two slots at different phases, one of them across the 30 s boundary (a final
    encode and a stored tail), streamed in 40 ms chunks: the pruned rounds' tokens are the
    whole encoder's, and the rounds did prune."""
    sources = [long_signal[: WINDOW_SAMPLES + 16000], speech16k[1234:]]
    starts = [WINDOW_SAMPLES - 6400, 0]
    out = {}
    for prune in (False, True):
        streams = GpuAudioStreams(encoder, max_streams=4, ring_frames=64)
        streams.prune_last_layer = prune
        slots = [streams.open() for _ in sources]
        streams.push(slots[0], sources[0][: starts[0]])
        drain(streams, {})
        got: dict[int, list[np.ndarray]] = {}
        for r in range(25):
            for slot, x, s0 in zip(slots, sources, starts):
                streams.push(slot, x[s0 + 640 * r : s0 + 640 * (r + 1)])
            drain(streams, got)
        for slot in slots:
            streams.flush(slot)
        drain(streams, got)
        out[prune] = [np.stack(got[slot]) for slot in slots]
        assert (streams.pruned_rounds > 20) == prune
    for whole, pruned in zip(out[False], out[True]):
        assert whole.shape == pruned.shape and len(whole) >= 25
        np.testing.assert_allclose(pruned, whole, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graphed_encodes_give_the_eager_tokens_without_a_sync(tmp_path, speech16k):
    cuda_encoder = load_whisper_encoder(write_random_whisper(tmp_path, "tiny", seed=0), device="cuda")
    x = speech16k[4000:13800]
    eager = gpu_stream_tokens(cuda_encoder, x, 640, graphs=False)
    graphed = gpu_stream_tokens(cuda_encoder, x, 640, graphs=True)
    np.testing.assert_allclose(graphed, eager, atol=1e-3)
    streams = GpuAudioStreams(cuda_encoder, max_streams=8, ring_frames=64, graphs=True)  # graphs up to 4 items
    streams.warm()
    slots = [streams.open() for _ in range(4)]
    for slot in slots:
        streams.push(slot, x[:3200])
    drain(streams)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for r in range(8):
            for i, slot in enumerate(slots[: 1 + r % 4]):
                streams.push(slot, x[3200 + 640 * r : 3840 + 640 * r])
            for slot, first, count in streams.round():
                streams.consumed(slot, first + count)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert streams.graph_rounds >= 6


def test_graphs_are_cuda_only(encoder):
    streams = GpuAudioStreams(encoder, max_streams=2, graphs=True)
    streams.warm()
    assert streams._graphs == {} and streams.graph_rounds == 0


def test_a_failing_graph_replay_falls_back_to_eager_encodes(encoder, speech16k):
    """A graph whose replay raises (here: a stand-in, as no CUDA graph exists on a CPU) is
    dropped with every other graph, and that round's encode runs eagerly: the tokens
    are the eager ones."""
    from musetalk.audio_gpu import _EncoderGraph

    class Broken:
        def replay(self):
            raise RuntimeError("replay failed")

    x = speech16k[4000:9000]
    want = gpu_stream_tokens(encoder, x, 640)
    streams = GpuAudioStreams(encoder, max_streams=1)
    dummy = torch.zeros(1)
    streams._graphs = {(1, q): _EncoderGraph(Broken(), torch.zeros(1, 80, 3000), torch.zeros(1, q, dtype=torch.long),
                                             dummy) for q in (16, 32)}
    slot = streams.open()
    got: dict[int, list[np.ndarray]] = {}
    for start in range(0, len(x), 640):
        streams.push(slot, x[start:start + 640])
        drain(streams, got)
    streams.flush(slot)
    drain(streams, got)
    assert streams._graphs == {} and streams.graph_rounds == 0
    np.testing.assert_allclose(np.stack(got[slot]), want, atol=1e-6)
