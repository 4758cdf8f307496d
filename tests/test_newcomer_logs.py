"""Everything a running `lipsyncd` prints is one JSON object a line: the model libraries'
nags and progress bars are off, the stdlib loggers (musetalk's, LiveKit's Rust core) and
Python warnings come out as JSON. Failures of the publisher and of an avatar are logged
for what they are, not as "bad input"; LiveKit without credentials fails at start-up.

Real processes: lipsyncd on its embedded nats-server, tiny random weights on the CPU, the
LiveKit SDK's own sources, a LiveKit URL where nothing listens."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats

from daemon.demo_avatar import make_demo_video
from daemon.producer import read_wav_mono16, stream_pcm
from tests.conftest import free_port
from tests.media import write_color_video
from tests.test_newcomer_shutdown import Process

SPEECH = Path(__file__).parent / "data" / "speech.wav"


@contextlib.asynccontextmanager
async def _connected(daemon: Process, port: int, ready_timeout_s: float):
    """A NATS connection to the daemon once it is ready; at the end, a clean stop
    (SIGTERM, its exit awaited) when the body went through, and the process killed in any case."""
    nc = None
    try:
        await asyncio.to_thread(daemon.wait_for, '"lipsyncd ready"', ready_timeout_s, "err")
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        yield nc
        await nc.close()
        await _stop(daemon)
    finally:
        if nc is not None and not nc.is_closed:
            await nc.close()
        daemon.kill()


def _json_lines(process: Process) -> list[dict]:
    """Every line of the process's stdout and stderr, each a JSON object (or the test fails)."""
    records = []
    for stream, lines in (("stdout", process.lines), ("stderr", process.err_lines)):
        for _, line in lines:
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            assert isinstance(record, dict), f"a {stream} line that is not a JSON object: {line!r}"
            records.append(record)
    return records


