"""`lipsync loadtest`: its figures and SLO from frame records, the avatars it makes, and
one whole run as a real subprocess on the CPU (tiny random weights, producers in their
own processes, the livekit-local sink)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
import wave
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from daemon.config import ASSETS_DIR
from daemon.loadtest import (
    AVATAR_RECIPES,
    MIRROR_68,
    LoadtestError,
    LoadtestOptions,
    Slo,
    against_reference_flow,
    budget_line,
    fallbacks_by_budget,
    read_reference_flow,
    session_figures,
    slo_met,
    start_figures,
)
from daemon.producer import read_wav_mono16, write_wav_mono16
from daemon.speech import FrameRecord

ROOT = Path(__file__).resolve().parent.parent
FPS = 3  # the CPU run's rate
SECONDS = 14  # measured, after 2 s of warm-up
UNIT_FPS = 10  # the figures' unit tests


def records(start: float, kinds: str, latency_every: int = 4) -> list[FrameRecord]:
    """One record per letter, 1/UNIT_FPS apart: i idle, s speech (generated), f fallback,
    u underrun, q quiet speech (mouth closed: not needed). Every ``latency_every``-th
    frame holds a chunk's first sample, with a latency of 100 ms + 1 ms per frame."""
    out = []
    for i, k in enumerate(kinds):
        kind = {"i": "idle", "s": "speech", "f": "fallback", "u": "underrun", "q": "speech"}[k]
        latency = (0.1 + 0.001 * i) if i % latency_every == 0 else None
        out.append(FrameRecord(start + i / UNIT_FPS, kind, needed=k in "sf", generated=k == "s",
                               latency_s=latency))
    return out


