"""`lipsync demo`: the whole loop on this machine, as the README's main job.

Embedded NATS, the daemon, the demo avatar, a speech WAV streamed at real time into a
session, the lip-synced MP4 recorded, and a summary measured on that recording.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import Settings
from daemon.inprocess import SAMPLE_WAV, in_process_settings, read_recording

def _weights_present(settings: Settings) -> bool:
    from musetalk.weights import check

    return all(st.ok or not st.file.required for st in check(settings.model.dir))


def run_demo(settings: Settings, wav: Path | None, out: Path | None) -> int:
    import torch

    wav = wav or SAMPLE_WAV
    model = settings.model.model_dump()
    if not settings.model.random_weights and not _weights_present(settings):
        print(f"MuseTalk weights are not in {settings.model.dir}/. For real lip-sync run:\n"
              f"    .venv/bin/lipsync models download --dir {settings.model.dir}\n"
              "Running now with RANDOM weights (model.random_weights = true, a development "
              "switch): the loop is real, the mouth is noise.\n", flush=True)
        model["random_weights"] = True
    cuda = torch.cuda.is_available() and settings.model.device in ("auto", "cuda") or \
        settings.model.device.startswith("cuda")
    fps = settings.video.fps
    if not cuda:
        # A CPU runs the tiny model at ~10 frames/s: a lower frame rate keeps the demo
        # real-time there. On a GPU the daemon's own defaults apply.
        fps = 10
        model["playout_delay_frames"] = max(model["playout_delay_frames"] or 0, 8)
        print("No CUDA device: demo at 10 fps with the tiny random model (a GPU runs 25 fps).", flush=True)
    demo_settings = in_process_settings(settings, model=model)
    import uvloop

    summary = uvloop.run(_demo(demo_settings, wav, fps))
    if out is not None and summary.get("recording"):
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(summary["recording"], out)
        summary["copied_to"] = str(out)
    print(json.dumps(summary, indent=2))
    return 0 if summary.get("ok") else 1


async def _demo(settings: Settings, wav: Path, fps: int) -> dict[str, Any]:
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
            "video": {"fps": fps}}).encode(), timeout=600)
        reply = json.loads(msg.data)
        if not reply.get("ok"):
            summary["error"] = reply.get("error")
            return summary
        summary["start_to_ready_s"] = round(time.monotonic() - t, 2)
        session = daemon.sessions[sid]
        await asyncio.sleep(1.0)
        print(f"speaking {len(pcm) / rate:.2f}s of {wav.name} at real time...", flush=True)
        await stream_pcm(nc, settings.nats.subject_prefix, sid, pcm, rate, realtime=True, chunk_ms=40)
        await nc.publish(f"{settings.nats.subject_prefix}.control.{sid}", b'{"op": "flush"}')
        deadline = time.monotonic() + len(pcm) / rate + 60
        while not any(e["type"] == "playback_finished" for e in events) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        stats = session.speech.stats() if session.speech else {}
        boxes = session.speech.avatar.blend_boxes if session.speech else None
        idle_frames = session.video.frames
        await nc.request(f"{settings.nats.subject_prefix}.session.stop",
                         json.dumps({"v": 1, "session_id": sid}).encode(), timeout=30)
        path = Path(reply["output"]["path"])
        summary.update(recording=str(path), generation=stats.get("counts"),
                       latency_ms=stats.get("latency_ms"), device=daemon.engine_host.device_info()
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
