"""The vault backend's one transport: hvac's API over kept-alive `http.client` connections.

hvac builds every request (paths, payloads) and classifies every error answer (`InvalidPath`,
`Forbidden`, ...); `Adapter` sends the requests.  It replaces hvac's requests session, whose
own cost per call was as large as OpenBao's answer (docs/decisions.md).

Each thread keeps one connection per origin (scheme, host, port), opened on first use and
never shared with another thread or process (a fork).  There is one TLS context (`ca_cert`,
else the system's CAs) and one redirect rule: a 3xx with a Location (a standby pointing at the
active node) is sent again there, same method and body, up to `MAX_REDIRECTS` times.

What cannot be answered is raised as a `TransportError`, which says whether the request may
have reached the node: `NotSent` (refused, no route, connect or TLS handshake failed) is safe
to send elsewhere; `NoAnswer` (timeout) and `Cut` (connection lost) are not.  A kept-alive
connection that the server closed while idle is noticed before a write is sent on it; a read
(GET, LIST) that meets a closed connection is sent once more on a fresh one, a write never is.
"""
from __future__ import annotations

import http.client
import json
import os
import select
import ssl
import threading
import urllib.parse
from typing import Any

import hvac.adapters
import hvac.utils

MAX_REDIRECTS = 5
IDEMPOTENT = frozenset({"GET", "LIST"})
Origin = tuple[str, str, int | None]


class TransportError(Exception):
    """No answer from the node; the message is the reason, without URLs or headers."""


class NotSent(TransportError):
    """The request never left: another node may be asked."""


class NoAnswer(TransportError):
    """The request may have reached the node, which did not answer within the timeout."""


class Cut(TransportError):
    """The request may have reached the node; the connection broke before the answer."""


