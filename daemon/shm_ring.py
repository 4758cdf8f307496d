"""A single-producer, single-consumer message ring in shared memory, with a doorbell.

The transport between the asyncio edge and a GPU-server process (docs/ARCHITECTURE.md,
"Processes"): audio, frame requests and finished boxes cross it as bytes, never pickled.
One ring carries one direction; each side owns one index:

    offset 0   head  u64  bytes ever written (only the producer writes it)
    offset 8   tail  u64  bytes ever read (only the consumer writes it)
    offset 16  capacity u64, then the data area from offset 64

A record is ``u32 length | u16 kind | u16 0 | payload``, padded to 8 bytes, laid out
contiguously: a record that would run past the end leaves a wrap marker (length
0xFFFFFFFF) and starts again at the beginning. The producer writes the payload first
and then the head; the consumer reads the head, then the payload, then moves the tail.
On x86-64 (total store order) that order is what the other process sees; nothing else
synchronises the two. Each index is read and written whole, through a native ``Q`` view
of the header (one aligned 8-byte load or store): ``struct``'s little-endian ``Q`` packs
byte by byte, and the other side could read a value half written. A tail read torn that
way looked smaller than it was, so the producer saw an empty ring as full (measured: 15
records of a 60 s loadtest wrote "0 of 16777216 bytes unread"); a torn head could have
made the consumer read past what was written.

The doorbell is an ``eventfd``: the producer bumps it after each write, the consumer
waits on it (``loop.add_reader`` on the edge, ``wait`` on a thread in the server) and
drains every record before waiting again. Both survive ``fork``/``exec`` by name (the
shared memory) and by file descriptor (``pass_fds``).
"""

from __future__ import annotations

import asyncio
import os
import platform
import select
import struct
from collections import deque
from multiprocessing import shared_memory
from typing import Callable, Iterator

HEADER = 64
# Whether this CPU keeps one core's stores in order for the others (total store order):
# the rings rely on it (module docstring). Elsewhere (aarch64, e.g. a Grace Hopper box)
# a consumer could see a record's index before its bytes, and nothing here can fence.
ORDERED_STORES = platform.machine().lower() in ("x86_64", "amd64")
RECORD = struct.Struct("<IHH")  # length (payload bytes), kind, reserved
WRAP = 0xFFFFFFFF


def _pad(n: int) -> int:
    return (n + 7) & ~7


class RingFull(Exception):
    """The consumer has not read enough for this record yet."""


