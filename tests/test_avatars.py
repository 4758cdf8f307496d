"""Avatar sources: Firestore lookup (a real emulator), URL fetch (a real local HTTP
server), decode (real videos written with PyAV), the shared store, the demo asset."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest
import structlog
import structlog.testing
from aiohttp import web
from tests.firestore_emulator import (  # noqa: F401  (fixtures)
    EMULATOR_PROJECT,
    avatars_collection,
    firestore_emulator,
    firestore_emulator_host,
    unavailable_reason,
)
from tests.http_server import counting_server

from daemon import errors
from daemon.avatars import (
    AvatarResolver,
    AvatarStore,
    VideoFetcher,
    decode_video,
    display_url,
)
from daemon.config import ASSETS_DIR, Settings
from daemon.demo_avatar import make_demo_video
from daemon.errors import LipsyncError

PROJECT = EMULATOR_PROJECT
# The test servers listen on loopback, which video URLs may reach only when allowed.
LOCAL = ["127.0.0.1"]
RED, GREEN, BLUE = (230, 20, 20), (20, 230, 20), (20, 20, 230)


def write_video(
    path: Path, colors: list[tuple[int, int, int]], fps: int = 10, size: int = 32
) -> Path:
    """One solid-color frame per entry of ``colors``, H.264 yuv420p, like real uploads."""
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width = stream.height = size
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for color in colors:
            image = np.empty((size, size, 3), np.uint8)
            image[:] = color
            for packet in stream.encode(av.VideoFrame.from_ndarray(image, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def write_audio_only(path: Path) -> Path:
    with av.open(str(path), mode="w", format="mp4") as container:
        stream = container.add_stream("aac", rate=16000, layout="mono")
        samples = (np.sin(np.arange(16000) / 10.0) * 0.3).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(samples[None, :], format="fltp", layout="mono")
        frame.sample_rate = 16000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode(None):
            container.mux(packet)
    return path


def settings(tmp_path: Path, **sections: dict) -> Settings:
    sections.setdefault("daemon", {})
    sections["daemon"].setdefault("state_dir", tmp_path / "state")
    return Settings(**sections)


async def raises(code: str, awaitable) -> LipsyncError:
    with pytest.raises(LipsyncError) as info:
        await awaitable
    assert info.value.code == code, info.value.message
    return info.value


# --------------------------------------------------------------------------- resolver


@pytest.fixture
def emulator(avatars_collection):
    return avatars_collection


@pytest.fixture
async def resolver(tmp_path, emulator):
    resolver = AvatarResolver(settings(tmp_path, firestore={"project": PROJECT}))
    yield resolver
    await resolver.aclose()


async def test_resolver_reads_the_idle_video_url(resolver, emulator):
    emulator.document("anna").set({"idle_video_url": "https://cdn.example/anna.mp4", "x": 1})
    assert await resolver.resolve("anna", None) == "https://cdn.example/anna.mp4"
    # A second lookup reuses the client and sees updates.
    emulator.document("anna").update({"idle_video_url": "https://cdn.example/anna2.mp4"})
    assert await resolver.resolve("anna", None) == "https://cdn.example/anna2.mp4"


async def test_a_firestore_outage_starts_avatars_it_answered_before(tmp_path, monkeypatch):
    """A real emulator of its own, stopped mid-test: an avatar Firestore answered for is
    started with that URL (and a warning); one it never answered for, or answered too
    long ago (stale_ttl_s), gets firestore_unavailable."""
    if unavailable_reason() is not None:
        pytest.skip(unavailable_reason())
    from google.cloud import firestore

    fs = {"project": PROJECT, "timeout_s": 2.0}
    with firestore_emulator() as host:
        monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", host)
        client = firestore.Client(project=PROJECT)
        client.collection("avatars").document("anna").set({"idle_video_url": "https://cdn.example/a.mp4"})
        client.collection("avatars").document("ben").set({"idle_video_url": "https://cdn.example/b.mp4"})
        client.close()
        resolver = AvatarResolver(settings(tmp_path, firestore=fs))
        strict = AvatarResolver(settings(tmp_path, firestore={**fs, "stale_ttl_s": 0}))
        for r in (resolver, strict):
            assert await r.resolve("anna", None) == "https://cdn.example/a.mp4"
    # The emulator is gone now.
    try:
        with structlog.testing.capture_logs() as logs:
            assert await resolver.resolve("anna", None) == "https://cdn.example/a.mp4"
        [warning] = [e for e in logs if e["log_level"] == "warning"]
        assert warning["event"] == "Firestore unavailable; starting with the URL it gave earlier"
        assert warning["avatar_id"] == "anna" and "Firestore unavailable" in warning["error"]
        await raises(errors.FIRESTORE_UNAVAILABLE, resolver.resolve("ben", None))  # never answered
        await raises(errors.FIRESTORE_UNAVAILABLE, strict.resolve("anna", None))  # answered, too long ago
    finally:
        await resolver.aclose()
        await strict.aclose()


async def test_resolver_uses_the_configured_collection_and_field(tmp_path, emulator):
    emulator._client.collection("people").document("ben").set({"video": "asset:demo.mp4"})
    resolver = AvatarResolver(
        settings(tmp_path, firestore={"project": PROJECT, "collection": "people",
                                      "field": "video"})
    )
    try:
        assert await resolver.resolve("ben", None) == "asset:demo.mp4"
    finally:
        await resolver.aclose()


async def test_unknown_avatar(resolver):
    err = await raises(errors.UNKNOWN_AVATAR, resolver.resolve("nobody", None))
    assert err.message.startswith(
        f"avatar 'nobody' not found in Firestore (collection avatars, project {PROJECT})"
    )
    assert "firestore.collection" in err.message  # and what to change


async def test_avatar_without_the_field(resolver, emulator):
    emulator.document("nofield").set({"name": "No Field"})
    err = await raises(errors.AVATAR_NO_VIDEO, resolver.resolve("nofield", None))
    assert err.message.startswith(
        "avatar 'nofield' has no idle_video_url in Firestore (collection avatars"
    )


@pytest.mark.parametrize("value", [42, "", "   ", None, ["https://x/y.mp4"]])
async def test_avatar_field_of_the_wrong_type(resolver, emulator, value):
    emulator.document("wrongtype").set({"idle_video_url": value})
    err = await raises(errors.AVATAR_NO_VIDEO, resolver.resolve("wrongtype", None))
    assert "non-empty string" in err.message


async def test_invalid_document_id_is_refused(resolver):
    await raises(errors.INVALID_MESSAGE, resolver.resolve("a/b", None))


@pytest.fixture
def silent_port():
    """A port that accepts TCP connections and never answers (a hung server)."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # the kernel completes handshakes; nothing ever reads
        yield listener.getsockname()[1]


