"""Small operational defects: a session id with a trailing newline, unknown-avatar
messages that listed every configured id, a CLI that ignored the NATS credentials, and
/metrics without the process metrics."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from daemon.avatars import AvatarResolver
from daemon.config import Settings
from daemon.errors import LipsyncError
from daemon.metrics import Metrics
from daemon.protocol import valid_session_id
from schemas.wire import SessionStart, SessionStop
from tests.conftest import AuthNatsServer
from tests.test_daemon import color_video, daemon, make_settings  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------- a. session id


@pytest.mark.parametrize("sid", ["abc\n", "abc\r\n", "\nabc", "a\nb"])
def test_session_id_with_a_newline_is_refused_by_the_models(sid):
    assert not valid_session_id(sid)
    with pytest.raises(ValidationError):
        SessionStop(v=1, session_id=sid)
    with pytest.raises(ValidationError):
        SessionStart(v=1, session_id=sid, avatar_id="colors")
    assert valid_session_id("abc") and SessionStop(v=1, session_id="a" * 128).session_id == "a" * 128


async def test_session_id_with_a_trailing_newline_is_refused_over_nats(daemon, client):  # noqa: F811
    reply = await client.request("lipsync.session.start",
                                 {"v": 1, "session_id": "abc\n", "avatar_id": "colors"})
    assert reply["ok"] is False
    assert reply["error"]["code"] == "invalid_session_id", reply
    assert "A-Z a-z 0-9 _ -" in reply["error"]["message"]
    status = await client.request("lipsync.status", b"")
    assert status["active"] == 0


# ---------------------------------------------------------------- b. unknown avatar


async def test_unknown_avatar_does_not_list_the_configured_ids(tmp_path):
    settings = Settings(
        daemon={"state_dir": str(tmp_path)},
        avatars={f"secret-avatar-{i}": {"idle_video_url": "asset:demo.mp4"} for i in range(50)},
    )
    with pytest.raises(LipsyncError) as info:
        await AvatarResolver(settings).resolve("nobody", None)
    message = str(info.value.message if hasattr(info.value, "message") else info.value)
    assert info.value.code == "unknown_avatar"
    assert "secret-avatar" not in message
    assert "'nobody' not found" in message and "[avatars]" in message
    assert "firestore.project" in message and "idle_video_url" in message
    assert len(message) < 300


# ---------------------------------------------------------------- c. CLI credentials


@pytest.fixture(scope="module")
def auth_nats(tmp_path_factory):
    server = AuthNatsServer(tmp_path_factory.mktemp("auth-nats"))
    server.start()
    yield server.url
    server.stop()


def _lipsync(tmp_path: Path, url: str, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    config = tmp_path / "config.toml"
    config.write_text("")
    environ.update(LIPSYNC_CONFIG=str(config), LIPSYNC_NATS__URL=url, **env)
    return subprocess.run([sys.executable, "-m", "daemon.cli", *argv], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=20)


def test_cli_status_uses_the_configured_credentials(auth_nats, tmp_path):
    run = _lipsync(tmp_path, auth_nats, "status", "--timeout", "0.5",
                   LIPSYNC_NATS__USER="alice", LIPSYNC_NATS__PASSWORD="s3cret")
    # Past authentication: nobody answers on lipsync.status.
    assert run.returncode != 0
    assert "no reply on lipsync.status" in run.stderr, run.stderr
    assert "authoriz" not in run.stderr.lower()


def test_cli_without_credentials_says_so_in_one_line(auth_nats, tmp_path):
    for argv in (["status", "--timeout", "0.5"], ["events", "--timeout", "0.5"]):
        run = _lipsync(tmp_path, auth_nats, *argv, LIPSYNC_NATS__PASSWORD="wrong", LIPSYNC_NATS__USER="alice")
        lines = run.stderr.strip().splitlines()
        assert run.returncode != 0 and len(lines) == 1, run.stderr
        assert "refused the credentials" in lines[0] and "LIPSYNC_NATS__PASSWORD" in lines[0]
        assert "wrong" not in lines[0]
    run = _lipsync(tmp_path, auth_nats, "status", "--timeout", "0.5")
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "refused the credentials" in lines[0], run.stderr


# ---------------------------------------------------------------- d. process metrics


def test_metrics_hold_process_and_platform_collectors():
    from prometheus_client import generate_latest

    text = generate_latest(Metrics().registry).decode()
    names = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line and not line.startswith("#")}
    assert "python_info" in names
    if sys.platform.startswith("linux"):
        assert {"process_resident_memory_bytes", "process_open_fds", "process_start_time_seconds"} <= names
        rss = next(float(line.split()[1]) for line in text.splitlines()
                   if line.startswith("process_resident_memory_bytes "))
        assert rss > 1e6


async def test_daemon_metrics_endpoint_has_process_metrics(daemon):  # noqa: F811
    import aiohttp

    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{daemon.settings.http.port}/metrics") as resp:
            text = await resp.text()
    assert "python_info" in text
    if sys.platform.startswith("linux"):
        assert "process_resident_memory_bytes " in text and "process_open_fds " in text
