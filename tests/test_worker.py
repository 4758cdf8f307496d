"""The generation worker on the CPU: a real tiny Engine, real GPU-resident audio streams
(on the CPU device), a real thread, results back on the asyncio loop."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

import numpy as np
import pytest
import torch

from daemon.metrics import Metrics
from daemon.worker import FramePlan, GenerationWorker, budget_from_parts, queue_ms
from musetalk.audio_gpu import GpuAudioStreams
from musetalk.engine import Engine
from musetalk.whisper import load_whisper_encoder, write_random_whisper
from tests.test_engine import avatars, make_avatar, model_dir, models  # noqa: F401 (fixtures)

torch.set_num_threads(1)
FPS = 25
DEBUG = None


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return load_whisper_encoder(write_random_whisper(tmp_path_factory.mktemp("whisper"), "tiny"))


@pytest.fixture
async def worker(models, avatars, encoder):
    engine = Engine(models, max_batch=4)
    for av in avatars:
        engine.register_avatar(av)
    sizes: list[int] = []
    real_launch = engine.launch

    def launch(keys, indices, tokens, blends, **kw):
        sizes.append(len(keys))
        return real_launch(keys, indices, tokens, blends, **kw)

    engine.launch = launch
    w = GenerationWorker(engine, lambda fps: GpuAudioStreams(encoder, fps=fps, max_streams=8, window_s=2.0),
                         asyncio.get_running_loop(), Metrics(), max_batch=4, horizon_s=5.0,
                         initial_step_ms={1: 5.0, 4: 10.0})
    w.launched_sizes = sizes
    global DEBUG
    DEBUG = lambda: (len(w.scheduler), w.steps, w.frames_dropped_late, sizes, {k: (sorted(v.plans) for v in s.voices) for k, s in w._sessions.items()}, w.alive(), w.scheduler.earliest_deadline() - time.monotonic())
    w.start()
    yield w
    thread = w.stop()
    await asyncio.to_thread(thread.join, 10)


def speech(seconds: float, seed: int) -> np.ndarray:
    return (0.2 * np.random.default_rng(seed).standard_normal(int(16000 * seconds))).astype(np.float32)


class Results:
    def __init__(self) -> None:
        self.items: list[tuple[int, int, object, BaseException | None]] = []
        self.arrived = asyncio.Event()

    def __call__(self, results) -> None:
        self.items += results
        self.arrived.set()

    async def wait_for(self, n: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.items) < n:
            assert time.monotonic() < deadline, f"{len(self.items)} of {n} frames after {timeout} s: {DEBUG and DEBUG()}"
            self.arrived.clear()
            try:
                await asyncio.wait_for(self.arrived.wait(), 0.2)
            except TimeoutError:
                pass


def plans(utt: int, frames: range, key: str, deadline: float, blend: float = 1.0) -> list[FramePlan]:
    return [FramePlan(utt, f, key, f % 2, blend, deadline) for f in frames]


async def test_frames_that_can_wait_fill_the_batch_to_its_cap(worker):
    # Deadlines far enough for a slow shared runner (a CPU step of 4 can take 0.5 s; the
    # last two frames wait for them), and a horizon past them: nothing is parked.
    worker.horizon_s = 60.0
    out = [Results() for _ in range(3)]
    far = time.monotonic() + 12.0
    for i, r in enumerate(out):
        worker.post("open", f"s{i}", FPS, r)
    for i in range(3):
        worker.post("audio", f"s{i}", 0, speech(0.4, i))
        worker.post("flush", f"s{i}", 0)
        worker.post("plans", f"s{i}", plans(0, range(10), "anna" if i % 2 else "ben", far))
    for r in out:
        await r.wait_for(10)
    # 30 frames with room to wait: full steps of 4 (the last one holds the rest).
    assert sum(worker.launched_sizes) == 30
    assert worker.launched_sizes.count(4) >= 7, worker.launched_sizes
    for i, r in enumerate(out):
        assert sorted(f for _, f, _, _ in r.items) == list(range(10))
        assert all(box is not None and err is None for _, _, box, err in r.items)
        box = r.items[0][2]
        assert box.avatar_key == ("anna" if i % 2 else "ben") and box.y.dtype == np.uint8


async def test_a_frame_that_cannot_wait_is_launched_alone(worker):
    r = Results()
    worker.post("open", "solo", FPS, r)
    worker.post("audio", "solo", 0, speech(0.2, 7))
    due = time.monotonic() + 1.5
    worker.post("plans", "solo", plans(0, range(1), "anna", due))
    await r.wait_for(1, timeout=10)
    assert worker.launched_sizes == [1]  # nothing else came: it went alone, in time
    assert r.items[0][2] is not None and time.monotonic() < due + 0.5


async def test_silent_frames_are_not_generated_and_a_cancel_drops_pending_frames(worker):
    r = Results()
    worker.post("open", "quiet", FPS, r)
    worker.post("audio", "quiet", 0, speech(0.6, 3))
    worker.post("flush", "quiet", 0)
    far = time.monotonic() + 3.0
    worker.post("plans", "quiet", plans(0, range(0, 5), "anna", far, blend=0.0))
    worker.post("plans", "quiet", plans(0, range(5, 15), "anna", far))
    worker.post("cancel", "quiet", 0, 10)  # frames 0..9 were played meanwhile
    await r.wait_for(5)
    await asyncio.sleep(0.3)
    assert sorted(f for _, f, _, _ in r.items) == list(range(10, 15))
    assert sum(worker.launched_sizes) == 5
    assert worker.pending_frames == 0


async def test_a_failing_step_reports_to_its_frames_and_the_worker_goes_on(worker):
    r = Results()
    worker.post("open", "boom", FPS, r)

    def broken(batch):
        raise RuntimeError("injected")

    worker.step_fn = broken
    worker.post("audio", "boom", 0, speech(0.3, 4))
    worker.post("flush", "boom", 0)
    worker.post("plans", "boom", plans(0, range(7), "anna", time.monotonic() + 2))
    await r.wait_for(7)
    assert all(isinstance(err, RuntimeError) for _, _, _, err in r.items)
    worker.step_fn = None
    worker.post("audio", "boom", 1, speech(0.3, 5))
    worker.post("flush", "boom", 1)
    worker.post("plans", "boom", plans(1, range(7), "anna", time.monotonic() + 2))
    await r.wait_for(14)
    assert all(err is None and box is not None for u, _, box, err in r.items if u == 1)
    assert worker.alive()


async def _tokens_ready(worker, sids: list[str], frames: int, timeout: float = 60.0) -> None:
    def ready() -> bool:
        return all(worker._sessions[sid].streams.frames_ready(worker._sessions[sid].voice(0).slot) >= frames
                   for sid in sids)

    deadline = time.monotonic() + timeout
    while not await worker.call(ready):
        assert time.monotonic() < deadline, f"tokens not ready after {timeout} s: " + str(await worker.call(
            lambda: [worker._sessions[sid].streams.frames_ready(worker._sessions[sid].voice(0).slot) for sid in sids]))
        await asyncio.sleep(0.05)


class _SlowDeviceStep:
    """A finished step of a slower device (30 ms a frame): the policy under overload is
    the point here, and this CPU's own step time would swamp it. The real engine's
    launch path is covered by the tests above."""

    def __init__(self, batch):
        time.sleep(0.03 * len(batch))
        self.n = len(batch)

    def ready(self) -> bool:
        return True

    def boxes(self):
        return [object()] * self.n

    def gpu_seconds(self) -> float:
        return 0.03 * self.n


class _StagedStep:
    """A finished step that reports its stages' device times as the engine's handle does
    on CUDA (the CPU engine has no device events to read)."""

    def __init__(self, batch):
        self.n = len(batch)

    def ready(self) -> bool:
        return True

    def boxes(self):
        return [object()] * self.n

    def gpu_seconds(self) -> float:
        return 0.001 * self.n

    def stage_ms(self) -> dict[str, float]:
        return {"unet": 2.0 * self.n, "vae_decode": 3.0 * self.n, "total": 6.0 * self.n}


async def test_stage_figures_are_medians_per_bucket_and_per_frame(worker):
    r = Results()
    worker.post("open", "st", FPS, r)
    worker.post("audio", "st", 0, speech(0.5, 11))
    worker.post("flush", "st", 0)
    worker.post("plans", "st", plans(0, range(6), "anna", time.monotonic() + 2))
    await r.wait_for(6)  # the real engine's steps: the host ms of each launch, no device events
    real = await worker.call(worker.stage_figures)
    assert real and all(f["launch_host_ms"] > 0 and "unet_ms" not in f for f in real.values()), real
    # The part of a launch before its UNet's work is queued (a fill lead's floor).
    assert all(0 < f["launch_queue_ms"] < f["launch_host_ms"] for f in real.values()), real
    worker.step_fn = _StagedStep
    worker.post("audio", "st", 1, speech(0.5, 12))
    worker.post("flush", "st", 1)
    worker.post("plans", "st", plans(1, range(6), "anna", time.monotonic() + 2))
    await r.wait_for(12)
    figures = await worker.call(worker.stage_figures)
    timed = {size: f for size, f in figures.items() if "unet_ms" in f}
    assert timed, figures
    for size, f in timed.items():
        assert f["unet_ms_per_frame"] == 2.0 and f["vae_decode_ms_per_frame"] == 3.0, f
        assert f["total_ms"] == 6.0 * int(size) and f["samples"] >= 1


async def test_under_overload_every_session_degrades_alike(worker):
    """Three sessions need 3 x 25 frames/s from a device that makes about 33: frames
    too late are dropped, and earliest-deadline-first spreads the loss evenly."""
    worker.step_fn = _SlowDeviceStep
    out = {f"o{i}": Results() for i in range(3)}
    for sid, r in out.items():
        worker.post("open", sid, FPS, r)
    n = 50
    for i, sid in enumerate(out):
        worker.post("audio", sid, 0, speech(n / FPS + 0.2, 20 + i))
        worker.post("flush", sid, 0)
    # Every session's tokens first (a slow runner's audio rounds must not decide who
    # loses frames): the policy under overload is the point.
    await _tokens_ready(worker, list(out), n)
    t0 = time.monotonic() + 0.5
    for i, sid in enumerate(out):
        # Sessions tick at their own phases (each clock starts with its session).
        phase = i / (3 * FPS)
        worker.post("plans", sid, [FramePlan(0, f, "anna", f % 2, 1.0, t0 + phase + f / FPS) for f in range(n)])
    await asyncio.sleep(n / FPS + 1.0)
    made = {sid: len(r.items) for sid, r in out.items()}
    assert all(10 <= m < n for m in made.values()), made  # overloaded, but nobody starves
    assert max(made.values()) - min(made.values()) <= n // 4, made
    assert worker.frames_dropped_late > 0


async def test_an_utterance_longer_than_the_encoder_window_is_made_to_its_end_without_more_audio(worker):
    """The fixture's encoder window is 2 s: a flushed 2.2 s utterance sent at once needs
    rounds after its last audio (the second segment starts a round after the first
    ends). The worker goes on by itself; nothing else arrives to wake it."""
    r = Results()
    worker.post("open", "long", FPS, r)
    worker.post("audio", "long", 0, speech(2.2, 9))
    worker.post("flush", "long", 0)
    await _tokens_ready(worker, ["long"], 55)


async def test_chunks_arriving_within_the_round_interval_share_one_round(worker):
    """Paced rounds: the first chunk is encoded at once, the next sessions' chunks that
    arrive within the interval wait and go to the encoder together."""
    worker.round_interval_s = 0.3
    made_by_round: list[set[int]] = []
    for i in range(3):
        worker.post("open", f"p{i}", FPS, Results())
    streams = await worker.call(lambda: worker._streams_by_fps[FPS])
    real_round = streams.round

    def round_recorded():
        made = real_round()
        if made:
            made_by_round.append({slot for slot, _, _ in made})
        return made

    streams.round = round_recorded
    slots = await worker.call(lambda: [worker._sessions[f"p{i}"].voice(0).slot for i in range(3)])
    for i in range(3):
        worker.post("audio", f"p{i}", 0, speech(0.2, 30 + i))
        await asyncio.sleep(0.02)
    await _tokens_ready(worker, [f"p{i}" for i in range(3)], 2)
    assert made_by_round[0] == {slots[0]}, made_by_round
    assert {slots[1], slots[2]} <= made_by_round[1], made_by_round
    # The budget counts the wait for a round.
    assert worker.processing_budget_s(1) >= 0.3


async def test_the_budget_counts_a_round_and_two_steps_of_every_open_session(worker):
    """The processing budget: the round interval, a round, the step on the GPU and the
    frame's own one, a delivery margin; the steps of a batch holding a frame of every
    session the worker has open (any of them may start speaking mid-utterance)."""
    for i in range(3):
        worker.post("open", f"b{i}", FPS, Results())
    assert await worker.call(lambda: worker.open_streams) == 3
    est = worker.est
    expected = worker.round_interval_s + est.round() + 2 * est.step(worker.engine.bucket(3)) + 0.010
    assert worker.processing_budget_s(3) == pytest.approx(expected)
    assert worker.processing_budget_s(4) > worker.processing_budget_s(1)  # the 4-frame step is slower
    for i in range(3):
        worker.post("close", f"b{i}")
    assert await worker.call(lambda: worker.open_streams) == 0


async def test_a_shift_moves_deadlines_so_frames_are_not_dropped_as_late(worker):
    """Two sessions, the same frames due 50 ms from now on a slow device (30 ms a
    frame): the one whose clock moved 3 s later (shift) has all its frames generated;
    the other loses frames as too late."""
    worker.step_fn = _SlowDeviceStep
    out = {sid: Results() for sid in ("moved", "kept")}
    for sid, r in out.items():
        worker.post("open", sid, FPS, r)
        worker.post("audio", sid, 0, speech(0.6, 40))
        worker.post("flush", sid, 0)
    await _tokens_ready(worker, list(out), 10)
    due = time.monotonic() + 0.05
    for sid in out:  # one message batch: the shift is applied before any launch
        worker.post("plans", sid, plans(0, range(10), "anna", due))
    worker.post("shift", "moved", 0, 3.0)
    await out["moved"].wait_for(10)
    await asyncio.sleep(0.3)
    assert sorted(f for _, f, _, _ in out["moved"].items) == list(range(10))
    assert len(out["kept"].items) < 10 and worker.frames_dropped_late > 0


async def test_a_failing_audio_round_is_logged_and_the_worker_goes_on(worker):
    r = Results()
    worker.post("open", "flaky", FPS, r)
    streams = await worker.call(lambda: worker._streams_by_fps[FPS])
    real_round, calls = streams.round, []

    def failing_once():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected audio fault")
        return real_round()

    streams.round = failing_once
    worker.post("audio", "flaky", 0, speech(0.3, 50))
    deadline = time.monotonic() + 10
    while worker.audio_round_failures == 0:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert worker.alive()
    worker.post("audio", "flaky", 0, speech(0.3, 51))  # later audio is taken and encoded
    await _tokens_ready(worker, ["flaky"], 3)
    assert worker.alive() and worker.audio_round_failures == 1


class _TimedStep:
    """A finished step that reports the device time given per bucket: the batch-sizing
    policy is the point here, and this CPU's own step times (slow, noisy) would decide it
    instead. The real engine's launch path is covered by the tests above."""

    def __init__(self, engine, seconds_by_bucket: dict[int, float], sizes: list[int]):
        self.engine, self.seconds, self.sizes = engine, seconds_by_bucket, sizes

    def __call__(self, batch):
        self.sizes.append(len(batch))
        seconds = self.seconds[self.engine.bucket(len(batch))]

        class Done:
            def ready(self) -> bool:
                return True

            def boxes(self):
                return [object()] * len(batch)

            def gpu_seconds(self) -> float:
                return seconds

        return Done()


