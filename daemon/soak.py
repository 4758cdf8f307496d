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
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

from daemon.config import Settings, load_settings
from daemon.demo import SAMPLE_WAV, _free_port
from daemon.log import configure_logging


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
    import av

    from daemon.session import pingpong_index
    from daemon.speech import SILENCE_DBFS

    change: list[float] = []
    n = 0
    with av.open(str(path)) as c:
        for n, frame in enumerate(c.decode(video=0), start=1):
            if boxes is not None:
                img = frame.to_ndarray(format="rgb24")
                i = pingpong_index(n - 1, len(idle))
                x1, y1, x2, y2 = boxes[i]
                change.append(float(np.abs(img[y1:y2, x1:x2].astype(np.int16)
                                           - idle[i][y1:y2, x1:x2].astype(np.int16)).mean()))
    with av.open(str(path)) as c:
        rate = c.streams.audio[0].rate
        audio = np.concatenate([f.to_ndarray()[0] for f in c.decode(audio=0)]).astype(np.float32)
    out: dict[str, Any] = {"frames": n, "fps_held": round(n / wall, 3), "audio_s": round(len(audio) / rate, 2),
                           "video_s": round(n / fps, 2)}
    if boxes is None:
        return out
    spf = rate // fps
    voiced = np.array([20 * math.log10(max(1e-9, float(np.sqrt(np.mean(audio[i * spf:(i + 1) * spf] ** 2)))))
                       > SILENCE_DBFS for i in range(len(audio) // spf)])
    noise = float(np.percentile(change, 20)) + 1.0
    moved = np.array(change) > noise
    offsets = []
    # Each utterance: the first voiced frame after a silence of at least 1 s.
    i, m = 0, len(voiced)
    while i < m:
        if voiced[i] and not voiced[max(0, i - fps):i].any():
            window = np.flatnonzero(moved[max(0, i - 3): i + 4]) + max(0, i - 3)
            if len(window):
                offsets.append(int(window[0] - i))
        i += 1
    out["av_offset_frames_per_utterance"] = offsets
    out["av_offset_ms_max_abs"] = max((abs(o) for o in offsets), default=None) and \
        max(abs(o) for o in offsets) * 1000 / fps
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config")
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--every", type=float, default=10, help="seconds between utterances")
    p.add_argument("--fps", type=int, default=25)
    p.add_argument("--json")
    args = p.parse_args()
    s = load_settings(args.config)
    o = s.model_dump()
    o["nats"].update(url="embedded", embedded_port=_free_port())
    o["http"]["port"] = 0
    o["output"]["sink"] = "file"
    o["logging"].update(format="console", level="WARNING")
    settings = Settings(**o)
    configure_logging("WARNING", "console")
    import uvloop

    result = uvloop.run(_soak(settings, args.minutes, args.every, args.fps))
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
