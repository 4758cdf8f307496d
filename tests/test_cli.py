"""The `lipsync` tool: schema export, models check, and the NATS commands against a
daemon on a real nats-server."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

from daemon.app import Daemon
from tests.test_daemon import make_settings
from tests.media import write_color_video

SPEECH = Path(__file__).parent / "data" / "speech.wav"


def lipsync(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "daemon.cli", "--config", "/dev/null", *args],
                          capture_output=True, text=True, timeout=timeout)


def test_schema_lists_every_message():
    out = lipsync("schema")
    assert out.returncode == 0, out.stderr
    schemas = json.loads(out.stdout)
    start = schemas["<prefix>.session.start"]
    assert start["properties"]["session_id"]["pattern"] == "^[A-Za-z0-9_-]{1,128}$"
    assert set(start["required"]) == {"v", "session_id"}
    events = json.dumps(schemas["<prefix>.events.<session_id>"])
    for kind in ("ready", "speaking", "playback_finished", "error", "stopped"):
        assert f'"{kind}"' in events


def test_models_check_names_the_fix(tmp_path):
    out = lipsync("models", "check", "--dir", str(tmp_path / "none"))
    assert out.returncode == 1
    assert "musetalkV15/unet.pth" in out.stdout and "lipsync models download" in out.stdout


async def test_start_status_stop_over_nats(nats_server, tmp_path):
    video = tmp_path / "v.mp4"
    write_color_video(video, 10)
    daemon = Daemon(make_settings(nats_server, tmp_path, video))
    await daemon.start()
    try:
        async def run(*args: str) -> subprocess.CompletedProcess:
            return await asyncio.to_thread(lipsync, *args, "--nats", nats_server.url)

        started = await run("start", "cli1", "--avatar", "colors")
        assert started.returncode == 0, started.stderr
        assert json.loads(started.stdout)["width"] == 64
        status = json.loads((await run("status")).stdout)
        assert [s["session_id"] for s in status["sessions"]] == ["cli1"]
        ctl = await run("control", "cli1", "clear")
        assert ctl.returncode == 0 and json.loads(ctl.stdout)["op"] == "clear"
        bad = await run("start", "cli2", "--avatar", "nobody")
        assert bad.returncode == 1 and "unknown_avatar" in bad.stdout
        stopped = await run("stop", "cli1")
        assert stopped.returncode == 0
        assert not daemon.sessions
    finally:
        await daemon.shutdown()


def test_no_daemon_is_a_clear_error():
    out = lipsync("status", "--nats", "nats://127.0.0.1:1")
    assert out.returncode != 0 and "is lipsyncd running" in (out.stderr + out.stdout)


async def test_say_resamples_to_the_session_rate(nats_server, tmp_path):
    """`lipsync say` asks the daemon for the session's rate: a 22.05 kHz WAV spoken into a
    16 kHz session arrives as 16 kHz PCM of the same duration."""
    video = tmp_path / "v.mp4"
    write_color_video(video, 10)
    daemon = Daemon(make_settings(nats_server, tmp_path, video))
    await daemon.start()
    try:
        out = await asyncio.to_thread(lipsync, "start", "say1", "--avatar", "colors", "--rate", "16000",
                                      "--nats", nats_server.url)
        assert out.returncode == 0, out.stderr
        said = await asyncio.to_thread(lipsync, "say", "say1", str(SPEECH), "--nats", nats_server.url)
        assert said.returncode == 0, said.stdout + said.stderr
        assert "16000 Hz" in said.stdout and "playback_finished" in said.stdout
        received = daemon.sessions["say1"].inbox.received_samples
        assert abs(received / 16000 - 3.178) < 0.01
    finally:
        await daemon.shutdown()


def test_bench_runs_through_the_cli_with_tiny_weights(tmp_path):
    """`lipsync bench` passes its options to the benchmark (here: tiny, CPU, one size)."""
    out_json = tmp_path / "bench.json"
    out = lipsync("bench", "--device", "cpu", "--dtypes", "float32", "--batch-sizes", "1", "--size", "tiny",
                  "--iters", "1", "--prep-seconds", "0.2", "--json", str(out_json), timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out_json.read_text())
    assert result["device"] == "cpu"
    [row] = result["eager"]
    assert (row["dtype"], row["batch"]) == ("float32", 1) and row["frames_per_s"] > 0
    bad = lipsync("status", "--bogus")
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


def test_render_cli_with_random_tiny_weights(tmp_path):
    """`lipsync render`: idle video + WAV -> MP4 with the audio muxed in, floor(s * fps) frames."""
    import av

    from daemon.demo_avatar import make_demo_video

    video = make_demo_video(tmp_path / "idle.mp4", seconds=0.6, fps=25, size=256)
    out = tmp_path / "talking.mp4"
    run = lipsync("render", "--video", str(video), "--audio", str(SPEECH), "--out", str(out),
                  "--random-weights", "tiny", "--device", "cpu", timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    with av.open(str(out)) as c:
        assert {s.type for s in c.streams} == {"video", "audio"}
        frames = sum(1 for _ in c.decode(video=0))
    assert frames == int(3.17827664399093 * 25)


def test_loadtest_rejects_bad_options_before_starting_anything():
    bad = lipsync("loadtest", "--sessions", "1,x")
    assert bad.returncode == 2
    assert "--sessions '1,x' must be comma-separated positive integers" in bad.stderr
    bad = lipsync("loadtest", "--sessions", "2", "--chunk-ms", "5", "--seconds", "0")
    assert bad.returncode == 2
    assert "--chunk-ms 5 must be 10..200" in bad.stderr and "--seconds must be > 0" in bad.stderr
    bad = lipsync("loadtest", "--sink", "file")
    assert bad.returncode == 2 and "invalid choice: 'file'" in bad.stderr
