"""`lipsync loadtest`: how many sessions one daemon serves on this machine, measured as a
user would see them (docs: /work/shared/CAPACITY.md, "Measuring what a user sees").

The daemon runs in this process on an embedded NATS server and publishes through the
real LiveKit sources without a room (output.sink "livekit-local"; ``--sink none`` drops
frames instead). The producers do not run here: each session's speech comes from a
process of its own (``daemon.loadproducer``) that streams real speech (the sample WAV,
looped) at real time and stamps every chunk with its send time (``Lipsync-Sent``).
Sessions take four avatars made from the demo video (mirrored, colour-shifted,
time-reversed, scaled and moved), round-robin. Each round of N sessions speaks for
``warmup_s + seconds``; the first ``warmup_s`` are left out of every figure.

Per session, from the daemon's record of every published frame
(``session.speech.frame_records``, ``daemon.speech.FrameRecord``): frames that needed
generation, those generated in time, fallbacks, underruns, latency of generated frames
(publication of a chunk's first sample, its frame's plus its place in that frame's audio,
minus the chunk's send time) and the interval jitter of the frames captured by the
LiveKit video source. Per round: event-loop lag (a 5 ms sleeper on the daemon's loop), GPU busy fraction (NVML), mean
batch and step time (the GPU worker's counters) and peak GPU memory.

The SLO: every session gets >= ``slo_generated_pct`` % of its needed frames generated
in time, with p95 generated-frame latency <= ``slo_latency_ms``. ``--find-capacity``
raises N (``--start``, ``--start + --step``, ... up to ``--max-sessions``, or the
``--sessions`` list in order) until a round fails it; the capacity is the last N that
met it. Speed does not depend on weight values: on a GPU use ``model.random_weights``
with size "full".
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from daemon.config import ASSETS_DIR, Settings
from daemon.errors import LipsyncError
from daemon.inprocess import SAMPLE_WAV, in_process_settings
from daemon.loop_watch import LoopWatch, stall_figures, thread_names

# Producers start within this many seconds of each other (each its own random offset).
START_JITTER_S = 1.0
# How long after the measured window the producers keep speaking, so that the last
# measured frames still have their audio.
TAIL_S = 1.0
# Bumped when the avatar recipe changes, so that stale generated avatars are not reused.
AVATAR_VERSION = 1


class LoadtestError(Exception):
    """A round could not run as asked; the message says what to change."""


@dataclass(frozen=True)
class Slo:
    generated_pct: float = 99.0
    latency_p95_ms: float = 180.0


@dataclass(frozen=True)
class LoadtestOptions:
    sessions: tuple[int, ...] | None = None  # None: (1, 4, 8), or start/step with find_capacity
    find_capacity: bool = False
    start: int = 1
    step: int = 4
    max_sessions: int = 64
    seconds: float = 60.0
    warmup_s: float = 5.0
    chunk_ms: int = 40
    fps: int | None = None  # None: video.fps on CUDA, 10 on the CPU
    sink: str = "livekit-local"
    rate: int = 16000
    wav: Path | None = None
    voiced_only: bool = False  # the speech without its silent frames: every frame needs the model
    slo: Slo = Slo()
    json_path: Path | None = None
    # `lipsync bench --reference-flow --json FILE`'s report: each row's frames generated
    # and shown in time, as a multiple of its frames/s (the >= 4x target, same card).
    reference_flow: Path | None = None
    stall_dump_ms: float = 0.0  # > 0: dump every thread's stack when the loop stalls this long

    def validate(self) -> None:
        problems = []
        if self.sessions is not None and (not self.sessions or min(self.sessions) < 1):
            problems.append("--sessions must be comma-separated positive integers, like 1,4,8")
        if self.start < 1 or self.step < 1 or self.max_sessions < self.start:
            problems.append("--start and --step must be >= 1 and --max-sessions >= --start")
        if self.seconds <= 0 or self.warmup_s < 0:
            problems.append("--seconds must be > 0 and --warmup-s >= 0")
        if not 10 <= self.chunk_ms <= 200:
            problems.append(f"--chunk-ms {self.chunk_ms} must be 10..200 (a TTS sends 20-40 ms chunks)")
        if self.fps is not None and not 1 <= self.fps <= 60:
            problems.append(f"--fps {self.fps} must be 1..60")
        if self.sink not in ("livekit-local", "none"):
            problems.append(f"--sink {self.sink!r} must be livekit-local or none")
        if not 8000 <= self.rate <= 48000:
            problems.append(f"--rate {self.rate} must be 8000..48000 Hz")
        if not 0 < self.slo.generated_pct <= 100 or self.slo.latency_p95_ms <= 0:
            problems.append("--slo-generated-pct must be in (0, 100] and --slo-latency-ms > 0")
        if self.stall_dump_ms and not 20 <= self.stall_dump_ms <= 5000:
            problems.append(f"--stall-dump-ms {self.stall_dump_ms} must be 20..5000 (or 0: off)")
        if self.wav is not None and not self.wav.is_file():
            problems.append(f"--wav {self.wav} is not a file")
        if problems:
            raise LoadtestError("; ".join(problems))

    def ladder(self) -> list[int]:
        """Session counts in the order they run."""
        if self.sessions is not None:
            return list(self.sessions)
        if not self.find_capacity:
            return [1, 4, 8]
        return list(range(self.start, self.max_sessions + 1, self.step))


# --------------------------------------------------------------------------- avatars

# iBUG 68-point landmarks under a horizontal mirror: point i of the mirrored face is
# point MIRROR_68[i] of the original (left and right swap; the midline stays).
MIRROR_68 = np.array(
    list(range(16, -1, -1))  # jaw
    + list(range(26, 21, -1)) + list(range(21, 16, -1))  # brows
    + [27, 28, 29, 30] + [35, 34, 33, 32, 31]  # nose
    + [45, 44, 43, 42, 47, 46] + [39, 38, 37, 36, 41, 40]  # eyes
    + [54, 53, 52, 51, 50, 49, 48, 59, 58, 57, 56, 55]  # outer lips
    + [64, 63, 62, 61, 60, 67, 66, 65]  # inner lips
)


def _mirror(frames: np.ndarray, lms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    w = frames.shape[2]
    out = lms[:, MIRROR_68].copy()
    out[..., 0] = (w - 1) - out[..., 0]
    return np.ascontiguousarray(frames[:, :, ::-1]), out


def _warm(frames: np.ndarray, lms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    shifted = frames.astype(np.float32) * np.array([1.12, 1.0, 0.8], np.float32) + np.array([10, 0, -8], np.float32)
    return np.clip(shifted, 0, 255).astype(np.uint8), lms.copy()


def _reversed(frames: np.ndarray, lms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return np.ascontiguousarray(frames[::-1]), lms[::-1].copy()


def _inset(frames: np.ndarray, lms: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scaled to 80 % about the centre and moved right/down, edges repeated."""
    import cv2

    h, w = frames.shape[1:3]
    s, tx, ty = 0.8, 0.06 * w, 0.04 * h
    m = np.array([[s, 0, (1 - s) * (w - 1) / 2 + tx], [0, s, (1 - s) * (h - 1) / 2 + ty]], np.float32)
    out = np.stack([cv2.warpAffine(f, m, (w, h), flags=cv2.INTER_AREA, borderMode=cv2.BORDER_REPLICATE)
                    for f in frames])
    moved = lms @ m[:, :2].T + m[:, 2]
    return out, moved.astype(np.float32)


AVATAR_RECIPES = {
    "lt-mirror": ("the demo video mirrored left-right", _mirror),
    "lt-warm": ("the demo video colour-shifted warmer", _warm),
    "lt-reversed": ("the demo video played backwards", _reversed),
    "lt-inset": ("the demo video scaled to 80 % and moved right/down", _inset),
}


