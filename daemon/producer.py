"""A TTS-like producer: streams a WAV into a session as s16le PCM chunks over NATS.

The manual test path beside `nats pub`, and what the demo and the tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from pathlib import Path
from typing import Any

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


def write_wav_mono16(path: Path, pcm: np.ndarray, rate: int) -> Path:
    """Write int16 mono samples as a 16-bit PCM WAV (what ``read_wav_mono16`` reads back)."""
    import wave

    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(pcm).astype("<i2").tobytes())
    return path


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


class SayError(Exception):
    """Why `say` cannot go on, in one line that says what to change."""


def read_speech(wav: Path, rate: int | None = None) -> tuple[np.ndarray, int]:
    """``read_wav_mono16`` for `say`: a file that is missing, unreadable, not audio or
    empty raises SayError naming the file and what is wrong with it."""
    if not wav.exists():
        raise SayError(f"{wav} does not exist: give the path of a speech WAV")
    if not wav.is_file():
        kind = "a folder" if wav.is_dir() else "not a regular file"
        raise SayError(f"{wav} is {kind}: give the path of a speech WAV")
    try:
        pcm, sr = read_wav_mono16(wav, rate)
    except OSError as exc:
        raise SayError(f"cannot read {wav}: {exc.strerror or exc}") from None
    except (EOFError, RuntimeError, ValueError) as exc:  # wave's, libsndfile's (a RuntimeError)
        reason = getattr(exc, "error_string", None) or str(exc) or "it ends before a WAV header does"
        if "does not exist" in reason:  # libsndfile's words for some files it cannot open
            reason = "libsndfile cannot open it"
        raise SayError(f"{wav} is not audio that can be read ({reason.rstrip('.')}): give a WAV file "
                       "(16-bit PCM, or any format libsndfile reads)") from None
    if not len(pcm):
        raise SayError(f"{wav} holds no samples: give a WAV with speech in it")
    return pcm, sr


async def say(nc, prefix: str, session_id: str, wav: Path, *, realtime: bool, chunk_ms: int,
              flush: bool, rate: int | None) -> int:
    """Stream ``wav`` into a session over the connected ``nc`` and, with ``flush``, wait
    for its playback_finished; print the session's events as they come. The session's
    first error event ends it at once with SayError (no audio is sent after it): a
    producer must not stream on into a session that does not exist or has failed."""
    if rate is None:
        rate = await session_rate(nc, prefix, session_id)
    pcm, sr = read_speech(wav, rate)
    finished = asyncio.Event()
    error: asyncio.Future[dict] = asyncio.get_running_loop().create_future()

    async def on_event(msg) -> None:
        try:
            ev = json.loads(msg.data)
        except ValueError:
            return
        if ev.get("type") == "error":
            if not error.done():
                error.set_result(ev)
            return
        print(json.dumps(ev), flush=True)
        if ev.get("type") in ("playback_finished", "stopped"):
            finished.set()

    await nc.subscribe(f"{prefix}.events.{session_id}", cb=on_event)
    await nc.flush()
    print(f"streaming {len(pcm) / sr:.2f}s of {sr} Hz audio to {prefix}.audio.{session_id} "
          f"in {chunk_ms} ms chunks{' at real time' if realtime else ''}", flush=True)
    await _unless_error(stream_pcm(nc, prefix, session_id, pcm, sr, realtime=realtime, chunk_ms=chunk_ms),
                        error, session_id)
    if not flush:
        return 0
    await nc.publish(f"{prefix}.control.{session_id}", json.dumps({"op": "flush"}).encode())
    wait_s = len(pcm) / sr + 30
    try:
        await _unless_error(finished.wait(), error, session_id, timeout=wait_s)
    except asyncio.TimeoutError:
        raise SayError(f"no playback_finished event for session '{session_id}' within {wait_s:.0f} s (the "
                       "audio's length + 30 s): see the daemon's log") from None
    return 0


async def _unless_error(work: Any, error: asyncio.Future, session_id: str, timeout: float | None = None) -> None:
    """Await ``work``, unless the session's error event comes first: then cancel it and
    raise SayError with that error. asyncio.TimeoutError after ``timeout`` seconds."""
    task = asyncio.ensure_future(work)
    try:
        await asyncio.wait({task, error}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    if error.done():
        ev = error.result()
        raise SayError(f"session '{session_id}': {ev.get('code')}: {ev.get('message')}")
    if task.cancelled():
        raise asyncio.TimeoutError
    task.result()
