"""Pydantic v2 models of every NATS message (protocol v1).

Validated once, at the NATS boundary. ``lipsync schema`` prints their JSON Schema for
producers written in other languages.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, model_validator

PROTOCOL_VERSION = 1
# Python's re: "$" also matches before a trailing newline, so "abc\n" would pass; \A..\Z
# is the whole string. The models keep "^...$": pydantic's Rust regex and JSON Schema
# (ECMA) read "$" as the end of the text, and neither knows \Z.
SESSION_ID_PATTERN = r"\A[A-Za-z0-9_-]{1,128}\Z"
_SESSION_ID_SCHEMA_PATTERN = r"^[A-Za-z0-9_-]{1,128}$"
SUPPORTED_SAMPLE_RATES = (8000, 16000, 22050, 24000, 32000, 44100, 48000)

SessionId = Annotated[str, Field(pattern=_SESSION_ID_SCHEMA_PATTERN, description="[A-Za-z0-9_-]{1,128}")]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class LiveKitParams(_Strict):
    room: Annotated[str, Field(min_length=1, max_length=256)]
    identity: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    # A join token minted by the orchestrator for this room: used as it is (the daemon
    # then needs no LiveKit key or secret, and the identity is the token's).
    token: Annotated[str, Field(min_length=16, max_length=8192)] | None = None


class AudioParams(_Strict):
    sample_rate: Literal[8000, 16000, 22050, 24000, 32000, 44100, 48000] = 16000


class VideoParams(_Strict):
    fps: Annotated[int, Field(ge=1, le=60)] | None = None


class SessionStart(_Strict):
    """``<prefix>.session.start``: request/reply or plain publish."""

    v: Literal[1]
    session_id: SessionId
    avatar_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    idle_video_url: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    livekit: LiveKitParams | None = None
    audio: AudioParams = AudioParams()
    video: VideoParams = VideoParams()

    @model_validator(mode="after")
    def _one_avatar_source(self) -> "SessionStart":
        if (self.avatar_id is None) == (self.idle_video_url is None):
            raise ValueError("give exactly one of 'avatar_id' or 'idle_video_url'")
        return self


class SessionStop(_Strict):
    """``<prefix>.session.stop``."""

    v: Literal[1]
    session_id: SessionId


class ControlMessage(_Strict):
    """``<prefix>.control.<session_id>``: flush = end of utterance, clear = interrupt."""

    v: Literal[1] = 1
    op: Literal["flush", "clear"]


class ErrorBody(_Strict):
    code: str
    message: str


class SessionStartReply(_Strict):
    ok: bool
    session_id: str | None = None
    existing: bool = False
    width: int | None = None
    height: int | None = None
    fps: int | None = None
    output: dict[str, Any] | None = None
    error: ErrorBody | None = None


class SessionStopReply(_Strict):
    ok: bool
    session_id: str | None = None
    error: ErrorBody | None = None


class ControlReply(_Strict):
    ok: bool
    session_id: str | None = None
    op: str | None = None
    error: ErrorBody | None = None


class StatusAdmission(_Strict):
    """How the daemon admits sessions: their speaking demand against a frame budget."""

    sessions: int = Field(description="most sessions at the default video.fps admitted: daemon.max_sessions, "
                          "or fewer when the frame budget holds fewer")
    max_sessions: int = Field(description="daemon.max_sessions: the upper bound whatever the budget")
    capacity_fps: float | None = Field(description="frames/s admission may promise; null without a budget")
    source: Literal["measured", "config", "max_sessions"] = Field(
        description="measured: by the GPU worker at start; config: daemon.capacity_fps; max_sessions: no "
        "frame budget (no model, or not measured), only the session count applies")
    demand_fps: float = Field(description="sum over admitted sessions of fps x speech_duty")
    speech_duty: float = Field(description="daemon.speech_duty: share of the time a session is counted speaking")


class StatusReply(_Strict):
    sessions: list[dict[str, Any]]
    capacity: int = Field(description="most sessions admitted at the default video.fps (admission.sessions)")
    active: int
    accepting: bool
    device: dict[str, Any]
    # Added after the first v1 daemons: optional, so that replies of those still parse.
    admission: StatusAdmission | None = None
    speaking: int | None = Field(None, description="sessions with an utterance buffered or playing")
    generated_fraction: float | None = Field(
        None, description="over live sessions: speech frames generated / speech frames that needed "
        "generation (generated + fallback); null when none needed generation")
    gpu_busy: float | None = Field(None, description="share of recent time the GPU worker was busy; null when "
                                   "not measured")


class _EventBase(_Strict):
    v: Literal[1] = 1
    session_id: str
    ts: float = Field(description="unix time in seconds when the event was sent")


class ReadyEvent(_EventBase):
    type: Literal["ready"] = "ready"
    width: int
    height: int
    fps: int
    output: dict[str, Any]
    timings_ms: dict[str, float]


class SpeakingEvent(_EventBase):
    """The utterance's first frame is being published."""

    type: Literal["speaking"] = "speaking"
    # Where the utterance starts on the session's clock (seconds since the session was ready).
    session_position_s: float
    # Always 0 here: the utterance's own clock at its start (in both events for symmetry).
    utterance_position_s: float = 0.0
    # Kept for v1 producers: equal to session_position_s in this event.
    position_s: float


