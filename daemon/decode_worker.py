"""Idle videos are decoded in child processes, never in the daemon's own.

A video comes from a URL someone else controls, and FFmpeg's demuxers and decoders are
large C code: a hostile or merely huge file must not crash the daemon, take its memory
or hold its decoding slot forever. Each decode runs ``python -m daemon.decode_worker``
with an address-space limit (``RLIMIT_AS``) and is killed past its time limit; at most
``workers`` run at once, so one slow file does not hold up other starts.

The child runs :func:`musetalk.video.decode_frames` with the limits it is sent (JSON on
stdin), writes the frames to an ``.npy`` file the parent names (frames are large: they
do not travel through a pipe) and answers one JSON line on stdout. Its stderr (FFmpeg's
log) is read and dropped: nothing the file makes FFmpeg print reaches an error message.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
from dataclasses import asdict
from fractions import Fraction
from pathlib import Path
from typing import Any

_PACKAGE_ROOT = str(Path(__file__).resolve().parent.parent)


class DecodePool:
    """Runs decodes in child processes, ``workers`` at a time, each within
    ``timeout_s`` seconds and ``memory_mb`` MB of address space."""

    def __init__(self, work_dir: Path, workers: int = 2, timeout_s: float = 60.0,
                 memory_mb: int = 4096) -> None:
        self.work_dir = Path(work_dir)
        self.timeout_s = timeout_s
        self.memory_mb = memory_mb
        self._slots = asyncio.Semaphore(workers)
        self.running = 0  # child processes alive now (for stats and tests)

    async def decode(self, path: Path, limits: Any, label: str) -> Any:
        """``musetalk.video.decode_frames(path, limits, label)``, in a child process.

        Raises ``musetalk.video.VideoError`` with a message that names the video and
        what to change (the file, or the fetch.decode_* setting that stopped it).
        """
        from musetalk.video import Video, VideoError

        async with self._slots:
            self.work_dir.mkdir(parents=True, exist_ok=True)
            fd, out_name = tempfile.mkstemp(dir=self.work_dir, prefix=".decode-", suffix=".npy")
            os.close(fd)
            out = Path(out_name)
            try:
                answer = await self._run_child(path, limits, label, out)
                if not answer.get("ok"):
                    raise VideoError(str(answer.get("error") or f"{label}: decoding failed"))
                import numpy as np

                frames = await asyncio.to_thread(np.load, out, allow_pickle=False)
                num, den = answer["rate"]
                return Video(frames=frames, rate=Fraction(int(num), int(den)))
            finally:
                out.unlink(missing_ok=True)

    async def _run_child(self, path: Path, limits: Any, label: str, out: Path) -> dict[str, Any]:
        from musetalk.video import VideoError

        request = {
            "path": str(path), "out": str(out), "label": label,
            "memory_mb": self.memory_mb, "limits": _limits_to_json(limits),
        }
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_PACKAGE_ROOT, env.get("PYTHONPATH")]))
        # One thread: a decode must not take every core from the live sessions.
        env.update(OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.decode_worker",
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL, env=env,
        )
        self.running += 1
        try:
            try:
                async with asyncio.timeout(self.timeout_s):
                    stdout, _ = await proc.communicate(json.dumps(request).encode())
            except TimeoutError:
                raise VideoError(
                    f"{label}: decoding took longer than fetch.decode_timeout_s = "
                    f"{self.timeout_s:g} s and was stopped; use a shorter or smaller video, "
                    "or raise fetch.decode_timeout_s"
                ) from None
        finally:
            if proc.returncode is None:
                proc.kill()
                await asyncio.shield(proc.wait())
            self.running -= 1
        try:
            answer = json.loads(stdout.decode().strip().splitlines()[-1])
        except (ValueError, IndexError, UnicodeDecodeError):
            answer = None
        if not isinstance(answer, dict):
            how = (f"was killed by signal {-proc.returncode}" if proc.returncode < 0
                   else f"exited with status {proc.returncode}")
            raise VideoError(
                f"{label}: the decoder process {how} without a result; if the video is "
                f"large, raise fetch.decode_memory_mb (now {self.memory_mb} MB)"
            )
        return answer


def _limits_to_json(limits: Any) -> dict[str, Any]:
    data = asdict(limits)
    data["names"] = dict(limits.names)
    for key in ("formats", "codecs"):
        if data[key] is not None:
            data[key] = sorted(data[key])
    return data


def _limits_from_json(data: dict[str, Any]) -> Any:
    from musetalk.video import VideoLimits

    for key in ("formats", "codecs"):
        if data.get(key) is not None:
            data[key] = frozenset(data[key])
    return VideoLimits(**data)


# --------------------------------------------------------------------------- child


def _child_main() -> int:
    request = json.loads(sys.stdin.read())
    memory = int(request["memory_mb"]) << 20
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    label = request["label"]
    try:
        import numpy as np

        from musetalk.video import VideoError, decode_frames

        try:
            video = decode_frames(request["path"], _limits_from_json(request["limits"]), label)
        except VideoError as exc:
            return _answer({"ok": False, "error": str(exc)})
        np.save(request["out"], video.frames, allow_pickle=False)
    except MemoryError:
        return _answer({
            "ok": False,
            "error": f"{label}: decoding needs more than fetch.decode_memory_mb = "
                     f"{request['memory_mb']} MB; use a shorter or smaller video, or raise "
                     "fetch.decode_memory_mb",
        })
    return _answer({"ok": True, "rate": [video.rate.numerator, video.rate.denominator]})


def _answer(answer: dict[str, Any]) -> int:
    sys.stdout.write(json.dumps(answer) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(_child_main())
