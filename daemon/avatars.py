"""Where an avatar's idle video comes from: Firestore (or the config table), the URL
fetch with its disk cache, the decode to RGB frames, and a shared in-memory store.

asyncio side only: no torch here. Video URLs reach public addresses only (see
``AddressPolicy``); ``AvatarStore`` decodes in child processes (``daemon.decode_worker``,
running ``musetalk.video``, the decoder ``lipsync render`` uses too), and
``decode_video`` is the same decode in-process, blocking.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import ipaddress
import json
import os
import socket
import tempfile
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

import aiohttp
import aiohttp.abc
import numpy as np
from yarl import URL

from daemon import errors
from daemon.config import ASSETS_DIR, Settings
from daemon.errors import LipsyncError
from daemon.log import get_logger
from daemon.decode_worker import DecodePool
from musetalk.video import Video, VideoError, VideoLimits, decode_frames

log = get_logger(__name__)

_CHUNK = 1 << 16
_REDIRECT_STATUSES = {301, 302, 303, 307, 308}


def display_url(url: str) -> str:
    """The URL as it may appear in logs and error messages.

    Signed storage URLs carry their secret in the query string (``token=``,
    ``X-Amz-Signature=``) and some URLs carry ``user:password@``: both are dropped.
    """
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.scheme in ("http", "https"):
        host = parts.hostname or ""
        if ":" in host:  # an IPv6 literal keeps its brackets
            host = f"[{host}]"
        if parts.port:
            host = f"{host}:{parts.port}"
        query = "?..." if parts.query else ""
        return urlunsplit((parts.scheme, host, parts.path, "", "")) + query
    return url


# --------------------------------------------------------------------------- resolver


class AvatarResolver:
    """avatar_id -> idle video URL, from Firestore when a project is set, else from the
    ``[avatars]`` table of the config."""

    # Firestore answers kept for outages (avatar_id -> (url, monotonic time of the answer)),
    # the most recently used last; bounded.
    KNOWN_MAX = 10_000

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._client: Any = None  # google.cloud.firestore.AsyncClient, made on first use
        self._known: OrderedDict[str, tuple[str, float]] = OrderedDict()

    async def resolve(self, avatar_id: str | None, idle_video_url: str | None) -> str:
        if (avatar_id is None) == (idle_video_url is None):
            raise LipsyncError(
                errors.INVALID_MESSAGE, "give exactly one of 'avatar_id' or 'idle_video_url'"
            )
        if idle_video_url is not None:
            return idle_video_url
        assert avatar_id is not None
        if self._settings.firestore.project:
            return await self._from_firestore_or_known(avatar_id)
        return self._from_table(avatar_id)

    async def _from_firestore_or_known(self, avatar_id: str) -> str:
        """Firestore's answer; when Firestore cannot be reached, the URL it gave for this
        avatar within ``firestore.stale_ttl_s`` (an outage must not stop avatars that
        were running a minute ago)."""
        try:
            url = await self._from_firestore(avatar_id)
        except LipsyncError as exc:
            if exc.code != errors.FIRESTORE_UNAVAILABLE:
                self._known.pop(avatar_id, None)  # gone or changed: not served from here again
                raise
            known = self._known.get(avatar_id)
            ttl = self._settings.firestore.stale_ttl_s
            if known is None or time.monotonic() - known[1] > ttl:
                raise
            age = time.monotonic() - known[1]
            log.warning("Firestore unavailable; starting with the URL it gave earlier", avatar_id=avatar_id,
                        answered_s_ago=round(age, 1), stale_ttl_s=ttl, error=exc.message)
            self._known.move_to_end(avatar_id)
            return known[0]
        self._known[avatar_id] = (url, time.monotonic())
        self._known.move_to_end(avatar_id)
        while len(self._known) > self.KNOWN_MAX:
            self._known.popitem(last=False)
        return url

    def _from_table(self, avatar_id: str) -> str:
        entry = self._settings.avatars.get(avatar_id)
        if entry is None:
            # The configured ids are not listed: producers need not learn them, and with
            # many the message would be unreadable.
            raise LipsyncError(
                errors.UNKNOWN_AVATAR,
                f"avatar '{avatar_id}' not found in the config table [avatars] (firestore.project "
                "is not set); add [avatars.<id>] idle_video_url = ... to the config, or set "
                "firestore.project to look avatars up in Firestore",
            )
        if not entry.idle_video_url.strip():
            raise LipsyncError(
                errors.AVATAR_NO_VIDEO,
                f"avatar '{avatar_id}' has an empty idle_video_url in config table [avatars]",
            )
        return entry.idle_video_url

    async def _from_firestore(self, avatar_id: str) -> str:
        fs = self._settings.firestore
        if "/" in avatar_id or avatar_id in (".", "..") or avatar_id.startswith("__"):
            raise LipsyncError(
                errors.INVALID_MESSAGE,
                f"avatar_id {avatar_id!r} is not a valid Firestore document id "
                "(no '/', not '.' or '..', not starting with '__')",
            )
        try:
            async with asyncio.timeout(fs.timeout_s):
                client = await self._get_client()
                doc_ref = client.collection(fs.collection).document(avatar_id)
                # DocumentReference.get() is sent as BatchGetDocuments, not GetDocument:
                # real Firestore serves both, and the npm emulator used in the tests
                # implements only BatchGetDocuments. The client's own retry would keep
                # retrying UNAVAILABLE for 60 s, so it is bounded by our timeout.
                snapshot = await doc_ref.get(retry=_retry(fs.timeout_s), timeout=fs.timeout_s)
        except LipsyncError:
            raise
        except TimeoutError:
            raise self._unavailable(f"no answer within {fs.timeout_s:g} s (firestore.timeout_s)")
        except Exception as exc:  # google.api_core / grpc / google.auth errors
            raise self._unavailable(_short_error(exc)) from exc

        where = f"in Firestore (collection {fs.collection}, project {fs.project})"
        if not snapshot.exists:
            raise LipsyncError(
                errors.UNKNOWN_AVATAR,
                f"avatar '{avatar_id}' not found {where}; add a document with that id and a "
                f"{fs.field} URL, or point firestore.collection / firestore.project at the "
                "right place",
            )
        data = snapshot.to_dict() or {}
        url = data.get(fs.field)
        if not isinstance(url, str) or not url.strip():
            found = "missing" if fs.field not in data else f"a {type(url).__name__}"
            raise LipsyncError(
                errors.AVATAR_NO_VIDEO,
                f"avatar '{avatar_id}' has no {fs.field} in Firestore "
                f"(collection {fs.collection}; the field is {found}, a non-empty string "
                "URL is needed)",
            )
        return url.strip()

    def _unavailable(self, why: str) -> LipsyncError:
        fs = self._settings.firestore
        emulator = os.environ.get("FIRESTORE_EMULATOR_HOST")
        target = f"emulator at {emulator}" if emulator else "firestore.googleapis.com"
        return LipsyncError(
            errors.FIRESTORE_UNAVAILABLE,
            f"Firestore unavailable (project {fs.project}, database {fs.database}, "
            f"{target}): {why}",
        )

    async def _get_client(self) -> Any:
        if self._client is None:
            # google.auth may probe the GCE metadata server when no credentials file is
            # set: a blocking call, so the client is built off the event loop.
            self._client = await asyncio.to_thread(self._make_client)
        return self._client

    def _make_client(self) -> Any:
        from google.cloud import firestore

        fs = self._settings.firestore
        credentials = None
        if fs.credentials_file is not None and not os.environ.get("FIRESTORE_EMULATOR_HOST"):
            from google.oauth2 import service_account

            try:
                credentials = service_account.Credentials.from_service_account_file(
                    str(fs.credentials_file)
                )
            except (OSError, ValueError) as exc:
                raise self._unavailable(
                    f"cannot load firestore.credentials_file {fs.credentials_file} "
                    f"({type(exc).__name__})"
                ) from None
        try:
            return firestore.AsyncClient(
                project=fs.project, database=fs.database, credentials=credentials
            )
        except Exception as exc:  # google.auth.exceptions.DefaultCredentialsError et al.
            raise self._unavailable(
                f"{_short_error(exc)}; set firestore.credentials_file or "
                "GOOGLE_APPLICATION_CREDENTIALS"
            ) from None

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is None:
            return
        # AsyncClient has no close(); its gRPC channel lives on the GAPIC transport.
        api = getattr(client, "_firestore_api_internal", None)
        if api is not None:
            await api.transport.close()


def _retry(timeout_s: float) -> Any:
    from google.api_core import exceptions as gexc
    from google.api_core import retry_async

    return retry_async.AsyncRetry(
        initial=0.1,
        maximum=1.0,
        multiplier=2.0,
        timeout=timeout_s,
        predicate=retry_async.if_exception_type(
            gexc.ServiceUnavailable, gexc.DeadlineExceeded, gexc.InternalServerError
        ),
    )


def _short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


# --------------------------------------------------------------------------- fetcher


@dataclass(frozen=True)
class FetchedVideo:
    path: Path
    content_hash: str  # sha256 of the file's bytes, hex
    url: str


class VideoFetcher:
    """Turns a video URL into a local file.

    ``https://`` (``http://`` with fetch.allow_http) is downloaded once and cached under
    ``<state_dir>/downloads``: the video by its content (``<sha256>.video``: rotating
    signed URLs of one video keep one copy), the URL's entry ``<sha256(URL)>.json`` naming
    it. Beyond ``fetch.cache_max_bytes`` the least recently used videos are deleted;
    ``.part`` files a crashed download left are swept at start. ``file://`` needs
    fetch.allow_file_urls; ``asset:NAME`` names a file shipped in daemon/assets.
    """

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._policy = AddressPolicy(settings.fetch.allow_private_hosts)
        self._downloads: dict[str, asyncio.Task[FetchedVideo]] = {}
        self._sweep_parts()

    def _sweep_parts(self) -> None:
        """Remove ``.part`` files older than any live download can be (another daemon
        sharing the state dir may be writing a young one)."""
        oldest = time.time() - 2 * self._settings.fetch.timeout_s - 60
        try:
            parts = list(self.cache_dir.glob(".*.part"))
        except OSError:
            return
        for part in parts:
            try:
                if part.stat().st_mtime < oldest:
                    part.unlink()
                    log.info("stale partial download removed", file=part.name)
            except OSError:
                pass

    @property
    def cache_dir(self) -> Path:
        return Path(self._settings.daemon.state_dir) / "downloads"

    async def fetch(self, url: str) -> FetchedVideo:
        scheme = url.split(":", 1)[0].lower() if ":" in url else ""
        if scheme == "asset":
            return await self._asset(url)
        if scheme == "file":
            if not self._settings.fetch.allow_file_urls:
                raise LipsyncError(
                    errors.URL_NOT_ALLOWED,
                    f"file:// URLs are disabled ({url}); set fetch.allow_file_urls = true "
                    "to read local files",
                )
            return await self._local(url, _file_url_path(url), url)
        if scheme in ("http", "https"):
            self._check_http_scheme(url, scheme)
            return await self._download(url)
        raise LipsyncError(
            errors.URL_NOT_ALLOWED,
            f"unsupported video URL {display_url(url)!r}: use https://, asset:NAME, "
            "file:// (with fetch.allow_file_urls) or http:// (with fetch.allow_http)",
        )

    def _check_http_scheme(self, url: str, scheme: str) -> None:
        if scheme == "http" and not self._settings.fetch.allow_http:
            raise LipsyncError(
                errors.URL_NOT_ALLOWED,
                f"plain http URL {display_url(url)} refused; use https or set "
                "fetch.allow_http = true",
            )

    async def _asset(self, url: str) -> FetchedVideo:
        name = url.split(":", 1)[1]
        root = ASSETS_DIR.resolve()
        candidate = (root / name).resolve()
        if (
            not name
            or "/" in name
            or "\\" in name
            or name.startswith(".")
            or candidate.parent != root
        ):
            raise LipsyncError(
                errors.URL_NOT_ALLOWED,
                f"asset name {name!r} must be a plain file name in daemon/assets "
                "(like asset:demo.mp4)",
            )
        return await self._local(url, candidate, f"asset {name}")

    async def _local(self, url: str, path: Path, label: str) -> FetchedVideo:
        max_bytes = self._settings.fetch.max_bytes
        try:
            size = path.stat().st_size
        except OSError as exc:
            raise LipsyncError(
                errors.VIDEO_FETCH_FAILED, f"cannot read {label}: {exc.strerror}"
            ) from None
        if not path.is_file():
            raise LipsyncError(errors.VIDEO_FETCH_FAILED, f"{label} is not a regular file")
        if size > max_bytes:
            raise _too_large(label, max_bytes)
        try:
            digest = await asyncio.to_thread(_sha256_file, path)
        except OSError as exc:
            raise LipsyncError(
                errors.VIDEO_FETCH_FAILED, f"cannot read {label}: {exc.strerror}"
            ) from None
        return FetchedVideo(path=path, content_hash=digest, url=url)

    async def _download(self, url: str) -> FetchedVideo:
        key = hashlib.sha256(url.encode()).hexdigest()
        cached = self._cached(key, url)
        if cached is not None:
            return cached
        # Two sessions asking for the same new URL share one download.
        task = self._downloads.get(key)
        if task is None:
            task = asyncio.create_task(self._download_to_cache(url, key))
            self._downloads[key] = task
            task.add_done_callback(lambda t, key=key: _forget(self._downloads, key, t))
        return await asyncio.shield(task)

    def _cached(self, key: str, url: str) -> FetchedVideo | None:
        meta = self._meta_path(key)
        try:
            info = json.loads(meta.read_text())
            sha = info["sha256"]
            video = self._video_path(sha)
            size = video.stat().st_size
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if info.get("url") != url or info.get("size") != size:
            return None
        try:
            os.utime(video)  # recently used: evicted last
        except OSError:
            pass
        return FetchedVideo(path=video, content_hash=sha, url=url)

    def _meta_path(self, key: str) -> Path:
        return self.cache_dir / f"{key}.json"

    def _video_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or not all(c in "0123456789abcdef" for c in sha256):
            raise ValueError("not a sha256")
        return self.cache_dir / f"{sha256}.video"

    def _evict(self, keep: Path) -> None:
        """Delete the least recently used videos until the cache fits its budget (never
        ``keep``, the one just fetched), and the URL entries naming deleted videos."""
        budget = self._settings.fetch.cache_max_bytes
        # One used within this long may be in a decoder's hands still.
        busy_since = time.time() - self._settings.fetch.timeout_s - self._settings.fetch.decode_timeout_s
        videos = []
        for path in self.cache_dir.glob("*.video"):
            try:
                st = path.stat()
            except OSError:
                continue
            videos.append((st.st_mtime, st.st_size, path))
        total = sum(size for _, size, _ in videos)
        removed = set()
        for mtime, size, path in sorted(videos):
            if total <= budget:
                break
            if path == keep or mtime > busy_since:
                continue
            path.unlink(missing_ok=True)
            removed.add(path.stem)
            total -= size
            log.info("cached video evicted", file=path.name, bytes=size, cache_max_bytes=budget)
        if not removed:
            return
        for meta in self.cache_dir.glob("*.json"):
            try:
                if json.loads(meta.read_text()).get("sha256") in removed:
                    meta.unlink(missing_ok=True)
            except (OSError, ValueError, AttributeError):
                continue

    async def _download_to_cache(self, url: str, key: str) -> FetchedVideo:
        fetch = self._settings.fetch
        shown = display_url(url)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        meta_path = self._meta_path(key)
        fd, tmp_name = tempfile.mkstemp(dir=self.cache_dir, prefix=f".{key}.", suffix=".part")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                try:
                    async with asyncio.timeout(fetch.timeout_s):
                        digest, size = await self._stream(url, out)
                except TimeoutError:
                    raise LipsyncError(
                        errors.VIDEO_FETCH_FAILED,
                        f"download of {shown} timed out after {fetch.timeout_s:g} s "
                        "(fetch.timeout_s)",
                    ) from None
                except aiohttp.ClientError as exc:
                    raise LipsyncError(
                        errors.VIDEO_FETCH_FAILED,
                        f"download of {shown} failed: {_client_error(exc)}",
                    ) from None
            # Video first, then its metadata: a metadata file means a complete video. The
            # same content under another URL is already there: one copy.
            video_path = self._video_path(digest)
            os.replace(tmp, video_path)
            meta_tmp = meta_path.with_name(f".{meta_path.name}.part")
            meta_tmp.write_text(json.dumps({"url": url, "sha256": digest, "size": size}))
            os.replace(meta_tmp, meta_path)
        finally:
            tmp.unlink(missing_ok=True)
        log.info("video_downloaded", url=shown, bytes=size, sha256=digest[:12])
        await asyncio.to_thread(self._evict, video_path)
        return FetchedVideo(path=video_path, content_hash=digest, url=url)

    async def _stream(self, url: str, out: Any) -> tuple[str, int]:
        fetch = self._settings.fetch
        shown = display_url(url)
        current = URL(url)
        resolver = _PinnedResolver()
        # One client per download, whose resolver answers only with the addresses
        # checked for this download: the connection goes where the check looked
        # (a second DNS answer cannot point it elsewhere). No proxies from the env.
        connector = aiohttp.TCPConnector(resolver=resolver, use_dns_cache=False)
        async with aiohttp.ClientSession(connector=connector, trust_env=False) as http:
            # Redirects are followed by hand so that every hop gets the scheme check (no
            # https -> http downgrade unless allowed), the address check and the cap.
            for _hop in range(fetch.max_redirects + 1):
                await self._check_host(current, resolver)
                async with http.get(current, allow_redirects=False) as resp:
                    if resp.status in _REDIRECT_STATUSES:
                        current = self._redirect_target(current, resp, shown)
                        continue
                    if resp.status != 200:
                        # The status only: what the remote says (body, reason, headers)
                        # may come from an internal service and is never repeated.
                        raise LipsyncError(
                            errors.VIDEO_FETCH_FAILED,
                            f"download of {display_url(str(current))} failed: HTTP "
                            f"{resp.status}; check that the URL points to the video",
                        )
                    if resp.content_length is not None and resp.content_length > fetch.max_bytes:
                        raise _too_large(shown, fetch.max_bytes)
                    digest = hashlib.sha256()
                    size = 0
                    async for chunk in resp.content.iter_chunked(_CHUNK):
                        size += len(chunk)
                        if size > fetch.max_bytes:
                            raise _too_large(shown, fetch.max_bytes)
                        digest.update(chunk)
                        out.write(chunk)
                    return digest.hexdigest(), size
        raise LipsyncError(
            errors.VIDEO_FETCH_FAILED,
            f"{shown} redirected more than {fetch.max_redirects} times "
            "(fetch.max_redirects)",
        )

    def _redirect_target(self, current: URL, resp: aiohttp.ClientResponse, shown: str) -> URL:
        location = resp.headers.get("Location")
        if not location:
            raise LipsyncError(
                errors.VIDEO_FETCH_FAILED,
                f"{shown}: HTTP {resp.status} redirect without a Location",
            )
        try:
            target = current.join(URL(location))
        except ValueError:
            raise LipsyncError(
                errors.VIDEO_FETCH_FAILED, f"{shown}: HTTP {resp.status} redirect to an invalid URL"
            ) from None
        if target.scheme not in ("http", "https"):
            raise LipsyncError(
                errors.URL_NOT_ALLOWED,
                f"{shown} redirects to a URL that is neither https nor http",
            )
        self._check_http_scheme(str(target), target.scheme)
        return target

    async def _check_host(self, url: URL, resolver: _PinnedResolver) -> None:
        """Resolve the host of ``url``, refuse it when an address is not public (unless
        allowed), and pin the checked addresses for the connection."""
        host = (url.raw_host or "").rstrip(".").lower()
        shown = display_url(str(url))
        if not host:
            raise LipsyncError(errors.URL_NOT_ALLOWED, f"video URL {shown} has no host")
        port = url.port or (443 if url.scheme == "https" else 80)
        literal = _ip_or_none(host)
        if literal is not None:
            # Named as an address is usually written (::ffff:10.0.0.1, not ::ffff:a00:1).
            mapped = getattr(literal, "ipv4_mapped", None)
            host = f"::ffff:{mapped}" if mapped is not None else str(literal)
            addresses = [literal]
        else:
            try:
                infos = await asyncio.get_running_loop().getaddrinfo(
                    host, port, type=socket.SOCK_STREAM
                )
            except OSError as exc:
                raise LipsyncError(
                    errors.VIDEO_FETCH_FAILED,
                    f"cannot resolve the host of {shown} ({exc.strerror or type(exc).__name__})",
                ) from None
            addresses = list(dict.fromkeys(ipaddress.ip_address(i[4][0].split("%")[0]) for i in infos))
        for address in addresses:
            why = self._policy.refusal(host, address)
            if why is not None:
                raise LipsyncError(
                    errors.URL_NOT_ALLOWED,
                    f"video URL {shown}: host {host} is {why}"
                    + (f" ({address})" if literal is None else "")
                    + ", which is refused "
                    "to keep URLs from reaching internal services; if this host is meant to "
                    f"serve videos, add {host!r} (or its network) to fetch.allow_private_hosts",
                )
        if literal is None:
            resolver.pin(host, port, addresses)

    async def aclose(self) -> None:
        tasks = list(self._downloads.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


class AddressPolicy:
    """Which addresses a video URL may reach: public ones, plus the hosts and networks of
    fetch.allow_private_hosts. Without it a start message (or a Firestore document) could
    make the daemon fetch from localhost, the cloud metadata service or the LAN."""

    def __init__(self, allowed: list[str]) -> None:
        self._hosts: set[str] = set()
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for entry in allowed:
            try:
                self._networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self._hosts.add(entry.rstrip(".").lower())

    def refusal(self, host: str, address: IPAddress) -> str | None:
        """Why ``host`` at ``address`` is refused (e.g. "a loopback address"), or None."""
        why = _not_public(address)
        if why is None or host in self._hosts:
            return None
        mapped = getattr(address, "ipv4_mapped", None)
        if any(address in net or (mapped is not None and mapped in net) for net in self._networks):
            return None
        return why


def _not_public(address: IPAddress) -> str | None:
    # An IPv4-mapped IPv6 address (::ffff:127.0.0.1) reaches the IPv4 host: judge that.
    mapped = getattr(address, "ipv4_mapped", None)
    if mapped is not None:
        address = mapped
    for test, what in (
        ("is_unspecified", "an unspecified address"),
        ("is_loopback", "a loopback address"),
        ("is_link_local", "a link-local address"),
        ("is_multicast", "a multicast address"),
        ("is_private", "a private address"),
        ("is_reserved", "a reserved address"),
    ):
        if getattr(address, test):
            return what
    if not address.is_global:  # shared (carrier-grade NAT) space and the like
        return "a non-public address"
    return None


def _ip_or_none(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]").split("%")[0])
    except ValueError:
        return None


class _PinnedResolver(aiohttp.abc.AbstractResolver):
    """Answers aiohttp's lookups with the addresses ``_check_host`` checked, and nothing
    else: a host that was not checked cannot be connected to."""

    def __init__(self) -> None:
        self._pinned: dict[tuple[str, int], list[IPAddress]] = {}

    def pin(self, host: str, port: int, addresses: list[IPAddress]) -> None:
        self._pinned[(host, port)] = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[aiohttp.abc.ResolveResult]:
        addresses = self._pinned.get((host.rstrip(".").lower(), port))
        if not addresses:
            raise OSError(f"host {host} was not checked before connecting")
        return [
            {"hostname": host, "host": str(a), "port": port,
             "family": socket.AF_INET6 if a.version == 6 else socket.AF_INET,
             "proto": 0, "flags": socket.AI_NUMERICHOST}
            for a in addresses
            if family in (socket.AF_UNSPEC, 0) or (family == socket.AF_INET6) == (a.version == 6)
        ]

    async def close(self) -> None:
        self._pinned.clear()


def _forget(tasks: dict[str, asyncio.Task[Any]], key: str, task: asyncio.Task[Any]) -> None:
    """Done-callback of a shared task: unregister it and mark its error as retrieved, so
    that an error whose waiters all left is not logged as "never retrieved"."""
    if tasks.get(key) is task:
        del tasks[key]
    if not task.cancelled():
        task.exception()


def _client_error(exc: aiohttp.ClientError) -> str:
    """What went wrong with a download, in our words: aiohttp's own messages can quote
    what the remote sent (a malformed status line, a header), which is not repeated."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        os_error = getattr(exc, "os_error", None)
        reason = getattr(os_error, "strerror", None) or type(os_error or exc).__name__
        return f"cannot connect to {exc.host}:{exc.port} ({reason})"
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return "the server closed the connection"
    return f"{type(exc).__name__} (the server's answer was not usable HTTP)"


