"""`lipsync demo`: the whole loop on this machine, as the README's main job.

Embedded NATS, the daemon, the demo avatar, a speech WAV streamed at real time into a
session, the lip-synced MP4 recorded, and a summary measured on that recording. The
summary says what each figure should be on this device and why (:class:`Expectation`),
and flags the figures that are not.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import Settings
from daemon.inprocess import SAMPLE_WAV, in_process_settings, read_recording
from daemon.speech import CONTEXT_FRAMES, NO_MODEL_JITTER_S

CHUNK_MS = 40  # the demo's producer sends 40 ms chunks
# The CPU demo's playout delay: the tiny model on a CPU needs about that long per frame.


def weights_present(model_dir: Path) -> bool:
    from musetalk.weights import check

    return all(st.ok or not st.file.required for st in check(model_dir))


def download_command(model_dir: Path) -> str:
    """What fetches the real weights (also the hint of `lipsync render`)."""
    return f".venv/bin/lipsync models download --dir {model_dir}"


def run_demo(settings: Settings, wav: Path | None, out: Path | None) -> int:
    import torch

    wav = wav or SAMPLE_WAV
    model = settings.model.model_dump()
    if not settings.model.random_weights and not weights_present(settings.model.dir):
        print(f"MuseTalk weights are not in {settings.model.dir}/. For real lip-sync run:\n"
              f"    {download_command(settings.model.dir)}\n"
              "Running now with RANDOM weights (model.random_weights = true, a development "
              "switch): the loop is real, the mouth is noise.\n", flush=True)
        model["random_weights"] = True
    cuda = torch.cuda.is_available() and settings.model.device in ("auto", "cuda") or \
        settings.model.device.startswith("cuda")
    fps: int | None = settings.video.fps
    delay_why = "model.playout_delay_frames"
    if not cuda:
        # A CPU runs the tiny model at a few frames/s: the session takes the rate the
        # daemon measures it can sustain (video.auto_fps) and starts speech after the
        # budget it measures. On a GPU the daemon's own defaults apply.
        fps = None
        print("No CUDA device: demo with the tiny random model at the frame rate this CPU sustains "
              "(measured at start; a GPU runs 25 fps).", flush=True)
    demo_settings = in_process_settings(settings, model=model)
    import uvloop

    summary = uvloop.run(_demo(demo_settings, wav, fps))
    fps = summary.get("fps") or fps or demo_settings.video.fps
    if out is not None and summary.get("recording"):
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary["recording"], out)
        summary["copied_to"] = str(out)
    if summary.get("ok"):
        m = demo_settings.model
        expectation = Expectation(
            fps=fps, chunk_ms=CHUNK_MS, playout_delay_frames=m.playout_delay_frames,
            processing_budget_ms=summary.get("processing_budget_ms"), lookahead_frames=m.lookahead_frames,
            generates=m.enabled, delay_why=delay_why,
        )
        summary.update(assess(summary, expectation))
    print(json.dumps(summary, indent=2))
    for line in verdict_lines(summary):
        print(line)
    return 0 if summary.get("ok") else 1


async def _demo(settings: Settings, wav: Path, fps: int | None) -> dict[str, Any]:
    import nats

    from daemon.app import Daemon
    from daemon.producer import read_wav_mono16, stream_pcm

    pcm, rate = read_wav_mono16(wav)
    daemon = Daemon(settings)
    t0 = time.monotonic()
    await daemon.start()
    print(f"daemon up in {time.monotonic() - t0:.1f}s (embedded NATS at {daemon.nats_url})", flush=True)
    nc = await nats.connect(daemon.nats_url)
    events: list[dict] = []

    async def on_event(msg) -> None:
        ev = json.loads(msg.data)
        events.append(ev)
        print(f"event: {ev['type']} {json.dumps({k: v for k, v in ev.items() if k not in ('v', 'ts', 'type', 'session_id')})}",
              flush=True)

    sid = f"demo-{int(time.time())}"
    await nc.subscribe(f"{settings.nats.subject_prefix}.events.{sid}", cb=on_event)
    summary: dict[str, Any] = {"ok": False, "session_id": sid}
    try:
        t = time.monotonic()
        msg = await nc.request(f"{settings.nats.subject_prefix}.session.start", json.dumps({
            "v": 1, "session_id": sid, "avatar_id": "demo", "audio": {"sample_rate": rate},
            **({"video": {"fps": fps}} if fps else {})}).encode(), timeout=600)
        reply = json.loads(msg.data)
        if not reply.get("ok"):
            summary["error"] = reply.get("error")
            return summary
        summary["start_to_ready_s"] = round(time.monotonic() - t, 2)
        session = daemon.sessions[sid]
        fps = session.fps  # the daemon's choice when the demo left it open
        await asyncio.sleep(1.0)
        print(f"speaking {len(pcm) / rate:.2f}s of {wav.name} at real time...", flush=True)
        await stream_pcm(nc, settings.nats.subject_prefix, sid, pcm, rate, realtime=True, chunk_ms=CHUNK_MS)
        await nc.publish(f"{settings.nats.subject_prefix}.control.{sid}", b'{"op": "flush"}')
        deadline = time.monotonic() + len(pcm) / rate + 60
        while not any(e["type"] == "playback_finished" for e in events) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        stats = session.speech.stats() if session.speech else {}
        avatar = session.speech.avatar if session.speech else None  # None without a model
        boxes = avatar.blend_boxes if avatar is not None else None
        host = daemon.engine_host
        if host is not None and settings.model.playout_delay_frames is None:
            # The budget the utterance started with: one session speaking.
            summary["processing_budget_ms"] = round(host.processing_budget_s() * 1000, 1)
        idle_frames = session.video.frames
        await nc.request(f"{settings.nats.subject_prefix}.session.stop",
                         json.dumps({"v": 1, "session_id": sid}).encode(), timeout=30)
        path = Path(reply["output"]["path"])
        summary.update(recording=str(path), generation=stats.get("counts"),
                       timeline=stats.get("timeline"), latency_ms=stats.get("latency_ms"), device=daemon.engine_host.device_info()
                       if daemon.engine_host else None)
        summary.update(measure_recording(path, idle_frames, boxes, fps))
        summary["ok"] = True
        return summary
    finally:
        await nc.close()
        await daemon.shutdown()


def measure_recording(path: Path, idle_frames: np.ndarray, blend_boxes: np.ndarray | None,
                      fps: int) -> dict[str, Any]:
    """Frames, fps and the A/V offset as they are in the MP4: the first frame whose mouth
    differs from the idle video against the first frame whose audio is voiced."""
    rec = read_recording(path, idle_frames, blend_boxes, fps)
    out: dict[str, Any] = {"frames": rec.frames, "video_s": round(rec.frames / fps, 2),
                           "audio_s": rec.audio_s, "fps": fps}
    if blend_boxes is None:
        return out
    noise = max(rec.mouth_change[: max(1, fps // 2)])
    moved = [t for t, v in enumerate(rec.mouth_change) if v > noise + 1.0]
    voiced = np.flatnonzero(rec.voiced)
    if moved and len(voiced):
        out["av_offset_ms"] = round((moved[0] - int(voiced[0])) * 1000 / fps)
        out["av_offset_note"] = "first moving mouth minus first voiced audio frame, at frame resolution"
        out["mouth_closed_frames_after_voice"] = moved[-1] - int(voiced[-1])
    return out


# --------------------------------------------------------------------------- verdict


@dataclass(frozen=True)
class Expectation:
    """What the demo's figures should be on this device, derived from how the session
    schedules speech (daemon.speech): the playout delay, the frame rate, the chunk size."""

    fps: int
    chunk_ms: int = CHUNK_MS
    playout_delay_frames: int | None = None  # None: the adaptive start
    processing_budget_ms: float | None = None  # the adaptive start's budget, as measured
    lookahead_frames: int = 0
    generates: bool = True  # False: model.enabled = false, speech over the idle video
    delay_why: str = "model.playout_delay_frames"
    # The frame loop's own jitter: publishing a frame is not instantaneous.
    slack_ms: float = 25.0
    min_generated_pct: float = 99.0

    @property
    def frame_ms(self) -> float:
        return 1000.0 / self.fps

    def start_delay(self) -> tuple[float, str]:
        """(ms, why) from an utterance's first chunk arriving to when its first sample
        plays (the adaptive start) or to the earliest tick it may play at (a fixed delay)."""
        f = self.frame_ms
        if self.playout_delay_frames is not None:
            ms = self.playout_delay_frames * f
            return ms, (f"a playout delay of {self.playout_delay_frames} frames at {self.fps} fps "
                        f"= {ms:g} ms ({self.delay_why})")
        if not self.generates:
            context = max(0.0, f - self.chunk_ms)
            jitter = NO_MODEL_JITTER_S * 1000
            return context + jitter, (
                f"no model: the first frame's audio ({context:g} ms after a {self.chunk_ms} ms first chunk) "
                f"plus a {jitter:g} ms jitter margin")
        context = max(0.0, (CONTEXT_FRAMES + 1 + self.lookahead_frames) * f - self.chunk_ms)
        budget = self.processing_budget_ms or 0.0
        return context + budget, (
            f"the adaptive start: frame 0 needs its audio through frame {CONTEXT_FRAMES + self.lookahead_frames} "
            f"({context:g} ms after a {self.chunk_ms} ms first chunk) plus the processing budget "
            f"measured for one session ({budget:g} ms)")

    def latency_range(self) -> tuple[float, float, str]:
        """Each chunk's latency (its first sample published minus its arrival): the start
        delay, plus, with a fixed delay, up to one frame waiting for the next tick (the
        adaptive start plays the first sample when due, leading silence filling the rest
        of its frame)."""
        base, why = self.start_delay()
        f = self.frame_ms
        high = base + self.slack_ms
        if self.playout_delay_frames is not None:
            high += f
            why += f", plus up to one frame ({f:g} ms) waiting for the next tick"
        return round(base, 1), round(high, 1), why + f", plus {self.slack_ms:g} ms for publishing"

    def av_offset_range(self) -> tuple[float, float, str]:
        return round(-self.frame_ms, 1), 0.0, (
            "the lips lead the voice by one frame by design: the mouth opens with the sound of "
            "its own frame or of the next one (daemon.speech blend_for); 0 when the speech starts "
            "voiced, as the utterance's first frame has nothing before it")


def assess(summary: dict[str, Any], expected: Expectation) -> dict[str, Any]:
    """What the summary's figures should be and why ("expected"), the figures that are
    not ("flags", each saying what it is, what was expected and the likely cause) and a
    one-line "verdict"."""
    out: dict[str, Any] = {}
    flags: list[str] = []
    f = expected.frame_ms
    # One letter per frame of the utterance: s speech, f fallback, u underrun (daemon.speech).
    timeline = summary.get("timeline") or ""

    low, high, why = expected.latency_range()
    out["latency_ms"] = {"range": [low, high], "why": why}
    latency = summary.get("latency_ms") or {}
    if not latency.get("n"):
        flags.append("no audio chunk reached the screen: no latency was measured")
    for q in ("p50", "p95"):
        value = latency.get(q)
        if value is not None and not low <= value <= high:
            cause = ""
            underruns = (summary.get("generation") or {}).get("underrun", 0)
            if value > high and underruns:
                cause = f"; the producer fell behind real time {underruns} times, each a frame later"
            flags.append(f"latency {q} {value:g} ms is outside the expected {low:g}..{high:g} ms{cause}")

    gen = summary.get("generation") or {}
    needed = gen.get("needed")
    if expected.generates and needed:
        fallback = gen.get("fallback", 0)
        pct = 100.0 * (needed - fallback) / needed
        out["generated_pct"] = {"min": expected.min_generated_pct,
                                "why": "every frame whose audio opens the mouth is generated in time"}
        if pct < expected.min_generated_pct:
            flags.append(f"{fallback} of {needed} frames that needed the model fell back to the "
                         f"idle picture ({pct:.0f} % generated in time, expected >= "
                         f"{expected.min_generated_pct:g} %): generation did not keep up on this device")
    if gen.get("underrun"):
        flags.append(f"{gen['underrun']} underruns: the producer fell behind real time")

    if summary.get("video_s") is not None and summary.get("audio_s") is not None:
        drift = abs(summary["video_s"] - summary["audio_s"])
        out["video_minus_audio_s"] = {"range": [-2 * f / 1000, 2 * f / 1000],
                                      "why": "each tick publishes one frame with its own audio"}
        if drift > 2 * f / 1000:
            flags.append(f"the recording's video ({summary['video_s']} s) and audio "
                         f"({summary['audio_s']} s) differ by more than two frames")

    if expected.generates:
        low, high, why = expected.av_offset_range()
        out["av_offset_ms"] = {"range": [low, high], "why": why}
        offset = summary.get("av_offset_ms")
        if offset is None:
            flags.append("the mouth never moved in the recording: no generated frame reached it")
        elif not low <= offset <= high:
            cause = ""
            first = timeline[: round(offset / f) + 1] if offset > high else ""
            if "f" in first:
                cause = (f"; {first.count('f')} of the utterance's first {len(first)} frames fell back "
                         "to the idle picture, so the mouth started late")
            flags.append(f"av_offset_ms {offset:g} is outside the expected {low:g}..{high:g} ms{cause}")
        closed = summary.get("mouth_closed_frames_after_voice")
        out["mouth_closed_frames_after_voice"] = {
            "range": [0, 1], "why": "the mouth closes one frame after the voice (a half-strength hangover)"}
        if closed is not None and not 0 <= closed <= 1:
            flags.append(f"mouth_closed_frames_after_voice {closed} is outside the expected 0..1")

    verdict = "as expected" if not flags else f"{len(flags)} outside expectation (see flags)"
    return {"expected": out, "flags": flags, "verdict": verdict}


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """The summary's verdict for a person: the expectations met, then each flag."""
    if "verdict" not in summary:
        return []
    lines = [f"verdict: {summary['verdict']}"]
    expected = summary.get("expected", {})
    if "latency_ms" in expected:
        lo, hi = expected["latency_ms"]["range"]
        lines.append(f"  latency expected {lo:g}..{hi:g} ms: {expected['latency_ms']['why']}")
    if "av_offset_ms" in expected:
        lo, hi = expected["av_offset_ms"]["range"]
        lines.append(f"  A/V offset expected {lo:g}..{hi:g} ms: {expected['av_offset_ms']['why']}")
    lines += [f"  FLAG: {flag}" for flag in summary.get("flags", [])]
    return lines