@pytest.mark.parametrize("step_s, utilization, expected", [
    ({4: 0.010, 8: 0.012}, 0.8, 4),   # 75 frames/s x 2.5 ms a frame at 4: 0.19 of the GPU
    ({4: 0.050, 8: 0.055}, 0.8, 8),   # 4 would use 0.94 of it: the bigger, cheaper-per-frame 8
    ({4: 0.010, 8: 0.012}, None, 8),  # batch_sizing "max": up to max_batch whatever the demand
])
async def test_steps_fill_the_smallest_batch_that_keeps_up_with_the_open_sessions(
        models, avatars, encoder, step_s, utilization, expected):
    engine = Engine(models, max_batch=8, pad_to_buckets=True)
    assert engine.bucket_sizes == [4, 8]
    for av in avatars:
        engine.register_avatar(av)
    w = GenerationWorker(engine, lambda fps: GpuAudioStreams(encoder, fps=fps, max_streams=8, window_s=2.0),
                         asyncio.get_running_loop(), Metrics(), max_batch=8, horizon_s=60.0,
                         initial_step_ms={b: 1000 * s for b, s in step_s.items()}, batch_utilization=utilization)
    sizes: list[int] = []
    w.step_fn = _TimedStep(engine, step_s, sizes)
    w.start()
    try:
        out = [Results() for _ in range(3)]
        for i, r in enumerate(out):
            w.post("open", f"d{i}", FPS, r)
        assert await w.call(lambda: w.demand_fps) == 3 * FPS
        assert w.batch_cap() == expected
        # The budget plans two steps of that batch (here: of a frame of each of the 3).
        step = w.est.step(engine.bucket(min(expected, 3)))
        assert w.processing_budget_s(3) == pytest.approx(w.round_interval_s + w.est.round() + 2 * step + 0.010)
        # Every frame's tokens first, then plans that can all wait: steps fill to the cap.
        for i in range(3):
            w.post("audio", f"d{i}", 0, speech(0.4, 40 + i))
            w.post("flush", f"d{i}", 0)
        await _tokens_ready(w, [f"d{i}" for i in range(3)], 8)
        far = time.monotonic() + 30.0
        for i in range(3):
            w.post("plans", f"d{i}", plans(0, range(8), "anna", far))
        for r in out:
            await r.wait_for(8)
        assert sum(sizes) == 24 and max(sizes) == expected and sizes.count(expected) >= 24 // expected - 1, sizes
    finally:
        thread = w.stop()
        await asyncio.to_thread(thread.join, 10)


