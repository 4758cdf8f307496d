"""`python -m daemon.soak`: a long session measured at the sink.

Runs the daemon in-process (embedded NATS, file sink, demo avatar), keeps one session
for ``--minutes``, speaking the sample WAV every ``--every`` seconds when the model is
enabled, then decodes the MP4 and reports: frames published against the wall clock
(the frame rate held), and, per utterance, the offset between the first moving mouth and
the first voiced audio frame (it must stay within one frame and not drift).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import Settings, load_settings
from daemon.inprocess import SAMPLE_WAV, in_process_settings, read_recording


async def _soak(settings: Settings, minutes: float, every: float, fps: int) -> dict[str, Any]:
    import nats

    from daemon.app import Daemon
    from daemon.producer import read_wav_mono16, stream_pcm

    daemon = Daemon(settings)
    await daemon.start()
    nc = await nats.connect(daemon.nats_url)
    prefix = settings.nats.subject_prefix
    pcm, rate = read_wav_mono16(SAMPLE_WAV)
    t = time.monotonic()
    msg = await nc.request(f"{prefix}.session.start", json.dumps({
        "v": 1, "session_id": "soak", "avatar_id": "demo", "audio": {"sample_rate": rate},
        "video": {"fps": fps}}).encode(), timeout=600)
    reply = json.loads(msg.data)
    assert reply["ok"], reply
    start_to_ready = time.monotonic() - t
    session = daemon.sessions["soak"]
    t_ready = time.monotonic()
    speaking = daemon.engine_host is not None
    utterances = 0
    try:
        while time.monotonic() - t_ready < minutes * 60:
            if speaking:
                await stream_pcm(nc, prefix, "soak", pcm, rate, realtime=True, seq_start=utterances * 1000)
                await nc.publish(f"{prefix}.control.soak", b'{"op":"flush"}')
                utterances += 1
            await asyncio.sleep(min(every, max(0.0, minutes * 60 - (time.monotonic() - t_ready))))
        await asyncio.sleep(1.0)
        stats = session.speech.stats() if session.speech else None
        boxes = session.speech.avatar.blend_boxes if session.speech else None
        idle = session.video.frames
        late = session.late_ticks
        await nc.request(f"{prefix}.session.stop", b'{"v":1,"session_id":"soak"}', timeout=30)
        wall = time.monotonic() - t_ready
    finally:
        await nc.close()
        await daemon.shutdown()
    return {"start_to_ready_s": round(start_to_ready, 2), "wall_s": round(wall, 1), "late_ticks": late,
            "utterances": utterances, "speech": stats,
            **_measure(Path(reply["output"]["path"]), idle, boxes, fps, wall)}


def _measure(path: Path, idle: np.ndarray, boxes: np.ndarray | None, fps: int, wall: float) -> dict[str, Any]:
    rec = read_recording(path, idle, boxes, fps)
    out: dict[str, Any] = {"frames": rec.frames, "fps_held": round(rec.frames / wall, 3),
                           "audio_s": rec.audio_s, "video_s": round(rec.frames / fps, 2)}
    if boxes is None:
        return out
    voiced = rec.voiced
    moved = np.array(rec.mouth_change) > float(np.percentile(rec.mouth_change, 20)) + 1.0
    offsets = []
    # Each utterance: the first voiced frame after a silence of at least 1 s.
    for i in range(len(voiced)):
        if voiced[i] and not voiced[max(0, i - fps):i].any():
            window = np.flatnonzero(moved[max(0, i - 3): i + 4]) + max(0, i - 3)
            if len(window):
                offsets.append(int(window[0] - i))
    out["av_offset_frames_per_utterance"] = offsets
    out["av_offset_ms_max_abs"] = max(abs(o) for o in offsets) * 1000 / fps if offsets else None
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--every", type=float, default=10, help="seconds between utterances")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--json")
    args = p.parse_args()
    settings = in_process_settings(load_settings(args.config), output={"sink": "file"})
    import uvloop

    result = uvloop.run(_soak(settings, args.minutes, args.every, args.fps))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
