"""Kubernetes certificates from pkisvc, as pillar.

Each minion whose id matches one of a role's globs receives that role's files from
pkisvc's ``GET /v1/pillar/<minion_id>?role=<role>``; any other minion receives nothing.
Roles are decided by the minion id, never by grains: a minion reports its own grains.

Master configuration (pip install pkisvc on the master: the module is found through
Salt's ``salt.loader`` entry point; or copy this file to ``<module_dirs entry>/pillar/``)::

    ext_pillar:
      - pkisvc:
          url: http://127.0.0.1:8800
          token_file: /etc/salt/pkisvc.token      # pkisvc token create salt-master --scope secrets
          roles:                                  # first role whose glob matches wins
            master: ['k8s-master*']
            node: ['k8s-node*']
          pillar_key: kubernetes                  # -> kubernetes:cert:{version,role,files,...}
          timeout: 5                              # seconds per request
          ca_cert: /etc/salt/pkisvc-ca.pem        # only for an https:// url with a private CA

The pillar: ``kubernetes:cert:{version, role, files: {name: pem}, fingerprints, trust}``. When
the service cannot answer (down, timeout, 5xx, a refused token, an answer that is not the
expected JSON) the minion gets ``kubernetes:cert:error: "<message>"`` instead and the master
logs the message. This module never raises (that would break every formula's pillar) and
never returns part of a set.

Answers are cached per role and version in the master process and revalidated with
``If-None-Match``; connections to the service are kept alive (one per process, one more for
each thread that asks concurrently).
"""
from __future__ import annotations

import fnmatch
import http.client
import json
import logging
import os
import sys
import threading
import types
import urllib.parse
from typing import Any

try:
    import ssl
except ImportError:  # pragma: no cover - Python built without OpenSSL
    ssl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

__virtualname__ = "pkisvc"

OPTIONS = ("url", "token_file", "roles", "pillar_key", "timeout", "ca_cert")
# Process-wide state lives in one plain module object in sys.modules: Salt re-executes or
# re-imports pillar modules for every pillar compile, which would drop a module global.
_STATE_NAME = "_pkisvc_ext_pillar_state"


def __virtual__() -> str | tuple[bool, str]:
    if ssl is None:
        return False, "pkisvc ext_pillar: this Python has no ssl module"
    return __virtualname__


class PillarError(Exception):
    """An answer the minion must not get material from; the message goes into pillar."""


def ext_pillar(minion_id: str, pillar: Any, url: str | None = None,
               token_file: str | None = None, roles: Any = None,
               pillar_key: str = "kubernetes", timeout: float = 5, ca_cert: str | None = None,
               **unknown: Any) -> dict[str, Any]:
    """Return the minion's certificate material under pillar_key:cert, or {}."""
    try:
        if unknown:
            raise PillarError(f"unknown option(s) {', '.join(sorted(unknown))} "
                              f"(options: {', '.join(OPTIONS)})")
        role = role_of(minion_id, roles)
        if role is None:
            return {}
        if not url or not token_file:
            raise PillarError("options 'url' and 'token_file' are required")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
            raise PillarError("option 'timeout' must be a positive number of seconds")
        c = client(url, timeout, ca_cert)
        cert = c.fetch(minion_id, role, c.token(token_file))
    except PillarError as e:
        log.error("pkisvc ext_pillar for %s: %s", minion_id, e)
        return {pillar_key: {"cert": {"error": str(e)}}}
    except Exception as e:  # never raise into Salt: it would break every formula's pillar
        log.error("pkisvc ext_pillar for %s: unexpected %s", minion_id, type(e).__name__)
        return {pillar_key: {"cert": {"error": f"pkisvc ext_pillar: unexpected "
                                               f"{type(e).__name__}"}}}
    return {pillar_key: {"cert": cert}}


def role_of(minion_id: str, roles: Any) -> str | None:
    """Return the first role with a glob matching minion_id, or None."""
    if not isinstance(roles, dict) or not roles:
        raise PillarError("option 'roles' must map role names to lists of minion id globs")
    for role, globs in roles.items():
        if isinstance(globs, str):
            globs = [globs]
        if not isinstance(globs, list) or not all(isinstance(g, str) for g in globs):
            raise PillarError(f"role {role!r}: globs must be a list of strings")
        if any(fnmatch.fnmatchcase(minion_id, g) for g in globs):
            return str(role)
    return None