@pytest.mark.parametrize("kind", ["closed", "silent"])
async def test_firestore_unreachable_fails_within_the_timeout(
    tmp_path, monkeypatch, silent_port, kind
):
    if kind == "closed":
        with socket.socket() as s:  # a port that was free a moment ago: nothing listens
            s.bind(("127.0.0.1", 0))
            host = f"127.0.0.1:{s.getsockname()[1]}"
    else:
        host = f"127.0.0.1:{silent_port}"
    monkeypatch.setenv("FIRESTORE_EMULATOR_HOST", host)
    resolver = AvatarResolver(
        settings(tmp_path, firestore={"project": PROJECT, "timeout_s": 1.0})
    )
    started = time.monotonic()
    try:
        err = await raises(errors.FIRESTORE_UNAVAILABLE, resolver.resolve("anna", None))
    finally:
        await resolver.aclose()
    assert time.monotonic() - started < 2.5
    assert PROJECT in err.message and host in err.message


async def test_bad_credentials_file_is_named_but_never_printed(tmp_path, monkeypatch):
    monkeypatch.delenv("FIRESTORE_EMULATOR_HOST", raising=False)
    creds = tmp_path / "sa.json"
    creds.write_text('{"type": "service_account", "private_key": "SECRET-KEY-MATERIAL"}')
    resolver = AvatarResolver(
        settings(tmp_path, firestore={"project": PROJECT, "credentials_file": creds})
    )
    err = await raises(errors.FIRESTORE_UNAVAILABLE, resolver.resolve("anna", None))
    assert str(creds) in err.message and "SECRET" not in err.message


