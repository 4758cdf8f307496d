"""The generation worker: one thread that owns every GPU call and runs a loop of rounds.

One round: apply the sessions' messages in order (audio, flush, frame plans, cancels) ->
one batched whisper call for every session with a newly computable frame (its tokens
stay on the device, ``musetalk.audio_gpu``) -> frames whose tokens and plan are both
there join the scheduler -> launch a step when the batch is full or the most urgent
frame cannot wait any longer -> hand back the steps that finished. Launching never
waits for the device: a step's boxes are copied out on a copy stream while the worker
prepares the next round; at most two steps are in flight.

The event loop talks to the worker only through ``post`` (messages, applied between
rounds) and receives finished frames through ``loop.call_soon_threadsafe``: features and
tokens never leave the device, and no frame waits for an event-loop round trip before
it can be batched.

A frame's *plan* comes from its session (which avatar frame it is pasted on, how
strongly the mouth is blended, when it is due); its *tokens* from the audio streams.
Frames with blend 0 are planned too (so the worker knows they are done) but never
generated.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import statistics
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator

import numpy as np

from daemon import errors
from daemon.errors import LipsyncError
from daemon.log import get_logger
from daemon.scheduler import BatchScheduler, PendingFrame, batch_cap, batch_wait

log = get_logger(__name__)

# Time between a step's end and its frame's tick that delivery needs (copy-out wait,
# the event loop's callback, composing the frame).
DELIVERY_MARGIN_S = 0.004
MAX_IN_FLIGHT = 2
# drop_before: the share of a step's estimate a frame must have left when the GPU is idle,
# and how far ahead the GPU must be booked to count as busy.
IDLE_DROP_FRACTION = 0.75
BUSY_SLACK_S = 0.001
# ... and while it is booked ahead (model.busy_drop_fraction): a whole step, so that a
# saturated GPU does not spend steps on frames that would end after their ticks.
BUSY_DROP_FRACTION = 1.0
# ``fill_steps``: a step that is not full waits while the GPU stays busy for longer than
# its host launch (the median of its bucket's recent launch calls, this until measured)
# plus a wake-up of the worker's loop.
FILL_LAUNCH_S = 0.006
FILL_WAKE_S = 0.004
# Every this many steps one records its stages' device times (CUDA events, read when the
# step is done: no wait); the last STAGE_SAMPLES per bucket give ``stage_figures``.
STAGE_SAMPLE_EVERY = 20
STAGE_SAMPLES = 64


@dataclass(frozen=True)
class FramePlan:
    utterance: int
    frame: int
    avatar_key: str
    avatar_index: int
    blend: float
    deadline: float  # monotonic time by which the frame must be generated


@dataclass(frozen=True)
class FrameJob:
    """What the scheduler holds for a frame ready to generate."""

    stream: "_Stream"
    voice: "_Voice"
    plan: FramePlan
    token_row: int


# The callback a session gets results through, on the event loop:
# on_result([(utterance, frame, box or None, error or None), ...]).
OnResult = Callable[[list[tuple[int, int, Any, BaseException | None]]], None]


@dataclass
class _Voice:
    """One utterance's audio slot. A session alternates two, so that the next utterance's
    audio never overwrites tokens of the one still finishing."""

    slot: int
    utterance: int | None = None
    flushed: bool = False
    plans: dict[int, FramePlan] = field(default_factory=dict)  # frame -> plan, tokens not yet made
    tokens: dict[int, int] = field(default_factory=dict)  # frame -> token row, not yet planned
    parked: list[tuple[float, int]] = field(default_factory=list)  # (deadline, frame) beyond the horizon
    outstanding: set[int] = field(default_factory=set)  # frames with tokens not yet consumed
    done_below: int = 0  # every frame below this one is launched, dropped or not needed

    def reset(self, utterance: int | None) -> None:
        self.utterance, self.flushed = utterance, False
        self.plans.clear()
        self.tokens.clear()
        self.parked.clear()
        self.outstanding.clear()
        self.done_below = 0


@dataclass
class _Stream:
    session_id: str
    fps: int
    on_result: OnResult
    streams: Any  # musetalk.audio_gpu.GpuAudioStreams of this fps
    voices: tuple[_Voice, _Voice]
    closed: bool = False
    served: int = 0  # frames launched for it (breaks deadline ties fairly)

    def voice(self, utterance: int) -> _Voice:
        return self.voices[utterance % 2]


def budget_from_parts(parts: dict[str, float]) -> float:
    """Seconds of a processing budget from its terms (``processing_budget_parts``): the
    wait for a round, the round, two steps, the delivery margin, the queueing term."""
    return (parts["round_interval_ms"] + parts["round_ms"] + 2 * parts["step_ms"] + parts["margin_ms"]
            + parts.get("queue_ms", 0.0)) / 1000


def queue_ms(base_ms: float, step_ms: float, load: float, most_ms: float | None) -> float:
    """The budget's queueing term: the wait beyond the one step ``base_ms`` already counts
    that a frame can expect at ``load`` (the GPU's busy share the open sessions plan for),
    by M/D/1 (fixed service times): load / (2 (1 - load)) steps; the whole budget goes no
    higher than ``most_ms`` (None: no term). A fuller GPU fills a step with frames whose
    deadlines lie further out, so more slack means fuller steps: on an H100 at 24 sessions
    a budget of 88 ms ran 15.79 frames a step against 14.7 at the parts' 83.6-85.0 ms,
    and every session kept >= 99.78 % against 98.59 % (docs/BENCHMARKS.md, nineteenth
    session)."""
    if most_ms is None or most_ms <= base_ms:
        return 0.0
    if load >= 1.0:
        return most_ms - base_ms
    steps = max(0.0, load / (2 * (1 - load)) - 1)
    return min(most_ms - base_ms, steps * step_ms)


class _Estimates:
    """Step time per bucket (median of recent GPU times), audio round time, busy time."""

    def __init__(self, initial_ms: dict[int, float]) -> None:
        # Seeded three deep: one slow first step or round moves the median little.
        self._steps: dict[int, deque[float]] = {b: deque([ms / 1000] * 3, maxlen=9) for b, ms in initial_ms.items()}
        self._round: deque[float] = deque([0.002] * 3, maxlen=9)
        # The rounds' device time (CUDA events): with the encoder graphed, a round's host
        # launch is shorter than its GPU work, which frames queued after it also wait for.
        self._round_device: deque[float] = deque(maxlen=9)
        self._busy: deque[tuple[float, float]] = deque()
        self.step_s_total = 0.0

    def step(self, bucket: int) -> float:
        """Expected device time of a step at ``bucket``: its own recent median, else the
        next larger measured bucket's (an upper bound), else scaled from the largest."""
        known = self._steps.get(bucket)
        if known:
            return statistics.median(known)
        if not self._steps:
            return 0.01
        larger = [b for b in self._steps if b > bucket]
        if larger:
            return statistics.median(self._steps[min(larger)])
        top = max(self._steps)
        return statistics.median(self._steps[top]) * bucket / top

    def add_step(self, bucket: int, seconds: float, now: float) -> None:
        self._steps.setdefault(bucket, deque(maxlen=9)).append(seconds)
        self.step_s_total += seconds
        self._busy.append((now, seconds))
        while self._busy and now - self._busy[0][0] > 10.0:
            self._busy.popleft()

    def add_round_device(self, seconds: float) -> None:
        self._round_device.append(seconds)

    def round_device(self) -> float:
        """A round's expected device time: the median of recent rounds' CUDA events, else
        (none measured yet) its host time."""
        return statistics.median(self._round_device) if self._round_device else statistics.median(self._round)

    def round(self) -> float:
        """A round's cost to the frames after it: the longer of its host time (this
        thread) and its device time (the GPU queue), medians of recent rounds."""
        host = statistics.median(self._round)
        return max(host, statistics.median(self._round_device)) if self._round_device else host

    def snapshot(self) -> dict[str, Any]:
        """The current estimates in ms (for reports): audio round, step per bucket."""
        return {"round_ms": round(1000 * self.round(), 2),
                "round_host_ms": round(1000 * statistics.median(list(self._round)), 2),
                "round_device_ms": (round(1000 * statistics.median(list(self._round_device)), 2)
                                    if self._round_device else None),
                "step_ms": {b: round(1000 * statistics.median(list(d)), 2) for b, d in sorted(self._steps.items()) if d}}

    def add_round(self, seconds: float) -> None:
        self._round.append(seconds)

    def seed_steps(self, ms_by_bucket: dict[int, float]) -> None:
        for b, ms in ms_by_bucket.items():
            self._steps[b] = deque([ms / 1000] * 3, maxlen=9)

    def seed_round(self, seconds: float) -> None:
        self._round.clear()
        self._round.extend([seconds] * 3)

    def busy_fraction(self, now: float) -> float | None:
        if not self._busy:
            return 0.0
        span = min(10.0, max(1e-3, now - self._busy[0][0] + self._busy[0][1]))
        return min(1.0, sum(s for _, s in self._busy) / span)


def _served(item: PendingFrame) -> int:
    """A pending frame's rank among equally urgent ones: its session's frames served so
    far (now, not when the frame was queued: a whole utterance is often queued at once)."""
    return item.job.stream.served


class GenerationWorker:
    """See the module docstring. ``engine`` is a musetalk.engine.Engine; ``make_streams(fps)``
    builds the GpuAudioStreams for a frame rate (one per rate in use)."""

    def __init__(self, engine: Any, make_streams: Callable[[int], Any], loop: asyncio.AbstractEventLoop,
                 metrics: Any, *, max_batch: int, horizon_s: float, initial_step_ms: dict[int, float] | None = None,
                 round_interval_s: float = 0.0, batch_utilization: float | None = None,
                 fill_steps: bool = False, fill_lead_s: float | None = None,
                 busy_drop_fraction: float = BUSY_DROP_FRACTION, budget_most_s: float | None = None) -> None:
        self.engine = engine
        self._make_streams = make_streams
        self._streams_by_fps: dict[int, Any] = {}
        self._loop = loop
        self.metrics = metrics
        self.max_batch = max_batch
        self.horizon_s = horizon_s
        self.round_interval_s = round_interval_s
        # None: every step takes up to max_batch frames; else batches are sized to the
        # demand (scheduler.batch_cap) at this share of the GPU.
        self.batch_utilization = batch_utilization
        self.fill_steps = fill_steps
        self.fill_lead_s = fill_lead_s  # None: the bucket's launch time + FILL_WAKE_S
        self.busy_drop_fraction = busy_drop_fraction  # see drop_before
        self.budget_most_s = budget_most_s  # the budget's queueing term stops here (queue_ms)
        self.demand_fps = 0.0  # the frame rates of the open sessions, summed
        self._cap: tuple[float, float, int] = (-1.0, 0.0, max_batch)  # (demand, when, cap)
        self.est = _Estimates(initial_step_ms or {})
        self.scheduler = BatchScheduler()
        self._cv = threading.Condition()
        self._inbox: list[tuple[Any, ...]] = []
        self._batch: list[tuple[Any, ...]] | None = None  # ``batched``: this burst's messages
        self._batch_thread = 0
        self._sessions: dict[str, _Stream] = {}
        self._in_flight: deque[tuple[Any, list[PendingFrame], int, float]] = deque()
        # When the GPU is expected to have done what is queued on the worker's stream: the
        # steps in flight and the audio rounds launched between them (a graphed round's
        # host launch ends before its GPU work). Frames are judged against it at launch.
        # The queue holds each piece's estimate in launch order (a step's key, or None for
        # a round); a step seen done re-bases the expectation on what is still queued, so
        # estimates that run long never add up over a busy stretch.
        self._gpu_free_at = 0.0
        self._gpu_queue: deque[tuple[int | None, float]] = deque(maxlen=64)
        self._round_events: deque[tuple[Any, Any]] = deque(maxlen=64)  # (start, end) CUDA events of rounds
        self._stop = False
        self._thread: threading.Thread | None = None
        self.steps = 0
        self.frames_generated = 0
        self.frames_dropped_late = 0
        self.frames_done_late = 0  # generated, but their step was seen done after their deadline
        self.step_failures = 0
        self.warmup_ms: dict[int, float] = {}
        self.audio_warmup_ms: dict[int, float] = {}  # encoder ms per batch bucket
        self.warm_error: BaseException | None = None
        self.audio_rounds = 0
        self.audio_round_s = 0.0
        self._rows_freed = False
        self.audio_round_failures = 0
        # Per bucket: the stage ms of sampled steps, and the host ms of each launch call.
        self._stage_samples: dict[int, deque[dict[str, float]]] = {}
        self._launch_host_s: dict[int, deque[float]] = {}
        self._launch_queue_s: dict[int, deque[float]] = {}  # launch call to its UNet queued
        # Test hook and fault injection point: replaces the engine's launch for a batch.
        self.step_fn: Callable[[list[PendingFrame]], Any] | None = None

    # ---- the event loop's side (any thread) --------------------------------------------
    def post(self, *message: Any) -> None:
        batch = self._batch
        if batch is not None and threading.get_ident() == self._batch_thread:
            batch.append(message)
            return
        with self._cv:
            self._inbox.append(message)
            self._cv.notify()

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Messages this thread posts inside the block reach the worker together, on
        leaving it: one lock and one wake-up for a burst (the GPU server's inbox pump)
        instead of one per message, each of which could make it wait for the worker's
        hold on the GIL."""
        if self._batch is not None:  # nested: the outer block hands them over
            yield
            return
        self._batch, self._batch_thread = [], threading.get_ident()
        try:
            yield
        finally:
            batch, self._batch = self._batch, None
            if batch:
                with self._cv:
                    self._inbox.extend(batch)
                    self._cv.notify()

    def call(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn`` on the worker thread between rounds; the future settles on the loop."""
        fut: asyncio.Future[Any] = self._loop.create_future()
        self.post("call", fn, fut)
        return fut

    def start(self, name: str = "lipsync-gpu", warm_fps: int | None = None,
              warm_engine: Callable[[], dict[int, float]] | None = None) -> threading.Event:
        """Start the thread. Before its first round it runs ``warm_engine`` (compilation
        and CUDA-graph recording belong to the thread that replays them) and, with
        ``warm_fps``, builds that rate's audio streams and times an audio round (first
        calls are slow; the estimates then start right). The returned event is set when
        that is done (``warm_error`` holds what failed, if anything)."""
        warmed = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(warm_engine, warm_fps, warmed), name=name,
                                        daemon=True)
        self._thread.start()
        return warmed

    def audio_encoder_info(self) -> dict[str, Any]:
        """Per frame rate in use: the audio streams' encoder graphs (GpuAudioStreams.encoder_info)."""
        return {str(fps): streams.encoder_info() for fps, streams in list(self._streams_by_fps.items())}

    def _warm_audio(self, fps: int) -> float:
        import torch

        streams = self._streams_by_fps.get(fps)
        if streams is None:
            streams = self._streams_by_fps[fps] = self._make_streams(fps)
        self.audio_warmup_ms = streams.warm()
        slot = streams.open()
        noise = (0.1 * np.random.default_rng(0).standard_normal(16000 // 2)).astype(np.float32)
        elapsed = 0.0
        try:
            for part in (noise[:4000], noise[4000:]):  # the second round is the one timed
                streams.push(slot, part)
                t = time.perf_counter()
                with torch.inference_mode():
                    for _, first, count in streams.round():
                        streams.consumed(slot, first + count)
                if self.engine.device.type == "cuda":
                    torch.cuda.synchronize(self.engine.device)
                elapsed = time.perf_counter() - t
        finally:
            streams.close(slot)
        return elapsed

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> threading.Thread | None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        return self._thread

    @property
    def open_streams(self) -> int:
        """Sessions the worker has open (read from the event loop: a length, no lock)."""
        return len(self._sessions)

    @property
    def pending_frames(self) -> int:
        return len(self.scheduler)

    def busy_fraction(self) -> float | None:
        return self.est.busy_fraction(time.monotonic())

    def stage_figures(self) -> dict[str, dict[str, float]]:
        """Per bucket: the median device ms of each stage of the sampled steps, the same
        per frame, the median host ms of a launch call (the worker thread's Python and
        kernel launches for a step) and of its part before the UNet's work is queued.
        Read from any thread (a snapshot of deques)."""
        out: dict[str, dict[str, float]] = {}
        for size in sorted(set(self._stage_samples) | set(self._launch_host_s)):
            figures: dict[str, float] = {}
            samples = list(self._stage_samples.get(size, ()))
            if samples:
                figures["samples"] = len(samples)
                for name in samples[0]:
                    ms = statistics.median(s[name] for s in samples)
                    figures[f"{name}_ms"] = round(ms, 3)
                    figures[f"{name}_ms_per_frame"] = round(ms / size, 3)
            host = list(self._launch_host_s.get(size, ()))
            if host:
                figures["launch_host_ms"] = round(1000 * statistics.median(host), 3)
            queued = list(self._launch_queue_s.get(size, ()))
            if queued:  # from the launch call to its UNet's work queued: a fill lead's floor
                figures["launch_queue_ms"] = round(1000 * statistics.median(queued), 3)
            out[str(size)] = figures
        return out

    def batch_cap_for(self, demand_fps: float) -> int:
        """The batch a step fills before it launches, at this demand (frames/s)."""
        sizes = [b for b in self.engine.bucket_sizes if b <= self.max_batch]
        if self.batch_utilization is None or not sizes:
            return self.max_batch  # an eager CPU engine runs any size: no buckets to choose from
        return batch_cap(demand_fps, sizes, self.est.step, self.batch_utilization)

    def batch_cap(self) -> int:
        """``batch_cap_for`` the open sessions, recomputed when they change or every 0.5 s
        (the step estimates move)."""
        demand, when, cap = self._cap
        now = time.monotonic()
        if demand != self.demand_fps or now - when > 0.5:
            cap = self.batch_cap_for(self.demand_fps)
            self._cap = (self.demand_fps, now, cap)
        return cap

    def processing_budget_s(self, sessions: int, demand_fps: float | None = None) -> float:
        """How long after a frame's audio context is complete its generated frame can be
        expected, with ``sessions`` open (``demand_fps`` their frame rates): the wait for
        its round (at most the round interval), the round, the step then on the GPU (the
        batching wait keeps about one queued), its own step (a frame of every session, up
        to the batch the demand sizes), a margin for delivery, and under load the wait
        for the steps queued before (``queue_ms``, up to ``budget_most_s``)."""
        return budget_from_parts(self.processing_budget_parts(sessions, demand_fps))

    def processing_budget_parts(self, sessions: int, demand_fps: float | None = None) -> dict[str, float]:
        """``processing_budget_s``'s terms in ms, and what chose them (the load it planned
        for, the batch cap and bucket whose step estimate it took): placements record
        them, so that a budget far from the steps measured can be traced."""
        demand = demand_fps if demand_fps is not None else self.demand_fps
        cap = self.batch_cap_for(demand)
        frames = max(1, min(cap, sessions))
        bucket = self.engine.bucket(frames)
        step_s = self.est.step(bucket)
        parts = {"round_interval_ms": 1000 * self.round_interval_s, "round_ms": 1000 * self.est.round(),
                 "step_ms": 1000 * step_s, "margin_ms": 10.0}
        # The GPU's busy share at this load: steps of ``frames`` at the demand, and the
        # audio rounds (one each interval under load; a chunk's 40 ms without one).
        load = demand / frames * step_s + self.est.round_device() / (self.round_interval_s or 0.040)
        # Only once the demand needs the largest batch: below it a larger step takes the
        # load (the cap moves up as the GPU fills), and the budgets measured there met the
        # SLO without the term; at the top the queue is the only slack left.
        most_ms = 1000 * self.budget_most_s if self.budget_most_s is not None and cap >= self.max_batch else None
        parts["queue_ms"] = queue_ms(1000 * budget_from_parts(parts), parts["step_ms"], load, most_ms)
        return {**parts, "load": round(load, 3), "sessions": sessions, "demand_fps": demand, "cap": cap,
                "bucket": bucket}

    # ---- the worker thread -------------------------------------------------------------
    def _run(self, warm_engine: Callable[[], dict[int, float]] | None, warm_fps: int | None,
             warmed: threading.Event) -> None:
        import torch

        try:
            if self.engine.device.type == "cuda":
                # Live steps on a high-priority stream: avatar preparation (its own
                # low-priority stream) never delays them.
                torch.cuda.set_stream(torch.cuda.Stream(self.engine.device, priority=-1))
            if warm_engine is not None:
                self.warmup_ms = warm_engine()
                # Seeded with the steps' device times where the warm-up has them: live
                # steps add theirs (``gpu_seconds``), while the warm-up's host times also
                # hold a launch and a wait (8 % more at 24 frames on an H100), which kept
                # the buckets no step had used yet (the planner's choice, the first
                # placements' budgets) that much too slow.
                self.est.seed_steps(getattr(self.engine, "warmup_device_ms", None) or self.warmup_ms)
            if warm_fps is not None:
                self.est.seed_round(self._warm_audio(warm_fps))
        except BaseException as exc:
            self.warm_error = exc
            warmed.set()
            log.exception("generation worker failed to warm up")
            return
        warmed.set()
        try:
            with torch.inference_mode():
                self._loop_rounds()
        except BaseException:
            log.exception("generation worker crashed")
            raise

    def _loop_rounds(self) -> None:
        # Audio is due when new audio came, the last round made frames (it may have left
        # more: a slot's next segment starts in the following round), or ring rows were
        # freed. Rounds run at most every round_interval_s: sessions' chunks arriving
        # meanwhile share one encoder batch (a round costs milliseconds of this thread
        # whatever its size; one per chunk would leave no time for steps).
        audio_due = False
        next_round_at = 0.0
        while True:
            with self._cv:
                if self._stop:
                    break
                messages, self._inbox = self._inbox, []
            audio_due |= self._apply(messages) | self._rows_freed
            self._rows_freed = False
            now = time.monotonic()
            if audio_due and now >= next_round_at:
                try:
                    audio_due = self._audio_round()
                except Exception as exc:  # the worker goes on: frames waiting for it fall back
                    self.step_failures += 1
                    self.audio_round_failures += 1
                    log.error("audio round failed", error=repr(exc))
                    audio_due = False
                next_round_at = now + self.round_interval_s
                now = time.monotonic()
            self._unpark(now)
            self._collect(block=len(self._in_flight) >= MAX_IN_FLIGHT)
            wait = self._launch_or_wait(now)
            if audio_due or self._rows_freed:
                wait = min(wait, max(0.0, next_round_at - time.monotonic()))
            if wait > 0:
                with self._cv:
                    if not self._inbox and not self._stop:
                        self._cv.wait(timeout=wait)
        self._shutdown()

    def _shutdown(self) -> None:
        stopped = LipsyncError(errors.SHUTTING_DOWN, "model worker stopped")
        with self._cv:
            messages, self._inbox = self._inbox, []
        for message in messages:
            if message[0] == "call":
                self._settle(message[2], None, stopped)
        while self._in_flight:
            self._collect(block=True)

    # ---- messages ----------------------------------------------------------------------
    def _apply(self, messages: list[tuple[Any, ...]]) -> bool:
        dirty = False
        for message in messages:
            kind = message[0]
            if kind == "call":
                _, fn, fut = message
                try:
                    self._settle(fut, fn(), None)
                except BaseException as exc:  # delivered to the awaiting task, which logs it
                    self._settle(fut, None, exc)
                continue
            st = self._sessions.get(message[1])
            if kind == "open":
                _, sid, fps, on_result = message
                streams = self._streams_by_fps.get(fps)
                if streams is None:
                    streams = self._streams_by_fps[fps] = self._make_streams(fps)
                self._sessions[sid] = _Stream(sid, fps, on_result, streams,
                                              (_Voice(streams.open()), _Voice(streams.open())))
                self._demand_changed()
            elif st is None:
                continue  # closed meanwhile
            elif kind == "audio":
                _, _, utterance, pcm16k = message
                voice = st.voice(utterance)
                if voice.utterance != utterance:
                    st.streams.reset(voice.slot)
                    voice.reset(utterance)
                st.streams.push(voice.slot, pcm16k)
                dirty = True
            elif kind == "flush":
                voice = st.voice(message[2])
                if voice.utterance == message[2] and not voice.flushed:
                    st.streams.flush(voice.slot)
                    voice.flushed = True
                    dirty = True
            elif kind == "plans":
                for plan in message[2]:
                    self._on_plan(st, plan)
            elif kind == "cancel":
                _, _, utterance, before = message
                self._cancel(st, utterance, before)
            elif kind == "shift":
                _, _, utterance, delta = message
                self._shift(st, utterance, delta)
            elif kind == "close":
                self._cancel(st, None, None)
                for voice in st.voices:
                    st.streams.close(voice.slot)
                st.closed = True
                del self._sessions[st.session_id]
                self._demand_changed()
        return dirty

    def _demand_changed(self) -> None:
        self.demand_fps = float(sum(s.fps for s in self._sessions.values()))

    @staticmethod
    def _voices_of(st: _Stream, utterance: int | None) -> list[_Voice]:
        """The session's voices holding an utterance: that one, or any (None)."""
        return [v for v in st.voices if v.utterance is not None and (utterance is None or v.utterance == utterance)]

    def _cancel(self, st: _Stream, utterance: int | None, before: int | None) -> None:
        self.scheduler.cancel(st.session_id, utterance, before)
        for voice in self._voices_of(st, utterance):
            if before is None:
                # The whole utterance: its audio is dropped too.
                st.streams.reset(voice.slot)
                voice.reset(None)
                continue
            for f in [f for f in voice.plans if f < before]:
                del voice.plans[f]
            for f in [f for f in voice.tokens if f < before]:
                del voice.tokens[f]
            voice.parked = [(d, f) for d, f in voice.parked if f >= before]
            heapq.heapify(voice.parked)
            voice.outstanding = {f for f in voice.outstanding if f >= before}
            self._advance(st, voice)

    def _shift(self, st: _Stream, utterance: int | None, delta: float) -> None:
        """The session's frames play ``delta`` s later than planned (its clock moved after
        a stall, or an utterance slid on an underrun): their deadlines follow, so that
        none is dropped as too late by the clock it no longer plays on."""
        self.scheduler.shift(st.session_id, utterance, delta)
        for voice in self._voices_of(st, utterance):
            voice.plans = {f: replace(p, deadline=p.deadline + delta) for f, p in voice.plans.items()}
            voice.parked = [(d + delta, f) for d, f in voice.parked]
            heapq.heapify(voice.parked)

    def _on_plan(self, st: _Stream, plan: FramePlan) -> None:
        voice = st.voice(plan.utterance)
        if voice.utterance != plan.utterance:
            return  # cancelled, or replaced by a later utterance
        row = voice.tokens.pop(plan.frame, None)
        if row is None:
            voice.plans[plan.frame] = plan
            return
        self._ready(st, voice, plan, row)

    def _ready(self, st: _Stream, voice: _Voice, plan: FramePlan, row: int) -> None:
        """Tokens and plan are both there: schedule it, park it, or (blend 0) skip it."""
        if plan.blend <= 0.0:
            voice.outstanding.discard(plan.frame)
            self._advance(st, voice)
            return
        if plan.deadline - time.monotonic() > self.horizon_s:
            heapq.heappush(voice.parked, (plan.deadline, plan.frame))
            voice.plans[plan.frame] = plan
            voice.tokens[plan.frame] = row
            return
        self.scheduler.add(st.session_id, plan.utterance, plan.frame, plan.deadline,
                           FrameJob(st, voice, plan, row), rank=st.served)

    def _unpark(self, now: float) -> None:
        for st in self._sessions.values():
            for voice in st.voices:
                while voice.parked and voice.parked[0][0] - now <= self.horizon_s:
                    _, f = heapq.heappop(voice.parked)
                    plan, row = voice.plans.pop(f, None), voice.tokens.pop(f, None)
                    if plan is not None and row is not None:
                        self.scheduler.add(st.session_id, plan.utterance, f, plan.deadline,
                                           FrameJob(st, voice, plan, row), rank=st.served)

    def _advance(self, st: _Stream, voice: _Voice) -> None:
        """Tell the audio streams which token rows the worker no longer needs."""
        low = min(voice.outstanding) if voice.outstanding else st.streams.frames_ready(voice.slot)
        if low > voice.done_below:
            voice.done_below = low
            st.streams.consumed(voice.slot, low)
            self._rows_freed = True  # a slot held back by a full ring may go on

    # ---- audio -------------------------------------------------------------------------
    def _audio_round(self) -> bool:
        """One round of every fps's streams; whether it made frames."""
        self._collect_round_events()
        t = time.perf_counter()
        launched_at = time.monotonic()
        start = self._cuda_event()
        made: list[tuple[int, int, int]] = []
        for streams in self._streams_by_fps.values():
            made += [(id(streams), *m) for m in streams.round()]
        self.audio_rounds += 1
        elapsed = time.perf_counter() - t
        self.audio_round_s += elapsed
        if not made:
            return False
        self.est.add_round(elapsed)  # the rounds frames wait for
        if start is not None:
            self._round_events.append((start, self._cuda_event()))
            # Its GPU work runs after what was queued before it; steps launched now queue
            # behind it.
            self._gpu_free_at = max(launched_at, self._gpu_free_at) + self.est.round_device()
            self._gpu_queue.append((None, self.est.round_device()))
        by_slot = {(id(st.streams), v.slot): (st, v) for st in self._sessions.values() for v in st.voices}
        for streams_id, slot, first, count in made:
            found = by_slot.get((streams_id, slot))
            if found is None or found[1].utterance is None:
                continue
            st, voice = found
            for f in range(first, first + count):
                row = st.streams.token_index(slot, f)
                voice.outstanding.add(f)
                plan = voice.plans.pop(f, None)
                if plan is None:
                    voice.tokens[f] = row
                else:
                    self._ready(st, voice, plan, row)
        return True

    def _cuda_event(self) -> Any:
        """A timing event recorded now on the worker's stream (None off CUDA)."""
        if self.engine.device.type != "cuda":
            return None
        import torch

        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def _collect_round_events(self) -> None:
        """Device times of the rounds whose work is done (no wait: events not yet
        reached stay for a later round)."""
        while self._round_events and self._round_events[0][1].query():
            start, end = self._round_events.popleft()
            self.est.add_round_device(start.elapsed_time(end) / 1000)

    # ---- generation --------------------------------------------------------------------
    def _launch_or_wait(self, now: float) -> float:
        """Launch a step now, or return how long to wait for more frames (0: loop again)."""
        n = len(self.scheduler)
        if n == 0:
            return 0.001 if self._in_flight else 0.05
        if len(self._in_flight) >= MAX_IN_FLIGHT:
            return 0.0005
        gpu_free = max(now, self._gpu_free_at)
        cap = self.batch_cap()
        size = self.engine.bucket(min(n, cap))
        # The wait budgets for the slower of a full step and this one (estimates are
        # medians and need not grow with the batch): a frame launched at the end of its
        # wait is never then judged too late. (Planning the wait for a smaller batch, two
        # frames a session, made 8 sessions on an H200 lose up to 35 % of their frames:
        # the audio rounds' thread and GPU time are not in the wait; docs/BENCHMARKS.md.)
        step_s = self.est.step(size)
        full_s = max(step_s, self.est.step(self.engine.bucket(cap)))
        # An audio round may start just before the last safe moment and hold this thread
        # for its duration (and queue its kernels ahead): the wait leaves room for one.
        wait = batch_wait(now, n, cap, self.scheduler.earliest_deadline(), gpu_free, full_s,
                          DELIVERY_MARGIN_S + self.est.round(),
                          fill_lead_s=self._fill_lead_s(self.engine.bucket(cap)) if self.fill_steps else None)
        if wait > 0:
            return wait
        batch = self.scheduler.next_batch(cap, not_before=self.drop_before(now, gpu_free, step_s),
                                          tie_window_s=step_s, rank=_served)
        late = self.scheduler.dropped_late
        if late:
            self.frames_dropped_late += late
            for item in self.scheduler.last_dropped:
                self._consume(item)
        if not batch:
            return 0.0
        for item in batch:
            self._consume(item)
            item.job.stream.served += 1
        self._launch(batch, now)
        return 0.0

    def _consume(self, item: PendingFrame) -> None:
        job: FrameJob = item.job
        job.voice.outstanding.discard(item.frame_no)
        self._advance(job.stream, job.voice)

    def _launch(self, batch: list[PendingFrame], now: float) -> None:
        size = self.engine.bucket(len(batch))
        try:
            if self.step_fn is not None:
                handle = self.step_fn(batch)
            else:
                t = time.perf_counter()
                jobs = [item.job for item in batch]
                rows = self.engine._upload(np.array([j.token_row for j in jobs], dtype=np.int64))
                table = jobs[0].stream.streams.tokens
                tokens = table.view(-1, *table.shape[-2:]).index_select(0, rows)
                handle = self.engine.launch([j.plan.avatar_key for j in jobs], [j.plan.avatar_index for j in jobs],
                                            tokens, [j.plan.blend for j in jobs],
                                            timed=self.steps % STAGE_SAMPLE_EVERY == 0)
                self._launch_host_s.setdefault(size, deque(maxlen=STAGE_SAMPLES)).append(time.perf_counter() - t)
                if getattr(handle, "unet_queued_at", None) is not None:
                    self._launch_queue_s.setdefault(size, deque(maxlen=STAGE_SAMPLES)).append(
                        handle.unet_queued_at - t)
        except Exception as exc:
            self.step_failures += 1
            log.error("generation step failed", frames=len(batch), error=repr(exc))
            self._deliver(batch, None, exc)
            return
        self._gpu_free_at = max(now, self._gpu_free_at) + self.est.step(size)
        self._gpu_queue.append((id(handle), self.est.step(size)))
        self._in_flight.append((handle, batch, size, time.perf_counter()))

    def drop_before(self, now: float, gpu_free: float, step_s: float) -> float:
        """Frames due before this are dropped rather than launched. With the GPU idle a
        frame is given up only when even a step a quarter faster than usual could not save
        it (a worker woken a little late must not drop what it waited for); while the GPU is
        still busy with earlier work the step's start is set by that queue, and
        ``busy_drop_fraction`` of a step applies (model.busy_drop_fraction, 1.0 by default:
        a saturated GPU does not spend a step's time on frames that would end after their
        ticks)."""
        fraction = self.busy_drop_fraction if gpu_free > now + BUSY_SLACK_S else IDLE_DROP_FRACTION
        return gpu_free + fraction * step_s + DELIVERY_MARGIN_S

    def _fill_lead_s(self, size: int) -> float:
        """How long before the GPU is free a step that is not full is launched anyway."""
        if self.fill_lead_s is not None:
            return self.fill_lead_s
        host = self._launch_host_s.get(size)
        return (statistics.median(host) if host else FILL_LAUNCH_S) + FILL_WAKE_S

    def _retire(self, key: int, now: float) -> None:
        """A step seen done at ``now``: what was queued before it is done too, what was
        queued after it runs from now (the expectation only moves earlier: ``now`` may be
        a loop's turn late)."""
        while self._gpu_queue and self._gpu_queue.popleft()[0] != key:
            pass
        rest = sum(seconds for _, seconds in self._gpu_queue)
        self._gpu_free_at = max(now, min(self._gpu_free_at, now + rest))

    def _collect(self, block: bool) -> None:
        while self._in_flight:
            handle, batch, size, launched = self._in_flight[0]
            if not block and not handle.ready():
                return
            block = False
            self._in_flight.popleft()
            try:
                boxes = handle.boxes()
                error: BaseException | None = None
            except Exception as exc:
                boxes, error = None, exc
                self.step_failures += 1
                log.error("generation step failed", frames=len(batch), error=repr(exc))
            now = time.monotonic()
            gpu_s = handle.gpu_seconds() if error is None else None
            stages = handle.stage_ms() if error is None and hasattr(handle, "stage_ms") else None
            if stages is not None:
                self._stage_samples.setdefault(size, deque(maxlen=STAGE_SAMPLES)).append(stages)
            self.est.add_step(size, gpu_s if gpu_s is not None else time.perf_counter() - launched, now)
            self.steps += 1
            self.metrics.gpu_step_seconds.observe(gpu_s or 0.0)
            self.metrics.gpu_batch_size.observe(len(batch))
            if error is None:
                self.frames_generated += len(batch)
                self.frames_done_late += sum(1 for item in batch if now > item.deadline)
            self._retire(id(handle), now)
            self._deliver(batch, boxes, error)

    def _deliver(self, batch: list[PendingFrame], boxes: list[Any] | None, error: BaseException | None) -> None:
        by_session: dict[int, tuple[_Stream, list[tuple[int, int, Any, BaseException | None]]]] = {}
        for i, item in enumerate(batch):
            st: _Stream = item.job.stream
            entry = by_session.setdefault(id(st), (st, []))
            entry[1].append((item.utterance, item.frame_no, boxes[i] if boxes is not None else None, error))
        for st, results in by_session.values():
            if not st.closed:
                self._loop.call_soon_threadsafe(st.on_result, results)

    def _settle(self, fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

        self._loop.call_soon_threadsafe(settle)
