"""One answer for each hot read: `GET /v1/certs/<item>` and `GET /v1/pillar/<minion>`.

`cert` and `pillar` decide the status, the ETag, the body and the delivery state; the WSGI
fast path (`pkisvc.fastpath`) and the Flask views (`pkisvc.api`) both call them, so the two
cannot disagree.  Refusals and failures are raised (`PkiError` or anything else) and become
JSON in one place, Flask's error handlers: the fast path hands what it met to Flask in the
WSGI environ (`LEARNED`), and the view raises it again instead of asking the backend twice.

The bodies are made once per version (`Bodies`): that is what makes these reads fast.
"""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Mapping

from pkisvc import auth
from pkisvc.errors import BackendUnavailable, InvalidRequest, NotFound
from pkisvc.model import CERT_FILES, ITEMS, MINION_ID, check_text
from pkisvc.store import CertStore

# WSGI environ key: the exception the fast path met on a hot read, for the Flask view to raise.
# Clients cannot set it (their headers arrive as HTTP_* keys).
LEARNED = "pkisvc.hot_read.error"
JSON = ("Content-Type", "application/json")
# On an answer made from memory while the backend could not be reached: the seconds since
# what it holds was last confirmed (docs/decisions.md, "Reads within a bound").
STALE = "PKISVC-Stale"


@dataclass(frozen=True)
class Ask:
    """What a hot read was asked with, taken from a Flask request or a WSGI environ."""

    authorization: str | None = None
    args: Mapping[str, str] = field(default_factory=dict)
    if_none_match: str | None = None
    remote_addr: str | None = None


@dataclass(frozen=True)
class Answer:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]


class Bodies:
    """JSON bodies of the hot reads, made once per version."""

    def __init__(self, store: CertStore) -> None:
        self.store = store
        self._version = 0
        self._cache: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()
        # version -> (its record, its summary encoded): the record kept to tell a store
        # replaced under us (a record of another store under the same number) from ours
        self._summaries: dict[int, tuple[object, bytes]] = {}
        # The last `/v1/versions` answer, by the latest version it lists up to.
        self._listed: tuple[int | None, bytes] = (-1, b"")

    def _get(self, version: int, key: tuple[str, str], make: Callable[[], bytes]) -> bytes:
        if version == self._version:
            hit = self._cache.get(key)
            if hit is not None:
                return hit
        body = make()
        with self._lock:
            if version > self._version:  # a newer version: older answers are not asked often
                self._version, self._cache = version, {}
            if version == self._version:
                self._cache[key] = body
        return body

    def versions(self) -> bytes:
        """`/v1/versions`: every record's summary, newest first.  A record never changes, so
        each summary is encoded once; an answer joins them (1,000 versions: 1.4 MB)."""
        seen = self.store.latest_seen()  # within vault.version_ttl: no Vault read when held
        latest = seen.value
        with self._lock:
            made, listed = self._summaries, self._listed
        if listed[0] == latest and seen.stale is None:  # stale: Vault is away, read (503)
            return listed[1]  # records never change: the same versions, the same answer
        records = [r for r in self.store.versions() if latest is None or r.version <= latest]
        for r in records:
            held = made.get(r.version)
            if held is None or (held[0] is not r and held[0] != r):
                made[r.version] = (r, json.dumps(r.summary(), sort_keys=True,
                                                 separators=(",", ":")).encode())
        body = b'{"versions":[' + b",".join(made[r.version][1] for r in records) + b"]}"
        with self._lock:
            self._listed = (latest, body)
        return body

    def cert(self, version: int, item: str) -> bytes:
        """`/v1/certs/<item>` for version."""
        def make() -> bytes:
            v, rec, pem = self.store.item(item, version)
            return json.dumps({"item": item, "version": v, "pem": pem.decode(),
                               **rec.to_dict()}).encode()
        return self._get(version, ("cert", item), make)

    def pillar(self, version: int, role: str) -> bytes:
        """`/v1/pillar/<minion>?role=<role>` for version (the role must exist)."""
        names = self.store.settings.roles[role]

        def make() -> bytes:
            gen = self.store.read(version)
            files = self.store.host_files(gen, names)
            by_file = {CERT_FILES[i]: gen.record.items[i].fingerprint
                       for i in ("server", "kubecfg")}
            by_file["ca.crt"] = gen.record.items["ca"].fingerprint
            return json.dumps({
                "version": version, "role": role,
                "files": {n: b.decode() for n, b in files.items()},
                "fingerprints": {n: by_file[n] for n in names if n in by_file},
                "trust": list(gen.record.trust)}).encode()
        return self._get(version, ("pillar", role), make)


