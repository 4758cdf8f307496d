"""The shared-memory ring (``daemon.shm_ring``): records in order across wrap-arounds,
back-pressure when full, and the same bytes seen by another real process, woken by the
eventfd doorbell on an asyncio loop."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import zlib
from pathlib import Path

import pytest

from daemon.shm_ring import OrderedWriter, Ring, RingFull

ROOT = Path(__file__).resolve().parent.parent


def test_records_come_out_in_order_through_many_wrap_arounds():
    ring = Ring.create(4096)
    try:
        rng = random.Random(0)
        sent: list[tuple[int, bytes]] = []
        got: list[tuple[int, bytes]] = []
        for i in range(3000):
            payload = rng.randbytes(rng.randrange(0, 900))
            while True:
                try:
                    ring.write(i % 7, payload[:10], payload[10:])  # parts are joined
                    break
                except RingFull:
                    got.extend(ring.drain())
            sent.append((i % 7, payload))
        got.extend(ring.drain())
        assert got == sent
        assert ring.used() == 0 and ring.read() is None
    finally:
        ring.close()


async def test_an_ordered_writer_keeps_what_the_ring_has_no_room_for_and_writes_it_in_order():
    ring = Ring.create(512)
    drained: list[int] = []
    writer = OrderedWriter(ring, retry_s=0.001, max_bytes=300, on_drained=lambda: drained.append(writer.waiting))
    try:
        buf = bytearray(b"\x01" * 200)
        assert writer.write(1, buf) == "written"
        assert writer.write(2, b"\x02" * 200) == "written"
        assert writer.write(3, b"\x03" * 100) == "waiting"  # the ring is full
        buf[:] = b"\x09" * 200  # the caller's buffer is reused: what waits is a copy
        assert writer.write(4, b"\x04" * 100) == "waiting"  # behind the one waiting
        assert writer.write(5, b"\x05" * 150) == "dropped"  # 200 waiting + 150 > 300
        assert (writer.waiting, writer.waiting_bytes) == (2, 200)
        got = []
        for _ in range(500):
            while (record := ring.read()) is not None:
                got.append(record)
            if len(got) == 4:
                break
            await asyncio.sleep(0.002)
        assert got == [(1, b"\x01" * 200), (2, b"\x02" * 200), (3, b"\x03" * 100), (4, b"\x04" * 100)]
        assert writer.waiting == 0 and writer.waiting_bytes == 0 and drained == [0]
        ring.write(6, bytes(200))
        ring.write(6, bytes(200))  # full again: one waits, then its reader is gone
        assert writer.write(7, bytes(100)) == "waiting" and writer.clear() == 1 and writer._timer is None
    finally:
        ring.close()


def test_a_full_ring_refuses_until_read_and_an_oversized_record_is_refused():
    ring = Ring.create(512)
    try:
        ring.write(1, bytes(200))  # 208 bytes with its header
        ring.write(2, b"\x02" * 200)
        with pytest.raises(RingFull):
            ring.write(3, bytes(100))  # 416 + 112 > 512
        assert ring.read() == (1, bytes(200))
        ring.write(3, b"\x03" * 100)  # wraps: 96 bytes left at the end are skipped
        assert ring.read() == (2, b"\x02" * 200)
        assert ring.read() == (3, b"\x03" * 100) and ring.read() is None
        with pytest.raises(ValueError, match="exceeds"):
            ring.write(3, bytes(ring.max_payload + 1))
        ring.write(4, b"")  # an empty payload is a record too
        assert ring.read() == (4, b"")
    finally:
        ring.close()


_ECHO = """
import os, sys, zlib, struct
from daemon.shm_ring import Ring, RingFull
inbox = Ring.attach(sys.argv[1], int(sys.argv[2]))
outbox = Ring.attach(sys.argv[3], int(sys.argv[4]))
done = False
while not done:
    inbox.wait(5.0)
    for kind, payload in inbox.drain():
        if kind == 99:
            done = True
            break
        reply = struct.pack("<HIQ", kind, zlib.crc32(payload), len(payload))
        while True:
            try:
                outbox.write(kind, reply)
                break
            except RingFull:
                inbox.wait(0.001)