def make_avatars(state_dir: Path) -> dict[str, Path]:
    """Writes the load-test avatars once into ``state_dir`` (reused when present): each an
    MP4 at the demo video's size (512x512) and frame rate with its landmarks beside it
    as ``<video>.landmarks.npy``, transformed with the same geometry as the pictures.
    Returns avatar id -> video path."""
    folder = Path(state_dir) / f"loadtest-avatars-v{AVATAR_VERSION}"
    paths = {name: folder / f"{name}.mp4" for name in AVATAR_RECIPES}
    if all(p.is_file() and Path(f"{p}.landmarks.npy").is_file() for p in paths.values()):
        return paths
    folder.mkdir(parents=True, exist_ok=True)
    frames, fps = _decode(ASSETS_DIR / "demo.mp4")
    landmarks = np.load(ASSETS_DIR / "demo.mp4.landmarks.npy")
    if len(landmarks) != len(frames):
        raise LoadtestError(f"daemon/assets/demo.mp4 has {len(frames)} frames but its landmarks "
                            f"{len(landmarks)}: regenerate them together (python -m daemon.demo_avatar)")
    for name, (_, recipe) in AVATAR_RECIPES.items():
        video, lms = recipe(frames, landmarks)
        tmp = paths[name].with_suffix(".tmp.mp4")
        _encode(tmp, video, fps)
        np.save(f"{paths[name]}.landmarks.npy", lms.astype(np.float32))
        tmp.replace(paths[name])  # the video last: a present video means a complete pair
    return paths


def _decode(path: Path) -> tuple[np.ndarray, int]:
    import av

    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        fps = int(round(float(stream.average_rate or 25)))
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
    return frames, fps


def _encode(path: Path, frames: np.ndarray, fps: int) -> None:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


# --------------------------------------------------------------------------- figures


def percentile_ms(values: Sequence[float], q: float) -> float | None:
    """Nearest-rank percentile of seconds, in ms (None when there are no values)."""
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 1)


def session_figures(session_id: str, records: Iterable[Any], capture_times: Sequence[float] | None,
                    wall_window: tuple[float, float], mono_window: tuple[float, float],
                    fps: int) -> dict[str, Any]:
    """One session's row of the report, from its FrameRecords (published_wall inside
    ``wall_window``) and its video capture times (monotonic, inside ``mono_window``)."""
    t0, t1 = wall_window
    inside = [r for r in records if t0 <= r.published_wall < t1]
    needed = sum(1 for r in inside if r.needed)
    generated = sum(1 for r in inside if r.needed and r.generated)
    latencies = [r.latency_s for r in inside if r.generated and r.latency_s is not None]
    jitter = None
    if capture_times is not None:
        m0, m1 = mono_window
        times = np.array([t for t in capture_times if m0 <= t < m1])
        if len(times) >= 2:
            deviation = np.abs(np.diff(times) - 1.0 / fps)
            jitter = percentile_ms(deviation.tolist(), 0.99)
    return {
        "session_id": session_id,
        "needed": needed,
        "generated": generated,
        "generated_pct": round(100 * generated / needed, 2) if needed else None,
        "fallbacks": sum(1 for r in inside if r.kind == "fallback"),
        "underruns": sum(1 for r in inside if r.kind == "underrun"),
        "latency_ms": {"p50": percentile_ms(latencies, 0.5), "p95": percentile_ms(latencies, 0.95),
                       "p99": percentile_ms(latencies, 0.99)},
        "jitter_ms_p99": jitter,
    }


def late_figures(late_results: Iterable[tuple[float, float]], wall_window: tuple[float, float]) -> dict[str, Any]:
    """Frames generated after their tick had gone out as a fallback, inside the window
    (``late_results``: wall time each came, seconds after its tick): how many, and how
    late (ms): a few ms says delivery, a step's length says the GPU's queue."""
    t0, t1 = wall_window
    late = [after for wall, after in late_results if t0 <= wall < t1]
    return {"count": len(late), "p50_ms": percentile_ms(late, 0.5), "p95_ms": percentile_ms(late, 0.95),
            "max_ms": round(max(late) * 1000, 1) if late else None}


def start_figures(start: tuple[float, float, bool], first_capture: float | None,
                  timings_ms: dict[str, float] | None = None) -> dict[str, Any]:
    """How long a session took to start: the request's reply and its first published
    frame (None when unknown), both from the request's send time (monotonic seconds), in
    ms, with the daemon's own timings of the start."""
    sent, replied, cached = start
    first = None if first_capture is None else round(1000 * (first_capture - sent), 1)
    return {"avatar_cached": cached, "reply_ms": round(1000 * (replied - sent), 1), "to_first_frame_ms": first,
            "timings_ms": timings_ms}


def fallbacks_by_budget(per_session: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Whether the sessions placed with a smaller processing budget lost more frames:
    the rank correlation (Spearman's, ties ranked by their mean) of each session's
    placement budget with its fallbacks, and the budgets' range (ms). The budget is made
    of medians of recent steps and rounds, so it moves with the moment a session's
    speech is placed. None when fewer than three sessions have a budget, or when the
    budgets or the fallbacks are all the same (a fixed budget, no loss)."""
    pairs = [((s.get("placement") or {}).get("budget_ms"), s["fallbacks"]) for s in per_session]
    pairs = [(b, f) for b, f in pairs if b is not None]
    budgets, fallbacks = [b for b, _ in pairs], [f for _, f in pairs]
    if len(pairs) < 3 or len(set(budgets)) < 2 or len(set(fallbacks)) < 2:
        return None

    def ranks(values: list[float]) -> np.ndarray:
        """0-based ranks, equal values sharing the mean of the ranks they span."""
        _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
        first = np.cumsum(counts) - counts
        return (first + (counts - 1) / 2)[inverse]

    rho = float(np.corrcoef(ranks(budgets), ranks(fallbacks))[0, 1])
    return {"budget_ms": [min(budgets), max(budgets)], "rank_correlation": round(rho, 2)}


def budget_line(split: dict[str, Any]) -> str:
    """``fallbacks_by_budget`` as the report prints it."""
    low, high = split["budget_ms"]
    return (f"fallbacks against the placement budget ({low}-{high} ms): rank correlation "
            f"{split['rank_correlation']} (below 0: the sessions placed with less budget lost more)")


def slo_met(per_session: list[dict[str, Any]], slo: Slo) -> bool:
    """Every session: some frames needed generation, enough of them generated in time,
    p95 latency of the generated ones within the bound."""
    return bool(per_session) and all(
        s["generated_pct"] is not None and s["generated_pct"] >= slo.generated_pct
        and s["latency_ms"]["p95"] is not None and s["latency_ms"]["p95"] <= slo.latency_p95_ms
        for s in per_session
    )


# --------------------------------------------------------------------------- probes


class GcPauses:
    """Python's garbage collections in the daemon's process (``gc.callbacks``): each
    holds the GIL, stopping the event loop and the generation worker alike, so a long
    one shows as late ticks and clock restarts in every session at once. Records only
    between ``record()`` and ``take()``: (generation, seconds, monotonic end) of each
    collection."""

    def __init__(self) -> None:
        self._samples: list[tuple[int, float, float]] | None = None
        self._began = 0.0

    def _callback(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._began = time.perf_counter()
        elif self._samples is not None:
            self._samples.append((int(info.get("generation", 0)), time.perf_counter() - self._began,
                                  time.monotonic()))

    def start(self) -> None:
        gc.callbacks.append(self._callback)

    def stop(self) -> None:
        if self._callback in gc.callbacks:
            gc.callbacks.remove(self._callback)

    def record(self) -> None:
        self._samples = []

    def take(self) -> list[tuple[int, float, float]]:
        samples, self._samples = self._samples or [], None
        return samples


def gc_heap() -> dict[str, int]:
    """The objects a full collection walks now (``walked``: those the collector tracks in
    its three generations) and those ``gc.freeze`` put out of its reach at start-up
    (``frozen``): a long full collection is many walked objects. Counted outside the
    measured window (listing them holds the GIL)."""
    return {"walked": len(gc.get_objects()), "frozen": gc.get_freeze_count()}


def gc_figures(pauses: list[tuple[int, float, float]], since: float = 0.0,
               heap: dict[str, int] | None = None) -> dict[str, Any]:
    """A row's garbage collections: how many, the longest, and those over 20 ms (each as
    [seconds into the window, generation, ms]); with ``heap`` (``gc_heap`` at the window's
    end), the objects a full collection then walked."""
    return {**({"heap": heap} if heap is not None else {}), "collections": len(pauses),
            "max_ms": round(1000 * max((p[1] for p in pauses), default=0.0), 2),
            "over_20ms": sum(1 for p in pauses if p[1] > 0.020),
            "long": [[round(p[2] - since, 2), p[0], round(1000 * p[1], 1)] for p in pauses if p[1] > 0.020][:50]}


def stall_events(restarts: dict[str, list[tuple[float, float]]], since: float,
                 gap_s: float = 0.1) -> list[dict[str, Any]]:
    """The sessions' clock restarts grouped into events (restarts less than ``gap_s``
    apart are one stall): when (seconds into the window), how many sessions, the
    longest ``behind``. One event hitting every session is a process-wide stall."""
    flat = sorted((t, b, sid) for sid, rs in restarts.items() for t, b in rs)
    events: list[dict[str, Any]] = []
    last = -1e9
    for t, behind, sid in flat:
        if t - last > gap_s:
            events.append({"t_s": round(t - since, 2), "sessions": set(), "behind_ms_max": 0.0})
        last = t
        events[-1]["sessions"].add(sid)
        events[-1]["behind_ms_max"] = max(events[-1]["behind_ms_max"], round(1000 * behind, 1))
    for e in events:
        e["sessions"] = len(e["sessions"])
    return events


class LoopLagProbe:
    """A task on the daemon's loop that sleeps 5 ms at a time and records how late it
    wakes: the delay that every frame tick, NATS callback and capture on the loop sees.
    Records only between ``record()`` and ``take()``."""

    def __init__(self, interval_s: float = 0.005) -> None:
        self.interval_s = interval_s
        self._samples: list[float] | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loadtest-loop-lag")

    async def _run(self) -> None:
        while True:
            t = time.monotonic()
            await asyncio.sleep(self.interval_s)
            if self._samples is not None:
                self._samples.append(max(0.0, time.monotonic() - t - self.interval_s))

    def record(self) -> None:
        self._samples = []

    def take(self) -> list[float]:
        samples, self._samples = self._samples or [], None
        return samples

    async def aclose(self) -> None:
        await _cancelled(self._task)


async def _cancelled(task: asyncio.Task[Any] | None) -> None:
    """Cancel a probe's task and wait until it has ended."""
    if task is not None:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass


