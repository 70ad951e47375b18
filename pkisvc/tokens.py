"""API tokens made by `pkisvc token create`: their names, their making, their hashes.

Only a token's sha256 is ever kept; the token itself is seen once, when it is made.
"""
from __future__ import annotations

import hashlib
import re
import secrets
from datetime import datetime

from pkisvc.errors import Conflict, InvalidRequest
from pkisvc.model import SCOPES, TokenRecord

_TOKEN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def hash_token(token: str) -> str:
    """The sha256 (hex) under which a token is kept."""
    return hashlib.sha256(token.encode()).hexdigest()


def new_token(name: str, scopes: list[str] | tuple[str, ...], *, configured: set[str],
              now: datetime) -> tuple[str, TokenRecord]:
    """Make a token and the record that keeps its hash.

    configured: names of the tokens defined in the settings (never shadowed).
    Raises: InvalidRequest for a bad name or scope; Conflict for a configured name.
    """
    if not _TOKEN_NAME.fullmatch(name):
        raise InvalidRequest(f"token name {name!r}: letters, digits, '.', '_', '-' only")
    if not scopes or not set(scopes) <= set(SCOPES):
        raise InvalidRequest(f"scopes must be drawn from {', '.join(SCOPES)}")
    if name in configured:
        raise Conflict(f"a token named {name!r} is defined in the settings")
    token = "pks_" + secrets.token_urlsafe(32)
    return token, TokenRecord(name, hash_token(token), tuple(scopes), now)