def _too_large(label: str, max_bytes: int) -> LipsyncError:
    return LipsyncError(
        errors.VIDEO_TOO_LARGE,
        f"video {label} is larger than {max_bytes} bytes; raise fetch.max_bytes to allow it",
    )


def _file_url_path(url: str) -> Path:
    parts = urlsplit(url)
    if parts.netloc not in ("", "localhost"):
        raise LipsyncError(
            errors.URL_NOT_ALLOWED,
            f"file URL {url} names host {parts.netloc!r}; only local files "
            "(file:///path) can be read",
        )
    return Path(unquote(parts.path))


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# --------------------------------------------------------------------------- decode


@dataclass(frozen=True, eq=False)
class DecodedVideo:
    frames: np.ndarray  # (N, H, W, 3) uint8 RGB
    fps: float
    width: int
    height: int
    duration_s: float

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def nbytes(self) -> int:
        """Host memory it holds: the RGB frames and their I420 copy."""
        from daemon.frames import i420_size

        return int(self.frames.nbytes) + self.num_frames * i420_size(self.width, self.height)

    @functools.cached_property
    def i420(self) -> np.ndarray:
        """(N, i420_size) frames as publishers take them (daemon.frames): converted once
        per video, in the decoding thread, and shared by every session showing it."""
        return idle_i420(self.frames)


