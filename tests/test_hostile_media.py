"""Video URLs and files from someone else: addresses that are not public are refused on
every hop (a real local HTTP server, which is loopback and so refused unless allowed),
remote answers are not echoed, only allowed containers and codecs are decoded, and the
decode runs in child processes with time and memory limits (real files written with
PyAV; FIFOs hold a decoder at its first read, so the tests wait on events, not clocks)."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import os
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
from aiohttp import web

from daemon import errors
from daemon.avatars import (
    AddressPolicy,
    AvatarStore,
    VideoFetcher,
    _PinnedResolver,
    decode_pool,
    decode_video,
    decode_video_isolated,
)
from daemon.config import Settings
from daemon.errors import LipsyncError
from tests.http_server import counting_server

SECRET = "SECRET-FROM-INSIDE-7f3a"


def write_video(path: Path, frames: int = 6, *, fmt: str = "mp4", codec: str = "libx264",
                pix_fmt: str = "yuv420p", size: int = 32) -> Path:
    """``frames`` frames of a moving gradient in the given container and codec."""
    with av.open(str(path), mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=Fraction(10))
        stream.width = stream.height = size
        stream.pix_fmt = pix_fmt
        for i in range(frames):
            image = np.zeros((size, size, 3), np.uint8)
            image[..., 0] = (np.arange(size) * 7 + i * 20)[None, :] % 256
            image[..., 1] = 40 * (i % 5)
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def settings(tmp_path: Path, **fetch) -> Settings:
    return Settings(daemon={"state_dir": tmp_path / "state"}, fetch=fetch)


async def raises(code: str, awaitable) -> LipsyncError:
    with pytest.raises(LipsyncError) as info:
        await awaitable
    assert info.value.code == code, info.value.message
    return info.value


# --------------------------------------------------------------------------- addresses


@pytest.mark.parametrize("address", [
    "127.0.0.1", "10.0.0.1", "172.16.5.4", "192.168.1.1", "169.254.169.254", "0.0.0.0",
    "224.0.0.1", "240.0.0.1", "100.64.0.1", "::1", "::", "fe80::1", "fc00::1", "ff02::1",
    "::ffff:127.0.0.1", "::ffff:10.0.0.1", "::ffff:169.254.169.254",
])
def test_addresses_that_are_not_public_are_refused(address):
    assert AddressPolicy([]).refusal("h.example", ipaddress.ip_address(address)) is not None


@pytest.mark.parametrize("address", ["8.8.8.8", "151.101.1.69", "2606:4700::1111"])
def test_public_addresses_pass(address):
    assert AddressPolicy([]).refusal("h.example", ipaddress.ip_address(address)) is None


def test_the_allowlist_takes_names_addresses_and_networks():
    policy = AddressPolicy(Settings(fetch={"allow_private_hosts": [
        "Media.Internal.", "10.20.0.0/16", "192.168.1.7"]}).fetch.allow_private_hosts)
    ip = ipaddress.ip_address
    assert policy.refusal("media.internal", ip("10.9.9.9")) is None
    assert policy.refusal("other.internal", ip("10.20.3.4")) is None
    assert policy.refusal("other.internal", ip("::ffff:10.20.3.4")) is None
    assert policy.refusal("other.internal", ip("192.168.1.7")) is None
    assert policy.refusal("other.internal", ip("192.168.1.8")) == "a private address"
    assert policy.refusal("other.internal", ip("127.0.0.1")) == "a loopback address"


@pytest.mark.parametrize("bad", ["http://cdn.example", "10.0.0.0/33", "cdn.example:443", " "])
def test_bad_allowlist_entries_are_config_errors(bad):
    with pytest.raises(ValueError, match="fetch.allow_private_hosts"):
        Settings(fetch={"allow_private_hosts": [bad]})


async def test_the_pinned_resolver_answers_only_checked_hosts():
    resolver = _PinnedResolver()
    resolver.pin("cdn.example", 443, [ipaddress.ip_address("151.101.1.69")])
    [answer] = await resolver.resolve("cdn.example", 443, 0)
    assert (answer["host"], answer["port"]) == ("151.101.1.69", 443)
    with pytest.raises(OSError, match="not checked"):
        await resolver.resolve("cdn.example", 8443, 0)
    with pytest.raises(OSError, match="not checked"):
        await resolver.resolve("elsewhere.example", 443, 0)


# --------------------------------------------------------------------------- fetch


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory) -> bytes:
    return write_video(tmp_path_factory.mktemp("media") / "v.mp4").read_bytes()


@pytest.fixture
async def server(video_bytes):
    """A real HTTP server on 127.0.0.1; ``hits`` counts requests per path."""
    release = asyncio.Event()

    async def video(request):
        return web.Response(body=video_bytes, content_type="video/mp4")

    async def redirect(request):
        raise web.HTTPFound(request.query["to"])

    async def leaky_error(request):
        return web.Response(status=500, reason=f"Oops {SECRET}", text=f"db password {SECRET}",
                            headers={"X-Internal": SECRET})

    async def hang(request):
        await release.wait()
        return web.Response(body=video_bytes)

    routes = {"/video.mp4": video, "/redirect": redirect, "/error": leaky_error, "/hang.mp4": hang}
    async with counting_server(routes) as (port, hits):
        yield port, hits
        release.set()


async def fetch(tmp_path: Path, url: str, **fetch_cfg):
    fetcher = VideoFetcher(settings(tmp_path, allow_http=True, **fetch_cfg))
    try:
        return await fetcher.fetch(url)
    finally:
        await fetcher.aclose()


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "[::ffff:127.0.0.1]"])
async def test_loopback_is_refused_before_connecting(tmp_path, server, host):
    port, hits = server
    err = await raises(errors.URL_NOT_ALLOWED,
                       fetch(tmp_path, f"http://{host}:{port}/video.mp4?token=abc"))
    assert "fetch.allow_private_hosts" in err.message and "loopback" in err.message
    assert "abc" not in err.message
    assert hits["/video.mp4"] == 0  # refused before any request


@pytest.mark.parametrize(("host", "allow"), [
    ("127.0.0.1", "127.0.0.1"), ("127.0.0.1", "127.0.0.0/8"), ("localhost", "localhost"),
])
async def test_allowlisted_private_hosts_are_fetched(tmp_path, server, video_bytes, host, allow):
    port, hits = server
    fetched = await fetch(tmp_path, f"http://{host}:{port}/video.mp4", allow_private_hosts=[allow])
    assert fetched.path.read_bytes() == video_bytes and hits["/video.mp4"] == 1


@pytest.mark.parametrize("target", [
    "http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/v.mp4",
    "http://[::ffff:192.168.0.1]/v.mp4", "http://0.0.0.0:{port}/video.mp4",
])
async def test_a_redirect_to_an_internal_address_is_refused(tmp_path, server, target):
    port, hits = server
    target = target.format(port=port)
    err = await raises(errors.URL_NOT_ALLOWED, fetch(
        tmp_path, f"http://127.0.0.1:{port}/redirect?to={target}",
        allow_private_hosts=["127.0.0.1"]))
    host = target.split("//")[1].split("/")[0].rsplit(":", 1)[0] if "[" not in target \
        else target.split("[")[1].split("]")[0]
    assert f"host {host} is" in err.message and "fetch.allow_private_hosts" in err.message
    assert hits["/redirect"] == 1 and hits["/video.mp4"] == 0


async def test_a_redirect_to_plain_http_needs_allow_http(tmp_path, server):
    port, _ = server
    fetcher = VideoFetcher(settings(tmp_path, allow_private_hosts=["127.0.0.1"]))
    try:
        # The first hop is http too, so it is refused as such: the hop check is the same.
        err = await raises(errors.URL_NOT_ALLOWED,
                           fetcher.fetch(f"http://127.0.0.1:{port}/video.mp4"))
    finally:
        await fetcher.aclose()
    assert "fetch.allow_http" in err.message


async def test_remote_error_answers_are_not_echoed(tmp_path, server):
    port, _ = server
    err = await raises(errors.VIDEO_FETCH_FAILED, fetch(
        tmp_path, f"http://127.0.0.1:{port}/error", allow_private_hosts=["127.0.0.1"]))
    assert "HTTP 500" in err.message and f"127.0.0.1:{port}/error" in err.message
    assert SECRET not in err.message and "Oops" not in err.message


async def test_a_start_deadline_ends_a_hung_fetch(tmp_path, server):
    port, _ = server
    store = AvatarStore(Settings(
        daemon={"state_dir": tmp_path / "state", "start_timeout_s": 0.3},
        fetch={"allow_http": True, "allow_private_hosts": ["127.0.0.1"], "timeout_s": 60},
    ))
    try:
        err = await raises(errors.VIDEO_FETCH_FAILED, store.get(f"http://127.0.0.1:{port}/hang.mp4"))
    finally:
        await store.aclose()
    assert "daemon.start_timeout_s = 0.3 s" in err.message


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize(("fmt", "codec", "pix_fmt", "named"), [
    ("avi", "mpeg4", "yuv420p", "'avi'"),
    ("mp4", "mpeg4", "yuv420p", "'mpeg4' video"),
    ("gif", "gif", "rgb8", "'gif'"),
    ("matroska", "mjpeg", "yuvj420p", "'mjpeg' video"),
])
def test_containers_and_codecs_outside_the_allowlist_are_refused(tmp_path, fmt, codec, pix_fmt,
                                                                 named):
    path = write_video(tmp_path / f"v.{fmt}", fmt=fmt, codec=codec, pix_fmt=pix_fmt)
    with pytest.raises(LipsyncError) as info:
        decode_video(path, settings(tmp_path), source="https://cdn.example/v?sig=1")
    assert info.value.code == errors.VIDEO_INVALID
    message = info.value.message
    assert named in message and "https://cdn.example/v" in message
    assert "MP4/MOV" in message or "H.264" in message


@pytest.mark.parametrize(("fmt", "codec"), [("mp4", "libx264"), ("webm", "libvpx-vp9"),
                                            ("matroska", "libx264")])
def test_allowed_containers_and_codecs_decode(tmp_path, fmt, codec):
    video = decode_video(write_video(tmp_path / f"v.{fmt}", fmt=fmt, codec=codec),
                         settings(tmp_path))
    assert video.frames.shape == (6, 32, 32, 3) and video.fps == 10.0


# --------------------------------------------------------------------------- child decode


async def feed_fifo(path: Path, data: bytes, timeout_s: float = 30.0) -> None:
    """Write ``data`` into the FIFO once a reader has opened it (a decoder is running)."""
    async with asyncio.timeout(timeout_s):
        while True:
            try:
                fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO:  # ENXIO: no reader yet
                    raise
                await asyncio.sleep(0.02)
    os.set_blocking(fd, True)

    def write() -> None:
        with os.fdopen(fd, "wb") as out:
            out.write(data)

    await asyncio.to_thread(write)


async def test_the_child_decode_equals_the_in_process_one(tmp_path):
    path = write_video(tmp_path / "v.mp4", frames=8, size=48)
    cfg = settings(tmp_path)
    here = decode_video(path, cfg)
    there = await decode_video_isolated(decode_pool(cfg), path, cfg, "https://cdn.example/v.mp4")
    assert np.array_equal(here.frames, there.frames) and there.frames.shape == (8, 48, 48, 3)
    assert (there.fps, there.width, there.height) == (here.fps, 48, 48)
    assert np.array_equal(here.i420, there.i420)
    assert not list((tmp_path / "state" / "decode").iterdir())  # the frames file is gone


async def test_child_errors_keep_their_message(tmp_path):
    path = write_video(tmp_path / "v.avi", fmt="avi", codec="mpeg4")
    cfg = settings(tmp_path)
    err = await raises(errors.VIDEO_INVALID, decode_video_isolated(decode_pool(cfg), path, cfg))
    assert "'avi'" in err.message and str(path) in err.message


async def test_a_decode_past_its_time_limit_is_killed(tmp_path):
    fifo = tmp_path / "never-written.mp4"
    os.mkfifo(fifo)  # the decoder blocks on its first read forever
    cfg = settings(tmp_path, decode_timeout_s=1.0)
    pool = decode_pool(cfg)
    err = await raises(errors.VIDEO_INVALID, decode_video_isolated(pool, fifo, cfg))
    assert "fetch.decode_timeout_s = 1 s" in err.message and pool.running == 0


async def test_a_decode_past_its_memory_limit_fails_clearly(tmp_path):
    path = write_video(tmp_path / "v.mp4")
    cfg = settings(tmp_path, decode_memory_mb=64)
    err = await raises(errors.VIDEO_INVALID, decode_video_isolated(decode_pool(cfg), path, cfg))
    assert "fetch.decode_memory_mb" in err.message and "64" in err.message


async def test_decodes_run_side_by_side(tmp_path):
    """The first decode waits on its FIFO; the second can only finish if it runs at the
    same time (with one worker it would wait for the first forever)."""
    data = write_video(tmp_path / "v.mkv", fmt="matroska").read_bytes()
    first, second = tmp_path / "first.mkv", tmp_path / "second.mkv"
    os.mkfifo(first)
    os.mkfifo(second)
    cfg = settings(tmp_path, decode_workers=2)
    pool = decode_pool(cfg)
    slow = asyncio.create_task(decode_video_isolated(pool, first, cfg))
    fast = asyncio.create_task(decode_video_isolated(pool, second, cfg))
    try:
        await feed_fifo(second, data)
        assert (await fast).num_frames == 6
        assert not slow.done()
        await feed_fifo(first, data)
        assert (await slow).num_frames == 6
    finally:
        for task in (slow, fast):
            task.cancel()
        await asyncio.gather(slow, fast, return_exceptions=True)
    assert pool.running == 0
