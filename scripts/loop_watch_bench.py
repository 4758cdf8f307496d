"""The cost of re-arming a loop watch, per arm: faulthandler's timed dump (the watch's
mechanism before 3adc8be) against ``daemon.loop_watch.LoopWatch``, beside N busy Python
threads (the edge's SDK callbacks and pools, the GPU server's worker).

    python scripts/loop_watch_bench.py [BUSY_THREADS ...]    (default: 0 2)
"""

from __future__ import annotations

import faulthandler
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from daemon.loop_watch import LoopWatch  # noqa: E402


def _per_arm_us(arm, n: int = 300) -> tuple[float, float]:
    total = worst = 0.0
    for _ in range(n):
        t = time.perf_counter()
        arm()
        d = time.perf_counter() - t
        total, worst = total + d, max(worst, d)
        time.sleep(0.002)  # the loop's turn
    return total / n * 1e6, worst * 1e6


def main(busy_counts: list[int]) -> None:
    for n_busy in busy_counts:
        stop = threading.Event()

        def busy() -> None:
            while not stop.is_set():
                sum(range(1000))

        threads = [threading.Thread(target=busy, daemon=True) for _ in range(n_busy)]
        for t in threads:
            t.start()
        with tempfile.TemporaryFile("w+b") as f:
            fh = _per_arm_us(lambda: faulthandler.dump_traceback_later(0.06, file=f))
            faulthandler.cancel_dump_traceback_later()
        watch = LoopWatch()
        ours = _per_arm_us(lambda: watch.arm(0.06))
        watch.close()
        stop.set()
        for t in threads:
            t.join()
        print(f"busy threads {n_busy}: faulthandler.dump_traceback_later {fh[0]:.1f} us mean, {fh[1]:.1f} max; "
              f"LoopWatch.arm {ours[0]:.1f} us mean, {ours[1]:.1f} max")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [0, 2])