inbox.close(); outbox.close()
"""


async def test_another_process_reads_the_same_bytes_and_answers_through_its_own_ring():
    import struct

    to_child, from_child = Ring.create(64 * 1024), Ring.create(16 * 1024)
    child = subprocess.Popen(
        [sys.executable, "-c", _ECHO, to_child.name, str(to_child.doorbell), from_child.name,
         str(from_child.doorbell)],
        pass_fds=(to_child.doorbell, from_child.doorbell), cwd=ROOT,
        env=dict(os.environ, PYTHONPATH=str(ROOT)))
    loop = asyncio.get_running_loop()
    answers: list[tuple[int, int, int]] = []
    woke = asyncio.Event()

    def on_doorbell() -> None:
        for kind, payload in from_child.drain():
            k, crc, n = struct.unpack("<HIQ", payload)
            assert k == kind
            answers.append((kind, crc, n))
        woke.set()

    loop.add_reader(from_child.doorbell, on_doorbell)
    try:
        rng = random.Random(1)
        expected = []
        for i in range(2000):
            payload = rng.randbytes(rng.randrange(0, 6000))  # many wraps of the 64 kB ring
            while True:
                try:
                    to_child.write(i % 50, payload)
                    break
                except RingFull:  # back-pressure: the child is behind
                    await asyncio.sleep(0.001)
            expected.append((i % 50, zlib.crc32(payload), len(payload)))
        while len(answers) < len(expected):
            woke.clear()
            await asyncio.wait_for(woke.wait(), timeout=30)
        assert answers == expected
        to_child.write(99)
        assert await asyncio.to_thread(child.wait, 30) == 0
    finally:
        loop.remove_reader(from_child.doorbell)
        if child.poll() is None:
            child.kill()
        to_child.close()
        from_child.close()


_READER = """
import sys
from daemon.shm_ring import Ring
ring = Ring.attach(sys.argv[1], int(sys.argv[2]))
while True:
    ring.wait(1.0)
    if any(kind == 99 for kind, _ in ring.drain()):
        break
ring.close()
"""


def test_a_ring_is_never_seen_fuller_than_it_is_while_another_process_reads():
    """The producer reads the tail while the consumer, another process, stores it: every
    store and load of an index must be whole. With ``struct``'s byte-by-byte stores the
    producer sometimes read a tail half written, smaller than before, and refused a
    record the ring had room for (2 to 28 times in 200,000 records on the development
    machine; the GPU loadtest logged an empty 16 MiB inbox as full)."""
    from daemon.shm_ring import RECORD, _pad

    ring = Ring.create(64 * 1024)
    reader = subprocess.Popen([sys.executable, "-c", _READER, ring.name, str(ring.doorbell)],
                              pass_fds=(ring.doorbell,), cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        rng = random.Random(2)
        refused_with_room = []
        written = 0
        while written < 200_000:
            size = rng.choice((40, 200, 1300, 3000))
            # The producer's own view just before the write: the tail only moves on, so a
            # record that fits now must fit in write().
            head, tail = ring._head(), ring._tail()
            need, at = _pad(RECORD.size + size), head % ring.capacity
            skip = ring.capacity - at if at + need > ring.capacity else 0
            try:
                ring.write(1, bytes(size))
                written += 1
            except RingFull:
                if head + skip + need - tail <= ring.capacity:
                    refused_with_room.append((head - tail, size))
        assert refused_with_room == []
        while True:
            try:
                ring.write(99, b"")
                break
            except RingFull:
                pass
        assert reader.wait(30) == 0
    finally:
        if reader.poll() is None:
            reader.kill()
        ring.close()


def test_on_a_cpu_without_ordered_stores_the_model_stays_in_process_and_asking_otherwise_is_refused(monkeypatch):
    """The rings rely on x86-64's store order. Elsewhere (aarch64) "auto" keeps the model
    in the daemon's process, and a config that asks for a GPU-server process is refused
    at start with what to change."""
    import daemon.shm_ring as shm_ring
    from daemon.config import Settings, uses_gpu_process
    from musetalk import models

    monkeypatch.setattr(models, "resolve_device", lambda name: __import__("torch").device("cuda"))
    auto = Settings(model={"device": "cuda"})
    assert shm_ring.ORDERED_STORES  # this machine (CI's too)
    assert uses_gpu_process(auto) and auto.gpu_process_problem() is None
    monkeypatch.setattr(shm_ring, "ORDERED_STORES", False)
    assert not uses_gpu_process(auto) and auto.gpu_process_problem() is None
    for asked in ({"gpu_process": True}, {"edge_processes": 2}):
        problem = Settings(daemon=asked).gpu_process_problem()
        assert problem is not None and "x86-64" in problem
        assert "daemon.gpu_process = false" in problem and "daemon.edge_processes = 1" in problem
    assert Settings(daemon={"gpu_process": False}).gpu_process_problem() is None