def test_a_finer_bucket_step_runs_a_saturated_gpu_s_partial_steps_unpadded(models):
    """model.bucket_step 1: a step of 13-15 frames (what a saturated GPU launches) runs at
    its own size; below 12 the sizes stay fours; the default pads them to 16."""
    fine = Engine(models, max_batch=16, bucket_step=1, pad_to_buckets=True)
    assert fine.bucket_sizes == [4, 8, 12, 13, 14, 15, 16]
    assert [fine.bucket(n) for n in (3, 9, 13, 14, 15, 16)] == [4, 12, 13, 14, 15, 16]
    default = Engine(models, max_batch=16, bucket_step=4, pad_to_buckets=True)
    assert [default.bucket(n) for n in (13, 14, 15)] == [16, 16, 16]


def test_the_queueing_term_follows_m_d_1_up_to_the_budget_s_ceiling():
    """The wait beyond the one step the budget counts: load / (2 (1 - load)) steps less
    one, so none up to two thirds of the GPU, a step at 0.8, 3.5 at 0.9; the budget it
    completes goes no higher than the ceiling, and no ceiling (or one below the other
    terms) adds nothing."""
    assert queue_ms(56.0, 12.0, 0.5, 88.0) == 0.0
    assert queue_ms(56.0, 12.0, 2 / 3, 88.0) == pytest.approx(0.0, abs=1e-9)
    assert queue_ms(56.0, 12.0, 0.8, 88.0) == pytest.approx(12.0)
    assert queue_ms(56.0, 12.0, 0.9, 88.0) == pytest.approx(32.0)  # 3.5 steps = 42 ms, cut at 88
    assert queue_ms(56.0, 12.0, 0.75, 88.0) == pytest.approx(0.5 * 12.0)
    assert queue_ms(56.0, 12.0, 1.3, 88.0) == pytest.approx(32.0)  # saturated: the ceiling
    assert queue_ms(56.0, 12.0, 0.95, None) == 0.0
    assert queue_ms(90.0, 12.0, 0.95, 88.0) == 0.0  # terms above the ceiling stay as they are


