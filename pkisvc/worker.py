"""A gunicorn worker that slow clients cannot starve: `pkisvc.worker.BufferedThreadWorker`.

gunicorn's `gthread` worker hands a connection to a pool thread as soon as a byte arrives and
the thread then reads the request line, headers and body with blocking reads and no deadline:
a dozen clients dripping one header byte every few seconds hold every thread, and nothing
else is answered.  This worker keeps `gthread`'s thread pool, keep-alive handling and request
code, and changes one thing: no thread waits for a client.  The whole request — TLS
handshake, request line, headers and body (up to the 64 KiB the app accepts) — is read with
non-blocking reads, within one deadline (`REQUEST_DEADLINE` from the connection's first byte or
its acceptance), and a pool thread parses it from memory.  A new connection is read by the
worker's poller.  A kept-alive connection with bytes goes to a pool thread as in `gthread`,
which reads once without waiting (`try_read`): a whole request (nearly always) is served at
once, with no more poller work than `gthread` does; a part of one goes back to the poller,
which reads the rest.  A client that misses the deadline gets a `408` and is closed; one that
announces a larger body gets a `413` without it being read.

Per request it costs less than `gthread` (docs/decisions.md, "The worker's cost per
request"): a kept-alive plain connection stays registered with the poller one-shot, and the
pool thread that answered it re-arms it itself (the poller is not woken to do it); its socket
stays blocking (the poller reads it with MSG_DONTWAIT), so no request pays for switching it;
gunicorn's settings are looked up once (`_Settings`), the head and a small body go out in one
send (`_Response`); and when the connection is the worker's only one (a Salt master asking
for one minion after another), the thread that answered waits NEXT_WAIT (0.5 ms) for its next
request before handing it back — the only wait for a client, and a partial request found then
still goes to the poller.

The poller does not parse HTTP: it finds where the request ends (the empty line, then
`Content-Length` bytes or the chunked framing) and leaves every judgement to gunicorn's parser
in the thread, so what is accepted and refused is what `gthread` accepts and refuses.  Should
the two ever disagree about the framing, the thread's socket still has a timeout
(`THREAD_IO_TIMEOUT`: the kernel's SO_RCVTIMEO/SO_SNDTIMEO on a plain socket, which cost
nothing per call; Python's on a TLS one), which also bounds writing the response to a client
that stops reading.
HTTP/1.1 only (`http_protocols = "h1"`, gunicorn's default).
"""
from __future__ import annotations

import errno
import json
import select
import selectors
import socket
import ssl
import struct
import sys
import time
from collections import deque
from datetime import datetime
from functools import partial
from typing import Any

from gunicorn import http, sock, util
from gunicorn.http import message, parser, wsgi
from gunicorn.workers.gthread import STOP_KEEPALIVE_LINGER, TConn, ThreadWorker

#: Seconds a connection has, from its acceptance or its first byte after a keep-alive pause,
#: to complete the TLS handshake and send a whole request.
REQUEST_DEADLINE = 10.0
#: Timeout of every socket operation in a pool thread (reading a mis-framed request, writing
#: the answer to a client that does not read it).
THREAD_IO_TIMEOUT = 10.0
#: Seconds a closing connection is drained for the client's FIN (RFC 9112 section 9.6).
LINGER = 2.0
#: ... and for this many bytes at most (a refused body the client is still sending).
LINGER_BYTES = 256 * 1024
#: Seconds between the worker's heartbeats to the arbiter (and checks that it is there).
NOTIFY_EVERY = 0.25
#: How long a pool thread that has just answered a kept-alive plain connection waits for its
#: next request (when no other work is queued), and how many it serves so in a row.
NEXT_WAIT = 0.0005
NEXT_MAX = 16
_ONESHOT = hasattr(select, "EPOLLONESHOT") and selectors.DefaultSelector is selectors.EpollSelector
#: The largest request head (line and headers) and body read into memory.
MAX_HEAD = 64 * 1024
MAX_BODY = 64 * 1024

