"""Copy a whole store from one backend to another: every version, the audit trail, tokens."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from pkisvc.backends.base import Backend
from pkisvc.errors import Conflict, NotFound

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
    for rec in records:
        gen = source.read(rec.version)
        target.write(gen, expected=rec.version - 1 or None)
        log.info("copied version %d", rec.version)
    events = list(reversed(source.audit(limit=ALL)))  # oldest first, so order is kept
    for event in events:
        target.append_audit(event)
    tokens = source.tokens()
    for token in tokens:
        target.put_token(token)
    return Copied(len(records), len(events), len(tokens))
