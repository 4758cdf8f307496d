"""Where a process is when its event loop is held up.

The loop re-arms ``faulthandler.dump_traceback_later`` each turn of a periodic task;
when it does not come back within the timeout, faulthandler's own C thread (it needs
no GIL) writes every thread's Python stack to a scratch file. When the task then sees
the hold-up, ``take`` reads what was written since the last call and groups it by
thread (``stall_figures``): what the loop was running, and what the other threads
were doing meanwhile. faulthandler has one timer per process: one watch at a time (the
GPU server's status task; the loadtest's ``StallDumps`` around its windows).
"""

from __future__ import annotations

import faulthandler
import tempfile
import threading
from pathlib import Path
from typing import Any


class LoopWatch:
    """The dumps go to a scratch file, or to ``path`` where they are to be kept."""

    def __init__(self, path: Path | None = None) -> None:
        if path is None:
            self._file: Any = tempfile.TemporaryFile("w+b")
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("w+b")
        self._read = 0

    def arm(self, timeout_s: float) -> None:
        """From the loop: dump every thread's stack unless re-armed within ``timeout_s``."""
        faulthandler.dump_traceback_later(timeout_s, file=self._file)

    def read(self) -> str:
        """What was dumped since the last call."""
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
        faulthandler.cancel_dump_traceback_later()
        self._file.close()


def thread_names() -> dict[str, str]:
    """faulthandler's thread ids (as it writes them) -> the threads' names."""
    return {f"0x{t.ident:016x}": t.name for t in threading.enumerate() if t.ident is not None}


def stall_figures(text: str, names: dict[str, str], threshold_s: float, depth: int = 4) -> dict[str, Any]:
    """faulthandler's dumps grouped: for each thread, its innermost ``depth`` frames (the
    import machinery's skipped) and in how many dumps it stood there, the most common
    first."""
    dumps = [d for d in text.split("Timeout (")[1:]]
    counts: dict[tuple[str, str], int] = {}
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
            "stacks": [{"thread": t, "frames": f, "dumps": n} for (t, f), n in stacks[:24]]}