HANDSHAKE, READING, CLOSING = "handshake", "reading", "closing"
#: A kept-alive (or pipelined) connection with bytes: a pool thread reads it once, without
#: waiting, and serves the request if that completed it; if not, the poller reads the rest.
TRYING = "trying"
NEED_MORE = -1
# What a pool thread's read of a TRYING connection tells the poller (see finish_request).
_DEFER, _DROP = object(), object()


class Incomplete(Exception):
    """The request can never be completed within the limits: answer status and close."""

    def __init__(self, status: str, message: str) -> None:
        super().__init__(message)
        self.status = status


TOO_LARGE = "413 Request Entity Too Large"
OVER_LIMIT = f"the request body is over the limit of {MAX_BODY} bytes"  # the app's words
HEAD_TOO_LARGE = "431 Request Header Fields Too Large"


class Framing:
    """Where the request at the start of a buffer ends, found as its bytes arrive.

    Framing only; malformed framing ends the request where it stops making sense, so that
    gunicorn's parser sees it at once and refuses it.  The search resumes where it stopped, so
    a client sending one byte at a time costs one short look per byte.
    """

    def __init__(self) -> None:
        self.searched = 0  # where the search for the end of the head resumes
        self.body_start = -1
        self.end_at = NEED_MORE  # the end, once Content-Length gave it
        self.chunk_pos = -1  # the next chunk-size line of a chunked body
        self.trailers = -1  # where the trailers start, after the last chunk

    def end(self, buf: bytes | bytearray) -> int:
        """Where the request ends in buf, or NEED_MORE.  Raises Incomplete over the limits."""
        if self.body_start < 0:
            head_end = buf.find(b"\r\n\r\n", self.searched)
            bare = buf.find(b"\n\n", self.searched)
            if bare >= 0 and (head_end < 0 or bare < head_end):
                return bare + 2  # lines ended by LF alone: let the parser refuse them
            if head_end < 0:
                if len(buf) > MAX_HEAD:
                    raise Incomplete(HEAD_TOO_LARGE, "the request line and headers exceed 64 KiB")
                self.searched = max(0, len(buf) - 3)
                return NEED_MORE
            self.body_start = head_end + 4
            if self.body_start > MAX_HEAD:
                raise Incomplete(HEAD_TOO_LARGE, "the request line and headers exceed 64 KiB")
            head = bytes(buf[:head_end])
            lowered = head.lower()
            if b"content-length" not in lowered and b"transfer-encoding" not in lowered:
                self.end_at = self.body_start  # no body (most requests): nothing to parse
                return self.end_at
            length: int | None = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"transfer-encoding":
                    if value.split(b",")[-1].strip().lower() != b"chunked":
                        return self.body_start  # no length: let the parser refuse it
                    self.chunk_pos = self.body_start  # the parser judges the rest
                elif name == b"content-length":
                    value = value.strip()
                    if not value.isdigit() or length is not None:
                        return self.body_start  # malformed: let the parser refuse it
                    length = int(value)
            if self.chunk_pos < 0:
                if (length or 0) > MAX_BODY:
                    raise Incomplete(TOO_LARGE, OVER_LIMIT)
                self.end_at = self.body_start + (length or 0)
        if self.chunk_pos >= 0:
            return self._chunked_end(buf)
        return self.end_at if len(buf) >= self.end_at else NEED_MORE

    def _chunked_end(self, buf: bytes | bytearray) -> int:
        while self.trailers < 0:
            eol = buf.find(b"\r\n", self.chunk_pos)
            if eol < 0:
                if len(buf) - self.chunk_pos > 1024:
                    return len(buf)  # a chunk-size line this long is malformed
                return NEED_MORE
            digits = bytes(buf[self.chunk_pos:eol]).split(b";", 1)[0].rstrip(b" \t")
            if not digits or digits.strip(b"0123456789abcdefABCDEF"):
                return eol + 2  # malformed: let the parser refuse it
            size = int(digits, 16)
            if size == 0:
                self.trailers = self.searched = eol + 2
                break
            following = eol + 2 + size + 2
            # Framing costs a few bytes a chunk; the app takes 64 KiB of body in all.
            if following - self.body_start > 2 * MAX_BODY:
                raise Incomplete(TOO_LARGE, OVER_LIMIT)
            if following > len(buf):
                return NEED_MORE
            self.chunk_pos = following
        if buf[self.trailers:self.trailers + 2] == b"\r\n":
            return self.trailers + 2
        end = buf.find(b"\r\n\r\n", self.searched)
        if end < 0:
            if len(buf) - self.trailers > MAX_HEAD:
                raise Incomplete(HEAD_TOO_LARGE, "the trailers exceed 64 KiB")
            self.searched = max(self.trailers, len(buf) - 3)
            return NEED_MORE
        return end + 4


