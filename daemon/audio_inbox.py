"""Per-session audio intake: validation, Lipsync-Seq gap detection, a bounded buffer.

Called from NATS callbacks, so it only validates and enqueues (no I/O, no waiting).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

import numpy as np

from daemon import errors
from daemon.errors import LipsyncError

SEQ_HEADER = "Lipsync-Seq"
# Optional: the producer's wall-clock send time (Unix seconds), for end-to-end latency.
SENT_HEADER = "Lipsync-Sent"


@dataclass
class AudioChunk:
    pcm: np.ndarray  # int16 mono at the session's rate
    arrived: float  # monotonic seconds
    gap_fill: bool = False
    sent: float | None = None  # the producer's Lipsync-Sent (Unix seconds), when given


class AudioInbox:
    """Bounded FIFO of PCM chunks. ``max_samples`` caps what may wait unconsumed, so a
    producer faster than real time is buffered up to the cap and refused beyond it, with an
    error (never silent loss)."""

    def __init__(self, sample_rate: int, max_seconds: float, max_message_bytes: int) -> None:
        self.sample_rate = sample_rate
        self.max_samples = int(max_seconds * sample_rate)
        self.max_message_bytes = max_message_bytes
        self.max_gap_fill_samples = sample_rate // 2  # fill gaps of up to 0.5 s
        self.resync: tuple[int, int] | None = None
        self._chunks: deque[AudioChunk] = deque()
        self.buffered_samples = 0
        self.last_seq: int | None = None
        self.gap_messages = 0
        self.gap_samples = 0
        self.received_samples = 0
        self._last_chunk_samples = 0

    def accept(self, data: bytes, headers: dict[str, str] | None, now: float,
               queued_elsewhere: int = 0) -> int:
        """Validate and enqueue one message; returns the number of gap-messages filled.
        Raises LipsyncError (nothing is enqueued then)."""
        if len(data) == 0:
            raise LipsyncError(errors.AUDIO_INVALID, "empty audio message: send s16le mono PCM bytes")
        if len(data) % 2:
            raise LipsyncError(
                errors.AUDIO_INVALID,
                f"audio message has {len(data)} bytes, an odd number: PCM must be s16le "
                "(2 bytes a sample, mono); do not split a sample across messages",
            )
        if len(data) > self.max_message_bytes:
            raise LipsyncError(
                errors.AUDIO_INVALID,
                f"audio message of {len(data)} bytes is over the {self.max_message_bytes}-byte "
                "limit (nats.max_audio_message_bytes): send smaller chunks",
            )
        seq = _parse_seq(headers)
        sent = _parse_sent(headers)
        n = len(data) // 2
        gaps = 0
        if seq is not None and self.last_seq is not None:
            if seq <= self.last_seq:
                raise LipsyncError(
                    errors.AUDIO_INVALID,
                    f"{SEQ_HEADER} {seq} is not above the last one ({self.last_seq}): "
                    "duplicate or reordered audio message dropped",
                )
            gaps = seq - self.last_seq - 1
        fill = gaps * (self._last_chunk_samples or n)
        self.resync: tuple[int, int] | None = None
        if fill > self.max_gap_fill_samples:
            # Too much missing to pad (a producer restart, or seq restarted at another
            # number): continue from here without filling, and say so.
            self.resync = (self.last_seq or 0, seq or 0)
            gaps, fill = 0, 0
        waiting = self.buffered_samples + queued_elsewhere
        if waiting + n + fill > self.max_samples:
            raise LipsyncError(
                errors.AUDIO_OVERFLOW,
                f"audio buffer full: {waiting / self.sample_rate:.1f}s waiting "
                f"(audio.max_buffer_s = {self.max_samples / self.sample_rate:.0f}); this chunk "
                "was refused: send audio closer to real time or raise the limit",
            )
        if seq is not None:
            self.last_seq = seq
        if fill:
            self._chunks.append(AudioChunk(np.zeros(fill, np.int16), now, gap_fill=True))
            self.buffered_samples += fill
            self.gap_messages += gaps
            self.gap_samples += fill
        pcm = np.frombuffer(data, dtype="<i2").astype(np.int16, copy=True)
        self._chunks.append(AudioChunk(pcm, now, sent=sent))
        self.buffered_samples += n
        self.received_samples += n
        self._last_chunk_samples = n
        return gaps

    def pop_all(self) -> list[AudioChunk]:
        chunks = list(self._chunks)
        self._chunks.clear()
        self.buffered_samples = 0
        return chunks

    def clear(self) -> int:
        """Interrupt: drop what waits; the producer may restart Lipsync-Seq anywhere."""
        self.last_seq = None
        dropped = self.buffered_samples
        self._chunks.clear()
        self.buffered_samples = 0
        return dropped

    def __len__(self) -> int:
        return len(self._chunks)


def _parse_seq(headers: dict[str, str] | None) -> int | None:
    if not headers:
        return None
    raw = headers.get(SEQ_HEADER)
    if raw is None:
        return None
    try:
        seq = int(raw)
    except ValueError:
        raise LipsyncError(
            errors.AUDIO_INVALID, f"header {SEQ_HEADER} must be an integer, got {raw[:32]!r}"
        ) from None
    if seq < 0:
        raise LipsyncError(errors.AUDIO_INVALID, f"header {SEQ_HEADER} must be >= 0, got {seq}")
    return seq


def _parse_sent(headers: dict[str, str] | None) -> float | None:
    raw = headers.get(SENT_HEADER) if headers else None
    if raw is None:
        return None
    try:
        sent = float(raw)
    except ValueError:
        raise LipsyncError(
            errors.AUDIO_INVALID,
            f"header {SENT_HEADER} must be the send time in Unix seconds (e.g. 1764622800.125), "
            f"got {raw[:32]!r}",
        ) from None
    if not math.isfinite(sent) or sent <= 0:
        raise LipsyncError(errors.AUDIO_INVALID, f"header {SENT_HEADER} must be a positive Unix time, got {raw[:32]!r}")
    return sent