def idle_i420(frames: np.ndarray) -> np.ndarray:
    """(N, H, W, 3) RGB -> (N, i420_size(W, H)) read-only I420 frames."""
    from daemon.frames import i420_size, rgb_to_i420

    n, h, w = frames.shape[:3]
    out = np.empty((n, i420_size(w, h)), np.uint8)
    for i in range(n):
        out[i] = rgb_to_i420(frames[i])
    out.setflags(write=False)
    return out


def decode_video(path: Path, settings: Settings, source: str | None = None) -> DecodedVideo:
    """Decode every frame of ``path`` to RGB, in this process. Blocking: run it in a
    thread. The daemon decodes through :func:`decode_video_isolated` instead; this is
    the same decode for tools and tests.

    ``source`` names the video in error messages (the URL it came from); the path is
    used when it is not given. Decoding stops as soon as a cap is passed, so a huge
    file costs at most the caps in memory; the errors name the config field to change.
    """
    try:
        decoded = decode_frames(path, video_limits(settings), label=_label(path, source))
    except VideoError as exc:
        raise _invalid(str(exc)) from None
    return _decoded(decoded)


async def decode_video_isolated(
    pool: DecodePool, path: Path, settings: Settings, source: str | None = None
) -> DecodedVideo:
    """:func:`decode_video` in a child process of ``pool`` (time and memory limits of
    the fetch section), then the I420 conversion in a thread."""
    try:
        decoded = await pool.decode(path, video_limits(settings), _label(path, source))
    except VideoError as exc:
        raise _invalid(str(exc)) from None
    return await asyncio.to_thread(_decoded, decoded)