async def test_config_table_mode(tmp_path):
    resolver = AvatarResolver(
        settings(tmp_path, avatars={"anna": {"idle_video_url": "https://cdn.example/a.mp4"}})
    )
    assert await resolver.resolve("anna", None) == "https://cdn.example/a.mp4"
    err = await raises(errors.UNKNOWN_AVATAR, resolver.resolve("bob", None))
    assert "avatar 'bob' not found in the config table [avatars]" in err.message and "anna" not in err.message
    assert await AvatarResolver(settings(tmp_path)).resolve("demo", None) == "asset:demo.mp4"


async def test_explicit_url_and_bad_requests(tmp_path):
    resolver = AvatarResolver(settings(tmp_path))
    assert await resolver.resolve(None, "https://x.example/v.mp4") == "https://x.example/v.mp4"
    await raises(errors.INVALID_MESSAGE, resolver.resolve(None, None))
    await raises(errors.INVALID_MESSAGE, resolver.resolve("demo", "https://x/v.mp4"))


# --------------------------------------------------------------------------- fetcher


@pytest.fixture(scope="module")
def video_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("media") / "rgb.mp4"
    return write_video(path, [RED] * 5 + [GREEN] * 5 + [BLUE] * 5).read_bytes()


@pytest.fixture
async def server(video_bytes):
    """A real HTTP server on 127.0.0.1; ``hits`` counts requests per path."""
    async def video(request):
        return web.Response(body=video_bytes, content_type="video/mp4")

    async def big(request):
        return web.Response(body=b"\0" * 5000)

    async def big_streamed(request):  # chunked: no Content-Length to check up front
        resp = web.StreamResponse()
        await resp.prepare(request)
        for _ in range(10):
            await resp.write(b"\0" * 1000)
        await resp.write_eof()
        return resp

    async def redirect(request):
        n = int(request.match_info["n"])
        raise web.HTTPFound(f"/redirect/{n - 1}" if n > 0 else "/video.mp4")

    async def text(request):
        return web.Response(text="this is not a video\n" * 100)

    routes = {"/video.mp4": video, "/copy.mp4": video, "/big.bin": big, "/big-streamed.bin": big_streamed,
              "/redirect/{n}": redirect, "/notes.txt": text}
    async with counting_server(routes) as (port, hits):
        yield f"http://127.0.0.1:{port}", hits


@pytest.fixture
async def fetcher(tmp_path):
    fetcher = VideoFetcher(
        settings(tmp_path, fetch={"allow_http": True, "allow_private_hosts": LOCAL, "max_bytes": 4096, "max_redirects": 2})
    )
    yield fetcher
    await fetcher.aclose()


async def test_download_is_cached_by_url(server, fetcher, video_bytes, tmp_path):
    base, hits = server
    first = await fetcher.fetch(f"{base}/video.mp4")
    assert first.path.read_bytes() == video_bytes
    assert first.path.parent == tmp_path / "state" / "downloads"
    second = await fetcher.fetch(f"{base}/video.mp4")
    assert hits["/video.mp4"] == 1
    assert second == first
    # Same bytes under another URL (a rotated signed URL): another download, one copy.
    other = await fetcher.fetch(f"{base}/copy.mp4")
    assert other.content_hash == first.content_hash and other.path == first.path
    assert len(list(first.path.parent.glob("*.video"))) == 1
    assert not list(first.path.parent.glob(".*.part"))  # no temp file left behind


async def test_the_download_cache_keeps_to_its_size_least_recently_used_first(server, video_bytes, tmp_path):
    base, hits = server
    fetcher = VideoFetcher(settings(tmp_path, fetch={"allow_http": True, "allow_private_hosts": LOCAL,
                                                     "cache_max_bytes": len(video_bytes) + 100}))
    try:
        video = await fetcher.fetch(f"{base}/video.mp4")
        notes = await fetcher.fetch(f"{base}/notes.txt")
        # Over budget, but the video was used a moment ago (a decoder may hold it): kept.
        assert video.path.exists() and notes.path.exists()
        hour_ago = time.time() - 3600
        os.utime(video.path, (hour_ago, hour_ago))
        await fetcher.fetch(f"{base}/copy.mp4")  # the video's content again: used now
        os.utime(notes.path, (hour_ago, hour_ago))
        os.utime(video.path, (hour_ago + 1, hour_ago + 1))  # ...but notes is older
        again = await fetcher.fetch(f"{base}/redirect/0")  # a new URL of the video: evicts notes
        assert again.path == video.path and video.path.exists() and not notes.path.exists()
        assert await fetcher.fetch(f"{base}/notes.txt") == notes  # downloaded again
        assert hits["/notes.txt"] == 2
    finally:
        await fetcher.aclose()