def _env_of(tmp_path: Path, port: int) -> dict[str, str]:
    """lipsyncd on its embedded defaults (no config.toml in cwd), no model unless asked."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")},
        "LIPSYNC_NATS__EMBEDDED_PORT": str(port),
        "LIPSYNC_HTTP__PORT": "0",
        "LIPSYNC_DAEMON__STATE_DIR": str(tmp_path / "state"),
        "LIPSYNC_MODEL__ENABLED": "false",
    }


def _daemon(tmp_path: Path, port: int, **env: str) -> Process:
    """lipsyncd with its stdout and stderr read apart."""
    return Process([sys.executable, "-m", "daemon.main"], {**_env_of(tmp_path, port), **env}, tmp_path,
                   merge=False)


async def _start(nc, session_id: str, **fields) -> dict:
    body = {"v": 1, "session_id": session_id, **fields}
    msg = await nc.request("lipsync.session.start", json.dumps(body).encode(), timeout=120)
    return json.loads(msg.data)


async def _stop(daemon: Process) -> None:
    daemon.proc.send_signal(signal.SIGTERM)
    assert await asyncio.to_thread(daemon.wait_exit, 30) == 0, daemon.output()[-3000:]


async def test_a_session_with_the_model_logs_only_json(tmp_path: Path):
    """The model loads (random tiny weights), an avatar is prepared, the worker generates
    speech frames through the real LiveKit sources, the same avatar comes back from its
    disk cache, a faceless one fails, SIGTERM: not one line of bare text on the way."""
    face = make_demo_video(tmp_path / "face.mp4", seconds=0.6, fps=25, size=256)
    faceless = tmp_path / "faceless.mp4"
    write_color_video(faceless, 10, size=(128, 128))
    port = free_port()
    daemon = _daemon(tmp_path, port, LIPSYNC_MODEL__ENABLED="true", LIPSYNC_MODEL__RANDOM_WEIGHTS="1",
                     LIPSYNC_MODEL__DEVICE="cpu", LIPSYNC_MODEL__COMPILE="false",
                     LIPSYNC_OUTPUT__SINK="livekit-local", LIPSYNC_FETCH__ALLOW_FILE_URLS="true")
    async with _connected(daemon, port, 240) as nc:
        finished = asyncio.Event()

        async def on_event(msg) -> None:
            if json.loads(msg.data)["type"] == "playback_finished":
                finished.set()

        await nc.subscribe("lipsync.events.talk1", cb=on_event)
        started = await _start(nc, "talk1", idle_video_url=face.as_uri(), video={"fps": 5})
        assert started["ok"], started
        pcm, rate = read_wav_mono16(SPEECH, 16000)
        await stream_pcm(nc, "lipsync", "talk1", pcm[:rate], rate, realtime=False)
        await nc.publish("lipsync.control.talk1", b'{"op": "flush"}')
        await asyncio.wait_for(finished.wait(), 60)
        stopped = json.loads((await nc.request("lipsync.session.stop", json.dumps(
            {"v": 1, "session_id": "talk1"}).encode(), timeout=30)).data)
        assert stopped["ok"], stopped
        again = await _start(nc, "talk2", idle_video_url=face.as_uri(), video={"fps": 5})
        assert again["ok"], again
        failed = await _start(nc, "noface", idle_video_url=faceless.as_uri(), video={"fps": 5})
        assert not failed["ok"]
    records = _json_lines(daemon)
    events = [r.get("event") for r in records]
    assert "model loaded" in events and "lipsyncd stopped" in events
    assert any(r.get("event") == "utterance finished" and r.get("session_id") == "talk1" for r in records)
    assert any(r.get("event") == "session ready" and r.get("session_id") == "talk2"
               and "avatar_cache_ms" in r for r in records), "talk2's avatar did not come from the disk cache"
    # A stdlib logger of musetalk/, as JSON with its name.
    assert any(r.get("logger") == "musetalk.landmarks" and r["level"] == "warning" for r in records)
    assert not [r for r in records if r.get("event") == "python warning"]
    [noface] = [r for r in records if r.get("session_id") == "noface" and r.get("code") == failed["error"]["code"]]
    assert noface["event"] == "avatar failed", noface


async def test_livekit_logs_and_failures_are_json_and_named(tmp_path: Path):
    """LiveKit's Rust core logs its connection failures through the SDK's `livekit`
    logger: JSON here. A publisher that cannot connect is "publisher failed", a video
    that is not one "avatar failed", each with its code and the session id."""
    port = free_port()
    not_video = tmp_path / "not-video.mp4"
    not_video.write_bytes(b"\0" * 4096)
    daemon = _daemon(tmp_path, port, LIPSYNC_LIVEKIT__URL=f"ws://127.0.0.1:{free_port()}",
                     LIPSYNC_LIVEKIT__API_KEY="devkey", LIPSYNC_LIVEKIT__API_SECRET="s" * 32,
                     LIPSYNC_LIVEKIT__CONNECT_TIMEOUT_S="5", LIPSYNC_FETCH__ALLOW_FILE_URLS="true")
    async with _connected(daemon, port, 60) as nc:
        publisher = await _start(nc, "lk1", avatar_id="demo", livekit={"room": "r1"})
        assert publisher["error"]["code"] == "publisher_failed", publisher
        avatar = await _start(nc, "vid1", idle_video_url=not_video.as_uri(), livekit={"room": "r1"})
        assert avatar["error"]["code"] == "video_invalid", avatar
    records = _json_lines(daemon)
    rust = [r for r in records if r.get("logger") == "livekit"]
    assert rust and all(r["level"] in ("warning", "error") for r in rust), records
    assert any("Connection refused" in r["event"] for r in rust)
    [pub] = [r for r in records if r.get("code") == "publisher_failed"]
    assert (pub["event"], pub["session_id"], pub["level"]) == ("publisher failed", "lk1", "warning")
    [vid] = [r for r in records if r.get("code") == "video_invalid"]
    assert (vid["event"], vid["session_id"]) == ("avatar failed", "vid1")


def test_stdlib_logging_and_warnings_come_out_as_json():
    """The routes on their own: a library's stdlib logger at WARNING, musetalk's at INFO
    (the configured level), a library's INFO left out, a Python warning."""
    code = (
        "import logging, warnings\n"
        "from daemon.log import configure_logging\n"
        "configure_logging('INFO', 'json')\n"
        "logging.getLogger('livekit').warning('livekit::rtc_engine:564 - failed to connect')\n"
        "logging.getLogger('aiohttp.access').info('GET /health 200')\n"
        "logging.getLogger('musetalk.models').info('using float32 on cpu')\n"
        "warnings.warn('the given NumPy array is not writable', UserWarning)\n"
        "try:\n"
        "    1 / 0\n"
        "except ZeroDivisionError:\n"
        "    logging.getLogger('nats.aio.client').exception('callback failed')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout == ""
    records = [json.loads(line) for line in out.stderr.splitlines()]
    assert all(isinstance(r, dict) for r in records)
    by_logger = {r.get("logger", r["event"]): r for r in records}
    assert by_logger["livekit"]["event"].endswith("failed to connect") and by_logger["livekit"]["level"] == "warning"
    assert "aiohttp.access" not in by_logger
    assert by_logger["musetalk.models"]["level"] == "info"
    warning = by_logger["python warning"]
    assert warning["category"] == "UserWarning" and "not writable" in warning["message"]
    assert "ZeroDivisionError" in by_logger["nats.aio.client"]["exception"]
    assert len(records) == 4


def _lipsyncd_exit(tmp_path: Path, **env: str) -> tuple[int, float, list[dict]]:
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "daemon.main"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=60, env={**_env_of(tmp_path, free_port()), **env})
    records = [json.loads(line) for line in (out.stdout + out.stderr).splitlines()]
    return out.returncode, time.monotonic() - t, records


