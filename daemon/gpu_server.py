"""The GPU-server process: owns the CUDA context, the models and the generation worker,
and serves one edge process (``daemon.gpu_client``) through two shared-memory rings
and a control socket.

    python -m daemon.gpu_server --settings FILE --inbox NAME FD --outbox NAME FD --control FD

The edge starts it (``daemon.gpu_process = true``) and passes the rings' doorbells and
the socket as inherited file descriptors. Hot path (rings, ``daemon.gpu_wire``): audio,
flushes, frame plans, shifts and cancels in; finished I420 boxes and a status out.
Control path (the socket, one JSON object a line): ``acquire`` and ``release`` of
avatars (the edge names the decoded frames' ``.npy`` file), ``info``, ``shutdown``.
The generation itself is ``daemon.engine_host.EngineHost`` and its worker thread,
unchanged: this module only carries their calls across the process boundary.

It exits when the edge closes the socket or dies (the kernel's parent-death signal).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon import gpu_wire as wire
# Imported here, not at a session's first request: importing daemon.avatars (aiohttp,
# which builds an SSL context) held this loop, and every session's records, for 1.2 s on
# the development machine at the first avatar; the likely cause of the 129-575 ms hold-ups
# seen once a process on an H100 box (docs/BENCHMARKS.md, fourteenth session).
from daemon.avatars import DecodedVideo
from daemon.errors import LipsyncError
from daemon.log import configure_logging, get_logger, trace_fatal_signals
from daemon.loop_watch import LoopWatch
from daemon.shm_ring import OrderedWriter, Ring
from daemon.worker import FramePlan

log = get_logger("daemon.gpu_server")
STATUS_PERIOD_S = 0.05
LOOP_LAG_WARN_MS = 100.0  # a hold-up of the server loop this long is logged (with its inboxes)
NEED_FRAMES = "need_frames"


class _Client:
    """One edge process: its ring pair, its control stream, the streams it opened (named
    ``<client>/<session id>`` in the worker, so that two edges may reuse an id) and the
    avatars it holds, all dropped when it disconnects."""

    def __init__(self, server: "GpuServer", no: int, name: str, inbox: Ring, outbox: Ring,
                 writer: asyncio.StreamWriter, owned_fds: tuple[int, ...] = ()) -> None:
        self.server, self.no, self.name = server, no, name
        self.inbox, self.outbox, self.writer = inbox, outbox, writer
        self.sessions: dict[int, str] = {}  # stream index -> the edge's session id
        self.fps: dict[int, int] = {}  # stream index -> its frame rate (admission across edges)
        self.keys: dict[int, str] = {}  # stream -> avatar key of its plans
        self.avatar_refs: dict[str, int] = {}
        self.speaking = 0
        self.inbox_used_max = 0  # bytes unread in the inbox when a pump began, at most
        self.outbox_records = OrderedWriter(outbox)  # results wait here, in order, while the edge is behind
        self._owned_fds = owned_fds
        self.closed = False

    def stream_id(self, idx: int) -> str:
        return f"{self.no}/{self.sessions[idx]}" if self.server.listening else self.sessions[idx]

    async def send(self, message: dict[str, Any]) -> None:
        self.writer.write(json.dumps(message, default=str).encode() + b"\n")
        await self.writer.drain()

    def pump(self) -> None:
        # How far behind this side has been (the edge waits when the inbox is full).
        self.inbox_used_max = max(self.inbox_used_max, self.inbox.used())
        with self.server.host.worker.batched():
            self._pump()

    def _pump(self) -> None:
        h = self.server.host
        for kind, payload in self.inbox.drain():
            try:
                if kind == wire.AUDIO:
                    idx, utt, pcm = wire.read_audio(payload)
                    h.push_audio(self.stream_id(idx), utt, pcm)
                elif kind == wire.PLANS:
                    idx, key, arr = wire.read_plans(payload)
                    self.keys[idx] = key
                    h.plan_frames(self.stream_id(idx), [
                        FramePlan(int(r["utterance"]), int(r["frame"]), key, int(r["index"]), float(r["blend"]),
                                  float(r["deadline"])) for r in arr])
                elif kind == wire.FLUSH:
                    idx, utt = wire.read_utterance(payload)
                    h.flush_audio(self.stream_id(idx), utt)
                elif kind == wire.SHIFT:
                    idx, utt, delta = wire.read_shift(payload)
                    h.shift(self.stream_id(idx), utt, delta)
                elif kind == wire.CANCEL:
                    idx, utt, before = wire.read_cancel(payload)
                    h.cancel(self.stream_id(idx), utt, before)
                elif kind == wire.OPEN:
                    idx, fps, sid = wire.read_open(payload)
                    self.sessions[idx] = sid
                    self.fps[idx] = fps
                    h.open_stream(self.stream_id(idx), fps, lambda results, i=idx: self._results(i, results))
                elif kind == wire.CLOSE:
                    idx = wire.read_index(payload)
                    if idx in self.sessions:
                        h.close_stream(self.stream_id(idx))
                    self.sessions.pop(idx, None)
                    self.fps.pop(idx, None)
                    self.keys.pop(idx, None)
                elif kind == wire.SPEAKING:
                    delta = wire.read_speaking(payload)
                    self.speaking += delta
                    h.speaking_changed(delta)
            except KeyError:
                log.warning("a record for a stream that is not open", kind=kind, client=self.name)

    def _results(self, idx: int, results: list[tuple[int, int, Any, BaseException | None]]) -> None:
        if self.closed:
            return
        key = next((box.avatar_key for _, _, box, _ in results if box is not None), self.keys.get(idx, ""))
        self.queue(wire.RESULTS, wire.results(idx, key, results))

    def queue(self, kind: int, parts: list[bytes]) -> None:
        if not self.closed:
            self.outbox_records.write(kind, *parts)

    async def drop(self) -> list[str]:
        """The edge is gone: its streams closed, its avatars released, its speaking count
        taken back; returns the session ids that were still open."""
        if self.closed:
            return []
        self.closed = True
        self.outbox_records.clear()  # results for an edge that is gone
        h = self.server.host
        asyncio.get_running_loop().remove_reader(self.inbox.doorbell)
        open_ids = list(self.sessions.values())
        for idx in list(self.sessions):
            h.close_stream(self.stream_id(idx))
        self.sessions.clear()
        if self.speaking:
            h.speaking_changed(-self.speaking)
            self.speaking = 0
        for key, refs in list(self.avatar_refs.items()):
            for _ in range(refs):
                await self.server.release(key)
        self.avatar_refs.clear()
        self.writer.close()
        self.inbox.close()
        self.outbox.close()
        for fd in self._owned_fds:
            os.close(fd)
        return open_ids


class GpuServer:
    """``listen`` None: one edge on the inherited rings and socket (the server exits
    when it leaves). Else a unix socket under the state dir that several edges attach
    to, each handing over its own rings (``daemon.edge_processes``), plus one watcher
    (the supervisor) told which sessions an edge held when it disconnects."""

    def __init__(self, settings: Any, inbox: Ring | None = None, outbox: Ring | None = None,
                 control: socket.socket | None = None, listen: Path | None = None) -> None:
        from daemon.engine_host import EngineHost
        from daemon.metrics import Metrics

        self.settings = settings
        self.listening = listen is not None
        self._listen = listen
        self._single = (inbox, outbox, control)
        self.host = EngineHost(settings, Metrics())
        self.clients: dict[int, _Client] = {}
        self._next_client = 0
        self._watchers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._done = asyncio.Event()
        # Decoded videos of the avatars held, by content: a second session of one video
        # sends its name, not its frames.
        self.videos: dict[str, Any] = {}
        self.video_refs: dict[str, int] = {}
        self.key_hash: dict[str, str] = {}
        self.loop_lag_ms_max = 0.0  # the longest hold-up of this loop (``_status_loop``)
        self.gc_frozen = 0  # objects gc.freeze put out of the collector's reach at start

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def run(self) -> int:
        # The generation worker shares this process's GIL with its loop (the edges' records
        # in, the frames out), as it did the edge's in one process: the same hand-off bound.
        sys.setswitchinterval(self.settings.daemon.gil_switch_ms / 1000)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._done.set)
        first: _Client | None = None
        if not self.listening:
            inbox, outbox, control = self._single
            assert inbox is not None and outbox is not None and control is not None
            reader, writer = await asyncio.open_connection(sock=control)
            first = _Client(self, 0, "edge", inbox, outbox, writer)
        try:
            await self.host.start()
        except Exception as exc:
            failed = ({"op": "failed", "code": exc.code, "message": exc.message} if isinstance(exc, LipsyncError)
                      else {"op": "failed", "code": "internal", "message": f"{type(exc).__name__}: {exc}"})
            if first is not None:
                await first.send(failed)
            else:
                log.error("the GPU server did not start", **{k: v for k, v in failed.items() if k != "op"})
            # 78 (EX_CONFIG): a config or the weights must change; a restart cannot help.
            return 78 if failed["code"] in ("models_missing", "config_invalid") else 1
        if self.settings.daemon.gc_freeze:
            # As the edge does (daemon.gc_freeze): the models, the compiled step and the
            # imported modules stay out of later full collections, each of which holds this
            # process's GIL: the loop that reads the edges' records and the worker wait.
            gc.collect()
            gc.freeze()
            # Counted once: gc.get_freeze_count() walks every frozen object (millions with
            # torch loaded): called in each status turn it held this loop about 43 ms in
            # every 50 on the development machine.
            self.gc_frozen = gc.get_freeze_count()
        status = asyncio.create_task(self._status_loop())
        waits = [asyncio.create_task(self._done.wait())]
        server = None
        if first is not None:
            waits.append(asyncio.create_task(self._serve(first, reader)))
        else:
            assert self._listen is not None
            self._listen.unlink(missing_ok=True)
            server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            server.bind(str(self._listen))
            os.chmod(self._listen, 0o600)
            server.listen(64)
            server.setblocking(False)
            waits.append(asyncio.create_task(self._accept_loop(server)))
            log.info("GPU server listening", socket=str(self._listen))
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        if server is not None:
            server.close()
            self._listen.unlink(missing_ok=True)  # type: ignore[union-attr]
        for task in waits + list(self._tasks):
            task.cancel()
        status.cancel()
        await asyncio.gather(status, *waits, *self._tasks, return_exceptions=True)
        for client in list(self.clients.values()):
            await client.drop()
        await self.host.aclose()
        return 0

    async def _serve(self, client: _Client, reader: asyncio.StreamReader) -> None:
        self.clients[client.no] = client
        asyncio.get_running_loop().add_reader(client.inbox.doorbell, client.pump)
        await client.send({"op": "ready", "pid": os.getpid(), **self._figures()})
        try:
            while line := await reader.readline():
                request = json.loads(line)
                self._spawn(self._answer(client, request))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self.clients.pop(client.no, None)
            lost = await client.drop()
            if not self.listening:
                self._done.set()  # the edge closed the socket (or died)
            else:
                log.info("edge disconnected", client=client.name, open_sessions=len(lost))
                for watcher in list(self._watchers):
                    try:
                        watcher.write(json.dumps({"op": "client_lost", "name": client.name,
                                                  "sessions": lost}).encode() + b"\n")
                        await watcher.drain()
                    except ConnectionError:
                        self._watchers.discard(watcher)

    async def _accept_loop(self, listener: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(listener)
            self._spawn(self._accept(conn))

    async def _accept(self, conn: socket.socket) -> None:
        """An edge's hello (JSON, with its rings' doorbells as SCM_RIGHTS), or the
        supervisor's (no rings: it only watches). Read before the socket becomes a
        stream: a stream's reader would take the bytes and lose the descriptors."""
        try:
            conn.setblocking(True)
            conn.settimeout(5)
            msg, fds, _, _ = await asyncio.to_thread(socket.recv_fds, conn, 65536, 2)
            conn.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=conn)
        except (OSError, ValueError) as exc:
            log.warning("a client's hello could not be read", error=str(exc))
            conn.close()
            return
        hello = json.loads(msg.split(b"\n", 1)[0] or b"{}")
        if hello.get("role") == "watch":
            self._watchers.add(writer)
            writer.write(json.dumps({"op": "ready", "pid": os.getpid(), **self._figures()}).encode() + b"\n")
            try:
                while line := await reader.readline():
                    request = json.loads(line)
                    op = request.get("op")
                    if op == "clients":
                        result: Any = {c.name: sorted(c.sessions.values()) for c in self.clients.values()}
                    elif op == "metrics":
                        from prometheus_client import generate_latest

                        result = generate_latest(self.host.metrics.registry).decode()
                    else:
                        result = None
                    writer.write(json.dumps({"op": "reply", "id": request.get("id"), "ok": op in ("clients", "metrics"),
                                             "result": result}).encode() + b"\n")
            except ConnectionError:
                pass
            finally:
                self._watchers.discard(writer)
            return
        if len(fds) != 2:
            for fd in fds:
                os.close(fd)
            writer.close()
            log.warning("an edge attached without its two ring doorbells", hello=hello)
            return
        self._next_client += 1
        client = _Client(self, self._next_client, str(hello.get("name") or f"edge{self._next_client}"),
                         Ring.attach(hello["inbox"], fds[0]), Ring.attach(hello["outbox"], fds[1]), writer,
                         owned_fds=tuple(fds))
        log.info("edge attached", client=client.name, pid=hello.get("pid"))
        await self._serve(client, reader)

    def _figures(self) -> dict[str, Any]:
        h = self.host
        return {"measured_fps": h.measured_fps, "one_session_fps": h.one_session_fps, "default_fps": h.default_fps,
                "warmup_ms": h.warmup_ms, "load_s": h.load_s, "device": str(h.device)}

    # ---- control path ----------------------------------------------------------------
    async def _answer(self, client: _Client, request: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"op": "reply", "id": request.get("id")}
        try:
            reply["result"] = await self._handle(client, request["op"], request.get("args") or {})
            reply["ok"] = True
        except LipsyncError as exc:
            reply.update(ok=False, code=exc.code, message=exc.message)
        except Exception as exc:
            log.exception("control request failed", op=request.get("op"))
            reply.update(ok=False, code="internal", message=f"{type(exc).__name__}: {exc}")
        if not client.closed:
            try:
                await client.send(reply)
            except ConnectionError:
                pass

    async def release(self, key: str) -> None:
        await self.host.release_avatar(key)
        content_hash = self.key_hash.get(key)
        refs = self.video_refs.get(content_hash, 0) - 1
        if refs > 0:
            self.video_refs[content_hash] = refs
        else:  # no holder left: the frames go (a later acquire sends them again)
            self.video_refs.pop(content_hash, None)
            self.videos.pop(content_hash, None)
            self.key_hash.pop(key, None)

    async def _handle(self, client: _Client, op: str, args: dict[str, Any]) -> Any:
        if op == "acquire":
            content_hash = args["content_hash"]
            video = self.videos.get(content_hash)
            if video is None:
                if not args.get("frames"):
                    raise LipsyncError(NEED_FRAMES, "this video's frames are not here yet: send them")
                frames = np.load(args["frames"], mmap_mode="r", allow_pickle=False)
                video = DecodedVideo(frames=frames, fps=args["fps"], width=frames.shape[2], height=frames.shape[1],
                                     duration_s=args["duration_s"])
            avatar, timings = await self.host.acquire_avatar(video, content_hash, log, args.get("url"))
            self.videos[content_hash] = video
            self.video_refs[content_hash] = self.video_refs.get(content_hash, 0) + 1
            self.key_hash[avatar.key] = content_hash
            if client.closed:  # the edge left while this was prepared: nobody holds it
                await self.release(avatar.key)
            else:
                client.avatar_refs[avatar.key] = client.avatar_refs.get(avatar.key, 0) + 1
            return {"key": avatar.key, "num_frames": avatar.num_frames, "timings": timings,
                    "blend_boxes": np.asarray(avatar.blend_boxes).tolist(),
                    "face_boxes": np.asarray(avatar.face_boxes).tolist(),
                    "landmark_source": getattr(avatar, "landmark_source", None)}
        if op == "release":
            key = args["key"]
            refs = client.avatar_refs.get(key, 0)
            if refs <= 0:
                return None  # not this edge's to release
            if refs > 1:
                client.avatar_refs[key] = refs - 1
            else:
                client.avatar_refs.pop(key)
            await self.release(key)
            return None
        if op == "info":
            return self.host.device_info()
        if op == "threads":  # native id -> name (the loadtest's CPU figures, thread by thread)
            return {str(t.native_id): t.name for t in threading.enumerate() if t.native_id is not None}
        if op == "metrics":
            from prometheus_client import generate_latest

            return generate_latest(self.host.metrics.registry).decode()
        if op == "reset_peak_memory":
            return await self.host.reset_peak_memory()
        if op == "peak_memory_mb":
            return await self.host.peak_memory_mb()
        if op == "shutdown":
            if not self.listening:  # a shared server is the supervisor's to stop
                self._done.set()
            return None
        raise ValueError(f"unknown control op {op!r}")

    async def _status_loop(self) -> None:
        h = self.host
        watch = LoopWatch()
        try:
            await self._status_turns(h, watch)
        finally:
            watch.close()

    async def _status_turns(self, h: Any, watch: LoopWatch) -> None:
        while True:
            # The hold-up counts from the turn's start: a slow turn holds this loop too, and
            # a pause that lands in it (a SIGSTOP, a collection) is not missed.
            due = time.monotonic() + STATUS_PERIOD_S
            # Not back by the warning's threshold: every thread's stack goes to the watch.
            watch.arm(STATUS_PERIOD_S + LOOP_LAG_WARN_MS / 1000)
            w = h.worker
            budget_s, parts = h.processing_budget()
            values = {"t": time.monotonic(), "budget_s": budget_s, "budget_parts": parts, "busy": h.busy_fraction(),
                      "alive": h.alive(), "steps": h.steps, "frames_generated": h.frames_generated,
                      "late_frames": list(h.late_frames),
                      "step_s": h.step_s, "estimates": w.est.snapshot(), "open_streams": w.open_streams,
                      "gil_switch_ms": round(sys.getswitchinterval() * 1000, 3), "gc_frozen": self.gc_frozen}
            clients = list(self.clients.values())
            for client in clients:
                # Each edge admits against the whole GPU: the others' streams count too.
                others = [f for c in clients if c is not client for f in c.fps.values()]
                client.queue(wire.STATUS, [wire.status({**values, "other_rates": others,
                                                        "loop_lag_ms_max": round(self.loop_lag_ms_max, 1),
                                                        "inbox_used_max": client.inbox_used_max})])
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            # This loop reads the edges' inboxes: while it is held up, their records wait.
            lag_ms = 1000 * (time.monotonic() - due)
            self.loop_lag_ms_max = max(self.loop_lag_ms_max, lag_ms)
            stacks = watch.take()
            if lag_ms > LOOP_LAG_WARN_MS:
                # Where every thread stood while it was (the loop's own thread is MainThread).
                log.warning("the GPU server's event loop was held up", lag_ms=round(lag_ms, 1),
                            inbox_bytes={c.name: c.inbox.used() for c in self.clients.values()},
                            threads=[f"{st['thread']}: {st['frames']}" for st in stacks])