def test_partial_downloads_a_crash_left_are_swept_at_start(tmp_path):
    downloads = tmp_path / "state" / "downloads"
    downloads.mkdir(parents=True)
    stale, live = downloads / ".abc.123.part", downloads / ".def.456.part"
    stale.write_bytes(b"x")
    live.write_bytes(b"y")
    day_ago = time.time() - 86400
    os.utime(stale, (day_ago, day_ago))
    VideoFetcher(settings(tmp_path))
    assert not stale.exists() and live.exists()  # a young one may be another daemon's


async def test_concurrent_fetches_of_one_url_download_once(server, fetcher):
    base, hits = server
    results = await asyncio.gather(*(fetcher.fetch(f"{base}/video.mp4") for _ in range(4)))
    assert hits["/video.mp4"] == 1 and len({r.path for r in results}) == 1


async def test_http_status_is_reported(server, fetcher):
    base, _ = server
    err = await raises(errors.VIDEO_FETCH_FAILED, fetcher.fetch(f"{base}/missing.mp4"))
    assert "HTTP 404" in err.message


@pytest.mark.parametrize("path", ["/big.bin", "/big-streamed.bin"])
async def test_too_large(server, fetcher, path):
    base, _ = server
    err = await raises(errors.VIDEO_TOO_LARGE, fetcher.fetch(f"{base}{path}"))
    assert "4096 bytes" in err.message and "fetch.max_bytes" in err.message
    assert not list(fetcher.cache_dir.iterdir())  # the partial file is gone


async def test_redirects_are_followed_up_to_the_cap(server, fetcher, video_bytes):
    base, hits = server
    ok = await fetcher.fetch(f"{base}/redirect/1")  # 2 redirects: at the cap
    assert ok.path.read_bytes() == video_bytes
    err = await raises(errors.VIDEO_FETCH_FAILED, fetcher.fetch(f"{base}/redirect/5"))
    assert "fetch.max_redirects" in err.message
    assert hits["/redirect/3"] == 1 and hits["/redirect/2"] == 0  # stopped at the cap


async def test_network_error(fetcher):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    err = await raises(errors.VIDEO_FETCH_FAILED, fetcher.fetch(f"http://127.0.0.1:{port}/v.mp4"))
    assert f"127.0.0.1:{port}" in err.message


async def test_hung_server_times_out(tmp_path, silent_port):
    fetcher = VideoFetcher(settings(tmp_path, fetch={"allow_http": True, "allow_private_hosts": LOCAL, "timeout_s": 0.5}))
    started = time.monotonic()
    try:
        err = await raises(
            errors.VIDEO_FETCH_FAILED, fetcher.fetch(f"http://127.0.0.1:{silent_port}/v.mp4")
        )
    finally:
        await fetcher.aclose()
    assert time.monotonic() - started < 2.0 and "fetch.timeout_s" in err.message


async def test_http_needs_the_setting_and_secrets_stay_out_of_messages(tmp_path):
    fetcher = VideoFetcher(settings(tmp_path))
    err = await raises(
        errors.URL_NOT_ALLOWED, fetcher.fetch("http://user:pw@cdn.example/v.mp4?token=abc")
    )
    assert "fetch.allow_http" in err.message
    assert "pw" not in err.message and "abc" not in err.message
    await raises(errors.URL_NOT_ALLOWED, fetcher.fetch("ftp://cdn.example/v.mp4"))
    await raises(errors.URL_NOT_ALLOWED, fetcher.fetch("/etc/passwd"))
    assert display_url("https://h.example/a.mp4?sig=1") == "https://h.example/a.mp4?..."


async def test_file_urls_need_the_setting(tmp_path, video_bytes):
    path = tmp_path / "local video.mp4"
    path.write_bytes(video_bytes)
    url = path.as_uri()
    err = await raises(errors.URL_NOT_ALLOWED, VideoFetcher(settings(tmp_path)).fetch(url))
    assert "fetch.allow_file_urls" in err.message
    allowed = VideoFetcher(settings(tmp_path, fetch={"allow_file_urls": True}))
    fetched = await allowed.fetch(url)
    assert fetched.path == path and len(fetched.content_hash) == 64
    await raises(errors.VIDEO_FETCH_FAILED, allowed.fetch((tmp_path / "none.mp4").as_uri()))


