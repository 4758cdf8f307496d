"""One live session: owns its avatar reference, audio intake, publisher and frame loop.

Lifecycle: ``start()`` (resolve avatar -> fetch + decode -> publisher -> ``ready`` -> frame
loop) ... ``aclose(reason)`` (frame loop stopped, publisher closed, avatar released,
``stopped`` sent). The frame loop runs on a monotonic clock: frame n is due at
t0 + n / fps, so the rate never drifts however long the session runs. A loop more than
``STALL_PERIODS`` frames behind restarts its clock where it is (t0 moves), never bursting.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Protocol

import numpy as np

from daemon import errors
from daemon.audio_inbox import SEQ_HEADER, AudioInbox
from daemon.config import Settings
from daemon.errors import LipsyncError
from daemon.log import get_logger
from daemon.metrics import Metrics
from daemon.publishers.base import MediaFormat, Publisher
from schemas import (
    ControlMessage,
    ErrorEvent,
    ReadyEvent,
    SessionStart,
    StoppedEvent,
)

log = get_logger(__name__)

# Frames behind its clock at which the frame loop restarts the clock: one late frame is
# caught up at once; a stall beyond this is recovered from by the next tick.
STALL_PERIODS = 2

EmitEvent = Callable[[Any], Awaitable[None]]


class FrameSource(Protocol):
    """What the frame loop asks, once per tick, for the frame and audio to publish.

    The idle source answers from the avatar's own frames; the speech pipeline (when a
    model is loaded) answers with generated frames and the utterance's audio.
    """

    def frame_for_tick(self, tick: int) -> tuple[np.ndarray, np.ndarray, str]: ...


def pingpong_index(tick: int, num_frames: int) -> int:
    """0, 1, ..., N-1, N-2, ..., 1, 0, 1, ...: the idle video loops without a jump."""
    if num_frames <= 1:
        return 0
    period = 2 * num_frames - 2
    k = tick % period
    return k if k < num_frames else period - k


class AudioClock:
    """How many output samples belong to video frame n, with no rounding drift: frame n
    covers samples [floor(n*sr/fps), floor((n+1)*sr/fps))."""

    def __init__(self, sample_rate: int, fps: int) -> None:
        self.sample_rate = sample_rate
        self.fps = fps

    def start(self, n: int) -> int:
        return n * self.sample_rate // self.fps

    def samples(self, n: int) -> int:
        return self.start(n + 1) - self.start(n)


class IdleSource:
    """The avatar's own frames (I420, daemon.frames) in ping-pong order, with silence."""

    def __init__(self, frames_i420: np.ndarray, width: int, height: int, clock: AudioClock) -> None:
        self.frames = frames_i420  # read-only, shared with other sessions of the avatar
        self.width = width
        self.height = height
        self.clock = clock

    def avatar_index(self, tick: int) -> int:
        return pingpong_index(tick, int(self.frames.shape[0]))

    def frame(self, tick: int) -> np.ndarray:
        return self.frames[self.avatar_index(tick)]

    def frame_for_tick(self, tick: int) -> tuple[np.ndarray, np.ndarray, str]:
        return self.frame(tick), np.zeros(self.clock.samples(tick), np.int16), "idle"


@dataclass
class SessionDeps:
    settings: Settings
    metrics: Metrics
    emit: EmitEvent
    resolve_url: Callable[[str | None, str | None], Awaitable[str]]
    acquire_video: Callable[[str], Awaitable[tuple[Any, str]]]
    release_video: Callable[[str], None]
    # (session id, format, LiveKit room, identity, orchestrator's token) -> publisher
    make_publisher: Callable[[str, MediaFormat, str | None, str | None, str | None], Publisher]
    # Called when the session must end on its own (frame loop failure): the daemon owns
    # sessions, so it does the closing, as a tracked task.
    on_fatal: Callable[["Session", str], None] = lambda session, reason: None
    # Builds the speech pipeline for a session (daemon.speech); None = idle only.
    make_speech: Callable[["Session"], Awaitable[Any]] | None = None
    # The frame rate of a session whose start message gives none (video.auto_fps).
    default_fps: Callable[[], int] | None = None


@dataclass
class SessionInfo:
    width: int
    height: int
    fps: int
    output: dict[str, Any]
    timings_ms: dict[str, float] = field(default_factory=dict)