class StallDumps:
    """Where the process is when the event loop stalls. A task on the loop re-arms a
    ``LoopWatch`` every ``interval_s``; when the loop does not come back within
    ``threshold_s``, the watch's thread writes every thread's Python stack to a file.
    ``take()`` groups the dumps by thread and innermost frames: what the loop was doing,
    and what the other threads (the generation worker, the SDK's callbacks) were doing
    meanwhile. Records only between ``record()`` and ``take()``."""

    def __init__(self, path: Path, threshold_s: float = 0.06, interval_s: float = 0.01) -> None:
        self.path, self.threshold_s, self.interval_s = path, threshold_s, interval_s
        self._watch: LoopWatch | None = None
        self._task: asyncio.Task[None] | None = None

    def record(self) -> None:
        self._watch = LoopWatch(self.path)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="loadtest-stall-dumps")

    async def _run(self) -> None:
        assert self._watch is not None
        while True:
            self._watch.arm(self.threshold_s)
            await asyncio.sleep(self.interval_s)

    async def take(self) -> dict[str, Any]:
        await _cancelled(self._task)
        self._task = None
        if self._watch is None:
            return stall_figures("", {}, self.threshold_s)
        text = self._watch.read()
        self._watch.close()
        self._watch = None
        return stall_figures(text, thread_names(), self.threshold_s)


def cpu_snapshot(groups: dict[str, list[int]], names: dict[int, str] | None = None) -> dict[str, Any] | None:
    """The machine's CPU time so far (/proc/stat, clock ticks: all, idle, steal) and each
    group's processes' CPU seconds (user + system, every thread; a process that has gone
    counts nothing). None where there is no /proc. ``names``: other processes' Python
    threads (native id -> name)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    ticks += [0] * (8 - len(ticks))
    # Thread by thread for the edge and the GPU server: this process's Python threads by
    # their names, others by the kernel's (a native library's, or the process's own).
    own = {t.native_id: t.name for t in threading.enumerate() if t.native_id is not None}
    threads = {name: thread_cpu_s(pids[0], own if pids[0] == os.getpid() else names or {})
               for name, pids in groups.items() if name in ("edge", "gpu_server") and pids}
    return {"t": time.monotonic(), "all": sum(ticks), "idle": ticks[3] + ticks[4], "steal": ticks[7],
            "groups": {name: sum(_process_cpu_s(pid) for pid in pids) for name, pids in groups.items()},
            "threads": threads}


def thread_cpu_s(pid: int, names: dict[int, str]) -> dict[str, float]:
    """CPU seconds of a process's threads so far, summed by name: ``names`` (native thread
    id -> name) where given, else the kernel's name for the thread."""
    out: dict[str, float] = {}
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        stat = _proc_stat(f"/proc/{pid}/task/{tid}/stat")
        if stat is not None:  # else ended meanwhile
            comm, fields = stat
            name = names.get(int(tid)) or comm
            out[name] = out.get(name, 0.0) + _cpu_s(fields)
    return out


def _process_cpu_s(pid: int) -> float:
    stat = _proc_stat(f"/proc/{pid}/stat")
    return _cpu_s(stat[1]) if stat is not None else 0.0


def child_pids(pid: int) -> list[int]:
    """The processes whose parent is ``pid`` (a GPU server's compile workers)."""
    entries = os.listdir("/proc") if os.path.isdir("/proc") else []
    return [int(e) for e in entries if e.isdigit()
            and (stat := _proc_stat(f"/proc/{e}/stat")) is not None and stat[1][1] == str(pid)]


def _proc_stat(path: str) -> tuple[str, list[str]] | None:
    """A /proc stat line: the name (between the parentheses, which it may contain) and the
    fields after it (state, ppid, ...); None where it is gone."""
    try:
        with open(path) as f:
            head, tail = f.read().rsplit(")", 1)
    except (OSError, ValueError):
        return None
    return head.split("(", 1)[1], tail.split()


def _cpu_s(fields: list[str]) -> float:
    """utime + stime of a stat line's fields (after the name), in seconds."""
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_figures(a: dict[str, Any] | None, b: dict[str, Any] | None) -> dict[str, Any] | None:
    """Between two snapshots: the share of the machine's cores busy and stolen (a VM's
    neighbours), and the cores each group used on average."""
    if a is None or b is None or b["all"] <= a["all"]:
        return None
    span = b["t"] - a["t"]
    all_ticks = b["all"] - a["all"]
    return {"cores": os.cpu_count(), "busy": round(1 - (b["idle"] - a["idle"]) / all_ticks, 3),
            "steal": round((b["steal"] - a["steal"]) / all_ticks, 3),
            "cores_used": {name: round(max(0.0, b["groups"].get(name, 0.0) - v) / span, 2)
                           for name, v in a["groups"].items()},
            # The busiest threads (by name) of the edge and the GPU server, cores used.
            "threads": {group: _top_threads(a["threads"].get(group, {}), per, span)
                        for group, per in b.get("threads", {}).items()}}


def _top_threads(a: dict[str, float], b: dict[str, float], span: float, n: int = 8) -> dict[str, float]:
    used = {name: round(max(0.0, v - a.get(name, 0.0)) / span, 2) for name, v in b.items()}
    return dict(sorted(((k, v) for k, v in used.items() if v >= 0.01), key=lambda kv: -kv[1])[:n])