async def test_the_budget_grows_with_the_planned_load_up_to_its_ceiling(models, avatars, encoder):
    """Few sessions keep the terms' budget (the one-session latency); once the open
    sessions need the largest batch the budget takes the queueing term as the GPU fills,
    up to model.processing_budget_most_ms at saturation, never above it, never below the
    terms."""
    engine = Engine(models, max_batch=8, pad_to_buckets=True)
    assert engine.bucket_sizes == [4, 8]
    w = GenerationWorker(engine, lambda fps: GpuAudioStreams(encoder, fps=fps, max_streams=8, window_s=2.0),
                         asyncio.get_running_loop(), Metrics(), max_batch=8, horizon_s=60.0,
                         initial_step_ms={4: 10.0, 8: 12.0}, round_interval_s=0.020, batch_utilization=0.9,
                         budget_most_s=0.088)
    round_share = w.est.round_device() / 0.020  # 2 ms rounds every 20 ms: 0.1 of the GPU

    def parts(sessions: int) -> dict:
        return w.processing_budget_parts(sessions, sessions * FPS)

    one = parts(1)  # a 4-frame step's 10 ms for 25 frames/s: 0.25 of the GPU
    assert one["cap"] == 4 and one["load"] == pytest.approx(0.25 + round_share, abs=1e-3)
    assert one["queue_ms"] == 0.0
    assert budget_from_parts(one) == pytest.approx(
        w.round_interval_s + w.est.round() + 2 * w.est.step(4) + 0.010)
    sixteen = parts(16)  # 400 frames/s in 8-frame steps of 12 ms: 0.6, 0.7 with the rounds
    assert sixteen["cap"] == 8 and sixteen["load"] == pytest.approx(0.6 + round_share, abs=1e-3)
    base = 1000 * budget_from_parts({**sixteen, "queue_ms": 0.0})
    assert base == pytest.approx(20 + 2 + 2 * 12 + 10, abs=0.01)
    assert sixteen["queue_ms"] == pytest.approx((0.7 / 0.6 - 1) * 12, abs=0.05)
    ten = parts(10)  # 250 frames/s: 4-frame steps keep up at 0.63 (+ rounds): 0.73, yet
    # with a larger batch still to move to, no queueing term
    assert ten["cap"] == 4 and ten["load"] > 2 / 3 and queue_ms(60.0, 10.0, ten["load"], 88.0) > 0
    assert ten["queue_ms"] == 0.0
    full = parts(24)  # 600 frames/s: the whole GPU
    assert full["load"] >= 1.0 and budget_from_parts(full) == pytest.approx(0.088)
    assert budget_from_parts(one) < budget_from_parts(sixteen) < budget_from_parts(full)
    # A ceiling below the terms: the terms (a slower card's steps are what they are).
    w.budget_most_s = 0.050
    assert parts(24)["queue_ms"] == 0.0 and budget_from_parts(parts(24)) == pytest.approx(base / 1000)
    w.budget_most_s = None
    assert parts(24)["queue_ms"] == 0.0


