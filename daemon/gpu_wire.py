"""The records the edge and the GPU server exchange through their rings (``shm_ring``):
fixed little-endian headers and raw arrays, no pickling. Edge -> server: streams
opened and closed, audio, flushes, frame plans, shifts, cancels, the speaking count.
Server -> edge: finished frames (their I420 boxes) and a status every few rounds."""

from __future__ import annotations

import json
import struct
from typing import Any

import numpy as np

# Edge -> server.
OPEN, CLOSE, AUDIO, FLUSH, PLANS, SHIFT, CANCEL, SPEAKING = range(1, 9)
# Server -> edge.
RESULTS, STATUS = 20, 21

_IDX = struct.Struct("<I")
_OPEN = struct.Struct("<IH")
_UTT = struct.Struct("<II")
_SHIFT = struct.Struct("<Iid")
_CANCEL = struct.Struct("<Iii")
_SPEAKING = struct.Struct("<i")
_PLANS = struct.Struct("<IIH")
PLAN_DTYPE = np.dtype([("utterance", "<u4"), ("frame", "<u4"), ("index", "<u4"), ("blend", "<f4"),
                       ("deadline", "<f8")])
_RESULTS = struct.Struct("<IIH")
_RESULT = struct.Struct("<IIIBxHHHHH")  # utterance, frame, avatar frame, ok, x1, y1, x2, y2, message bytes


def open_stream(idx: int, fps: int, session_id: str) -> bytes:
    return _OPEN.pack(idx, fps) + session_id.encode()


def read_open(payload: bytes) -> tuple[int, int, str]:
    idx, fps = _OPEN.unpack_from(payload)
    return idx, fps, payload[_OPEN.size:].decode()


def index(idx: int) -> bytes:
    return _IDX.pack(idx)


def read_index(payload: bytes) -> int:
    return _IDX.unpack_from(payload)[0]


def audio(idx: int, utterance: int, pcm16k: np.ndarray) -> tuple[bytes, memoryview]:
    return _UTT.pack(idx, utterance), memoryview(np.ascontiguousarray(pcm16k, dtype="<f4")).cast("B")


def read_audio(payload: bytes) -> tuple[int, int, np.ndarray]:
    idx, utt = _UTT.unpack_from(payload)
    return idx, utt, np.frombuffer(payload, dtype="<f4", offset=_UTT.size).copy()


def utterance(idx: int, utt: int) -> bytes:
    return _UTT.pack(idx, utt)


def read_utterance(payload: bytes) -> tuple[int, int]:
    return _UTT.unpack_from(payload)


def plans(idx: int, avatar_key: str, plans: list[Any]) -> tuple[bytes, bytes, bytes]:
    arr = np.empty(len(plans), PLAN_DTYPE)
    for i, p in enumerate(plans):
        arr[i] = (p.utterance, p.frame, p.avatar_index, p.blend, p.deadline)
    key = avatar_key.encode()
    return _PLANS.pack(idx, len(plans), len(key)), key, arr.tobytes()


def read_plans(payload: bytes) -> tuple[int, str, np.ndarray]:
    idx, count, klen = _PLANS.unpack_from(payload)
    key = payload[_PLANS.size:_PLANS.size + klen].decode()
    arr = np.frombuffer(payload, PLAN_DTYPE, count=count, offset=_PLANS.size + klen)
    return idx, key, arr


def shift(idx: int, utt: int | None, delta_s: float) -> bytes:
    return _SHIFT.pack(idx, -1 if utt is None else utt, delta_s)


def read_shift(payload: bytes) -> tuple[int, int | None, float]:
    idx, utt, delta = _SHIFT.unpack_from(payload)
    return idx, (None if utt < 0 else utt), delta


def cancel(idx: int, utt: int | None, before: int | None) -> bytes:
    return _CANCEL.pack(idx, -1 if utt is None else utt, -1 if before is None else before)


def read_cancel(payload: bytes) -> tuple[int, int | None, int | None]:
    idx, utt, before = _CANCEL.unpack_from(payload)
    return idx, (None if utt < 0 else utt), (None if before < 0 else before)


def speaking(delta: int) -> bytes:
    return _SPEAKING.pack(delta)


def read_speaking(payload: bytes) -> int:
    return _SPEAKING.unpack_from(payload)[0]


def results(idx: int, avatar_key: str, items: list[tuple[int, int, Any, BaseException | None]]) -> list[bytes]:
    """One RESULTS record's parts: per frame its header, then its Y, U, V planes (a
    generated box) or its error's text."""
    key = avatar_key.encode()
    parts: list[bytes] = [_RESULTS.pack(idx, len(items), len(key)), key]
    for utt, frame, box, error in items:
        if error is not None or box is None:
            text = f"{type(error).__name__}: {error}".encode()[:4000] if error is not None else b"no box"
            parts.append(_RESULT.pack(utt, frame, 0, 0, 0, 0, 0, 0, len(text)))
            parts.append(text)
            continue
        parts.append(_RESULT.pack(utt, frame, box.frame_index, 1, box.x1, box.y1, box.x2, box.y2, 0))
        parts.extend((np.ascontiguousarray(box.y).tobytes(), np.ascontiguousarray(box.u).tobytes(),
                      np.ascontiguousarray(box.v).tobytes()))
    return parts


class RemoteGenerationError(RuntimeError):
    """A frame the GPU server could not generate (its text says why)."""


def read_results(payload: bytes) -> tuple[int, list[tuple[int, int, Any, BaseException | None]]]:
    from musetalk.types import GeneratedBox

    idx, count, klen = _RESULTS.unpack_from(payload)
    pos = _RESULTS.size
    key = payload[pos:pos + klen].decode()
    pos += klen
    out: list[tuple[int, int, Any, BaseException | None]] = []
    for _ in range(count):
        utt, frame, fidx, ok, x1, y1, x2, y2, mlen = _RESULT.unpack_from(payload, pos)
        pos += _RESULT.size
        if not ok:
            out.append((utt, frame, None, RemoteGenerationError(payload[pos:pos + mlen].decode(errors="replace"))))
            pos += mlen
            continue
        h, w = y2 - y1, x2 - x1
        planes = []
        for ph, pw in ((h, w), (h // 2, w // 2), (h // 2, w // 2)):
            n = ph * pw
            planes.append(np.frombuffer(payload, np.uint8, count=n, offset=pos).reshape(ph, pw))
            pos += n
        out.append((utt, frame, GeneratedBox(key, fidx, x1, y1, x2, y2, *planes), None))
    return idx, out


def status(values: dict[str, Any]) -> bytes:
    return json.dumps(values, default=str).encode()


def read_status(payload: bytes) -> dict[str, Any]:
    return json.loads(payload)