def _error(status: str, message: str) -> bytes:
    """A whole answer that closes the connection; the app's JSON error shape."""
    doc: dict[str, object] = {"error": status.split(" ", 1)[1].lower().replace(" ", "_"),
                              "message": message}
    if status == TOO_LARGE:
        doc = {"error": "payload_too_large", "limit": MAX_BODY, "message": message}
    body = json.dumps(doc).encode()
    return (f"HTTP/1.1 {status}\r\nConnection: close\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode() + body


# --- gunicorn's request path, with its per-request waste taken out --------------------------
# What a request is, what is refused and what is answered stay gunicorn's; these classes only
# remember what cannot change within a worker and write an answer in one piece.

class _Settings:
    """gunicorn's settings, each looked up once: `Config.__getattr__` runs a few Python calls
    per look-up, and a request looks up about twenty (a worker's settings never change)."""

    def __init__(self, cfg: Any) -> None:
        self.__dict__["_cfg"] = cfg

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.__dict__["_cfg"], name)
        self.__dict__[name] = value
        return value


#: (settings, peer address) -> whether gunicorn trusts that peer's forwarding headers; the
#: answer is the same for every request from the peer (gunicorn parses the address each time).
_TRUSTED: dict[tuple[int, str], bool] = {}


class _Request(message.Request):
    def _peer_is_trusted_proxy(self) -> bool:
        peer = self.peer_addr
        if not isinstance(peer, tuple):
            return True
        key = (id(self.cfg), peer[0])
        trusted = _TRUSTED.get(key)
        if trusted is None:
            trusted = bool(super()._peer_is_trusted_proxy())
            if len(_TRUSTED) >= 4096:
                _TRUSTED.clear()
            _TRUSTED[key] = trusted
        return trusted


class _Parser(parser.RequestParser):
    mesg_class = _Request

    def finish_body(self, deadline: float | None = None, max_bytes: int | None = None) -> bool:
        """Discard the rest of the current request's body.  Over a plain socket it is in
        memory already (the whole request was read before it was parsed), so gunicorn's
        timeout juggling — four syscalls a request — is skipped; were the framing ever wrong,
        the socket's own timeout (THREAD_IO_TIMEOUT) still bounds the read."""
        if not self.mesg or isinstance(self.unreader.sock, ssl.SSLSocket):
            return bool(super().finish_body(deadline, max_bytes))
        body = self.mesg.body
        if getattr(body, "failed", False) is True:
            return False
        if max_bytes is None and deadline is not None:
            max_bytes = parser._DRAIN_MAX_BYTES
        drained = 0
        try:
            while True:
                data = body.read(1024)
                if not data:
                    return True
                drained += len(data)
                if max_bytes is not None and drained >= max_bytes:
                    return False
        except (TimeoutError, BlockingIOError):
            return False


_DATE: tuple[int, str] = (0, "")


def _http_date() -> str:
    """The Date header's value, made once a second."""
    global _DATE
    now = int(time.time())
    if _DATE[0] != now:
        _DATE = (now, util.http_date(now))
    return _DATE[1]