class GpuBusySampler:
    """NVML utilisation of the daemon's GPU every 100 ms on a thread (the share of time a
    kernel ran); ``available`` is False without NVML (no nvidia-ml-py, no driver)."""

    def __init__(self, torch_device: Any, period_s: float = 0.1) -> None:
        self.period_s = period_s
        self._handle: Any = None
        self._nvml: Any = None
        self._samples: list[float] | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if torch_device is None or getattr(torch_device, "type", "") != "cuda":
            return
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = _nvml_handle(pynvml, torch_device)
        except Exception:  # no NVML library or driver: GPU busy is reported as None
            self._handle = None

    @property
    def available(self) -> bool:
        return self._handle is not None

    def start(self) -> None:
        if self.available:
            self._thread = threading.Thread(target=self._run, name="loadtest-nvml", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            if self._samples is not None:
                try:
                    self._samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu / 100)
                except Exception:  # a failed read is a missing sample, not a failed run
                    pass

    def record(self) -> None:
        self._samples = []

    def take(self) -> float | None:
        samples, self._samples = self._samples, None
        if not self.available or not samples:
            return None
        return round(float(np.mean(samples)), 3)

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self._nvml is not None:
            try:
                self._nvml.nvmlShutdown()
            except Exception:  # shutting down anyway
                pass


def _nvml_handle(pynvml: Any, torch_device: Any) -> Any:
    """The NVML device that is torch's (by PCI bus id: CUDA_VISIBLE_DEVICES renumbers)."""
    import torch

    index = torch_device.index if torch_device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    try:
        bus_id = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
        return pynvml.nvmlDeviceGetHandleByPciBusId(bus_id)
    except Exception:  # older torch without PCI ids: assume the numbering matches
        return pynvml.nvmlDeviceGetHandleByIndex(index)


# --------------------------------------------------------------------------- the run


def prepare_settings(settings: Settings, options: LoadtestOptions, avatars: dict[str, Path],
                     cuda: bool) -> tuple[Settings, int]:
    """The daemon's settings for the run and the frame rate the sessions use."""
    model = settings.model.model_dump()
    if not model["random_weights"] and not _weights_present(settings):
        print(f"MuseTalk weights are not in {settings.model.dir}/: running with RANDOM weights "
              "(model.random_weights; speed does not depend on weight values).", flush=True)
        model["random_weights"] = True
    fps = options.fps or (settings.video.fps if cuda else 10)
    if not cuda:
        print(f"No CUDA device: sessions at {fps} fps with the {model['random_weights_size']} "
              "random model on the CPU.", flush=True)
    most = max(options.ladder())
    s = in_process_settings(
        settings,
        model=model,
        video={"fps": fps},
        output={"sink": options.sink},
        # The load test finds the capacity itself: admission must let every session in
        # (attached to a shared GPU server, daemon.gpu_socket, admission also counts the
        # other edges' sessions: daemon.max_sessions then stays if it is larger).
        daemon={"max_sessions": most if settings.daemon.gpu_socket is None else max(most, settings.daemon.max_sessions),
                "capacity_fps": 1e9},
        fetch={"allow_file_urls": True},
        avatars={name: {"idle_video_url": path.resolve().as_uri()} for name, path in avatars.items()},
    )
    return s, fps


def _weights_present(settings: Settings) -> bool:
    from musetalk.weights import check

    return all(st.ok or not st.file.required for st in check(settings.model.dir))


def _cuda_wanted(settings: Settings) -> bool:
    import torch

    device = settings.model.device
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


def run_loadtest(settings: Settings, options: LoadtestOptions) -> int:
    try:
        options.validate()
        reference = read_reference_flow(options.reference_flow) if options.reference_flow is not None else None
    except LoadtestError as exc:
        print(f"lipsync loadtest: {exc}", file=sys.stderr)
        return 2
    avatars = make_avatars(settings.daemon.state_dir)
    run_settings, fps = prepare_settings(settings, options, avatars, _cuda_wanted(settings))
    if options.voiced_only:
        try:
            options = replace(options, wav=write_voiced_only(options.wav or SAMPLE_WAV, options.rate, fps,
                                                             Path(settings.daemon.state_dir)))
        except LoadtestError as exc:
            print(f"lipsync loadtest: {exc}", file=sys.stderr)
            return 2
    import uvloop

    try:
        report = uvloop.run(_loadtest(run_settings, options, list(avatars), fps))
    except (LoadtestError, LipsyncError) as exc:
        print(f"lipsync loadtest: {exc}", file=sys.stderr)
        return 1
    if reference is not None:
        report = against_reference_flow(report, reference)
    print_report(report)
    if options.json_path is not None:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(report, indent=2))
    return 0


def read_reference_flow(path: Path) -> dict[str, Any]:
    """The figures of a ``lipsync bench --reference-flow --json PATH`` report that the rows
    are compared with; a file that is not one is refused with what to give."""
    give = "give the file that `lipsync bench --reference-flow --json FILE` wrote"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise LoadtestError(f"--reference-flow {path} cannot be read as JSON ({exc}); {give}") from None
    fps = data.get("total_frames_per_s") if isinstance(data, dict) else None
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not fps > 0:
        raise LoadtestError(f"--reference-flow {path} has no total_frames_per_s above 0; {give}")
    return {"path": str(path), "frames_per_s": float(fps), "generation_frames_per_s": data.get("generation_frames_per_s"),
            "device": data.get("device")}


def against_reference_flow(report: dict[str, Any], reference: dict[str, Any]) -> dict[str, Any]:
    """``report`` with the reference flow's figures and, per row, the frames generated and
    shown in time a second as a multiple of the flow's frames a second (the target's
    ">= 4x the reference flow"; ``same_card``: both measured on a card of that name)."""
    rows = []
    for row in report["rows"]:
        shown = (row.get("frames_per_s") or {}).get("shown_generated")
        rows.append({**row, "vs_reference_flow": None if shown is None else round(shown / reference["frames_per_s"], 2)})
    return {**report, "rows": rows, "reference_flow": {**reference, "same_card": reference["device"] == report["card"]}}


def voiced_frames(pcm: np.ndarray, rate: int, fps: int) -> np.ndarray:
    """The speech cut into video frames (``rate // fps`` samples each, a shorter tail
    dropped), each frame kept only where its level is above the daemon's silence
    threshold (``daemon.speech.SILENCE_DBFS``: at or below it the mouth stays closed and
    the frame needs no model): the speech of a session that never pauses."""
    from daemon.speech import SILENCE_DBFS, level_dbfs

    spf = rate // fps
    frames = np.asarray(pcm)[: len(pcm) // spf * spf].reshape(-1, spf)
    return frames[level_dbfs(frames) > SILENCE_DBFS].reshape(-1)


def write_voiced_only(wav: Path, rate: int, fps: int, state_dir: Path) -> Path:
    """``--voiced-only``: the WAV without its silent frames (``voiced_frames``), at the
    producers' sample rate, written under the state dir; the producers loop it."""
    from daemon.producer import read_wav_mono16, write_wav_mono16

    pcm, sr = read_wav_mono16(wav, rate)
    voiced = voiced_frames(pcm, sr, fps)
    if voiced.size < sr:
        raise LoadtestError(f"--voiced-only: {wav} has {voiced.size / sr:.2f} s above the silence threshold "
                            "(at least 1 s is needed): give a --wav with speech in it")
    out = (Path(state_dir) / "loadtest-voiced.wav").resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_wav_mono16(out, voiced, sr)


def _commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.stdout.strip() or None) if out.returncode == 0 else None