def test_session_figures_count_only_the_window_and_generated_latencies() -> None:
    recs = records(1000.0, "ffff" + "s" * 90 + "ffqqu" + "uuuu")
    window = (1000.35, 1009.85)  # frames 4..98: leaves out the first four (warm-up) fallbacks
    captures = [50.0 + i / UNIT_FPS + (0.004 if i % 10 == 5 else 0.0) for i in range(103)]
    fig = session_figures("s1", recs, captures, window, (50.35, 59.85), UNIT_FPS)
    assert fig["session_id"] == "s1"
    assert (fig["needed"], fig["generated"], fig["fallbacks"]) == (92, 90, 2)
    assert fig["underruns"] == 1  # only the first underrun is inside the window
    assert fig["generated_pct"] == pytest.approx(100 * 90 / 92, abs=0.01)
    # Latencies of generated frames only: frames 4, 8, ..., 92 (not the quiet frame 96).
    expected = sorted(0.1 + 0.001 * i for i in range(4, 94, 4))
    assert fig["latency_ms"]["p50"] == round(expected[len(expected) // 2] * 1000, 1)
    assert fig["latency_ms"]["p99"] == round(expected[-1] * 1000, 1)
    # One capture in ten 4 ms late: intervals 104 and 96 ms around it.
    assert fig["jitter_ms_p99"] == pytest.approx(4.0, abs=0.01)
    assert session_figures("s2", recs, None, window, (0, 1), UNIT_FPS)["jitter_ms_p99"] is None


def test_late_figures_count_the_window_and_say_how_late() -> None:
    from daemon.loadtest import late_figures

    late = [(999.0, 0.5), (1000.1, 0.004), (1000.2, 0.006), (1000.3, 0.030), (1010.0, 0.5)]
    fig = late_figures(late, (1000.0, 1009.0))
    assert fig == {"count": 3, "p50_ms": 6.0, "p95_ms": 30.0, "max_ms": 30.0}
    assert late_figures([], (0.0, 1.0)) == {"count": 0, "p50_ms": None, "p95_ms": None, "max_ms": None}


def test_fallbacks_are_ranked_against_the_placement_budget() -> None:
    def sessions(pairs):
        return [{"placement": {"budget_ms": b} if b is not None else None, "fallbacks": f} for b, f in pairs]

    # Less budget, more fallbacks: a perfect negative rank order, ties ranked by their mean.
    split = fallbacks_by_budget(sessions([(79.5, 12), (79.5, 12), (81.4, 5), (84.3, 1), (None, 40)]))
    assert split == {"budget_ms": [79.5, 84.3], "rank_correlation": -1.0}
    assert budget_line(split) == ("fallbacks against the placement budget (79.5-84.3 ms): rank correlation -1.0 "
                                  "(below 0: the sessions placed with less budget lost more)")
    assert fallbacks_by_budget(sessions([(80.0, 1), (82.0, 2), (84.0, 3)]))["rank_correlation"] == 1.0
    mixed = fallbacks_by_budget(sessions([(80.0, 3), (81.0, 1), (82.0, 2), (83.0, 0)]))
    assert -1.0 < mixed["rank_correlation"] < 0
    # Nothing to rank: too few sessions, one budget for all (a fixed one), or no loss.
    assert fallbacks_by_budget(sessions([(80.0, 1), (82.0, 2)])) is None
    assert fallbacks_by_budget(sessions([(84.0, 1), (84.0, 2), (84.0, 7)])) is None
    assert fallbacks_by_budget(sessions([(80.0, 0), (82.0, 0), (84.0, 0)])) is None


def test_slo_needs_every_session_within_both_bounds() -> None:
    ok = {"generated_pct": 99.5, "latency_ms": {"p50": 100.0, "p95": 170.0, "p99": 200.0}}
    slo = Slo(generated_pct=99.0, latency_p95_ms=180.0)
    assert slo_met([ok, ok], slo)
    assert not slo_met([ok, {**ok, "generated_pct": 98.9}], slo)
    assert not slo_met([ok, {**ok, "latency_ms": {**ok["latency_ms"], "p95": 180.1}}], slo)
    # A session that needed nothing (or generated nothing) cannot pass.
    assert not slo_met([ok, {"generated_pct": None, "latency_ms": {"p50": None, "p95": None, "p99": None}}], slo)
    assert not slo_met([], slo)


def test_start_figures_measure_from_the_request() -> None:
    assert start_figures((10.0, 10.25, True), 10.3125, {"total_ms": 240.0}) == {
        "avatar_cached": True, "reply_ms": 250.0, "to_first_frame_ms": 312.5, "timings_ms": {"total_ms": 240.0}}
    # No capture kept (another sink, or the window dropped it): the first frame is unknown.
    assert start_figures((10.0, 10.5, False), None)["to_first_frame_ms"] is None


def test_options_ladder_and_errors() -> None:
    assert LoadtestOptions().ladder() == [1, 4, 8]
    assert LoadtestOptions(find_capacity=True, start=8, step=4, max_sessions=20).ladder() == [8, 12, 16, 20]
    assert LoadtestOptions(sessions=(1, 8, 12), find_capacity=True).ladder() == [1, 8, 12]
    with pytest.raises(LoadtestError, match="--chunk-ms 5 must be"):
        LoadtestOptions(chunk_ms=5).validate()
    with pytest.raises(LoadtestError, match="--sessions must be comma-separated positive"):
        LoadtestOptions(sessions=(0, 4)).validate()
    with pytest.raises(LoadtestError, match="--sink 'file'"):
        LoadtestOptions(sink="file").validate()


@pytest.mark.parametrize("name", sorted(AVATAR_RECIPES))
def test_avatar_recipes_move_landmarks_with_the_picture(name: str) -> None:
    """A dot drawn at each landmark lands, after the recipe, where the recipe's landmarks
    say: the sidecar describes the video it goes with."""
    rng = np.random.default_rng(1)
    frames = np.full((6, 256, 256, 3), 40, np.uint8)
    lms = rng.uniform(40, 216, (6, 68, 2)).astype(np.float32).round()
    for f in range(6):
        for x, y in lms[f]:
            frames[f, int(y) - 1 : int(y) + 2, int(x) - 1 : int(x) + 2] = 250
    _, recipe = AVATAR_RECIPES[name]
    out, moved = recipe(frames, lms)
    assert out.shape == frames.shape and out.dtype == np.uint8 and moved.shape == lms.shape
    assert not np.array_equal(out, frames)  # a different video
    for f in range(6):
        assert (out[f].max(axis=2) > 150).mean() < 0.05  # still sparse dots, not a bright smear
        for x, y in moved[f]:
            assert out[f, int(round(y)), int(round(x))].max() > 150, (name, f, x, y)


def test_mirrored_landmarks_keep_their_meaning() -> None:
    """Mirroring swaps the face's sides: point 36 (outer corner of the eye on the image's
    left) must again be on the left, as a landmarker would number the mirrored face."""
    assert sorted(MIRROR_68) == list(range(68))
    assert np.array_equal(MIRROR_68[MIRROR_68], np.arange(68))
    demo = np.load(ASSETS_DIR / "demo.mp4.landmarks.npy")
    _, mirrored = AVATAR_RECIPES["lt-mirror"][1](np.zeros((len(demo), 512, 512, 3), np.uint8), demo)
    for lm in (demo[0], mirrored[0]):
        assert lm[36, 0] < lm[45, 0] and lm[0, 0] < lm[16, 0] and lm[48, 0] < lm[54, 0]
    assert mirrored[0, 30, 0] == pytest.approx(511 - demo[0, 30, 0])  # the nose tip stays itself


@pytest.mark.parametrize("process", ["in-process", "gpu-server"])
def test_loadtest_runs_one_cpu_session_and_writes_the_report(tmp_path: Path, process: str) -> None:
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    env.update(PYTHONPATH=str(ROOT), LIPSYNC_MODEL__RANDOM_WEIGHTS="1",
               LIPSYNC_MODEL__RANDOM_WEIGHTS_SIZE="tiny", LIPSYNC_MODEL__DEVICE="cpu",
               LIPSYNC_MODEL__DECODE="cropped",  # the daemon's cropped-decode path, end to end
               # ...and the same measurement of a daemon whose model runs in its own process.
               LIPSYNC_DAEMON__GPU_PROCESS="1" if process == "gpu-server" else "0")
    # CPU-sized: 3 fps (the tiny model makes ~5-7 frames/s of 512x512 on one free core,
    # half that on a busy runner; a frame is 333 ms, so the latency floor is ~3 frames
    # = 1 s plus a step, not the GPU's 180 ms). Whether a shared runner meets the SLO
    # is not this test's business (speed is measured on the GPU): the report's verdict
    # must follow from its own figures, and most frames must be generated.
    run = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", "/dev/null", "loadtest", "--sessions", "1",
         "--seconds", str(SECONDS), "--warmup-s", "2", "--fps", str(FPS), "--slo-generated-pct", "95",
         "--slo-latency-ms", "2500", "--stall-dump-ms", "500", "--json", str(report_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=280,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    table = run.stdout[-3000:]  # the printed report, for any failure below

    assert set(report) == {"commit", "source_digest", "config", "card", "rows", "capacity"}
    assert report["commit"] is None or (isinstance(report["commit"], str) and len(report["commit"]) == 40)
    assert report["card"] == "cpu"
    from daemon.loadtest import source_digest

    assert report["source_digest"] == source_digest() and len(report["source_digest"]) == 16
    config = report["config"]
    assert (config["fps"], config["sink"], config["seconds"], config["warmup_s"]) == (FPS, "livekit-local", SECONDS, 2)
    assert config["model"]["random_weights"] is True and len(config["avatars"]) >= 4
    # The settings a row's figures depend on travel with the report.
    assert {"bucket_step", "batch_sizing", "batch_utilization", "fill_steps", "upsample", "decode", "audio_compile",
            "audio_round_ms"} <= set(config["model"])
    assert config["model"]["fill_steps"] is True  # the default
    [row] = report["rows"]
    assert set(row) == {"sessions", "seconds", "per_session", "generated_pct_min", "latency_p95_ms_max",
                        "cached_start_to_first_frame_ms_max", "gpu_busy", "loop_lag_p99_ms", "mean_batch",
                        "step_ms", "gpu_memory_mb", "estimates", "decode", "gpu_process", "gc", "stall_events", "stall_dumps",
                        "stall_dumps_warmup", "stages", "memory", "slo_met", "frames_per_s", "late_frames_per_s",
                        "audio_encoder", "cpu", "fallbacks_by_budget"}
    # Where the machine's CPU went in the window: this process (the edge) and the producer
    # certainly used some; a GPU server is a group of its own (with its children).
    cpu = row["cpu"]
    assert cpu["cores"] == os.cpu_count() and 0 < cpu["busy"] <= 1 and 0 <= cpu["steal"] <= cpu["busy"]
    groups = {"edge", "producers"} | ({"gpu_server", "gpu_server_children"} if process == "gpu-server" else set())
    assert set(cpu["cores_used"]) == groups
    assert cpu["cores_used"]["edge"] > 0 and cpu["cores_used"]["producers"] > 0
    if process == "gpu-server":
        assert cpu["cores_used"]["gpu_server"] > 0  # the model ran there
    # Thread by thread: the edge's loop (MainThread) is among its busy ones; the GPU server
    # appears where it is a process of its own.
    assert set(cpu["threads"]) == ({"edge", "gpu_server"} if process == "gpu-server" else {"edge"})
    assert cpu["threads"]["edge"].get("MainThread", 0) > 0, cpu["threads"]
    if process == "gpu-server":  # its Python threads by name (asked of the server)
        assert cpu["threads"]["gpu_server"].get("lipsync-gpu", 0) > 0, cpu["threads"]
    assert "CPU: " in run.stdout and "cores used: edge" in run.stdout
    # The CPU encodes eagerly: no graphs, not compiled; every round counted.
    [enc] = row["audio_encoder"].values()
    assert enc["graphs"] == 0 and enc["compiled"] is False and enc["rounds"] > 0 and enc["graph_rounds"] == 0
    assert row["sessions"] == 1 and row["seconds"] == SECONDS
    [s] = row["per_session"]
    assert set(s) == {"session_id", "needed", "generated", "generated_pct", "fallbacks", "underruns",
                      "latency_ms", "jitter_ms_p99", "placement", "clock", "start", "late_results"}
    assert s["late_results"]["count"] >= 0 and set(s["late_results"]) == {"count", "p50_ms", "p95_ms", "max_ms"}
    assert set(row["late_frames_per_s"]) == {"dropped", "done_late"}
    assert row["fallbacks_by_budget"] is None  # one session: nothing to rank
    assert all(v >= 0 for v in row["late_frames_per_s"].values())
    assert set(s["latency_ms"]) == {"p50", "p95", "p99"}
    assert isinstance(s["session_id"], str)
    for key in ("needed", "generated", "fallbacks", "underruns"):
        assert isinstance(s[key], int), key
    # Speech looped at real time for the measured seconds: most frames need the model.
    assert 0.75 * SECONDS * FPS <= s["needed"] <= SECONDS * FPS + 1, table
    assert s["generated"] <= s["needed"]
    assert isinstance(s["generated_pct"], float)
    p50, p95, p99 = (s["latency_ms"][k] for k in ("p50", "p95", "p99"))
    assert all(isinstance(v, float) for v in (p50, p95, p99)), f"no generated frame?\n{table}"
    assert 0 < p50 <= p95 <= p99
    # Captures paced by the frame clock (a figure, not an SLO: only a sanity bound here).
    assert isinstance(s["jitter_ms_p99"], float) and 0 <= s["jitter_ms_p99"] < 5 * 1000 / FPS
    assert row["generated_pct_min"] == s["generated_pct"] and row["latency_p95_ms_max"] == p95
    assert row["gpu_busy"] is None and row["gpu_memory_mb"] is None  # no NVML, no CUDA here
    assert row["memory"] == {"before_sessions_mb": None, "peak_mb": None}
    # Stage device times need CUDA events; the worker's host ms per launch is there per bucket.
    assert row["stages"] and all(b["launch_host_ms"] > 0 and "unet_ms" not in b for b in row["stages"].values())
    assert isinstance(row["loop_lag_p99_ms"], float) and row["loop_lag_p99_ms"] >= 0
    assert isinstance(row["mean_batch"], float) and row["mean_batch"] >= 1
    # Frames/s of the window: what was needed, what the model made, what was shown made;
    # one session on an idle runner is shown nearly all it made (edges of the window aside).
    rates = row["frames_per_s"]
    assert rates["needed"] > 0 and rates["generated"] > 0 and 0 < rates["shown_generated"] <= rates["needed"]
    assert rates["shown_generated"] == pytest.approx(
        sum(s["generated"] for s in row["per_session"]) / SECONDS, abs=0.1)
    assert rates["generated"] >= 0.8 * rates["shown_generated"], rates
    assert f"frames/s: needed {rates['needed']}" in table, table
    assert isinstance(row["step_ms"], float) and row["step_ms"] > 0

    # One round: its avatar was prepared by this session's start, so no cached start to report.
    assert s["start"]["avatar_cached"] is False and row["cached_start_to_first_frame_ms_max"] is None
    assert s["start"]["reply_ms"] > 0 and s["start"]["to_first_frame_ms"] > 0

    # The utterance's placement and the worker's estimates explain the latency.
    placement = s["placement"]
    assert set(placement) == {"budget_ms", "context_ms", "lead_ms", "rephase_ms", "start_in_ms", "budget_parts"}
    assert placement["budget_ms"] > 0 and placement["context_ms"] > 0
    # The budget's terms: the round wait and round, two steps of the bucket it planned for
    # (one session: a batch of one), the delivery margin.
    parts = placement["budget_parts"]
    assert parts["sessions"] == 1 and parts["bucket"] >= 1 and parts["cap"] >= 1
    assert placement["budget_ms"] == pytest.approx(
        parts["round_interval_ms"] + parts["round_ms"] + 2 * parts["step_ms"] + parts["margin_ms"]
        + parts["queue_ms"], abs=0.2)
    # The queueing term (config model.processing_budget_most_ms, 88 by default) never
    # takes the budget past that ceiling.
    assert parts["load"] > 0 and parts["queue_ms"] >= 0
    assert parts["queue_ms"] == 0 or placement["budget_ms"] <= 88.0 + 0.1
    assert f" {parts['sessions']}/{parts['bucket']}" in table, table  # the printed table's "for" column
    assert p50 >= placement["context_ms"]  # no frame before its audio context can be there
    # livekit-local keeps each frame's timestamp: speech starts on a tick moved onto its
    # due time, with no leading silence (less than a frame).
    assert placement["lead_ms"] == 0 and 0 <= placement["rephase_ms"] < 1000 / FPS
    assert s["clock"]["rephases"] == (1 if placement["rephase_ms"] else 0)
    assert s["clock"]["restarts"] >= s["clock"]["restarts_in_window"] >= 0 and s["clock"]["late_ticks"] >= 0
    # Python's collections in the window (each holds the GIL): counted, the longest timed.
    assert set(row["gc"]) == {"heap", "collections", "max_ms", "over_20ms", "long"}
    assert row["gc"]["heap"]["walked"] > 0 and row["gc"]["heap"]["frozen"] > 0  # the daemon froze its start-up
    assert row["gc"]["collections"] >= row["gc"]["over_20ms"] == len(row["gc"]["long"]) >= 0
    assert row["gc"]["max_ms"] >= 0
    # Stalls: the clock restarts grouped into events, and the stacks the loop stalled in.
    assert sum(e["sessions"] for e in row["stall_events"]) == s["clock"]["restarts_in_window"]
    assert row["stall_dumps"]["threshold_ms"] == 500 and row["stall_dumps"]["dumps"] >= 0
    # The warm-up's (every first utterance starts there) apart, with the same threshold.
    assert row["stall_dumps_warmup"]["threshold_ms"] == 500 and row["stall_dumps_warmup"]["dumps"] >= 0
    assert "garbage collections" in run.stdout
    # The session spoke through the cropped decode once its avatar's validation passed
    # (forced mode: the tiny random model's upper face moves with the audio).
    decode = row["decode"]
    assert decode["mode"] == "cropped" and decode["crop_row"] == 96
    assert decode["gflop_per_frame"]["cropped"] < decode["gflop_per_frame"]["whole"]
    [crop] = decode["avatars"].values()
    assert crop["accepted"] is True and crop["mean_abs"] >= 0, crop
    if process == "gpu-server":
        assert row["gpu_process"]["alive"] is True and row["gpu_process"]["restarts"] == 0
        assert isinstance(row["gpu_process"]["pid"], int) and row["gpu_process"]["dropped_records"] == 0
        assert 0 < row["gpu_process"]["inbox_used_max"] < 16 * 1024 * 1024
        assert row["gpu_process"]["gil_switch_ms"] == 1.0  # daemon.gil_switch_ms, in the server's process too
        assert "GPU server: restarts 0, records dropped 0" in run.stdout
        assert row["gpu_process"]["loop_lag_ms_max"] >= 0 and row["gpu_process"]["backlogged_records"] >= 0
    else:
        assert row["gpu_process"] is None
    estimates = row["estimates"]
    assert estimates["round_ms"] > 0 and estimates["step_ms"] and all(v > 0 for v in estimates["step_ms"].values())

    assert s["generated_pct"] >= 50, table
    met = s["generated_pct"] >= 95 and p95 <= 2500
    assert row["slo_met"] is met, table
    assert report["capacity"] == (1 if met else None), table
    assert f"capacity: {1 if met else '-'} sessions" in run.stdout


def test_voiced_frames_keep_only_the_frames_above_the_silence_threshold(tmp_path: Path) -> None:
    from daemon.loadtest import LoadtestError, voiced_frames, write_voiced_only
    from daemon.speech import SILENCE_DBFS

    rate, fps = 16000, 25
    spf = rate // fps
    loud = (np.sin(np.arange(spf) / 5.0) * 8000).astype(np.int16)  # about -15 dBFS
    quiet = np.full(spf, 50, np.int16)  # about -56 dBFS: the mouth stays closed
    pcm = np.concatenate([loud, quiet, quiet, loud * 2, quiet, loud, loud[:100]])  # a short tail
    out = voiced_frames(pcm, rate, fps)
    np.testing.assert_array_equal(out, np.concatenate([loud, loud * 2, loud]))
    # The bundled sample pauses between words; without its pauses no frame is silent.
    sample, sr = read_wav_mono16(ASSETS_DIR / "speech.wav", rate)
    kept = voiced_frames(sample, sr, fps)
    frames = kept.reshape(-1, spf).astype(np.float64) / 32768.0
    assert (20 * np.log10(np.sqrt((frames ** 2).mean(axis=1))) > SILENCE_DBFS).all()
    assert 0.5 * len(sample) < len(kept) < len(sample) - spf  # something was cut, most kept
    wav = write_voiced_only(ASSETS_DIR / "speech.wav", rate, fps, tmp_path)
    assert wav.parent == tmp_path.resolve()
    with wave.open(str(wav), "rb") as w:  # 16-bit mono at the producers' rate, the samples kept
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, rate)
        np.testing.assert_array_equal(np.frombuffer(w.readframes(w.getnframes()), "<i2"), kept)
    # A WAV with (almost) nothing above the threshold is refused, saying what to give.
    silent = write_wav_mono16(tmp_path / "silent.wav", np.concatenate([np.tile(quiet, 50), loud]), rate)
    with pytest.raises(LoadtestError, match="above the silence threshold.*--wav with speech"):
        write_voiced_only(silent, rate, fps, tmp_path)


def test_loadtest_voiced_only_needs_every_frame(tmp_path: Path) -> None:
    """--voiced-only: the producers loop the speech without its pauses, so a session's
    every frame in the window needs the model (the literal 'continuously speaking').
    With --reference-flow (the reference flow's real report, tiny weights on this CPU)
    each row states its frames shown generated as a multiple of the flow's."""
    from musetalk.reference_flow import run_reference_flow, write_result

    reference = tmp_path / "ref.json"
    write_result(run_reference_flow("cpu", frames=20, size="tiny"), reference)
    ref_fps = json.loads(reference.read_text())["total_frames_per_s"]
    report_path = tmp_path / "report.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    env.update(PYTHONPATH=str(ROOT), LIPSYNC_MODEL__RANDOM_WEIGHTS="1", LIPSYNC_MODEL__RANDOM_WEIGHTS_SIZE="tiny",
               LIPSYNC_MODEL__DEVICE="cpu", LIPSYNC_DAEMON__GPU_PROCESS="0")
    run = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", "/dev/null", "loadtest", "--sessions", "1",
         "--seconds", "3", "--warmup-s", "1", "--fps", "25", "--sink", "none", "--voiced-only",
         "--reference-flow", str(reference), "--json", str(report_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(report_path.read_text())
    assert report["config"]["voiced_only"] is True
    assert Path(report["config"]["wav"]).name == "loadtest-voiced.wav"
    [row] = report["rows"]
    [s] = row["per_session"]
    assert 3 * 25 - 1 <= s["needed"] <= 3 * 25 + 1, run.stdout[-3000:]
    assert report["reference_flow"]["frames_per_s"] == ref_fps and report["reference_flow"]["same_card"] is True
    assert row["vs_reference_flow"] == round(row["frames_per_s"]["shown_generated"] / ref_fps, 2)
    assert f"reference flow: {ref_fps:g} frames/s on cpu; generated frames shown in time against it: 1 sessions " \
        f"{row['vs_reference_flow']}x" in run.stdout, run.stdout[-2000:]
    silent = write_wav_mono16(tmp_path / "silent.wav", np.zeros(16000 * 2, np.int16), 16000)
    bad = subprocess.run(
        [sys.executable, "-m", "daemon.cli", "--config", "/dev/null", "loadtest", "--sessions", "1",
         "--seconds", "3", "--wav", str(silent), "--voiced-only"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert bad.returncode == 2 and "has 0.00 s above the silence threshold" in bad.stderr, bad.stderr[-2000:]


def test_a_reference_flow_report_is_read_or_refused_with_what_to_give(tmp_path: Path) -> None:
    good = tmp_path / "ref.json"
    good.write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "total_frames_per_s": 144.74,
                                "generation_frames_per_s": 146.13}))
    ref = read_reference_flow(good)
    assert ref == {"path": str(good), "frames_per_s": 144.74, "generation_frames_per_s": 146.13,
                   "device": "NVIDIA H100 80GB HBM3"}
    for text, says in [("not json", "cannot be read as JSON"), ("[1, 2]", "no total_frames_per_s above 0"),
                       (json.dumps({"total_frames_per_s": 0}), "no total_frames_per_s above 0"),
                       (json.dumps({"total_frames_per_s": True}), "no total_frames_per_s above 0")]:
        bad = tmp_path / "bad.json"
        bad.write_text(text)
        with pytest.raises(LoadtestError, match=says) as err:
            read_reference_flow(bad)
        assert "lipsync bench --reference-flow --json FILE" in str(err.value)
    with pytest.raises(LoadtestError, match="cannot be read"):
        read_reference_flow(tmp_path / "missing.json")
    # Each row against it: frames generated and shown in time a second / the flow's.
    report = {"card": "NVIDIA H100 80GB HBM3",
              "rows": [{"sessions": 24, "frames_per_s": {"shown_generated": 539.7}},
                       {"sessions": 1, "frames_per_s": None}]}
    out = against_reference_flow(report, ref)
    assert [r["vs_reference_flow"] for r in out["rows"]] == [3.73, None]
    assert out["reference_flow"]["same_card"] is True and "vs_reference_flow" not in report["rows"][0]
    assert against_reference_flow({**report, "card": "cpu"}, ref)["reference_flow"]["same_card"] is False


def test_gc_pauses_are_recorded_only_in_the_window():
    import gc

    from daemon.loadtest import GcPauses, gc_figures

    pauses = GcPauses()
    pauses.start()
    try:
        gc.collect()  # before record(): not counted
        pauses.record()
        gc.collect()
        gc.collect(0)
        taken = pauses.take()
        gc.collect()  # after take(): not counted
        assert [g for g, _, _ in taken] == [2, 0] and all(s >= 0 for _, s, _ in taken)
        assert taken[0][2] <= taken[1][2] <= time.monotonic()
        assert pauses.take() == []
    finally:
        pauses.stop()
    assert gc_figures([(2, 0.030, 101.5), (0, 0.001, 102.0)], since=100.0) == {
        "collections": 2, "max_ms": 30.0, "over_20ms": 1, "long": [[1.5, 2, 30.0]]}
    assert gc_figures([]) == {"collections": 0, "max_ms": 0.0, "over_20ms": 0, "long": []}


def test_the_heap_a_full_collection_walks_is_counted():
    import gc

    from daemon.loadtest import gc_figures, gc_heap

    gc.collect()
    before = gc_heap()
    kept = [[i] for i in range(20000)]  # lists are always tracked (a dict of ints is not)
    after = gc_heap()
    assert after["walked"] - before["walked"] >= 20000 and after["frozen"] == gc.get_freeze_count()
    assert gc_figures([], heap=after)["heap"] == after
    del kept


def test_clock_restarts_close_together_are_one_stall_event():
    from daemon.loadtest import stall_events

    restarts = {"a": [(10.00, 0.09), (12.0, 0.2)], "b": [(10.03, 0.12)], "c": [(10.05, 0.1), (15.0, 0.3)]}
    assert stall_events(restarts, since=9.0) == [
        {"t_s": 1.0, "sessions": 3, "behind_ms_max": 120.0},
        {"t_s": 3.0, "sessions": 1, "behind_ms_max": 200.0},
        {"t_s": 6.0, "sessions": 1, "behind_ms_max": 300.0},
    ]
    assert stall_events({}, since=0.0) == []


def _blocks_the_loop_for_a_while() -> None:
    time.sleep(0.25)


async def test_a_stalled_loop_leaves_the_stack_it_stalled_in(tmp_path: Path) -> None:
    from daemon.loadtest import StallDumps

    dumps = StallDumps(tmp_path / "stalls.txt", threshold_s=0.08, interval_s=0.01)
    dumps.record()
    await asyncio.sleep(0.1)  # a loop that comes back in time: no dump
    _blocks_the_loop_for_a_while()
    await asyncio.sleep(0.05)
    figures = await dumps.take()
    assert figures["dumps"] == 1 and figures["threshold_ms"] == 80.0
    [main] = [st for st in figures["stacks"] if st["thread"] == "MainThread"]
    assert main["frames"].split(" <- ")[0].endswith("in _blocks_the_loop_for_a_while") and main["dumps"] == 1


@pytest.fixture
def restored_logging():
    """prepare_settings configures logging for the run (WARNING, console): put back what
    the other tests' log captures rely on."""
    import logging
    import warnings

    import structlog

    from daemon.log import OWN_STDLIB_LOGGERS

    saved = structlog.get_config()
    root = logging.getLogger()
    handlers, level, show = list(root.handlers), root.level, warnings.showwarning
    own = {name: logging.getLogger(name).level for name in OWN_STDLIB_LOGGERS}
    yield
    structlog.configure(**saved)
    for h in list(root.handlers):
        if h not in handlers:
            root.removeHandler(h)
    root.setLevel(level)
    warnings.showwarning = show
    for name, lvl in own.items():
        logging.getLogger(name).setLevel(lvl)


def test_admission_lets_every_round_in_and_counts_other_edges_when_attached(tmp_path, restored_logging):
    from daemon.config import Settings
    from daemon.loadtest import prepare_settings

    base = {"daemon": {"state_dir": str(tmp_path), "max_sessions": 24},
            "model": {"random_weights": True, "device": "cpu"}}
    options = LoadtestOptions(sessions=(1, 12))
    alone, _ = prepare_settings(Settings(**base), options, {}, cuda=False)
    assert alone.daemon.max_sessions == 12 and alone.daemon.capacity_fps == 1e9
    # Attached to a shared GPU server, another edge's sessions count too: 24 stays.
    shared = Settings(**{**base, "daemon": {**base["daemon"], "gpu_socket": str(tmp_path / "gpu.sock")}})
    attached, _ = prepare_settings(shared, options, {}, cuda=False)
    assert attached.daemon.max_sessions == 24


def test_the_source_digest_names_the_code_by_its_content(tmp_path: Path) -> None:
    """A GPU machine's ``.git`` may be older than its files: the report also names the
    tree by the bytes of its code and config, which any change moves."""
    from daemon.loadtest import source_digest

    for rel, text in {"daemon/a.py": "x = 1\n", "musetalk/sub/b.py": "y = 2\n", "config.toml": "[model]\n",
                      "daemon/notes.md": "not code\n"}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    first = source_digest(tmp_path)
    assert len(first) == 16 and source_digest(tmp_path) == first
    (tmp_path / "daemon/notes.md").write_text("changed\n")  # not code: the same
    assert source_digest(tmp_path) == first
    (tmp_path / "musetalk/sub/b.py").write_text("y = 3\n")
    assert source_digest(tmp_path) != first
    (tmp_path / "musetalk/sub/b.py").write_text("y = 2\n")
    (tmp_path / "config.toml").write_text("[model]\nfill_steps = false\n")
    assert source_digest(tmp_path) != first


def test_cpu_figures_count_each_groups_cores_between_two_snapshots() -> None:
    from daemon.loadtest import child_pids, cpu_figures, cpu_snapshot

    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    spinner = threading.Thread(target=spin, name="spinner")
    try:
        assert sleeper.pid in child_pids(os.getpid())
        groups = {"edge": [os.getpid()], "sleeper": [sleeper.pid], "gone": [2**22 + 7]}
        a = cpu_snapshot(groups)
        spinner.start()
        time.sleep(0.3)
        figures = cpu_figures(a, cpu_snapshot(groups))
    finally:
        stop.set()
        if spinner.is_alive():
            spinner.join()
        sleeper.kill()
        sleeper.wait()
    assert figures is not None
    used = figures["cores_used"]
    assert 0.5 <= used["edge"] <= 1.3, figures  # the spinning thread, the whole span
    assert used["sleeper"] < 0.2 and used["gone"] == 0.0
    # By thread: the spinner by its Python name, the busiest; the sleeping main thread less.
    threads = figures["threads"]["edge"]
    assert next(iter(threads)) == "spinner" and threads["spinner"] >= 0.5, threads
    assert figures["cores"] == os.cpu_count() and 0 < figures["busy"] <= 1 and 0 <= figures["steal"] <= 1
    assert cpu_figures(None, a) is None and cpu_figures(a, a) is None


async def test_a_gpu_server_that_cannot_name_its_threads_leaves_the_kernels_names(capsys) -> None:
    from daemon.config import Settings
    from daemon.gpu_client import GpuServerHost
    from daemon.loadtest import _server_thread_names
    from daemon.metrics import Metrics

    host = GpuServerHost(Settings(), Metrics())  # never started: its control calls say it restarts
    assert await _server_thread_names(host) is None
    assert "the GPU server's thread names" in capsys.readouterr().err
    assert await _server_thread_names(object()) is None  # an in-process model: no server to ask


async def test_a_rounds_producers_run_before_its_sessions_start(nats_server, tmp_path: Path, monkeypatch) -> None:
    """Spawning a producer forks this process and holds its event loop until the child
    has started (34-129 ms each measured on a 2-core machine): with the sessions' clocks
    already running, the spawns restarted them ("frame loop stalled", 2-4 times a
    session on a GPU machine at 22-26 sessions). So a round spawns its producers (real
    processes, on a real NATS server) and waits for each one's "ready" before its first
    session starts, and ends them when it ends. The sessions' start, measurement and
    stop are stand-ins here: the whole round runs for real in the test above."""
    from types import SimpleNamespace

    from daemon import loadtest
    from daemon.config import Settings

    events: list[tuple[str, str]] = []
    procs: list[Any] = []
    real_spawn, real_expect = loadtest._spawn_producer, loadtest._expect_line

    async def spawn(daemon, sid, index, options):
        proc = await real_spawn(daemon, sid, index, options)
        procs.append(proc)
        events.append(("spawned", sid))
        return proc

    async def expect(daemon, proc, sid, expected, timeout):
        await real_expect(daemon, proc, sid, expected, timeout)
        events.append((expected, sid))

    async def start(nc, prefix, sid, avatar, rate, fps):
        events.append(("start", sid))
        daemon.sessions[sid] = SimpleNamespace(speech=SimpleNamespace(frame_records=[]))
        return time.monotonic(), time.monotonic()

    running: list[int | None] = []

    async def measure(daemon, nc, sids, producers, *args, **kwargs):
        running.extend(p.returncode for p in producers)
        return {"sessions": len(sids)}

    async def stop(nc, prefix, sid):
        events.append(("stop", sid))

    monkeypatch.setattr(loadtest, "_spawn_producer", spawn)
    monkeypatch.setattr(loadtest, "_expect_line", expect)
    monkeypatch.setattr(loadtest, "_start_session", start)
    monkeypatch.setattr(loadtest, "_speak_and_measure", measure)
    monkeypatch.setattr(loadtest, "_stop_session", stop)
    settings = Settings.model_validate({"daemon": {"state_dir": str(tmp_path)}})
    daemon = SimpleNamespace(settings=settings, nats_url=nats_server.url, engine_host=None, sessions={})
    opts = LoadtestOptions(sessions=(3,), seconds=1.0, warmup_s=0.0)
    row = await loadtest._round(daemon, None, 3, opts, ["demo"], 25, None, None, set())

    assert row == {"sessions": 3}
    kinds = [kind for kind, _ in events]
    assert kinds.count("spawned") == kinds.count("ready") == kinds.count("start") == 3, events
    first_start = kinds.index("start")
    assert set(kinds[:first_start]) == {"spawned", "ready"}, events  # all ready before any session
    assert running == [None, None, None]  # alive while the round measured
    assert kinds[-3:] == ["stop"] * 3
    assert len(procs) == 3 and all(p.returncode is not None for p in procs)  # ended with the round


def test_the_start_probe_reports_the_loop_around_starts_and_stops(tmp_path: Path) -> None:
    """scripts/start_probe.py (do session starts and stops hold the edge's loop while
    others play?) runs on a laptop: a real daemon with the tiny model in its own process,
    one session playing, two more started on its prepared avatar and then stopped,
    figures on one line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSYNC_")}
    env.update(LIPSYNC_MODEL__DEVICE="cpu")
    run = subprocess.run([sys.executable, str(ROOT / "scripts" / "start_probe.py"), "--first", "1", "--more", "2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    [line] = [ln for ln in run.stdout.splitlines() if ln.startswith("start_probe: ")]
    report = json.loads(line.removeprefix("start_probe: "))
    assert (report["fps"], report["first"], report["more"]) == (25, 1, 2)
    assert report["starts_s"] > 0 and 0 < report["reply_ms_max"] <= 1000 * report["starts_s"] + 1
    assert report["loop_late_ms_max_before"] >= 0 and report["loop_late_ms_max_during"] >= 0
    assert isinstance(report["first_sessions_clock_restarts"], int) and report["first_sessions_clock_restarts"] >= 0
    assert report["stall_dumps"] >= 0 and (report["stall_dumps"] == 0) == (report["stacks"] == [])
    # The stops: replied, the stopped sessions gone, the playing one still there to count.
    assert report["stops_s"] > 0 and 0 < report["stop_reply_ms_max"] <= 1000 * report["stops_s"] + 1
    assert report["stopped_sessions_left"] == 0
    assert report["loop_late_ms_max_during_stops"] >= 0
    assert isinstance(report["first_sessions_clock_restarts_stops"], int)
    assert report["first_sessions_clock_restarts_stops"] >= 0
    assert (report["stall_dumps_stops"] == 0) == (report["stacks_stops"] == [])
    bad = subprocess.run([sys.executable, str(ROOT / "scripts" / "start_probe.py"), "--more", "0"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--first and --more must be at least 1" in bad.stderr
