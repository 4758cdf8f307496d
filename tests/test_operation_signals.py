"""A signal at any phase of `lipsyncd` stops it cleanly, and its embedded nats-server
never outlives it: SIGTERM or Ctrl-C while the model loads exits 0 with the port free
again, a second signal exits at once, and a SIGKILLed daemon takes its server along.

Real processes: lipsyncd on its embedded nats-server, a tiny random-weight model
loading on the CPU (the slow phase of start-up)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest
from nats.aio.client import Srv

from daemon.embedded_nats import port_problem
from tests.conftest import free_port


class Lipsyncd:
    """`lipsyncd` on an embedded nats-server at a free port, its output collected."""

    def __init__(self, tmp_path: Path, **env: str) -> None:
        self.port = free_port()
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
            "LIPSYNC_NATS__EMBEDDED_PORT": str(self.port),
            "LIPSYNC_HTTP__ENABLED": "false",
            "LIPSYNC_DAEMON__STATE_DIR": str(tmp_path / "state"),
            **env,
        }
        self.proc = subprocess.Popen([sys.executable, "-m", "daemon.main"], cwd=tmp_path, env=full_env,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def output(self) -> str:
        return "\n".join(self.lines)

    def events(self) -> list[dict]:
        out = []
        for line in list(self.lines):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
        return out

    def wait_port_open(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "lipsyncd exited early:\n" + self.output()[-3000:]
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise AssertionError("the embedded nats-server never listened:\n" + self.output()[-3000:])

    def wait_event(self, name: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for event in self.events():
                if event.get("event") == name:
                    return event
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {name!r} line:\n" + self.output()[-3000:])

    def wait_exit(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"lipsyncd still running {timeout}s after the signal:\n"
                                 + self.output()[-3000:]) from None
        self._reader.join(5)
        return code

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _model_loading_env() -> dict[str, str]:
    return {"LIPSYNC_MODEL__ENABLED": "true", "LIPSYNC_MODEL__RANDOM_WEIGHTS": "1",
            "LIPSYNC_MODEL__DEVICE": "cpu", "LIPSYNC_DAEMON__SHUTDOWN_TIMEOUT_S": "10"}


def _port_free_soon(port: int, timeout: float = 5.0) -> str | None:
    deadline = time.monotonic() + timeout
    while (problem := port_problem("127.0.0.1", port)) is not None and time.monotonic() < deadline:
        time.sleep(0.05)
    return problem


def _gone(pid: int) -> bool:
    """No such process, or a zombie waiting for whoever adopted it to reap it."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_signal_while_the_model_loads_exits_0_and_frees_the_port(tmp_path: Path, sig):
    daemon = Lipsyncd(tmp_path, **_model_loading_env())
    try:
        daemon.wait_port_open()  # NATS is up; the model is loading now
        daemon.proc.send_signal(sig)
        code = daemon.wait_exit(timeout=30)
        names = [e.get("event") for e in daemon.events()]
        assert "lipsyncd ready" not in names, "the signal came too late to test start-up:\n" + daemon.output()
        assert code == 0, daemon.output()[-3000:]
        assert "lipsyncd stopped" in names, daemon.output()[-3000:]
        problem = _port_free_soon(daemon.port)
        assert problem is None, f"the embedded nats-server outlived lipsyncd: {problem}"
        # A new server binds the port at once: the next lipsyncd would start.
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("127.0.0.1", daemon.port))
            sock.listen()
    finally:
        daemon.kill()


def test_a_second_signal_exits_at_once_without_leaving_the_server(tmp_path: Path):
    daemon = Lipsyncd(tmp_path, **_model_loading_env())
    try:
        daemon.wait_port_open()
        daemon.proc.send_signal(signal.SIGTERM)
        daemon.wait_event("signal received during start-up: stopping", timeout=20)
        daemon.proc.send_signal(signal.SIGINT)
        code = daemon.wait_exit(timeout=20)
        assert code in (0, 1), daemon.output()[-3000:]
        assert _port_free_soon(daemon.port) is None
    finally:
        daemon.kill()


def test_sigkilled_daemon_takes_its_nats_server_along(tmp_path: Path):
    daemon = Lipsyncd(tmp_path, LIPSYNC_MODEL__ENABLED="false")
    try:
        started = daemon.wait_event("embedded nats-server started")
        pid = started["pid"]
        assert not _gone(pid)
        daemon.wait_event("lipsyncd ready")
        daemon.proc.send_signal(signal.SIGKILL)
        assert daemon.wait_exit(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 5
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _gone(pid):
            os.kill(pid, signal.SIGKILL)  # do not leave it behind for the next test
            pytest.fail("the embedded nats-server outlived its SIGKILLed parent")
        assert _port_free_soon(daemon.port) is None
    finally:
        daemon.kill()


# ---- NATS liveness -------------------------------------------------------------------
def test_connect_options_notice_a_dead_server_in_seconds():
    from daemon.bus import connect_options
    from daemon.config import NatsSection

    cfg = NatsSection()

    async def cb(*_):
        pass

    opts = connect_options(cfg, ["nats://127.0.0.1:4222"], dict(closed_cb=cb, disconnected_cb=cb))
    # nats-py's default is a PING every 120 s: minutes before a half-open link is seen.
    assert opts["ping_interval"] == cfg.ping_interval_s == 5.0
    assert opts["max_outstanding_pings"] == cfg.max_outstanding_pings == 2
    assert opts["max_reconnect_attempts"] == -1 and opts["allow_reconnect"]
    assert opts["closed_cb"] is cb
    pool = [Srv(urlparse("nats://a:1")), Srv(urlparse("nats://b:2"))]
    pool[0].reconnects = 3
    delays = set()
    for _ in range(50):
        server, delay = opts["reconnect_to_server_handler"](pool, {})
        assert server is pool[1]  # the one tried least
        assert cfg.reconnect_time_wait_s <= delay <= cfg.reconnect_time_wait_s + cfg.reconnect_jitter_s
        delays.add(delay)
    assert len(delays) > 1, "no jitter: daemons would reconnect in step"


def test_a_frozen_nats_server_is_noticed_in_seconds(tmp_path: Path):
    from tests.conftest import NatsServerProcess

    server = NatsServerProcess(tmp_path / "nats")
    server.start()
    daemon = Lipsyncd(tmp_path, LIPSYNC_MODEL__ENABLED="false", LIPSYNC_NATS__URL=server.url,
                      LIPSYNC_NATS__PING_INTERVAL_S="1", LIPSYNC_NATS__MAX_OUTSTANDING_PINGS="2",
                      LIPSYNC_NATS__RECONNECT_TIME_WAIT_S="0.2")
    try:
        daemon.wait_event("lipsyncd ready")
        os.kill(server.proc.pid, signal.SIGSTOP)  # half-open: the TCP link stays, nothing answers
        try:
            t = time.monotonic()
            daemon.wait_event("nats disconnected; reconnecting", timeout=15)
            assert time.monotonic() - t < 15
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
        daemon.wait_event("nats reconnected", timeout=20)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=20) == 0, daemon.output()[-3000:]
    finally:
        daemon.kill()
        os.kill(server.proc.pid, signal.SIGCONT)
        server.stop()
