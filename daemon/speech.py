"""A session's speech: streamed PCM -> features -> frame jobs -> generated frames played
in lockstep with their audio.

Timeline. An utterance is placed on the session's frame clock when its first audio
arrives: its frame 0 plays at tick ``start_tick = arrival tick + playout_delay_frames``
(later if the previous utterance is still playing). Frame f then plays at tick
start_tick + f together with the audio samples of its own span, so lips and voice leave
the daemon in the same publisher call and cannot drift. The delay is the time the
pipeline gets to produce frame f: its audio context (through frame f + 2) plus one
generation step.

At each tick, for the utterance's frame f:
- its audio is complete and the frame is ready -> the generated frame ("speech");
- its audio is complete but the frame is not (overload, a failed step) -> the avatar's
  own frame for this tick with the audio ("fallback"): never a frozen or black picture,
  and audio never waits for video;
- its audio has not arrived (the producer is behind) -> idle + silence, and the
  utterance slides one tick later ("underrun").

The generated mouth fades in over ``blend_frames`` frames, and follows the voice: the
blend is gated by the audio level around the frame (with one frame of hangover), so the
mouth closes within two frames of the end of speech and stays closed in pauses.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon import errors
from daemon.log import get_logger
from schemas import ErrorEvent, PlaybackFinishedEvent, SpeakingEvent

log = get_logger(__name__)

SILENCE_DBFS = -50.0  # at or below: mouth closed
SPEECH_DBFS = -40.0  # at or above: full blend (between: linear)


class PcmBuffer:
    """Growing int16 buffer with zero-padded slicing."""

    def __init__(self) -> None:
        self._data = np.zeros(16000, np.int16)
        self.size = 0

    def append(self, pcm: np.ndarray) -> None:
        need = self.size + len(pcm)
        if need > len(self._data):
            grown = np.zeros(max(need, 2 * len(self._data)), np.int16)
            grown[: self.size] = self._data[: self.size]
            self._data = grown
        self._data[self.size:need] = pcm
        self.size = need

    def slice(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(max(0, stop - start), np.int16)
        a, b = max(start, 0), min(stop, self.size)
        if b > a:
            out[a - start: b - start] = self._data[a:b]
        return out


@dataclass
class Utterance:
    id: int
    stream: Any  # musetalk.audio.StreamingAudioFeatures
    start_tick: int
    audio: PcmBuffer = field(default_factory=PcmBuffer)
    flushed: bool = False
    total_frames: int | None = None  # frames of audio to play, known once flushed
    tokens_received: int = 0
    results: dict[int, Any] = field(default_factory=dict)  # frame -> RGBA or None (= idle)
    played: int = 0
    started: bool = False
    last_audio_at: float = 0.0
    arrivals: deque = field(default_factory=deque)  # (frame holding first sample, monotonic arrival)
    error_sent: bool = False
    underruns: int = 0


class SpeechPipeline:
    """Implements the session's FrameSource and its audio/control entry points.

    With no model (``host`` None, ``model.enabled = false``) it still plays each
    utterance's audio in lockstep with the idle video and sends the same events: the
    protocol behaves the same, the mouth just does not move.
    """

    def __init__(self, session: Any, host: Any, avatar: Any, timings: dict[str, float]) -> None:
        self.session = session
        self.host = host  # None: no model, audio plays over the idle video
        self.avatar = avatar
        self.timings = timings
        self.log = session.log
        cfg = session.settings.model
        self.generates = host is not None
        self.fps = session.fps
        self.rate = session.sample_rate
        self.clock = session.clock
        self.blend_frames = cfg.blend_frames
        self.lookahead_frames = cfg.lookahead_frames
        self.delay_frames = cfg.playout_delay_frames
        self.auto_flush_s = cfg.auto_flush_s
        self.resampler = None
        if self.generates:
            from musetalk.audio import StreamResampler  # torch side: only with a model

            self.resampler = StreamResampler(self.rate)
        self.utterances: deque[Utterance] = deque()
        self._next_id = 0
        self._encode_queue: deque[tuple[int, Any, np.ndarray | None]] = deque()
        self._encode_ready = asyncio.Event()
        self._encoder = asyncio.create_task(self._encode_loop(), name=f"encode-{session.id}")
        self._events: list[Any] = []
        self._last_generated: tuple[int, Any] | None = None  # (tick, frame)
        # The most recent chunks' latencies (a bounded window: status sorts it).
        self.latencies: deque[float] = deque(maxlen=5000)
        self.counts = {"speech": 0, "fallback": 0, "playback": 0, "underrun": 0, "failed": 0}
        # The last frames' kinds, one letter each (s speech, f fallback, u underrun): the
        # quickest way to see where a session falls behind.
        self.timeline: deque[str] = deque(maxlen=250)
        self._closed = False

    # ---- state -----------------------------------------------------------------------
    @property
    def speaking(self) -> bool:
        return bool(self.utterances)

    def pending_samples(self) -> int:
        """Audio received and not yet played (bounded by audio.max_buffer_s)."""
        total = 0
        for u in self.utterances:
            total += max(0, u.audio.size - self.clock.start(u.played))
        return total

    # ---- input (event loop) ----------------------------------------------------------
    def _open_utterance(self, now: float) -> Utterance:
        start = self.session.next_tick + self.delay_frames
        if self.utterances:
            prev = self.utterances[-1]
            prev_end = prev.start_tick + (prev.total_frames or 0)
            start = max(start, prev_end)
        stream = None
        if self.generates:
            from musetalk.audio import StreamingAudioFeatures

            stream = StreamingAudioFeatures(self.host.whisper, fps=self.fps, lookahead_frames=self.lookahead_frames,
                                            window_s=self.host.audio_window_s)
        utt = Utterance(id=self._next_id, stream=stream, start_tick=start, last_audio_at=now)
        self._next_id += 1
        self.utterances.append(utt)
        return utt

    def on_audio(self, chunks: list[Any]) -> None:
        for chunk in chunks:
            utt = self.utterances[-1] if self.utterances and not self.utterances[-1].flushed else None
            if utt is None:
                utt = self._open_utterance(chunk.arrived)
            first_sample = utt.audio.size
            utt.audio.append(chunk.pcm)
            utt.last_audio_at = chunk.arrived
            if not chunk.gap_fill:
                utt.arrivals.append((first_sample * self.fps // self.rate, chunk.arrived))
            if not self.generates:
                continue
            pcm16k = self.resampler.push(chunk.pcm)
            if len(pcm16k):
                self._queue_encode(utt, pcm16k)

    def flush(self) -> None:
        """End of utterance: render what is buffered, then playback_finished."""
        utt = self.utterances[-1] if self.utterances and not self.utterances[-1].flushed else None
        if utt is None:
            # Nothing buffered: the utterance is already finished.
            self._events.append(PlaybackFinishedEvent(
                session_id=self.session.id, ts=time.time(), position_s=0.0, interrupted=False))
            return
        utt.flushed = True
        utt.total_frames = math.ceil(utt.audio.size * self.fps / self.rate)
        self.session.inbox.last_seq = None  # the next utterance may number its chunks afresh
        if not self.generates:
            return
        tail = self.resampler.flush()
        if len(tail):
            self._queue_encode(utt, tail)
        self._queue_encode(utt, None)

    def clear(self) -> None:
        """Interrupt: drop buffered audio and pending frames; idle from the next tick."""
        active = self.utterances[0] if self.utterances else None
        if active is not None:
            self._events.append(PlaybackFinishedEvent(
                session_id=self.session.id, ts=time.time(),
                position_s=round(active.played / self.fps, 3), interrupted=True))
        self.utterances.clear()
        if self.resampler is not None:
            self.resampler.reset()
        self._cancel()
        self._last_generated = None

    def abort(self) -> tuple[float, bool]:
        """Session closing: what was playing, if anything."""
        active = self.utterances[0] if self.utterances else None
        self.utterances.clear()
        self._cancel()
        if active is None:
            return 0.0, False
        return round(active.played / self.fps, 3), True

    # ---- features -> frame jobs ------------------------------------------------------
    def _queue_encode(self, utt: Utterance, pcm16k: np.ndarray | None) -> None:
        """Audio (or, with None, the flush) for the utterance's encoder, in order."""
        self._encode_queue.append((utt.id, utt.stream, pcm16k))
        self._encode_ready.set()

    def _next_encode(self) -> tuple[int, Any, np.ndarray | None]:
        """The next encoder step: a flush, or the audio queued for one utterance joined
        together: when the worker is busy, fewer and larger steps keep up with real time."""
        utt_id, stream, pcm = self._encode_queue.popleft()
        if pcm is None:
            return utt_id, stream, pcm
        parts = [pcm]
        while self._encode_queue and self._encode_queue[0][0] == utt_id and self._encode_queue[0][2] is not None:
            parts.append(self._encode_queue.popleft()[2])
        return utt_id, stream, np.concatenate(parts) if len(parts) > 1 else pcm

    async def _encode_loop(self) -> None:
        while True:
            if not self._encode_queue:
                self._encode_ready.clear()
                await self._encode_ready.wait()
                continue
            utt_id, stream, pcm = self._next_encode()
            if self._find(utt_id) is None:
                continue  # interrupted: its audio is no longer wanted
            try:
                tokens = await self.host.encode(stream, pcm)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                self.log.error("audio feature step failed", error=repr(exc))
                self._error_once(self._find(utt_id), errors.GENERATION_FAILED,
                                 f"audio features failed ({exc}); showing the idle video for this utterance")
                continue
            utt = self._find(utt_id)
            if utt is not None:
                self._on_tokens(utt, tokens)

    def _find(self, utt_id: int) -> Utterance | None:
        for u in self.utterances:
            if u.id == utt_id:
                return u
        return None

    def _on_tokens(self, utt: Utterance, tokens: list[np.ndarray]) -> None:
        from musetalk.types import FrameJob

        for tok in tokens:
            f = utt.tokens_received
            utt.tokens_received += 1
            if f < utt.played:
                continue  # its tick has passed (played as a fallback)
            blend = self.blend_for(utt, f)
            if blend <= 0.0:
                utt.results[f] = None  # silent: the avatar's own closed mouth, no GPU work
                continue
            tick = utt.start_tick + f
            job = FrameJob(self.avatar.key, self.session.idle.avatar_index(tick), tok, blend)
            self.host.submit_frame(
                self.session.id, utt.id, f, self.session.tick_time(tick), job,
                lambda frame, error, u=utt, n=f: self._on_frame(u, n, frame, error),
            )

    def _on_frame(self, utt: Utterance, f: int, frame: Any, error: BaseException | None) -> None:
        if self._closed or self._find(utt.id) is None or f < utt.played:
            return  # stale: interrupted, or its tick already went out as a fallback
        if error is not None:
            self.counts["failed"] += 1
            self._error_once(utt, errors.GENERATION_FAILED,
                             f"frame generation failed ({type(error).__name__}: {error}); "
                             "showing idle frames meanwhile, the session continues")
            return
        utt.results[f] = frame

    def _error_once(self, utt: Utterance | None, code: str, message: str) -> None:
        if utt is not None and utt.error_sent:
            return
        if utt is not None:
            utt.error_sent = True
        self.session.deps.metrics.errors.labels(code).inc()
        self._events.append(ErrorEvent(session_id=self.session.id, ts=time.time(), code=code, message=message))

    # ---- blend -----------------------------------------------------------------------
    def _frame_level(self, utt: Utterance, f: int) -> float:
        """0..1 speech level of frame f's audio (0 at or below SILENCE_DBFS)."""
        if f < 0:
            return 0.0
        pcm = utt.audio.slice(self.clock.start(f), self.clock.start(f + 1)).astype(np.float32)
        if not len(pcm):
            return 0.0
        rms = float(np.sqrt(np.mean(pcm * pcm))) / 32768.0
        db = 20 * math.log10(rms) if rms > 0 else -120.0
        return min(1.0, max(0.0, (db - SILENCE_DBFS) / (SPEECH_DBFS - SILENCE_DBFS)))

    def blend_for(self, utt: Utterance, f: int) -> float:
        # Open with the sound of this frame or the next (lips lead the voice slightly),
        # close one frame after it stops (hangover at half strength).
        gate = max(self._frame_level(utt, f), self._frame_level(utt, f + 1),
                   0.5 * self._frame_level(utt, f - 1))
        ramp = min(1.0, (f + 1) / (self.blend_frames + 1)) if self.blend_frames else 1.0
        return round(gate * ramp, 4)

    # ---- output (frame loop) ---------------------------------------------------------
    def frame_for_tick(self, tick: int) -> tuple[np.ndarray, np.ndarray, str]:
        idle = self.session.idle
        utt = self.utterances[0] if self.utterances else None
        if utt is None or tick < utt.start_tick:
            return idle.frame_for_tick(tick)
        f = tick - utt.start_tick
        if utt.flushed and utt.total_frames is not None and f >= utt.total_frames:
            self._finish(utt)  # flushed exactly at its end: nothing more to play
            return idle.frame_for_tick(tick)
        need = self.clock.start(f + 1)
        if utt.audio.size < need and not utt.flushed:
            # The producer is behind real time: wait for it, keep the head moving.
            utt.start_tick += 1
            utt.underruns += 1
            self.counts["underrun"] += 1
            if time.monotonic() - utt.last_audio_at > self.auto_flush_s:
                self.log.info("no audio and no flush: ending the utterance", after_s=self.auto_flush_s)
                self.flush()
            frame, audio, _ = idle.frame_for_tick(tick)
            self.timeline.append("u")
            return frame, audio, "underrun"
        audio = utt.audio.slice(self.clock.start(f), need)
        if not utt.started:
            utt.started = True
            self._events.append(SpeakingEvent(session_id=self.session.id, ts=time.time(),
                                              position_s=round(tick / self.fps, 3)))
        if f in utt.results:
            frame = utt.results.pop(f)
            kind = "speech"
            if frame is None:
                frame = idle.frame(tick)
            else:
                self._last_generated = (tick, frame)
        else:
            # Not generated in time (or failed): the avatar's own frame for this tick.
            frame = idle.frame(tick)
            if self.generates:
                self._cancel(utt.id, before_frame=f + 1)
                kind = "fallback"
            else:
                kind = "playback"  # no model: the voice over the avatar's own frames
        self.counts[kind] += 1
        self.timeline.append(kind[0])
        utt.played = f + 1
        return frame, audio, kind

    async def after_publish(self, tick: int, now: float) -> None:
        utt = self.utterances[0] if self.utterances else None
        if utt is not None and utt.started:
            last_played = utt.played - 1
            while utt.arrivals and utt.arrivals[0][0] <= last_played:
                _, arrived = utt.arrivals.popleft()
                latency = now - arrived
                self.latencies.append(latency)
                self.session.deps.metrics.audio_to_frame_latency.observe(latency)
            if utt.flushed and utt.total_frames is not None and utt.played >= utt.total_frames:
                self._finish(utt)
        # One at a time, removed once sent: a cancelled frame loop leaves the rest to
        # the session's close (take_events).
        while self._events:
            await self.session.emit(self._events[0])
            self._events.pop(0)

    def _finish(self, utt: Utterance) -> None:
        if self.utterances and self.utterances[0] is utt:
            self.utterances.popleft()
        self._cancel(utt.id)
        self._events.append(PlaybackFinishedEvent(
            session_id=self.session.id, ts=time.time(),
            position_s=round((utt.total_frames or 0) / self.fps, 3), interrupted=False))
        self.log.info("utterance finished", frames=utt.total_frames, underruns=utt.underruns,
                      counts=dict(self.counts))

    def take_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._encoder.cancel()
        try:
            await self._encoder
        except asyncio.CancelledError:
            pass
        except Exception:
            self.log.exception("audio encoder task had failed")
        finally:
            self._cancel()
            if self.host is not None:
                await self.host.release_avatar(self.avatar.key)

    def _cancel(self, utterance: int | None = None, before_frame: int | None = None) -> None:
        if self.host is not None:
            self.host.cancel(self.session.id, utterance, before_frame)

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)) if lat else (lambda q: None)
        return {"counts": dict(self.counts), "timeline": "".join(self.timeline), "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99),
                                                           "n": len(lat)}}