async def test_assets(tmp_path):
    fetcher = VideoFetcher(settings(tmp_path))
    demo = await fetcher.fetch("asset:demo.mp4")
    assert demo.path == (ASSETS_DIR / "demo.mp4").resolve()
    for bad in ("asset:../config.py", "asset:..", "asset:", "asset:sub/x.mp4", "asset:/etc/passwd"):
        await raises(errors.URL_NOT_ALLOWED, fetcher.fetch(bad))
    await raises(errors.VIDEO_FETCH_FAILED, fetcher.fetch("asset:missing.mp4"))


# --------------------------------------------------------------------------- decode


def test_decode_frames_and_colors(tmp_path):
    path = write_video(tmp_path / "rgb.mp4", [RED] * 4 + [GREEN] * 4 + [BLUE] * 4, size=48)
    video = decode_video(path, settings(tmp_path))
    assert video.frames.shape == (12, 48, 48, 3) and video.frames.dtype == np.uint8
    assert (video.fps, video.width, video.height) == (10.0, 48, 48)
    assert video.duration_s == pytest.approx(1.2)
    for index, color in ((1, RED), (5, GREEN), (10, BLUE)):
        mean = video.frames[index].reshape(-1, 3).mean(axis=0)
        assert np.abs(mean - color).max() < 12, (index, mean)


def test_decode_rejects_what_is_not_a_video(tmp_path):
    junk = tmp_path / "junk.mp4"
    junk.write_bytes(os.urandom(4000))
    with pytest.raises(LipsyncError) as info:
        decode_video(junk, settings(tmp_path), source="https://cdn.example/junk.mp4?sig=s3cret")
    assert info.value.code == errors.VIDEO_INVALID
    assert "https://cdn.example/junk.mp4" in info.value.message
    assert "s3cret" not in info.value.message

    audio = write_audio_only(tmp_path / "speech.m4a")
    with pytest.raises(LipsyncError) as info:
        decode_video(audio, settings(tmp_path))
    assert info.value.code == errors.VIDEO_INVALID
    assert "no video stream (found: audio)" in info.value.message


@pytest.mark.parametrize(
    ("overrides", "frames", "expected"),
    [
        ({"fetch": {"max_video_s": 0.5}}, 20, "fetch.max_video_s"),
        ({"fetch": {"min_video_s": 3.0}}, 10, "fetch.min_video_s"),
        ({"fetch": {"max_frames_in_memory": 6}}, 10, "fetch.max_frames_in_memory"),
        ({"video": {"max_width": 16}}, 5, "video.max_width"),
    ],
)
def test_decode_limits(tmp_path, overrides, frames, expected):
    path = write_video(tmp_path / "v.mp4", [GREEN] * frames)
    with pytest.raises(LipsyncError) as info:
        decode_video(path, settings(tmp_path, **overrides))
    assert info.value.code == errors.VIDEO_INVALID and expected in info.value.message


def test_demo_asset_is_512_square_at_25_fps(tmp_path):
    asset = ASSETS_DIR / "demo.mp4"
    assert asset.stat().st_size < 1_500_000
    video = decode_video(asset, settings(tmp_path))
    assert (video.width, video.height, video.fps) == (512, 512, 25.0)
    assert video.num_frames == 100
    # It moves (a live idle loop), a little, and loops without a jump.
    step = np.abs(video.frames[1].astype(int) - video.frames[0]).mean()
    wrap = np.abs(video.frames[-1].astype(int) - video.frames[0]).mean()
    assert 0 < step < 10 and wrap < 10


def test_make_demo_video_writes_what_it_is_asked(tmp_path):
    path = make_demo_video(tmp_path / "demo.mp4", seconds=0.4, fps=10, size=64)
    video = decode_video(path, settings(tmp_path))
    assert video.frames.shape == (4, 64, 64, 3) and video.fps == 10.0


# --------------------------------------------------------------------------- store