def test_livekit_without_credentials_fails_at_start(tmp_path: Path):
    """Exit 78 (EX_CONFIG: systemd does not restart), before the model or NATS start,
    never "ready"; the error names what to set."""
    code, took, records = _lipsyncd_exit(tmp_path, LIPSYNC_LIVEKIT__URL="wss://lk.example.com",
                                         LIPSYNC_MODEL__ENABLED="true")
    assert code == 78, records
    assert took < 15  # not after loading the model
    assert "lipsyncd ready" not in [r["event"] for r in records]
    [failed] = [r for r in records if r["event"] == "startup failed"]
    assert failed["code"] == "config_invalid"
    for text in ("wss://lk.example.com", "livekit.api_key", "LIPSYNC_LIVEKIT__API_KEY", "livekit.api_secret",
                 "unset livekit.url"):
        assert text in failed["error"], failed["error"]

    code, _, records = _lipsyncd_exit(tmp_path, LIPSYNC_LIVEKIT__URL="wss://lk.example.com",
                                      LIPSYNC_LIVEKIT__API_KEY="devkey")
    [failed] = [r for r in records if r["event"] == "startup failed"]
    assert code == 78 and "livekit.api_secret" in failed["error"] and "livekit.api_key " not in failed["error"]
    assert "devkey" not in failed["error"]

    code, _, records = _lipsyncd_exit(tmp_path, LIPSYNC_LIVEKIT__URL="wss://lk.example.com",
                                      LIPSYNC_LIVEKIT__API_KEY="devkey",
                                      LIPSYNC_LIVEKIT__API_SECRET_FILE=str(tmp_path / "no-secret"))
    [failed] = [r for r in records if r["event"] == "startup failed"]
    assert code == 78 and "cannot read secret file" in failed["error"] and "no-secret" in failed["error"]

    code, _, records = _lipsyncd_exit(tmp_path, LIPSYNC_OUTPUT__SINK="livekit")
    [failed] = [r for r in records if r["event"] == "startup failed"]
    assert code == 78 and "livekit.url is not set" in failed["error"]
