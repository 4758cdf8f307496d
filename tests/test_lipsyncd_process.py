"""`lipsyncd` as systemd runs it: a real process on embedded defaults (its own
nats-server), sd_notify READY/STOPPING, SIGTERM -> stopped events -> exit 0."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import nats
import numpy as np
import pytest

from tests.conftest import free_port


async def _wait_nats(url: str, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await nats.connect(url, allow_reconnect=False, connect_timeout=1)
        except Exception:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


def _spawn_lipsyncd(tmp_path: Path, **extra_env: str) -> tuple[subprocess.Popen, int]:
    """lipsyncd on its built-in defaults (cwd without a config.toml: embedded nats-server,
    the demo avatar), no model, state under tmp_path; returns it and its NATS port."""
    nats_port = free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
        "LIPSYNC_NATS__EMBEDDED_PORT": str(nats_port),
        "LIPSYNC_HTTP__PORT": str(free_port()),
        "LIPSYNC_DAEMON__STATE_DIR": str(tmp_path / "state"),
        "LIPSYNC_MODEL__ENABLED": "false",
        **extra_env,
    }
    proc = subprocess.Popen([sys.executable, "-m", "daemon.main"], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return proc, nats_port


async def _start_demo_session(nats_port: int, sid: str) -> tuple[nats.NATS, list[dict], dict]:
    """Connects (once the daemon's server is up), collects events, starts ``sid`` on the
    demo avatar; returns the connection, the event list and the start's reply."""
    nc = await _wait_nats(f"nats://127.0.0.1:{nats_port}")
    events: list[dict] = []

    async def on_event(msg):
        events.append(json.loads(msg.data))

    await nc.subscribe("lipsync.events.>", cb=on_event)
    deadline = time.monotonic() + 20
    while True:
        try:
            msg = await nc.request("lipsync.session.start", json.dumps(
                {"v": 1, "session_id": sid, "avatar_id": "demo"}).encode(), timeout=10)
            break
        except nats.errors.NoRespondersError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)
    reply = json.loads(msg.data)
    assert reply["ok"], reply
    return nc, events, reply


async def _event(events: list[dict], kind: str, timeout: float = 15.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        found = [e for e in events if e["type"] == kind]
        if found:
            return found[0]
        assert time.monotonic() < deadline, f"no {kind} event: {events}"
        await asyncio.sleep(0.02)


async def test_sigterm_during_speech_finishes_the_utterance_then_exits_0(tmp_path: Path):
    """SIGTERM to the real process while a session speaks: the utterance plays to its end
    (within daemon.drain_utterances_s), playback_finished and stopped go out, exit 0."""
    proc, nats_port = _spawn_lipsyncd(tmp_path)
    try:
        nc, events, _ = await _start_demo_session(nats_port, "talk")
        tone = (0.3 * 32767 * np.sin(2 * np.pi * 300 * np.arange(24000) / 16000)).astype("<i2")  # 1.5 s
        await nc.publish("lipsync.audio.talk", tone.tobytes())  # the default 16 kHz
        await nc.publish("lipsync.control.talk", b'{"op": "flush"}')
        await _event(events, "speaking")
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 20)
        assert code == 0
        finished = await _event(events, "playback_finished", timeout=2)
        assert finished["interrupted"] is False and finished["position_s"] == pytest.approx(1.5, abs=0.05)
        stopped = await _event(events, "stopped", timeout=2)
        assert stopped["reason"] == "shutdown"
        assert [e["type"] for e in events].index("playback_finished") < [e["type"] for e in events].index("stopped")
        await nc.close()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_lipsyncd_embedded_defaults_sigterm(tmp_path: Path):
    notify_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.setblocking(False)
    proc, nats_port = _spawn_lipsyncd(tmp_path, NOTIFY_SOCKET=str(notify_path))
    try:
        nc, events, reply = await _start_demo_session(nats_port, "demo1")
        assert (reply["width"], reply["height"]) == (512, 512)
        await asyncio.sleep(1.0)
        t = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 15)
        assert code == 0
        assert time.monotonic() - t < 10
        stopped = [e for e in events if e["type"] == "stopped"]
        assert stopped and stopped[0]["reason"] == "shutdown"
        assert Path(reply["output"]["path"]).stat().st_size > 1000
        await nc.close()
        messages = []
        while True:
            try:
                messages.append(notify.recv(4096).decode())
            except BlockingIOError:
                break
        assert any(m.startswith("READY=1") for m in messages), messages
        assert "STOPPING=1" in messages
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        out = proc.stdout.read().decode() if proc.stdout else ""
        notify.close()
    # JSON logs, one object a line, the session id bound on session lines.
    lines = [json.loads(l) for l in out.splitlines() if l.startswith("{")]
    assert any(l.get("event") == "session ready" and l.get("session_id") == "demo1" for l in lines), out[-2000:]


