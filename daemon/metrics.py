"""Prometheus metrics (one registry per daemon, so tests can run several)."""

from __future__ import annotations

from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

LATENCY_BUCKETS = (0.04, 0.06, 0.08, 0.1, 0.12, 0.14, 0.16, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.0)


# The families the GPU-server process fills (daemon.gpu_process): an edge shows its figures.
REMOTE_FAMILIES = ("lipsync_gpu_step_seconds", "lipsync_gpu_batch_frames")


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        # The daemon's own memory, CPU, open fds and start time (process_*, from /proc on
        # Linux) and the Python version (python_info): the default registry has them,
        # this one must ask.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        self.sessions_active = Gauge("lipsync_sessions_active", "Sessions live or starting", registry=r)
        self.sessions_started = Counter("lipsync_sessions_started", "Sessions started", registry=r)
        self.frames_published = Counter(
            "lipsync_frames_published", "Video frames published", ["kind"], registry=r
        )
        self.frames_late = Counter(
            "lipsync_frames_late", "Frame ticks that ran more than one frame late", registry=r
        )
        # Speech frames shown as the avatar's own frame because generation did not make
        # the tick, per session: the label set is removed when the session closes
        # (forget_session), so the series stay as many as the live sessions.
        self.frames_degraded = Counter(
            "lipsync_frames_degraded", "Speech frames published without a generated mouth (fallback)",
            ["session_id"], registry=r,
        )
        self.capacity_fps = Gauge(
            "lipsync_capacity_fps",
            "Frames/s admission may promise (daemon.capacity_fps or measured); NaN: only max_sessions applies",
            registry=r,
        )
        self.demand_fps = Gauge(
            "lipsync_demand_fps", "Speaking demand of the admitted sessions: sum of fps x daemon.speech_duty",
            registry=r,
        )
        self.errors = Counter("lipsync_errors", "Errors reported to producers", ["code"], registry=r)
        self.audio_bytes = Counter("lipsync_audio_bytes", "PCM bytes received", registry=r)
        self.audio_gaps = Counter(
            "lipsync_audio_gap_messages", "Audio messages missing by Lipsync-Seq (filled with silence)", registry=r
        )
        self.start_to_ready = Histogram(
            "lipsync_start_to_ready_seconds", "Session start -> ready",
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120), registry=r,
        )
        self.audio_to_frame_latency = Histogram(
            "lipsync_audio_to_frame_latency_seconds",
            "Audio chunk sent (Lipsync-Sent; else its arrival) -> publication of the frame whose span holds its first sample",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.loop_lag = Gauge(
            "lipsync_event_loop_lag_seconds", "How late the last heartbeat ran (event loop blocked)", registry=r
        )
        self.utterance_generated = Histogram(
            "lipsync_utterance_generated_ratio",
            "Per finished utterance: frames generated in time / frames that needed generation",
            buckets=(0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0), registry=r,
        )
        self.gpu_step_seconds = Histogram(
            "lipsync_gpu_step_seconds", "One batched generation step",
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56), registry=r,
        )
        self.gpu_batch_size = Histogram(
            "lipsync_gpu_batch_frames", "Frames per generation step",
            buckets=(1, 2, 4, 8, 16, 32, 64), registry=r,
        )

        # The model's own process (daemon.gpu_process): up or not, and how often restarted.
        self.gpu_server_up = Gauge("lipsync_gpu_server_up", "1 while the GPU-server process is ready "
                                   "(daemon.gpu_process; absent in-process)", registry=r)
        self.gpu_server_restarts = Counter("lipsync_gpu_server_restarts", "GPU-server processes started "
                                           "again after one exited", registry=r)
        # Families another process fills (the GPU server's step histograms): /metrics takes
        # them from there (``remote``) instead of from this registry.
        self.remote: Any = None  # async () -> exposition text of those families
        self.remote_families = REMOTE_FAMILIES

    def forget_session(self, session_id: str) -> None:
        """Drop a closed session's per-session series (a label set per session id ever
        seen would grow without bound)."""
        try:
            self.frames_degraded.remove(session_id)
        except KeyError:
            pass  # it never had a degraded frame


def families(text: str, names: tuple[str, ...], keep: bool) -> str:
    """Prometheus exposition text reduced to the families ``names`` (``keep``) or to
    every other family: a family is its ``# HELP``/``# TYPE`` lines and the samples whose
    name starts with it (``_bucket``, ``_sum``, ``_count``, ``_created``...)."""
    out, current = [], None
    for line in text.splitlines():
        if line.startswith("# HELP ") or line.startswith("# TYPE "):
            current = line.split()[2]
        elif line and not line.startswith("#"):
            sample = line.split("{")[0].split()[0]
            if current is None or not sample.startswith(current):
                current = sample
        inside = current is not None and any(current == n or current.startswith(n + "_") for n in names)
        if inside == keep:
            out.append(line)
    return "\n".join(out) + ("\n" if out else "")