async def test_the_step_estimates_start_from_the_warm_ups_device_times(models, avatars, encoder):
    """The warm-up's host figures (launch to boxes on the host, which admission reads)
    also hold a launch and a wait; live steps report their device time, so the
    estimates start from the warm-up's device times: the buckets no live step has used
    yet are planned with the same measure as the others."""
    engine = Engine(models, max_batch=4)
    w = GenerationWorker(engine, lambda fps: GpuAudioStreams(encoder, fps=fps, max_streams=8, window_s=2.0),
                         asyncio.get_running_loop(), Metrics(), max_batch=4, horizon_s=5.0)
    warmed = w.start(warm_engine=engine.warmup)
    try:
        assert await asyncio.to_thread(warmed.wait, 60) and w.warm_error is None
        assert set(engine.warmup_device_ms) == set(w.warmup_ms) == {1, 4}
        assert engine.warmup_device_ms != w.warmup_ms
        for size, ms in engine.warmup_device_ms.items():
            assert 0 < ms
            assert w.est.step(size) == pytest.approx(ms / 1000)
    finally:
        thread = w.stop()
        await asyncio.to_thread(thread.join, 10)


async def test_messages_posted_in_a_batch_reach_the_worker_together_and_in_order(models, encoder):
    w = GenerationWorker(Engine(models, max_batch=4),
                         lambda fps: GpuAudioStreams(encoder, fps=fps, max_streams=8, window_s=2.0),
                         asyncio.get_running_loop(), Metrics(), max_batch=4, horizon_s=5.0)  # not started
    w.post("audio", "a", 0, 1)
    other: list[int] = []
    with w.batched():
        w.post("audio", "a", 0, 2)
        with w.batched():  # nested: still the outer block's
            w.post("flush", "a", 0)
        # Another thread's posts are not this block's: they go straight in.
        t = threading.Thread(target=lambda: (w.post("audio", "b", 0, 9), other.append(len(w._inbox))))
        t.start()
        t.join()
        assert [m[1:] for m in w._inbox] == [("a", 0, 1), ("b", 0, 9)] and other == [2]
    assert [m for m in w._inbox] == [("audio", "a", 0, 1), ("audio", "b", 0, 9), ("audio", "a", 0, 2),
                                     ("flush", "a", 0)]
    w.post("close", "a")  # after the block: straight in again
    assert w._inbox[-1] == ("close", "a") and w._batch is None


