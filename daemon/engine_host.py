"""The daemon's side of the model: loads it, prepares avatars, and owns the generation
worker (``daemon.worker``), the one thread that runs every GPU call, never the loop.

Sessions talk to it through a few non-blocking calls (``open_stream``, ``push_audio``,
``flush_audio``, ``plan_frames``, ``cancel``, ``close_stream``); generated boxes come
back on the event loop through the callback given to ``open_stream``. Avatar
preparation runs on a separate thread (on a low-priority CUDA stream), so a new
session's preparation never delays the frames of live ones.
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any, Callable

from daemon import errors
from daemon.config import Settings
from daemon.errors import LipsyncError
from daemon.log import get_logger
from daemon.metrics import Metrics
from daemon.worker import FramePlan, GenerationWorker, OnResult, budget_from_parts

log = get_logger(__name__)

MODEL_VERSION = "musetalk-1.5"
# Of the frames/s measured at the best batch size, what admission counts on: the rest is
# headroom for the audio rounds (about 12-14 % of the GPU at 20-24 sessions), host gaps
# and bucket padding. The warm-up's best bucket ran 625 frames/s on an H100 (32 frames
# in 51.2 ms; the H200's steps are as fast), and 20 sessions at 25 fps met the SLO on an
# H200 while 22 did not on either card (docs/BENCHMARKS.md, ninth and twelfth sessions):
# 0.85 admitted 21; 0.82 admits 20 (512 frames/s) and still does if the warm-up measures
# a few per cent slow (20 needs 610 frames/s, 21 would need 640).
ADMISSION_FRACTION = 0.82
# Of one session's frames/s (a step and its audio round after each other), what counts as
# sustained when choosing a slow device's default fps (video.auto_fps).
SUSTAINED_FRACTION = 0.85


class EngineHost:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.engine: Any = None
        self.whisper: Any = None
        self.landmarker: Any = None
        self.face_parser: Any = None
        self.tools: Any = None  # musetalk.avatar.PreparationTools
        self.device: Any = None
        self.model_dir: Path = settings.model.dir
        self.random_weights = settings.model.random_weights
        self.measured_fps: float | None = None
        # The frame rate of sessions that ask for none (video.fps, or what this device can
        # sustain for one speaking session when it cannot do video.fps: video.auto_fps).
        self.default_fps: int = settings.video.fps
        self.one_session_fps: float | None = None
        self.warmup_ms: dict[int, float] = {}
        self.load_s = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._worker: GenerationWorker | None = None
        self._avatar_refs: dict[str, int] = {}
        self._avatars: dict[str, Any] = {}
        self._preparing: dict[str, asyncio.Task[Any]] = {}
        self._prepare_lock = asyncio.Lock()
        self._prep_stream: Any = None
        self._speaking = 0
        # The cropped decode's validation per registered avatar (figures for `status`).
        self.crop_figures: dict[str, dict[str, Any]] = {}
        self._crop_tasks: set[asyncio.Task[Any]] = set()

    # ---- startup ---------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        await asyncio.to_thread(self._load)
        cfg = self.settings.model
        self._worker = GenerationWorker(self.engine, self._make_streams, self._loop, self.metrics,
                                        max_batch=cfg.max_batch, horizon_s=cfg.horizon_s,
                                        round_interval_s=cfg.audio_round_ms / 1000,
                                        batch_utilization=cfg.batch_utilization if cfg.batch_sizing == "demand" else None,
                                        fill_steps=cfg.fill_steps,
                                        fill_lead_s=cfg.fill_lead_ms / 1000 if cfg.fill_lead_ms > 0 else None,
                                        busy_drop_fraction=cfg.busy_drop_fraction,
                                        budget_most_s=(cfg.processing_budget_most_ms / 1000
                                                       if cfg.processing_budget_most_ms is not None else None))
        t = time.perf_counter()
        warmed = self._worker.start(warm_fps=self.settings.video.fps, warm_engine=self.engine.warmup)
        await asyncio.to_thread(warmed.wait)
        if self._worker.warm_error is not None:
            hint = "; model.compile = false runs it eager" if self.engine.compiled else ""
            raise LipsyncError(errors.INTERNAL, f"the model failed to warm up on {self.device}: "
                               f"{type(self._worker.warm_error).__name__}: {self._worker.warm_error}{hint}")
        self._warmed_up(self._worker.warmup_ms, time.perf_counter() - t)
        self.load_s = time.perf_counter() - t0

    def _make_streams(self, fps: int) -> Any:
        from musetalk.audio_gpu import GpuAudioStreams

        # Two voices per session (an utterance finishing while the next one starts).
        slots = 2 * self.settings.daemon.max_sessions
        cfg = self.settings.model
        return GpuAudioStreams(self.whisper, fps=fps, max_streams=slots, lookahead_frames=cfg.lookahead_frames,
                               window_s=self.audio_window_s,
                               compile=cfg.compile and cfg.audio_compile and self.device.type == "cuda")

    @property
    def audio_window_s(self) -> float:
        cfg = self.settings.model
        # The reference encodes 30 s windows; a CPU cannot do that every 40 ms, so it
        # gets a shorter window (docs/AUDIO.md has the error either way).
        return cfg.audio_window_s or (30.0 if self.device.type == "cuda" else 4.0)

    def _compile_cache(self) -> None:
        """Compiled kernels persist under the state dir: only the first start compiles."""
        cache = self.settings.daemon.state_dir / "compile-cache"
        cache.mkdir(parents=True, exist_ok=True)
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache / "inductor"))
        os.environ.setdefault("TRITON_CACHE_DIR", str(cache / "triton"))
        os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
        os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")

    def _load(self) -> None:
        from musetalk import weights
        from musetalk.models import resolve_device, resolve_dtype

        cfg = self.settings.model
        self.device = resolve_device(cfg.device)
        dtype = resolve_dtype(cfg.dtype, self.device)
        if cfg.compile and self.device.type == "cuda":
            self._compile_cache()
        import torch

        from musetalk.engine import Engine
        from musetalk.models import load_models
        from musetalk.whisper import load_whisper_encoder

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
                "(env LIPSYNC_MODEL__RANDOM_WEIGHTS=1); or run with no model at all, the speech "
                "over the idle video: model.enabled = false (env LIPSYNC_MODEL__ENABLED=false)",
            ) from None
        # "auto" crops on CUDA only: on a CPU the validation would cost more than it saves.
        decode = "full" if cfg.decode == "auto" and self.device.type != "cuda" else cfg.decode
        self.engine = Engine(models, compile=cfg.compile, max_batch=cfg.max_batch,
                             compile_dynamic=cfg.compile_dynamic, bucket_step=cfg.bucket_step,
                             decode=decode, crop_row=cfg.decode_crop_row, crop_row_high=cfg.decode_crop_row_high,
                             crop_tolerance=cfg.decode_tolerance,
                             fuse_step=cfg.fuse_step, inductor=cfg.inductor_options or None,
                             upsample=cfg.upsample)
        if self.device.type == "cuda":
            self._prep_stream = torch.cuda.Stream(self.device, priority=0)
        from musetalk.avatar import PreparationTools

        # One choice of landmarker and face parser for the daemon and `lipsync render`.
        self.tools = PreparationTools.load(self.model_dir, self.device, landmarks=cfg.landmarks,
                                           random_weights=self.random_weights)
        self.landmarker, self.face_parser = self.tools.landmarker, self.tools.face_parser
        log.info("model loaded", device=str(self.device), dtype=str(dtype).removeprefix("torch."),
                 compile=self.engine.compiled, buckets=self.engine.bucket_sizes,
                 landmarks=getattr(self.landmarker, "quality", "?"),
                 face_parser=self.face_parser is not None, random_weights=self.random_weights,
                 torch=torch.__version__)

    def _warmed_up(self, step_ms: dict[int, float], seconds: float) -> None:
        """Kernel selection, allocation, compilation and CUDA-graph recording happened on
        the worker thread before `ready`, not in the first sessions' frames; the step times
        measured after it give the frames/s this device sustains (admission counts on it;
        a CPU's figure only seeds the worker's estimates)."""
        self.warmup_ms = step_ms
        if self.device.type == "cuda" and step_ms:
            best = max(size * 1000 / ms for size, ms in step_ms.items())
            self.measured_fps = round(best * ADMISSION_FRACTION, 1)
        if step_ms:
            # One speaking session: a frame's step and its audio round, one after another.
            per_frame = step_ms[min(step_ms)] / 1000 / min(step_ms) + self.worker.est.round()
            self.one_session_fps = round(SUSTAINED_FRACTION / per_frame, 1)
        video = self.settings.video
        if self.one_session_fps is not None and self.one_session_fps < video.fps and video.auto_fps:
            self.default_fps = max(1, int(self.one_session_fps))
            log.warning(
                f"this {self.device.type} generates about {self.one_session_fps:g} frames/s for one speaking "
                f"session, less than video.fps = {video.fps}: sessions that give no fps run at "
                f"{self.default_fps} fps (a GPU runs {video.fps}; video.auto_fps = false keeps {video.fps})",
                device=str(self.device), one_session_fps=self.one_session_fps, default_fps=self.default_fps)
        log.info("model warmed up", step_ms={k: round(v, 2) for k, v in step_ms.items()},
                 audio_encoder_ms={k: round(v, 2) for k, v in self.worker.audio_warmup_ms.items()},
                 measured_fps=self.measured_fps, one_session_fps=self.one_session_fps, s=round(seconds, 1))

    def device_info(self) -> dict[str, Any]:
        w = self._worker
        info: dict[str, Any] = {
            "device": str(self.device), "random_weights": self.random_weights,
            "pending_frames": w.pending_frames if w else 0, "steps": w.steps if w else 0,
            "frames_generated": w.frames_generated if w else 0, "step_failures": w.step_failures if w else 0,
            "frames_dropped_late": w.frames_dropped_late if w else 0,
            "frames_done_late": w.frames_done_late if w else 0,
            # Per frame rate in use: the audio rounds' encoder graphs and whether compiled.
            "audio_encoder": w.audio_encoder_info() if w else {},
            "generation_s": round(w.est.step_s_total, 2) if w else 0.0,
            "audio_rounds": w.audio_rounds if w else 0, "audio_round_s": round(w.audio_round_s, 2) if w else 0.0,
            "avatars": len(self._avatar_refs), "measured_fps": self.measured_fps,
            "compiled": bool(self.engine and self.engine.compiled),
            "load_s": round(self.load_s, 1),
            "decode": self._decode_info(),
            # Sampled steps: each stage's device ms, per step and per frame, by bucket.
            "stages": w.stage_figures() if w else {},
            "avatars_device_mb": round(self.engine.device_bytes() / 2**20, 1) if self.engine else 0.0,
        }
        if self.device is not None and self.device.type == "cuda":
            import torch

            info["name"] = torch.cuda.get_device_name(self.device)
            info["memory_allocated_mb"] = round(torch.cuda.memory_allocated(self.device) / 2**20)
            info["memory_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(self.device) / 2**20)
        return info

    def _decode_info(self) -> dict[str, Any]:
        engine = self.engine
        if engine is None or engine.crop_plan is None:
            return {"mode": "full"}
        shown = ("accepted", "mean_abs", "max_abs", "reason", "first_visible_row", "high")
        info = {"mode": engine.decode_mode, "crop_row": engine.crop_plan.visible_row,
                "gflop_per_frame": {"whole": round(engine.decoder_flops(False) / 1e9, 1),
                                    "cropped": round(engine.decoder_flops(True) / 1e9, 1)},
                "avatars": {key[:16]: {k: v for k, v in f.items() if k in shown}
                            for key, f in self.crop_figures.items()}}
        if engine.crop_plan_high is not None:
            info["crop_row_high"] = engine.crop_plan_high.visible_row
            info["gflop_per_frame"]["cropped_high"] = round(engine.decoder_flops(True, high=True) / 1e9, 1)
        return info

    def alive(self) -> bool:
        return self._worker is not None and self._worker.alive()

    def busy_fraction(self) -> float | None:
        """Fraction of the last 10 s the device spent in generation steps."""
        return self._worker.busy_fraction() if self._worker else None

    # Counters the benchmarks read.
    @property
    def steps(self) -> int:
        return self._worker.steps if self._worker else 0

    @property
    def frames_generated(self) -> int:
        return self._worker.frames_generated if self._worker else 0

    @property
    def step_s(self) -> float:
        return self._worker.est.step_s_total if self._worker else 0.0

    @property
    def late_frames(self) -> tuple[int, int]:
        """(frames dropped as too late before a step, frames whose step was seen done after
        their deadline) so far."""
        w = self._worker
        return (w.frames_dropped_late, w.frames_done_late) if w else (0, 0)

    def estimates(self) -> dict[str, Any]:
        """The worker's step and round estimates (they set the processing budget)."""
        return self.worker.est.snapshot()

    async def reset_peak_memory(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats(self.device)

    async def peak_memory_mb(self) -> float | None:
        if self.device is None or self.device.type != "cuda":
            return None
        import torch

        return round(torch.cuda.max_memory_allocated(self.device) / 2**20, 1)

    async def refresh_info(self) -> dict[str, Any]:
        return self.device_info()

    @property
    def worker(self) -> GenerationWorker:
        assert self._worker is not None, "EngineHost.start() first"
        return self._worker

    # ---- the sessions' calls (event loop; never block) ---------------------------------
    def call(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run ``fn`` on the worker thread between rounds."""
        return self.worker.call(fn)

    def open_stream(self, session_id: str, fps: int, on_result: OnResult) -> None:
        self.worker.post("open", session_id, fps, on_result)

    def push_audio(self, session_id: str, utterance: int, pcm16k: Any) -> None:
        self.worker.post("audio", session_id, utterance, pcm16k)

    def flush_audio(self, session_id: str, utterance: int) -> None:
        self.worker.post("flush", session_id, utterance)

    def plan_frames(self, session_id: str, plans: list[FramePlan]) -> None:
        if plans:
            self.worker.post("plans", session_id, plans)

    def cancel(self, session_id: str, utterance: int | None = None, before_frame: int | None = None) -> None:
        self.worker.post("cancel", session_id, utterance, before_frame)

    def shift(self, session_id: str, utterance: int | None, delta_s: float) -> None:
        """The session's frames (of one utterance, or all) play ``delta_s`` later."""
        self.worker.post("shift", session_id, utterance, delta_s)

    def close_stream(self, session_id: str) -> None:
        self.worker.post("close", session_id)

    def processing_budget_s(self) -> float:
        return self.processing_budget()[0]

    def processing_budget(self) -> tuple[float, dict[str, float] | None]:
        """Time from a frame's audio context being complete to its generated frame, at
        the current load, and the terms it is made of (``worker.processing_budget_parts``;
        None where config model.processing_budget_ms fixes it)."""
        ms = self.settings.model.processing_budget_ms
        if ms is not None:
            return ms / 1000, None
        # Every open session may speak during this utterance: budget for all of them.
        worker = self.worker
        sessions = max(self._speaking + 1, worker.open_streams)
        demand = worker.demand_fps + max(0, sessions - worker.open_streams) * self.settings.video.fps
        parts = worker.processing_budget_parts(sessions, demand)
        return budget_from_parts(parts), parts

    def speaking_changed(self, delta: int) -> None:
        self._speaking = max(0, self._speaking + delta)

    # ---- avatars ---------------------------------------------------------------------
    def _landmarker_for(self, url: str | None, num_frames: int) -> Any:
        """Packaged avatars (asset:NAME) and local files (file://PATH) may ship their
        landmarks as a sidecar ``<video>.landmarks.npy`` (musetalk.avatar.PreparationTools)."""
        from urllib.parse import unquote, urlsplit

        from daemon.config import ASSETS_DIR

        path = None
        if url and url.startswith("asset:"):
            path = ASSETS_DIR / url.removeprefix("asset:")
        elif url and url.startswith("file:"):
            path = Path(unquote(urlsplit(url).path))
        try:
            return self.tools.landmarker_for(path, num_frames)
        except ValueError as exc:
            raise LipsyncError(errors.AVATAR_PREPARATION_FAILED, str(exc)) from None

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

    def _on_prep_stream(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` (blocking: from a thread) on the low-priority stream, so that it
        never delays the live steps, and wait for its GPU work."""
        import contextlib

        import torch

        prep = self._prep_stream
        with torch.cuda.stream(prep) if prep is not None else contextlib.nullcontext():
            result = fn()
        if prep is not None:
            prep.synchronize()
        return result

    async def _prepare(self, key: str, video: Any, options: dict[str, Any], log_: Any, landmarker: Any):
        from musetalk.avatar import load_cached, prepare_avatar, save_prepared

        cfg = self.settings.model
        directory = self.settings.daemon.state_dir / "avatars" / key

        def prepare():
            return self._on_prep_stream(lambda: prepare_avatar(
                video.frames, video.fps, landmarker=landmarker,
                encode_latents=self.engine.models.encode_latents, face_parser=self.face_parser,
                extra_margin=cfg.extra_margin, parsing_mode=cfg.parsing_mode, key=key,
            ))

        t = time.perf_counter()
        # A cached avatar loads at once; only a preparation waits for the ones before it.
        avatar = await asyncio.to_thread(load_cached, directory, key, latents_dtype=self.engine.models.latents_dtype)
        cached = avatar is not None
        if avatar is None:
            async with self._prepare_lock:
                t = time.perf_counter()
                try:
                    avatar = await asyncio.to_thread(prepare)
                    await asyncio.to_thread(save_prepared, avatar, directory, model_version=MODEL_VERSION,
                                            options=options)
                except ValueError as exc:
                    raise LipsyncError(errors.AVATAR_PREPARATION_FAILED,
                                       f"cannot prepare the avatar: {exc}") from None
        elapsed = round((time.perf_counter() - t) * 1000, 1)
        timings = {"avatar_cache_ms" if cached else "avatar_prepare_ms": elapsed}
        # Registered here, once, by the task every concurrent acquirer shares.
        t = time.perf_counter()
        await self.call(lambda: self.engine.register_avatar(avatar))
        timings["register_ms"] = round((time.perf_counter() - t) * 1000, 1)
        self._avatars[key] = avatar
        if self.engine.crop_plan is not None:
            # In the background: the session starts at once on the whole decode.
            task = asyncio.create_task(self._validate_crop(key, log_), name=f"crop-{key[:8]}")
            self._crop_tasks.add(task)
            task.add_done_callback(self._crop_tasks.discard)
        if not cached:
            from musetalk.avatar import evict_prepared

            removed = await asyncio.to_thread(evict_prepared, directory.parent, cfg.avatar_cache_max_bytes,
                                              set(self._avatars) | set(self._avatar_refs))
            if removed:
                log_.info("prepared avatars evicted", count=len(removed),
                          avatar_cache_max_bytes=cfg.avatar_cache_max_bytes)
        log_.info("avatar ready", cached=cached, frames=avatar.num_frames,
                  landmarks=avatar.landmark_source, key=key, **timings)
        return avatar, timings

    async def _validate_crop(self, key: str, log_: Any) -> None:
        """Measure the cropped decode for a registered avatar off the worker (on the
        low-priority stream: live steps go first) and switch the avatar to it if it
        passes; logged once either way, and in `status`."""
        t = time.perf_counter()
        try:
            figures = await asyncio.to_thread(self._on_prep_stream, lambda: self.engine.measure_crop(key))
            sums, sums_high = figures.pop("sums", None), figures.pop("sums_high", None)
            if sums is not None and key in self._avatars:
                await self.call(lambda: self.engine.enable_crop(key, sums, sums_high))
        except Exception as exc:  # the whole decode stays: slower, never wrong
            figures = {"accepted": False, "reason": f"validation failed: {type(exc).__name__}: {exc}"}
        figures["ms"] = round((time.perf_counter() - t) * 1000, 1)
        self.crop_figures[key] = figures
        if figures["accepted"]:
            log_.info("cropped decode on for this avatar", key=key, **figures)
        else:
            log_.warning("cropped decode refused for this avatar; it decodes whole", key=key, **figures)

    async def release_avatar(self, key: str) -> None:
        refs = self._avatar_refs.get(key, 0) - 1
        if refs > 0:
            self._avatar_refs[key] = refs
            return
        self._avatar_refs.pop(key, None)
        self._avatars.pop(key, None)
        self.crop_figures.pop(key, None)
        if self.alive():
            try:
                # Bounded: a wedged GPU must not hang a session's close.
                await asyncio.wait_for(self.call(lambda: self.engine.unregister_avatar(key)), timeout=10)
            except Exception as exc:
                log.warning("unregister avatar failed", key=key, error=repr(exc))

    # ---- shutdown --------------------------------------------------------------------
    async def aclose(self) -> None:
        for task in list(self._crop_tasks):
            task.cancel()
        await asyncio.gather(*self._crop_tasks, return_exceptions=True)
        if self._worker is None:
            return
        thread = self._worker.stop()
        if thread is not None:
            await asyncio.to_thread(thread.join, 10)
