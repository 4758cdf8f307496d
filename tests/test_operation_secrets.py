"""A password given in a server URL never reaches a log line or a CLI message: the
daemon and `lipsync` show the URL with its userinfo replaced by ``***``.

Real processes: lipsyncd against a nats-server that requires that user and password,
`lipsync status` against a closed port."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from daemon.log import redact_url, redact_urls_in
from tests.conftest import AuthNatsServer, free_port
from tests.test_operation_signals import Lipsyncd


def test_redact_url_keeps_where_and_drops_who():
    assert redact_url("nats://alice:s3cret@127.0.0.1:4222") == "nats://***@127.0.0.1:4222"
    assert redact_url("nats://tok@nats1:4222,nats://a:b@nats2:4222") == "nats://***@nats1:4222,nats://***@nats2:4222"
    assert redact_url("wss://k:p@w@lk.example.com/rtc?x=1") == "wss://***@lk.example.com/rtc?x=1"
    assert redact_url("nats://127.0.0.1:4222") == "nats://127.0.0.1:4222"
    assert redact_url("embedded") == "embedded"
    assert redact_urls_in("no route to 'nats://alice:s3cret@h:1'") == "no route to 'nats://***@h:1'"


def test_lipsyncd_never_logs_the_nats_password(tmp_path: Path):
    server = AuthNatsServer(tmp_path)
    server.start()
    url = f"nats://alice:s3cret@127.0.0.1:{server.port}"
    daemon = Lipsyncd(tmp_path, LIPSYNC_MODEL__ENABLED="false", LIPSYNC_NATS__URL=url)
    try:
        ready = daemon.wait_event("lipsyncd ready")
        assert ready["nats"] == f"nats://***@127.0.0.1:{server.port}"
        server.stop()  # the daemon now logs its reconnect attempts
        daemon.wait_event("nats disconnected; reconnecting", timeout=20)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=20) == 0
        assert "s3cret" not in daemon.output()
    finally:
        daemon.kill()
        server.stop()


def test_lipsyncd_unreachable_nats_logs_no_password(tmp_path: Path):
    url = f"nats://alice:s3cret@127.0.0.1:{free_port()}"  # nothing listens there
    daemon = Lipsyncd(tmp_path, LIPSYNC_MODEL__ENABLED="false", LIPSYNC_NATS__URL=url)
    try:
        connecting = daemon.wait_event("connecting to nats")
        assert connecting["servers"] == [redact_url(url)]
        daemon.wait_event("nats client error")  # it fails to connect, and retries
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=20) == 0
        assert "s3cret" not in daemon.output()
    finally:
        daemon.kill()


def test_cli_connection_error_shows_no_password(tmp_path: Path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    for args in (["status"], ["events"]):
        run = subprocess.run([sys.executable, "-m", "daemon.cli", *args, "--nats",
                              f"nats://alice:s3cret@127.0.0.1:{port}"],
                             cwd=tmp_path, env=env, capture_output=True, text=True, timeout=30)
        said = run.stdout + run.stderr
        assert run.returncode != 0, said
        assert "cannot reach NATS" in said, said
        assert f"nats://***@127.0.0.1:{port}" in said, said
        assert "s3cret" not in said, said
        assert "Traceback" not in said, said
