"""`lipsyncd` with ``daemon.edge_processes`` > 1: one GPU server and N edge processes.

    supervisor (lipsyncd)
      |- embedded nats-server (nats.url = "embedded")
      |- GPU server   python -m daemon.gpu_server --listen <state_dir>/gpu.sock
      |- edge 1..N    python -m daemon.main (daemon.gpu_socket set): NATS, sessions,
                      frame clocks, publishers; each attaches to the GPU server

The edges are whole daemons sharing the start queue group (stop, audio and control go
to all, the owner acts) and one GPU: each admits against the whole GPU's demand (the
server's status carries the other edges' streams), and the first edge never leaves the
start group, so that a full machine answers ``at_capacity``.

What the supervisor does:
- starts the GPU server, waits for its model, then the edges (each on a loopback HTTP
  port it reports in ``<state_dir>/edges/<name>.port``);
- an edge that exits (or whose ``/livez`` fails for ``EDGE_LIVENESS_S``) is restarted;
  its sessions, which the GPU server names when the edge's connection closes, each get
  an ``error`` event and ``stopped`` (reason ``edge_lost``): no other edge's session
  notices;
- a GPU server that exits is started again; the edges reattach and their sessions play
  idle frames meanwhile, with one ``error`` event each (``daemon.gpu_client``);
- SIGTERM: the edges drain (their sessions finish and get ``stopped``), then the GPU
  server stops, then the embedded nats-server;
- ``/health``, ``/livez`` and ``/readyz`` on ``http.port`` answer for every process, and
  ``/metrics`` merges the processes' metrics, each sample labelled with its ``process``;
  READY=1 and the watchdog go to systemd from here.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any

from daemon.config import Settings
from daemon.embedded_nats import EmbeddedNatsServer, _die_with_parent
from daemon.errors import INTERNAL, LipsyncError
from daemon.log import get_logger
from daemon.systemd import SystemdNotifier

log = get_logger("daemon.supervisor")
_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)
EXIT_CONFIG = 78
RESTART_DELAY_S = 1.0
POLL_S = 1.0  # how often the edges' /livez, /readyz and /health are read
EDGE_LIVENESS_S = 10.0  # an edge whose /livez fails this long is killed and restarted
GPU_MAX_FAILURES = 5  # GPU-server starts in a row that end before ready: then lipsyncd exits 1
LOST_WAIT_S = 2.0  # an edge named lost by the server but still running: its own problem


class _Child:
    """A process of ours, with what we last learnt of it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc: asyncio.subprocess.Process | None = None
        self.port: int | None = None
        self.restarts = 0
        self.checks: dict[str, tuple[bool, list[str]]] = {}
        self.live_failing_since: float | None = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None