def video_limits(settings: Settings) -> VideoLimits:
    fetch, video_cfg = settings.fetch, settings.video
    return VideoLimits(
        max_width=video_cfg.max_width, max_height=video_cfg.max_height,
        max_seconds=fetch.max_video_s, max_frames=fetch.max_frames_in_memory,
        min_seconds=fetch.min_video_s, fallback_fps=video_cfg.fps, names=_LIMIT_NAMES,
        threads=_DECODE_THREADS,
    )


# Decoder threads per idle video: a decode runs beside live sessions, which need the CPU.
_DECODE_THREADS = 2


def decode_pool(settings: Settings) -> DecodePool:
    fetch = settings.fetch
    return DecodePool(
        Path(settings.daemon.state_dir) / "decode", workers=fetch.decode_workers,
        timeout_s=fetch.decode_timeout_s, memory_mb=fetch.decode_memory_mb,
    )


def _label(path: Path, source: str | None) -> str:
    return display_url(source) if source else str(path)


def _decoded(decoded: Video) -> DecodedVideo:
    frames = decoded.frames
    video = DecodedVideo(
        frames=frames, fps=decoded.fps, width=frames.shape[2], height=frames.shape[1],
        duration_s=decoded.duration_s,
    )
    video.i420  # converted here, off the event loop
    return video


