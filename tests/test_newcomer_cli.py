"""`lipsync say --dump-chunks` writes the PCM chunks a `nats pub` recipe needs, and
`lipsync schema` describes every subject the daemon publishes on, lipsync.errors too.

`lipsync say` stops at its session's first error event; a bad WAV, `bench` without CUDA
and every other mistake are one line that says what to change, with exit status 1 (2 for
usage), never a traceback; `lipsync bench --help` is the help of `lipsync bench`."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import numpy as np
import pytest

from daemon.producer import read_wav_mono16, write_wav_mono16
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


# ---- `lipsync say` errors, `lipsync bench` ------------------------------------------------


def _one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _write_wav(path: Path, pcm: np.ndarray, rate: int) -> Path:
    return write_wav_mono16(path, pcm, rate)


async def test_say_to_an_unknown_session_stops_at_its_error(tmp_path: Path):
    """The daemon answers audio for a session that does not exist with unknown_session at
    once: `say` stops there, says so in one line and exits 1, instead of streaming the
    whole WAV and then waiting out the playback timeout."""
    pcm, rate = read_wav_mono16(SPEECH)
    long_wav = _write_wav(tmp_path / "long.wav", np.tile(pcm, 4), rate)  # 12.7 s at real time
    port = free_port()
    daemon = lipsyncd(tmp_path, port)
    try:
        await asyncio.to_thread(daemon.wait_for, '"lipsyncd ready"', 60)
        t = time.monotonic()
        out = await asyncio.to_thread(lipsync, "say", "nosuch", str(long_wav), "--realtime",
                                      "--nats", f"nats://127.0.0.1:{port}", timeout=30)
        took = time.monotonic() - t
    finally:
        daemon.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(daemon.wait_exit, 30)
        daemon.kill()
    assert out.returncode == 1, out.stdout + out.stderr
    line = _one_line(out.stderr)
    assert line.startswith("lipsync say: session 'nosuch': unknown_session: "), line
    assert "session.start" in line  # what to do about it
    assert took < 6, f"`say` took {took:.1f}s to give up"


@pytest.mark.parametrize("case", ["missing", "folder", "text", "empty", "truncated"])
def test_say_with_a_bad_wav_is_one_line(tmp_path: Path, case: str):
    """Said before anything connects: no daemon listens at the --nats URL given."""
    wav = tmp_path / "speech.wav"
    if case == "folder":
        wav.mkdir()
    elif case == "text":
        wav.write_text("not audio\n" * 500)
    elif case == "empty":
        wav.touch()
    elif case == "truncated":
        wav.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    out = lipsync("say", "s1", str(wav), "--nats", f"nats://127.0.0.1:{free_port()}", timeout=30)
    assert out.returncode == 1, out.stdout + out.stderr
    line = _one_line(out.stderr)
    assert line.startswith(f"lipsync say: {wav} ") and "give " in line, line
    assert "NATS" not in line
    expected = {"missing": "does not exist", "folder": "is a folder", "text": "not audio",
                "empty": "not audio", "truncated": "not audio"}[case]
    assert expected in line, line


def test_say_usage_errors_and_no_daemon_are_one_line(tmp_path: Path):
    out = lipsync("say", "s1", str(SPEECH), "--chunk-ms", "0")
    assert out.returncode == 2 and "--chunk-ms must be positive" in _one_line(out.stderr)
    out = lipsync("say", "s1", str(SPEECH), "--rate", "12345")
    assert out.returncode == 2 and "16000" in _one_line(out.stderr)
    out = lipsync("say", "s1", str(SPEECH), "--nats", f"nats://127.0.0.1:{free_port()}", timeout=30)
    assert out.returncode == 1 and "is lipsyncd running" in _one_line(out.stderr)


def test_bench_without_cuda_is_one_line():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = lipsync("bench", "--device", "cuda", timeout=120)
    assert out.returncode == 1, out.stdout + out.stderr
    line = _one_line(out.stderr)
    assert line.startswith("lipsync bench: ") and "CUDA is not available" in line
    assert "--device cpu --size tiny" in line


def test_bench_help_is_the_help_of_lipsync_bench():
    """Through `python -m daemon.cli` and through the installed `lipsync` script."""
    script = Path(sys.executable).parent / "lipsync"
    runs = [lipsync("bench", "--help", timeout=120)]
    if script.exists():
        env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
        runs.append(subprocess.run([str(script), "--config", "/dev/null", "bench", "--help"],
                                   capture_output=True, text=True, timeout=120, env=env))
    for out in runs:
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("usage: lipsync bench "), out.stdout[:200]
        assert "--batch-sizes" in out.stdout
    bad = lipsync("bench", "--no-such-option", timeout=120)
    assert bad.returncode == 2 and "lipsync bench: error: unrecognized arguments" in bad.stderr
