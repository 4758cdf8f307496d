"""Parsing at the NATS boundary: bytes -> validated wire model, or a LipsyncError that
says exactly what to change."""

from __future__ import annotations

import json
import re
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from daemon import errors
from daemon.errors import LipsyncError
from schemas import PROTOCOL_VERSION, SESSION_ID_PATTERN

M = TypeVar("M", bound=BaseModel)
_SESSION_ID = re.compile(SESSION_ID_PATTERN)


def valid_session_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_SESSION_ID.fullmatch(value))


def session_id_hint(data: bytes) -> str | None:
    """The session id of a message that failed validation, when it is a safe one, so
    that its error event can go to that session's events subject."""
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return None
    if isinstance(obj, dict) and valid_session_id(obj.get("session_id")):
        return obj["session_id"]
    return None


def parse_json_message(model: type[M], data: bytes, what: str) -> M:
    try:
        obj = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise LipsyncError(errors.BAD_JSON, f"{what}: body is not valid JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise LipsyncError(errors.BAD_JSON, f"{what}: body must be a JSON object, got {type(obj).__name__}")
    if "v" in model.model_fields:
        if "v" not in obj and model.model_fields["v"].is_required():
            raise LipsyncError(errors.BAD_VERSION, f'{what}: missing "v"; send "v": {PROTOCOL_VERSION}')
        if obj.get("v", PROTOCOL_VERSION) != PROTOCOL_VERSION:
            raise LipsyncError(
                errors.BAD_VERSION,
                f'{what}: protocol version {obj["v"]!r} is not supported; send "v": {PROTOCOL_VERSION}',
            )
    if "session_id" in model.model_fields and "session_id" in obj and not valid_session_id(obj["session_id"]):
        raise LipsyncError(
            errors.BAD_SESSION_ID,
            f"{what}: session_id {str(obj['session_id'])[:64]!r} is not allowed: use 1-128 "
            "characters from A-Z a-z 0-9 _ -",
        )
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        raise LipsyncError(errors.INVALID_MESSAGE, f"{what}: {describe_validation_error(exc)}") from None


def describe_validation_error(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(p) for p in err["loc"]) or "(message)"
        kind = err["type"]
        if kind == "extra_forbidden":
            parts.append(f"unknown field '{loc}'")
        elif kind == "missing":
            parts.append(f"missing field '{loc}'")
        else:
            parts.append(f"field '{loc}': {err['msg']}")
    more = len(exc.errors()) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")