async def test_store_shares_one_decode(server, tmp_path):
    base, hits = server
    store = AvatarStore(settings(tmp_path, fetch={"allow_http": True, "allow_private_hosts": LOCAL}))
    try:
        url = f"{base}/video.mp4"
        (a, ha), (b, hb) = await asyncio.gather(store.get(url), store.get(url))
        assert a is b and ha == hb and hits["/video.mp4"] == 1
        assert a.frames.shape == (15, 32, 32, 3)
        assert store.refcount(ha) == 2
        c, hc = await store.get(f"{base}/copy.mp4")  # same bytes, another URL
        assert c is a and hc == ha and store.refcount(ha) == 3
        for _ in range(3):
            store.release(ha)
        assert store.refcount(ha) == 0 and store.stats()["videos"] == 0 and store.stats()["kept"] == 1
        d, _ = await store.get(url)  # kept decoded (fetch.decoded_keep_bytes): no decode, no download
        assert d is a and hits["/video.mp4"] == 1 and store.refcount(ha) == 1
    finally:
        await store.aclose()


async def test_store_without_keep_decodes_again_from_the_disk_cache(server, tmp_path):
    base, hits = server
    store = AvatarStore(settings(tmp_path, fetch={"allow_http": True, "allow_private_hosts": LOCAL,
                                                  "decoded_keep_bytes": 0}))
    try:
        url = f"{base}/video.mp4"
        a, ha = await store.get(url)
        store.release(ha)
        assert store.stats() == {"videos": 0, "bytes": 0, "kept": 0, "loading": 0}
        d, _ = await store.get(url)  # decoded again from the downloaded file
        assert d is not a and hits["/video.mp4"] == 1
    finally:
        await store.aclose()


async def test_kept_videos_go_least_recently_used_first(tmp_path):
    """Three 15-frame 32x32 videos (69 120 bytes each with their I420 copy); room to keep
    two unheld: releasing the third drops the one released first."""
    paths = [write_video(tmp_path / f"{name}.mp4", [colour] * 15)
             for name, colour in (("a", RED), ("b", BLUE), ("c", GREEN))]
    store = AvatarStore(settings(tmp_path, fetch={"allow_file_urls": True, "decoded_keep_bytes": 2 * 69_120}))
    try:
        got = [await store.get(p.as_uri()) for p in paths]
        for _, h in got:
            store.release(h)
        assert store.stats()["kept"] == 2 and store.stats()["bytes"] == 2 * 69_120
        first, _ = await store.get(paths[0].as_uri())  # dropped: decoded anew
        last, _ = await store.get(paths[2].as_uri())  # kept: the same array
        assert first is not got[0][0] and last is got[2][0]
    finally:
        await store.aclose()


async def test_decoded_videos_keep_to_their_memory_budget(tmp_path):
    """Two different 15-frame 32x32 videos (69 120 bytes each with their I420 copy)
    under a 100 000-byte budget: the second start is refused with at_capacity while the
    first is held, and fits once it is released."""
    a = write_video(tmp_path / "a.mp4", [RED] * 15)
    b = write_video(tmp_path / "b.mp4", [BLUE] * 15)
    store = AvatarStore(settings(tmp_path, fetch={"allow_file_urls": True, "decoded_max_bytes": 100_000}))
    try:
        first, ha = await store.get(a.as_uri())
        assert first.nbytes == 15 * (32 * 32 * 3 + 32 * 32 * 3 // 2) == store.stats()["bytes"]
        error = await raises(errors.AT_CAPACITY, store.get(b.as_uri()))
        assert "fetch.decoded_max_bytes" in error.message and "15 frames of 32x32" in error.message
        again, _ = await store.get(a.as_uri())  # the same video again costs nothing
        assert again is first
        store.release(ha)
        store.release(ha)
        second, _ = await store.get(b.as_uri())  # the kept first one makes room
        assert second.num_frames == 15 and store.stats()["kept"] == 0
    finally:
        await store.aclose()


async def test_store_reports_bad_videos_to_every_waiter(server, tmp_path):
    base, _ = server
    store = AvatarStore(settings(tmp_path, fetch={"allow_http": True, "allow_private_hosts": LOCAL}))
    try:
        results = await asyncio.gather(
            store.get(f"{base}/notes.txt"), store.get(f"{base}/notes.txt"),
            return_exceptions=True,
        )
        assert [getattr(r, "code", r) for r in results] == [errors.VIDEO_INVALID] * 2
        assert store.stats() == {"videos": 0, "bytes": 0, "kept": 0, "loading": 0}
    finally:
        await store.aclose()
