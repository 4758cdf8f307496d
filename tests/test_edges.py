"""`lipsyncd` with two edge processes and one GPU server (``daemon.edge_processes = 2``),
all real processes on the CPU with tiny random weights, on a real nats-server: sessions
spread over both edges and speak; SIGKILL of one edge ends only its sessions (each gets
``error`` and ``stopped``) and the edge comes back; SIGKILL of the GPU server gives the
other edge's session idle frames and an ``error``, then it speaks again; SIGTERM drains
everything and stops every process."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from daemon.producer import read_wav_mono16, stream_pcm
from daemon.supervisor import merge_metrics
from tests.conftest import free_port
from tests.test_speech import FPS, RATE, SPEECH, idle_video, tiny_models  # noqa: F401


def _config(path: Path, nats_url: str, models: Path, video: Path, http_port: int, state: Path) -> Path:
    path.write_text(f"""
[daemon]
state_dir = "{state}"
edge_processes = 2
shutdown_timeout_s = 15
[nats]
url = "{nats_url}"
[http]
port = {http_port}
[fetch]
allow_file_urls = true
[avatars.face]
idle_video_url = "{video.as_uri()}"
[model]
dir = "{models}"
device = "cpu"
landmarks = "opencv"
max_batch = 8
playout_delay_frames = 8
blend_frames = 2
""")
    return path


async def _get(port: int, path: str) -> tuple[int, dict | str]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
        async with http.get(f"http://127.0.0.1:{port}{path}") as r:
            return r.status, (await r.json() if path != "/metrics" else await r.text())


async def _until(check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = await check()
            if value:
                return value
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError):
            pass
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.2)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is gone too
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


async def _speak(client, sid: str) -> dict:
    pcm, rate = read_wav_mono16(SPEECH, RATE)
    await stream_pcm(client.nc, "lipsync", sid, pcm, rate, realtime=True, chunk_ms=40)
    await client.nc.publish(f"lipsync.control.{sid}", json.dumps({"op": "flush"}).encode())
    return await client.wait_event(sid, "playback_finished", timeout=60)


async def _start(client, sid: str) -> dict:
    reply = await client.request("lipsync.session.start", {
        "v": 1, "session_id": sid, "avatar_id": "face", "audio": {"sample_rate": RATE}, "video": {"fps": FPS}},
        timeout=120)
    assert reply["ok"], reply
    await client.wait_event(sid, "ready", timeout=30)
    return reply


def test_merged_metrics_keep_each_family_once_with_every_process_labelled():
    a = ("# HELP lipsync_sessions_active Sessions\n# TYPE lipsync_sessions_active gauge\n"
         "lipsync_sessions_active 2.0\n# HELP lipsync_lag Lag\n# TYPE lipsync_lag histogram\n"
         'lipsync_lag_bucket{le="0.1"} 1.0\nlipsync_lag_count 1.0\n')
    b = "# HELP lipsync_sessions_active Sessions\n# TYPE lipsync_sessions_active gauge\nlipsync_sessions_active 3.0\n"
    text = merge_metrics({"edge1": a, "edge2": b})
    assert text.count("# TYPE lipsync_sessions_active gauge") == 1
    lines = text.splitlines()
    i = lines.index("# TYPE lipsync_sessions_active gauge")
    assert lines[i + 1:i + 3] == ['lipsync_sessions_active{process="edge1"} 2.0',
                                  'lipsync_sessions_active{process="edge2"} 3.0']
    assert 'lipsync_lag_bucket{process="edge1",le="0.1"} 1.0' in lines
    assert 'lipsync_lag_count{process="edge1"} 1.0' in lines
    assert lines.index('lipsync_lag_count{process="edge1"} 1.0') > lines.index("# TYPE lipsync_lag histogram")


@pytest.mark.timeout(600)
async def test_two_edges_and_a_gpu_server_survive_each_others_crashes(nats_server, client, tmp_path, tiny_models,
                                                                      idle_video):
    port = free_port()
    state = tmp_path / "state"
    config = _config(tmp_path / "config.toml", nats_server.url, tiny_models, idle_video, port, state)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    proc = subprocess.Popen([sys.executable, "-m", "daemon.main", "--config", str(config)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    log_lines: list[str] = []

    async def read_log() -> None:
        while line := await asyncio.to_thread(proc.stdout.readline):
            log_lines.append(line.decode(errors="replace"))

    reader = asyncio.create_task(read_log())
    try:
        async def ready():
            status, body = await _get(port, "/readyz")
            return body if status == 200 else None

        await _until(ready, 240, "lipsyncd (two edges, a GPU server) became ready")
        _, health = await _get(port, "/health")
        procs = health["processes"]
        assert set(procs) == {"edge1", "edge2", "gpu"}
        pids = {name: p["pid"] for name, p in procs.items()}
        assert len(set(pids.values())) == 3 and proc.pid not in pids.values()

        # Sessions until both edges hold some (the queue group picks one at random).
        sids: list[str] = []

        async def spread():
            _, h = await _get(port, "/health")
            held = {e: h["processes"][e]["sessions"] for e in ("edge1", "edge2")}
            return held if sum(map(len, held.values())) == len(sids) and all(held.values()) else None

        held = None
        for i in range(12):
            sids.append(f"s{i}")
            await _start(client, sids[-1])
            if len(sids) >= 2:
                try:
                    held = await _until(spread, 3, "")
                    break
                except AssertionError:
                    continue
        assert held is not None, "twelve starts all went to one edge"
        victim, survivor = held["edge1"], held["edge2"]
        # `status`: lipsyncd merges both edges' replies.
        from schemas import StatusReply

        status = StatusReply.model_validate(await client.request("lipsync.status", b""))
        assert status.active == len(sids) and sorted(x["session_id"] for x in status.sessions) == sorted(sids)
        assert status.device["edges"]["edge1"]["active"] == len(victim) and status.device["gpu_server"]["ready"]

        # Both edges generate through the one GPU server.
        first = await _speak(client, survivor[0])
        assert first["interrupted"] is False
        _, metrics = await _get(port, "/metrics")
        assert metrics.count("# TYPE lipsync_sessions_active gauge") == 1
        assert f'lipsync_sessions_active{{process="edge1"}} {float(len(victim))}' in metrics
        assert f'lipsync_sessions_active{{process="edge2"}} {float(len(survivor))}' in metrics
        steps = [ln for ln in metrics.splitlines() if ln.startswith("lipsync_gpu_step_seconds_count")]
        assert len(steps) == 1 and 'process="gpu"' in steps[0] and float(steps[0].split()[-1]) >= 1
        assert 'lipsync_process_up{process="supervisor",name="gpu"} 1' in metrics

        # An edge killed: its sessions end with error + stopped, the other edge's do not.
        os.kill(pids["edge1"], signal.SIGKILL)
        for sid in victim:
            stopped = await client.wait_event(sid, "stopped", timeout=20)
            assert stopped["reason"] == "edge_lost"
            assert any(e["type"] == "error" and "edge1" in e["message"] for e in client.events_of(sid))
        assert not any(client.events_of(sid, "stopped") for sid in survivor)

        async def edge_back():
            _, h = await _get(port, "/health")
            e = h["processes"]["edge1"]
            return h if e["restarts"] == 1 and e["running"] and h["status"] == "ok" else None

        await _until(edge_back, 120, "the killed edge was restarted and lipsyncd is healthy again")
        after = await _speak(client, survivor[0])  # the survivor still generates
        assert after["interrupted"] is False and not client.events_of(survivor[0], "error")

        # The GPU server killed: the survivor's session shows idle frames, gets an error,
        # and speaks again once the server is back and the edges reattached.
        os.kill(pids["gpu"], signal.SIGKILL)
        await client.wait_event(survivor[0], "error", timeout=20)

        async def gpu_back():
            _, h = await _get(port, "/health")
            return h if h["processes"]["gpu"]["restarts"] == 1 and h["status"] == "ok" else None

        back = await _until(gpu_back, 180, "the GPU server was restarted and the edges reattached")
        assert back["processes"]["gpu"]["pid"] != pids["gpu"]
        assert not client.events_of(survivor[0], "stopped")
        again = await _speak(client, survivor[0])
        assert again["interrupted"] is False

        # SIGTERM: every session stopped by its edge, every process gone, exit 0.
        _, h = await _get(port, "/health")
        children = [p["pid"] for p in h["processes"].values()]
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 60)
        assert code == 0, "".join(log_lines[-30:])
        for sid in survivor:
            assert (await client.wait_event(sid, "stopped", timeout=5))["reason"] == "shutdown"
        assert not any(_alive(pid) for pid in children)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await reader