class _Response(wsgi.Response):
    #: Bodies up to this size go out in one send with the head.
    COALESCE = 64 * 1024
    headers_sent: bool

    def default_headers(self) -> list[str]:
        """gunicorn's, with the Date made once a second."""
        if self.upgrade:
            connection = "upgrade"
        elif self.should_close():
            connection = "close"
        else:
            connection = "keep-alive"
        version = self.req.version
        headers = [f"HTTP/{version[0]}.{version[1]} {self.status}\r\n",
                   f"Server: {self.version}\r\n", f"Date: {_http_date()}\r\n",
                   f"Connection: {connection}\r\n"]
        if self.chunked:
            headers.append("Transfer-Encoding: chunked\r\n")
        return headers

    def write(self, arg: bytes) -> None:
        """The first body bytes go out with the head, in one send (gunicorn sends the head
        alone first): one syscall and one segment less, and no small segment held back."""
        if (self.headers_sent or self.chunked or self._omits_body or type(arg) is not bytes
                or not arg or len(arg) > self.COALESCE):
            return super().write(arg)
        if self.response_length is not None and len(arg) > self.response_length:
            arg = arg[:self.response_length]  # never more than announced (as gunicorn)
        tosend = self.default_headers()
        tosend.extend([f"{k}: {v}\r\n" for k, v in self.headers])
        head = ("".join(tosend) + "\r\n").encode("latin-1")
        self.headers_sent = True
        self.sent += len(arg)
        self.sock.sendall(head + arg)
        return None


class _Poller(selectors.EpollSelector):
    """The worker's selector.  A kept-alive plain connection is registered once, one-shot
    (EPOLLONESHOT): its next bytes disarm it (no unregister), and the pool thread that served
    the request re-arms it (no register, and no wake of the poller to do it)."""

    def register_oneshot(self, fileobj: Any, data: Any) -> None:
        key = self.register(fileobj, selectors.EVENT_READ, data)
        self.rearm(key.fd)

    def rearm(self, fd: int) -> None:
        self._selector.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)  # type: ignore[attr-defined]


def _next_bytes_within(sock: Any, seconds: float) -> bool:
    """Whether sock becomes readable within seconds (select(): sub-millisecond waits)."""
    fd = sock.fileno()
    if not 0 <= fd < 1024:  # (select's limit) not worth a wait
        return False
    try:
        return bool(select.select([fd], [], [], seconds)[0])
    except (OSError, ValueError):
        return False


class BufferedConn(TConn):
    """A connection whose next request is collected by the poller before a thread sees it.

    A plain socket stays blocking (the kernel's timeouts, set at accept, bound a thread's
    reads and writes); the poller reads and writes it with MSG_DONTWAIT, so no request pays
    for switching it back and forth.  A TLS socket is switched as in gthread."""

    parser: Any
    sock: Any

    def __init__(self, cfg: Any, sock: Any, client: Any, server: Any) -> None:
        super().__init__(cfg, sock, client, server)
        self.tls = False
        self.oneshot = False  # registered with the poller one-shot, between requests
        self.buf = bytearray()
        self.framing = Framing()
        self.state = READING
        self.deadline = 0.0
        self.events = 0
        self.sent_continue = False
        self.drained = 0
        self.data_ready = True  # gthread's wait-for-data step: the poller did the waiting

    def recv(self, size: int) -> bytes:
        """A read that never waits (poller and `try_read`)."""
        if self.tls:
            return self.sock.recv(size)
        return self.sock.recv(size, socket.MSG_DONTWAIT)

    def send(self, data: bytes) -> None:
        """A small write that never waits (refusals, 100 Continue)."""
        if self.tls:
            self.sock.send(data)
        else:
            self.sock.send(data, socket.MSG_DONTWAIT)

    def init(self) -> None:
        """In the pool thread: hand the buffered request to gunicorn's parser."""
        self.initialized = True
        if self.tls:
            self.sock.settimeout(THREAD_IO_TIMEOUT)
        if self.parser is None:
            self.parser = _Parser(self.cfg, self.sock, self.client)
        data, self.buf = self.buf, bytearray()
        if data:
            self.parser.unreader.unread(data)


