"""``daemon.loop_watch.LoopWatch``: the stacks of a process whose event loop is held up
(the GPU server logs them with its hold-up warning), from faulthandler's own thread."""

from __future__ import annotations

import asyncio
import threading
import time

from daemon.loop_watch import LoopWatch


def _hold_the_loop(seconds: float) -> None:
    time.sleep(seconds)  # a call that never yields to the loop


def _busy_elsewhere(stop: threading.Event) -> None:
    while not stop.is_set():
        time.sleep(0.005)


async def test_a_held_loop_leaves_every_threads_stack_and_a_free_one_none() -> None:
    watch = LoopWatch()
    stop = threading.Event()
    other = threading.Thread(target=_busy_elsewhere, args=(stop,), name="worker-like")
    other.start()
    try:
        # The loop comes back in time, turn after turn: nothing is dumped.
        for _ in range(5):
            watch.arm(0.2)
            await asyncio.sleep(0.01)
        assert watch.take() == []
        # Held for 0.3 s with a 0.05 s timeout: the loop's thread stood in the holding
        # call, and the other thread's stack is there too.
        watch.arm(0.05)
        asyncio.get_running_loop().call_soon(_hold_the_loop, 0.3)
        await asyncio.sleep(0.35)
        stacks = watch.take()
        by_thread = {st["thread"]: st["frames"] for st in stacks}
        assert "_hold_the_loop" in by_thread.get("MainThread", ""), stacks
        assert "_busy_elsewhere" in by_thread.get("worker-like", ""), stacks
        # One dump: each of the two threads counted once (other threads of the test
        # process, idle pool workers left by earlier tests, may share a stack and merge).
        dumps = {st["thread"]: st["dumps"] for st in stacks}
        assert dumps["MainThread"] == 1 and dumps["worker-like"] == 1, stacks
        # Taken once: the next call reads only what came after.
        watch.arm(0.2)
        await asyncio.sleep(0.01)
        assert watch.take() == []
    finally:
        stop.set()
        other.join()
        watch.close()
