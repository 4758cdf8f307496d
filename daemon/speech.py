"""A session's speech: streamed PCM -> the generation worker -> generated frames played in
lockstep with their audio.

Timeline. An utterance is placed on the session's frame clock when its first audio
arrives. Its first sample is due when its frame 0's audio context (through the end of
frame 2, plus ``lookahead_frames``) can have arrived at real time, plus the processing
budget the worker measures at the current load (without a model: its own frame's audio
plus a jitter margin). It starts at the tick at or before that moment, the difference
played as leading silence before the first chunk, so the first sample plays when due
(``playout_delay_frames``, when set, starts it that many ticks after the next one
instead); later if the previous utterance is still playing. Frame f then plays at tick
start_tick + f together with the audio samples of its own span, so lips and voice leave
the daemon in the same publisher call and cannot drift.

Audio goes to the worker as it arrives (resampled to 16 kHz); the worker computes the
frames' audio tokens on the device. For each frame the session sends a *plan* once the
frame's audio level is known (which avatar frame, the mouth's blend, the deadline); the
worker pairs it with the tokens and generates it. Generated frames come back as I420
boxes (``musetalk.types.GeneratedBox``), written into the idle I420 frame at play time.

At each tick, for the utterance's frame f:
- its audio is complete and the frame is ready -> the generated frame ("speech");
- its audio is complete but the frame is not (overload, a failed step) -> the avatar's
  own frame for this tick with the audio ("fallback"): never a frozen or black picture,
  and audio never waits for video;
- its audio has not arrived (the producer is behind) -> idle + silence, and the
  utterance slides one tick later ("underrun").

MuseTalk makes floor(seconds * fps) frames of an utterance; the audio may reach into one
more frame, which plays with the mouth closed (the idle frame), not as a fallback.

The generated mouth fades in over ``blend_frames`` frames, and follows the voice: the
blend is gated by the audio level around the frame (with one frame of hangover), so the
mouth closes within two frames of the end of speech and stays closed in pauses.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from daemon import errors
from daemon.frames import compose
from daemon.log import get_logger
from schemas import ErrorEvent, PlaybackFinishedEvent, SpeakingEvent

log = get_logger(__name__)

SILENCE_DBFS = -50.0  # at or below: mouth closed
SPEECH_DBFS = -40.0  # at or above: full blend (between: linear)
CONTEXT_FRAMES = 2  # MuseTalk's audio context after a frame (frames f+1, f+2)
NO_MODEL_JITTER_S = 0.030  # without a model: how late a real-time chunk may come
# A generated frame must be ready this long before its tick (delivery to the loop).
DEADLINE_MARGIN_S = 0.004


def level_dbfs(pcm: np.ndarray) -> np.ndarray:
    """Level in dBFS of int16 samples along the last axis (-120 for digital silence): the
    measure SILENCE_DBFS and SPEECH_DBFS gate the mouth by, for one frame or many."""
    x = np.asarray(pcm).astype(np.float32)
    rms = np.sqrt(np.mean(x * x, axis=-1)).astype(np.float64) / 32768.0
    return 20 * np.log10(np.maximum(rms, 1e-6))


class PcmBuffer:
    """Growing int16 buffer with zero-padded slicing, on absolute sample positions.
    ``trim`` frees what was played: an utterance streamed for an hour without a flush
    holds only its unplayed audio, not the hour."""

    def __init__(self) -> None:
        self._data = np.zeros(16000, np.int16)
        self._offset = 0  # absolute position of _data[0]
        self.size = 0  # samples appended in all (absolute end)

    def append(self, pcm: np.ndarray) -> None:
        held = self.size - self._offset
        need = held + len(pcm)
        if need > len(self._data):
            grown = np.zeros(max(need, 2 * len(self._data)), np.int16)
            grown[:held] = self._data[:held]
            self._data = grown
        self._data[held:need] = pcm
        self.size += len(pcm)

    def trim(self, before: int) -> None:
        """Samples before ``before`` will not be read again (they read as silence)."""
        drop = min(before, self.size) - self._offset
        held = self.size - self._offset
        # Moved only when it frees at least half the buffer: amortized O(1) per sample.
        if drop <= 0 or drop < len(self._data) // 2:
            return
        self._data[: held - drop] = self._data[drop:held]
        self._offset += drop
        if len(self._data) > 4 * max(16000, held - drop):
            self._data = self._data[: 2 * max(16000, held - drop)].copy()

    def slice(self, start: int, stop: int) -> np.ndarray:
        out = np.zeros(max(0, stop - start), np.int16)
        a, b = max(start, self._offset), min(stop, self.size)
        if b > a:
            out[a - start: b - start] = self._data[a - self._offset: b - self._offset]
        return out


@dataclass
class Utterance:
    id: int
    start_tick: int
    audio: PcmBuffer = field(default_factory=PcmBuffer)
    flushed: bool = False
    total_frames: int | None = None  # frames of audio to play, known once flushed
    generated_frames: int | None = None  # frames MuseTalk makes: floor(seconds * fps)
    planned: int = 0  # frames whose plan went to the worker
    results: dict[int, Any] = field(default_factory=dict)  # frame -> GeneratedBox, or None (= idle)
    played: int = 0
    lead: int = 0  # samples of silence before the first chunk (see _start_tick)
    started: bool = False
    last_audio_at: float = 0.0
    # (the chunk's first sample, monotonic arrival, producer's send time or None)
    arrivals: deque = field(default_factory=deque)
    error_sent: bool = False
    underruns: int = 0
    needed: int = 0  # played frames that needed generation
    fallbacks: int = 0  # ... of which the idle picture was shown


@dataclass(frozen=True, slots=True)
class FrameRecord:
    """One published frame, for benchmarks and status: what it was and, for the frame
    holding an audio chunk's first sample, that chunk's latency."""

    published_wall: float
    kind: str  # idle | speech | fallback | underrun | playback
    needed: bool  # it needed generation (speech audio, mouth open)
    generated: bool  # a generated frame was shown
    latency_s: float | None = None


FRAME_KINDS = ("idle", "speech", "fallback", "underrun", "playback")


class FrameLog:
    """The last ``maxlen`` published frames as columns (numpy arrays used as a ring), read
    back as ``FrameRecord``s. A session publishes 25 records a second and keeps 20,000:
    as objects, 24 long sessions held 480,000 that every full garbage collection walked,
    each collection stopping every session's frame loop (about 50 ms here); as columns
    they are five arrays."""

    def __init__(self, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("a frame log keeps at least one frame")
        self.maxlen = maxlen
        self._wall = np.zeros(maxlen, dtype=np.float64)
        self._latency = np.full(maxlen, np.nan, dtype=np.float64)
        self._kind = np.zeros(maxlen, dtype=np.uint8)
        self._needed = np.zeros(maxlen, dtype=bool)
        self._generated = np.zeros(maxlen, dtype=bool)
        self._count = 0  # frames appended so far

    def append(self, wall: float, kind: str, needed: bool, generated: bool, latency: float | None) -> None:
        code = FRAME_KINDS.index(kind)  # before any column changes
        i = self._count % self.maxlen
        self._wall[i] = wall
        self._kind[i] = code
        self._needed[i] = needed
        self._generated[i] = generated
        self._latency[i] = np.nan if latency is None else latency
        self._count += 1

    def __len__(self) -> int:
        return min(self._count, self.maxlen)

    def _order(self) -> np.ndarray:
        n = len(self)
        return (np.arange(n) + (self._count - n)) % self.maxlen

    def __iter__(self):
        """The kept frames as records, oldest first (made now: reading is rare)."""
        for i in self._order():
            latency = self._latency[i]
            yield FrameRecord(float(self._wall[i]), FRAME_KINDS[self._kind[i]], bool(self._needed[i]),
                              bool(self._generated[i]), None if np.isnan(latency) else float(latency))

    def totals(self) -> tuple[int, int]:
        """(frames shown generated, frames that needed generation) among those kept."""
        n = len(self)
        return int(self._generated[:n].sum()), int(self._needed[:n].sum())


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
        # The latest utterance's placement (budget, audio context, start), for the loadtest.
        self.last_placement: dict[str, float] | None = None
        self.auto_flush_s = cfg.auto_flush_s
        self.resampler = None
        if self.generates:
            from musetalk.audio import StreamResampler  # torch side: only with a model

            self.resampler = StreamResampler(self.rate)
            host.open_stream(session.id, self.fps, self._on_results)
        self.utterances: deque[Utterance] = deque()
        self._next_id = 0
        self._events: list[Any] = []
        # The most recent chunks' latencies (a bounded window: status sorts it).
        self.latencies: deque[float] = deque(maxlen=5000)
        self.counts = {"speech": 0, "fallback": 0, "playback": 0, "underrun": 0, "failed": 0, "needed": 0}
        self.frame_records = FrameLog(20000)
        # Frames generated after their tick went out as a fallback: (wall time they came,
        # seconds after the tick), the most recent (the loadtest splits its losses by it).
        self.late_results: deque[tuple[float, float]] = deque(maxlen=5000)
        # The utterances finished lately (not interrupted), id -> first tick: the boxes of
        # their last frames can come after the finish, and still count as late.
        self._finished_starts: dict[int, int] = {}
        # The last frames' kinds, one letter each (s speech, f fallback, u underrun): the
        # quickest way to see where a session falls behind.
        self.timeline: deque[str] = deque(maxlen=250)
        self._closed = False
        self._speaking_counted = False
        self._pending_record: tuple[str, bool, bool] = ("idle", False, False)

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

    def _set_speaking(self) -> None:
        if self.host is not None and self._speaking_counted != bool(self.utterances):
            self._speaking_counted = bool(self.utterances)
            self.host.speaking_changed(1 if self._speaking_counted else -1)

    # ---- input (event loop) ----------------------------------------------------------
    def _start_tick(self, arrived: float, first_chunk_samples: int) -> tuple[int, int]:
        """The utterance's first tick, and the samples of silence it plays before its
        first chunk (the lead): together they put the first sample exactly at its due
        time instead of up to a frame later at the next tick."""
        next_tick = self.session.next_tick
        if self.delay_frames is not None:
            return next_tick + self.delay_frames, 0
        if self.generates:
            # Frame 0 needs audio through the end of frame 2 (+ lookahead): at real time
            # that is here this long after the first chunk, which brought its own duration.
            context = (CONTEXT_FRAMES + 1 + self.lookahead_frames) / self.fps - first_chunk_samples / self.rate
            budget, budget_parts = self.host.processing_budget()
        else:
            # No model: each frame needs only its own audio; a margin for the producer's
            # and the network's jitter keeps real-time chunks from arriving after their tick.
            context = 1 / self.fps - first_chunk_samples / self.rate
            budget = NO_MODEL_JITTER_S
            budget_parts = None
        due = arrived + max(0.0, context) + budget
        exact = (due - self.session.t0) * self.fps
        earlier = 0.0
        if self.session.can_rephase and not self.utterances and math.ceil(exact - 1e-9) > next_tick:
            # The first tick at or after the due time, moved earlier onto it (Session.
            # rephase: the idle tick before is that much shorter): the first sample plays
            # when due and every frame keeps its whole processing budget.
            tick = math.ceil(exact - 1e-9)
            earlier = (tick - exact) / self.fps
            lead = 0
        else:
            # A sink with a constant frame rate: the tick at or before the due time, and
            # silence up to it, so the first sample still plays when due. The frames'
            # audio then comes no earlier in chunks of a frame or more, so the lead is
            # taken from their processing time (a rephase loses nothing).
            tick = math.floor(exact + 1e-9)
            lead = min(int((exact - tick) * self.rate / self.fps), self.rate // self.fps - 1)
        if tick < next_tick:  # due before the next tick: that tick, no lead
            tick, lead, earlier = next_tick, 0, 0.0
        self.last_placement = {
            "budget_ms": round(budget * 1000, 1), "context_ms": round(context * 1000, 1),
            "lead_ms": round(1000 * lead / self.rate, 1), "rephase_ms": round(1000 * earlier, 1),
            "start_in_ms": round((self.session.tick_time(tick) - earlier + lead / self.rate - time.monotonic())
                                 * 1000, 1),
        }
        if budget_parts:
            # What the budget was made of (round, step, the bucket and load it planned for).
            self.last_placement["budget_parts"] = {k: round(v, 2) if isinstance(v, float) else v
                                                   for k, v in budget_parts.items()}
        self.log.info("utterance placed", **self.last_placement)
        if earlier:
            self.session.rephase(earlier)
        return tick, lead

    def _open_utterance(self, now: float, first_chunk_samples: int) -> Utterance:
        start, lead = self._start_tick(now, first_chunk_samples)
        if self.utterances:
            prev = self.utterances[-1]
            prev_end = prev.start_tick + (prev.total_frames or 0)
            if prev_end > start:  # right after the previous one: no silence between
                start, lead = prev_end, 0
        utt = Utterance(id=self._next_id, start_tick=start, last_audio_at=now, lead=lead)
        self._next_id += 1
        self.utterances.append(utt)
        self._set_speaking()
        if lead:
            self._append(utt, np.zeros(lead, np.int16))
        return utt

    def _append(self, utt: Utterance, pcm: np.ndarray) -> None:
        """Audio of the utterance: to its playback buffer and, resampled, to the worker."""
        utt.audio.append(pcm)
        if not self.generates:
            return
        pcm16k = self.resampler.push(pcm)
        if len(pcm16k):
            self.host.push_audio(self.session.id, utt.id, pcm16k)

    def on_audio(self, chunks: list[Any]) -> None:
        for chunk in chunks:
            utt = self.utterances[-1] if self.utterances and not self.utterances[-1].flushed else None
            if utt is None:
                utt = self._open_utterance(chunk.arrived, len(chunk.pcm))
            if not chunk.gap_fill:
                utt.arrivals.append((utt.audio.size, chunk.arrived, chunk.sent))
            self._append(utt, chunk.pcm)
            utt.last_audio_at = chunk.arrived
            if self.generates:
                self._plan(utt)

    def flush(self) -> None:
        """End of utterance: render what is buffered, then playback_finished."""
        utt = self.utterances[-1] if self.utterances and not self.utterances[-1].flushed else None
        if utt is None:
            # Nothing buffered: the utterance is already finished.
            self._events.append(self.finished_event(0.0, interrupted=False))
            return
        utt.flushed = True
        utt.total_frames = math.ceil(utt.audio.size * self.fps / self.rate)
        utt.generated_frames = utt.audio.size * self.fps // self.rate
        self.session.inbox.last_seq = None  # the next utterance may number its chunks afresh
        if not self.generates:
            return
        tail = self.resampler.flush()
        if len(tail):
            self.host.push_audio(self.session.id, utt.id, tail)
        self.host.flush_audio(self.session.id, utt.id)
        self._plan(utt)

    def clear(self) -> None:
        """Interrupt: drop buffered audio and pending frames; idle from the next tick."""
        active = self.utterances[0] if self.utterances else None
        if active is not None:
            self._events.append(self.finished_event(self._position(active, active.played), interrupted=True))
        self.utterances.clear()
        self._set_speaking()
        if self.resampler is not None:
            self.resampler.reset()
        self._cancel()

    def abort(self) -> tuple[float, bool]:
        """Session closing: what was playing, if anything."""
        active = self.utterances[0] if self.utterances else None
        self.utterances.clear()
        self._set_speaking()
        self._cancel()
        if active is None:
            return 0.0, False
        return round(active.played / self.fps, 3), True

    # ---- frame plans -> the worker ---------------------------------------------------
    def _plan(self, utt: Utterance) -> None:
        """Plan every frame whose audio level is known (its audio through frame f + 1,
        or all of it once flushed). Frames past what MuseTalk generates, and silent
        frames, are planned with blend 0: the avatar's own closed mouth, no GPU work."""
        from daemon.worker import FramePlan

        end = utt.generated_frames if utt.flushed else None
        plans = []
        idle = self.session.idle
        while True:
            f = utt.planned
            if end is not None and f >= end:
                break
            if end is None and utt.audio.size < self.clock.start(f + 2):
                break
            utt.planned += 1
            blend = self.blend_for(utt, f) if f >= utt.played else 0.0
            if blend <= 0.0:
                utt.results[f] = None
            else:
                self.counts["needed"] += 1
            tick = utt.start_tick + f
            plans.append(FramePlan(utt.id, f, self.avatar.key, idle.avatar_index(tick), blend,
                                   self.session.tick_time(tick) - DEADLINE_MARGIN_S))
        if end is not None:
            for f in range(end, utt.total_frames or end):
                utt.results.setdefault(f, None)  # the partial last frame: mouth closed
        self.host.plan_frames(self.session.id, plans)

    def _on_results(self, results: list[tuple[int, int, Any, BaseException | None]]) -> None:
        for utt_id, f, box, error in results:
            if self._closed:
                continue
            utt = self._find(utt_id)
            # Not in play: finished while its last steps ran (late boxes), or interrupted.
            start = utt.start_tick if utt is not None else self._finished_starts.get(utt_id)
            if start is None:
                continue  # stale: interrupted
            if utt is None or f < utt.played:  # its tick already went out as a fallback
                if error is None and box is not None:
                    self.late_results.append((time.time(), time.monotonic() - self.session.tick_time(start + f)))
                continue
            if error is not None:
                self.counts["failed"] += 1
                self.log.error("frame generation failed", error=repr(error))
                self._error_once(utt, errors.GENERATION_FAILED,
                                 f"frame generation failed ({type(error).__name__}: {error}); "
                                 "showing idle frames meanwhile, the session continues")
                continue
            utt.results[f] = box

    def _find(self, utt_id: int) -> Utterance | None:
        for u in self.utterances:
            if u.id == utt_id:
                return u
        return None

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
        pcm = utt.audio.slice(self.clock.start(f), self.clock.start(f + 1))
        if not len(pcm):
            return 0.0
        db = float(level_dbfs(pcm))
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
            return self._record(idle.frame_for_tick(tick), False, False)
        f = tick - utt.start_tick
        if utt.flushed and utt.total_frames is not None and f >= utt.total_frames:
            self._finish(utt)  # flushed exactly at its end: nothing more to play
            return self._record(idle.frame_for_tick(tick), False, False)
        need = self.clock.start(f + 1)
        if utt.audio.size < need and not utt.flushed:
            # The producer is behind real time: wait for it, keep the head moving.
            utt.start_tick += 1
            if self.host is not None:
                self.host.shift(self.session.id, utt.id, 1.0 / self.fps)
            utt.underruns += 1
            self.counts["underrun"] += 1
            if time.monotonic() - utt.last_audio_at > self.auto_flush_s:
                self.log.info("no audio and no flush: ending the utterance", after_s=self.auto_flush_s)
                self.flush()
            frame, audio, _ = idle.frame_for_tick(tick)
            self.timeline.append("u")
            return self._record((frame, audio, "underrun"), False, False)
        audio = utt.audio.slice(self.clock.start(f), need)
        # Frame f's level is read again for frame f + 1's hangover; before it, nothing.
        utt.audio.trim(self.clock.start(max(0, f - 1)))
        if not utt.started:
            utt.started = True
            # Where its first sample plays on the session's media timeline.
            at = round(tick / self.fps - self.session.rephased_s + utt.lead / self.rate, 3)
            self._events.append(SpeakingEvent(session_id=self.session.id, ts=time.time(),
                                              session_position_s=at, position_s=at))
        needed = generated = False
        if f in utt.results:
            box = utt.results.pop(f)
            kind = "speech"
            if box is None:
                frame = idle.frame(tick)
            else:
                frame = compose(idle.frames[box.frame_index], box, idle.width, idle.height)
                needed = generated = True
                utt.needed += 1
        else:
            # Not generated in time (or failed): the avatar's own frame for this tick.
            frame = idle.frame(tick)
            if self.generates:
                self._cancel(utt.id, before_frame=f + 1)
                kind = "fallback"
                needed = True
                utt.needed += 1
                utt.fallbacks += 1
                self.session.deps.metrics.frames_degraded.labels(self.session.id).inc()
            else:
                kind = "playback"  # no model: the voice over the avatar's own frames
        self.counts[kind] += 1
        self.timeline.append(kind[0])
        utt.played = f + 1
        return self._record((frame, audio, kind), needed, generated)

    def clock_moved(self, delta_s: float) -> None:
        """The session clock moved ``delta_s`` (later: a stalled frame loop restarted it;
        earlier: a rephase): every planned frame plays that much later or earlier, so its
        deadline moves with it."""
        if self.host is not None and self.utterances:
            self.host.shift(self.session.id, None, delta_s)

    def _record(self, out: tuple[np.ndarray, np.ndarray, str], needed: bool, generated: bool):
        self._pending_record = (out[2], needed, generated)
        return out

    async def after_publish(self, tick: int, now: float) -> None:
        kind, needed, generated = self._pending_record
        wall = time.time()
        latency = None
        utt = self.utterances[0] if self.utterances else None
        if utt is not None and utt.started:
            played_to = self.clock.start(utt.played)  # samples published so far
            while utt.arrivals and utt.arrivals[0][0] < played_to:
                first_sample, arrived, sent = utt.arrivals.popleft()
                # Until the chunk's first sample plays: its frame's publication, plus
                # where in that frame's audio it lies.
                into_frame = (first_sample - self.clock.start(first_sample * self.fps // self.rate)) / self.rate
                latency = ((wall - sent) if sent is not None else (now - arrived)) + into_frame
                self.latencies.append(latency)
                self.session.deps.metrics.audio_to_frame_latency.observe(latency)
            if utt.flushed and utt.total_frames is not None and utt.played >= utt.total_frames:
                self._finish(utt)
        self.frame_records.append(wall, kind, needed, generated, latency)
        # One at a time, removed once sent: a cancelled frame loop leaves the rest to
        # the session's close (take_events).
        while self._events:
            await self.session.emit(self._events[0])
            self._events.pop(0)

    def _finish(self, utt: Utterance) -> None:
        if self.utterances and self.utterances[0] is utt:
            self.utterances.popleft()
        self._finished_starts[utt.id] = utt.start_tick
        while len(self._finished_starts) > 8:
            del self._finished_starts[next(iter(self._finished_starts))]
        self._set_speaking()
        self._cancel(utt.id)
        self._events.append(self.finished_event(self._position(utt, utt.total_frames or 0), interrupted=False))
        self.log.info("utterance finished", frames=utt.total_frames, underruns=utt.underruns,
                      counts=dict(self.counts))
        self._report_degraded(utt)

    def _report_degraded(self, utt: Utterance) -> None:
        """Once per utterance: when most of its frames showed the idle mouth, say so with
        the figures and what to change (a mouth that never moves looks like a broken
        daemon otherwise)."""
        if not utt.needed:
            return
        generated = utt.needed - utt.fallbacks
        self.session.deps.metrics.utterance_generated.observe(generated / utt.needed)
        if utt.fallbacks * 2 <= utt.needed:
            return
        device = self.host.device_info() if self.host is not None else {}
        rate = getattr(self.host, "one_session_fps", None)
        self.log.warning(
            f"{utt.fallbacks} of {utt.needed} speech frames of this utterance were not generated in time "
            f"and showed the idle mouth: this device ({device.get('device', '?')}) generates about "
            f"{rate if rate is not None else '?'} frames/s for one session, the session runs {self.fps} fps; "
            "start it with a lower video.fps, leave video.auto_fps on, or run on a GPU",
            needed=utt.needed, fallbacks=utt.fallbacks, fps=self.fps)

    def _position(self, utt: Utterance, frames: int) -> float:
        """Seconds of the utterance's own audio played after ``frames`` of its frames
        (its leading silence is not the producer's audio)."""
        return max(0.0, frames / self.fps - utt.lead / self.rate)

    def finished_event(self, utterance_s: float, interrupted: bool) -> PlaybackFinishedEvent:
        """playback_finished with both clocks: how much of the utterance played, and the
        session time at which it ended (the tick being published)."""
        played = round(utterance_s, 3)
        return PlaybackFinishedEvent(
            session_id=self.session.id, ts=time.time(), utterance_position_s=played,
            session_position_s=round(self.session.next_tick / self.fps - self.session.rephased_s, 3),
            position_s=played,
            interrupted=interrupted)

    def take_events(self) -> list[Any]:
        events, self._events = self._events, []
        return events

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.utterances.clear()
        self._set_speaking()
        if self.host is not None:
            self.host.close_stream(self.session.id)
            await self.host.release_avatar(self.avatar.key)

    def _cancel(self, utterance: int | None = None, before_frame: int | None = None) -> None:
        if self.host is not None:
            self.host.cancel(self.session.id, utterance, before_frame)

    def stats(self) -> dict[str, Any]:
        lat = sorted(self.latencies)
        pct = (lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1000, 1)) if lat else (lambda q: None)
        generated, wanted = self.frame_records.totals()
        return {"counts": dict(self.counts), "timeline": "".join(self.timeline),
                "generated_fraction": round(generated / wanted, 4) if wanted else None,
                "latency_ms": {"p50": pct(0.5), "p95": pct(0.95), "p99": pct(0.99), "n": len(lat)}}


async def make_speech(host: Any, session: Any) -> SpeechPipeline:
    """A session's speech pipeline on ``host`` (``EngineHost``, or ``GpuServerHost``
    when the model runs in its own process): the avatar of its video acquired first."""
    avatar, timings = await host.acquire_avatar(session.video, session.video_hash, session.log, session.video_url)
    return SpeechPipeline(session, host, avatar, timings)
