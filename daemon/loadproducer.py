"""One load-test producer: a process of its own that speaks into one session like a TTS.

`lipsync loadtest` runs one per session (``python -m daemon.loadproducer``), so that
producing audio costs the daemon's process nothing and every chunk is stamped by the
producer's clock, as a real producer's would be. The exchange with the load test:

1. connect to NATS, then print ``ready``;
2. read one line from stdin, ``START END`` (Unix times);
3. from START plus this producer's own random offset (``--jitter-s``, so that sessions
   do not start speaking on the same tick) until END: stream the WAV, looped, at real
   time in ``--chunk-ms`` chunks with ``Lipsync-Seq`` and ``Lipsync-Sent`` headers;
4. send ``flush``, print one JSON line: what was sent and how late the sends were (a
   late producer would show as underruns that are not the daemon's fault).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from pathlib import Path

import numpy as np

from daemon.producer import SENT_HEADER, SEQ_HEADER, read_wav_mono16


def looped_chunks(pcm: np.ndarray, chunk: int):
    """Consecutive ``chunk``-sample slices of ``pcm`` repeated without end."""
    if len(pcm) == 0:
        raise ValueError("the speech WAV has no samples")
    position = 0
    while True:
        idx = (position + np.arange(chunk)) % len(pcm)
        position = (position + chunk) % len(pcm)
        yield pcm[idx]


async def speak(nc, prefix: str, session_id: str, pcm: np.ndarray, rate: int, chunk_ms: int,
                start_wall: float, end_wall: float) -> dict:
    """Stream from ``start_wall`` to ``end_wall`` at real time; returns the summary."""
    subject = f"{prefix}.audio.{session_id}"
    chunk_s = chunk_ms / 1000
    # Paced on the monotonic clock (no drift if the wall clock is adjusted meanwhile).
    t0 = time.monotonic() + (start_wall - time.time())
    n = int((end_wall - start_wall) / chunk_s)
    lateness: list[float] = []
    chunks = looped_chunks(pcm, max(1, rate * chunk_ms // 1000))
    for seq in range(n):
        due = t0 + seq * chunk_s
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        lateness.append(max(0.0, time.monotonic() - due))
        await nc.publish(subject, next(chunks).astype("<i2").tobytes(),
                         headers={SEQ_HEADER: str(seq), SENT_HEADER: f"{time.time():.6f}"})
    await nc.publish(f"{prefix}.control.{session_id}", json.dumps({"op": "flush"}).encode())
    await nc.flush()
    late = sorted(lateness)
    return {
        "session_id": session_id, "chunks": n, "seconds": round(n * chunk_s, 2),
        "late_p99_ms": round(late[min(len(late) - 1, int(0.99 * len(late)))] * 1000, 1) if late else None,
        "late_max_ms": round(late[-1] * 1000, 1) if late else None,
    }


async def main_async(args: argparse.Namespace) -> int:
    import nats

    pcm, rate = read_wav_mono16(Path(args.wav), args.rate)
    try:
        nc = await nats.connect(args.nats, connect_timeout=5, allow_reconnect=False)
    except Exception as exc:
        print(f"loadproducer {args.session}: cannot connect to NATS at {args.nats}: {exc}", file=sys.stderr)
        return 2
    try:
        print("ready", flush=True)
        line = await asyncio.to_thread(sys.stdin.readline)
        try:
            start_wall, end_wall = (float(v) for v in line.split())
        except ValueError:
            print(f"loadproducer {args.session}: expected 'START END' on stdin, got {line[:80]!r}",
                  file=sys.stderr)
            return 2
        start_wall += random.Random(args.seed).uniform(0.0, args.jitter_s)
        summary = await speak(nc, args.prefix, args.session, pcm, rate, args.chunk_ms,
                              start_wall, end_wall)
        print(json.dumps(summary), flush=True)
        return 0
    finally:
        await nc.close()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m daemon.loadproducer",
                                description="one load-test producer (run by `lipsync loadtest`)")
    p.add_argument("--nats", required=True, help="NATS URL")
    p.add_argument("--prefix", default="lipsync", help="subject prefix")
    p.add_argument("--session", required=True, help="session id")
    p.add_argument("--wav", required=True, help="speech WAV, looped")
    p.add_argument("--rate", type=int, required=True, help="the session's sample rate")
    p.add_argument("--chunk-ms", type=int, default=40)
    p.add_argument("--jitter-s", type=float, default=1.0, help="random start offset, 0..this")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.chunk_ms <= 0 or args.rate <= 0 or args.jitter_s < 0:
        p.error("--chunk-ms and --rate must be positive, --jitter-s at least 0")
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
