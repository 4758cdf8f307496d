"""Wire protocol v1: the only place where message shapes are defined."""

from schemas.wire import (  # noqa: F401
    PROTOCOL_VERSION,
    SESSION_ID_PATTERN,
    SUPPORTED_SAMPLE_RATES,
    AudioParams,
    ControlMessage,
    ErrorBody,
    ErrorEvent,
    Event,
    LiveKitParams,
    PlaybackFinishedEvent,
    ReadyEvent,
    SessionStart,
    SessionStartReply,
    SessionStop,
    SessionStopReply,
    SpeakingEvent,
    StatusReply,
    StoppedEvent,
    VideoParams,
    all_json_schemas,
)
