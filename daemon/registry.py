"""Session registry in a JetStream KV bucket: one owner per session id across daemons.

With several daemons in one queue group, two starts of the same session id can land on
two daemons. Each daemon claims the id with an atomic create in the bucket before
starting the session; the second claim fails and is answered with `session_conflict`.
Entries expire after `nats.registry_ttl_s` unless their owner refreshes them, so the ids
of a daemon that died free themselves.

Every write after the claim names the revision it saw (create -> update(last=rev) ->
delete(last=rev)): a refresh after an outage longer than the TTL, when another daemon
has claimed the id meanwhile, fails instead of overwriting that claim, and the session
here is then stopped with an error (``refresh`` returns the ids whose ownership was
lost). A release never deletes another daemon's claim.
"""

from __future__ import annotations

import socket
import uuid
from typing import Any

from daemon import errors
from daemon.errors import LipsyncError
from daemon.log import get_logger

log = get_logger(__name__)


class SessionRegistry:
    def __init__(self, nc: Any, bucket: str, ttl_s: float) -> None:
        self.nc = nc
        self.bucket = bucket
        self.ttl_s = ttl_s
        self.owner = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
        self._kv: Any = None
        self._revisions: dict[str, int] = {}  # session id -> revision of our last write

    async def start(self) -> None:
        from nats.js.api import KeyValueConfig

        js = self.nc.jetstream()
        try:
            try:
                self._kv = await js.key_value(self.bucket)
            except Exception:
                self._kv = await js.create_key_value(KeyValueConfig(bucket=self.bucket, ttl=self.ttl_s, history=1))
        except Exception as exc:
            raise LipsyncError(
                "nats_unavailable",
                f"nats.registry_bucket '{self.bucket}' needs JetStream on the NATS server ({exc!r}): "
                "enable JetStream there, or unset nats.registry_bucket",
            ) from None
        log.info("session registry ready", bucket=self.bucket, owner=self.owner, ttl_s=self.ttl_s)

    async def claim(self, session_id: str) -> None:
        from nats.js.errors import KeyWrongLastSequenceError

        try:
            self._revisions[session_id] = await self._kv.create(session_id, self.owner.encode())
        except KeyWrongLastSequenceError:
            holder = await self._holder(session_id)
            raise LipsyncError(
                errors.SESSION_CONFLICT,
                f"session '{session_id}' is live on another daemon ({holder}): stop it there first "
                "or use a new session_id",
            ) from None

    async def _holder(self, session_id: str) -> str:
        try:
            entry = await self._kv.get(session_id)
            return (entry.value or b"?").decode(errors="replace")
        except Exception:
            return "unknown"

    async def refresh(self, session_ids: list[str]) -> list[str]:
        """Renew our entries (an update renews an entry's age), each against the revision
        we last wrote. Returns the ids another daemon owns now: stop those sessions. An
        entry that merely expired (nobody claimed it meanwhile) is claimed again."""
        from nats.js.errors import KeyWrongLastSequenceError

        lost = []
        for sid in session_ids:
            last = self._revisions.get(sid)
            if last is not None:
                try:
                    self._revisions[sid] = await self._kv.update(sid, self.owner.encode(), last=last)
                    continue
                except KeyWrongLastSequenceError:
                    pass  # expired while NATS was away, or someone else's now
                except Exception as exc:
                    log.warning("session registry refresh failed", session_id=sid, error=repr(exc))
                    continue
            try:
                self._revisions[sid] = await self._kv.create(sid, self.owner.encode())
                log.warning("session registry entry had expired; claimed again", session_id=sid)
            except KeyWrongLastSequenceError:
                self._revisions.pop(sid, None)
                holder = await self._holder(sid)
                log.error("session registry: another daemon owns this session now", session_id=sid,
                          holder=holder)
                lost.append(sid)
            except Exception as exc:
                log.warning("session registry refresh failed", session_id=sid, error=repr(exc))
        return lost

    async def release(self, session_id: str) -> None:
        last = self._revisions.pop(session_id, None)
        if last is None:
            return  # not ours (never claimed here, or lost to another daemon)
        try:
            await self._kv.delete(session_id, last=last)
        except Exception as exc:  # gone already (expired, purged) or claimed by another
            log.debug("session registry release", session_id=session_id, error=repr(exc))
