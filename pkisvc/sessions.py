"""The operator pages' sessions: what a login opens, when it ends (pure; `CertStore` stores).

A login exchanges an API token for a random session id.  The browser keeps the id in its
cookie; the backend keeps only the id's sha256 with the token's name, hash and scopes, so
every worker and replica sees the session and a copy of the store holds no usable cookie.
A session ends at logout, at its absolute expiry (`ui.session_ttl`), after `ui.session_idle`
unused, or as soon as its token is revoked or its scopes change.  Its last use is written
back at most every TOUCH_EVERY seconds (never without an idle limit).
"""
from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

from pkisvc.model import SessionRecord

PREFIX = "pkui_"  # never `pks_`: a session id is not a token, and the API refuses it
TOUCH_EVERY = 60  # seconds between writes of a session's last use
PER_TOKEN = 10  # live sessions one token may hold; a new login ends the oldest beyond it
_SESSION_ID = re.compile(re.escape(PREFIX) + r"[A-Za-z0-9_-]{43}")

# sha256 of a token -> (its name, its scopes as stored), from the settings and the backend
Tokens = Mapping[str, tuple[str, tuple[str, ...]]]


def session_hash(session_id: str) -> str | None:
    """The sha256 (hex) a session is kept under, or None when session_id is not one of ours.

    The hash is taken over a label and the id, so it never equals a token's hash.
    """
    return _digest(session_id) if _SESSION_ID.fullmatch(session_id) else None


def _digest(session_id: str) -> str:
    return hashlib.sha256(b"pkisvc ui session\0" + session_id.encode()).hexdigest()


def new_session(token_sha256: str, token: tuple[str, tuple[str, ...]], *, now: datetime,
                ttl: int) -> tuple[str, SessionRecord]:
    """Make a session id for the token (name, scopes) with that hash, and its record."""
    session_id = PREFIX + secrets.token_urlsafe(32)
    name, scopes = token
    return session_id, SessionRecord(_digest(session_id), name, token_sha256, scopes, created=now,
                                     expires=now + timedelta(seconds=ttl), seen=now)


def ended(session: SessionRecord, token: tuple[str, tuple[str, ...]] | None, *,
          now: datetime, idle: int) -> str | None:
    """Why session no longer lets anyone in at now, or None while it does.

    token: what the token store holds under session.token_sha256 now (None: revoked).
    """
    if now >= session.expires:
        return "expired"
    if idle and now - session.seen >= timedelta(seconds=idle):
        return "idle"
    if token != (session.name, session.scopes):
        return "token revoked or changed"
    return None


def touch_due(session: SessionRecord, *, now: datetime, idle: int) -> bool:
    """Tell whether the session's last use should be written now (only with an idle limit)."""
    return bool(idle) and now - session.seen >= timedelta(seconds=min(TOUCH_EVERY, idle / 10))


def to_end(held: Iterable[SessionRecord], tokens: Tokens, *, now: datetime, idle: int,
           opening: str) -> list[str]:
    """The hashes of sessions to remove before the token with hash `opening` opens another:
    those that ended, and that token's oldest beyond PER_TOKEN - 1.  held: oldest first.
    """
    gone, mine = [], []
    for s in held:  # oldest first (times alone cannot tell logins within one second apart)
        if ended(s, tokens.get(s.token_sha256), now=now, idle=idle):
            gone.append(s.sha256)
        elif s.token_sha256 == opening:
            mine.append(s.sha256)
    return gone + mine[:max(0, len(mine) - (PER_TOKEN - 1))]
