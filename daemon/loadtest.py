"""`lipsync loadtest`: capacity of one daemon on this machine's GPU.

Runs the daemon in-process on an embedded NATS server, then for each session count N:
starts N sessions on the demo avatar, has every one of them speak continuously (the
sample WAV, looped, streamed at real time from staggered start times) for a while, and
reports what the sessions published: generated vs fallback frames, audio->frame latency
p50/p95/p99 over all chunks, frame-loop lateness, GPU steps and batch sizes. Speed does
not depend on weight values: use `model.random_weights` with size "full" on a GPU.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any


from daemon.config import Settings
from daemon.inprocess import SAMPLE_WAV, in_process_settings


def run_loadtest(settings: Settings, counts: list[int], seconds: float, wav: Path | None,
                 out: Path | None) -> int:
    s = in_process_settings(settings, output={"sink": "none"}, daemon={"max_sessions": max(counts)})
    import uvloop

    results = uvloop.run(_loadtest(s, counts, seconds, wav or SAMPLE_WAV))
    print(f"{'sessions':>8} {'gen fps':>8} {'speech%':>8} {'fallback%':>9} {'lat p50':>8} {'p95':>6} "
          f"{'p99':>6} {'late ticks':>10} {'batch':>6} {'step ms':>8}")
    for r in results:
        print(f"{r['sessions']:>8} {r['generated_fps']:>8} {r['speech_pct']:>8} {r['fallback_pct']:>9} "
              f"{r['latency_ms']['p50']:>8} {r['latency_ms']['p95']:>6} {r['latency_ms']['p99']:>6} "
              f"{r['late_ticks']:>10} {r['mean_batch']:>6} {r['mean_step_ms']:>8}")
    if out is not None:
        out.write_text(json.dumps(results, indent=2))
    return 0


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    v = sorted(values)
    return round(v[min(len(v) - 1, int(q * len(v)))] * 1000, 1)


async def _loadtest(settings: Settings, counts: list[int], seconds: float, wav: Path) -> list[dict[str, Any]]:
    import nats

    from daemon.app import Daemon
    from daemon.producer import read_wav_mono16, stream_pcm

    pcm, rate = read_wav_mono16(wav, 16000)
    daemon = Daemon(settings)
    await daemon.start()
    host = daemon.engine_host
    nc = await nats.connect(daemon.nats_url)
    prefix = settings.nats.subject_prefix
    results = []
    try:
        for n in counts:
            sids = [f"load{n}-{i}" for i in range(n)]
            for sid in sids:
                msg = await nc.request(f"{prefix}.session.start", json.dumps({
                    "v": 1, "session_id": sid, "avatar_id": "demo", "audio": {"sample_rate": rate}}).encode(),
                    timeout=600)
                assert json.loads(msg.data)["ok"], msg.data
            steps0, frames0 = host.steps, host.frames_generated
            step_sum0 = _hist_sum(daemon.metrics.gpu_step_seconds)
            t0 = time.monotonic()

            async def speak(sid: str) -> None:
                await asyncio.sleep(random.uniform(0, 1.0))
                seq = 0
                while time.monotonic() - t0 < seconds:
                    seq = await stream_pcm(nc, prefix, sid, pcm, rate, realtime=True, chunk_ms=40, seq_start=seq)
                await nc.publish(f"{prefix}.control.{sid}", b'{"op": "flush"}')

            await asyncio.gather(*(speak(sid) for sid in sids))
            deadline = time.monotonic() + 30
            while any(daemon.sessions[s].speech.speaking for s in sids) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            elapsed = time.monotonic() - t0
            lat: list[float] = []
            counts_sum = {"speech": 0, "fallback": 0, "underrun": 0}
            late = 0
            for sid in sids:
                sp = daemon.sessions[sid].speech
                lat.extend(sp.latencies)
                for k in counts_sum:
                    counts_sum[k] += sp.counts[k]
                late += daemon.sessions[sid].late_ticks
            steps = host.steps - steps0
            frames = host.frames_generated - frames0
            played = counts_sum["speech"] + counts_sum["fallback"]
            results.append({
                "sessions": n, "seconds": round(elapsed, 1),
                "generated_fps": round(frames / elapsed, 1),
                "speech_pct": round(100 * counts_sum["speech"] / max(1, played), 1),
                "fallback_pct": round(100 * counts_sum["fallback"] / max(1, played), 1),
                "underruns": counts_sum["underrun"],
                "latency_ms": {"p50": _pct(lat, 0.5), "p95": _pct(lat, 0.95), "p99": _pct(lat, 0.99), "n": len(lat)},
                "late_ticks": late, "steps": steps,
                "mean_batch": round(frames / max(1, steps), 1),
                "mean_step_ms": round(1000 * (_hist_sum(daemon.metrics.gpu_step_seconds) - step_sum0) / max(1, steps), 1),
                "device": host.device_info(),
            })
            print(json.dumps(results[-1]), flush=True)
            for sid in sids:
                await nc.request(f"{prefix}.session.stop", json.dumps({"v": 1, "session_id": sid}).encode(),
                                 timeout=30)
    finally:
        await nc.close()
        await daemon.shutdown()
    return results


def _hist_sum(hist: Any) -> float:
    for metric in hist.collect():
        for sample in metric.samples:
            if sample.name.endswith("_sum"):
                return float(sample.value)
    return 0.0