class PlaybackFinishedEvent(_EventBase):
    """The utterance ended: played to its end, or interrupted (clear, stop)."""

    type: Literal["playback_finished"] = "playback_finished"
    # How much of the utterance was played (its own clock, seconds).
    utterance_position_s: float
    # Where it ended on the session's clock (seconds since the session was ready).
    session_position_s: float
    # Kept for v1 producers: equal to utterance_position_s in this event.
    position_s: float
    interrupted: bool


class ErrorEvent(_EventBase):
    type: Literal["error"] = "error"
    code: str
    message: str


class StoppedEvent(_EventBase):
    type: Literal["stopped"] = "stopped"
    reason: str


Event = Annotated[
    Union[ReadyEvent, SpeakingEvent, PlaybackFinishedEvent, ErrorEvent, StoppedEvent],
    Field(discriminator="type"),
]


def all_json_schemas() -> dict[str, Any]:
    """JSON Schema of every message, keyed by the subject it travels on."""
    from pydantic import TypeAdapter

    return {
        "<prefix>.session.start": SessionStart.model_json_schema(),
        "<prefix>.session.start (reply)": SessionStartReply.model_json_schema(),
        "<prefix>.session.stop": SessionStop.model_json_schema(),
        "<prefix>.session.stop (reply)": SessionStopReply.model_json_schema(),
        "<prefix>.control.<session_id>": ControlMessage.model_json_schema(),
        "<prefix>.control.<session_id> (reply)": ControlReply.model_json_schema(),
        "<prefix>.audio.<session_id>": {
            "description": "raw PCM, signed 16-bit little-endian, mono, at the session's "
            "audio.sample_rate; even length; optional header Lipsync-Seq: increasing integer",
            "contentMediaType": "audio/L16",
        },
        "<prefix>.events.<session_id>": TypeAdapter(Event).json_schema(),
        "<prefix>.errors": _errors_subject_schema(),
        "lipsync service: status": StatusReply.model_json_schema(),
    }


def _errors_subject_schema() -> dict[str, Any]:
    """``<prefix>.errors`` carries the same ``error`` event as a session's events subject,
    for a bad message that names no usable session id and has no reply subject: its
    ``session_id`` is then always ""."""
    schema = ErrorEvent.model_json_schema()
    schema["description"] = (
        "error event for a bad start or stop message that names no usable session id "
        "and has no reply subject; session_id is \"\""
    )
    schema["properties"]["session_id"] = {**schema["properties"]["session_id"], "const": ""}
    return schema
