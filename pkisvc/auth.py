"""Bearer tokens and scopes.

Tokens are never stored: settings and the backend keep their sha256, and every presented
token is compared against every known hash in constant time.  `admin` implies `read` and
`audit`, never `secrets` nor `report` (the Salt master's, for host reports).
"""
from __future__ import annotations

import functools
import hmac
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, TypeVar, cast

from flask import current_app, g, request

from pkisvc.errors import Forbidden, Unauthorized
from pkisvc.store import CertStore
from pkisvc.tokens import hash_token

log = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])
IMPLIES = {"admin": {"admin", "read", "audit"}, "read": {"read"}, "secrets": {"secrets"},
           "audit": {"audit"}, "report": {"report"}}


@dataclass(frozen=True)
class Principal:
    name: str
    scopes: frozenset[str]
    stale: float | None = None  # found in a tokens list served stale (Vault unreachable)


def effective_scopes(scopes: tuple[str, ...] | list[str]) -> frozenset[str]:
    out: set[str] = set()
    for s in scopes:
        out |= IMPLIES.get(s, set())
    return frozenset(out)


class RefusalLog:
    """Log refused requests (401/403) at most once per `every` seconds per process, with counts.

    The first refusal after a quiet spell is logged at once; those that follow within the
    window are summed into one line when it ends (a timer, so the tail of a burst is not lost
    until the next refusal).  Only the status, the Flask rule and the peer address are logged:
    never a header, never the token.  Nothing is written to the backend: an unauthenticated
    client must not be able to drive writes.  `/metrics` counts every refusal exactly
    (`pkisvc_auth_refused_total`).
    """

    def __init__(self, every: float = 10.0) -> None:
        self.every = every
        self._lock = threading.Lock()
        self._last = -every
        self._counts: dict[str, int] = {}
        self._peers: set[str] = set()
        self._more_peers = False
        self._timer: threading.Timer | None = None

    def note(self, status: str, endpoint: str, peer: str | None) -> None:
        """Record one refused request."""
        with self._lock:
            now = time.monotonic()
            if not self._counts and now - self._last >= self.every:
                self._last = now
                line = f"refused authentication: {status} on {endpoint} from {peer or '?'}"
            else:
                key = f"{status} on {endpoint}"
                self._counts[key] = self._counts.get(key, 0) + 1
                if len(self._peers) < 5:
                    self._peers.add(peer or "?")
                elif (peer or "?") not in self._peers:
                    self._more_peers = True
                if self._timer is None:
                    self._timer = threading.Timer(max(self._last + self.every - now, 0.0),
                                                  self.flush)
                    self._timer.daemon = True
                    self._timer.start()
                return
        log.warning("%s", line)

    def flush(self) -> None:
        """Log the refusals summed since the last line (the timer calls it)."""
        with self._lock:
            counts, peers, more = self._counts, self._peers, self._more_peers
            self._counts, self._peers, self._more_peers, self._timer = {}, set(), False, None
            self._last = time.monotonic()
        if counts:
            log.warning("refused authentication: %d more in %.0fs (%s) from %s",
                        sum(counts.values()), self.every,
                        ", ".join(f"{n} x {k}" for k, n in sorted(counts.items())),
                        ", ".join(sorted(peers)) + (" and others" if more else ""))


REFUSALS = RefusalLog()


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
        kept = store.tokens_seen()  # within vault.version_ttl of a read (a revocation too)
        found = _match(digest, [(t.name, t.sha256, t.scopes) for t in kept.value], kept.stale)
    if found is None:
        raise Unauthorized("unknown token")
    return found


def _match(digest: bytes, candidates: list[tuple[str, str, tuple[str, ...]]],
           stale: float | None = None) -> Principal | None:
    found: Principal | None = None
    for name, sha, scopes in candidates:
        if hmac.compare_digest(digest, sha.encode()) and found is None:
            found = Principal(name, effective_scopes(scopes), stale)
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