class Ring:
    """One direction of a shared-memory channel. ``create`` makes it (and unlinks it
    on ``close``); ``attach`` opens one another process made, by name."""

    def __init__(self, shm: shared_memory.SharedMemory, doorbell: int, owner: bool) -> None:
        self._shm = shm
        self._buf = shm.buf
        # head, tail, capacity as native u64: whole loads and stores (module docstring).
        self._index = shm.buf[:HEADER].cast("Q")
        self.doorbell = doorbell
        self._owner = owner
        self.capacity = self._index[2]
        if self.capacity <= 0 or self.capacity % 8 or HEADER + self.capacity > shm.size:
            raise ValueError(f"shared memory {shm.name!r} holds no ring (capacity {self.capacity})")

    @classmethod
    def create(cls, capacity: int) -> "Ring":
        if capacity < 64 or capacity % 8:
            raise ValueError(f"ring capacity {capacity} must be a multiple of 8, at least 64 bytes")
        shm = shared_memory.SharedMemory(create=True, size=HEADER + capacity)
        shm.buf[:HEADER] = bytes(HEADER)
        index = shm.buf[:HEADER].cast("Q")
        index[2] = capacity
        index.release()
        doorbell = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        return cls(shm, doorbell, owner=True)

    @classmethod
    def attach(cls, name: str, doorbell: int) -> "Ring":
        # Untracked: the creator unlinks it; this process's resource tracker must not
        # (Python < 3.13 has no track=False: unregister what attaching registered).
        try:
            shm = shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
        except TypeError:
            from multiprocessing import resource_tracker

            shm = shared_memory.SharedMemory(name=name)
            resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
        return cls(shm, doorbell, owner=False)

    @property
    def name(self) -> str:
        return self._shm.name

    @property
    def max_payload(self) -> int:
        """The largest payload one record can carry."""
        return self.capacity // 2 - RECORD.size

    def _head(self) -> int:
        return self._index[0]

    def _tail(self) -> int:
        return self._index[1]

    def used(self) -> int:
        return self._head() - self._tail()

    # ---- producer ------------------------------------------------------------------------
    def write(self, kind: int, *parts: bytes | bytearray | memoryview) -> None:
        """Append one record (its payload is ``parts`` joined) and ring the doorbell.
        Raises ``RingFull`` when the consumer is behind (the caller decides: wait, drop
        or fail), ``ValueError`` for a payload no record of this ring can hold."""
        size = sum(len(p) for p in parts)
        if size > self.max_payload:
            raise ValueError(f"a {size}-byte message exceeds this ring's {self.max_payload}-byte records")
        need = _pad(RECORD.size + size)
        head, cap = self._head(), self.capacity
        at = head % cap
        skip = cap - at if at + need > cap else 0  # the wrap: this record starts at 0
        if head + skip + need - self._tail() > cap:
            raise RingFull(f"{self.used()} of {cap} bytes unread")
        buf = self._buf
        if skip:
            if skip >= RECORD.size:
                RECORD.pack_into(buf, HEADER + at, WRAP, 0, 0)
            at = 0
        RECORD.pack_into(buf, HEADER + at, size, kind, 0)
        pos = HEADER + at + RECORD.size
        for p in parts:
            n = len(p)
            buf[pos:pos + n] = p
            pos += n
        self._index[0] = head + skip + need  # publish: after the payload
        os.eventfd_write(self.doorbell, 1)

    # ---- consumer ------------------------------------------------------------------------
    def read(self) -> tuple[int, bytes] | None:
        """The next record (kind, payload copied out), or None when the ring is empty."""
        tail, head, cap = self._tail(), self._head(), self.capacity
        if tail == head:
            return None
        at = tail % cap
        if cap - at < RECORD.size:  # too short for a marker: the producer skipped it
            tail += cap - at
            at = 0
        else:
            length = RECORD.unpack_from(self._buf, HEADER + at)[0]
            if length == WRAP:
                tail += cap - at
                at = 0
        length, kind, _ = RECORD.unpack_from(self._buf, HEADER + at)
        start = HEADER + at + RECORD.size
        payload = bytes(self._buf[start:start + length])
        self._index[1] = tail + _pad(RECORD.size + length)
        return kind, payload

    def drain(self) -> Iterator[tuple[int, bytes]]:
        """Every record there now, in order (clears the doorbell first, so a write that
        lands meanwhile rings it again)."""
        try:
            os.eventfd_read(self.doorbell)
        except BlockingIOError:
            pass
        while (record := self.read()) is not None:
            yield record

    def wait(self, timeout_s: float | None) -> bool:
        """Block until the doorbell rings or ``timeout_s`` passes (a thread's wait);
        True when it rang."""
        ready, _, _ = select.select([self.doorbell], [], [], timeout_s)
        return bool(ready)

    def close(self) -> None:
        self._index.release()
        self._buf = None  # type: ignore[assignment]
        try:
            self._shm.close()
        except BufferError:  # a memoryview still held elsewhere: the mapping goes with the process
            pass
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
            os.close(self.doorbell)


class OrderedWriter:
    """One producer's records for a ring, in order, from an asyncio loop: written at once
    while the ring has room; else they wait here (copied) behind the ones already
    waiting and are retried every ``retry_s`` until the consumer has read enough. With
    ``max_bytes``, a record that would take the waiting bytes past it is dropped instead.
    ``on_drained`` is called when the last waiting record has been written."""

    def __init__(self, ring: Ring, retry_s: float = 0.002, max_bytes: int | None = None,
                 on_drained: Callable[[], None] | None = None) -> None:
        self.ring = ring
        self.retry_s = retry_s
        self.max_bytes = max_bytes
        self.on_drained = on_drained
        self._waiting: deque[tuple[int, list[bytes], int]] = deque()
        self.waiting_bytes = 0
        self._timer: asyncio.TimerHandle | None = None

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def write(self, kind: int, *parts: bytes | bytearray | memoryview) -> str:
        """"written", "waiting" (kept for a retry) or "dropped" (past ``max_bytes``)."""
        if not self._waiting:
            try:
                self.ring.write(kind, *parts)
                return "written"
            except RingFull:
                pass
        size = sum(len(p) for p in parts)
        if self.max_bytes is not None and self.waiting_bytes + size > self.max_bytes:
            return "dropped"
        self._waiting.append((kind, [bytes(p) for p in parts], size))
        self.waiting_bytes += size
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self.retry_s, self._retry)
        return "waiting"

    def _retry(self) -> None:
        self._timer = None
        while self._waiting:
            kind, parts, size = self._waiting[0]
            try:
                self.ring.write(kind, *parts)
            except RingFull:
                self._timer = asyncio.get_running_loop().call_later(self.retry_s, self._retry)
                return
            self._waiting.popleft()
            self.waiting_bytes -= size
        if self.on_drained is not None:
            self.on_drained()

    def clear(self) -> int:
        """Forgets what waits (its reader is gone); returns how many records that was."""
        n = len(self._waiting)
        self._waiting.clear()
        self.waiting_bytes = 0
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return n
