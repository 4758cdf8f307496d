"""Where a process is when its event loop is held up.

The loop re-arms the watch each turn of a periodic task (``arm``: a deadline, two
attribute writes). A thread of the watch's own sleeps until that deadline; when the loop
has not re-armed by then, it takes every thread's Python stack (``sys._current_frames``,
under the GIL) and appends it to a scratch file, once per arming. When the task then sees
the hold-up, ``take`` reads what was written since the last call and groups it by
thread (``stall_figures``): what the loop was running, and what the other threads were
doing meanwhile. (The GPU server's status task; the loadtest's ``StallDumps`` around its
windows.)

Why not ``faulthandler.dump_traceback_later``: its C thread reads the other threads'
frames without the GIL, while they run. Frames popped or threads ending under it crash
the process (CPython issues 116008, 131580, 140815): three of four loadtest processes
died that way in one GPU run, and a script that re-arms it every 4 ms beside busy
threads and threads that start and end (tests/test_loop_watch.py) segfaulted in six of
six three-second runs. Taking the stacks under the GIL costs one
thing: a loop held up inside a C call that keeps the GIL is seen only once the call
returns (the dump then says how late it was taken); a loop held up in Python code, or
in a call that releases the GIL (I/O, sleeps, CUDA syncs), is seen while it stands there.

The dumps keep faulthandler's text layout (``Timeout (...)!``, ``Thread 0x...``,
``File "...", line N in f``), which ``stall_figures`` reads.
"""

from __future__ import annotations

import re
import sys
import tempfile
import threading
import time
from datetime import timedelta
from pathlib import Path
from types import FrameType
from typing import Any

MAX_FRAMES = 100  # per thread, innermost first (faulthandler's own limit)


class LoopWatch:
    """The dumps go to a scratch file, or to ``path`` where they are to be kept."""

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            self._file: Any = tempfile.TemporaryFile("w+b")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w+b")
        self._read = 0
        self._lock = threading.Lock()  # the file: written by the watch's thread, read by take()
        # Set by arm() (any thread; plain attribute writes under the GIL): the deadline
        # and which arming it belongs to.
        self._deadline: float | None = None
        self._timeout_s = 0.0
        self._armed = 0
        self._fired = 0  # the last arming a dump was taken for
        self._idle = False  # the thread waits for an arming (nothing pending)
        self._wake = threading.Event()
        self._stop = threading.Event()  # close(): ends the thread's sleeps at once
        self._closed = False
        self._thread: threading.Thread | None = None

    def arm(self, timeout_s: float) -> None:
        """From the loop: dump every thread's stack unless re-armed within ``timeout_s``."""
        self._timeout_s = timeout_s
        self._deadline = time.monotonic() + timeout_s
        self._armed += 1
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="loop-watch", daemon=True)
            self._thread.start()
        elif self._idle:
            self._wake.set()

    def _run(self) -> None:
        while not self._closed:
            armed, deadline = self._armed, self._deadline
            if deadline is None or armed == self._fired:
                self._idle = True
                if self._armed == armed and not self._closed:  # not re-armed since the read
                    self._wake.wait()
                self._wake.clear()
                self._idle = False
                continue
            delay = deadline - time.monotonic()
            if delay > 0:
                # Sleeps to the deadline read; an arming meanwhile moved it later, so the
                # next pass sleeps again (the loop re-arms every turn: no need to wake).
                self._stop.wait(delay)
                continue
            if self._armed != armed:
                continue  # re-armed after the read: the loop came back
            frames = sys._current_frames()
            self._fired = armed
            text = _dump(frames, self._timeout_s, time.monotonic() - deadline, threading.get_ident())
            with self._lock:
                if not self._closed:
                    self._file.seek(0, 2)
                    self._file.write(text.encode())
                    self._file.flush()

    def read(self) -> str:
        """What was dumped since the last call."""
        with self._lock:
            self._file.seek(self._read)
            text = self._file.read().decode(errors="replace")
            self._read = self._file.tell()
        return text

    def take(self, depth: int = 4) -> list[dict[str, Any]]:
        """The stacks dumped since the last call (by thread, innermost ``depth`` frames,
        most dumps first); empty when none was."""
        text = self.read()
        return stall_figures(text, thread_names(), 0.0, depth=depth)["stacks"] if text else []

    def close(self) -> None:
        """Stops the watch's thread and closes the file."""
        self._closed = True
        self._stop.set()
        self._wake.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=1.0)
        with self._lock:
            self._file.close()


def _dump(frames: dict[int, FrameType], timeout_s: float, late_s: float, own: int) -> str:
    """Every thread's stack but the watch's own, in faulthandler's layout; the header
    says how late after the deadline it was taken (late: a call that kept the GIL)."""
    lines = [f"Timeout ({timedelta(seconds=timeout_s)})! taken {late_s * 1000:.1f} ms after the deadline"]
    for ident, frame in frames.items():
        if ident == own:
            continue
        lines.append(f"Thread 0x{ident:016x} (most recent call first):")
        f: FrameType | None = frame
        for _ in range(MAX_FRAMES):
            if f is None:
                break
            lines.append(f'  File "{f.f_code.co_filename}", line {f.f_lineno} in {f.f_code.co_name}')
            f = f.f_back
        lines.append("")
    return "\n".join(lines) + "\n"


def thread_names() -> dict[str, str]:
    """The dumps' thread ids (as written) -> the threads' names."""
    return {f"0x{t.ident:016x}": t.name for t in threading.enumerate() if t.ident is not None}


def stall_figures(text: str, names: dict[str, str], threshold_s: float, depth: int = 4) -> dict[str, Any]:
    """The dumps grouped: for each thread, its innermost ``depth`` frames (the import
    machinery's skipped) and in how many dumps it stood there, the most common first."""
    dumps = [d for d in text.split("Timeout (")[1:]]
    counts: dict[tuple[str, str], int] = {}
    late_ms = [float(m) for m in re.findall(r"taken ([0-9.]+) ms after the deadline", text)]
    for dump in dumps:
        for block in dump.split("\nThread ")[1:]:
            lines = block.strip().splitlines()
            ident = lines[0].split()[0]
            # The import machinery's own frames say only that an import runs: which one
            # is in the frames below them.
            frames = [ln.strip().removeprefix("File ").replace('"', "") for ln in lines[1:]
                      if ln.strip().startswith("File ") and "<frozen importlib" not in ln][:depth]
            key = (names.get(ident, ident), " <- ".join(frames))
            counts[key] = counts.get(key, 0) + 1
    stacks = sorted(counts.items(), key=lambda kv: -kv[1])
    return {"dumps": len(dumps), "threshold_ms": round(threshold_s * 1000, 1),
            # How long after the deadline the latest-taken dump was: long where the loop
            # stood in a call that kept the GIL (its stack is then from after the call).
            "taken_late_ms_max": round(max(late_ms), 1) if late_ms else None,
            "stacks": [{"thread": t, "frames": f, "dumps": n} for (t, f), n in stacks[:24]]}