class BufferedThreadWorker(ThreadWorker):
    """gthread with whole requests read in the poller, within a deadline (see the module)."""

    alive: bool
    poller: Any

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # (deadline, conn) in deadline order: every entry gets the same delay when made.
        self.reading: deque[tuple[float, BufferedConn]] = deque()
        self.closing: deque[tuple[float, BufferedConn]] = deque()
        self._ssl_context: ssl.SSLContext | None = None
        self._settings = _Settings(self.cfg)
        self._next_notify = self._next_parent_check = 0.0

    @classmethod
    def check_config(cls, cfg: Any, log: Any) -> None:
        super().check_config(cfg, log)
        if "h2" in cfg.http_protocols or cfg.http2_cleartext != "off":
            log.warning("pkisvc's worker serves HTTP/1.1 only; the HTTP/2 settings are ignored")

    def init_process(self) -> None:
        if self.cfg.is_ssl:  # one context per worker: certificate files are read once
            self._ssl_context = sock.ssl_context(self.cfg)
            self._ssl_context.set_alpn_protocols(["http/1.1"])
        super().init_process()

    def run(self) -> None:
        if _ONESHOT:  # (gthread made a selector of its own; nothing is registered yet)
            self.poller.close()
            self.poller = _Poller()
        super().run()

    def _cap_keepalive(self, deadline: float) -> None:
        for conn in list(self.keepalived_conns):  # (pool threads may append meanwhile)
            conn.timeout = min(conn.timeout, deadline)

    def notify(self) -> None:
        """Tell the arbiter we are alive, at most every NOTIFY_EVERY seconds: gthread does it
        (a syscall) at every wake of the poller, twice a request."""
        now = time.monotonic()
        if now >= self._next_notify:
            self._next_notify = now + NOTIFY_EVERY
            super().notify()

    def is_parent_alive(self) -> bool:
        now = time.monotonic()
        if now < self._next_parent_check:
            return True
        self._next_parent_check = now + NOTIFY_EVERY
        return bool(super().is_parent_alive())

    # --- the poller's side -------------------------------------------------------------------

    def accept(self, listener: Any) -> None:
        try:
            client, addr = listener.accept()
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = BufferedConn(self._settings, client, addr, listener.getsockname())
        state = READING
        if self._ssl_context is None:
            # A pool thread's blocking reads and writes give up after THREAD_IO_TIMEOUT: set
            # once here rather than as Python's timeout, which polls before every call.  The
            # socket stays blocking from now on (see BufferedConn).
            timeout = struct.pack("ll", int(THREAD_IO_TIMEOUT), 0)
            try:
                client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeout)
                client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeout)
                client.setblocking(True)
            except OSError:
                self._drop(conn)
                return
        else:
            conn.tls = True
            try:
                conn.sock = self._ssl_context.wrap_socket(
                    client, server_side=True, do_handshake_on_connect=False,
                    suppress_ragged_eofs=self.cfg.suppress_ragged_eofs)
            except (OSError, ValueError):
                self._drop(conn)
                return
            state = HANDSHAKE
        self._start_reading(conn, state)
        self._advance(conn)

    def on_client_socket_readable(self, conn: Any, client: Any) -> None:
        """A kept-alive connection has bytes: a pool thread tries it (see `try_read`)."""
        if not conn.oneshot:  # (a one-shot registration is disarmed by the event itself)
            self.poller.unregister(client)
        self.keepalived_conns.remove(conn)
        self._try(conn)

    def _try(self, conn: BufferedConn) -> None:
        conn.state = TRYING
        conn.sent_continue = False
        conn.framing = Framing()
        self.enqueue_req(conn)

    def _start_reading(self, conn: BufferedConn, state: str, fresh: bool = True) -> None:
        conn.state = state
        conn.deadline = time.monotonic() + REQUEST_DEADLINE
        if fresh:
            conn.sent_continue = False
            conn.framing = Framing()
        self.reading.append((conn.deadline, conn))
        conn.events = selectors.EVENT_READ
        self.poller.register(conn.sock, conn.events, partial(self._on_event, conn))

    def _on_event(self, conn: BufferedConn, _fileobj: Any) -> None:
        self._advance(conn)

    def _want(self, conn: BufferedConn, events: int) -> None:
        if conn.events != events:
            conn.events = events
            self.poller.modify(conn.sock, events, partial(self._on_event, conn))

    def _advance(self, conn: BufferedConn) -> None:
        """Move conn on as far as its bytes allow without blocking."""
        try:
            if conn.state == HANDSHAKE:
                try:
                    conn.sock.do_handshake()
                except ssl.SSLWantReadError:
                    return self._want(conn, selectors.EVENT_READ)
                except ssl.SSLWantWriteError:
                    return self._want(conn, selectors.EVENT_WRITE)
                conn.state = READING
                self._want(conn, selectors.EVENT_READ)
            more = self._read(conn)
            end = conn.framing.end(conn.buf)
        except Incomplete as e:
            return self._refuse(conn, e.status, str(e))
        except (OSError, ValueError):  # ssl.SSLError among them: a failed handshake
            return self._close_reading(conn)
        if end == NEED_MORE:
            if not more:  # the client closed its side before the request was whole
                return self._close_reading(conn)
            self._maybe_continue(conn)
            return
        self.poller.unregister(conn.sock)
        conn.state = ""
        self.enqueue_req(conn)

    def _read(self, conn: BufferedConn) -> bool:
        """Read what is there; False once the client closed its side (a whole request sent
        before that is still answered).  A plain socket's short read is all there was for
        now (the poller is told of the rest); TLS reads on until the socket is dry, since
        bytes decrypted ahead would not make it readable."""
        while True:
            try:
                data = conn.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return True
            if not data:
                return False
            conn.buf += data
            if len(conn.buf) > MAX_HEAD + 2 * MAX_BODY or (len(data) < 65536 and not conn.tls):
                return True  # (over the limits: Framing refuses it)

    def _maybe_continue(self, conn: BufferedConn) -> None:
        """Answer `Expect: 100-continue` once the head is in, so the client sends its body."""
        if conn.sent_continue:
            return
        head_end = conn.buf.find(b"\r\n\r\n")
        if head_end < 0:
            return
        head = bytes(conn.buf[:head_end]).lower()
        if b"\r\nexpect:" in head and b"100-continue" in head and b" http/1.0" not in \
                head.split(b"\r\n", 1)[0]:
            conn.sent_continue = True
            try:
                conn.send(b"HTTP/1.1 100 Continue\r\n\r\n")
            except (BlockingIOError, ssl.SSLError, OSError):
                pass

    def _refuse(self, conn: BufferedConn, status: str, message: str) -> None:
        try:
            conn.send(_error(status, message))  # small: fits the socket's buffer
        except (OSError, ValueError):
            pass
        self._unregister(conn)
        self._linger(conn)

    def _close_reading(self, conn: BufferedConn) -> None:
        self._unregister(conn)
        self._drop(conn)

    def _unregister(self, conn: BufferedConn) -> None:
        conn.state = ""
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError, OSError):
            pass

    def _leave_kept(self, conn: BufferedConn) -> None:
        """Drop a one-shot registration before the connection is registered otherwise or
        closed (a closed descriptor left in the selector would refuse its number's reuse)."""
        if getattr(conn, "oneshot", False):
            conn.oneshot = False
            try:
                self.poller.unregister(conn.sock)
            except (KeyError, ValueError, OSError):
                pass

    def _drop(self, conn: BufferedConn) -> None:
        self._leave_kept(conn)
        self.nr_conns -= 1
        util.close(conn.sock)

    def _linger(self, conn: Any) -> None:
        """gunicorn's graceful close without blocking the poller: send FIN, then drain what
        the client still sends until it closes too, for LINGER seconds at most."""
        self._leave_kept(conn)
        try:
            conn.sock.setblocking(False)
            conn.sock.shutdown(socket.SHUT_WR)
        except (OSError, ValueError):
            self._drop(conn)
            return
        conn.state, conn.drained = CLOSING, 0
        conn.deadline = time.monotonic() + LINGER
        self.closing.append((conn.deadline, conn))
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(self._on_closing, conn))

    def _on_closing(self, conn: Any, _fileobj: Any) -> None:
        while True:
            try:
                data = conn.sock.recv(65536)
            except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
                return
            except (OSError, ValueError):
                data = b""
            conn.drained += len(data)
            if not data or conn.drained > LINGER_BYTES:
                self._unregister(conn)
                self._drop(conn)
                return

    def murder_pending(self) -> None:
        """Answer 408 to, and close, every connection past its deadline."""
        super().murder_pending()
        now = time.monotonic()
        while self.closing and self.closing[0][0] <= now:
            deadline, conn = self.closing.popleft()
            if conn.deadline != deadline or conn.state != CLOSING:
                continue  # closed already (the client's FIN came): counted once
            self._unregister(conn)
            self._drop(conn)
        while self.reading and self.reading[0][0] <= now:
            deadline, conn = self.reading.popleft()
            if conn.deadline != deadline or conn.state not in (HANDSHAKE, READING):
                continue  # finished reading in time; this entry is stale
            if conn.state == READING and conn.buf:
                self._refuse(conn, "408 Request Timeout",
                             "the request did not arrive in time")
            else:
                self._close_reading(conn)

    # --- the pool thread's side ------------------------------------------------------------

    def handle(self, conn: Any) -> Any:
        """gthread's `handle` for HTTP/1.1 over a connection whose request is in memory (no
        waiting for data, no HTTP/2 negotiation: see `check_config`)."""
        req = None
        try:
            if conn.state == TRYING:
                tried = self.try_read(conn)
                if tried is not None:
                    return tried
            conn.init()
            req = next(conn.parser)
            if not req:
                return False
            return self._keepalive_after(conn, self.handle_request(req, conn))
        except http.errors.NoMoreData as e:
            self.log.debug("Ignored premature client disconnection. %s", e)
        except StopIteration as e:
            self.log.debug("Closing connection. %s", e)
        except ssl.SSLError as e:
            if e.args[0] == ssl.SSL_ERROR_EOF:
                self.log.debug("ssl connection closed")
                conn.sock.close()
            else:
                self.log.debug("Error processing SSL request.")
                self.handle_error(req, conn.sock, conn.client, e)
        except OSError as e:
            if e.errno not in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                self.log.exception("Socket error processing request.")
            else:
                self.log.debug("Ignoring connection error %s", e.errno)
        except Exception as e:
            self.handle_error(req, conn.sock, conn.client, e)
        return False

    def try_read(self, conn: BufferedConn) -> Any:
        """A kept-alive connection's bytes, read once without waiting.  None when they make a
        whole request (serve it); _DEFER when more must come (the poller reads it, within the
        deadline); _DROP or False to close."""
        conn.state = ""
        try:
            more = self._read(conn)
            end = conn.framing.end(conn.buf)
        except Incomplete as e:
            try:
                conn.send(_error(e.status, str(e)))  # small: fits the socket's buffer
            except (OSError, ValueError):
                pass
            return False  # closed gracefully, as a refusal in the poller
        except (OSError, ValueError):
            return _DROP
        if end != NEED_MORE:
            return None
        if not more:  # the client closed (most often a kept-alive connection it is done with)
            return _DROP
        self._maybe_continue(conn)
        return _DEFER

    def handle_request(self, req: Any, conn: Any) -> bool:
        """gthread's `handle_request`, with settings looked up once and `_Response`."""
        if conn.sent_continue:
            req._expected_100_continue = False  # the poller has answered it already
        cfg = self._settings
        environ: dict[str, Any] = {}
        resp = None
        try:
            cfg.pre_request(self, req)
            request_start = datetime.now()
            resp, environ = wsgi.create(req, conn.sock, conn.client, conn.server, cfg,
                                        response_class=_Response)
            environ["wsgi.multithread"] = True
            self.nr += 1
            if self.nr >= self.max_requests:
                if self.alive:
                    self.log.info("Autorestarting worker after current request.")
                    self.alive = False
                resp.force_close()
            if not self.alive or not cfg.keepalive:
                resp.force_close()
            elif len(self.keepalived_conns) >= self.max_keepalived:
                resp.force_close()
            respiter = self.wsgi(environ, resp.start_response)
            try:
                if isinstance(respiter, environ["wsgi.file_wrapper"]):
                    resp.write_file(respiter)
                else:
                    for item in respiter:
                        resp.write(item)
                resp.close()
            finally:
                self.log.access(resp, req, environ, datetime.now() - request_start)
                if hasattr(respiter, "close"):
                    respiter.close()
            if resp.should_close():
                self.log.debug("Closing connection.")
                return False
        except OSError:
            util.reraise(*sys.exc_info())
        except (Exception, SystemExit):
            if resp and resp.headers_sent:
                # Timeout abort is SystemExit; a 500 after the head would corrupt the answer.
                self.log.exception("Error handling request")
                util.close_graceful(conn.sock)
                raise StopIteration() from None
            raise
        finally:
            try:
                cfg.post_request(self, req, environ, resp)
            except Exception:
                self.log.exception("Exception in post_request hook")
        return True

    def enqueue_req(self, conn: Any) -> None:
        self.tpool.submit(self._serve, conn)

    def _serve(self, conn: BufferedConn) -> None:
        """In a pool thread: serve, then keep a plain connection for its next request here
        (one-shot re-armed) or hand it to the poller (`finish_request`).  A client that
        sends its next request at once (a Salt master's ext_pillar calls, one after another)
        finds this thread still there, for NEXT_WAIT at most, when it is the worker's only
        connection (with more, the threads are better spent on whichever is ready)."""
        for served in range(NEXT_MAX):
            try:
                result = self.handle(conn)
            except BaseException:  # (handle answers what it can) close rather than lose it
                result = False
            if result is not True or not conn.oneshot or conn.parser.unreader.buf.getvalue():
                self.method_queue.defer(self.finish_request, conn, result)
                return
            if served + 1 < NEXT_MAX and self.nr_conns == 1 and self.alive \
                    and _next_bytes_within(conn.sock, NEXT_WAIT):
                conn.state, conn.sent_continue, conn.framing = TRYING, False, Framing()
                continue
            break
        conn.set_timeout()
        if not self.alive:
            conn.timeout = min(conn.timeout, time.monotonic() + STOP_KEEPALIVE_LINGER)
        self.keepalived_conns.append(conn)  # before re-arming: its event may come at once
        try:
            self.poller.rearm(conn.sock.fileno())
        except (OSError, ValueError):  # stopping (the poller is closed): let it expire
            pass
        # conn belongs to the poller again: not touched after re-arming

    def finish_request(self, conn: Any, result: Any) -> None:
        """Back on the poller: keep the connection for its next request, or close it."""
        try:
            if result is _DEFER:  # a pool thread found only part of a request: read the rest
                self._leave_kept(conn)
                self._start_reading(conn, READING, fresh=False)
                return
            if result is _DROP:
                self._drop(conn)
                return
            if not result:
                self._linger(conn)
                return
            pending = 0
            if conn.tls:
                conn.sock.setblocking(False)
                pending = conn.sock.pending()
            ahead = conn.parser.unreader.take_buffered()  # pipelined bytes, read already
            if ahead or pending:
                conn.buf += ahead
                self._try(conn)  # (a one-shot registration stays, disarmed)
                return
            conn.set_timeout()
            if not self.alive:
                conn.timeout = min(conn.timeout, time.monotonic() + STOP_KEEPALIVE_LINGER)
            self.keepalived_conns.append(conn)
            if conn.oneshot:
                self.poller.rearm(conn.sock.fileno())
            elif _ONESHOT and not conn.tls:
                conn.oneshot = True
                self.poller.register_oneshot(conn.sock,
                                             partial(self.on_client_socket_readable, conn))
            else:
                self.poller.register(conn.sock, selectors.EVENT_READ,
                                     partial(self.on_client_socket_readable, conn))
        except Exception:
            self._leave_kept(conn)
            self.nr_conns -= 1
            conn.close()
