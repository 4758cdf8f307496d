"""`lipsync say --dump-chunks` writes the PCM chunks a `nats pub` recipe needs, and
`lipsync schema` describes every subject the daemon publishes on, lipsync.errors too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import nats
import numpy as np

from daemon.producer import read_wav_mono16
from tests.conftest import free_port
from tests.test_newcomer_shutdown import lipsyncd

SPEECH = Path(__file__).parent / "data" / "speech.wav"


def lipsync(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", "/dev/null", *args],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _check_chunks(folder: Path, rate: int, chunk_ms: int) -> None:
    """The files are the WAV resampled to ``rate``, cut every chunk_ms, in name order."""
    expected = read_wav_mono16(SPEECH, rate)[0].astype("<i2").tobytes()
    chunk_bytes = rate * chunk_ms // 1000 * 2
    files = sorted(folder.glob("chunk*.pcm"))
    assert [f.name for f in files[:2]] == ["chunk0000.pcm", "chunk0001.pcm"]
    assert len(files) == -(-len(expected) // chunk_bytes)
    sizes = [f.stat().st_size for f in files]
    assert set(sizes[:-1]) == {chunk_bytes} and 0 < sizes[-1] <= chunk_bytes
    assert b"".join(f.read_bytes() for f in files) == expected
    # Real speech, not silence: the dump carries the signal.
    assert np.abs(np.frombuffer(expected, "<i2")).max() > 1000


def test_dump_chunks_at_the_rate_given(tmp_path: Path):
    out = lipsync("say", "s1", str(SPEECH), "--rate", "16000", "--dump-chunks", str(tmp_path / "c"))
    assert out.returncode == 0, out.stderr
    _check_chunks(tmp_path / "c", 16000, 40)
    assert "nothing was sent" in out.stdout and "nats pub lipsync.audio.s1" in out.stdout
    # Again into the same folder: refused, so that no stale chunk is ever sent after new ones.
    again = lipsync("say", "s1", str(SPEECH), "--rate", "16000", "--dump-chunks", str(tmp_path / "c"))
    assert again.returncode == 1 and "already holds" in again.stderr
    bad = lipsync("say", "s1", str(SPEECH), "--rate", "12345", "--dump-chunks", str(tmp_path / "d"))
    assert bad.returncode == 2 and "22050" in bad.stderr and not (tmp_path / "d").exists()


async def test_dump_chunks_asks_the_session_rate_and_sends_nothing(tmp_path: Path):
    port = free_port()
    daemon = lipsyncd(tmp_path, port)
    url = f"nats://127.0.0.1:{port}"
    try:
        await asyncio.to_thread(daemon.wait_for, '"lipsyncd ready"', 60)
        nc = await nats.connect(url, allow_reconnect=False)
        start = json.dumps({"v": 1, "session_id": "d1", "avatar_id": "demo", "audio": {"sample_rate": 22050}})
        assert json.loads((await nc.request("lipsync.session.start", start.encode(), timeout=30)).data)["ok"]
        audio: list[bytes] = []

        async def on_audio(msg) -> None:
            audio.append(msg.data)

        await nc.subscribe("lipsync.audio.>", cb=on_audio)
        await nc.flush()
        out = await asyncio.to_thread(lipsync, "say", "d1", str(SPEECH), "--chunk-ms", "20",
                                      "--dump-chunks", str(tmp_path / "c"), "--nats", url)
        assert out.returncode == 0, out.stderr
        assert "22050 Hz" in out.stdout
        _check_chunks(tmp_path / "c", 22050, 20)
        await nc.flush()
        assert audio == []  # written, not sent
        unknown = await asyncio.to_thread(lipsync, "say", "nobody", str(SPEECH), "--dump-chunks",
                                          str(tmp_path / "n"), "--nats", url)
        assert unknown.returncode == 1 and "'nobody' is not live" in unknown.stderr and "--rate" in unknown.stderr
        await nc.close()
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait_exit, 30)
        daemon.kill()


async def test_schema_describes_lipsync_errors_as_the_daemon_sends_it(tmp_path: Path):
    out = lipsync("schema")
    assert out.returncode == 0, out.stderr
    schema = json.loads(out.stdout)["<prefix>.errors"]
    props = schema["properties"]
    assert props["type"]["const"] == "error" and props["session_id"]["const"] == ""
    assert {"code", "message", "ts"} <= set(schema["required"])

    port = free_port()
    daemon = lipsyncd(tmp_path, port)
    try:
        await asyncio.to_thread(daemon.wait_for, '"lipsyncd ready"', 60)
        nc = await nats.connect(f"nats://127.0.0.1:{port}", allow_reconnect=False)
        got: asyncio.Queue = asyncio.Queue()

        async def on_error(msg) -> None:
            await got.put(json.loads(msg.data))

        await nc.subscribe("lipsync.errors", cb=on_error)
        await nc.flush()
        await nc.publish("lipsync.session.stop", b"not json")  # no reply subject, no session id
        event = await asyncio.wait_for(got.get(), 10)
        await nc.close()
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait_exit, 30)
        daemon.kill()
    assert set(event) <= set(props) and set(schema["required"]) <= set(event)
    assert event["type"] == "error" and event["session_id"] == "" and event["code"] == "bad_json"
    for key, value in event.items():
        kind = props[key].get("type")
        assert kind is None or isinstance(value, {"string": str, "number": (int, float), "integer": int}[kind])
