"""The daemon's side of the model: loads it, prepares avatars, and runs every GPU call on
one worker thread (a queue in, results out to the event loop), never on the loop.

Each worker iteration runs the queued calls (audio encoding, avatar registration) and
then one batched generation step over the most urgent frames of all sessions, chosen by
the scheduler. Avatar preparation runs on a second thread so that a new session's
preparation never stalls the frames of live ones.
"""

from __future__ import annotations

import asyncio
import statistics
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Callable

from daemon import errors
from daemon.config import Settings
from daemon.errors import LipsyncError
from daemon.log import get_logger
from daemon.metrics import Metrics
from daemon.scheduler import BatchScheduler

log = get_logger(__name__)

MODEL_VERSION = "musetalk-1.5"


class EngineHost:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Any = None
        self.whisper: Any = None
        self.audio_window_s = 30.0
        self.landmarker: Any = None
        self.face_parser: Any = None
        self.device: Any = None
        self.model_dir: Path = settings.model.dir
        self.random_weights = settings.model.random_weights
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._cv = threading.Condition()
        self._calls: list[tuple[Callable[[], Any], asyncio.Future[Any]]] = []
        self._encodes: list[tuple[Any, Any, asyncio.Future[Any]]] = []
        self._scheduler = BatchScheduler()
        self._stop = False
        self._avatar_refs: dict[str, int] = {}
        self._avatars: dict[str, Any] = {}
        self._preparing: dict[str, asyncio.Task[Any]] = {}
        self._prepare_lock = asyncio.Lock()
        self.steps = 0
        self.frames_generated = 0
        self.step_failures = 0
        self.frames_dropped_late = 0
        self._step_estimate_s = 0.0
        self._recent_steps: deque[float] = deque(maxlen=9)
        self.encode_s = 0.0
        self.encode_calls = 0
        self.step_s = 0.0
        # Test hook and fault injection point: the function that runs one batch.
        self.step_fn: Callable[[list[Any]], list[Any]] | None = None

    # ---- startup ---------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await asyncio.to_thread(self._load)
        self._thread = threading.Thread(target=self._run, name="lipsync-gpu", daemon=True)
        self._thread.start()

    def _load(self) -> None:
        import torch

        from musetalk import weights
        from musetalk.engine import Engine
        from musetalk.landmarks import HaarTemplateLandmarker, make_landmarker
        from musetalk.models import load_models, resolve_device, resolve_dtype
        from musetalk.whisper import load_whisper_encoder

        cfg = self.settings.model
        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        if self.random_weights:
            self.model_dir = self.settings.daemon.state_dir / f"random-models-{cfg.random_weights_size}"
            if not (self.model_dir / ".complete").exists():
                log.warning("writing random model weights", dir=str(self.model_dir), size=cfg.random_weights_size)
                weights.write_random_weights(self.model_dir, size=cfg.random_weights_size)
                (self.model_dir / ".complete").write_text("ok")
            log.warning(
                "RANDOM WEIGHTS: model.random_weights is on; the mouth will be noise. "
                "For real output run `lipsync models download` and set model.random_weights = false",
                size=cfg.random_weights_size,
            )
        try:
            models = load_models(self.model_dir, self.device, dtype)
            self.whisper = load_whisper_encoder(self.model_dir / "whisper-tiny", self.device, dtype)
        except (OSError, ValueError, RuntimeError) as exc:
            message = str(exc).rstrip(". ")
            if "lipsync models download" not in message:
                message += f". Fetch the weights with `lipsync models download --dir {self.model_dir}`"
            raise LipsyncError(
                "models_missing",
                f"{message}; or, for development only, set model.random_weights = true "
                "(env LIPSYNC_MODEL__RANDOM_WEIGHTS=1)",
            ) from None
        self.engine = Engine(models, compile=cfg.compile, max_batch=cfg.max_batch)
        self._warm_up()
        # The reference encodes 30 s windows; on a CPU that costs ~0.3 s a step, so a
        # shorter window keeps streaming real-time there (see docs/AUDIO.md for the error).
        self.audio_window_s = cfg.audio_window_s or (30.0 if self.device.type == "cuda" else 4.0)
        if self.random_weights:
            # Random landmark/parsing networks would put the face anywhere: use the
            # bundled detector and the landmark mask, so the demo stays watchable.
            self.landmarker = HaarTemplateLandmarker()
            self.face_parser = None
        else:
            self.landmarker = make_landmarker(cfg.landmarks, self.model_dir)
            try:
                from musetalk.face_parsing import load_face_parser

                self.face_parser = load_face_parser(self.model_dir, self.device)
            except FileNotFoundError:
                log.warning("face-parsing model absent: blend masks use the landmark polygon "
                            "(lower quality); `lipsync models download` fetches it")
                self.face_parser = None
        log.info("model loaded", device=str(self.device), dtype=str(dtype).removeprefix("torch."),
                 compile=cfg.compile, landmarks=getattr(self.landmarker, "quality", "?"),
                 face_parser=self.face_parser is not None, random_weights=self.random_weights,
                 torch=torch.__version__)

    def _warm_up(self) -> None:
        """Kernel selection, allocation and (with model.compile) compilation happen here,
        before `ready`, not in the first sessions' frames."""
        if self.device.type != "cuda":
            return
        t = time.perf_counter()
        sizes = self.engine.warmup()
        log.info("model warmed up", batch_sizes=sizes, ms=round((time.perf_counter() - t) * 1000))

    def device_info(self) -> dict[str, Any]:
        info: dict[str, Any] = {
            "device": str(self.device), "random_weights": self.random_weights,
            "pending_frames": len(self._scheduler), "steps": self.steps,
            "frames_generated": self.frames_generated, "step_failures": self.step_failures,
            "frames_dropped_late": self.frames_dropped_late,
            "generation_s": round(self.step_s, 2), "audio_encode_calls": self.encode_calls,
            "audio_encode_s": round(self.encode_s, 2),
            "avatars": len(self._avatar_refs),
        }
        if self.device is not None and self.device.type == "cuda":
            import torch

            info["name"] = torch.cuda.get_device_name(self.device)
            info["memory_allocated_mb"] = round(torch.cuda.memory_allocated(self.device) / 2**20)
        return info

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    # ---- calls into the worker -------------------------------------------------------
    def call(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn`` on the worker thread before the next generation step."""
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        with self._cv:
            self._calls.append((fn, fut))
            self._cv.notify()
        return fut

    def encode(self, stream: Any, pcm: Any) -> asyncio.Future[Any]:
        """Streaming audio features for one utterance stream (``pcm`` None = flush). The
        worker runs all sessions' pending encodes as one batched encoder call."""
        assert self._loop is not None
        fut: asyncio.Future[Any] = self._loop.create_future()
        with self._cv:
            self._encodes.append((stream, pcm, fut))
            self._cv.notify()
        return fut

    def submit_frame(self, session_id: str, utterance: int, frame_no: int, deadline: float,
                     job: Any, on_done: Callable[[Any, BaseException | None], None]) -> None:
        """Queue one frame; ``on_done(rgba, error)`` runs on the event loop."""
        with self._cv:
            self._scheduler.add(session_id, utterance, frame_no, deadline, job, on_done)
            self._cv.notify()

    def cancel(self, session_id: str, utterance: int | None = None, before_frame: int | None = None) -> int:
        with self._cv:
            return self._scheduler.cancel(session_id, utterance, before_frame)

    # ---- the worker thread -----------------------------------------------------------
    def _run(self) -> None:
        max_batch = self.settings.model.max_batch
        while True:
            with self._cv:
                while not self._stop and not self._calls and not self._encodes and not len(self._scheduler):
                    self._cv.wait()
                calls, self._calls = self._calls, []
                encodes, self._encodes = self._encodes, []
                if self._stop:
                    stopped = LipsyncError(errors.SHUTTING_DOWN, "model worker stopped")
                    for fut in [f for _, f in calls] + [f for _, _, f in encodes]:
                        self._deliver(fut, None, stopped)
                    return
            for fn, fut in calls:
                try:
                    self._deliver(fut, fn(), None)
                except BaseException as exc:  # delivered to the awaiting task, which logs it
                    self._deliver(fut, None, exc)
            if encodes:
                self._encode_batch(encodes)
            with self._cv:
                # Batch more frames per step while the most urgent one can wait: a step of
                # many frames costs little more than a step of one.
                slack = self._scheduler.earliest_deadline() - time.monotonic() - 2 * self._step_estimate_s
                if (0.005 < slack < 1.0 and len(self._scheduler) < max_batch and not self._calls
                        and not self._encodes and not self._stop):
                    self._cv.wait(timeout=min(slack, 0.5 / self.settings.video.fps))
                # Skip frames this step cannot deliver before their tick: GPU time goes to
                # frames that can still be shown.
                batch = self._scheduler.next_batch(max_batch, not_before=time.monotonic() + self._step_estimate_s)
                self.frames_dropped_late += self._scheduler.dropped_late
                if not batch and self._scheduler.dropped_late:
                    # Everything judged too late: the estimate may be stale (one slow step);
                    # shrink it so that the next frames get their chance.
                    self._recent_steps.append(self._step_estimate_s / 2)
                    self._step_estimate_s = statistics.median(self._recent_steps)
            if batch:
                self._step(batch)

    def _encode_batch(self, encodes: list[tuple[Any, Any, asyncio.Future[Any]]]) -> None:
        """One batched whisper call for every session with new audio (each session has
        at most one encode in flight, so each stream appears once)."""
        from musetalk.audio import _step_streams

        t = time.perf_counter()
        try:
            results = _step_streams([(stream, pcm, pcm is None) for stream, pcm, _ in encodes])
        except Exception as exc:
            if len(encodes) == 1:
                log.error("audio feature step failed", error=repr(exc))
                self._deliver(encodes[0][2], None, exc)
                return
            # One stream's failure must not cost the others their audio: retry each
            # alone (streams that did not get to emit still hold their audio).
            log.warning("batched audio feature step failed; retrying per session", error=repr(exc))
            for item in encodes:
                self._encode_batch([item])
            return
        self.encode_s += time.perf_counter() - t
        self.encode_calls += 1
        for (_, _, fut), tokens in zip(encodes, results):
            self._deliver(fut, tokens, None)

    def _step(self, batch: list[Any]) -> None:
        t = time.perf_counter()
        try:
            step = self.step_fn or self.engine.step
            frames = step([p.job for p in batch])
            error: BaseException | None = None
        except Exception as exc:
            frames, error = [None] * len(batch), exc
            self.step_failures += 1
            log.error("generation step failed", frames=len(batch), error=repr(exc))
        self.steps += 1
        elapsed = time.perf_counter() - t
        self.step_s += elapsed
        # A step's expected duration (moving average), to skip frames it cannot save.
        self._recent_steps.append(elapsed)
        # The median of recent steps: one slow step (a new batch size, a hiccup) does
        # not make the worker give up on frames it could still deliver.
        self._step_estimate_s = statistics.median(self._recent_steps)
        self.metrics.gpu_step_seconds.observe(elapsed)
        self.metrics.gpu_batch_size.observe(len(batch))
        if error is None:
            self.frames_generated += len(batch)
        loop = self._loop
        assert loop is not None
        for item, frame in zip(batch, frames):
            loop.call_soon_threadsafe(item.on_done, frame, error)

    def _deliver(self, fut: asyncio.Future[Any], value: Any, error: BaseException | None) -> None:
        def settle() -> None:
            if fut.done():
                return
            if error is not None:
                fut.set_exception(error)
            else:
                fut.set_result(value)

        assert self._loop is not None
        self._loop.call_soon_threadsafe(settle)

    # ---- avatars ---------------------------------------------------------------------
    def _landmarker_for(self, url: str | None, num_frames: int) -> Any:
        """Packaged avatars (asset:NAME) may ship their landmarks as NAME.landmarks.npy,
        made with the bundled detector: replaying them gives the same avatar without the
        detector (absent from some OpenCV builds). Real DWPose landmarks win when present."""
        from daemon.config import ASSETS_DIR
        from musetalk.landmarks import PrecomputedLandmarker

        quality = getattr(self.landmarker, "quality", "")
        if url and url.startswith("asset:") and quality.startswith("opencv"):
            sidecar = ASSETS_DIR / f"{url.removeprefix('asset:')}.landmarks.npy"
            if sidecar.is_file():
                import numpy as np

                landmarks = np.load(sidecar)
                if len(landmarks) == num_frames:
                    return PrecomputedLandmarker(landmarks, f"{quality}, {sidecar.name}")
        return self.landmarker

    async def acquire_avatar(self, video: Any, content_hash: str, log_: Any,
                             url: str | None = None) -> tuple[Any, dict[str, float]]:
        """The prepared avatar for a decoded idle video: from the disk cache, or prepared
        now (one preparation at a time; concurrent requests for one video share it)."""
        from musetalk.avatar import avatar_cache_key

        cfg = self.settings.model
        landmarker = self._landmarker_for(url, video.num_frames)
        options = {"extra_margin": cfg.extra_margin, "parsing_mode": cfg.parsing_mode,
                   "landmarks": getattr(landmarker, "quality", "?"),
                   "face_parser": self.face_parser is not None,
                   "weights": f"random-{cfg.random_weights_size}" if self.random_weights else "real"}
        key = avatar_cache_key(content_hash, MODEL_VERSION, options)
        timings: dict[str, float] = {}
        if key not in self._avatars:
            task = self._preparing.get(key)
            if task is None:
                task = asyncio.create_task(self._prepare(key, video, options, log_, landmarker),
                                           name=f"prepare-{key[:8]}")
                self._preparing[key] = task
                task.add_done_callback(lambda _t, k=key: self._preparing.pop(k, None))
            # Shielded: a start cancelled meanwhile does not cancel a preparation (and
            # registration) that other sessions of the same video may be waiting for.
            _, timings = await asyncio.shield(task)
        self._avatar_refs[key] = self._avatar_refs.get(key, 0) + 1
        return self._avatars[key], timings

    async def _prepare(self, key: str, video: Any, options: dict[str, Any], log_: Any, landmarker: Any):
        from musetalk.avatar import load_or_prepare, prepare_avatar

        cfg = self.settings.model
        directory = self.settings.daemon.state_dir / "avatars" / key

        def prepare():
            return prepare_avatar(
                video.frames, video.fps, landmarker=landmarker,
                encode_latents=self.engine.models.encode_latents, face_parser=self.face_parser,
                extra_margin=cfg.extra_margin, parsing_mode=cfg.parsing_mode, key=key,
            )

        async with self._prepare_lock:
            t = time.perf_counter()
            try:
                avatar, cached = await asyncio.to_thread(
                    load_or_prepare, directory, key, prepare, model_version=MODEL_VERSION, options=options)
            except ValueError as exc:
                raise LipsyncError(errors.AVATAR_PREPARATION_FAILED,
                                   f"cannot prepare the avatar: {exc}") from None
            elapsed = round((time.perf_counter() - t) * 1000, 1)
        timings = {"avatar_cache_ms" if cached else "avatar_prepare_ms": elapsed}
        # Registered here, once, by the task every concurrent acquirer shares.
        t = time.perf_counter()
        # The decoded video's RGBA frames are the idle frames the sessions already show:
        # the engine composes onto the same array instead of keeping its own copy.
        await self.call(lambda: self.engine.register_avatar(avatar, frames_rgba=video.rgba))
        timings["register_ms"] = round((time.perf_counter() - t) * 1000, 1)
        self._avatars[key] = avatar
        log_.info("avatar ready", cached=cached, frames=avatar.num_frames,
                  landmarks=avatar.landmark_source, key=key, **timings)
        return avatar, timings

    async def release_avatar(self, key: str) -> None:
        refs = self._avatar_refs.get(key, 0) - 1
        if refs > 0:
            self._avatar_refs[key] = refs
            return
        self._avatar_refs.pop(key, None)
        self._avatars.pop(key, None)
        if self.alive():
            try:
                # Bounded: a wedged GPU must not hang a session's close.
                await asyncio.wait_for(self.call(lambda: self.engine.unregister_avatar(key)), timeout=10)
            except Exception as exc:
                log.warning("unregister avatar failed", key=key, error=repr(exc))

    async def make_speech(self, session: Any) -> Any:
        from daemon.speech import SpeechPipeline

        avatar, timings = await self.acquire_avatar(session.video, session.video_hash, session.log,
                                                    session.video_url)
        return SpeechPipeline(session, self, avatar, timings)

    # ---- shutdown --------------------------------------------------------------------
    async def aclose(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None:
            await asyncio.to_thread(thread.join, 10)
