"""Errors that reach producers: a stable code and a message that says what to change."""

from __future__ import annotations


class LipsyncError(Exception):
    """An error with a stable machine-readable code, safe to send to producers."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def to_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


# Codes (documented in docs/PROTOCOL.md).
BAD_JSON = "bad_json"
BAD_VERSION = "unsupported_version"
INVALID_MESSAGE = "invalid_message"
BAD_SESSION_ID = "invalid_session_id"
UNKNOWN_SESSION = "unknown_session"
UNKNOWN_AVATAR = "unknown_avatar"
AVATAR_NO_VIDEO = "avatar_without_video"
FIRESTORE_UNAVAILABLE = "firestore_unavailable"
VIDEO_FETCH_FAILED = "video_fetch_failed"
VIDEO_TOO_LARGE = "video_too_large"
VIDEO_INVALID = "video_invalid"
URL_NOT_ALLOWED = "url_not_allowed"
AUDIO_INVALID = "audio_invalid"
AUDIO_OVERFLOW = "audio_buffer_full"
AUDIO_GAP = "audio_gap"
AT_CAPACITY = "at_capacity"
SHUTTING_DOWN = "shutting_down"
PUBLISHER_FAILED = "publisher_failed"
SESSION_CONFLICT = "session_conflict"
AVATAR_PREPARATION_FAILED = "avatar_preparation_failed"
GENERATION_FAILED = "generation_failed"
INTERNAL = "internal_error"
START_TIMEOUT = "start_timeout"