def test_a_rounds_estimate_is_the_longer_of_its_host_and_device_times():
    """A graphed encoder launches a round in less time than the GPU takes to run it; the
    frames queued after it wait for the GPU: the estimate takes the longer of the two
    (host time alone where no device time was measured: a CPU, or before the first)."""
    from daemon.worker import _Estimates

    est = _Estimates({4: 10.0})
    est.seed_round(0.006)
    assert est.round() == pytest.approx(0.006)
    for _ in range(5):
        est.add_round(0.002)  # graphed: a short launch...
        est.add_round_device(0.004)  # ...of longer GPU work
    assert est.round() == pytest.approx(0.004)
    snap = est.snapshot()
    assert (snap["round_ms"], snap["round_host_ms"], snap["round_device_ms"]) == (4.0, 2.0, 4.0)
    for _ in range(9):
        est.add_round(0.008)  # eager: the launch is the longer
    assert est.round() == pytest.approx(0.008)


class _DeviceEvent:
    """A recorded CUDA timing event as the worker reads one (``query``, ``elapsed_time``)
    for a device whose audio rounds take 200 ms: the CPU engine has no device events."""

    def query(self) -> bool:
        return True

    def elapsed_time(self, end) -> float:
        return 200.0


async def test_frames_due_before_a_queued_rounds_gpu_work_ends_are_dropped_not_launched(worker):
    """A graphed audio round returns before its GPU work is done, and steps launched after
    it queue behind that work: the worker's model of when the GPU is free counts it, so a
    frame that could only finish after the round's device time is dropped (its session
    shows the idle frame) instead of taking GPU time and arriving late."""
    worker._cuda_event = _DeviceEvent
    for _ in range(9):
        worker.est.add_round_device(0.2)
    r = Results()
    worker.post("open", "q", FPS, r)
    worker.post("audio", "q", 0, speech(0.4, 5))
    worker.post("flush", "q", 0)
    worker.post("plans", "q", plans(0, range(4), "anna", time.monotonic() + 0.12))
    deadline = time.monotonic() + 20
    while await worker.call(lambda: worker.frames_dropped_late) < 4:
        assert time.monotonic() < deadline, (worker.frames_dropped_late, worker.launched_sizes)
        await asyncio.sleep(0.05)
    assert worker.launched_sizes == [] and r.items == []
    # Frames due after the round's work ends are generated as usual.
    worker.post("plans", "q", plans(0, range(4, 8), "anna", time.monotonic() + 3.0))
    await r.wait_for(4)
    assert sorted(f for _, f, _, _ in r.items) == [4, 5, 6, 7]