class Supervisor:
    def __init__(self, settings: Settings, config_path: str | None) -> None:
        self.settings = settings
        self.config_path = config_path
        self.state_dir = settings.daemon.state_dir
        self.socket_path = self.state_dir / "gpu.sock"
        self.edges = [_Child(f"edge{i}") for i in range(1, settings.daemon.edge_processes + 1)]
        self.gpu = _Child("gpu")
        self.gpu_ready = False
        self.notifier = SystemdNotifier()
        self._stopping = asyncio.Event()
        self._signals = 0
        self._embedded: EmbeddedNatsServer | None = None
        self._nats_url: str | None = None
        self.nc: Any = None
        self._watch: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._calls: dict[int, asyncio.Future[Any]] = {}
        self._next_call = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._http: Any = None
        self.http_port: int | None = None
        self._heartbeat_at = time.monotonic()
        self._fatal: int | None = None  # an exit code that ends lipsyncd (an edge's bad config)
        self._clients: dict[str, list[str]] = {}  # edge name -> its sessions open on the GPU server

    # ---- lifecycle -------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        s = self.settings
        self.state_dir.mkdir(parents=True, exist_ok=True)
        (self.state_dir / "edges").mkdir(exist_ok=True)
        try:
            if s.nats.url == "embedded":
                self._embedded = EmbeddedNatsServer(s.nats.embedded_host, s.nats.embedded_port,
                                                    self.state_dir / "nats")
                await self._embedded.start()
                self._nats_url = self._embedded.url
            servers = [self._nats_url] if self._nats_url else [u.strip() for u in s.nats.url.split(",") if u.strip()]
            from daemon.bus import connect

            self.nc = await connect(s.nats, servers, name="lipsyncd-supervisor")
            await self.nc.subscribe(f"{s.nats.subject_prefix}.status", cb=self._on_status)
            if s.http.enabled:
                await self._start_http()
            if s.model.enabled:
                self._spawn(self._keep_gpu_server(), "gpu-server")
                if not await self._until(lambda: self.gpu_ready or self._fatal is not None):
                    return await self._shutdown(0)
                if self._fatal is not None:
                    return await self._shutdown(self._fatal)
            for edge in self.edges:
                self._spawn(self._keep_edge(edge), edge.name)
            self._spawn(self._poll_edges(), "edge-health")
            self._spawn(self._heartbeat(), "heartbeat")
            if not await self._until(lambda: all(e.checks.get("/livez", (False,))[0] for e in self.edges)
                                     or self._fatal is not None):
                return await self._shutdown(0)
            if self._fatal is None:
                self.notifier.ready(f"{len(self.edges)} edge processes and a GPU server")
                log.info("lipsyncd ready", edges=[e.name for e in self.edges], gpu_server=self.gpu.proc.pid
                         if self.gpu.proc else None, health=f"http://{s.http.host}:{self.http_port}/health")
                await self._until(lambda: self._fatal is not None)
            return await self._shutdown(self._fatal or 0)
        except LipsyncError as exc:
            log.error("startup failed", code=exc.code, error=exc.message)
            return await self._shutdown(EXIT_CONFIG if exc.code in ("models_missing", "config_invalid") else 1)

    async def _until(self, done: Any) -> bool:
        """Wait until ``done()`` or a stop signal; True for the former."""
        while not done():
            if self._stopping.is_set():
                return False
            try:
                await asyncio.wait_for(self._stopping.wait(), 0.1)
            except asyncio.TimeoutError:
                pass
        return True

    def _on_signal(self, sig: int) -> None:
        self._signals += 1
        if self._signals > 1:  # the edges hurry too (their second signal exits at once)
            for edge in self.edges:
                if edge.running:
                    edge.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            return
        log.info("signal received: draining the edges", signal=signal.Signals(sig).name)
        self._stopping.set()

    async def _shutdown(self, code: int) -> int:
        self._stopping.set()
        self.notifier.stopping()
        s = self.settings.daemon
        edges = [e for e in self.edges if e.running]
        for edge in edges:
            edge.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        limit = s.shutdown_timeout_s + s.drain_utterances_s + 5
        await self._wait_all(edges, limit)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.gpu.running:
            self.gpu.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            await self._wait_all([self.gpu], 15)
        if self._watch is not None:
            self._watch[1].close()
        if self._http is not None:
            await self._http.aclose()
        if self.nc is not None:
            try:
                await self.nc.drain()
            except Exception:
                pass
        if self._embedded is not None:
            await self._embedded.aclose()
        log.info("lipsyncd stopped", exit_code=code)
        return code

    @staticmethod
    async def _wait_all(children: list[_Child], limit_s: float) -> None:
        procs = [c.proc for c in children if c.proc is not None]
        try:
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), limit_s)
        except asyncio.TimeoutError:
            for c in children:
                if c.running:
                    log.error("a process did not stop in time: killed", process=c.name, limit_s=limit_s)
                    c.proc.kill()  # type: ignore[union-attr]
            await asyncio.gather(*(p.wait() for p in procs))

    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _env(self, extra: dict[str, str]) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, os.environ.get("PYTHONPATH")]))
        return {**env, **extra}

    # ---- the GPU server --------------------------------------------------------------
    async def _keep_gpu_server(self) -> None:
        failures = 0
        settings_path = self.state_dir / "gpu-server-settings.json"
        while not self._stopping.is_set():
            # Secrets print as '*****' in this dump: the GPU server needs none of them.
            settings_path.write_text(self.settings.model_dump_json())
            os.chmod(settings_path, 0o600)
            self.gpu.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon.gpu_server", "--settings", str(settings_path),
                "--listen", str(self.socket_path), env=self._env({}), preexec_fn=_die_with_parent(),
                start_new_session=True)
            ready = await self._watch_gpu_server()
            code = await self.gpu.proc.wait()
            self.gpu_ready = False
            if self._stopping.is_set():
                return
            failures = 0 if ready else failures + 1
            if code == EXIT_CONFIG:
                log.error("the GPU server cannot start with this config (see its error above)")
                self._fatal = EXIT_CONFIG
                return
            if failures >= GPU_MAX_FAILURES:
                log.error("the GPU server failed to start again; lipsyncd exits", attempts=failures)
                self._fatal = 1
                return
            self.gpu.restarts += 1
            log.error("the GPU server exited; restarting it (the edges' sessions show idle frames meanwhile)",
                      exit_code=code, restarts=self.gpu.restarts)
            await asyncio.sleep(RESTART_DELAY_S)

    async def _watch_gpu_server(self) -> bool:
        """Connect as the server's watcher once it listens; True once it was ready. Reads
        its ``client_lost`` notes until the connection ends."""
        proc = self.gpu.proc
        assert proc is not None
        reader = writer = None
        while proc.returncode is None and not self._stopping.is_set():
            if self.socket_path.exists():
                try:
                    reader, writer = await asyncio.open_unix_connection(str(self.socket_path))
                    writer.write(json.dumps({"role": "watch", "pid": os.getpid()}).encode() + b"\n")
                    await writer.drain()
                    break
                except OSError:
                    pass
            await asyncio.sleep(0.1)
        if reader is None or writer is None:
            return False
        ready = False
        try:
            first = await reader.readline()  # the model loaded and warmed up
            if not first or json.loads(first).get("op") != "ready":
                return False
            ready = self.gpu_ready = True
            self._watch = (reader, writer)
            log.info("GPU server ready", pid=proc.pid, restarts=self.gpu.restarts)
            while line := await reader.readline():
                msg = json.loads(line)
                if msg.get("op") == "client_lost":
                    self._spawn(self._client_lost(msg.get("name", ""), list(msg.get("sessions") or [])),
                                "client-lost")
                elif msg.get("op") == "reply":
                    fut = self._calls.pop(msg.get("id"), None)
                    if fut is not None and not fut.done():
                        fut.set_result(msg.get("result"))
        except (ConnectionError, ValueError):
            pass
        finally:
            self._watch = None
            writer.close()
            for fut in self._calls.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("the GPU server is gone"))
            self._calls.clear()
        return ready

    async def _gpu_call(self, op: str, timeout_s: float = 2.0) -> Any:
        if self._watch is None:
            raise ConnectionError("the GPU server is not ready")
        self._next_call += 1
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[self._next_call] = fut
        self._watch[1].write(json.dumps({"op": op, "id": self._next_call}).encode() + b"\n")
        return await asyncio.wait_for(fut, timeout_s)

    async def _client_lost(self, name: str, sessions: list[str]) -> None:
        """An edge's connection to the GPU server closed with these sessions open: when
        the edge itself is gone, each gets an ``error`` event and ``stopped``."""
        edge = next((e for e in self.edges if e.name == name), None)
        if not sessions or edge is None:
            return
        deadline = time.monotonic() + LOST_WAIT_S
        while edge.running and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if edge.running:  # alive: it reattaches (or ends its sessions) itself
            return
        from schemas import ErrorEvent, StoppedEvent

        from daemon.bus import Subjects

        subjects = Subjects(self.settings.nats.subject_prefix)
        code = edge.proc.returncode if edge.proc is not None else None
        for sid in sessions:
            log.error("session lost with its edge process", session_id=sid, edge=name, exit_code=code)
            now = time.time()
            for event in (ErrorEvent(session_id=sid, ts=now, code=INTERNAL,
                                     message=f"the process serving this session ({name}) exited with code {code}; "
                                             "start the session again"),
                          StoppedEvent(session_id=sid, ts=now, reason="edge_lost")):
                try:
                    await self.nc.publish(subjects.events(sid), event.model_dump_json().encode())
                except Exception as exc:
                    log.warning("could not publish", session_id=sid, error=str(exc) or type(exc).__name__)
        try:
            await self.nc.flush(timeout=2)
        except Exception:
            pass

    async def _on_status(self, msg: Any) -> None:
        """``<prefix>.status``: every edge's reply (asked on its own subject) merged: all
        sessions, their counts summed, admission as the edges see it (the whole GPU)."""
        from daemon.app import generated_fraction

        prefix = self.settings.nats.subject_prefix

        async def ask(edge: _Child) -> dict[str, Any] | None:
            try:
                reply = await self.nc.request(f"{prefix}.status.{edge.name}", b"", timeout=2)
                return json.loads(reply.data)
            except Exception:
                return None

        running = [e for e in self.edges if e.running]
        replies = await asyncio.gather(*(ask(e) for e in running))
        answered = {e.name: r for e, r in zip(running, replies) if r is not None}
        sessions = [x for r in answered.values() for x in r.get("sessions") or []]
        counts = [x["speech"]["counts"] for x in sessions if isinstance(x.get("speech"), dict)
                  and isinstance(x["speech"].get("counts"), dict)]
        first = next(iter(answered.values()), None)
        edges = {e.name: {"running": e.running, "answered": e.name in answered, "restarts": e.restarts,
                          "active": (answered.get(e.name) or {}).get("active")} for e in self.edges}
        merged: dict[str, Any] = {
            "sessions": sessions, "active": sum(r.get("active") or 0 for r in answered.values()),
            "capacity": first.get("capacity", 0) if first else 0,
            "accepting": any(r.get("accepting") for r in answered.values()),
            "device": {**(first.get("device") or {} if first else {}), "edges": edges,
                       "gpu_server": {"ready": self.gpu_ready, "restarts": self.gpu.restarts}},
            "admission": first.get("admission") if first else None,
            "speaking": sum(r.get("speaking") or 0 for r in answered.values()),
            "generated_fraction": generated_fraction(*counts),
            "gpu_busy": first.get("gpu_busy") if first else None,
        }
        if msg.reply:
            await msg.respond(json.dumps(merged, default=str).encode())

    # ---- the edges -------------------------------------------------------------------
    async def _keep_edge(self, edge: _Child) -> None:
        index = self.edges.index(edge) + 1
        port_file = self.state_dir / "edges" / f"{edge.name}.port"
        extra = {
            "LIPSYNC_DAEMON__EDGE_PROCESSES": "1",
            "LIPSYNC_DAEMON__EDGE_NAME": edge.name,
            "LIPSYNC_DAEMON__EDGE_INDEX": str(index),
            # lipsyncd reads each edge's health on loopback, whatever http says for itself.
            "LIPSYNC_HTTP__ENABLED": "true",
            "LIPSYNC_HTTP__HOST": "127.0.0.1",
            "LIPSYNC_HTTP__PORT": "0",
            "LIPSYNC_HTTP__PORT_FILE": str(port_file),
            # Several daemons on one queue group: audio for another edge's session is not an error.
            "LIPSYNC_NATS__REPORT_UNKNOWN_SESSIONS": "false",
        }
        if self.settings.model.enabled:
            extra["LIPSYNC_DAEMON__GPU_SOCKET"] = str(self.socket_path)
        if self._nats_url:
            extra["LIPSYNC_NATS__URL"] = self._nats_url
        args = ["--config", self.config_path] if self.config_path else []
        while not self._stopping.is_set():
            port_file.unlink(missing_ok=True)
            edge.port, edge.checks, edge.live_failing_since = None, {}, None
            edge.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "daemon.main", *args, env=self._env(extra), preexec_fn=_die_with_parent(),
                start_new_session=True)
            log.info("edge process started", edge=edge.name, pid=edge.proc.pid)
            code = await edge.proc.wait()
            edge.port = None
            if self._stopping.is_set():
                return
            if code == EXIT_CONFIG:
                log.error("an edge process cannot start with this config (see its error above)", edge=edge.name)
                self._fatal = EXIT_CONFIG
                return
            edge.restarts += 1
            log.error("an edge process exited; restarting it (only its own sessions ended)", edge=edge.name,
                      exit_code=code, restarts=edge.restarts)
            await asyncio.sleep(RESTART_DELAY_S)

    async def _poll_edges(self) -> None:
        import aiohttp

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            while True:
                for edge in self.edges:
                    await self._poll_edge(http, edge)
                try:  # which sessions each edge has open on the GPU (/health shows them)
                    self._clients = await self._gpu_call("clients") if self.settings.model.enabled else {}
                except Exception:
                    self._clients = {}
                await asyncio.sleep(POLL_S)

    async def _poll_edge(self, http: Any, edge: _Child) -> None:
        port_file = self.state_dir / "edges" / f"{edge.name}.port"
        if edge.port is None and edge.running and port_file.exists():
            text = port_file.read_text().strip()
            edge.port = int(text) if text.isdigit() else None
        if edge.port is None or not edge.running:
            edge.checks = {}
            return
        for path in ("/livez", "/readyz", "/health"):
            try:
                async with http.get(f"http://127.0.0.1:{edge.port}{path}") as r:
                    body = await r.json()
                    edge.checks[path] = (r.status == 200, list(body.get("reasons") or []))
            except Exception as exc:
                edge.checks[path] = (False, [f"{path} did not answer ({type(exc).__name__})"])
        now = time.monotonic()
        if edge.checks["/livez"][0]:
            edge.live_failing_since = None
        elif edge.live_failing_since is None:
            edge.live_failing_since = now
        elif now - edge.live_failing_since > EDGE_LIVENESS_S and edge.running:
            log.error("an edge process is not live: killing it to restart it", edge=edge.name,
                      reasons=edge.checks["/livez"][1])
            edge.proc.kill()  # type: ignore[union-attr]

    async def _heartbeat(self) -> None:
        interval = min(1.0, self.notifier.watchdog_interval_s or 1.0)
        while True:
            self._heartbeat_at = time.monotonic()
            if self.liveness()[0]:
                self.notifier.watchdog()
            await asyncio.sleep(interval)

    # ---- health and metrics ----------------------------------------------------------
    def _gpu_reasons(self) -> list[str]:
        if not self.settings.model.enabled or self.gpu_ready:
            return []
        return ["gpu: GPU-server process not ready (restarting, or down)"]

    def liveness(self) -> tuple[bool, list[str]]:
        """The supervisor turns and has not given up; a restarting process counts as
        live (its restart is under way), as in one process."""
        reasons = []
        if time.monotonic() - self._heartbeat_at > 3.0:
            reasons.append("supervisor: event loop stalled")
        if self._fatal is not None:
            reasons.append("supervisor: a process cannot be started again (see the log)")
        return (not reasons, reasons)

    def readiness(self) -> tuple[bool, list[str]]:
        """A start would be taken: the GPU server ready and some edge ready."""
        reasons = self._gpu_reasons()
        ready = [e for e in self.edges if e.checks.get("/readyz", (False,))[0]]
        if not ready:
            reasons.append("no edge process takes sessions: " + "; ".join(
                f"{e.name}: {', '.join(e.checks.get('/readyz', (False, ['not started']))[1]) or 'not started'}"
                for e in self.edges))
        return (not reasons, reasons)

    def health_check(self) -> tuple[bool, list[str]]:
        """Every process well: the GPU server ready and every edge's own /health."""
        reasons = self.liveness()[1] + self._gpu_reasons()
        for e in self.edges:
            if not e.running:
                reasons.append(f"{e.name}: not running (restarting)")
                continue
            ok, why = e.checks.get("/health", (False, ["starting"]))
            reasons += [] if ok else [f"{e.name}: {r}" for r in why or ["unhealthy"]]
        return (not reasons, reasons)

    def _processes(self) -> dict[str, Any]:
        """What /health, /livez and /readyz add: each process's pid, restarts, sessions."""
        processes: dict[str, Any] = {e.name: {"running": e.running, "pid": e.proc.pid if e.proc else None,
                                              "restarts": e.restarts, "port": e.port,
                                              "sessions": self._clients.get(e.name, [])} for e in self.edges}
        processes["gpu"] = {"running": self.gpu.running, "ready": self.gpu_ready,
                            "pid": self.gpu.proc.pid if self.gpu.proc else None, "restarts": self.gpu.restarts}
        return {"processes": processes}

    async def _start_http(self) -> None:
        from daemon.health import HealthServer

        http = self.settings.http
        self._http = HealthServer(http.host, http.port, None, self.health_check, live=self.liveness,
                                  ready=self.readiness, details=self._processes, metrics_text=self._metrics,
                                  port_file=http.port_file)
        await self._http.start()
        self.http_port = self._http.port

    async def _metrics(self) -> str:
        import aiohttp

        from daemon.metrics import REMOTE_FAMILIES, families

        texts: dict[str, str] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
            for e in self.edges:
                if e.port is None:
                    continue
                try:
                    async with http.get(f"http://127.0.0.1:{e.port}/metrics") as r:
                        # The GPU server's families come once, from it, not from every edge.
                        texts[e.name] = families(await r.text(), REMOTE_FAMILIES, keep=False)
                except Exception:
                    continue  # restarting: left out of this scrape
        try:
            texts["gpu"] = families(await self._gpu_call("metrics"), REMOTE_FAMILIES, keep=True)
        except Exception:
            pass
        texts["supervisor"] = self._own_metrics()
        return merge_metrics(texts)

    def _own_metrics(self) -> str:
        lines = ["# HELP lipsync_process_up Whether each of lipsyncd's processes runs (the GPU server: ready)",
                 "# TYPE lipsync_process_up gauge"]
        children = [*self.edges, self.gpu] if self.settings.model.enabled else list(self.edges)
        for c in children:
            up = self.gpu_ready if c is self.gpu else c.running
            lines.append(f'lipsync_process_up{{name="{c.name}"}} {1 if up else 0}')
        lines += ["# HELP lipsync_process_restarts_total Restarts of each of lipsyncd's processes",
                  "# TYPE lipsync_process_restarts_total counter"]
        lines += [f'lipsync_process_restarts_total{{name="{c.name}"}} {c.restarts}' for c in children]
        return "\n".join(lines) + "\n"


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?(\s.*)$")