def main(argv: list[str] | None = None) -> int:
    trace_fatal_signals()
    p = argparse.ArgumentParser(prog="python -m daemon.gpu_server")
    p.add_argument("--settings", required=True, help="the edge's settings, as JSON")
    p.add_argument("--inbox", nargs=2, metavar=("NAME", "FD"))
    p.add_argument("--outbox", nargs=2, metavar=("NAME", "FD"))
    p.add_argument("--control", type=int)
    p.add_argument("--listen", type=Path, help="a unix socket several edges attach to (instead of the three above)")
    args = p.parse_args(argv)
    if args.listen is None and not (args.inbox and args.outbox and args.control is not None):
        p.error("give --inbox, --outbox and --control (one edge), or --listen SOCKET (several)")
    from daemon.config import Settings

    settings = Settings.model_validate_json(Path(args.settings).read_text())
    configure_logging(settings.logging.level, settings.logging.format)
    if args.listen is not None:
        return asyncio.run(GpuServer(settings, listen=args.listen).run())
    inbox = Ring.attach(args.inbox[0], int(args.inbox[1]))
    outbox = Ring.attach(args.outbox[0], int(args.outbox[1]))
    control = socket.socket(fileno=args.control)
    return asyncio.run(GpuServer(settings, inbox, outbox, control).run())


if __name__ == "__main__":
    sys.exit(main())