class _DeviceQueue:
    """A device that runs each step for ``step_s`` after the one before it (launches
    queue, as on a CUDA stream): the fill policy is about when steps start on a busy
    device, which this CPU's synchronous steps cannot show."""

    def __init__(self, step_s: float, sizes: list[int]):
        self.step_s, self.sizes, self.free_at = step_s, sizes, 0.0

    def __call__(self, batch):
        self.sizes.append(len(batch))
        self.free_at = max(time.monotonic(), self.free_at) + self.step_s
        end, n, step_s = self.free_at, len(batch), self.step_s

        class Queued:
            def ready(self) -> bool:
                return time.monotonic() >= end

            def boxes(self):
                return [object()] * n

            def gpu_seconds(self) -> float:
                return step_s

        return Queued()


@pytest.mark.parametrize("fill", [True, False])
async def test_a_step_waits_for_more_frames_while_the_device_is_busy(models, avatars, encoder, fill):
    """With ``fill_steps`` a step that is not full is launched just before the device is
    free, with the frames that came meanwhile; without it, as soon as its most urgent
    frame has no time to wait (here: one frame, long before the device could start it).
    The busy drop share is 0.75 here: with a whole step (the default) a frame that the
    next step can save is also one that may wait for it, and without ``fill_steps`` the
    worker would wait just the same."""
    engine = Engine(models, max_batch=4)
    for av in avatars:
        engine.register_avatar(av)
    w = GenerationWorker(engine, lambda fps: GpuAudioStreams(encoder, fps=fps, max_streams=8, window_s=2.0),
                         asyncio.get_running_loop(), Metrics(), max_batch=4, horizon_s=60.0,
                         initial_step_ms={1: 400.0, 4: 400.0}, fill_steps=fill, busy_drop_fraction=0.75)
    sizes: list[int] = []
    w.step_fn = _DeviceQueue(0.4, sizes)
    w.start()
    try:
        r = Results()
        w.post("open", "f", FPS, r)
        w.post("audio", "f", 0, speech(0.4, 60))
        w.post("flush", "f", 0)
        await _tokens_ready(w, ["f"], 6)
        t0 = time.monotonic()
        w.post("plans", "f", plans(0, range(2), "anna", t0 + 0.43))  # due now: launched at once
        # Frames 2-5 come one by one while the device runs the first step (until t0 + 0.4),
        # each due too soon to wait for a step after the next (t0 + 0.8 + margins) but not
        # so soon that the next could not save it (0.4 + 0.75 x 0.4 + margins).
        for f in range(2, 6):
            await asyncio.sleep(max(0.0, t0 + 0.06 * (f - 1) - time.monotonic()))
            w.post("plans", "f", plans(0, range(f, f + 1), "anna", t0 + 0.76))
        if fill:
            await r.wait_for(6)
            # Two steps: the second took every frame that came while the first ran.
            assert len(sizes) == 2 and sizes[0] == 2, sizes
            assert w.frames_dropped_late == 0
        else:
            # Frame 2 went (nearly) alone, queued behind the first step; the frames after
            # it would end after their ticks behind that second step: dropped.
            deadline = time.monotonic() + 20
            while len(r.items) + await w.call(lambda: w.frames_dropped_late) < 6:
                assert time.monotonic() < deadline, (sizes, len(r.items), w.frames_dropped_late)
                await asyncio.sleep(0.05)
            assert sizes[0] == 2 and sum(sizes) < 6 and w.frames_dropped_late == 6 - sum(sizes), (
                sizes, w.frames_dropped_late)
        assert all(err is None for *_, err in r.items)
    finally:
        thread = w.stop()
        await asyncio.to_thread(thread.join, 10)