def test_missing_weights_exit_78_with_the_fix(tmp_path: Path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
        "LIPSYNC_NATS__EMBEDDED_PORT": str(free_port()),
        "LIPSYNC_HTTP__PORT": "0",
        "LIPSYNC_DAEMON__STATE_DIR": str(tmp_path / "state"),
        "LIPSYNC_MODEL__DIR": str(tmp_path / "no-models"),
    }
    proc = subprocess.run([sys.executable, "-m", "daemon.main"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    # 78 (EX_CONFIG): the systemd units do not restart on it.
    assert proc.returncode == 78
    line = next(json.loads(l) for l in proc.stderr.splitlines() if '"startup failed"' in l)
    assert line["code"] == "models_missing"
    assert "lipsync models download" in line["error"] and "random_weights" in line["error"]


async def test_sigterm_is_obeyed_after_the_log_reader_went_away(tmp_path: Path):
    """A closed stderr pipe (the log reader died) must not make the daemon ignore SIGTERM:
    the first log line of the signal handler used to raise BrokenPipeError first."""
    nats_port, http_port = free_port(), free_port()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
        "LIPSYNC_NATS__EMBEDDED_PORT": str(nats_port),
        "LIPSYNC_HTTP__PORT": str(http_port),
        "LIPSYNC_DAEMON__STATE_DIR": str(tmp_path / "state"),
        "LIPSYNC_MODEL__ENABLED": "false",
    }
    proc = subprocess.Popen([sys.executable, "-m", "daemon.main"], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        nc = await _wait_nats(f"nats://127.0.0.1:{nats_port}")
        reply = None
        deadline = time.monotonic() + 20
        while reply is None and time.monotonic() < deadline:
            try:
                reply = await nc.request("lipsync.status", b"", timeout=1)
            except Exception:
                await asyncio.sleep(0.1)
        await nc.close()
        assert reply is not None, "the daemon never answered status"
        proc.stderr.close()  # the reader goes away
        proc.send_signal(signal.SIGTERM)
        rc = await asyncio.to_thread(proc.wait, 20)
        assert rc == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


async def test_a_start_past_its_deadline_is_refused_with_start_timeout(nats_server, tmp_path):
    from daemon.app import Daemon
    from daemon.config import Settings
    from tests.conftest import free_port as port

    d = Daemon(Settings(nats={"url": nats_server.url}, http={"port": port()},
                        daemon={"state_dir": str(tmp_path / "state"), "start_timeout_s": 0.001},
                        model={"enabled": False}))
    await d.start()
    nc = await nats.connect(nats_server.url)
    try:
        msg = await nc.request("lipsync.session.start", json.dumps(
            {"v": 1, "session_id": "slow", "avatar_id": "demo", "audio": {"sample_rate": 16000}}).encode(), timeout=30)
        reply = json.loads(msg.data)
        assert reply["ok"] is False and reply["error"]["code"] == "start_timeout"
        assert "daemon.start_timeout_s" in reply["error"]["message"]
        assert not d.sessions
    finally:
        await nc.close()
        await d.shutdown()


@pytest.mark.parametrize("where", ["file", "env"])
def test_a_misspelled_setting_exits_78_naming_it(tmp_path: Path, where: str):
    """A typo in a field name must not be ignored (the daemon would run on a default the
    operator thinks they changed)."""
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
        "LIPSYNC_NATS__EMBEDDED_PORT": str(free_port()), "LIPSYNC_HTTP__PORT": "0",
        "LIPSYNC_DAEMON__STATE_DIR": str(tmp_path / "state"), "LIPSYNC_MODEL__ENABLED": "false",
    }
    if where == "file":
        config = tmp_path / "config.toml"
        config.write_text("[daemon]\nmax_sesions = 3\n")
        env["LIPSYNC_CONFIG"] = str(config)
    else:
        env["LIPSYNC_DAEMON__MAX_SESIONS"] = "3"
    proc = subprocess.run([sys.executable, "-m", "daemon.main"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 78, proc.stderr[-2000:]
    assert "max_sesions" in proc.stderr