class Transport:
    """HTTP/1.1 to Vault nodes: per-thread kept-alive connections, one TLS context."""

    def __init__(self, *, timeout: float, ca_cert: str | None) -> None:
        self.timeout = timeout
        self._ca_cert = ca_cert
        self._tls: ssl.SSLContext | None = None  # made on the first https connection
        self._local = threading.local()
        self._origins: dict[str, tuple[Origin, str]] = {}  # base URL -> origin, path prefix

    def send(self, method: str, base: str, path: str, body: bytes | None,
             headers: dict[str, str]) -> tuple[int, bytes]:
        """Send one request to base + path, following redirects; return status and body."""
        for _ in range(MAX_REDIRECTS + 1):
            status, location, data = self._exchange(method, base, path, body, headers)
            if not (300 <= status < 400 and location):
                return status, data
            parts = urllib.parse.urlsplit(urllib.parse.urljoin(base + path, location))
            base = f"{parts.scheme}://{parts.netloc}"
            path = parts.path + (f"?{parts.query}" if parts.query else "")
        raise Cut(f"more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        """Close this thread's connections."""
        for conn in self._connections().values():
            conn.close()
        self._connections().clear()

    def _exchange(self, method: str, base: str, path: str, body: bytes | None,
                  headers: dict[str, str]) -> tuple[int, str | None, bytes]:
        known = self._origins.get(base)
        if known is None:
            parts = urllib.parse.urlsplit(base)
            known = self._origins[base] = ((parts.scheme, parts.hostname or "", parts.port),
                                           parts.path.rstrip("/"))
        origin, prefix = known
        target = prefix + path
        for attempt in (1, 2):
            conn, reused = self._connection(origin, method)
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except TimeoutError:
                self._drop(origin)
                raise NoAnswer(f"no answer within {self.timeout:g}s") from None
            except (http.client.HTTPException, OSError) as e:
                self._drop(origin)
                if reused and attempt == 1 and method in IDEMPOTENT:
                    continue  # closed by the server between our check and our request
                raise Cut(f"connection lost: {_reason(e)}") from None
            if resp.will_close:
                self._drop(origin)
            # Headers are looked up one by one (email.message): only a redirect needs one.
            redirect = resp.getheader("Location") if 300 <= resp.status < 400 else None
            return resp.status, redirect, data
        raise AssertionError("unreachable")

    def _connections(self) -> dict[Origin, http.client.HTTPConnection]:
        # A forked child starts with no connection: its parent's sockets stay the parent's.
        if getattr(self._local, "pid", None) != os.getpid():
            self._local.pid, self._local.conns = os.getpid(), {}
        conns: dict[Origin, http.client.HTTPConnection] = self._local.conns
        return conns

    def _connection(self, origin: Origin,
                    method: str) -> tuple[http.client.HTTPConnection, bool]:
        """This thread's open connection to origin, and whether it was used before."""
        conns = self._connections()
        conn = conns.get(origin)
        # A read may go out unchecked: if the server closed the connection, it is sent again.
        if conn is not None and conn.sock is not None and (
                method in IDEMPOTENT or not _readable(conn.sock)):
            return conn, True
        if conn is not None:  # the server closed it while idle (or sent what we never asked)
            self._drop(origin)
        scheme, host, port = origin
        if scheme == "https":
            if self._tls is None:
                self._tls = ssl.create_default_context(cafile=self._ca_cert)
            conn = http.client.HTTPSConnection(host, port, timeout=self.timeout,
                                               context=self._tls)
        elif scheme == "http":
            conn = http.client.HTTPConnection(host, port, timeout=self.timeout)
        else:
            raise NotSent(f"unsupported address scheme {scheme!r}")
        try:
            conn.connect()  # TCP, then the TLS handshake: nothing of the request is sent yet
        except OSError as e:
            conn.close()
            raise NotSent(_reason(e)) from None
        conns[origin] = conn
        return conn, False

    def _drop(self, origin: Origin) -> None:
        conn = self._connections().pop(origin, None)
        if conn is not None:
            conn.close()


class Adapter(hvac.adapters.Adapter):
    """hvac's adapter over `Transport`: dicts for answers, hvac's exceptions for errors.

    Built by `hvac.Client(adapter=Adapter, ...)`, which passes `verify` (`ca_cert` or True)
    and `timeout`; proxies, client certificates and a requests session are not used.
    """

    def __init__(self, base_uri: str, token: str | None = None, verify: bool | str = True,
                 timeout: float = 30, **_unused: Any) -> None:
        # Not Adapter.__init__: it would build a requests session nobody uses.
        self.base_uri = base_uri
        self.token = token
        self.namespace = None
        self.transport = Transport(timeout=timeout,
                                   ca_cert=verify if isinstance(verify, str) else None)

    def close(self) -> None:
        self.transport.close()

    def get_login_token(self, response: Any) -> str:
        return str(response["auth"]["client_token"])

    def request(self, method: str, url: str, headers: dict[str, str] | None = None,
                raise_exception: bool = True, **kwargs: Any) -> Any:
        """Send one hvac request; return the answer's JSON object ({} when it has no body)."""
        params, payload = kwargs.pop("params", None), kwargs.pop("json", None)
        wrap_ttl = kwargs.pop("wrap_ttl", None)
        if kwargs:
            raise TypeError(f"unsupported request arguments: {', '.join(sorted(kwargs))}")
        while "//" in url:  # as hvac does: Vault reads a doubled slash as one
            url = url.replace("//", "/")
        path = "/" + url.lstrip("/")
        if params:
            path += "?" + urllib.parse.urlencode(params)
        sent = {"X-Vault-Request": "true", **(headers or {})}
        if self.token:
            sent["X-Vault-Token"] = self.token
        if wrap_ttl:
            sent["X-Vault-Wrap-TTL"] = str(wrap_ttl)
        body = None
        if payload is not None:
            body = json.dumps(payload).encode()
            sent["Content-Type"] = "application/json"
        status, data = self.transport.send(method.upper(), self.base_uri, path, body, sent)
        try:
            doc = json.loads(data) if data else {}
        except ValueError:
            doc = None
        if status >= 300 and raise_exception:
            errors = doc.get("errors") if isinstance(doc, dict) else None
            text = data.decode(errors="replace")
            hvac.utils.raise_for_error(method, self.base_uri + path, status,
                                       None if errors else text, errors=errors, text=text,
                                       json=doc if isinstance(doc, dict) else None)
        if not isinstance(doc, dict):
            raise ValueError("the answer is not a JSON object")
        return doc


def _readable(sock: Any) -> bool:
    """Tell whether an idle socket has something to read: the server closed it (or worse)."""
    poller = select.poll()  # not select.select: a busy process may hold fds above 1023
    poller.register(sock, select.POLLIN)
    try:
        return bool(poller.poll(0))
    except OSError:
        return True


def _reason(e: BaseException) -> str:
    """The error's own words (errno text, TLS reason), short."""
    text = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return (text or type(e).__name__)[:200]