def test_a_step_seen_done_rebases_when_the_gpu_is_expected_free(models, encoder):
    """What was queued before a finished step is done; what was queued after it runs from
    the moment it is seen done. The expectation only moves earlier, so estimates that run
    long never add up over a busy stretch."""
    w = GenerationWorker(Engine(models, max_batch=4),
                         lambda fps: GpuAudioStreams(encoder, fps=fps, max_streams=8, window_s=2.0),
                         asyncio.new_event_loop(), Metrics(), max_batch=4, horizon_s=5.0)  # not started
    w._gpu_queue.extend([(None, 0.004), (1, 0.020), (None, 0.004), (2, 0.020)])
    w._gpu_free_at = 100.060  # launched back to back, each estimate 2 ms long
    w._retire(1, 100.010)  # the first step done 10 ms in: a round and a step remain
    assert list(w._gpu_queue) == [(None, 0.004), (2, 0.020)]
    assert w._gpu_free_at == pytest.approx(100.034)
    w._retire(2, 100.040)  # seen late: the earlier expectation stands
    assert w._gpu_free_at == pytest.approx(100.040) and not w._gpu_queue
    # The fill lead: the bucket's launch time and a wake-up, or model.fill_lead_ms as set.
    assert w._fill_lead_s(16) == pytest.approx(0.006 + 0.004)  # nothing measured yet
    w._launch_host_s[16] = deque([0.003, 0.005, 0.004])
    assert w._fill_lead_s(16) == pytest.approx(0.004 + 0.004)
    w.fill_lead_s = 0.0025
    assert w._fill_lead_s(16) == 0.0025


def test_frames_a_busy_gpu_would_make_too_late_are_dropped_with_the_busy_fraction(models, encoder):
    """drop_before: with the GPU idle a frame is kept while a step a quarter faster than
    its estimate could still make it; while the GPU is booked ahead, the share is
    model.busy_drop_fraction (a whole step unless set)."""
    from daemon.worker import DELIVERY_MARGIN_S

    w = GenerationWorker(Engine(models, max_batch=4),
                         lambda fps: GpuAudioStreams(encoder, fps=fps, max_streams=8, window_s=2.0),
                         asyncio.new_event_loop(), Metrics(), max_batch=4, horizon_s=5.0)  # not started
    now, step = 100.0, 0.020
    assert w.drop_before(now, now, step) == pytest.approx(now + 0.015 + DELIVERY_MARGIN_S)  # idle
    assert w.drop_before(now, now + 0.010, step) == pytest.approx(now + 0.030 + DELIVERY_MARGIN_S)  # the default
    w.busy_drop_fraction = 0.75
    assert w.drop_before(now, now, step) == pytest.approx(now + 0.015 + DELIVERY_MARGIN_S)  # idle: unchanged
    assert w.drop_before(now, now + 0.010, step) == pytest.approx(now + 0.025 + DELIVERY_MARGIN_S)
    w.busy_drop_fraction = 1.0
    # The scheduler drops what is due before it and launches the rest.
    limit = w.drop_before(now, now + 0.010, step)
    for i, deadline in enumerate([limit - 0.001, limit + 0.001]):
        w.scheduler.add("s", 0, i, deadline, job=None)
    batch = w.scheduler.next_batch(4, not_before=limit)
    assert [item.frame_no for item in batch] == [1] and w.scheduler.dropped_late == 1
