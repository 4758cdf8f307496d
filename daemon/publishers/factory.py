"""Chooses and builds the publisher of a session from the settings."""

from __future__ import annotations

import base64
import json
import re
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from daemon.config import ConfigError, Settings
from daemon.errors import INVALID_MESSAGE, PUBLISHER_FAILED, LipsyncError
from daemon.publishers.base import MediaFormat, Publisher
from daemon.publishers.filesink import FileSinkPublisher
from daemon.publishers.null import NullPublisher

if TYPE_CHECKING:
    from daemon.publishers.livekit import RoomConnector


def make_publisher(
    settings: Settings,
    session_id: str,
    fmt: MediaFormat,
    livekit_room: str | None,
    livekit_identity: str | None,
    livekit_token: str | None = None,
    *,
    room_connector: "RoomConnector | None" = None,
) -> Publisher:
    """Raises LipsyncError when the start message or the config lacks what the sink needs,
    or asks for a room or identity the config does not allow."""
    if settings.sink_kind() == "none":
        return NullPublisher(fmt, session_id)
    if settings.sink_kind() == "livekit-local":
        from daemon.publishers.livekit_local import LiveKitLocalPublisher  # loads the SDK

        return LiveKitLocalPublisher(fmt, session_id)
    if settings.sink_kind() == "file":
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        path = settings.recordings_dir() / f"{session_id}-{stamp}.mp4"
        return FileSinkPublisher(path, fmt, session_id)

    lk = settings.livekit
    if not livekit_room:
        raise LipsyncError(
            INVALID_MESSAGE,
            "the daemon publishes to LiveKit: the start message needs 'livekit': "
            "{'room': ...}",
        )
    if not lk.url:
        raise LipsyncError(
            PUBLISHER_FAILED,
            "output.sink is 'livekit' but livekit.url is not set "
            "(config livekit.url or env LIPSYNC_LIVEKIT__URL)",
        )
    identity = livekit_identity or f"{lk.default_identity_prefix}{session_id}"
    if livekit_token is None and lk.tokens_from_orchestrator:
        raise LipsyncError(INVALID_MESSAGE, "this daemon joins LiveKit only with a token from the orchestrator "
                                            "(livekit.tokens_from_orchestrator): the start needs livekit.token")
    if livekit_token is not None:
        claims = token_claims(livekit_token)
        granted = (claims.get("video") or {}).get("room")
        if granted != livekit_room:
            raise LipsyncError(INVALID_MESSAGE, f"livekit.token grants room {granted!r}, not the start's "
                                                f"livekit.room {livekit_room!r}: mint it for that room")
        identity = str(claims.get("sub") or identity)
    _check_allowed("room", livekit_room, lk.room_pattern)
    _check_allowed("identity", identity, lk.identity_pattern)
    from daemon.publishers.livekit import LiveKitPublisher  # the SDK loads only when used

    if livekit_token is not None:
        return LiveKitPublisher(
            url=lk.url, api_key=None, api_secret=None, room=livekit_room, identity=identity, fmt=fmt,
            session_id=session_id, reconnect_max_backoff_s=lk.reconnect_max_backoff_s,
            connect_timeout_s=lk.connect_timeout_s, room_connector=room_connector, token=livekit_token,
        )
    try:
        key, secret, missing = lk.credentials()  # each secret file read once per start
    except ConfigError as exc:
        raise LipsyncError(PUBLISHER_FAILED, str(exc)) from None
    if missing:
        raise LipsyncError(
            PUBLISHER_FAILED, f"LiveKit credentials are not configured: set {' and '.join(missing)}"
        )
    assert key is not None and secret is not None
    return LiveKitPublisher(
        url=lk.url,
        api_key=key,
        api_secret=secret,
        room=livekit_room,
        identity=identity,
        fmt=fmt,
        session_id=session_id,
        token_ttl_s=lk.token_ttl_s,
        reconnect_max_backoff_s=lk.reconnect_max_backoff_s,
        connect_timeout_s=lk.connect_timeout_s,
        room_connector=room_connector,
    )


def _check_allowed(what: str, value: str, pattern: str | None) -> None:
    if pattern is not None and re.fullmatch(pattern, value) is None:
        raise LipsyncError(INVALID_MESSAGE, f"LiveKit {what} {value!r} is not allowed here: it must match "
                                            f"livekit.{what}_pattern {pattern!r}")


def token_claims(token: str) -> dict:
    """The claims of a LiveKit join token, read without checking its signature (LiveKit
    checks it; the daemon only needs the room and identity it names)."""
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        if not isinstance(claims, dict):
            raise ValueError("not an object")
        return claims
    except (IndexError, ValueError, UnicodeDecodeError) as exc:
        raise LipsyncError(INVALID_MESSAGE, f"livekit.token is not a LiveKit join token (a JWT): {exc}") from None
