"""Pure parts of the real-time path: the frame/audio clock, ping-pong order, the PCM
buffer and the mouth gate."""

from __future__ import annotations

import numpy as np
import pytest

from daemon.session import AudioClock, pingpong_index
from daemon.speech import PcmBuffer, SpeechPipeline, Utterance


def test_audio_clock_never_drifts_over_an_hour():
    for rate in (8000, 16000, 22050, 24000, 44100, 48000):
        for fps in (25, 30, 24):
            clock = AudioClock(rate, fps)
            frames = fps * 3600
            total = sum(clock.samples(n) for n in range(frames))
            # An hour of frames holds exactly an hour of audio: no rounding creep.
            assert total == rate * 3600
            assert {clock.samples(n) for n in range(100)} <= {rate // fps, rate // fps + 1}


def test_pingpong_order():
    assert [pingpong_index(t, 4) for t in range(10)] == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]
    assert [pingpong_index(t, 1) for t in range(3)] == [0, 0, 0]


def test_pcm_buffer_grows_and_pads():
    buf = PcmBuffer()
    chunks = [np.arange(i * 10000, (i + 1) * 10000, dtype=np.int64).astype(np.int16) for i in range(5)]
    for c in chunks:
        buf.append(c)
    assert buf.size == 50000
    whole = np.concatenate(chunks)
    assert np.array_equal(buf.slice(12345, 23456), whole[12345:23456])
    tail = buf.slice(49990, 50010)
    assert np.array_equal(tail[:10], whole[-10:]) and not tail[10:].any()
    assert not buf.slice(-5, 0).any() and len(buf.slice(-5, 0)) == 5


def test_pcm_buffer_trims_what_was_played():
    """An hour streamed without a flush, trimmed as it plays: memory stays at a few
    seconds, and what is still to play reads back exactly."""
    rate, chunk = 48000, 1920  # 40 ms chunks at 48 kHz
    buf = PcmBuffer()
    rng = np.random.default_rng(0)
    recent: list[np.ndarray] = []
    for i in range(90_000):  # one hour
        c = rng.integers(-3000, 3000, chunk).astype(np.int16)
        buf.append(c)
        recent = (recent + [c])[-5:]
        played = buf.size - 3 * chunk  # the frame clock plays 3 chunks behind
        buf.trim(played)
    assert buf.size == 90_000 * chunk
    assert len(buf._data) <= 4 * rate  # seconds, not the hour's 345 MB
    tail = np.concatenate(recent)
    assert np.array_equal(buf.slice(buf.size - len(tail) + 2 * chunk, buf.size), tail[2 * chunk:])
    assert not buf.slice(0, 100).any()  # trimmed samples read as silence


class _Clockless:
    """Just enough of a SpeechPipeline to call its gate (no model, no session)."""

    def __init__(self, fps: int, rate: int, blend_frames: int) -> None:
        from daemon.session import AudioClock

        self.fps, self.rate, self.blend_frames = fps, rate, blend_frames
        self.clock = AudioClock(rate, fps)

    _frame_level = SpeechPipeline._frame_level
    blend_for = SpeechPipeline.blend_for


def test_mouth_follows_the_voice_and_closes_within_two_frames():
    fps, rate = 25, 16000
    spf = rate // fps
    # 10 silent frames, 20 frames of tone at -12 dBFS, 10 silent frames.
    t = np.arange(20 * spf) / rate
    tone = (0.25 * 32767 * np.sin(2 * np.pi * 220 * t)).astype(np.int16)
    pcm = np.concatenate([np.zeros(10 * spf, np.int16), tone, np.zeros(10 * spf, np.int16)])
    utt = Utterance(id=0, start_tick=0)
    utt.audio.append(pcm)
    p = _Clockless(fps, rate, blend_frames=3)
    blend = [p.blend_for(utt, f) for f in range(40)]
    assert all(b == 0 for b in blend[:9])  # closed in the leading silence
    assert blend[9] > 0  # opens one frame ahead of the voice
    assert all(b == 1.0 for b in blend[12:30])
    assert 0 < blend[30] < 1  # one frame of hangover
    assert all(b == 0 for b in blend[31:])  # closed within two frames after the voice
    # Fade-in at the start of an utterance.
    utt2 = Utterance(id=1, start_tick=0)
    utt2.audio.append(tone)
    ramp = [p.blend_for(utt2, f) for f in range(5)]
    assert ramp == [0.25, 0.5, 0.75, 1.0, 1.0]


def test_the_frame_log_keeps_the_last_frames_in_order_and_no_object_per_frame():
    import gc

    from daemon.speech import FrameLog, FrameRecord

    log = FrameLog(4)
    assert list(log) == [] and log.totals() == (0, 0)
    frames = [(10.0 + i, ("idle", "speech", "fallback", "underrun", "playback")[i % 5], i % 2 == 1, i % 4 == 1,
               0.1 * i if i % 3 == 0 else None) for i in range(7)]
    for f in frames:
        log.append(*f)
    assert len(log) == 4
    assert list(log) == [FrameRecord(*f) for f in frames[3:]]  # the oldest three dropped, in order
    assert log.totals() == (1, 2)  # frames 3..6: generated 5; needed 3 and 5
    with pytest.raises(ValueError):
        log.append(20.0, "sideways", False, False, None)
    assert list(log) == [FrameRecord(*f) for f in frames[3:]]  # a refused frame changes nothing
    # A long session's log is columns: appending frames adds no tracked object.
    big = FrameLog(20000)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(20000):
        big.append(float(i), "speech", True, True, None)
    assert len(gc.get_objects()) - before < 100
    with pytest.raises(ValueError, match="at least one"):
        FrameLog(0)
