"""A real Firestore emulator for the tests: the npm package ``@firestore-emulator/server``
(a gRPC implementation of the Firestore v1 API) run by node on 127.0.0.1.

Install once with ``npm ci --prefix tests/firestore``. The package binds 0.0.0.0 in its
``start()`` and has no option for the host, so the launcher below binds its gRPC server
itself, on 127.0.0.1 and a port chosen by the kernel (no race for a free port), and
prints that port. The emulator exits when its stdin closes, so a killed test run leaves
no node process behind.

Supported RPCs (0.3.x): BatchGetDocuments, Commit, RunQuery, Listen, BeginTransaction,
Rollback. GetDocument, ListDocuments, DeleteDocument and BatchWrite are missing.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import pytest

PACKAGE_DIR = Path(__file__).parent / "firestore"
MODULE_DIR = PACKAGE_DIR / "node_modules" / "@firestore-emulator" / "server"

_LAUNCHER = r"""
const { FirestoreServer } = require("@firestore-emulator/server");
const grpc = require("@grpc/grpc-js");
const emulator = new FirestoreServer();
emulator.server.bindAsync("127.0.0.1:0", grpc.ServerCredentials.createInsecure(), (err, port) => {
  if (err) { console.error(String(err)); process.exit(1); }
  console.log(`LISTENING ${port}`);
});
process.stdin.on("end", () => process.exit(0));
process.stdin.resume();
"""


def unavailable_reason() -> str | None:
    """Why the emulator cannot run here, or None when it can."""
    if shutil.which("node") is None:
        return "node is not installed (the Firestore emulator is an npm package)"
    if not MODULE_DIR.is_dir():
        return f"Firestore emulator not installed: run `npm ci --prefix {PACKAGE_DIR}`"
    return None


@contextmanager
def firestore_emulator(start_timeout_s: float = 20.0) -> Iterator[str]:
    """Run the emulator; yields ``"127.0.0.1:PORT"`` for FIRESTORE_EMULATOR_HOST."""
    reason = unavailable_reason()
    if reason is not None:
        raise RuntimeError(reason)
    # stderr goes to a file: the emulator logs every unimplemented call there, and a
    # full pipe nobody reads would stall it.
    with tempfile.TemporaryFile(mode="w+") as stderr:
        proc = subprocess.Popen(
            ["node", "-e", _LAUNCHER],
            cwd=PACKAGE_DIR,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
        try:
            port = _read_port(proc, stderr, start_timeout_s)
            with socket.create_connection(("127.0.0.1", port), timeout=start_timeout_s):
                pass
            yield f"127.0.0.1:{port}"
        finally:
            assert proc.stdin is not None and proc.stdout is not None
            proc.stdin.close()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()


def _read_port(proc: subprocess.Popen[str], stderr: IO[str], timeout_s: float) -> int:
    # readline() blocks; a thread lets a hung start fail after the timeout.
    result: list[str] = []
    assert proc.stdout is not None
    stdout = proc.stdout
    reader = threading.Thread(target=lambda: result.append(stdout.readline()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    line = result[0] if result else ""
    if not line.startswith("LISTENING "):
        proc.kill()
        proc.wait()
        stderr.seek(0)
        raise RuntimeError(f"Firestore emulator did not start: {line!r} {stderr.read()[-2000:]}")
    return int(line.split()[1])


@pytest.fixture(scope="module")
def firestore_emulator_host() -> Iterator[str]:
    """One emulator per test module; import this fixture into the module that needs it."""
    reason = unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    with firestore_emulator() as host:
        yield host


EMULATOR_PROJECT = "demo-lipsync"


@pytest.fixture
def avatars_collection(firestore_emulator_host, monkeypatch):  # noqa: F811
    """The real client's `avatars` collection in EMULATOR_PROJECT on the module's
    emulator, with FIRESTORE_EMULATOR_HOST set so that the code under test reads it too."""
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", firestore_emulator_host)
    from google.cloud import firestore

    client = firestore.Client(project=EMULATOR_PROJECT)
    yield client.collection("avatars")
    client.close()
