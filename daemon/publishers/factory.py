"""Chooses and builds the publisher of a session from the settings."""

from __future__ import annotations

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
    *,
    room_connector: "RoomConnector | None" = None,
) -> Publisher:
    """Raises LipsyncError when the start message or the config lacks what the sink needs."""
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
    try:
        key, secret = lk.key(), lk.secret()
    except ConfigError as exc:
        raise LipsyncError(PUBLISHER_FAILED, str(exc)) from None
    missing = [
        f"livekit.{name} (env LIPSYNC_LIVEKIT__{name.upper()}, or livekit.{name}_file)"
        for name, value in (("api_key", key), ("api_secret", secret))
        if value is None or not value.get_secret_value()
    ]
    if missing:
        raise LipsyncError(
            PUBLISHER_FAILED, f"LiveKit credentials are not configured: set {' and '.join(missing)}"
        )
    assert key is not None and secret is not None
    from daemon.publishers.livekit import LiveKitPublisher  # the SDK loads only when used

    return LiveKitPublisher(
        url=lk.url,
        api_key=key,
        api_secret=secret,
        room=livekit_room,
        identity=livekit_identity or f"{lk.default_identity_prefix}{session_id}",
        fmt=fmt,
        session_id=session_id,
        token_ttl_s=lk.token_ttl_s,
        reconnect_max_backoff_s=lk.reconnect_max_backoff_s,
        connect_timeout_s=lk.connect_timeout_s,
        room_connector=room_connector,
    )