def merge_metrics(texts: dict[str, str]) -> str:
    """Prometheus texts of several processes as one: each family once (its HELP and TYPE
    from the first process that has it), every sample with a ``process`` label."""
    families: dict[str, dict[str, Any]] = {}
    for process, text in texts.items():
        current: str | None = None
        for line in text.splitlines():
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split()[2]
                fam = families.setdefault(name, {"help": None, "type": None, "samples": []})
                fam["help" if line.startswith("# HELP ") else "type"] = fam["help" if line.startswith(
                    "# HELP ") else "type"] or line
                current = name
                continue
            m = _SAMPLE.match(line)
            if not m:
                continue
            name, labels, rest = m.groups()
            label = f'process="{process}"'
            labels = "{" + label + ("," + labels[1:-1] if labels and labels != "{}" else "") + "}"
            fam_name = current if current is not None and name.startswith(current) else name
            families.setdefault(fam_name, {"help": None, "type": None, "samples": []})["samples"].append(
                name + labels + rest)
    out: list[str] = []
    for fam in families.values():
        out += [x for x in (fam["help"], fam["type"]) if x] + fam["samples"]
    return "\n".join(out) + "\n"


async def run(settings: Settings, config_path: str | None) -> int:
    return await Supervisor(settings, config_path).run()
