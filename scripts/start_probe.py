"""Do session starts and stops hold the edge's event loop while other sessions play?

Runs a daemon in this process the way ``lipsync loadtest`` does (its own embedded NATS,
four derived avatars, admission opened up), starts FIRST sessions and lets them tick at
25 fps through the livekit-local sink, then starts MORE at once (their avatars already
prepared), lets them play, and stops those MORE at once. It reports how late a 5 ms
probe task ran before, during the starts and during the stops, each start's and stop's
reply time, the first sessions' clock restarts in each phase, and the stacks a loop
watch took whenever the loop stood still STALL_MS.

    python scripts/start_probe.py [--first 4] [--more 8] [--stall-ms 40]

Without a GPU it runs the tiny random model on the CPU in its own process (what the
figures are about is the edge's loop, not the model).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


async def probe(first: int, more: int, stall_s: float) -> dict:
    import nats

    from daemon import loadtest
    from daemon.app import Daemon
    from daemon.config import Settings

    settings = Settings()
    avatars = loadtest.make_avatars(settings.daemon.state_dir)
    settings, fps = loadtest.prepare_settings(settings, loadtest.LoadtestOptions(sessions=(first + more,), fps=25),
                                              avatars, loadtest._cuda_wanted(settings))
    ids = list(avatars)
    daemon = Daemon(settings)
    await daemon.start()
    nc = await nats.connect(daemon.nats_url)
    prefix = settings.nats.subject_prefix
    playing = [f"first-{i}" for i in range(first)]
    starting = [f"more-{i}" for i in range(more)]
    # The loadtest's own probes: a 5 ms task's lateness, and a loop watch's stacks.
    lag = loadtest.LoopLagProbe()
    stalls = loadtest.StallDumps(Path(settings.daemon.state_dir) / "start-probe-stalls.txt", threshold_s=stall_s)
    try:
        # The first sessions' avatars are prepared by their starts; the later ones reuse them.
        await asyncio.gather(*(loadtest._start_session(nc, prefix, sid, ids[i % len(ids)], 16000, fps)
                               for i, sid in enumerate(playing)))
        await asyncio.sleep(3.0)
        lag.start()
        lag.record()
        stalls.record()
        await asyncio.sleep(1.0)
        before = lag.take()
        lag.record()
        restarts0 = {sid: daemon.sessions[sid].clock_restarts for sid in playing}
        t0 = time.monotonic()
        prepared = ids[:min(first, len(ids))]
        replies = await asyncio.gather(*(loadtest._start_session(nc, prefix, sid, prepared[i % len(prepared)],
                                                                 16000, fps) for i, sid in enumerate(starting)))
        t1 = time.monotonic()
        await asyncio.sleep(0.5)
        during = lag.take()
        await asyncio.sleep(1.5)
        figures = await stalls.take()
        # The MORE sessions stop at once while the first ones keep playing.
        await asyncio.sleep(2.0)
        restarts1 = {sid: daemon.sessions[sid].clock_restarts for sid in playing}
        stalls.record()
        lag.record()
        t2 = time.monotonic()
        stops = await asyncio.gather(*(_timed_stop(nc, prefix, sid) for sid in starting))
        t3 = time.monotonic()
        await asyncio.sleep(0.5)
        during_stops = lag.take()
        left = sum(sid in daemon.sessions for sid in starting)
        await asyncio.sleep(1.5)
        stop_figures = await stalls.take()
        return {
            "fps": fps, "first": first, "more": more,
            "starts_s": round(t1 - t0, 3),
            "reply_ms_max": round(1000 * max(b - a for a, b in replies), 1),
            "loop_late_ms_max_before": round(1000 * max(before, default=0.0), 1),
            "loop_late_ms_max_during": round(1000 * max(during, default=0.0), 1),
            "first_sessions_clock_restarts": sum(daemon.sessions[sid].clock_restarts - restarts0[sid]
                                                 for sid in playing),
            "stall_dumps": figures["dumps"],
            "stacks": [(s["thread"], s["frames"], s["dumps"]) for s in figures["stacks"][:8]],
            "stops_s": round(t3 - t2, 3),
            "stop_reply_ms_max": round(1000 * max(stops), 1),
            "stopped_sessions_left": left,
            "loop_late_ms_max_during_stops": round(1000 * max(during_stops, default=0.0), 1),
            "first_sessions_clock_restarts_stops": sum(daemon.sessions[sid].clock_restarts - restarts1[sid]
                                                       for sid in playing),
            "stall_dumps_stops": stop_figures["dumps"],
            "stacks_stops": [(s["thread"], s["frames"], s["dumps"]) for s in stop_figures["stacks"][:8]],
        }
    finally:
        await lag.aclose()
        await stalls.take()  # ends its task where the run stopped before its take
        await asyncio.gather(*(loadtest._stop_session(nc, prefix, sid) for sid in playing + starting
                               if sid in daemon.sessions))
        await nc.close()
        await daemon.shutdown()


async def _timed_stop(nc, prefix: str, sid: str) -> float:
    """Stop one session; seconds until its reply."""
    from daemon import loadtest

    t = time.monotonic()
    await loadtest._stop_session(nc, prefix, sid)
    return time.monotonic() - t


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--first", type=int, default=4, help="sessions playing before the starts")
    parser.add_argument("--more", type=int, default=8, help="sessions started, then stopped, at once while they play")
    parser.add_argument("--stall-ms", type=float, default=40.0, help="the loop watch's threshold")
    args = parser.parse_args()
    if args.first < 1 or args.more < 1:
        parser.error("--first and --more must be at least 1")
    if "LIPSYNC_MODEL__RANDOM_WEIGHTS" not in os.environ:
        os.environ.update(LIPSYNC_MODEL__RANDOM_WEIGHTS="1", LIPSYNC_MODEL__RANDOM_WEIGHTS_SIZE="tiny")
    os.environ.setdefault("LIPSYNC_DAEMON__GPU_PROCESS", "1")
    import uvloop

    report = uvloop.run(probe(args.first, args.more, args.stall_ms / 1000))
    print("start_probe: " + json.dumps(report), flush=True)  # one line among the daemon's logs
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
