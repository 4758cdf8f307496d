"""A local MP4 per session (H.264 yuv420p + AAC): the development and preview sink.

Frames arrive as I420, which is the encoder's own yuv420p: they are encoded as they are,
with no colour conversion. All PyAV work runs on one writer thread per session, fed through a bounded queue, so
encoding never runs on the event loop. Video frame ``i`` gets pts ``i`` (time base
1/fps) and audio is laid down by sample count on the same timeline, so sound and
picture are aligned by construction rather than by wall-clock timestamps.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import numpy as np

from daemon.errors import PUBLISHER_FAILED, LipsyncError
from daemon.frames import planes
from daemon.log import get_logger
from daemon.publishers.base import MediaFormat, Publisher, check_frame

_log = get_logger(__name__)

# The native AAC encoder only takes frames of exactly this many samples (the last may
# be shorter), so audio is re-chunked before encoding.
AAC_FRAME_SAMPLES = 1024


def even_size(width: int, height: int) -> tuple[int, int]:
    """yuv420p subsamples chroma 2x2, so H.264 needs even dimensions: odd ones grow by
    one pixel (the last row/column repeated) rather than losing a row of the picture."""
    return width + (width & 1), height + (height & 1)


def yuv420p_array(frame: np.ndarray, width: int, height: int) -> np.ndarray:
    """A flat I420 frame as the (H * 3/2, W) array PyAV's ``from_ndarray(format="yuv420p")``
    reads, at the even size. The chroma planes of an odd size are already
    ceil(W/2) x ceil(H/2), the even size's own: only the luma grows, by repeating its last
    row/column."""
    ew, eh = even_size(width, height)
    if (ew, eh) == (width, height):
        return frame.reshape(height * 3 // 2, width)
    y, u, v = planes(frame, width, height)
    y = np.pad(y, ((0, eh - height), (0, ew - width)), mode="edge")
    return np.concatenate([y.reshape(-1), u.reshape(-1), v.reshape(-1)]).reshape(eh * 3 // 2, ew)


class _Mp4Writer:
    """Owns the container; used only from the writer thread after construction."""

    def __init__(self, path: Path, fmt: MediaFormat, *, crf: int, preset: str) -> None:
        self._fmt = fmt
        self._container = av.open(str(path), mode="w", format="mp4")
        try:
            width, height = even_size(fmt.width, fmt.height)
            self._video = self._container.add_stream("libx264", rate=fmt.fps)
            self._video.width = width
            self._video.height = height
            self._video.pix_fmt = "yuv420p"
            self._video.codec_context.time_base = Fraction(1, fmt.fps)
            self._video.options = {"preset": preset, "crf": str(crf)}

            self._audio = self._container.add_stream("aac", rate=fmt.sample_rate)
            self._audio.layout = "mono"
            self._audio.codec_context.time_base = Fraction(1, fmt.sample_rate)
            # Opens both encoders now, so a setting they reject (an AAC sample rate,
            # say) fails start() instead of the first push.
            self._container.start_encoding()
        except Exception:
            self._container.close()
            raise
        self._resampler = av.AudioResampler(
            format="fltp", layout="mono", rate=fmt.sample_rate, frame_size=AAC_FRAME_SAMPLES
        )
        self.frames_written = 0
        self.samples_written = 0

    def _video_start_sample(self, frame_index: int) -> int:
        return round(frame_index * self._fmt.sample_rate / self._fmt.fps)

    def write(self, frame: np.ndarray, audio: np.ndarray) -> None:
        index = self.frames_written
        # Audio that arrives short (an idle frame with no samples, say) is filled with
        # silence up to this frame's start, so a gap never shifts later audio earlier
        # than its picture. Audio that runs long is kept and simply continues.
        gap = self._video_start_sample(index) - self.samples_written
        if gap > 0:
            self._write_audio(np.zeros(gap, dtype=np.int16))
        if audio.size:
            self._write_audio(audio)

        video_frame = av.VideoFrame.from_ndarray(
            yuv420p_array(frame, self._fmt.width, self._fmt.height), format="yuv420p"
        )
        video_frame.pts = index
        video_frame.time_base = Fraction(1, self._fmt.fps)
        for packet in self._video.encode(video_frame):
            self._container.mux(packet)
        self.frames_written += 1

    def _write_audio(self, samples: np.ndarray) -> None:
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1), format="s16", layout="mono")
        frame.sample_rate = self._fmt.sample_rate
        frame.pts = self.samples_written
        frame.time_base = Fraction(1, self._fmt.sample_rate)
        self.samples_written += samples.size
        for chunk in self._resampler.resample(frame):
            self._encode_audio(chunk)

    def _encode_audio(self, frame: av.AudioFrame | None) -> None:
        for packet in self._audio.encode(frame):
            self._container.mux(packet)

    def close(self) -> None:
        try:
            # The audio of the last frame must cover that frame's full span.
            gap = self._video_start_sample(self.frames_written) - self.samples_written
            if gap > 0:
                self._write_audio(np.zeros(gap, dtype=np.int16))
            for chunk in self._resampler.resample(None):
                self._encode_audio(chunk)
            self._encode_audio(None)
            for packet in self._video.encode(None):
                self._container.mux(packet)
        finally:
            self._container.close()


_STOP = object()


class FileSinkPublisher(Publisher):
    """Writes one session's output to ``path`` as an MP4 (odd frame sizes are padded by
    one pixel to even, repeating the last row/column)."""

    def __init__(
        self,
        path: Path,
        fmt: MediaFormat,
        session_id: str,
        *,
        queue_frames: int = 16,
        crf: int = 20,
        preset: str = "veryfast",
    ) -> None:
        self._path = Path(path)
        self._fmt = fmt
        self._queue_frames = queue_frames
        self._crf = crf
        self._preset = preset
        self._log = _log.bind(session_id=session_id, sink="file")
        self._jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._slots: asyncio.Semaphore | None = None
        self._thread: threading.Thread | None = None
        self._done: asyncio.Future[None] | None = None
        self._error: BaseException | None = None
        self._closing = False
        self.frames_pushed = 0
        self.frames_dropped = 0

    async def start(self) -> dict[str, Any]:
        if self._thread is not None:
            raise LipsyncError(PUBLISHER_FAILED, f"file sink {self._path} was already started")
        if self._closing:
            raise LipsyncError(PUBLISHER_FAILED, f"file sink {self._path} is closed")
        try:
            writer = await asyncio.to_thread(self._open_writer)
        except OSError as exc:
            raise LipsyncError(
                PUBLISHER_FAILED,
                f"cannot open recording {self._path}: {exc} "
                "(check that output.recordings_dir is writable and has space)",
            ) from None
        except (av.FFmpegError, ValueError) as exc:
            fmt = self._fmt
            raise LipsyncError(
                PUBLISHER_FAILED,
                f"cannot encode {fmt.width}x{fmt.height} at {fmt.fps} fps with "
                f"{fmt.sample_rate} Hz audio to MP4: {exc}",
            ) from None
        loop = asyncio.get_running_loop()
        self._slots = asyncio.Semaphore(self._queue_frames)
        self._done = loop.create_future()
        self._thread = threading.Thread(
            target=self._run, args=(writer, loop), name=f"filesink-{self._path.stem}", daemon=True
        )
        self._thread.start()
        self._log.info("file_sink_started", path=str(self._path), width=self._fmt.width,
                       height=self._fmt.height, fps=self._fmt.fps,
                       sample_rate=self._fmt.sample_rate)
        return {"kind": "file", "path": str(self._path)}

    def _open_writer(self) -> _Mp4Writer:
        self._path.parent.mkdir(parents=True, exist_ok=True)
        return _Mp4Writer(self._path, self._fmt, crf=self._crf, preset=self._preset)

    async def push(self, frame: np.ndarray, audio: np.ndarray,
                   timestamp_us: int | None = None) -> None:
        """``timestamp_us`` is not used: frame i is at i / fps in the file."""
        if self._slots is None or self._closing:
            raise LipsyncError(PUBLISHER_FAILED, f"file sink {self._path} is not open")
        check_frame(frame, self._fmt)
        if self._error is not None:
            self.frames_dropped += 1
            return
        # Waits only when the writer is queue_frames behind.
        await self._slots.acquire()
        if self._closing:  # aclose ran while this push waited: the writer has stopped
            self.frames_dropped += 1
            return
        # Copies: the caller may reuse its buffers once push returns.
        self._jobs.put((frame.copy(),
                        np.array(audio, dtype=np.int16).reshape(-1)))
        self.frames_pushed += 1

    async def aclose(self) -> None:
        if not self._closing:
            self._closing = True
            if self._thread is not None:
                self._jobs.put(_STOP)
        if self._done is not None:
            await asyncio.shield(self._done)

    @property
    def healthy(self) -> bool:
        thread_died = (self._thread is not None and not self._thread.is_alive()
                       and not self._closing)
        return self._error is None and not thread_died

    def _run(self, writer: _Mp4Writer, loop: asyncio.AbstractEventLoop) -> None:
        try:
            while True:
                job = self._jobs.get()
                if job is _STOP:
                    break
                if self._error is None:
                    try:
                        writer.write(*job)
                    except Exception as exc:
                        self._fail(exc)
                # Keep freeing slots after a failure so push never waits forever.
                loop.call_soon_threadsafe(self._slots.release)  # type: ignore[union-attr]
            try:
                writer.close()
            except Exception as exc:
                self._fail(exc)
            else:
                self._log.info("file_sink_closed", path=str(self._path),
                               frames=writer.frames_written,
                               audio_samples=writer.samples_written)
        finally:
            loop.call_soon_threadsafe(self._set_done)

    def _fail(self, exc: Exception) -> None:
        if self._error is None:
            self._error = exc
            self._log.error("file_sink_failed", path=str(self._path), error=repr(exc),
                            exc_info=exc)

    def _set_done(self) -> None:
        if self._done is not None and not self._done.done():
            self._done.set_result(None)