# The config fields behind each decoding limit, for the errors.
_LIMIT_NAMES = {
    "max_width": "video.max_width", "max_height": "video.max_height",
    "max_seconds": "fetch.max_video_s", "max_frames": "fetch.max_frames_in_memory",
    "min_seconds": "fetch.min_video_s",
}


def _invalid(message: str) -> LipsyncError:
    return LipsyncError(errors.VIDEO_INVALID, message)


# --------------------------------------------------------------------------- store


@dataclass(eq=False)
class _Entry:
    video: DecodedVideo
    refs: int = 0


class AvatarStore:
    """Decoded idle videos in memory, shared by content hash with reference counts.

    Sessions on the same avatar hold one array; concurrent ``get`` calls for one URL run
    a single fetch + decode. A video whose last holder releases it is kept, least recently
    used dropped first, within ``fetch.decoded_keep_bytes``; a new video that would pass
    ``fetch.decoded_max_bytes`` first drops kept ones, then is refused.
    """

    def __init__(self, settings: Settings, fetcher: VideoFetcher | None = None) -> None:
        self.settings = settings
        self._owns_fetcher = fetcher is None
        self.fetcher = fetcher or VideoFetcher(settings)
        # Insertion order is use order: a kept entry moves to the end when released.
        self._entries: dict[str, _Entry] = {}
        self._loading: dict[str, asyncio.Task[tuple[DecodedVideo, str]]] = {}
        # Decodes run in child processes, fetch.decode_workers at a time: that bounds
        # peak memory and CPU, and one slow file does not hold up every other start.
        self.decoder = decode_pool(settings)

    async def get(self, url: str) -> tuple[DecodedVideo, str]:
        """The decoded video of ``url`` and its content hash; hold it until ``release``.

        Fails past daemon.start_timeout_s instead of leaving a start waiting (the load
        itself goes on for the other waiters, within its own fetch and decode limits).
        """
        task = self._loading.get(url)
        if task is None:
            task = asyncio.create_task(self._load(url), name=f"avatar-load {display_url(url)}")
            self._loading[url] = task
            task.add_done_callback(lambda t, url=url: _forget(self._loading, url, t))
        deadline_s = self.settings.daemon.start_timeout_s
        try:
            async with asyncio.timeout(deadline_s):
                # shield: one waiter's cancellation must not cancel the load for the others.
                video, content_hash = await asyncio.shield(task)
        except TimeoutError:
            raise LipsyncError(
                errors.VIDEO_FETCH_FAILED,
                f"the idle video {display_url(url)} was not fetched and decoded within "
                f"daemon.start_timeout_s = {deadline_s:g} s; use a smaller video or a faster "
                "host, or raise daemon.start_timeout_s",
            ) from None
        entry = self._entries.get(content_hash)
        if entry is None:  # dropped by others while this waiter was resuming
            entry = self._entries[content_hash] = _Entry(video)
        entry.refs += 1
        return entry.video, content_hash

    def release(self, content_hash: str) -> None:
        entry = self._entries.get(content_hash)
        if entry is None or entry.refs <= 0:
            log.warning("avatar_release_unknown", content_hash=content_hash[:12])
            return
        entry.refs -= 1
        if entry.refs == 0:
            self._entries[content_hash] = self._entries.pop(content_hash)  # most recently used
            self._drop_kept(self.settings.fetch.decoded_keep_bytes)

    def refcount(self, content_hash: str) -> int:
        entry = self._entries.get(content_hash)
        return entry.refs if entry else 0

    def stats(self) -> dict[str, int]:
        return {
            "videos": sum(1 for e in self._entries.values() if e.refs > 0),
            "bytes": sum(e.video.nbytes for e in self._entries.values()),
            "kept": sum(1 for e in self._entries.values() if e.refs == 0),
            "loading": len(self._loading),
        }

    def _drop_kept(self, keep_bytes: int) -> None:
        """Drop unheld videos, least recently used first, until they hold <= keep_bytes."""
        kept = [(h, e) for h, e in self._entries.items() if e.refs == 0]
        total = sum(e.video.nbytes for _, e in kept)
        for content_hash, entry in kept:
            if total <= keep_bytes:
                break
            del self._entries[content_hash]
            total -= entry.video.nbytes
            log.info("avatar_video_dropped", content_hash=content_hash[:12], bytes=entry.video.nbytes)

    async def _load(self, url: str) -> tuple[DecodedVideo, str]:
        fetched = await self.fetcher.fetch(url)
        entry = self._entries.get(fetched.content_hash)
        if entry is not None:  # the same bytes (under this URL or another), decoded already
            return entry.video, fetched.content_hash
        video = await decode_video_isolated(self.decoder, fetched.path, self.settings, url)
        budget = self.settings.fetch.decoded_max_bytes
        held = sum(e.video.nbytes for e in self._entries.values() if e.refs > 0)
        if held + video.nbytes > budget:
            gib = 1024**3
            raise LipsyncError(
                errors.AT_CAPACITY,
                f"decoded idle videos would hold {(held + video.nbytes) / gib:.2f} GiB with this one "
                f"({video.nbytes / gib:.2f} GiB, {video.num_frames} frames of {video.width}x{video.height}), "
                f"over fetch.decoded_max_bytes = {budget / gib:.2f} GiB: use a shorter or smaller idle "
                "video, end sessions of other avatars, or raise fetch.decoded_max_bytes",
            )
        self._drop_kept(budget - held - video.nbytes)  # kept videos make room first
        log.info(
            "avatar_video_decoded", url=display_url(url), frames=video.num_frames,
            size=f"{video.width}x{video.height}", fps=video.fps,
            content_hash=fetched.content_hash[:12],
        )
        return video, fetched.content_hash

    async def aclose(self) -> None:
        tasks = list(self._loading.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._entries.clear()
        if self._owns_fetcher:
            await self.fetcher.aclose()
