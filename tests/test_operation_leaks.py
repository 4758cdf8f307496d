"""Leaks: 100 sessions started and stopped in a loop, then 20 idle sessions held, against
a real daemon and nats-server: tasks, threads, file descriptors and RSS come back to
where they were (figures printed; docs/OPERATIONS.md has a run's)."""

from __future__ import annotations

import asyncio
import gc
import os
import threading

from daemon.app import Daemon
from daemon.config import Settings
from tests.conftest import free_port
from tests.media import write_color_video

IDLE_S = float(os.environ.get("LIPSYNC_TEST_IDLE_S", "20"))  # 300 for the documented run


def snapshot() -> dict[str, int]:
    gc.collect()
    with open("/proc/self/statm") as f:
        rss_pages = int(f.read().split()[1])
    return {
        "tasks": len(asyncio.all_tasks()),
        "threads": threading.active_count(),
        "fds": len(os.listdir("/proc/self/fd")),
        "rss_mb": rss_pages * os.sysconf("SC_PAGE_SIZE") // 2**20,
    }


async def test_sessions_started_and_stopped_leave_nothing_behind(nats_server, tmp_path, client):
    video = tmp_path / "idle.mp4"
    write_color_video(video, 6, size=(64, 48))
    daemon = Daemon(Settings(
        nats={"url": nats_server.url}, http={"port": free_port()},
        daemon={"state_dir": str(tmp_path / "state"), "max_sessions": 32, "shutdown_timeout_s": 5},
        model={"enabled": False}, output={"sink": "none"}, fetch={"allow_file_urls": True},
        avatars={"colors": {"idle_video_url": video.as_uri()}},
    ))
    await daemon.start()

    async def start(sid: str) -> None:
        reply = await client.request("lipsync.session.start", {"v": 1, "session_id": sid, "avatar_id": "colors"})
        assert reply["ok"], reply

    async def stop(sid: str) -> None:
        reply = await client.request("lipsync.session.stop", {"v": 1, "session_id": sid})
        assert reply["ok"], reply
        await client.wait_event(sid, "stopped")

    try:
        for i in range(5):  # first-use allocations (decoder pool, caches) out of the way
            await start(f"warm{i}")
            await stop(f"warm{i}")
        before = snapshot()
        for i in range(100):
            await start(f"loop{i}")
            await stop(f"loop{i}")
        after_loop = snapshot()
        for i in range(20):
            await start(f"idle{i}")
        held = snapshot()
        await asyncio.sleep(IDLE_S)
        held_later = snapshot()
        for i in range(20):
            await stop(f"idle{i}")
        after_idle = snapshot()
        print(f"\nleaks: before {before}, after 100 start/stop {after_loop}, 20 idle {held}, "
              f"after {IDLE_S:g} s {held_later}, all stopped {after_idle}")
        assert daemon.sessions == {}
        for figures in (after_loop, after_idle):
            assert figures["tasks"] <= before["tasks"] + 1, (before, figures)
            assert figures["threads"] <= before["threads"] + 2, (before, figures)
            assert figures["fds"] <= before["fds"] + 4, (before, figures)
            assert figures["rss_mb"] <= before["rss_mb"] + 60, (before, figures)
        # Idle sessions hold steady: nothing grows while they run.
        assert held_later["tasks"] == held["tasks"] and held_later["fds"] <= held["fds"] + 2
        assert held_later["rss_mb"] <= held["rss_mb"] + 20, (held, held_later)
    finally:
        await daemon.shutdown()