def source_digest(root: Path | None = None) -> str:
    """The code a report was made with, named by its content: sha256 over every ``.py``
    file of ``daemon/`` and ``musetalk/`` and ``config.toml`` (paths and bytes, in path
    order), 16 hex digits. A GPU machine's copy of ``.git`` may be older than its files,
    so ``commit`` alone can name the wrong tree; on a checkout,
    ``python -c "from daemon.loadtest import source_digest; print(source_digest())"``
    gives the digest to match."""
    import hashlib

    root = root or Path(__file__).resolve().parent.parent
    files = sorted([p for d in ("daemon", "musetalk") for p in (root / d).rglob("*.py")] + [root / "config.toml"])
    h = hashlib.sha256()
    for path in files:
        if path.is_file():
            h.update(path.relative_to(root).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _config(settings: Settings, options: LoadtestOptions, fps: int, device: Any) -> dict[str, Any]:
    m = settings.model
    return {
        "fps": fps, "sink": options.sink, "sample_rate": options.rate, "chunk_ms": options.chunk_ms,
        "seconds": options.seconds, "warmup_s": options.warmup_s,
        "wav": str(options.wav or SAMPLE_WAV), "voiced_only": options.voiced_only,
        "slo": asdict(options.slo), "find_capacity": options.find_capacity,
        "model": {"enabled": m.enabled, "device": str(device) if device is not None else m.device,
                  "dtype": m.dtype,
                  "random_weights": m.random_weights, "random_weights_size": m.random_weights_size,
                  "compile": m.compile, "audio_compile": m.audio_compile, "max_batch": m.max_batch,
                  "bucket_step": m.bucket_step,
                  "batch_sizing": m.batch_sizing, "batch_utilization": m.batch_utilization,
                  "fill_steps": m.fill_steps, "fill_lead_ms": m.fill_lead_ms,
                  "busy_drop_fraction": m.busy_drop_fraction, "upsample": m.upsample,
                  "decode": m.decode, "decode_crop_row": m.decode_crop_row,
                  "decode_crop_row_high": m.decode_crop_row_high,
                  "audio_round_ms": m.audio_round_ms, "processing_budget_ms": m.processing_budget_ms,
                  "processing_budget_most_ms": m.processing_budget_most_ms,
                  "playout_delay_frames": m.playout_delay_frames, "audio_window_s": m.audio_window_s},
        "avatars": {name: AVATAR_RECIPES[name][0] for name in AVATAR_RECIPES},
    }


async def _loadtest(settings: Settings, options: LoadtestOptions, avatar_ids: list[str],
                    fps: int) -> dict[str, Any]:
    import nats

    from daemon.app import Daemon

    t = time.monotonic()
    daemon = Daemon(settings)
    probe = LoopLagProbe()
    gpu: GpuBusySampler | None = None
    device: Any = None
    nc = None
    rows: list[dict[str, Any]] = []
    capacity: int | None = None
    prepared: set[str] = set()  # avatars a round has used: cached for the later ones
    try:
        await daemon.start()
        print(f"daemon up in {time.monotonic() - t:.1f} s", flush=True)
        host = daemon.engine_host
        device = host.device if host is not None else None
        probe.start()
        gpu = GpuBusySampler(device)
        gpu.start()
        nc = await nats.connect(daemon.nats_url)
        for n in options.ladder():
            row = await _round(daemon, nc, n, options, avatar_ids, fps, probe, gpu, prepared)
            rows.append(row)
            print_row(row, flush=True)
            if options.json_path is not None:  # the rows so far, should the run be cut short
                options.json_path.parent.mkdir(parents=True, exist_ok=True)
                partial = {**_report(settings, options, fps, device, rows, capacity), "partial": True}
                options.json_path.write_text(json.dumps(partial, indent=2))
            if row["slo_met"]:
                capacity = n if capacity is None or options.find_capacity else max(capacity, n)
            elif options.find_capacity:
                break
    finally:
        if nc is not None:
            await nc.close()
        await probe.aclose()
        if gpu is not None:
            gpu.close()
        await daemon.shutdown()
    return _report(settings, options, fps, device, rows, capacity)


def _report(settings: Settings, options: LoadtestOptions, fps: int, device: Any, rows: list[dict[str, Any]],
            capacity: int | None) -> dict[str, Any]:
    card = "cpu"
    if device is not None and device.type == "cuda":
        import torch

        card = torch.cuda.get_device_name(device)
    return {"commit": _commit(), "source_digest": source_digest(), "config": _config(settings, options, fps, device),
            "card": card, "rows": rows, "capacity": capacity}


async def _round(daemon: Any, nc: Any, n: int, options: LoadtestOptions, avatar_ids: list[str],
                 fps: int, probe: LoopLagProbe, gpu: GpuBusySampler, prepared: set[str]) -> dict[str, Any]:
    prefix = daemon.settings.nats.subject_prefix
    sids = [f"lt{n}-{i}" for i in range(n)]
    avatars = [avatar_ids[i % len(avatar_ids)] for i in range(n)]
    host = daemon.engine_host
    producers: list[Any] = []
    try:
        # The producers first: each spawn forks this process and holds its event loop
        # until the child has started (34-129 ms measured on a 2-core machine, longer as
        # more producers start up beside it); with the sessions' clocks already running,
        # the spawns restarted them ("frame loop stalled"), 2-4 times a session.
        for i, sid in enumerate(sids):
            producers.append(await _spawn_producer(daemon, sid, i, options))
        await asyncio.gather(*(_expect_line(daemon, p, sid, "ready", 120) for p, sid in zip(producers, sids)))
        t = time.monotonic()
        before = await host.refresh_info() if host is not None else None
        started = await asyncio.gather(
            *(_start_session(nc, prefix, sid, avatar, options.rate, fps) for sid, avatar in zip(sids, avatars)),
            return_exceptions=True)
        failed = [r for r in started if isinstance(r, BaseException)]
        if failed:
            raise failed[0]
        # Whether an earlier round used (so prepared) each session's avatar.
        starts = {sid: (sent, replied, avatar in prepared)
                  for sid, avatar, (sent, replied) in zip(sids, avatars, started)}
        prepared.update(avatars)
        print(f"{n} session(s) started in {time.monotonic() - t:.1f} s; speaking for "
              f"{options.warmup_s:g} + {options.seconds:g} s", flush=True)
        for sid in sids:
            if not hasattr(daemon.sessions[sid].speech, "frame_records"):
                raise LoadtestError("the daemon's speech pipeline keeps no frame_records "
                                    "(daemon.speech.FrameRecord): this load test reads them")
        info = await _crop_validated(host) if host is not None else None
        memory = _memory_before(before, info, n)
        return await _speak_and_measure(daemon, nc, sids, producers, options, fps, probe, gpu, starts, memory)
    finally:
        await asyncio.gather(*(_stop_session(nc, prefix, sid) for sid in sids if sid in daemon.sessions))
        for proc in producers:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def _start_session(nc: Any, prefix: str, sid: str, avatar: str, rate: int,
                         fps: int) -> tuple[float, float]:
    """Starts one session; returns the monotonic times the request was sent and answered."""
    sent = time.monotonic()
    body = {"v": 1, "session_id": sid, "avatar_id": avatar, "audio": {"sample_rate": rate},
            "video": {"fps": fps}}
    msg = await nc.request(f"{prefix}.session.start", json.dumps(body).encode(), timeout=900)
    reply = json.loads(msg.data)
    if not reply.get("ok"):
        raise LoadtestError(f"session {sid} (avatar {avatar}) did not start: {reply.get('error')}")
    return sent, time.monotonic()


async def _stop_session(nc: Any, prefix: str, sid: str) -> None:
    try:
        await nc.request(f"{prefix}.session.stop", json.dumps({"v": 1, "session_id": sid}).encode(), timeout=30)
    except Exception as exc:  # the daemon's shutdown stops whatever is left
        print(f"lipsync loadtest: stopping {sid} failed: {exc!r}", file=sys.stderr)


@dataclass
class _RoundSamples:
    """What a round's run leaves to compute its row from."""

    window: tuple[float, float]  # the measured span, Unix time
    wall_to_mono: float  # add to a Unix time for the monotonic clock
    # The engine's (steps, frames, step seconds, (dropped late, done late)) at both ends.
    counters: tuple[tuple[int, int, float, tuple[int, int]], tuple[int, int, float, tuple[int, int]]]
    loop_lags: list[float]
    gc_pauses: list[tuple[int, float, float]]
    restarts: dict[str, int]  # each session's clock restarts within the window
    restart_times: dict[str, list[tuple[float, float]]]  # (monotonic, behind s) of those
    stalls: dict[str, Any]  # StallDumps' figures
    device_info: dict[str, Any] | None  # the engine host's, at the window's end
    gpu_busy: float | None
    gpu_memory_mb: float | None
    producers: list[dict[str, Any]]  # each producer's summary
    gc_heap: dict[str, int] | None = None  # gc_heap() at the window's end
    warmup_stalls: dict[str, Any] | None = None  # StallDumps' figures for the warm-up
    cpu: dict[str, Any] | None = None  # cpu_figures over the window


async def _crop_validated(host: Any, timeout_s: float = 600.0) -> dict[str, Any]:
    """The host's device_info once every avatar it holds has its cropped-decode
    validation behind it (with model.decode = "full" at once): the validation runs on the
    GPU in the background, and the measured window must not share the GPU with it."""
    deadline = time.monotonic() + timeout_s
    while True:
        info = await host.refresh_info()
        decode = info.get("decode") or {}
        if decode.get("mode", "full") == "full" or len(decode.get("avatars") or {}) >= (info.get("avatars") or 0):
            return info
        if time.monotonic() > deadline:
            raise LoadtestError(f"the cropped decode's validation of the avatars did not finish in {timeout_s:g} s "
                                "(model.decode = \"full\" skips it)")
        await asyncio.sleep(0.2)


def _memory_before(before: dict[str, Any] | None, started: dict[str, Any] | None, n: int) -> dict[str, Any]:
    """GPU memory (MB allocated, the model's process) before the round's sessions
    started and with them started but silent: what they hold beyond the step's working
    memory, split into their avatars' device tensors and the rest (audio streams), per
    session. None where the device is not CUDA."""
    b = (before or {}).get("memory_allocated_mb")
    a = (started or {}).get("memory_allocated_mb")
    if b is None or a is None:
        return {"before_sessions_mb": None}
    avatars_mb = (started or {}).get("avatars_device_mb") or 0.0
    avatars = (started or {}).get("avatars") or 0
    new_avatars_mb = avatars_mb - ((before or {}).get("avatars_device_mb") or 0.0)
    held = a - b
    return {"before_sessions_mb": b, "with_sessions_mb": a, "sessions_held_mb": held,
            "avatars_device_mb": avatars_mb, "avatars": avatars,
            "per_avatar_mb": round(avatars_mb / avatars, 1) if avatars else None,
            "per_session_mb": round((held - new_avatars_mb) / n, 1) if n else None}


async def _speak_and_measure(daemon: Any, nc: Any, sids: list[str], producers: list[Any],
                             options: LoadtestOptions, fps: int,
                             probe: LoopLagProbe, gpu: GpuBusySampler,
                             starts: dict[str, tuple[float, float, bool]],
                             memory: dict[str, Any] | None = None) -> dict[str, Any]:
    samples = await _speak(daemon, sids, producers, options, probe, gpu)
    row = await _row(daemon, sids, options, fps, samples, starts)
    row["memory"] = dict(memory or {}, peak_mb=samples.gpu_memory_mb)
    return row


async def _speak(daemon: Any, sids: list[str], producers: list[Any], options: LoadtestOptions,
                 probe: LoopLagProbe, gpu: GpuBusySampler) -> _RoundSamples:
    """Every session's producer (ready, one per session, in order) speaks from a common
    start (each with its own offset) to a common end; the probes record only the
    measured window. The caller ends the producers."""
    host = daemon.engine_host
    gc_pauses = GcPauses()
    gc_pauses.start()
    stalls = StallDumps(_producer_log(daemon, f"stalls-{len(sids)}").with_suffix(".txt"),
                        threshold_s=(options.stall_dump_ms or 60) / 1000)
    # The warm-up too (every session's first utterance starts in it), reported apart.
    warm_stalls = StallDumps(_producer_log(daemon, f"stalls-warmup-{len(sids)}").with_suffix(".txt"),
                             threshold_s=stalls.threshold_s)
    try:
        # Wall and monotonic clocks, tied once: frame records are stamped with the
        # first, captures and probes with the second.
        wall_to_mono = time.monotonic() - time.time()
        start_wall = time.time() + 0.5
        window = (start_wall + START_JITTER_S + options.warmup_s,
                  start_wall + START_JITTER_S + options.warmup_s + options.seconds)
        end_wall = window[1] + TAIL_S
        for p in producers:
            assert p.stdin is not None
            p.stdin.write(f"{start_wall:.6f} {end_wall:.6f}\n".encode())
            await p.stdin.drain()
        if options.stall_dump_ms:
            warm_stalls.record()
        # Whose CPU the window counts, found before it (a /proc scan, a control call).
        cpu_groups = _cpu_groups(host, producers)
        server_threads = await _server_thread_names(host)

        await _sleep_until(window[0] + wall_to_mono)
        warm_dumps = await warm_stalls.take()
        counters0 = _engine_counters(host)
        restarts0 = _clock_restarts(daemon, sids)
        gc_pauses.record()
        probe.record()
        gpu.record()
        if options.stall_dump_ms:
            stalls.record()
        if host is not None:
            await host.reset_peak_memory()
        cpu0 = cpu_snapshot(cpu_groups, server_threads)
        await _sleep_until(window[1] + wall_to_mono)
        counters1 = _engine_counters(host)
        cpu = cpu_figures(cpu0, cpu_snapshot(cpu_groups, server_threads))
        lags, busy = probe.take(), gpu.take()
        # The watch first: the heap walk below holds the loop and is not the run's.
        stall_dumps = await stalls.take()
        memory = await host.peak_memory_mb() if host is not None else None
        pauses = gc_pauses.take()
        heap = gc_heap()
        restarts = {sid: n - restarts0.get(sid, 0) for sid, n in _clock_restarts(daemon, sids).items()}
        lo, hi = window[0] + wall_to_mono, window[1] + wall_to_mono
        restart_times = {sid: [(t, b) for t, b in daemon.sessions[sid].restart_log if lo <= t <= hi]
                         for sid in sids if sid in daemon.sessions}

        device_info = await host.refresh_info() if host is not None else None
        summaries = await asyncio.gather(*(_producer_summary(daemon, p, sid, end_wall - time.time() + 60)
                                           for p, sid in zip(producers, sids)))
    finally:
        gc_pauses.stop()
    return _RoundSamples(window, wall_to_mono, (counters0, counters1), lags, pauses, restarts, restart_times,
                         stall_dumps, device_info, busy, memory, list(summaries), heap, warm_dumps, cpu)


async def _server_thread_names(host: Any) -> dict[int, str] | None:
    """The GPU server's Python threads by native id, to name its threads' CPU (only names:
    a server that cannot answer leaves the kernel's)."""
    if not hasattr(host, "thread_names"):
        return None
    try:
        return await host.thread_names()
    except (RuntimeError, LipsyncError) as exc:  # gpu_client.ServerDown: restarting
        print(f"lipsync loadtest: the GPU server's thread names: {exc!r}", file=sys.stderr)
        return None


def _cpu_groups(host: Any, producers: list[Any]) -> dict[str, list[int]]:
    """Whose CPU the row reports: this process (the edge, and the model where it runs
    in-process), the GPU server and its children (compile workers), the producers."""
    groups = {"edge": [os.getpid()], "producers": [p.pid for p in producers]}
    server = getattr(host, "pid", None)
    if server:
        groups["gpu_server"] = [server]
        groups["gpu_server_children"] = child_pids(server)
    return groups


def _clock_restarts(daemon: Any, sids: list[str]) -> dict[str, int]:
    return {sid: daemon.sessions[sid].clock_restarts for sid in sids if sid in daemon.sessions}


async def _row(daemon: Any, sids: list[str], options: LoadtestOptions, fps: int, samples: _RoundSamples,
               starts: dict[str, tuple[float, float, bool]]) -> dict[str, Any]:
    """The round's row, computed while the sessions still run, so the loop turns between
    sessions: all at once, 16 sessions of 13 s held it 24 ms on a 2-core machine, about
    180 ms for 24 sessions of 65 s, longer than the two frame periods after which a
    session's clock restarts."""
    window = samples.window
    mono_window = (window[0] + samples.wall_to_mono, window[1] + samples.wall_to_mono)
    per_session = []
    for sid in sids:
        session = daemon.sessions[sid]
        records = list(session.speech.frame_records)
        if records and records[0].published_wall > window[0]:
            raise LoadtestError(f"session {sid} kept fewer frame records than the round has frames "
                                "(speech.frame_records is bounded): shorten --seconds")
        publisher = session.publisher
        captures = list(publisher.capture_times) if hasattr(publisher, "capture_times") else None
        if captures and captures[0] > mono_window[0]:
            raise LoadtestError(f"session {sid}'s sink kept fewer capture times than the round has "
                                "frames (livekit_local.CAPTURE_WINDOW_S): shorten --seconds")
        figures = session_figures(sid, records, captures, window, mono_window, fps)
        figures["late_results"] = late_figures(session.speech.late_results if session.speech is not None else (),
                                               window)
        # How its utterance was placed (processing budget, audio context): latency's floor.
        figures["placement"] = session.speech.last_placement if session.speech is not None else None
        # Since the session started (not only the window): a stall before the window
        # moves its speech for good.
        figures["clock"] = {"restarts": session.clock_restarts, "late_ticks": session.late_ticks,
                            "rephases": session.rephases, "restarts_in_window": samples.restarts.get(sid)}
        # The window is bounded: once full, its oldest time is no longer the first capture.
        kept = getattr(publisher, "capture_times", None)
        first = kept[0] if kept and len(kept) < kept.maxlen else None
        figures["start"] = start_figures(starts[sid], first,
                                         session.info.timings_ms if session.info is not None else None)
        per_session.append(figures)
        await asyncio.sleep(0)
    late = [s for s in samples.producers if s.get("late_max_ms") is not None and s["late_max_ms"] > options.chunk_ms]
    if late:
        print(f"note: {len(late)} producer(s) sent a chunk over one chunk late (worst "
              f"{max(s['late_max_ms'] for s in late)} ms): underruns may be the producers' own", flush=True)
    (steps0, frames0, step_s0, late0), (steps1, frames1, step_s1, late1) = samples.counters
    steps = steps1 - steps0
    judged = [s["generated_pct"] for s in per_session if s["generated_pct"] is not None]
    return {
        "sessions": len(sids),
        "seconds": options.seconds,
        "per_session": per_session,
        # None when a session needed no generated frame at all (nothing to judge it by).
        "generated_pct_min": min(judged) if judged and len(judged) == len(per_session) else None,
        "latency_p95_ms_max": max((s["latency_ms"]["p95"] for s in per_session
                                   if s["latency_ms"]["p95"] is not None), default=None),
        # Start request -> first published frame, of the sessions whose avatar was cached.
        "cached_start_to_first_frame_ms_max": max(
            (s["start"]["to_first_frame_ms"] for s in per_session
             if s["start"]["avatar_cached"] and s["start"]["to_first_frame_ms"] is not None), default=None),
        "gpu_busy": samples.gpu_busy,
        # The machine's cores busy and stolen, and the cores each process group used.
        "cpu": samples.cpu,
        "loop_lag_p99_ms": percentile_ms(samples.loop_lags, 0.99),
        "gc": gc_figures(samples.gc_pauses, mono_window[0], samples.gc_heap),
        "stall_events": stall_events(samples.restart_times, mono_window[0]),
        "stall_dumps": samples.stalls,
        "stall_dumps_warmup": samples.warmup_stalls,
        # Frames/s in the window: needed (voiced), made by the GPU, shown generated. Made
        # but not shown were generated too late (their GPU time lost); needed but not
        # made were dropped before launch (too late to try) or never planned.
        "frames_per_s": {
            "needed": round(sum(s["needed"] for s in per_session) / options.seconds, 1),
            "generated": round((frames1 - frames0) / options.seconds, 1),
            "shown_generated": round(sum(s["generated"] for s in per_session) / options.seconds, 1),
        },
        # The worker's view of the lost frames, a second: dropped before a step as too late,
        # and made by a step seen done after their deadline.
        "late_frames_per_s": {"dropped": round((late1[0] - late0[0]) / options.seconds, 1),
                              "done_late": round((late1[1] - late0[1]) / options.seconds, 1)},
        "fallbacks_by_budget": fallbacks_by_budget(per_session),
        "mean_batch": round((frames1 - frames0) / steps, 2) if steps else None,
        "step_ms": round(1000 * (step_s1 - step_s0) / steps, 2) if steps else None,
        "gpu_memory_mb": samples.gpu_memory_mb,
        # The worker's estimates at the end of the round (they set the processing budget).
        "estimates": daemon.engine_host.estimates() if daemon.engine_host is not None else None,
        # The cropped decode: mode, FLOPs, and each avatar's validation figures.
        "decode": samples.device_info.get("decode") if samples.device_info else None,
        # The audio rounds' encoder by frame rate: CUDA graphs captured, compiled or not.
        "audio_encoder": samples.device_info.get("audio_encoder") if samples.device_info else None,
        # The model's process: this one, or a GPU server (daemon.gpu_process) with its restarts.
        "gpu_process": samples.device_info.get("gpu_process") if samples.device_info else None,
        # Sampled steps, by bucket: device ms of each stage (per step and per frame) and
        # the worker's host ms per launch.
        "stages": samples.device_info.get("stages") if samples.device_info else None,
        "slo_met": slo_met(per_session, options.slo),
    }


async def _spawn_producer(daemon: Any, sid: str, index: int, options: LoadtestOptions) -> Any:
    root = str(Path(__file__).resolve().parent.parent)  # so that `-m daemon.loadproducer` resolves
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    log = _producer_log(daemon, sid)
    log.parent.mkdir(parents=True, exist_ok=True)
    # stderr to a file, not a pipe nobody reads (a full pipe would stall the producer).
    with log.open("wb") as stderr:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "daemon.loadproducer", "--nats", daemon.nats_url,
            "--prefix", daemon.settings.nats.subject_prefix, "--session", sid,
            "--wav", str(options.wav or SAMPLE_WAV), "--rate", str(options.rate),
            "--chunk-ms", str(options.chunk_ms), "--jitter-s", str(START_JITTER_S), "--seed", str(index),
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=stderr, env=env,
        )


