"""The edge's side of the GPU-server process (``daemon.gpu_process = true``).

``GpuServerHost`` is what sessions talk to in place of ``EngineHost``, with the same
calls: it starts ``python -m daemon.gpu_server``, carries audio, plans and controls to
it through a shared-memory ring and hands the finished boxes it sends back to each
session's callback on the event loop. Avatars are acquired over the control socket:
the decoded frames go over as an ``.npy`` file the server maps (removed once it has
them), and the prepared avatar comes back as its key and boxes.

With ``daemon.gpu_socket`` set (``lipsyncd`` does it for its edge processes when
``daemon.edge_processes`` > 1) it starts nothing: it attaches to the one GPU server of
this machine over that unix socket, handing it the rings' names and doorbells, and the
server's own supervisor (``daemon.supervisor``) restarts it.

The supervisor: when the server process dies, every open stream gets one failed frame
(its session sends an ``error`` event and keeps showing idle frames: the frame clock
runs here, not there), the server is started again, the streams are opened and their
avatars acquired again, and new utterances generate as before. The utterances that were
speaking lose their remaining generated frames (fallbacks: idle mouth, audio in sync).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from daemon import errors
from daemon import gpu_wire as wire
from daemon.config import Settings
from daemon.embedded_nats import _die_with_parent
from daemon.errors import LipsyncError
from daemon.log import get_logger
from daemon.metrics import Metrics
from daemon.shm_ring import OrderedWriter, Ring

log = get_logger(__name__)
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
INBOX_BYTES = 16 * 1024 * 1024  # edge -> server: audio and plans
OUTBOX_BYTES = 64 * 1024 * 1024  # server -> edge: boxes (135 kB each at 300x300)
RESTART_DELAY_S = 0.5
# Records the inbox has no room for wait on the edge (in order) up to this many bytes,
# retried this often: about 10 s of the audio of 24 sessions (64 kB/s each).
BACKLOG_BYTES = 16 * 1024 * 1024
BACKLOG_RETRY_S = 0.002
NEED_FRAMES = "need_frames"  # the server's answer to an acquire by name of a video it lacks
MAX_RESTARTS = 10  # in a row without a ready server: then it stays down (health fails)


class ServerDown(RuntimeError):
    """The GPU server process died; it is being started again."""


@dataclass
class RemoteAvatar:
    """What the edge keeps of an avatar prepared in the GPU server."""

    key: str
    num_frames: int
    blend_boxes: np.ndarray
    face_boxes: np.ndarray
    frames: np.ndarray  # the idle video's frames (the edge's copy)
    landmark_source: str | None = None


@dataclass
class _Stream:
    idx: int
    fps: int
    on_result: Callable[[list[tuple[int, int, Any, BaseException | None]]], None]
    last_plan: tuple[int, int] | None = None  # (utterance, frame) of the newest plan


class GpuServerHost:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.measured_fps: float | None = None
        self.one_session_fps: float | None = None
        self.default_fps: int = settings.video.fps
        self.warmup_ms: dict[int, float] = {}
        self.load_s = 0.0
        self.restarts = 0
        self.device: Any = None  # the server's torch.device (its CUDA context lives there)
        self._dir = settings.daemon.state_dir / "gpu-server"
        self._proc: asyncio.subprocess.Process | None = None
        self._inbox: Ring | None = None
        self._outbox: Ring | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._ready = False
        self._closing = False
        self._status: dict[str, Any] = {}
        self._info: dict[str, Any] = {}
        self._streams: dict[str, _Stream] = {}
        self._by_idx: dict[int, _Stream] = {}
        self._next_idx = 0
        self._speaking = 0
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._next_call = 0
        self._avatars: dict[str, tuple[Any, str, str | None, RemoteAvatar]] = {}  # key -> (video, hash, url, avatar)
        self._avatar_refs: dict[str, int] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.dropped_records = 0
        # The inbox's writer: records it has no room for wait there, in order (``_write``).
        self._inbox_records: OrderedWriter | None = None
        self.backlogged_records = 0
        self._dropping = False  # past the bound: records dropped (logged once until it drains)
        self._given_up = False
        self._attach: Path | None = settings.daemon.gpu_socket
        self._server_pid: int | None = None
        self._control: asyncio.Task[Any] | None = None
        metrics.remote = self._remote_metrics

    # ---- lifecycle -------------------------------------------------------------------
    async def start(self) -> None:
        t = time.perf_counter()
        self._dir.mkdir(parents=True, exist_ok=True)
        if self._attach is not None:  # a shared server being restarted: wait for it a while
            deadline = time.monotonic() + self.settings.daemon.start_timeout_s
            while True:
                try:
                    await self._spawn()
                    break
                except ServerDown as exc:
                    if time.monotonic() > deadline:
                        raise LipsyncError(errors.INTERNAL, f"{exc} (lipsyncd starts it; is it running?)") from None
                    await asyncio.sleep(RESTART_DELAY_S)
        else:
            await self._spawn()
        self.load_s = time.perf_counter() - t
        self._spawn_task(self._supervise(), "gpu-server-supervisor")

    async def _spawn(self) -> None:
        """Start a server (or attach to the shared one) and wait for its ``ready``
        (model loaded and warmed up)."""
        if self._attach is not None:
            return await self._connect_shared(self._attach)
        settings_path = self._dir / "settings.json"
        settings_path.write_text(self.settings.model_dump_json())
        os.chmod(settings_path, 0o600)
        self._inbox, self._outbox = Ring.create(INBOX_BYTES), Ring.create(OUTBOX_BYTES)
        self._inbox_records = self._inbox_writer(self._inbox)
        ours, theirs = socket.socketpair()
        fds = (self._inbox.doorbell, self._outbox.doorbell, theirs.fileno())
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")])))
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.gpu_server", "--settings", str(settings_path),
            "--inbox", self._inbox.name, str(self._inbox.doorbell),
            "--outbox", self._outbox.name, str(self._outbox.doorbell), "--control", str(theirs.fileno()),
            pass_fds=fds, preexec_fn=_die_with_parent(), env=env)
        theirs.close()
        self._reader, self._writer = await asyncio.open_connection(sock=ours)
        await self._handshake()

    async def _connect_shared(self, path: Path) -> None:
        """Attach to the GPU server that listens on ``path``: a hello naming this edge's
        rings, with their doorbells passed as SCM_RIGHTS."""
        self._inbox, self._outbox = Ring.create(INBOX_BYTES), Ring.create(OUTBOX_BYTES)
        self._inbox_records = self._inbox_writer(self._inbox)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, str(path))
            hello = {"role": "edge", "name": self.settings.daemon.edge_name or f"edge-{os.getpid()}",
                     "pid": os.getpid(), "inbox": self._inbox.name, "outbox": self._outbox.name}
            sock.setblocking(True)
            socket.send_fds(sock, [json.dumps(hello).encode() + b"\n"], [self._inbox.doorbell, self._outbox.doorbell])
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            await self._reap()
            raise ServerDown(f"no GPU server on {path}: {exc}") from None
        self._reader, self._writer = await asyncio.open_connection(sock=sock)
        await self._handshake()

    async def _handshake(self) -> None:
        assert self._reader is not None and self._outbox is not None
        first = await self._reader.readline()
        message = json.loads(first) if first else {"op": "failed", "code": errors.INTERNAL,
                                                    "message": "the GPU server exited while starting"}
        if message.get("op") != "ready":
            await self._reap()
            raise LipsyncError(message.get("code", errors.INTERNAL),
                               f"the GPU server did not start: {message.get('message')}")
        self.measured_fps = message.get("measured_fps")
        self.one_session_fps = message.get("one_session_fps")
        self.default_fps = message.get("default_fps") or self.default_fps
        self.warmup_ms = {int(k): v for k, v in (message.get("warmup_ms") or {}).items()}
        import torch  # a device name only: no CUDA context is made here

        self.device = torch.device(message.get("device") or "cpu")
        self._server_pid = message.get("pid")
        asyncio.get_running_loop().add_reader(self._outbox.doorbell, self._on_outbox)
        self._control = asyncio.create_task(self._control_replies(self._reader), name="gpu-server-control")
        self._tasks.add(self._control)
        self._control.add_done_callback(self._tasks.discard)
        self._ready = True
        self.metrics.gpu_server_up.set(1)
        log.info("GPU server ready", pid=self._server_pid, device=message.get("device"),
                 measured_fps=self.measured_fps, restarts=self.restarts, shared=self._attach is not None)

    async def _supervise(self) -> None:
        failures = 0
        while not self._closing:
            if self._attach is not None:  # the shared server: its connection ends when it dies
                assert self._control is not None
                await asyncio.gather(self._control, return_exceptions=True)
                code: Any = "unknown (a shared server: lipsyncd restarts it)"
            else:
                assert self._proc is not None
                code = await self._proc.wait()
            if self._closing:
                return
            self._ready = False
            self.metrics.gpu_server_up.set(0)
            log.error("the GPU server process exited; restarting it, sessions show idle frames meanwhile",
                      exit_code=code, pid=self._server_pid, restarts=self.restarts)
            self._server_lost(ServerDown(f"the GPU server process exited with code {code}; it is being restarted"))
            await self._reap()
            while not self._closing:
                await asyncio.sleep(RESTART_DELAY_S)
                try:
                    await self._spawn()
                    self.restarts += 1
                    self.metrics.gpu_server_restarts.inc()
                    failures = 0
                    await self._restore()
                    break
                except Exception as exc:
                    failures += 1
                    self._ready = False
                    await self._reap()  # a half-restored server goes too: the next try starts clean
                    if self._attach is not None:  # the supervisor restarts it; its model loads meanwhile
                        if failures == 1 or failures % 20 == 0:
                            log.warning("waiting for the shared GPU server", error=str(exc), attempt=failures)
                        continue
                    log.error("the GPU server failed to start again", error=str(exc), attempt=failures)
                    if failures >= MAX_RESTARTS:
                        log.error("the GPU server stays down: the daemon is not live", attempts=failures)
                        self._given_up = True
                        return

    def _server_lost(self, error: BaseException) -> None:
        for call in self._calls.values():
            if not call.done():
                call.set_exception(error)
        self._calls.clear()
        for st in self._streams.values():
            if st.last_plan is not None:
                st.on_result([(st.last_plan[0], st.last_plan[1], None, error)])

    async def _restore(self) -> None:
        """Streams and avatars the sessions hold, in the new server."""
        for sid, st in self._streams.items():
            self._write(wire.OPEN, wire.open_stream(st.idx, st.fps, sid))
        if self._speaking:
            self._write(wire.SPEAKING, wire.speaking(self._speaking))
        for key, (video, content_hash, url, _) in list(self._avatars.items()):
            for _ in range(self._avatar_refs.get(key, 0)):  # the server counts holders as we do
                await self._acquire_remote(video, content_hash, url, None)

    async def _reap(self) -> None:
        self._clear_backlog()
        loop = asyncio.get_running_loop()
        for ring in (self._inbox, self._outbox):
            if ring is not None:
                if ring is self._outbox:
                    loop.remove_reader(ring.doorbell)
                ring.close()
        self._inbox = self._outbox = None
        self._inbox_records = None
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()

    async def aclose(self) -> None:
        self._closing = True
        if self._ready and self._attach is None:  # a shared server is lipsyncd's to stop
            try:
                await asyncio.wait_for(self._call("shutdown"), timeout=5)
            except Exception:
                pass
        if self._proc is not None and self._proc.returncode is None:
            try:
                await asyncio.wait_for(self._proc.wait(), timeout=15)
            except asyncio.TimeoutError:
                self._proc.kill()
        self._ready = False
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._reap()

    def _spawn_task(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def pid(self) -> int | None:
        return self._server_pid

    # ---- control path ----------------------------------------------------------------
    async def _call(self, op: str, **args: Any) -> Any:
        if not self._ready or self._writer is None:
            raise ServerDown("the GPU server is restarting")
        self._next_call += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[self._next_call] = fut
        self._writer.write(json.dumps({"id": self._next_call, "op": op, "args": args}).encode() + b"\n")
        await self._writer.drain()
        return await fut

    async def _control_replies(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            reply = json.loads(line)
            fut = self._calls.pop(reply.get("id"), None)
            if fut is None or fut.done():
                continue
            if reply.get("ok"):
                fut.set_result(reply.get("result"))
            else:
                fut.set_exception(LipsyncError(reply.get("code", errors.INTERNAL), reply.get("message", "")))

    # ---- hot path --------------------------------------------------------------------
    def _write(self, kind: int, *parts: Any) -> None:
        if not self._ready or self._inbox is None:
            self.dropped_records += 1  # the server is restarting: nothing to tell it
            return
        # A lost audio record would shift the rest of its utterance against the clock (and
        # a lost plan would drop its frames), so records wait, in order, while the server
        # catches up: dropped only past a bound (the server then is stuck, not slow).
        records = self._inbox_records
        assert records is not None
        outcome = records.write(kind, *parts)
        if outcome == "waiting":
            self.backlogged_records += 1
            if records.waiting == 1:
                log.warning("the GPU server is behind: records wait in order until its inbox has room",
                            kind=kind, inbox=f"{self._inbox.used()} of {self._inbox.capacity} bytes unread",
                            session_id=self._record_session(kind, parts))
        elif outcome == "dropped":
            self.dropped_records += 1
            if not self._dropping:  # once until the backlog drains (a stuck server: 550 a second)
                self._dropping = True
                log.error("the GPU server is not reading: records are dropped until it reads again", kind=kind,
                          waiting_bytes=records.waiting_bytes, session_id=self._record_session(kind, parts))

    def _inbox_writer(self, inbox: Ring) -> OrderedWriter:
        return OrderedWriter(inbox, BACKLOG_RETRY_S, BACKLOG_BYTES, on_drained=self._backlog_drained)

    def _backlog_drained(self) -> None:
        if self._dropping:
            self._dropping = False
            log.info("the GPU server reads again: no record waits", dropped_records=self.dropped_records)

    def _record_session(self, kind: int, parts: tuple[Any, ...]) -> str | None:
        """The session a record is for (every kind but SPEAKING starts with its stream
        index), for the log."""
        if kind == wire.SPEAKING or not parts or len(parts[0]) < 4:
            return None
        idx = int.from_bytes(bytes(parts[0][:4]), "little")
        return next((sid for sid, st in self._streams.items() if st.idx == idx), None)

    def _clear_backlog(self) -> None:
        """Records waiting for a server that is gone: its successor starts from ``_restore``."""
        if self._inbox_records is not None:
            self.dropped_records += self._inbox_records.clear()
        self._dropping = False

    def _on_outbox(self) -> None:
        if self._outbox is None:
            return
        for kind, payload in self._outbox.drain():
            if kind == wire.RESULTS:
                idx, results = wire.read_results(payload)
                st = self._by_idx.get(idx)
                if st is not None:  # else closed meanwhile: nobody waits for these
                    st.on_result(results)
            elif kind == wire.STATUS:
                self._status = wire.read_status(payload)

    # ---- the sessions' calls (as EngineHost's) -------------------------------------------
    def alive(self) -> bool:
        """The server is up and ready now (``/health``)."""
        if self._attach is not None:
            return self._ready and self._control is not None and not self._control.done()
        return self._ready and self._proc is not None and self._proc.returncode is None

    def live(self) -> bool:
        """Up, or being restarted (``/livez`` and the watchdog): False only once the
        supervisor has given up (``MAX_RESTARTS`` failed starts in a row)."""
        return self.alive() or (not self._given_up and not self._closing)

    def other_rates(self) -> list[int]:
        """The fps of the streams other edge processes have open on a shared server."""
        return list(self._status.get("other_rates") or [])

    def busy_fraction(self) -> float | None:
        return self._status.get("busy")

    def processing_budget_s(self) -> float:
        return self.processing_budget()[0]

    def processing_budget(self) -> tuple[float, dict[str, float] | None]:
        # The server's figure for its current load and its terms; while it restarts, the
        # last one (an utterance placed meanwhile falls back anyway).
        return float(self._status.get("budget_s") or 0.25), self._status.get("budget_parts")

    def device_info(self) -> dict[str, Any]:
        return {"gpu_process": {"pid": self.pid, "alive": self.alive(), "restarts": self.restarts,
                                "dropped_records": self.dropped_records,
                                "backlogged_records": self.backlogged_records,
                                "loop_lag_ms_max": self._status.get("loop_lag_ms_max"),
                                "gil_switch_ms": self._status.get("gil_switch_ms"),
                                "gc_frozen": self._status.get("gc_frozen"),
                                "inbox_used_max": self._status.get("inbox_used_max")},
                "steps": self._status.get("steps", 0), "frames_generated": self._status.get("frames_generated", 0),
                "measured_fps": self.measured_fps, "load_s": round(self.load_s, 1), **self._info}

    async def thread_names(self) -> dict[int, str]:
        """The server's Python threads: native id -> name (a control call)."""
        return {int(k): v for k, v in (await self._call("threads")).items()}

    async def refresh_info(self) -> dict[str, Any]:
        """The server's own ``device_info`` (a control call)."""
        self._info = await self._call("info")
        return self.device_info()

    # The counters and estimates the loadtest reads (from the newest status: at most
    # gpu_server.STATUS_PERIOD_S old).
    @property
    def steps(self) -> int:
        return int(self._status.get("steps", 0))

    @property
    def frames_generated(self) -> int:
        return int(self._status.get("frames_generated", 0))

    @property
    def step_s(self) -> float:
        return float(self._status.get("step_s", 0.0))

    @property
    def late_frames(self) -> tuple[int, int]:
        late = self._status.get("late_frames") or (0, 0)
        return int(late[0]), int(late[1])

    def estimates(self) -> dict[str, Any]:
        return self._status.get("estimates") or {}

    async def reset_peak_memory(self) -> None:
        await self._call("reset_peak_memory")

    async def _remote_metrics(self) -> str:
        return await self._call("metrics")

    async def peak_memory_mb(self) -> float | None:
        return await self._call("peak_memory_mb")

    def speaking_changed(self, delta: int) -> None:
        self._speaking += delta
        self._write(wire.SPEAKING, wire.speaking(delta))

    def open_stream(self, session_id: str, fps: int, on_result: Any) -> None:
        self._next_idx += 1
        st = self._streams[session_id] = self._by_idx[self._next_idx] = _Stream(self._next_idx, fps, on_result)
        self._write(wire.OPEN, wire.open_stream(st.idx, fps, session_id))

    def close_stream(self, session_id: str) -> None:
        st = self._streams.pop(session_id, None)
        if st is not None:
            self._by_idx.pop(st.idx, None)
            self._write(wire.CLOSE, wire.index(st.idx))

    def push_audio(self, session_id: str, utterance: int, pcm16k: Any) -> None:
        self._write(wire.AUDIO, *wire.audio(self._streams[session_id].idx, utterance, pcm16k))

    def flush_audio(self, session_id: str, utterance: int) -> None:
        self._write(wire.FLUSH, wire.utterance(self._streams[session_id].idx, utterance))

    def plan_frames(self, session_id: str, plans: list[Any]) -> None:
        if not plans:
            return
        st = self._streams[session_id]
        st.last_plan = (plans[-1].utterance, plans[-1].frame)
        self._write(wire.PLANS, *wire.plans(st.idx, plans[0].avatar_key, plans))

    def cancel(self, session_id: str, utterance: int | None = None, before_frame: int | None = None) -> None:
        st = self._streams.get(session_id)
        if st is not None:
            self._write(wire.CANCEL, wire.cancel(st.idx, utterance, before_frame))

    def shift(self, session_id: str, utterance: int | None, delta_s: float) -> None:
        st = self._streams.get(session_id)
        if st is not None:
            self._write(wire.SHIFT, wire.shift(st.idx, utterance, delta_s))

    # ---- avatars ---------------------------------------------------------------------
    async def acquire_avatar(self, video: Any, content_hash: str, log_: Any,
                             url: str | None = None) -> tuple[RemoteAvatar, dict[str, float]]:
        avatar, timings = await self._acquire_remote(video, content_hash, url, log_)
        self._avatar_refs[avatar.key] = self._avatar_refs.get(avatar.key, 0) + 1
        return avatar, timings

    async def _acquire_remote(self, video: Any, content_hash: str, url: str | None,
                              log_: Any) -> tuple[RemoteAvatar, dict[str, float]]:
        args = dict(fps=float(video.fps), duration_s=float(video.duration_s), content_hash=content_hash, url=url)
        try:
            try:  # a video the server holds already (another session's) goes over by name only
                result = await self._call("acquire", frames=None, **args)
            except LipsyncError as exc:
                if exc.code != NEED_FRAMES:
                    raise
                path = self._dir / "videos" / f"{content_hash}-{os.getpid()}-{time.monotonic_ns()}.npy"
                path.parent.mkdir(parents=True, exist_ok=True)
                await asyncio.to_thread(np.save, path, np.ascontiguousarray(video.frames), allow_pickle=False)
                try:
                    result = await self._call("acquire", frames=str(path.resolve()), **args)  # the server may run elsewhere
                finally:
                    path.unlink(missing_ok=True)  # the server maps it; the mapping outlives the name
        except ServerDown:
            raise LipsyncError(errors.INTERNAL, "the GPU server is restarting: try the start again in a few "
                                                "seconds") from None
        avatar = RemoteAvatar(key=result["key"], num_frames=result["num_frames"],
                              blend_boxes=np.asarray(result["blend_boxes"], np.int32),
                              face_boxes=np.asarray(result["face_boxes"], np.int32), frames=video.frames,
                              landmark_source=result.get("landmark_source"))
        self._avatars[avatar.key] = (video, content_hash, url, avatar)
        return avatar, result.get("timings") or {}

    async def release_avatar(self, key: str) -> None:
        """One holder less, here and in the server (which counts holders the same way)."""
        refs = self._avatar_refs.get(key, 0) - 1
        if refs > 0:
            self._avatar_refs[key] = refs
        else:
            self._avatar_refs.pop(key, None)
            self._avatars.pop(key, None)
        if self.alive():
            try:
                await asyncio.wait_for(self._call("release", key=key), timeout=10)
            except Exception as exc:
                log.warning("release avatar failed", key=key, error=repr(exc))
