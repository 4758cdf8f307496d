"""A TTS-like producer: streams a WAV into a session as s16le PCM chunks over NATS.

The manual test path beside `nats pub`, and what the demo and the tests use.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np

SEQ_HEADER = "Lipsync-Seq"
# time.time() of the send, as a decimal string: lets the daemon (and load tests) measure
# latency from the producer's own clock rather than from arrival.
SENT_HEADER = "Lipsync-Sent"


def read_wav_mono16(path: Path, rate: int | None = None) -> tuple[np.ndarray, int]:
    """int16 mono samples of a WAV (any format soundfile reads), optionally resampled."""
    import wave

    import soxr

    try:
        with wave.open(str(path), "rb") as w:
            if w.getsampwidth() != 2:
                raise wave.Error("not 16-bit")
            sr, channels = w.getframerate(), w.getnchannels()
            raw = np.frombuffer(w.readframes(w.getnframes()), "<i2").astype(np.float32) / 32768.0
        mono = raw.reshape(-1, channels).mean(axis=1)
    except wave.Error:  # not 16-bit PCM WAV: let libsndfile read it
        import soundfile as sf

        data, sr = sf.read(str(path), dtype="float32", always_2d=True)
        mono = data.mean(axis=1)
    if rate and rate != sr:
        mono = soxr.resample(mono, sr, rate)
        sr = rate
    return (np.clip(mono, -1.0, 1.0) * 32767).astype(np.int16), int(sr)


async def stream_pcm(nc, prefix: str, session_id: str, pcm: np.ndarray, rate: int, *,
                     realtime: bool, chunk_ms: int = 40, seq_start: int = 0) -> int:
    """Publish PCM in chunks with increasing Lipsync-Seq and a Lipsync-Sent stamp; paced at
    real time if asked."""
    chunk = max(1, rate * chunk_ms // 1000)
    subject = f"{prefix}.audio.{session_id}"
    t0 = time.monotonic()
    seq = seq_start
    for i, start in enumerate(range(0, len(pcm), chunk)):
        if realtime:
            due = t0 + i * chunk_ms / 1000
            delay = due - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
        await nc.publish(subject, pcm[start:start + chunk].astype("<i2").tobytes(),
                         headers={SEQ_HEADER: str(seq), SENT_HEADER: f"{time.time():.6f}"})
        seq += 1
    await nc.flush()
    return seq


def dump_chunks(pcm: np.ndarray, rate: int, chunk_ms: int, out_dir: Path) -> list[Path]:
    """Write the chunks `say` would send, one file each, as out_dir/chunk0000.pcm,
    chunk0001.pcm, ... (raw s16le mono at ``rate``; every chunk ``chunk_ms`` long but the
    last): the bodies for `nats pub <prefix>.audio.<sid>`, one message per file, in the
    order their names sort. Refuses a folder that already holds chunks, so that stale
    ones from a longer WAV are never sent after these."""
    chunk = max(1, rate * chunk_ms // 1000)
    out_dir.mkdir(parents=True, exist_ok=True)
    if any(out_dir.glob("chunk*.pcm")):
        raise FileExistsError(f"{out_dir} already holds chunk*.pcm files: use an empty folder")
    count = -(-len(pcm) // chunk)
    width = max(4, len(str(count - 1)))  # names sort in sending order
    paths = []
    for i in range(count):
        path = out_dir / f"chunk{i:0{width}d}.pcm"
        path.write_bytes(pcm[i * chunk:(i + 1) * chunk].astype("<i2").tobytes())
        paths.append(path)
    return paths


async def session_rate(nc, prefix: str, session_id: str) -> int | None:
    """The sample rate a live session expects (from the daemon's status), so that a WAV
    at another rate is resampled before it is sent; None when it cannot be asked."""
    try:
        msg = await nc.request(f"{prefix}.status", b"", timeout=3)
        for s in json.loads(msg.data).get("sessions", []):
            if s.get("session_id") == session_id:
                return int(s["sample_rate"])
    except Exception:  # no status service: send the WAV at its own rate
        return None
    return None


async def say(url: str, prefix: str, session_id: str, wav: Path, *, realtime: bool, chunk_ms: int,
              flush: bool, rate: int | None) -> int:
    import nats

    nc = await nats.connect(url, connect_timeout=2, allow_reconnect=False)
    try:
        if rate is None:
            rate = await session_rate(nc, prefix, session_id)
        pcm, sr = read_wav_mono16(wav, rate)
        finished = asyncio.Event()
        errors: list[dict] = []

        async def on_event(msg) -> None:
            ev = json.loads(msg.data)
            print(json.dumps(ev), flush=True)
            if ev.get("type") == "error":
                errors.append(ev)
            if ev.get("type") in ("playback_finished", "stopped"):
                finished.set()

        await nc.subscribe(f"{prefix}.events.{session_id}", cb=on_event)
        print(f"streaming {len(pcm) / sr:.2f}s of {sr} Hz audio to {prefix}.audio.{session_id} "
              f"in {chunk_ms} ms chunks{' at real time' if realtime else ''}", flush=True)
        await stream_pcm(nc, prefix, session_id, pcm, sr, realtime=realtime, chunk_ms=chunk_ms)
        if flush:
            await nc.publish(f"{prefix}.control.{session_id}", json.dumps({"op": "flush"}).encode())
            try:
                await asyncio.wait_for(finished.wait(), timeout=len(pcm) / sr + 30)
            except asyncio.TimeoutError:
                print("no playback_finished event within the audio's length + 30 s", flush=True)
                return 1
        return 1 if errors else 0
    finally:
        await nc.close()
