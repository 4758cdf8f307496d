"""The daemon: startup -> run -> drain(timeout) -> aclose.

NATS callbacks only validate and enqueue; anything slow (avatar preparation, publisher
connection) runs in tracked tasks, and GPU work runs on the engine's own thread.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Literal

from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import EndpointConfig, Service

from daemon import errors
from daemon.bus import Subjects, connect
from daemon.config import DaemonSection, Settings, uses_gpu_process
from daemon.embedded_nats import EmbeddedNatsServer
from daemon.errors import LipsyncError
from daemon.health import HealthServer
from daemon.log import get_logger, redact_url
from daemon.metrics import Metrics
from daemon.protocol import parse_json_message, session_id_hint, valid_session_id
from daemon.publishers.base import MediaFormat
from daemon.session import Session, SessionDeps
from daemon.speech import make_speech
from daemon.systemd import SystemdNotifier
from schemas import (
    ControlMessage,
    ControlReply,
    ErrorEvent,
    SessionStart,
    SessionStartReply,
    SessionStop,
    SessionStopReply,
    StatusReply,
)
from schemas.wire import StatusAdmission

log = get_logger(__name__)

VERSION = "0.1.0"

# Past daemon.shutdown_timeout_s (the drain), releasing everything (MP4s finalized, the
# worker joined, the embedded nats-server stopped) gets this long before a forced exit.
SHUTDOWN_GRACE_S = 5.0


CapacitySource = Literal["measured", "config", "max_sessions"]


@dataclass(frozen=True)
class Capacity:
    """The frames/s admission may promise, and where the figure comes from."""

    fps: float | None  # None: no frame budget, only daemon.max_sessions applies
    source: CapacitySource


class Admission:
    """Whether one more session fits. A session may speak at any time, so each admitted
    one counts its fps x ``daemon.speech_duty`` against the frames/s the GPU sustains
    (``daemon.capacity_fps``, else the figure the GPU worker measured at start);
    ``daemon.max_sessions`` bounds the count either way. Pure bookkeeping: the daemon
    asks with the frame rates of its sessions."""

    def __init__(self, cfg: DaemonSection, default_fps: int, measured_fps: Callable[[], float | None]) -> None:
        self.cfg = cfg
        self.default_fps = default_fps
        self._measured_fps = measured_fps

    def capacity(self) -> Capacity:
        if self.cfg.capacity_fps > 0:
            return Capacity(self.cfg.capacity_fps, "config")
        measured = self._measured_fps()
        if isinstance(measured, (int, float)) and math.isfinite(measured) and measured > 0:
            return Capacity(float(measured), "measured")
        return Capacity(None, "max_sessions")

    def demand(self, rates: Iterable[int]) -> float:
        return sum(rates) * self.cfg.speech_duty

    def refusal(self, rates: list[int], fps: int | None = None) -> str | None:
        """Why a session at ``fps`` (default: video.fps) cannot be admitted next to
        sessions at ``rates``, in words that say what to change; None when it fits."""
        fps = fps or self.default_fps
        if len(rates) >= self.cfg.max_sessions:
            return (f"at capacity ({self.cfg.max_sessions} sessions, daemon.max_sessions): retry later "
                    "or add a GPU")
        cap = self.capacity()
        if cap.fps is None:
            return None
        demand = self.demand(rates)
        need = fps * self.cfg.speech_duty
        if demand + need <= cap.fps * (1 + 1e-9):
            return None
        budget = (f"{_num(cap.fps)} frames/s this GPU sustains (measured at start; daemon.capacity_fps "
                  "overrides)" if cap.source == "measured" else f"{_num(cap.fps)} frames/s (daemon.capacity_fps)")
        if not rates:
            return (f"at capacity: a {fps} fps session needs {_num(need)} frames/s, more than the {budget}: "
                    "start it at a lower video.fps, or run it on a faster GPU")
        if len(set(rates)) == 1:
            load = f"{len(rates)} session{'s' if len(rates) > 1 else ''} x {rates[0]} fps"
        else:
            load = f"{len(rates)} sessions at {min(rates)}-{max(rates)} fps"
        if self.cfg.speech_duty != 1:
            load += f" x speech_duty {_num(self.cfg.speech_duty)}"
        return (f"at capacity: {load} = {_num(demand)} frames/s of {budget}; a {fps} fps session needs "
                f"{_num(need)} more: retry later or add a GPU")

    def max_sessions_at(self, fps: int | None = None) -> int:
        """Most sessions at ``fps`` (default: video.fps) admitted, with none yet live."""
        cap = self.capacity()
        if cap.fps is None:
            return self.cfg.max_sessions
        fitting = math.floor(cap.fps * (1 + 1e-9) / ((fps or self.default_fps) * self.cfg.speech_duty))
        return min(self.cfg.max_sessions, fitting)


# How a reported error is named in the log: a failure of the daemon's own parts (the
# publisher, the avatar's video and its preparation) or a refusal, apart from a
# producer's bad message ("bad input", every other code).
_LOG_EVENTS = {
    errors.PUBLISHER_FAILED: "publisher failed",
    errors.AVATAR_PREPARATION_FAILED: "avatar failed",
    errors.AVATAR_NO_VIDEO: "avatar failed",
    errors.FIRESTORE_UNAVAILABLE: "avatar failed",
    errors.VIDEO_FETCH_FAILED: "avatar failed",
    errors.VIDEO_TOO_LARGE: "avatar failed",
    errors.VIDEO_INVALID: "avatar failed",
    errors.AT_CAPACITY: "start refused",
    errors.SHUTTING_DOWN: "start refused",
    errors.INTERNAL: "internal error",
}


def _num(x: float) -> str:
    """A rate for people: 300, 312.5, 0.25."""
    return f"{x:.2f}".rstrip("0").rstrip(".")


def generated_fraction(*counts: dict[str, int]) -> float | None:
    """Speech frames generated / speech frames that needed generation (generated +
    fallback), over the speech pipelines' frame counts given; None when no frame
    needed generation (no speech yet, or no model)."""
    speech = fallback = 0
    for c in counts:
        speech += c.get("speech", 0)
        fallback += c.get("fallback", 0)
    return round(speech / (speech + fallback), 4) if speech + fallback else None


class Daemon:
    def __init__(self, settings: Settings, room_connector: Any = None) -> None:
        """``room_connector``: how LiveKit rooms are joined (default: the real
        ``rtc.Room``); the one seam tests replace, since no LiveKit server runs there."""
        self.settings = settings
        self.room_connector = room_connector
        self.subjects = Subjects(settings.nats.subject_prefix)
        self.metrics = Metrics()
        self.sessions: dict[str, Session] = {}
        self._starting: dict[str, asyncio.Task[Any]] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        self.accepting = False
        self.nc: NatsClient | None = None
        self.nats_connected = False
        self._embedded: EmbeddedNatsServer | None = None
        self._service: Service | None = None
        self._health: HealthServer | None = None
        self._heartbeat_at = time.monotonic()
        self._stopping = asyncio.Event()
        self._signals_seen = 0
        self._drained = False
        self._drain_lock = asyncio.Lock()
        self.notifier = SystemdNotifier()
        self.nats_url: str | None = None
        self._seen_unknown: dict[tuple[str, str], float] = {}
        self._closing: set[Session] = set()
        self._output_down_since: dict[str, float] = {}  # session id -> when its output went down
        from daemon.avatars import AvatarResolver, AvatarStore

        self.resolver = AvatarResolver(settings)
        self.store = AvatarStore(settings)
        self.engine_host: Any = None  # daemon.engine_host.EngineHost when a model is enabled
        self.registry: Any = None  # daemon.registry.SessionRegistry with nats.registry_bucket
        self.admission = Admission(settings.daemon, settings.video.fps,
                                   lambda: getattr(self.engine_host, "measured_fps", None))
        self._update_gauges()

    # ---- startup ---------------------------------------------------------------------
    def check_config(self) -> None:
        """Raise, before anything starts, on a config that would fail every session
        later (LiveKit without its credentials): the daemon must not come up "ready"."""
        problem = self.settings.livekit_problem() or self.settings.gpu_process_problem()
        if problem is not None:
            raise LipsyncError("config_invalid", problem)

    async def start(self) -> None:
        s = self.settings
        self.check_config()
        s.daemon.state_dir.mkdir(parents=True, exist_ok=True)
        sys.setswitchinterval(s.daemon.gil_switch_ms / 1000)  # process-wide: see the setting
        if s.nats.url == "embedded":
            self._embedded = EmbeddedNatsServer(
                s.nats.embedded_host, s.nats.embedded_port, s.daemon.state_dir / "nats"
            )
            await self._embedded.start()
            servers = [self._embedded.url]
        else:
            servers = [u.strip() for u in s.nats.url.split(",") if u.strip()]
        self.nats_url = servers[0]
        if s.model.enabled:
            if uses_gpu_process(s) or s.daemon.gpu_socket is not None:
                from daemon.gpu_client import GpuServerHost

                self.engine_host = GpuServerHost(s, self.metrics)
            else:
                from daemon.engine_host import EngineHost

                self.engine_host = EngineHost(s, self.metrics)
            await self.engine_host.start()
        self.nc = await connect(s.nats, servers, on_state=self._on_nats_state)
        self.nats_connected = True
        if s.nats.registry_bucket:
            from daemon.registry import SessionRegistry

            self.registry = SessionRegistry(self.nc, s.nats.registry_bucket, s.nats.registry_ttl_s)
            await self.registry.start()
            self._spawn(self._refresh_registry(), "registry")
        await self._subscribe()
        if s.http.enabled:
            self._health = HealthServer(s.http.host, s.http.port, self.metrics, self.health_check,
                                        live=self.liveness, ready=self.readiness, port_file=s.http.port_file)
            await self._health.start()
        self._spawn(self._heartbeat(), "heartbeat")
        if s.daemon.gc_freeze:
            gc.collect()
            gc.freeze()  # see the setting: later full collections skip the start-up objects
        self.accepting = True
        self._update_gauges()
        capacity = self.admission.capacity()
        self.notifier.ready(f"accepting sessions on {self.subjects.start}")
        log.info("lipsyncd ready", nats=redact_url(self.nats_url), start_subject=self.subjects.start,
                 sink=s.sink_kind(), max_sessions=s.daemon.max_sessions,
                 capacity_fps=capacity.fps, capacity_source=capacity.source,
                 sessions_admitted=self.admission.max_sessions_at(),
                 model=("enabled" if self.engine_host else "disabled (idle video only)"))
        if self.admission.max_sessions_at() == 0:
            log.warning("the frame budget is below one session: every start will be refused "
                        "(at_capacity); set daemon.capacity_fps or lower daemon.speech_duty",
                        capacity_fps=capacity.fps, source=capacity.source, fps=s.video.fps,
                        speech_duty=s.daemon.speech_duty)

    async def _subscribe(self) -> None:
        assert self.nc is not None
        s = self.settings
        self._service = await add_service(
            self.nc, name=s.nats.service_name, version=VERSION,
            description="MuseTalk lip-sync video daemon", queue_group=s.nats.queue_group,
        )
        await self._service.add_endpoint(EndpointConfig(
            name="start", subject=self.subjects.start, handler=self._on_start,
            queue_group=s.nats.queue_group))
        # An edge of lipsyncd (daemon.edge_processes > 1) answers on a subject of its own:
        # lipsyncd answers <prefix>.status with every edge's reply merged.
        status = (f"{s.nats.subject_prefix}.status" if not s.daemon.edge_index
                  else f"{s.nats.subject_prefix}.status.{s.daemon.edge_name}")
        await self._service.add_endpoint(EndpointConfig(name="status", subject=status, handler=self._on_status))
        # stop, audio and control go to every daemon: only the owner of a session acts.
        limits = dict(pending_msgs_limit=65536, pending_bytes_limit=256 * 1024 * 1024)
        await self.nc.subscribe(self.subjects.stop, cb=self._on_stop)
        # Audio and control share one subscription: NATS keeps a producer's messages in
        # order within a subscription, so a flush is applied after the audio sent before it.
        await self.nc.subscribe(self.subjects.session_wildcard, cb=self._on_session_message, **limits)
        # The server must know our subscriptions before we call ourselves ready.
        await self.nc.flush()

    async def _on_nats_state(self, connected: bool) -> None:
        self.nats_connected = connected

    # ---- errors ----------------------------------------------------------------------
    async def _publish(self, subject: str, payload: bytes) -> None:
        if self.nc is None or self.nc.is_closed:
            return
        try:
            await self.nc.publish(subject, payload)
        except Exception as exc:  # buffer full while disconnected: say so once per event
            log.warning("could not publish", subject=subject, error=str(exc) or type(exc).__name__)

    async def emit(self, event: Any) -> None:
        await self._publish(self.subjects.events(event.session_id), event.model_dump_json().encode())

    async def _report(self, err: LipsyncError, *, session_id: str | None, reply: Any = None,
                      reply_model: Any = None, subject: str = "") -> None:
        """One error, told once: as the reply when there is a reply subject, else as an
        error event on the session's events subject (or <prefix>.errors without one)."""
        self.metrics.errors.labels(err.code).inc()
        log.warning(_LOG_EVENTS.get(err.code, "bad input"), session_id=session_id, code=err.code,
                    error=err.message, subject=subject)
        if reply is not None and reply_model is not None:
            body = reply_model(ok=False, session_id=session_id, error=err.to_dict())
            await reply(body.model_dump_json(exclude_none=True).encode())
            return
        event = ErrorEvent(session_id=session_id or "", ts=time.time(), code=err.code, message=err.message)
        subject_out = (self.subjects.events(session_id) if session_id
                       else f"{self.settings.nats.subject_prefix}.errors")
        await self._publish(subject_out, event.model_dump_json().encode())

    # ---- handlers --------------------------------------------------------------------
    async def _parse_request(self, model: Any, data: bytes, subject: str, reply: Any, reply_model: Any) -> Any:
        """The validated message, or None once its error has been reported (to the
        session the message names, when its id is a safe one)."""
        try:
            return parse_json_message(model, data, subject.removeprefix(f"{self.subjects.prefix}."))
        except LipsyncError as err:
            await self._report(err, session_id=session_id_hint(data), reply=reply, reply_model=reply_model,
                               subject=subject)
            return None

    def _replier(self, msg: Msg) -> Any:
        return (lambda body: self._publish(msg.reply, body)) if msg.reply else None

    async def _on_start(self, req: Request) -> None:
        reply = req.respond if req._msg.reply else None
        start = await self._parse_request(SessionStart, req.data, req.subject, reply, SessionStartReply)
        if start is None:
            return
        # Slow work in a tracked task: this callback must return quickly.
        self._spawn(self._start_session(start, reply), f"start-{start.session_id}")

    async def _start_session(self, start: SessionStart, reply: Any) -> None:
        sid = start.session_id
        # Another start for this id in flight: its outcome decides (idempotent or not).
        while (pending := self._starting.get(sid)) is not None:
            await asyncio.wait({pending})
        existing = self.sessions.get(sid)
        if existing is not None:
            if existing.info is None or existing.closed:
                err = LipsyncError(errors.SESSION_CONFLICT, f"session '{sid}' is stopping: retry the start "
                                   "in a moment or use a new session_id")
            elif existing.request != start:
                err = LipsyncError(errors.SESSION_CONFLICT, f"session '{sid}' is live with other parameters: "
                                   "stop it first or use a new session_id")
            else:
                await self._reply_started(existing, reply, existing_session=True)
                return
            await self._report(err, session_id=sid, reply=reply, reply_model=SessionStartReply)
            return
        if not self.accepting:
            await self._report(LipsyncError(errors.SHUTTING_DOWN, "daemon is shutting down: start the "
                               "session on another instance"), session_id=sid, reply=reply,
                               reply_model=SessionStartReply)
            return
        refusal = self.admission.refusal(self._session_rates(), start.video.fps)
        if refusal is not None:
            await self._report(LipsyncError(errors.AT_CAPACITY, refusal), session_id=sid, reply=reply,
                               reply_model=SessionStartReply)
            return
        session = Session(start, self._session_deps())
        self.sessions[sid] = session
        self._update_gauges()
        self._starting[sid] = asyncio.current_task()  # type: ignore[assignment]
        claimed = False
        try:
            if self.registry is not None:
                await self.registry.claim(sid)
                claimed = True
            await self._update_admission()
            try:
                async with asyncio.timeout(self.settings.daemon.start_timeout_s):
                    await session.start()
            except TimeoutError:
                raise LipsyncError(errors.START_TIMEOUT, f"the session did not start within "
                                   f"daemon.start_timeout_s = {self.settings.daemon.start_timeout_s:g} s "
                                   "(avatar fetch, decode, preparation and publisher); retry, or raise "
                                   "the limit for long idle videos") from None
        except BaseException as exc:
            if self.sessions.get(sid) is session:
                del self.sessions[sid]
                self.metrics.forget_session(sid)
                await asyncio.shield(self._update_admission())
            if claimed:
                await asyncio.shield(self.registry.release(sid))
            if isinstance(exc, asyncio.CancelledError):
                await asyncio.shield(self._report(
                    LipsyncError(errors.SHUTTING_DOWN, "daemon is shutting down: start the session on "
                                 "another instance"), session_id=sid, reply=reply, reply_model=SessionStartReply))
                raise
            if isinstance(exc, LipsyncError):
                await self._report(exc, session_id=sid, reply=reply, reply_model=SessionStartReply)
            elif isinstance(exc, Exception):
                log.exception("session start failed", session_id=sid)
                await self._report(LipsyncError(errors.INTERNAL, f"session start failed: {exc}"),
                                   session_id=sid, reply=reply, reply_model=SessionStartReply)
            else:
                raise
            return
        finally:
            if self._starting.get(sid) is asyncio.current_task():
                del self._starting[sid]
            self._update_gauges()
        self.metrics.sessions_started.inc()
        await self._reply_started(session, reply, existing_session=False)

    async def _reply_started(self, session: Session, reply: Any, existing_session: bool) -> None:
        if reply is None or session.info is None:
            return
        info = session.info
        body = SessionStartReply(ok=True, session_id=session.id, existing=existing_session,
                                 width=info.width, height=info.height, fps=info.fps, output=info.output)
        await reply(body.model_dump_json(exclude_none=True).encode())

    def _session_deps(self) -> SessionDeps:
        from daemon.publishers.factory import make_publisher

        def publisher(sid: str, fmt: MediaFormat, room: str | None, identity: str | None, token: str | None):
            return make_publisher(self.settings, sid, fmt, room, identity, token,
                                  room_connector=self.room_connector)

        async def acquire(url: str):
            return await self.store.get(url)

        return SessionDeps(
            settings=self.settings, metrics=self.metrics, emit=self.emit,
            resolve_url=self.resolver.resolve, acquire_video=acquire,
            release_video=self.store.release, make_publisher=publisher,
            on_fatal=self._close_later,
            make_speech=functools.partial(make_speech, self.engine_host) if self.engine_host else None,
            default_fps=(lambda: self.engine_host.default_fps) if self.engine_host else None,
        )

    def _close_later(self, session: Session, reason: str) -> None:
        self._spawn(self._close_session(session, reason), f"close-{session.id}")

    async def _close_session(self, session: Session, reason: str) -> None:
        # The close runs to its end even when this caller is cancelled (a drain timing
        # out): the MP4 is finalized, the avatar released and `stopped` sent.
        self._closing.add(session)
        try:
            await asyncio.shield(session.aclose(reason))
        finally:
            if session.close_task is None or session.close_task.done():
                self._closing.discard(session)
        if self.sessions.get(session.id) is session:
            del self.sessions[session.id]
            self.metrics.forget_session(session.id)
            if self.registry is not None:
                await self.registry.release(session.id)
            await self._update_admission()
        self._update_gauges()

    def _session_rates(self) -> list[int]:
        """The fps of every admitted session, live or starting: each may speak at any time;
        with several edge processes, the other edges' streams on the shared GPU too."""
        others = getattr(self.engine_host, "other_rates", None)
        return [s.fps for s in self.sessions.values()] + (others() if others is not None else [])

    def _update_gauges(self) -> None:
        """Sessions, frame budget and demand, as /metrics shows them: after every change."""
        self.metrics.sessions_active.set(len(self.sessions))
        capacity = self.admission.capacity()
        self.metrics.capacity_fps.set(capacity.fps if capacity.fps is not None else math.nan)
        self.metrics.demand_fps.set(self.admission.demand(self._session_rates()))

    async def _update_admission(self) -> None:
        """Several daemons sharing the start queue group (report_unknown_sessions off): a
        full daemon (one that would refuse a start at video.fps) leaves the group, so NATS
        hands new starts to one with room, and rejoins when a session ends. A lone daemon
        stays and answers at_capacity."""
        if self.settings.nats.report_unknown_sessions or self._service is None or not self.accepting:
            return
        if self.settings.daemon.edge_index == 1:
            # lipsyncd's first edge stays: the edges count one GPU's demand alike, so when
            # one is full all are, and this one answers at_capacity.
            return
        full = self.admission.refusal(self._session_rates()) is not None
        endpoint = next((e for e in getattr(self._service, "_endpoints", []) if getattr(e, "_name", "") == "start"),
                        None)
        if endpoint is None or not hasattr(endpoint, "_subscription"):
            log.warning("cannot leave the start queue group with this nats-py; full daemons answer at_capacity")
            return
        subscribed = endpoint._subscription is not None
        try:
            if full and subscribed:
                await endpoint._stop()
                log.info("at capacity: left the start queue group", sessions=len(self.sessions))
            elif not full and not subscribed:
                await endpoint._start()
                log.info("below capacity: rejoined the start queue group", sessions=len(self.sessions))
            if self.nc is not None and self.nc.is_connected:
                await self.nc.flush()
        except Exception as exc:
            log.warning("start queue group membership change failed", error=repr(exc))

    async def _on_stop(self, msg: Msg) -> None:
        reply = self._replier(msg)
        stop = await self._parse_request(SessionStop, msg.data, msg.subject, reply, SessionStopReply)
        if stop is None:
            return
        session = self.sessions.get(stop.session_id)
        if session is None:
            if not self.settings.nats.report_unknown_sessions:
                return  # another daemon may own it
            await self._report(LipsyncError(errors.UNKNOWN_SESSION, f"no live session '{stop.session_id}' "
                               "to stop"), session_id=stop.session_id, reply=reply,
                               reply_model=SessionStopReply)
            return
        self._spawn(self._stop_and_reply(session, reply), f"stop-{session.id}")

    async def _stop_and_reply(self, session: Session, reply: Any) -> None:
        while (pending := self._starting.get(session.id)) is not None:
            await asyncio.wait({pending})
        if self.sessions.get(session.id) is not session or session.info is None:
            # Its start failed meanwhile: there is nothing to stop (and no `stopped`).
            await self._report(LipsyncError(errors.UNKNOWN_SESSION, f"no live session '{session.id}' to "
                               "stop (its start failed)"), session_id=session.id, reply=reply,
                               reply_model=SessionStopReply)
            return
        await self._close_session(session, "requested")
        if reply is not None:
            await reply(SessionStopReply(ok=True, session_id=session.id).model_dump_json(exclude_none=True).encode())

    async def _on_session_message(self, msg: Msg) -> None:
        kind = msg.subject.split(".")[-2]
        if kind == "audio":
            await self._on_audio(msg)
        elif kind == "control":
            await self._on_control(msg)

    async def _on_audio(self, msg: Msg) -> None:
        sid = self.subjects.session_of(msg.subject)
        if not valid_session_id(sid):
            return  # cannot be addressed: a subject token outside the id alphabet
        session = self.sessions.get(sid)
        try:
            if session is None:
                raise LipsyncError(errors.UNKNOWN_SESSION, f"audio for unknown session '{sid}': send "
                                   "session.start first (audio before start is dropped)")
            warning = session.feed_audio(msg.data, msg.headers)
            if warning is not None:
                raise warning
        except LipsyncError as err:
            if session is not None:
                session.log.warning("audio problem", code=err.code, error=err.message)
                self.metrics.errors.labels(err.code).inc()
                await self.emit(ErrorEvent(session_id=sid, ts=time.time(), code=err.code, message=err.message))
            elif self.settings.nats.report_unknown_sessions and self._first_time(("audio", sid)):
                await self._report(err, session_id=sid, subject=msg.subject)

    async def _on_control(self, msg: Msg) -> None:
        sid = self.subjects.session_of(msg.subject)
        if not valid_session_id(sid):
            return
        reply = self._replier(msg)
        session = self.sessions.get(sid)
        try:
            if session is None and not self.settings.nats.report_unknown_sessions:
                return  # another daemon may own it
            ctl = parse_json_message(ControlMessage, msg.data, f"control.{sid}")
            if session is None:
                raise LipsyncError(errors.UNKNOWN_SESSION, f"control for unknown session '{sid}'")
            session.control(ctl)
        except LipsyncError as err:
            await self._report(err, session_id=sid, reply=reply, reply_model=ControlReply,
                               subject=msg.subject)
            return
        if reply is not None:
            await reply(ControlReply(ok=True, session_id=sid, op=ctl.op).model_dump_json(exclude_none=True).encode())

    def _first_time(self, key: tuple[str, str], window_s: float = 10.0) -> bool:
        """Unknown-session audio arrives many times a second: report it once per window."""
        now = time.monotonic()
        last = self._seen_unknown.get(key)
        if last is not None and now - last < window_s:
            return False
        if len(self._seen_unknown) > 10000:
            self._seen_unknown.clear()
        self._seen_unknown[key] = now
        return True

    async def _on_status(self, req: Request) -> None:
        await req.respond(self.status().model_dump_json().encode())

    def status(self) -> StatusReply:
        device = self.engine_host.device_info() if self.engine_host else {"model": "disabled"}
        capacity = self.admission.capacity()
        sessions = list(self.sessions.values())
        counts = {s.id: s.speech.counts for s in sessions if s.speech is not None}
        busy = getattr(self.engine_host, "busy_fraction", None)  # None: not measured on this host
        admitted = self.admission.max_sessions_at()
        return StatusReply(
            sessions=[{**s.status(), "generated_fraction": generated_fraction(counts.get(s.id, {}))}
                      for s in sessions],
            capacity=admitted, active=len(sessions), accepting=self.accepting, device=device,
            admission=StatusAdmission(
                sessions=admitted, max_sessions=self.settings.daemon.max_sessions,
                capacity_fps=capacity.fps, source=capacity.source,
                demand_fps=self.admission.demand(self._session_rates()),
                speech_duty=self.settings.daemon.speech_duty),
            speaking=sum(1 for s in sessions if s.speech is not None and s.speech.speaking),
            generated_fraction=generated_fraction(*counts.values()),
            gpu_busy=busy() if callable(busy) else None,
        )

    # ---- health ----------------------------------------------------------------------
    # Liveness (/livez and the systemd watchdog) is the process only: a restart kills every
    # session on the GPU, so one session's trouble must never fail it; a session whose
    # output stays down ends itself instead (_supervise_outputs). Readiness (/readyz) is
    # whether a start would be taken. /health is everything, sessions included.
    def liveness(self) -> tuple[bool, list[str]]:
        """The event loop turns (the heartbeat ran within 3 s) and the generation worker
        thread is alive; NATS and the sessions do not count (sessions go on without NATS)."""
        reasons = []
        if time.monotonic() - self._heartbeat_at > 3.0:
            reasons.append("event loop stalled")
        host = self.engine_host
        if host is not None and not getattr(host, "live", host.alive)():
            # A GPU-server process being restarted counts as live (sessions keep playing):
            # only one that stays down after its restarts is not.
            reasons.append("generation worker not running")
        return (not reasons, reasons)

    def readiness(self) -> tuple[bool, list[str]]:
        """Whether a session start would be taken: NATS connected, accepting (started and
        not draining), room for one more session at video.fps."""
        reasons = []
        if not (self.nc is not None and self.nc.is_connected):
            reasons.append("nats disconnected")
        if not self.accepting:
            reasons.append("not accepting sessions (draining)" if self._drained
                           else "not accepting sessions (starting up)")
        refusal = self.admission.refusal(self._session_rates())
        if refusal is not None:
            reasons.append(refusal)
        return (not reasons, reasons)

    def health_check(self) -> tuple[bool, list[str]]:
        """Everything: NATS, the event loop, the worker and every live session's frame
        loop and output."""
        reasons = []
        if not (self.nc is not None and self.nc.is_connected):
            reasons.append("nats disconnected")
        if time.monotonic() - self._heartbeat_at > 3.0:
            reasons.append("event loop stalled")
        for session in list(self.sessions.values()):
            if session.info is None or session.closed:
                continue
            if not session.loop_alive():
                reasons.append(f"session {session.id}: frame loop not running")
            if not session.publisher_healthy:
                reasons.append(f"session {session.id}: output down (LiveKit reconnecting or sink failed)")
        if self.engine_host is not None and not self.engine_host.alive():
            reasons.append("generation worker not running" if not hasattr(self.engine_host, "live")
                           else "GPU-server process not ready (restarting, or down)")
        return (not reasons, reasons)

    async def _refresh_registry(self) -> None:
        while True:
            await asyncio.sleep(self.registry.ttl_s / 3)
            if self.nats_connected:
                lost = await self.registry.refresh([sid for sid, s in self.sessions.items() if s.info is not None])
                for sid in lost:
                    session = self.sessions.get(sid)
                    if session is None:
                        continue
                    await session.emit_error(errors.SESSION_CONFLICT, (
                        f"session '{sid}' was claimed by another daemon while this one could not reach "
                        f"NATS for over nats.registry_ttl_s = {self.registry.ttl_s:g} s: stopped here"))
                    self._close_later(session, "error")

    async def _heartbeat(self) -> None:
        interval = min(1.0, self.notifier.watchdog_interval_s or 1.0)
        expected = time.monotonic()
        while True:
            now = time.monotonic()
            lag = now - expected
            self.metrics.loop_lag.set(lag)
            if lag > 0.1:
                # Something held the event loop: every session's frames were late by this.
                log.warning("event loop lag", lag_ms=round(lag * 1000), sessions=len(self.sessions))
            expected = now + interval
            self._heartbeat_at = now
            if self.liveness()[0]:
                self.notifier.watchdog()
            self._supervise_outputs(now)
            await asyncio.sleep(interval)

    def _supervise_outputs(self, now: float) -> None:
        """End a session whose output has been down longer than output.unhealthy_budget_s
        (a LiveKit room that does not come back, a failed file writer): an error event
        (publisher_failed), then `stopped {reason: "error"}`. Brief outages pass unseen."""
        budget = self.settings.output.unhealthy_budget_s
        down = self._output_down_since
        for sid in [sid for sid in down if sid not in self.sessions]:
            del down[sid]
        for sid, session in list(self.sessions.items()):
            if session.info is None or session.closed or session.publisher_healthy:
                down.pop(sid, None)
                continue
            since = down.setdefault(sid, now)
            if now - since > budget:
                down[sid] = math.inf  # ended once: never again for this session
                self._spawn(self._end_failed_output(session, now - since, budget), f"output-failed-{sid}")

    async def _end_failed_output(self, session: Session, down_s: float, budget: float) -> None:
        kind = type(session.publisher).__name__ if session.publisher is not None else "none"
        await self._report(LipsyncError(errors.PUBLISHER_FAILED, (
            f"the session's output ({kind}) has been down for {down_s:.1f} s, longer than "
            f"output.unhealthy_budget_s = {budget:g} s (LiveKit room not reconnected, or the file "
            "writer failed): the session is stopped; start it again, or raise the budget to ride "
            "out longer outages")), session_id=session.id)
        await self._close_session(session, "error")

    # ---- tasks -----------------------------------------------------------------------
    def _spawn(self, coro: Any, name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", task=task.get_name(), error=repr(task.exception()))

    # ---- shutdown --------------------------------------------------------------------
    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def install_signal_handlers(self) -> None:
        """SIGTERM/SIGINT, from the first moment of start-up: a signal while the model
        loads stops the start and shuts down as cleanly as one while running (exit 0,
        the embedded nats-server stopped). A second signal exits at once; so does the
        backstop timer when shutdown overruns its deadline."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)

    def _on_signal(self, sig: int) -> None:
        self._signals_seen += 1
        if self._signals_seen > 1:
            log.warning("second signal: exiting now", signal=signal.Signals(sig).name)
            self._force_exit(1)
        self._stopping.set()  # first: the log line below must not be able to stop it
        self._arm_backstop()
        log.info("signal received: draining" if self.accepting else "signal received during start-up: stopping",
                 signal=signal.Signals(sig).name)

    def _arm_backstop(self) -> None:
        """A thread, not a task: it fires even when the event loop is stuck (a blocking
        import, a C call). Drain gets daemon.shutdown_timeout_s, releasing everything
        SHUTDOWN_GRACE_S more; past that the process leaves anyway."""
        limit = self.settings.daemon.shutdown_timeout_s + SHUTDOWN_GRACE_S

        def fire() -> None:
            log.error("shutdown did not finish in time: exiting now", limit_s=limit)
            self._force_exit(1)

        timer = threading.Timer(limit, fire)
        timer.daemon = True
        timer.start()

    def _force_exit(self, code: int) -> None:
        """Leave now, but never with the embedded nats-server still holding the port."""
        if self._embedded is not None:
            try:
                self._embedded.kill_now()
            except Exception:
                pass
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)

    async def start_unless_stopped(self) -> bool:
        """``start()``, given up as soon as a stop is requested (a signal while the model
        loads or NATS connects): True once started, False when stopped first. Either
        way the caller then shuts down; what the start had brought up is released there."""
        if self._stopping.is_set():
            return False
        start = asyncio.create_task(self.start(), name="start")
        stop = asyncio.create_task(self._stopping.wait(), name="stop-wait")
        try:
            await asyncio.wait({start, stop}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if start.done():
            start.result()  # a start failure (LipsyncError) is the caller's to report
            return True
        start.cancel()
        try:
            await start
        except asyncio.CancelledError:
            pass
        except Exception as exc:  # it failed while being given up: the stop stands
            log.warning("start failed while stopping", error=str(exc) or type(exc).__name__)
        log.info("start-up stopped before ready")
        return False

    async def run(self) -> None:
        """Until SIGTERM/SIGINT (or ``request_stop``); a second signal exits at once."""
        self.install_signal_handlers()
        await self._stopping.wait()

    async def drain(self) -> None:
        """Stop taking sessions, let utterances finish up to a deadline, stop every
        session (``stopped`` events), drain NATS. Safe to call twice."""
        async with self._drain_lock:
            if self._drained:
                return
            self._drained = True
            self.accepting = False
            self.notifier.stopping()
            if self._service is not None:
                try:
                    # A full daemon left the start group; the service stops every
                    # endpoint, so it must be subscribed again first.
                    for endpoint in getattr(self._service, "_endpoints", []):
                        if getattr(endpoint, "_subscription", True) is None:
                            await endpoint._start()
                    await self._service.stop()
                except Exception as exc:
                    log.warning("service stop failed", error=repr(exc))
            deadline = time.monotonic() + self.settings.daemon.drain_utterances_s
            while time.monotonic() < deadline and any(
                s.speech is not None and s.speech.speaking for s in self.sessions.values()
            ):
                await asyncio.sleep(0.05)
            for task in list(self._starting.values()):
                task.cancel()
            await asyncio.gather(*(self._close_session(s, "shutdown") for s in list(self.sessions.values())),
                                 return_exceptions=True)
            if self.nc is not None and self.nc.is_connected:
                try:
                    await asyncio.wait_for(self.nc.drain(), timeout=2.0)
                except Exception as exc:
                    log.warning("nats drain incomplete", error=str(exc) or type(exc).__name__)

    async def aclose(self) -> None:
        """Release everything, even when drain timed out."""
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        # Sessions still closing (their closer was cancelled by a drain timeout) are
        # waited for too: MP4s finalized, avatars released, `stopped` sent.
        for session in list(self.sessions.values()) + list(self._closing):
            try:
                await asyncio.wait_for(session.aclose("shutdown"), timeout=5)
            except Exception:
                log.exception("session close failed", session_id=session.id)
        self.sessions.clear()
        if self.nc is not None and not self.nc.is_closed:
            try:
                await self.nc.close()
            except Exception:
                pass
        if self._health is not None:
            await self._health.aclose()
        if self.engine_host is not None:
            await self.engine_host.aclose()
        await self.resolver.aclose()
        await self.store.aclose()
        if self._embedded is not None:
            await self._embedded.aclose()
        log.info("lipsyncd stopped")

    async def shutdown(self) -> None:
        try:
            await asyncio.wait_for(self.drain(), timeout=self.settings.daemon.shutdown_timeout_s)
        except asyncio.TimeoutError:
            log.warning("drain timed out", timeout_s=self.settings.daemon.shutdown_timeout_s)
        await self.aclose()
