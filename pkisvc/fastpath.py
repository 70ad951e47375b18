"""The hot reads, answered without Flask.

`GET /v1/certs/<item>` and `GET /v1/pillar/<minion>?role=<role>` are what clients and the Salt
master ask for all day.  Once a generation is known their answers never change, so their
bodies are made once per version (`Bodies`), and `FastReads` — a WSGI layer in front of
Flask — answers the ordinary case with a token check, one look at the latest version and the
cached bytes.  Anything else (another path, a query it does not expect, a bad or missing
token, an error) goes to the Flask app, which gives the same answers the slow way.
"""
from __future__ import annotations

import json
import re
import threading
import time
from typing import Any, Callable, Iterable

from pkisvc import auth, metrics
from pkisvc.errors import PkiError
from pkisvc.model import CERT_FILES, ITEMS
from pkisvc.store import CertStore

MINION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,252}$")
_ROLE = re.compile(r"^role=([A-Za-z0-9][A-Za-z0-9_.-]{0,62})$")
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class Bodies:
    """JSON bodies of the hot reads, made once per version."""

    def __init__(self, store: CertStore) -> None:
        self.store = store
        self._version = 0
        self._cache: dict[tuple[str, str], bytes] = {}
        self._lock = threading.Lock()

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


Answer = tuple[str, bytes, list[tuple[str, str]]]
CERTS, PILLAR = "/v1/certs/<item>", "/v1/pillar/<minion_id>"  # the Flask rules they stand for


class FastReads:
    """WSGI layer that answers the ordinary hot reads itself and passes the rest to Flask."""

    def __init__(self, app: WSGIApp, store: CertStore, bodies: Bodies) -> None:
        self.app = app
        self.store = store
        self.bodies = bodies
        # Bound once: looking a labelled child up costs as much as the rest of a request.
        self._count = {(e, s): metrics.REQUESTS.labels("GET", e, s)
                       for e in (CERTS, PILLAR) for s in ("200", "304")}
        self._time = {e: metrics.LATENCY.labels(e) for e in (CERTS, PILLAR)}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        started = time.perf_counter()
        answer: Answer | None = None
        if environ.get("REQUEST_METHOD") == "GET":
            path: str = environ.get("PATH_INFO", "")
            query: str = environ.get("QUERY_STRING", "")
            if path.startswith("/v1/certs/") and not query and path[10:] in ITEMS:
                endpoint = CERTS
                answer = self._cert(environ, path[10:])
            elif path.startswith("/v1/pillar/"):
                m = _ROLE.match(query)
                if m and MINION_ID.match(path[11:]):
                    endpoint = PILLAR
                    answer = self._pillar(environ, path[11:], m.group(1))
        if answer is None:
            return self.app(environ, start_response)
        status, body, headers = answer
        start_response(status, headers)
        self._count[endpoint, status[:3]].inc()
        self._time[endpoint].observe(time.perf_counter() - started)
        return [body]

    def _principal(self, environ: dict[str, Any], scope: str) -> auth.Principal | None:
        try:
            principal = auth.authenticate(self.store, environ.get("HTTP_AUTHORIZATION"))
        except PkiError:
            return None
        return principal if scope in principal.scopes else None

    def _cert(self, environ: dict[str, Any], item: str) -> Answer | None:
        if self._principal(environ, "read") is None:
            return None
        try:
            version = self.store.latest()
            body = self.bodies.cert(version, item) if version is not None else None
        except PkiError:
            return None
        if body is None:
            return None
        return "200 OK", body, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body)))]

    def _pillar(self, environ: dict[str, Any], minion: str, role: str) -> Answer | None:
        principal = self._principal(environ, "secrets")
        if principal is None or role not in self.store.settings.roles:
            return None
        try:
            version = self.store.latest()
            if version is None:
                return None
            etag = f'"{version}"'
            unchanged = environ.get("HTTP_IF_NONE_MATCH", "").strip() == etag
            body = b"" if unchanged else self.bodies.pillar(version, role)
            # Audited either way: the minion holds this version (from the master's cache
            # when unchanged), which is what the operator pages show per minion.
            self.store.record_delivery(
                actor=principal.name, action="pillar", version=version,
                items=() if unchanged else tuple(self.store.settings.roles[role]),
                minion=minion, role=role, remote_addr=environ.get("REMOTE_ADDR"))
        except PkiError:
            return None
        if unchanged:
            return "304 NOT MODIFIED", b"", [("ETag", etag)]
        return "200 OK", body, [("Content-Type", "application/json"),
                                ("Content-Length", str(len(body))), ("ETag", etag)]
