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
import json
import signal
import socket
import sys
import time
from collections import deque
from pathlib import Path
from typing import Any

import numpy as np

from daemon import gpu_wire as wire
from daemon.errors import LipsyncError
from daemon.log import configure_logging, get_logger
from daemon.shm_ring import Ring, RingFull

log = get_logger("daemon.gpu_server")
STATUS_PERIOD_S = 0.05
NEED_FRAMES = "need_frames"


class GpuServer:
    def __init__(self, settings: Any, inbox: Ring, outbox: Ring, control: socket.socket) -> None:
        from daemon.engine_host import EngineHost
        from daemon.metrics import Metrics

        self.settings = settings
        self.inbox, self.outbox, self.control = inbox, outbox, control
        self.host = EngineHost(settings, Metrics())
        self.sessions: dict[int, str] = {}
        self.keys: dict[int, str] = {}  # stream -> avatar key of its plans
        self._backlog: deque[tuple[int, list[bytes]]] = deque()  # records waiting for ring room
        self._writer: asyncio.StreamWriter | None = None
        self._done = asyncio.Event()
        # Decoded videos of the avatars held, by content: a second session of one video
        # sends its name, not its frames.
        self.videos: dict[str, Any] = {}
        self.video_refs: dict[str, int] = {}
        self.key_hash: dict[str, str] = {}

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._done.set)
        reader, self._writer = await asyncio.open_connection(sock=self.control)
        try:
            await self.host.start()
        except LipsyncError as exc:
            await self._send({"op": "failed", "code": exc.code, "message": exc.message})
            return
        except Exception as exc:
            await self._send({"op": "failed", "code": "internal", "message": f"{type(exc).__name__}: {exc}"})
            return
        loop.add_reader(self.inbox.doorbell, self._pump)
        status = asyncio.create_task(self._status_loop())
        await self._send({"op": "ready", **self._figures()})
        control = asyncio.create_task(self._control_loop(reader))
        await asyncio.wait([control, asyncio.create_task(self._done.wait())], return_when=asyncio.FIRST_COMPLETED)
        loop.remove_reader(self.inbox.doorbell)
        status.cancel()
        control.cancel()
        await asyncio.gather(status, control, return_exceptions=True)
        await self.host.aclose()

    def _figures(self) -> dict[str, Any]:
        h = self.host
        return {"measured_fps": h.measured_fps, "one_session_fps": h.one_session_fps, "default_fps": h.default_fps,
                "warmup_ms": h.warmup_ms, "load_s": h.load_s, "device": str(h.device)}

    async def _send(self, message: dict[str, Any]) -> None:
        assert self._writer is not None
        self._writer.write(json.dumps(message, default=str).encode() + b"\n")
        await self._writer.drain()

    # ---- control path ----------------------------------------------------------------
    async def _control_loop(self, reader: asyncio.StreamReader) -> None:
        while line := await reader.readline():
            request = json.loads(line)
            asyncio.create_task(self._answer(request))
        self._done.set()  # the edge closed the socket (or died)

    async def _answer(self, request: dict[str, Any]) -> None:
        reply: dict[str, Any] = {"op": "reply", "id": request.get("id")}
        try:
            reply["result"] = await self._handle(request["op"], request.get("args") or {})
            reply["ok"] = True
        except LipsyncError as exc:
            reply.update(ok=False, code=exc.code, message=exc.message)
        except Exception as exc:
            log.exception("control request failed", op=request.get("op"))
            reply.update(ok=False, code="internal", message=f"{type(exc).__name__}: {exc}")
        await self._send(reply)

    async def _handle(self, op: str, args: dict[str, Any]) -> Any:
        if op == "acquire":
            from daemon.avatars import DecodedVideo

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
            return {"key": avatar.key, "num_frames": avatar.num_frames, "timings": timings,
                    "blend_boxes": np.asarray(avatar.blend_boxes).tolist(),
                    "face_boxes": np.asarray(avatar.face_boxes).tolist(),
                    "landmark_source": getattr(avatar, "landmark_source", None)}
        if op == "release":
            await self.host.release_avatar(args["key"])
            content_hash = self.key_hash.get(args["key"])
            refs = self.video_refs.get(content_hash, 0) - 1
            if refs > 0:
                self.video_refs[content_hash] = refs
            else:  # no holder left: the frames go (a later acquire sends them again)
                self.video_refs.pop(content_hash, None)
                self.videos.pop(content_hash, None)
                self.key_hash.pop(args["key"], None)
            return None
        if op == "info":
            return self.host.device_info()
        if op == "metrics":
            from prometheus_client import generate_latest

            return generate_latest(self.host.metrics.registry).decode()
        if op == "reset_peak_memory":
            return await self.host.reset_peak_memory()
        if op == "peak_memory_mb":
            return await self.host.peak_memory_mb()
        if op == "shutdown":
            self._done.set()
            return None
        raise ValueError(f"unknown control op {op!r}")

    # ---- hot path --------------------------------------------------------------------
    def _pump(self) -> None:
        h = self.host
        for kind, payload in self.inbox.drain():
            try:
                if kind == wire.AUDIO:
                    idx, utt, pcm = wire.read_audio(payload)
                    h.push_audio(self.sessions[idx], utt, pcm)
                elif kind == wire.PLANS:
                    from daemon.worker import FramePlan

                    idx, key, arr = wire.read_plans(payload)
                    self.keys[idx] = key
                    h.plan_frames(self.sessions[idx], [
                        FramePlan(int(r["utterance"]), int(r["frame"]), key, int(r["index"]), float(r["blend"]),
                                  float(r["deadline"])) for r in arr])
                elif kind == wire.FLUSH:
                    idx, utt = wire.read_utterance(payload)
                    h.flush_audio(self.sessions[idx], utt)
                elif kind == wire.SHIFT:
                    idx, utt, delta = wire.read_shift(payload)
                    h.shift(self.sessions[idx], utt, delta)
                elif kind == wire.CANCEL:
                    idx, utt, before = wire.read_cancel(payload)
                    h.cancel(self.sessions[idx], utt, before)
                elif kind == wire.OPEN:
                    idx, fps, sid = wire.read_open(payload)
                    self.sessions[idx] = sid
                    h.open_stream(sid, fps, lambda results, i=idx: self._results(i, results))
                elif kind == wire.CLOSE:
                    idx = wire.read_index(payload)
                    sid = self.sessions.pop(idx, None)
                    self.keys.pop(idx, None)
                    if sid is not None:
                        h.close_stream(sid)
                elif kind == wire.SPEAKING:
                    h.speaking_changed(wire.read_speaking(payload))
            except KeyError:
                log.warning("a record for a stream that is not open", kind=kind)

    def _results(self, idx: int, results: list[tuple[int, int, Any, BaseException | None]]) -> None:
        key = next((box.avatar_key for _, _, box, _ in results if box is not None), self.keys.get(idx, ""))
        self._backlog.append((wire.RESULTS, wire.results(idx, key, results)))
        self._flush()

    def _flush(self) -> None:
        while self._backlog:
            kind, parts = self._backlog[0]
            try:
                self.outbox.write(kind, *parts)
            except RingFull:  # the edge is behind: try again shortly, in order
                asyncio.get_running_loop().call_later(0.002, self._flush)
                return
            self._backlog.popleft()

    async def _status_loop(self) -> None:
        h = self.host
        while True:
            w = h.worker
            values = {"t": time.monotonic(), "budget_s": h.processing_budget_s(), "busy": h.busy_fraction(),
                      "alive": h.alive(), "steps": h.steps, "frames_generated": h.frames_generated,
                      "step_s": h.step_s, "estimates": w.est.snapshot(), "open_streams": w.open_streams}
            self._backlog.append((wire.STATUS, [wire.status(values)]))
            self._flush()
            await asyncio.sleep(STATUS_PERIOD_S)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.gpu_server")
    p.add_argument("--settings", required=True, help="the edge's settings, as JSON")
    p.add_argument("--inbox", nargs=2, required=True, metavar=("NAME", "FD"))
    p.add_argument("--outbox", nargs=2, required=True, metavar=("NAME", "FD"))
    p.add_argument("--control", type=int, required=True)
    args = p.parse_args(argv)
    from daemon.config import Settings

    settings = Settings.model_validate_json(Path(args.settings).read_text())
    configure_logging(settings.logging.level, settings.logging.format)
    inbox = Ring.attach(args.inbox[0], int(args.inbox[1]))
    outbox = Ring.attach(args.outbox[0], int(args.outbox[1]))
    control = socket.socket(fileno=args.control)
    server = GpuServer(settings, inbox, outbox, control)
    try:
        asyncio.run(server.run())
    finally:
        inbox.close()
        outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
