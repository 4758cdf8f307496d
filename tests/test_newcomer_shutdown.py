"""A stopped `lipsyncd` process is gone at once, and `lipsync events` notices: it says so
and exits 1, or with --follow waits for the daemon to come back and goes on.

Real processes throughout: lipsyncd on its embedded nats-server, `lipsync events` as a
user runs it, a producer on nats-py."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nats

from tests.conftest import free_port


class Process:
    """A child process whose output lines are read as they come, each with the monotonic
    time it arrived, and whose exit time is taken the moment it happens."""

    def __init__(self, cmd: list[str], env: dict[str, str], cwd: Path, merge: bool = True) -> None:
        self.proc = subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT if merge else subprocess.PIPE)
        self.lines: list[tuple[float, str]] = []  # stdout (and stderr when merged)
        self.err_lines: list[tuple[float, str]] = []
        self.exited_at: float | None = None
        self._readers = [threading.Thread(target=self._read, args=(self.proc.stdout, self.lines), daemon=True)]
        if not merge:
            self._readers.append(threading.Thread(target=self._read, args=(self.proc.stderr, self.err_lines),
                                                  daemon=True))
        for t in self._readers:
            t.start()
        threading.Thread(target=self._wait, daemon=True).start()

    def _read(self, stream, into: list[tuple[float, str]]) -> None:
        for raw in stream:
            into.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))

    def _wait(self) -> None:
        self.proc.wait()
        self.exited_at = time.monotonic()

    def wait_for(self, text: str, timeout: float, stream: str = "out") -> str:
        lines = self.lines if stream == "out" else self.err_lines
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for _, line in list(lines):
                if text in line:
                    return line
            if self.exited_at is not None and all(not t.is_alive() for t in self._readers):
                break
            time.sleep(0.02)
        raise AssertionError(f"no line with {text!r} within {timeout}s; got:\n" + self.output()[-3000:])

    def wait_exit(self, timeout: float) -> int:
        code = self.proc.wait(timeout)
        for t in self._readers:
            t.join(5)
        return code

    def output(self) -> str:
        return "\n".join(l for _, l in self.lines + self.err_lines)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def lipsyncd(tmp_path: Path, nats_port: int, name: str = "d", **env: str) -> Process:
    """lipsyncd on its embedded defaults (cwd without config.toml), on ``nats_port``."""
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
        "LIPSYNC_NATS__EMBEDDED_PORT": str(nats_port),
        "LIPSYNC_HTTP__PORT": "0",
        "LIPSYNC_DAEMON__STATE_DIR": str(tmp_path / f"state-{name}"),
        "LIPSYNC_MODEL__ENABLED": "false",
        **env,
    }
    return Process([sys.executable, "-m", "daemon.main"], full, tmp_path)


def lipsync(tmp_path: Path, nats_port: int, command: str, *args: str) -> Process:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    return Process([sys.executable, "-m", "daemon.cli", "--config", "/dev/null", command,
                    "--nats", f"nats://127.0.0.1:{nats_port}", *args], env, tmp_path, merge=False)


def lipsync_events(tmp_path: Path, nats_port: int, *args: str) -> Process:
    return lipsync(tmp_path, nats_port, "events", *args)


async def start_session(nats_port: int, session_id: str) -> dict:
    nc = await nats.connect(f"nats://127.0.0.1:{nats_port}", allow_reconnect=False, connect_timeout=2)
    try:
        msg = await nc.request("lipsync.session.start", json.dumps(
            {"v": 1, "session_id": session_id, "avatar_id": "demo"}).encode(), timeout=30)
        return json.loads(msg.data)
    finally:
        await nc.close()


def test_sigterm_of_an_idle_daemon_exits_right_after_its_last_log_line(tmp_path: Path):
    """With the model loaded (tiny random weights on the CPU), as a daemon runs by
    default: the interpreter's teardown of torch and the rest used to keep the process
    alive 1-3 s after "lipsyncd stopped"."""
    daemon = lipsyncd(tmp_path, free_port(), LIPSYNC_MODEL__ENABLED="true", LIPSYNC_MODEL__RANDOM_WEIGHTS="1",
                      LIPSYNC_MODEL__DEVICE="cpu", LIPSYNC_MODEL__COMPILE="false")
    try:
        daemon.wait_for('"lipsyncd ready"', 180)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit(30) == 0, daemon.output()[-3000:]
    finally:
        daemon.kill()
    last_at, last = daemon.lines[-1]
    assert '"lipsyncd stopped"' in last, daemon.output()[-3000:]
    assert daemon.exited_at is not None
    assert daemon.exited_at - last_at < 0.5, f"exited {daemon.exited_at - last_at:.2f}s after its last log line"


async def test_events_says_when_the_daemon_goes_away_and_exits_1(tmp_path: Path):
    port = free_port()
    daemon = lipsyncd(tmp_path, port)
    events = None
    try:
        daemon.wait_for('"lipsyncd ready"', 60)
        events = lipsync_events(tmp_path, port)
        # Its subscription is live once it prints the session's ready event.
        assert (await start_session(port, "ev1"))["ok"]
        events.wait_for('"type":"ready"', 20)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit(30) == 0
        assert events.wait_exit(10) == 1
        assert any('"type":"stopped"' in l for _, l in events.lines)  # what was sent is still printed
        said = events.wait_for("closed", 1, stream="err")
        assert f"nats://127.0.0.1:{port}" in said and "--follow" in said
    finally:
        daemon.kill()
        if events is not None:
            events.kill()


async def test_events_follow_waits_for_the_daemon_to_come_back(tmp_path: Path):
    port = free_port()
    first = lipsyncd(tmp_path, port, "first")
    second = events = None
    try:
        first.wait_for('"lipsyncd ready"', 60)
        events = lipsync_events(tmp_path, port, "--follow")
        assert (await start_session(port, "f1"))["ok"]
        events.wait_for('"session_id":"f1","ts"', 20)
        first.proc.send_signal(signal.SIGTERM)
        assert first.wait_exit(30) == 0
        events.wait_for("waiting for it to come back", 10, stream="err")
        time.sleep(1.0)
        assert events.proc.poll() is None, events.output()
        # The same port again, right away: the old server's connections are in TIME_WAIT.
        second = lipsyncd(tmp_path, port, "second")
        second.wait_for('"lipsyncd ready"', 60)
        events.wait_for("reconnected", 15, stream="err")
        assert (await start_session(port, "f2"))["ok"]
        events.wait_for('"session_id":"f2"', 20)
        events.proc.send_signal(signal.SIGINT)
        assert events.wait_exit(10) == 0
    finally:
        for proc in (first, second, events):
            if proc is not None:
                proc.kill()


def test_events_quits_at_ctrl_c_or_sigterm_while_it_waits_for_nats(tmp_path: Path):
    """Waiting for a daemon that is not there yet: Ctrl-C and SIGTERM quit at once with
    status 0 (through the event loop's own signal handler, which wakes a loop idle in its
    poll whichever thread the signal lands on)."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        events = lipsync_events(tmp_path, free_port(), "--follow")
        try:
            events.wait_for("not there yet: waiting for it", 20, stream="err")
            time.sleep(0.3)  # inside its retry sleep, or a connect attempt
            sent = time.monotonic()
            events.proc.send_signal(sig)
            assert events.wait_exit(10) == 0, events.output()
            assert events.exited_at is not None and events.exited_at - sent < 5, events.output()
            assert not any("Traceback" in l for _, l in events.lines + events.err_lines), events.output()
        finally:
            events.kill()


async def test_say_quits_at_ctrl_c_while_it_waits_for_playback_finished(tmp_path: Path):
    """All its audio sent at once, `lipsync say` waits for the session's playback to end
    (about 3 s of speech): Ctrl-C then quits at once with status 130."""
    port = free_port()
    daemon = lipsyncd(tmp_path, port)
    say = None
    try:
        daemon.wait_for('"lipsyncd ready"', 60)
        assert (await start_session(port, "s1"))["ok"]
        say = lipsync(tmp_path, port, "say", "s1", str(Path(__file__).parent / "data" / "speech.wav"))
        say.wait_for("streaming 3.18s", 20)
        time.sleep(0.5)  # every chunk sent: it waits for playback_finished
        sent = time.monotonic()
        say.proc.send_signal(signal.SIGINT)
        assert say.wait_exit(10) == 130, say.output()
        assert say.exited_at is not None and say.exited_at - sent < 2.5, say.output()
        assert not any('"type":"playback_finished"' in l for _, l in say.lines), say.output()
        assert not any("Traceback" in l for _, l in say.lines + say.err_lines), say.output()
    finally:
        daemon.kill()
        if say is not None:
            say.kill()