def read_token(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            token = f.read().strip()
    except OSError as e:
        raise PillarError(f"cannot read token_file {path}: {e.strerror}") from None
    if not token or any(c.isspace() for c in token):
        raise PillarError(f"token_file {path} does not hold one token")
    return token


def client(url: str, timeout: float, ca_cert: str | None) -> Client:
    """Return this process's client for (url, timeout, ca_cert)."""
    state = vars(sys.modules.setdefault(_STATE_NAME, types.ModuleType(_STATE_NAME)))
    lock: threading.Lock = state.setdefault("lock", threading.Lock())
    key = (url, float(timeout), ca_cert)
    with lock:
        if state.get("pid") != os.getpid():
            # First use, or a forked child (Salt's MWorkers): never share a parent's sockets.
            state["pid"], state["clients"] = os.getpid(), {}
        clients: dict[tuple[str, float, str | None], Client] = state["clients"]
        c = clients.get(key)
        if c is None:
            c = clients[key] = Client(url, float(timeout), ca_cert)
    return c


class Client:
    """Keep-alive connections to one pkisvc and the last answer per role."""

    def __init__(self, url: str, timeout: float, ca_cert: str | None) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise PillarError(f"url {url!r} is not http(s)://host[:port]")
        if parts.username or parts.password:
            raise PillarError("url must not carry credentials (use token_file)")
        self.scheme, self.host, self.port = parts.scheme, parts.hostname, parts.port
        self.base = parts.path.rstrip("/")
        self.where = f"pkisvc at {parts.scheme}://{parts.netloc}"
        self.timeout = timeout
        self.context = None
        if self.scheme == "https":
            try:
                self.context = ssl.create_default_context(cafile=ca_cert)
            except (OSError, ssl.SSLError) as e:
                raise PillarError(f"cannot load ca_cert {ca_cert}: {e}") from None
        self.lock = threading.Lock()
        self.idle: list[http.client.HTTPConnection] = []
        self.cache: dict[str, tuple[int, dict[str, Any]]] = {}
        self.tokens: dict[str, tuple[tuple[int, int, int], str]] = {}

    def token(self, path: str) -> str:
        """The token in path, read again whenever the file changes (a stat per call)."""
        try:
            st = os.stat(path)
        except OSError as e:
            raise PillarError(f"cannot read token_file {path}: {e.strerror}") from None
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        with self.lock:
            hit = self.tokens.get(path)
        if hit is not None and hit[0] == key:
            return hit[1]
        token = read_token(path)
        with self.lock:
            self.tokens[path] = (key, token)
        return token

    def fetch(self, minion_id: str, role: str, token: str) -> dict[str, Any]:
        """Return the role's current material (a fresh copy)."""
        with self.lock:
            cached = self.cache.get(role)
        path = (f"{self.base}/v1/pillar/{urllib.parse.quote(minion_id, safe='')}"
                f"?role={urllib.parse.quote(role, safe='')}")
        headers = {"Authorization": f"Bearer {token}", "Accept": "application/json"}
        if cached is not None:
            headers["If-None-Match"] = f'"{cached[0]}"'
        status, body = self.request(path, headers)
        if status == 304 and cached is not None:
            return fresh(cached[1])
        if status != 200:
            raise PillarError(f"{self.where} answered {status}{detail(body)}")
        cert = parse(body, role)
        with self.lock:
            old = self.cache.get(role)
            if old is None or old[0] <= cert["version"]:
                self.cache[role] = (cert["version"], cert)
        return fresh(cert)

    def request(self, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
        """GET path on a kept-alive connection; one retry when a reused one was closed."""
        for attempt in (1, 2):
            conn, reused = self.checkout()
            try:
                conn.request("GET", path, headers=headers)
                resp = conn.getresponse()
                body = resp.read()
            except (http.client.RemoteDisconnected, BrokenPipeError,
                    ConnectionResetError, http.client.CannotSendRequest) as e:
                conn.close()
                if reused and attempt == 1:
                    continue  # the service closed an idle keep-alive connection
                raise PillarError(f"{self.where}: {describe(e)}") from None
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                raise PillarError(f"{self.where}: {describe(e)}") from None
            if resp.will_close:
                conn.close()
            else:
                with self.lock:
                    self.idle.append(conn)
            return resp.status, body
        raise AssertionError("unreachable")

    def checkout(self) -> tuple[http.client.HTTPConnection, bool]:
        with self.lock:
            if self.idle:
                return self.idle.pop(), True
        if self.scheme == "https":
            return http.client.HTTPSConnection(self.host, self.port, timeout=self.timeout,
                                               context=self.context), False
        return http.client.HTTPConnection(self.host, self.port, timeout=self.timeout), False


def fresh(cert: dict[str, Any]) -> dict[str, Any]:
    """A copy Salt may merge into and change without touching the cache."""
    return {k: (dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v)
            for k, v in cert.items()}


def describe(e: BaseException) -> str:
    if isinstance(e, TimeoutError):
        return "timed out"
    if isinstance(e, ConnectionRefusedError):
        return "connection refused"
    text = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(text)[:200]


def detail(body: bytes) -> str:
    """The service's error message, if the body is its JSON error."""
    try:
        doc = json.loads(body)
        return f": {str(doc['message'])[:200]}"
    except (ValueError, TypeError, KeyError, UnicodeDecodeError):
        return ""


def parse(body: bytes, role: str) -> dict[str, Any]:
    """Check an answer's shape; a wrong one is an error, never a partial set."""
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise PillarError("pkisvc answered something that is not JSON") from None
    if not isinstance(doc, dict):
        raise PillarError("pkisvc answered JSON that is not an object")
    version, files = doc.get("version"), doc.get("files")
    fingerprints = doc.get("fingerprints", {})
    if (not isinstance(version, int) or isinstance(version, bool) or version < 1
            or doc.get("role") != role or not isinstance(files, dict) or not files
            # A PEM block somewhere: an adopted file may keep text before it (easy-rsa's).
            or not all(isinstance(k, str) and isinstance(v, str) and "-----BEGIN " in v
                       for k, v in files.items())
            or not isinstance(fingerprints, dict)):
        raise PillarError("pkisvc answered JSON without a complete set for role "
                          f"{role!r} (version, role, files)")
    cert: dict[str, Any] = {"version": version, "role": role, "files": dict(files),
                            "fingerprints": dict(fingerprints)}
    if isinstance(doc.get("trust"), list):
        cert["trust"] = list(doc["trust"])
    return cert
