"""Bearer tokens and scopes.

Tokens are never stored: settings and the backend keep their sha256, and every presented
token is compared against every known hash in constant time.  `admin` implies `read` and
`audit`, never `secrets`.
"""
from __future__ import annotations

import functools
import hmac
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, cast

from flask import current_app, g, request

from pkisvc.errors import Forbidden, Unauthorized
from pkisvc.store import CertStore
from pkisvc.tokens import hash_token

F = TypeVar("F", bound=Callable[..., Any])
IMPLIES = {"admin": {"admin", "read", "audit"}, "read": {"read"}, "secrets": {"secrets"},
           "audit": {"audit"}}


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]


def effective_scopes(scopes: tuple[str, ...] | list[str]) -> frozenset[str]:
    out: set[str] = set()
    for s in scopes:
        out |= IMPLIES.get(s, set())
    return frozenset(out)


def authenticate(store: CertStore, header: str | None) -> Principal:
    """Return who holds the bearer token in header.

    Raises: Unauthorized (no token, a malformed header, an unknown or revoked token).
    """
    if not header or not header.startswith("Bearer "):
        raise Unauthorized("a bearer token is required (Authorization: Bearer <token>)")
    token = header[len("Bearer "):].strip()
    if not token or len(token) > 512:
        raise Unauthorized("unknown token")
    digest = hash_token(token).encode()
    # Tokens from the settings first: they need no backend read (a Vault round trip).  Within
    # each list every hash is compared, so timing tells nothing about which one matched.
    found = _match(digest, [(t.name, t.sha256, t.scopes) for t in store.settings.tokens])
    if found is None:
        found = _match(digest, [(t.name, t.sha256, t.scopes) for t in store.tokens()])
    if found is None:
        raise Unauthorized("unknown token")
    return found


def _match(digest: bytes, candidates: list[tuple[str, str, tuple[str, ...]]]
           ) -> Principal | None:
    found: Principal | None = None
    for name, sha, scopes in candidates:
        if hmac.compare_digest(digest, sha.encode()) and found is None:
            found = Principal(name, effective_scopes(scopes))
    return found


def requires(scope: str) -> Callable[[F], F]:
    """Let the view run only for a token with scope; sets g.actor."""
    def wrap(view: F) -> F:
        @functools.wraps(view)
        def inner(*args: Any, **kwargs: Any) -> Any:
            check(scope)
            return view(*args, **kwargs)
        return cast(F, inner)
    return wrap


def check(scope: str) -> Principal:
    store: CertStore = current_app.extensions["pkisvc"]
    principal = allowed(store, request.headers.get("Authorization"), scope)
    g.actor = principal.name
    return principal


def allowed(store: CertStore, header: str | None, scope: str) -> Principal:
    """Return who holds the bearer token in header, if the token has scope.

    Raises: Unauthorized (as `authenticate`), Forbidden (the token lacks scope).
    """
    principal = authenticate(store, header)
    if scope not in principal.scopes:
        raise Forbidden(f"token {principal.name!r} lacks the {scope!r} scope")
    return principal
