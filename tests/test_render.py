"""`lipsync render` through the real CLI process: the mouth lands on the face, preparation
shows its progress on a terminal only, and bad inputs are one line, not a traceback.

Tiny random weights in the real formats (``--random-weights tiny``), a real face
(scikit-image's astronaut), real H.264 in and out.
"""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import wave
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from musetalk.bench import _idle_video
from musetalk.landmarks import HaarFaceDetector
from musetalk.render import ping_pong
from musetalk.video import VideoError, VideoLimits, decode_frames
from tests.media import decode_video_frames, write_color_video

SPEECH = Path(__file__).parent / "data" / "speech.wav"
# One thread each: the test machine's two cores are shared.
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def render_args(*args: str) -> list[str]:
    return [sys.executable, "-m", "daemon.cli", "--config", "/dev/null", "render", *args]


def lipsync_render(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(render_args(*args), capture_output=True, text=True, timeout=timeout, env=ENV)


def lipsync_render_on_a_terminal(*args: str, timeout: float = 300) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal, as in an interactive shell: (rc, stdout, stderr)."""
    master, slave = pty.openpty()
    # A terminal of 100 columns (a fresh pseudo-terminal has none: bars would be empty).
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))
    proc = subprocess.Popen(render_args(*args), stdout=subprocess.PIPE, stderr=slave, env=ENV)
    os.close(slave)
    received: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            received.append(data)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        stdout, _ = proc.communicate(timeout=timeout)
    finally:
        reader.join(5)
        os.close(master)
    return proc.returncode, stdout.decode(errors="replace"), b"".join(received).decode(errors="replace")


def write_video(path: Path, frames: np.ndarray, fps: int = 25) -> Path:
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "8"}  # near-lossless: the test compares pixels against it
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def speech_excerpt(path: Path, seconds: float) -> Path:
    """The first ``seconds`` of the test speech, as a WAV."""
    with wave.open(str(SPEECH)) as src:
        params = src.getparams()
        data = src.readframes(int(seconds * src.getframerate()))
    with wave.open(str(path), "wb") as dst:
        dst.setparams(params)
        dst.writeframes(data)
    return path


def test_render_puts_the_mouth_inside_the_face_box(tmp_path):
    """The pixels the render changed lie inside the face box the real detector finds in
    the input, around its mouth. Random landmark networks (what `render` used with random
    weights) put the patch on the suit's collar instead."""
    video = write_video(tmp_path / "astronaut.mp4", _idle_video(0.32, fps=25, size=384))
    audio = speech_excerpt(tmp_path / "speech.wav", 1.0)
    out = tmp_path / "talking.mp4"
    rc, stdout, stderr = lipsync_render_on_a_terminal(
        "--video", str(video), "--audio", str(audio), "--out", str(out),
        "--random-weights", "tiny", "--device", "cpu")
    assert rc == 0, stderr[-3000:]
    assert f"wrote {out}" in stdout
    # On a terminal, preparation shows a progress bar per stage.
    for stage in ("landmarks", "latents", "masks"):
        assert f"{stage}: 100%" in stderr, stderr[-3000:]

    idle, _ = decode_video_frames(video)
    rendered, fps = decode_video_frames(out)
    assert fps == 25 and len(rendered) == 25 and rendered.shape[1:] == idle.shape[1:]
    diff = np.stack([np.abs(rendered[i].astype(np.int16) - idle[ping_pong(i, len(idle))]).mean(axis=2)
                     for i in range(len(rendered))])
    # Averaged over the frames, re-encoding noise stays a few levels; the generated
    # (random-weight, so noisy) mouth differs by tens.
    changed = diff.mean(axis=0) > 20
    ys, xs = np.nonzero(changed)
    assert len(ys) > 300, f"only {len(ys)} pixels changed: the mouth was not pasted"

    face = HaarFaceDetector().detect(idle[0])
    assert face is not None
    x1, y1, x2, y2 = face
    # The jaw and chin reach a little below the detector's box, and the blend mask is
    # feathered: a quarter of the face size around the box.
    margin = 0.25 * (x2 - x1)
    outside = (xs < x1 - margin) | (xs > x2 + margin) | (ys < y1 - margin) | (ys > y2 + margin)
    assert not outside.any(), (
        f"{int(outside.sum())} of {len(ys)} changed pixels lie outside the face box {face} "
        f"(+{margin:.0f} px), e.g. at y={int(ys[outside].max())}, x={int(xs[outside][0])}")
    # ... and they are the mouth: in the lower half of the face, around its centre line.
    assert y1 + 0.5 * (y2 - y1) < ys.mean() < y2 + margin
    assert abs(xs.mean() - (x1 + x2) / 2) < 0.2 * (x2 - x1)


def test_render_without_weights_says_how_to_fetch_them(tmp_path):
    models = tmp_path / "no-models"
    run = lipsync_render("--video", "idle.mp4", "--audio", str(SPEECH), "--out", str(tmp_path / "o.mp4"),
                         "--models", str(models), timeout=60)
    assert run.returncode == 1
    assert "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    assert f"weights are not in {models}/" in line
    assert f"lipsync models download --dir {models}" in line and "--random-weights tiny" in line
    assert run.stdout == ""


def test_render_reports_a_bad_video_in_one_line(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(3000))
    run = lipsync_render("--video", str(junk), "--audio", str(SPEECH), "--out", str(tmp_path / "o.mp4"),
                         "--random-weights", "tiny", "--device", "cpu", timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    [line] = run.stderr.strip().splitlines()
    # Random bytes are now and then probed as some other format ("is a 'lrc' file;
    # accepted containers: ..."): either way one line that names the file and says why.
    assert line.startswith("lipsync render: ") and (f"{junk} is not a readable video file" in line
                                                    or f"{junk} is a " in line and "accepted containers" in line)


def test_render_without_a_face_is_one_line_and_no_bar_off_a_terminal(tmp_path):
    """Flat colours have no face: preparation stops with the detector's advice. stderr is
    a pipe here, so no progress bar is drawn into it."""
    video = tmp_path / "colors.mp4"
    write_color_video(video, 6, size=(128, 96))
    run = lipsync_render("--video", str(video), "--audio", str(SPEECH), "--out", str(tmp_path / "o.mp4"),
                         "--random-weights", "tiny", "--device", "cpu", timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr[-3000:]
    assert "lipsync render: no face found in any of the 6 frames" in run.stderr
    assert "landmarks:" not in run.stderr


def test_the_decoder_keeps_exact_rates_and_states_its_limits(tmp_path):
    """`render` and the daemon decode with musetalk.video: an NTSC rate stays exact (the
    audio windows need it), and without config names a limit is stated as a number."""
    path = tmp_path / "ntsc.mp4"
    frames = np.zeros((12, 32, 48, 3), np.uint8)
    frames[:, :, :, 1] = np.arange(12)[:, None, None] * 20
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=Fraction(30000, 1001))
        stream.width, stream.height, stream.pix_fmt = 48, 32, "yuv420p"
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    video = decode_frames(path)
    assert video.rate == Fraction(30000, 1001) and video.frames.shape == (12, 32, 48, 3)
    assert np.abs(video.frames[6, :, :, 1].astype(int) - 120).max() < 10

    with pytest.raises(VideoError) as info:
        decode_frames(path, VideoLimits(max_seconds=0.2))
    assert str(info.value) == f"{path} is longer than 0.2 s (at least 0.4 s); trim it"
    with pytest.raises(VideoError, match=r"is 48x32, larger than 40x40; scale the video down$"):
        decode_frames(path, VideoLimits(max_width=40, max_height=40))