# --- the two answers ------------------------------------------------------------------------

def cert(store: CertStore, bodies: Bodies, ask: Ask, item: str) -> Answer:
    """`GET /v1/certs/<item>[?version=N]`: the item's record and certificate (scope `read`)."""
    principal = auth.allowed(store, ask.authorization, "read")
    asked = query_int(ask.args, "version", 1, 10**9)
    version, stale = (asked, None) if asked else _latest(store)
    return Answer(200, bodies.cert(version, item_name(item)),
                  (JSON, *stale_header(stale, principal.stale)))


def pillar(store: CertStore, bodies: Bodies, ask: Ask, minion: str) -> Answer:
    """`GET /v1/pillar/<minion>?role=<role>`: the role's host files (scope `secrets`).

    ETag is the version; a matching `If-None-Match` is a 304.  Either way, after the body is
    made, the minion's delivery state says it holds this version (a 304: from the master's
    cache); only a change of version or role is written and audited.
    """
    principal = auth.allowed(store, ask.authorization, "secrets")
    if not MINION_ID.fullmatch(minion):
        raise InvalidRequest("not a minion id")
    role = ask.args.get("role")
    if not role:
        raise InvalidRequest("query parameter 'role' is required")
    check_text("query parameter 'role'", role, 64)  # text no role is named by: a 400
    names = store.settings.roles.get(role)
    if names is None:
        raise NotFound(f"no role {role[:64]!r}")
    version, stale = _latest(store)
    etag = f'"{version}"'
    unchanged = none_match(ask.if_none_match, str(version))
    if stale is not None and not unchanged:
        # Key material leaves only with its delivery recorded: not while Vault is away.
        raise BackendUnavailable(f"the backend cannot be reached (for {stale:.0f}s); only "
                                 "revalidations of the version held are answered")
    body = b"" if unchanged else bodies.pillar(version, role)
    store.record_pillar(actor=principal.name, minion=minion, role=role, version=version,
                        items=() if unchanged else tuple(names), remote_addr=ask.remote_addr)
    if unchanged:
        return Answer(304, b"", (("ETag", etag), *stale_header(stale, principal.stale)))
    return Answer(200, body, (JSON, ("ETag", etag)))


# --- parts -----------------------------------------------------------------------------------

def _latest(store: CertStore) -> tuple[int, float | None]:
    """The latest version and, when it is served from memory in an outage, its age."""
    seen = store.latest_seen()
    if seen.value is None:
        raise NotFound("the store is empty: run `pkisvc init`")
    return seen.value, seen.stale


def stale_header(*ages: float | None) -> tuple[tuple[str, str], ...]:
    """The stale marker for an answer made of parts of these ages (None: fresh)."""
    known = [a for a in ages if a is not None]
    return ((STALE, str(int(max(known)))),) if known else ()


def item_name(item: str) -> str:
    if item not in ITEMS:
        raise NotFound(f"no item {item[:64]!r} (items: {', '.join(ITEMS)})")
    return item


def query_int(args: Mapping[str, str], name: str, lo: int, hi: int) -> int | None:
    text = args.get(name)
    if text is None:
        return None
    # isdigit() alone accepts digits int() refuses (superscripts such as '¹').
    if not (text.isascii() and text.isdigit()) or not lo <= int(text) <= hi:
        raise InvalidRequest(f"query parameter {name!r} must be an integer {lo}..{hi}")
    return int(text)


# One member of an If-None-Match list: a quoted entity tag, weak or not, or a bare token (`*`,
# or a tag a lenient client forgot to quote).
_TAG = re.compile(r'(?:W/|w/)?"([^"]*)"|([^\s,]+)')


def none_match(header: str | None, opaque: str) -> bool:
    """Tell whether `If-None-Match: header` matches the current ETag `"<opaque>"`.

    RFC 9110 §13.1.2: `*` matches any current representation; otherwise any member of the
    comma-separated list matches by weak comparison (`W/"7"` matches `"7"`).
    """
    if not header:
        return False
    for m in _TAG.finditer(header):
        quoted, bare = m.groups()
        if bare is not None:
            if bare == "*" or bare.removeprefix("W/").removeprefix("w/") == opaque:
                return True
        elif quoted == opaque:
            return True
    return False
