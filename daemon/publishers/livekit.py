"""Publishes a session's audio and video to a LiveKit room.

The session calls ``push`` once per frame period with an I420 frame, the audio of that
frame and the frame's due time. Both go straight into the session's LiveKit sources
(``LiveKitSources``): the I420 planes are copied into a native buffer with the due time
as the capture timestamp, so WebRTC sees the session's own frame clock; the audio joins
the ``AudioSource``'s native queue, which plays out in real time and makes the capture
wait only when more than ``audio_queue_size_ms`` is queued. At the session's pace neither
waits.

If the room drops, the sources stay; a background task mints a fresh token, reconnects
with capped exponential backoff and publishes new tracks on the same sources. Pushes
meanwhile are accepted and dropped (counted), so the session's clock never stalls on the
network.

The room connection is the one seam (``RoomConnector``): everything else is the real
livekit SDK.
"""

from __future__ import annotations

import asyncio
import contextlib
from datetime import timedelta
from typing import Any, Callable, Protocol

import numpy as np
from livekit import api, rtc
from pydantic import SecretStr

from daemon.errors import PUBLISHER_FAILED, LipsyncError
from daemon.log import get_logger, redact_url
from daemon.publishers.base import MediaFormat, Publisher, check_frame
from daemon.publishers.livekit_sources import LiveKitSources

_log = get_logger(__name__)


class ParticipantLike(Protocol):
    async def publish_track(
        self, track: rtc.LocalTrack, options: rtc.TrackPublishOptions
    ) -> Any: ...


class RoomLike(Protocol):
    @property
    def local_participant(self) -> ParticipantLike: ...

    async def disconnect(self) -> None: ...


class RoomConnector(Protocol):
    """Connects to a room; calls ``on_disconnected(reason)`` once if the room drops
    (not when the caller disconnects it)."""

    async def connect(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float,
        on_disconnected: Callable[[str], None],
    ) -> RoomLike: ...


class RtcRoomConnector:
    """The real connection: an ``rtc.Room`` per connect."""

    async def connect(
        self,
        url: str,
        token: str,
        *,
        timeout_s: float,
        on_disconnected: Callable[[str], None],
    ) -> RoomLike:
        room = rtc.Room()
        room.on("disconnected", lambda reason: on_disconnected(_reason_name(reason)))
        # The publisher only sends: subscribing would decode every other participant.
        options = rtc.RoomOptions(auto_subscribe=False, connect_timeout=timeout_s)
        await room.connect(url, token, options)
        return room


# Disconnect reasons a reconnect cannot cure: the session ends with an error naming it.
TERMINAL_REASONS = {
    "DUPLICATE_IDENTITY": "another participant joined the room as the same identity; give each "
                          "session its own (the start's livekit.identity; by default "
                          "livekit.default_identity_prefix + the session id)",
    "PARTICIPANT_REMOVED": "the participant was removed from the room (RemoveParticipant)",
    "ROOM_DELETED": "the room was deleted",
    "ROOM_CLOSED": "the room was closed",
}


def _reason_name(reason: Any) -> str:
    try:
        return rtc.DisconnectReason.Name(reason)
    except (ValueError, TypeError, AttributeError):
        return str(reason)


def mint_token(
    api_key: SecretStr, api_secret: SecretStr, room: str, identity: str, ttl_s: int
) -> str:
    """A join token that may only publish media to ``room``."""
    grants = api.VideoGrants(
        room_join=True,
        room=room,
        can_publish=True,
        can_publish_sources=["camera", "microphone"],  # the avatar's two tracks, nothing else
        can_subscribe=False,
        can_publish_data=False,
    )
    return (
        api.AccessToken(api_key.get_secret_value(), api_secret.get_secret_value())
        .with_identity(identity)
        .with_grants(grants)
        .with_ttl(timedelta(seconds=ttl_s))
        .to_jwt()
    )