class Session:
    def __init__(self, request: SessionStart, deps: SessionDeps) -> None:
        self.id = request.session_id
        self.request = request
        self.deps = deps
        self.settings = deps.settings
        self.log = log.bind(session_id=self.id)
        self.fps = request.video.fps or (deps.default_fps() if deps.default_fps else self.settings.video.fps)
        self.sample_rate = request.audio.sample_rate
        self.inbox = AudioInbox(
            self.sample_rate,
            self.settings.audio.max_buffer_s,
            self.settings.nats.max_audio_message_bytes,
        )
        self.info: SessionInfo | None = None
        self.started_at = time.monotonic()
        self.tick = 0
        self.last_tick_at = time.monotonic()
        self.late_ticks = 0
        self.clock_restarts = 0  # stalls the frame loop recovered from by moving its clock
        self.restart_log: deque[tuple[float, float]] = deque(maxlen=256)  # (monotonic, behind s)
        self.rephases = 0  # clock moves earlier so that speech starts on a tick (rephase)
        self.rephased_s = 0.0  # their total: the media timeline is this much behind tick / fps
        self._rephase_s = 0.0  # requested, applied at the next idle tick
        self.frame_counts: dict[str, int] = {}
        self._publisher: Publisher | None = None
        self._video_hash: str | None = None
        self._loop_task: asyncio.Task[None] | None = None
        self._closed = False
        self._close_lock = asyncio.Lock()
        self._close_task: asyncio.Task[None] | None = None
        self._pending_controls: list[ControlMessage] = []
        self.publishing = False
        self.idle: IdleSource | None = None
        self.speech: Any = None  # the speech pipeline (daemon.speech), when a model is loaded
        self.clock = AudioClock(self.sample_rate, self.fps)
        self.video = None
        self.video_url: str | None = None
        self.t0 = time.monotonic()

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> SessionInfo:
        t0 = time.perf_counter()
        timings: dict[str, float] = {}
        try:
            url = await self.deps.resolve_url(self.request.avatar_id, self.request.idle_video_url)
            self.video_url = url
            timings["resolve_ms"] = _ms_since(t0)
            t = time.perf_counter()
            video, content_hash = await self.deps.acquire_video(url)
            self._video_hash = content_hash
            self.video = video
            timings["video_ms"] = _ms_since(t)
            self.idle = IdleSource(video.i420, video.width, video.height, self.clock)
            if self.deps.make_speech is not None:
                t = time.perf_counter()
                self.speech = await self.deps.make_speech(self)
                timings["model_ms"] = _ms_since(t)
                timings.update(self.speech.timings)
            else:
                from daemon.speech import SpeechPipeline

                self.speech = SpeechPipeline(self, None, None, {})
            fmt = MediaFormat(video.width, video.height, self.fps, self.sample_rate)
            lk = self.request.livekit
            publisher = self.deps.make_publisher(
                self.id, fmt, lk.room if lk else None, lk.identity if lk else None, lk.token if lk else None
            )
            self._publisher = publisher
            t = time.perf_counter()
            output = await publisher.start()
            timings["publisher_ms"] = _ms_since(t)
        except BaseException:
            await self._release()
            raise
        timings["total_ms"] = _ms_since(t0)
        self.info = SessionInfo(video.width, video.height, self.fps, output, timings)
        self.deps.metrics.start_to_ready.observe(timings["total_ms"] / 1000)
        # The frame clock starts now: frames submitted from here on get real deadlines.
        self.t0 = time.monotonic()
        self.tick = 0
        self._loop_task = asyncio.create_task(self._frame_loop(), name=f"frames-{self.id}")
        if self.speech is not None:
            self.speech.on_audio(self.inbox.pop_all())  # audio that came during start
            for ctl in self._pending_controls:  # ...and the controls sent after it
                self.control(ctl)
            self._pending_controls.clear()
        await self.emit(
            ReadyEvent(
                session_id=self.id, ts=time.time(), width=video.width, height=video.height,
                fps=self.fps, output=output, timings_ms=timings,
            )
        )
        self.log.info("session ready", **timings, output=output)
        return self.info

    async def aclose(self, reason: str) -> None:
        """Stop the frame loop, close the publisher, release the avatar, send ``stopped``.
        Safe to call twice and from any task; once begun, the close finishes even if the
        caller is cancelled."""
        if self._close_task is None:
            self._close_task = asyncio.get_running_loop().create_task(self._close(reason), name=f"close-{self.id}")
        await asyncio.shield(self._close_task)

    async def _close(self, reason: str) -> None:
        async with self._close_lock:
            if self._closed:
                return
            self._closed = True
            task = self._loop_task
            if task is not None and task is not asyncio.current_task():
                task.cancel()
                try:
                    await task
                except asyncio.CancelledError:
                    pass
                except Exception:
                    self.log.exception("frame loop failed while closing")
            if self.speech is not None:
                for event in self.speech.take_events():  # e.g. a clear just before the stop
                    await self.emit(event)
                position, interrupted = self.speech.abort()
                if interrupted:
                    await self.emit(self.speech.finished_event(position, interrupted=True))
            await self._release()
            await self.emit(StoppedEvent(session_id=self.id, ts=time.time(), reason=reason))
            self.log.info("session stopped", reason=reason, frames=self.frame_counts,
                          seconds=round(time.monotonic() - self.started_at, 2))

    async def _release(self) -> None:
        publisher, self._publisher = self._publisher, None
        if publisher is not None:
            try:
                await publisher.aclose()
            except Exception:
                self.log.exception("publisher close failed")
        if self.speech is not None:
            try:
                await self.speech.aclose()
            except Exception:
                self.log.exception("speech pipeline close failed")
        if self._video_hash is not None:
            self.deps.release_video(self._video_hash)
            self._video_hash = None

    @property
    def video_hash(self) -> str | None:
        return self._video_hash

    @property
    def next_tick(self) -> int:
        """The first tick not yet being published."""
        return self.tick + 1 if self.publishing else self.tick

    def tick_time(self, tick: int) -> float:
        """Monotonic time at which frame ``tick`` is due."""
        return self.t0 + tick / self.fps

    @property
    def can_rephase(self) -> bool:
        """Whether the clock may move earlier (the sink keeps each frame's timestamp)."""
        return bool(getattr(self._publisher, "variable_frame_interval", False))

    def rephase(self, earlier_s: float) -> None:
        """Move the frame clock ``earlier_s`` (less than a frame) earlier at the next idle
        tick, whose silence is cut by as much: speech placed between two ticks then starts
        on a tick exactly at its due time, and the audio stays continuous (one video frame
        interval is that much shorter). Speech waiting for the next tick would play up to a
        frame late; silence before it instead (a lead) would take that time from the
        frames' processing, since chunked audio arrives no earlier for it."""
        if not 0 <= earlier_s < 1 / self.fps:
            raise ValueError(f"a rephase moves the clock by less than a frame, not {earlier_s} s")
        self._rephase_s = earlier_s

    @property
    def close_task(self) -> "asyncio.Task[None] | None":
        return self._close_task

    @property
    def closed(self) -> bool:
        return self._closed

    def loop_alive(self, stall_s: float = 2.0) -> bool:
        return (
            self._loop_task is not None
            and not self._loop_task.done()
            and time.monotonic() - self.last_tick_at < stall_s
        )

    @property
    def publisher(self) -> Publisher | None:
        return self._publisher

    @property
    def publisher_healthy(self) -> bool:
        return self._publisher is not None and self._publisher.healthy

    # ---- input -----------------------------------------------------------------------
    def feed_audio(self, data: bytes, headers: dict[str, str] | None) -> LipsyncError | None:
        """From the NATS callback: validate + enqueue, or raise LipsyncError. Returns a
        warning for the producer when the chunk was taken but audio before it was lost."""
        queued = self.speech.pending_samples() if self.speech is not None else 0
        gaps = self.inbox.accept(data, headers, time.monotonic(), queued_elsewhere=queued)
        self.deps.metrics.audio_bytes.inc(len(data))
        if gaps:
            self.deps.metrics.audio_gaps.inc(gaps)
            self.log.warning("audio gap filled with silence", missing_messages=gaps,
                             total_gap_messages=self.inbox.gap_messages)
        if self.speech is not None and self._loop_task is not None:
            self.speech.on_audio(self.inbox.pop_all())
        if self.inbox.resync is not None:
            last, seq = self.inbox.resync
            return LipsyncError(errors.AUDIO_GAP, f"{SEQ_HEADER} jumped from {last} to {seq}: over 0.5 s of "
                                "audio missing, not filled; playback continues from this chunk")
        return None

    def control(self, msg: ControlMessage) -> None:
        if self.speech is None or self._loop_task is None:
            # Still starting: keep the op, in order after the audio already buffered.
            if msg.op == "clear":
                self.inbox.clear()
                self._pending_controls.clear()
            self._pending_controls.append(msg)
            return
        if msg.op == "flush":
            self.speech.flush()
            self.inbox.last_seq = None  # the next utterance may number its chunks afresh
        else:
            self.speech.clear()
            self.inbox.clear()
            if self._publisher is not None:
                self._publisher.drop_queued()  # the SDK's queued audio of the cut utterance too

    async def emit(self, event: Any) -> None:
        await self.deps.emit(event)

    async def emit_error(self, code: str, message: str) -> None:
        self.deps.metrics.errors.labels(code).inc()
        await self.emit(ErrorEvent(session_id=self.id, ts=time.time(), code=code, message=message))

    # ---- output ----------------------------------------------------------------------
    def _source(self) -> FrameSource:
        assert self.idle is not None
        return self.speech if self.speech is not None else self.idle

    async def _frame_loop(self) -> None:
        period = 1.0 / self.fps
        t0 = self.t0
        try:
            while True:
                due = t0 + self.tick * period
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                elif delay < -period:
                    self.late_ticks += 1
                    self.deps.metrics.frames_late.inc()
                    if delay < -STALL_PERIODS * period:
                        # Stalled (a blocked loop, a suspended box): restart the clock
                        # here instead of bursting out the missed frames. A burst would
                        # run ahead of the audio still waiting in the NATS callbacks
                        # (each tick an underrun: speech slides for good) and of the
                        # SDK's paced queues. Lips and voice stay together (both follow
                        # the tick); planned frames move their deadlines with the clock.
                        behind = -delay
                        t0 = self.t0 = t0 + behind
                        self.clock_restarts += 1
                        self.restart_log.append((time.monotonic(), behind))
                        self.log.warning("frame loop stalled; clock restarted", behind_ms=round(behind * 1000, 1))
                        if self.speech is not None:
                            self.speech.clock_moved(behind)
                frame, audio, kind = self._source().frame_for_tick(self.tick)
                earlier = 0.0
                if self._rephase_s:
                    if kind == "idle":  # only silence is cut
                        cut = min(audio.size, round(self._rephase_s * self.sample_rate))
                        audio, earlier = audio[:audio.size - cut], cut / self.sample_rate
                    self._rephase_s = 0.0
                publisher = self._publisher
                if publisher is None:
                    return
                self.publishing = True
                # Explicit, strictly increasing capture times on the session clock.
                await publisher.push(frame, audio, timestamp_us=max(1, round(self.tick_time(self.tick) * 1e6)))
                self.frame_counts[kind] = self.frame_counts.get(kind, 0) + 1
                self.deps.metrics.frames_published.labels(kind).inc()
                if self.speech is not None:
                    await self.speech.after_publish(self.tick, time.monotonic())
                self.last_tick_at = time.monotonic()
                self.tick += 1
                if earlier:
                    t0 = self.t0 = t0 - earlier
                    self.rephases += 1
                    self.rephased_s += earlier
                    if self.speech is not None:
                        self.speech.clock_moved(-earlier)
                self.publishing = False
        except asyncio.CancelledError:
            raise
        except LipsyncError as exc:
            self.log.error("frame loop stopped", code=exc.code, error=exc.message)
            await self.emit_error(exc.code, exc.message)
            self.deps.on_fatal(self, "error")
        except Exception as exc:
            self.log.exception("frame loop crashed")
            await self.emit_error(errors.INTERNAL, f"frame loop failed: {exc}")
            self.deps.on_fatal(self, "error")

    def status(self) -> dict[str, Any]:
        return {
            "session_id": self.id,
            "fps": self.fps,
            "sample_rate": self.sample_rate,
            "frames": dict(self.frame_counts),
            "late_ticks": self.late_ticks,
            "clock_restarts": self.clock_restarts,
            "rephases": self.rephases,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "output": self.info.output if self.info else None,
            "speaking": bool(self.speech and self.speech.speaking),
            "audio_gap_messages": self.inbox.gap_messages,
            **({"speech": self.speech.stats()} if self.speech is not None else {}),
        }


def _ms_since(t: float) -> float:
    return round((time.perf_counter() - t) * 1000, 1)
