"""Copy a whole store from one backend to another: every version, the audit trail, tokens."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pkisvc.backends.base import Backend
from pkisvc.errors import Conflict, NotFound
from pkisvc.model import AuditEvent

log = logging.getLogger(__name__)

ALL = 10**9  # "every audit event" for Backend.audit(limit=...)


@dataclass(frozen=True)
class Copied:
    versions: int
    events: int
    tokens: int


def migrate(source: Backend, target: Backend) -> Copied:
    """Copy source into the empty target, keeping version numbers.

    Stop writers to the source first: what they write meanwhile is not copied.
    Raises: NotFound when source is empty; Conflict when target holds anything.
    """
    if source.latest() is None:
        raise NotFound(f"{source!r} is empty: nothing to migrate")
    held = target.latest()
    if held is not None or target.audit(limit=1) or target.tokens():
        what = f"version {held}" if held is not None else "audit events or tokens"
        raise Conflict(f"{target!r} is not empty (it holds {what}); refusing to migrate "
                       "into it")
    records = source.versions()
    events = list(reversed(source.audit(limit=ALL)))  # oldest first, so order is kept
    # Each version's change event goes with it (one commit point); the rest are appended.
    change: dict[int, AuditEvent] = {}
    for event in events:
        rec = records[event.version - 1] if event.version and event.version <= len(records) \
            else None
        if (rec is not None and rec.version == event.version and event.version not in change
                and event.action == rec.operation and event.time == rec.created_at):
            change[event.version] = event
    for rec in records:
        gen = source.read(rec.version)
        target.write(gen, expected=rec.version - 1 or None, event=change.get(rec.version))
        log.info("copied version %d", rec.version)
    taken = {id(e) for e in change.values()}
    for event in events:
        if id(event) not in taken:
            target.append_audit(event)
    tokens = source.tokens()
    for token in tokens:
        target.put_token(token)
    return Copied(len(records), len(events), len(tokens))
