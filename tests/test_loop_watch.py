"""``daemon.loop_watch.LoopWatch``: the stacks of a process whose event loop is held up
(the GPU server logs them with its hold-up warning), taken by the watch's own thread
under the GIL."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

from daemon.loop_watch import LoopWatch

ROOT = Path(__file__).resolve().parent.parent


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


def _spin_in_python(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # Python code the whole time: the GIL changes hands
        sum(range(100))


async def test_a_loop_held_in_python_code_is_seen_while_it_stands_there() -> None:
    watch = LoopWatch()
    try:
        watch.arm(0.05)
        asyncio.get_running_loop().call_soon(_spin_in_python, 0.4)
        await asyncio.sleep(0.45)
        text = watch.read()
        assert text.count("Timeout (") == 1, text
        # Taken within the hold (the watch's thread gets the GIL between bytecodes), not
        # after it: the loop's stack is the spinning call's.
        late_ms = float(text.split("taken ")[1].split(" ms")[0])
        assert late_ms < 300, text
        main = text.split(f"Thread 0x{threading.main_thread().ident:016x}")[1].split("\n\n")[0]
        assert "in _spin_in_python" in main.splitlines()[1], text
    finally:
        watch.close()


# Threads that run Python code, start and end, while the watch fires every few ms.
# faulthandler.dump_traceback_later (the watch's mechanism before) reads their frames
# without the GIL and segfaulted this script in six of six 3 s runs.
_STRESS = textwrap.dedent("""
    import sys, threading, time
    from daemon.loop_watch import LoopWatch

    stop = False
    def deep(n):
        return sum(i for i in range(50)) if n == 0 else deep(n - 1) + 1
    def churn():
        while not stop:
            deep(30)
    def spawn():
        while not stop:
            ts = [threading.Thread(target=deep, args=(20,)) for _ in range(8)]
            for t in ts: t.start()
            for t in ts: t.join()
    threads = [threading.Thread(target=churn) for _ in range(4)] + [threading.Thread(target=spawn) for _ in range(2)]
    for t in threads: t.start()
    watch = LoopWatch()
    dumps = 0
    end = time.monotonic() + float(sys.argv[1])
    while time.monotonic() < end:
        watch.arm(0.001)
        s = time.monotonic()
        while time.monotonic() - s < 0.004:
            deep(10)
        dumps += watch.read().count("Timeout (")
    stop = True
    for t in threads: t.join()
    watch.close()
    print("dumps", dumps)
""")


def test_the_watch_survives_dumping_beside_busy_and_ending_threads() -> None:
    out = subprocess.run([sys.executable, "-c", _STRESS, "3"], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    dumps = int(out.stdout.split("dumps")[1])
    assert dumps > 5, out.stdout  # it fired all along (as often as the busy threads let it take the GIL)


def _crashing(where: str) -> str:
    return "\n".join(["import faulthandler, sys", where, "def the_crashing_call():",
                      "    faulthandler._sigsegv()", "the_crashing_call()"])


def test_a_native_crash_names_its_place_in_every_process() -> None:
    """lipsyncd, lipsync and the GPU server turn faulthandler on for fatal signals at the
    top of their main(): a segfault leaves every thread's Python stack on stderr."""
    for entry in ("daemon.main", "daemon.cli", "daemon.gpu_server"):
        # main() with its arguments refused stops at the parser: only what comes before
        # it ran, so the crash after it is traced only if main() turned the trace on.
        code = _crashing(f"import {entry}\ntry:\n    {entry}.main(['--no-such-flag'])\nexcept SystemExit:\n    pass")
        out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode != 0
        assert "Segmentation fault" in out.stderr and "in the_crashing_call" in out.stderr, (entry, out.stderr[-1500:])
    # Without it, the same crash leaves no stack.
    out = subprocess.run([sys.executable, "-c", _crashing("pass")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode != 0 and "the_crashing_call" not in out.stderr


def test_closing_the_watch_ends_its_thread_at_once() -> None:
    watch = LoopWatch()
    watch.arm(5.0)  # its thread sleeps toward a deadline 5 s away
    time.sleep(0.05)
    [thread] = [t for t in threading.enumerate() if t.name == "loop-watch" and t.is_alive()]
    watch.close()  # joins for at most 1 s: long before the deadline
    assert not thread.is_alive()