class LiveKitPublisher(Publisher):
    variable_frame_interval = True  # every frame carries its tick's timestamp

    def __init__(
        self,
        url: str,
        api_key: SecretStr | None,
        api_secret: SecretStr | None,
        room: str,
        identity: str,
        fmt: MediaFormat,
        session_id: str,
        token_ttl_s: int = 3600,
        reconnect_max_backoff_s: float = 10.0,
        connect_timeout_s: float = 10.0,
        room_connector: RoomConnector | None = None,
        *,
        reconnect_initial_backoff_s: float = 0.5,
        audio_queue_size_ms: int | None = None,
        token: str | None = None,
    ) -> None:
        """``token``: a join token minted by the orchestrator, used for every connection
        (then no key or secret is needed); else one is minted per connection."""
        if token is None and (api_key is None or api_secret is None):
            raise ValueError("LiveKitPublisher needs api_key and api_secret, or a token")
        self._fixed_token = token
        self._url = url
        self._api_key = api_key
        self._api_secret = api_secret
        self._room_name = room
        self._identity = identity
        self._fmt = fmt
        self._token_ttl_s = token_ttl_s
        self._max_backoff_s = reconnect_max_backoff_s
        self._initial_backoff_s = min(reconnect_initial_backoff_s, reconnect_max_backoff_s)
        self._connect_timeout_s = connect_timeout_s
        self._connector: RoomConnector = room_connector or RtcRoomConnector()
        self._audio_queue_size_ms = audio_queue_size_ms
        self._log = _log.bind(session_id=session_id, sink="livekit", room=room,
                              identity=identity)

        self._sources: LiveKitSources | None = None
        self._room: RoomLike | None = None
        # Bumped per connection so a late "disconnected" from an old room is ignored.
        self._generation = 0
        self._connected = False
        self._started = False
        self._closing = False
        self._closed = asyncio.Event()
        self._close_lock = asyncio.Lock()
        self._reconnect_task: asyncio.Task[None] | None = None
        self._last_token = ""
        self._ended: LipsyncError | None = None  # a terminal disconnect: push raises it

        self.frames_pushed = 0
        self.frames_dropped = 0
        self.reconnects = 0

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> dict[str, Any]:
        if self._started or self._closing:
            raise LipsyncError(PUBLISHER_FAILED, "LiveKit publisher was already started")
        self._started = True
        self._sources = LiveKitSources(self._fmt, audio_queue_size_ms=self._audio_queue_size_ms)
        try:
            await self._connect_and_publish()
        except BaseException:
            await self.aclose()
            raise
        self._connected = True
        self._log.info("livekit_published", url=redact_url(self._url), width=self._fmt.width,
                       height=self._fmt.height, fps=self._fmt.fps,
                       sample_rate=self._fmt.sample_rate)
        return {"kind": "livekit", "room": self._room_name, "identity": self._identity}

    async def aclose(self) -> None:
        async with self._close_lock:
            if self._closed.is_set():
                return
            self._closing = True
            self._connected = False
            if self._reconnect_task is not None:
                self._reconnect_task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._reconnect_task
            # Reverse order of creation: the sources, then the room.
            if self._sources is not None:
                await self._sources.aclose()
            room, self._room = self._room, None
            if room is not None:
                await self._disconnect_quietly(room)
            self._closed.set()
            if self._started:
                self._log.info("livekit_closed", frames_pushed=self.frames_pushed,
                               frames_dropped=self.frames_dropped, reconnects=self.reconnects)

    @property
    def healthy(self) -> bool:
        return self._connected and not self._closing

    @property
    def video_fps(self) -> float:
        """Video frames per second actually handed to the source over the last second."""
        return self._sources.video_fps if self._sources is not None else 0.0

    # -- media -----------------------------------------------------------------------

    async def push(self, frame: np.ndarray, audio: np.ndarray,
                   timestamp_us: int | None = None) -> None:
        if self._ended is not None:
            raise self._ended
        if not self._started or self._closing or self._sources is None:
            raise LipsyncError(PUBLISHER_FAILED, "LiveKit publisher is not running")
        check_frame(frame, self._fmt)
        if not self._connected:
            self.frames_dropped += 1
            return
        await self._sources.capture(frame, audio, timestamp_us)
        self.frames_pushed += 1

    def drop_queued(self) -> None:
        if self._sources is not None:
            self._sources.clear()

    # -- connection ------------------------------------------------------------------

    async def _connect_and_publish(self) -> None:
        """One attempt: token, connect, publish both tracks. Raises LipsyncError."""
        assert self._sources is not None
        if self._fixed_token is not None:
            token = self._fixed_token
        else:
            assert self._api_key is not None and self._api_secret is not None
            token = mint_token(self._api_key, self._api_secret, self._room_name, self._identity,
                               self._token_ttl_s)
        self._last_token = token
        self._generation += 1
        generation = self._generation
        room: RoomLike | None = None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                room = await self._connector.connect(
                    self._url,
                    token,
                    timeout_s=self._connect_timeout_s,
                    on_disconnected=lambda reason: self._on_disconnected(generation, reason),
                )
                # New tracks per connection: a track belongs to the room it was
                # published in, the sources outlive rooms.
                video_track = rtc.LocalVideoTrack.create_video_track(
                    "avatar-video", self._sources.video
                )
                audio_track = rtc.LocalAudioTrack.create_audio_track(
                    "avatar-audio", self._sources.audio
                )
                await room.local_participant.publish_track(
                    video_track, rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_CAMERA)
                )
                await room.local_participant.publish_track(
                    audio_track,
                    rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE),
                )
        except TimeoutError:
            if room is not None:
                await self._disconnect_quietly(room)
            raise LipsyncError(
                PUBLISHER_FAILED,
                f"LiveKit at {redact_url(self._url)} did not connect and publish within "
                f"{self._connect_timeout_s:g} s (check livekit.url and that the server is "
                "reachable, or raise livekit.connect_timeout_s)",
            ) from None
        except asyncio.CancelledError:
            if room is not None:
                await self._disconnect_quietly(room)
            raise
        except Exception as exc:
            if room is not None:
                await self._disconnect_quietly(room)
            stage = "publish tracks in" if room is not None else "connect to"
            raise LipsyncError(
                PUBLISHER_FAILED,
                f"could not {stage} LiveKit room {self._room_name!r} at {redact_url(self._url)}: "
                f"{self._scrub(str(exc)) or type(exc).__name__} (check livekit.url, "
                "livekit.api_key and livekit.api_secret)",
            ) from None
        self._room = room

    def _on_disconnected(self, generation: int, reason: str) -> None:
        if self._closing or generation != self._generation or not self._connected:
            return
        self._connected = False
        terminal = TERMINAL_REASONS.get(reason)
        if terminal is not None:
            # Retrying would only repeat it (two sessions of one identity would kick each
            # other out in a loop): the next push ends the session with this error.
            self._log.error("livekit_disconnected_for_good", reason=reason)
            self._ended = LipsyncError(
                PUBLISHER_FAILED,
                f"LiveKit ended the connection to room {self._room_name!r} as {self._identity!r}: "
                f"{reason} ({terminal})",
            )
            return
        self._log.warning("livekit_disconnected", reason=reason)
        if self._reconnect_task is None or self._reconnect_task.done():
            self._reconnect_task = asyncio.get_running_loop().create_task(
                self._reconnect(), name="livekit-reconnect"
            )
            self._reconnect_task.add_done_callback(self._log_task_failure)

    async def _reconnect(self) -> None:
        old_room, self._room = self._room, None
        if old_room is not None:
            await self._disconnect_quietly(old_room)
        delay = self._initial_backoff_s
        attempt = 0
        dropped_before = self.frames_dropped
        while not self._closing:
            attempt += 1
            try:
                await self._connect_and_publish()
            except LipsyncError as exc:
                self._log.warning("livekit_reconnect_failed", attempt=attempt,
                                  retry_in_s=delay, error=exc.message)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self._max_backoff_s)
                continue
            self.reconnects += 1
            self._connected = True
            self._log.info("livekit_reconnected", attempt=attempt,
                           frames_dropped=self.frames_dropped - dropped_before)
            return

    def _log_task_failure(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            self._log.error("livekit_reconnect_crashed", error=repr(task.exception()))

    async def _disconnect_quietly(self, room: RoomLike) -> None:
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                await room.disconnect()
        except Exception as exc:  # the room is being dropped either way
            self._log.warning("livekit_disconnect_failed", error=self._scrub(repr(exc)))

    def _scrub(self, text: str) -> str:
        """Remove anything secret an SDK error might echo back (URLs carry the token)."""
        for secret in (
            self._last_token,
            self._fixed_token,
            self._api_secret.get_secret_value() if self._api_secret is not None else None,
            self._api_key.get_secret_value() if self._api_key is not None else None,
        ):
            if secret:
                text = text.replace(secret, "***")
        return text