def _producer_log(daemon: Any, sid: str) -> Path:
    return Path(daemon.settings.daemon.state_dir) / "loadtest-logs" / f"{sid}.log"


async def _expect_line(daemon: Any, proc: Any, sid: str, expected: str, timeout: float) -> None:
    line = await _read_line(daemon, proc, sid, timeout)
    if line != expected:
        raise LoadtestError(f"producer for {sid} said {line!r} instead of {expected!r}")


async def _producer_summary(daemon: Any, proc: Any, sid: str, timeout: float) -> dict[str, Any]:
    line = await _read_line(daemon, proc, sid, timeout)
    await proc.wait()
    try:
        return json.loads(line)
    except ValueError:
        raise LoadtestError(f"producer for {sid} ended with {line!r} instead of its summary") from None


async def _read_line(daemon: Any, proc: Any, sid: str, timeout: float) -> str:
    try:
        raw = await asyncio.wait_for(proc.stdout.readline(), timeout=max(1.0, timeout))
    except asyncio.TimeoutError:
        raise LoadtestError(f"producer for {sid} said nothing within {timeout:.0f} s "
                            f"(its log: {_producer_log(daemon, sid)})") from None
    if not raw:
        await proc.wait()
        log = _producer_log(daemon, sid)
        tail = log.read_text(errors="replace").strip().splitlines()[-5:] if log.is_file() else []
        raise LoadtestError(f"producer for {sid} exited with code {proc.returncode}: {' | '.join(tail)} "
                            f"(its log: {log})")
    return raw.decode().strip()


async def _sleep_until(mono: float) -> None:
    delay = mono - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def _engine_counters(host: Any) -> tuple[int, int, float, tuple[int, int]]:
    if host is None:
        return 0, 0, 0.0, (0, 0)
    return host.steps, host.frames_generated, host.step_s, host.late_frames


# --------------------------------------------------------------------------- report


def _fmt(value: Any, spec: str = "") -> str:
    return "-" if value is None else format(value, spec)


def print_row(row: dict[str, Any], flush: bool = False) -> None:
    print(f"{row['sessions']:>3} sessions: generated min {_fmt(row['generated_pct_min'])} %, "
          f"latency p95 max {_fmt(row['latency_p95_ms_max'])} ms, loop lag p99 "
          f"{_fmt(row['loop_lag_p99_ms'])} ms, GPU busy {_fmt(row['gpu_busy'])}, batch "
          f"{_fmt(row['mean_batch'])}, step {_fmt(row['step_ms'])} ms, GPU memory "
          f"{_fmt(row['gpu_memory_mb'])} MB: SLO {'met' if row['slo_met'] else 'NOT met'}", flush=flush)


def _budget_basis(placement: dict[str, Any] | None) -> str:
    """The step its budget planned for, as ``sessions/bucket`` (``-`` where none was)."""
    parts = (placement or {}).get("budget_parts")
    return f"{parts['sessions']}/{parts['bucket']}" if parts else "-"


def print_report(report: dict[str, Any]) -> None:
    slo = report["config"]["slo"]
    print(f"\ncard {report['card']}, commit {report['commit'] or '?'} (source {report.get('source_digest') or '?'}), "
          f"{report['config']['fps']} fps, "
          f"sink {report['config']['sink']}, {report['config']['seconds']:g} s measured per round; SLO: "
          f">= {slo['generated_pct']:g} % generated, p95 <= {slo['latency_p95_ms']:g} ms")
    print(f"{'session':>10} {'needed':>7} {'gen':>7} {'gen %':>7} {'fallbk':>7} {'undrun':>7} "
          f"{'p50':>7} {'p95':>7} {'p99':>7} {'jitter':>7} {'budget':>7} {'for':>7}")
    for row in report["rows"]:
        for s in row["per_session"]:
            lat = s["latency_ms"]
            print(f"{s['session_id']:>10} {s['needed']:>7} {s['generated']:>7} {_fmt(s['generated_pct']):>7} "
                  f"{s['fallbacks']:>7} {s['underruns']:>7} {_fmt(lat['p50']):>7} {_fmt(lat['p95']):>7} "
                  f"{_fmt(lat['p99']):>7} {_fmt(s['jitter_ms_p99']):>7} "
                  f"{_fmt((s.get('placement') or {}).get('budget_ms')):>7} {_budget_basis(s.get('placement')):>7}")
        print_row(row)
        fps_ = row.get("frames_per_s") or {}
        if fps_:
            print(f"  frames/s: needed {fps_['needed']}, generated {fps_['generated']}, shown generated "
                  f"{fps_['shown_generated']} (generated but not shown: too late)")
        starts = [s["start"] for s in row["per_session"]]
        print(f"  start: reply max {_fmt(max(s['reply_ms'] for s in starts))} ms, first frame max "
              f"{_fmt(max((s['to_first_frame_ms'] for s in starts if s['to_first_frame_ms'] is not None), default=None))}"
              f" ms; cached avatars {sum(s['avatar_cached'] for s in starts)} of {len(starts)}")
        if row.get("estimates"):
            print(f"  estimates at the end: audio round {row['estimates']['round_ms']} ms, step ms by "
                  f"bucket {row['estimates']['step_ms']}")
        restarts = [s["clock"]["restarts_in_window"] for s in row["per_session"] if s.get("clock")]
        print(f"  in the window: clock restarts {sum(r or 0 for r in restarts)} (all sessions), garbage "
              f"collections {row['gc']['collections']}, longest {row['gc']['max_ms']} ms, "
              f"{row['gc']['over_20ms']} over 20 ms"
              + (f"; a full collection walks {row['gc']['heap']['walked']} objects "
                 f"({row['gc']['heap']['frozen']} frozen at start)" if row["gc"].get("heap") else ""))
        gp = row.get("gpu_process") or {}
        if gp:
            print(f"  GPU server: restarts {gp.get('restarts')}, records dropped {gp.get('dropped_records')}, "
                  f"waited on the edge {gp.get('backlogged_records')}, inbox fullest "
                  f"{round((gp.get('inbox_used_max') or 0) / 1024, 1)} kB, its loop held up at most "
                  f"{_fmt(gp.get('loop_lag_ms_max'))} ms (since it started), GIL hand-off bound "
                  f"{_fmt(gp.get('gil_switch_ms'))} ms")
        cpu = row.get("cpu")
        if cpu:
            used = ", ".join(f"{name} {v}" for name, v in cpu["cores_used"].items())
            print(f"  CPU: {cpu['busy']} of {cpu['cores']} cores busy (steal {cpu['steal']}); cores used: {used}")
            for group, threads in (cpu.get("threads") or {}).items():
                print(f"  {group}'s busiest threads (cores): "
                      + (", ".join(f"{name} {v}" for name, v in threads.items()) or "none over 0.01"))
        worker_late = row.get("late_frames_per_s") or {}
        late = [s["late_results"] for s in row["per_session"] if s.get("late_results")]
        if late:
            after = [f["p50_ms"] for f in late if f["p50_ms"] is not None]
            print(f"  lost frames/s: {round(sum(f['count'] for f in late) / row['seconds'], 1)} came after their tick"
                  + (f" (sessions' median lateness {min(after)}-{max(after)} ms)" if after else "")
                  + f"; the worker dropped {worker_late.get('dropped')} as too late and saw "
                  f"{worker_late.get('done_late')} done after their deadline")
        if row.get("fallbacks_by_budget"):
            print("  " + budget_line(row["fallbacks_by_budget"]))
        for fps_key, enc in (row.get("audio_encoder") or {}).items():
            print(f"  audio encoder at {fps_key} fps: {enc['graphs']} CUDA graphs, "
                  f"{'compiled' if enc['compiled'] else 'eager kernels'}; {enc['graph_rounds']} of "
                  f"{enc['rounds']} rounds replayed a graph (since it started)")
        decode = row.get("decode") or {}
        if decode.get("avatars"):
            high = decode.get("crop_row_high")
            print(f"  decode {decode['mode']} from row {decode['crop_row']}"
                  + (f" (or {high})" if high else "") + f" ({decode['gflop_per_frame']} GFLOP/frame): "
                  + "; ".join(f"{'on' if f['accepted'] else 'off'} mean {f.get('mean_abs')} max {f.get('max_abs')}"
                              + (f", from {high}: {'on' if f['high'].get('accepted') else 'off'} mean "
                                 f"{f['high'].get('mean_abs')}" if f.get("high") else "")
                              for f in decode["avatars"].values()))
        events = row.get("stall_events") or []
        if events:
            print(f"  stalls (clock restarts grouped): {len(events)}, hitting "
                  f"{sorted(e['sessions'] for e in events)} sessions each")
        for stack in (row.get("stall_dumps") or {}).get("stacks", [])[:8]:
            print(f"  stalled loop ({stack['dumps']} dumps), {stack['thread']}: {stack['frames']}")
        for stack in (row.get("stall_dumps_warmup") or {}).get("stacks", [])[:4]:
            print(f"  stalled loop in the warm-up ({stack['dumps']} dumps), {stack['thread']}: {stack['frames']}")
    print(f"capacity: {_fmt(report['capacity'])} sessions")
    ref = report.get("reference_flow")
    if ref:
        print(f"reference flow: {ref['frames_per_s']:g} frames/s on {ref['device']}"
              f"{'' if ref['same_card'] else ' (another card than this run)'}; generated frames shown in time "
              "against it: " + ", ".join(f"{row['sessions']} sessions {_fmt(row.get('vs_reference_flow'))}x"
                                         f" (SLO {'met' if row['slo_met'] else 'not met'})" for row in report["rows"]))
