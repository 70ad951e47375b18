"""The worker's own request path (`pkisvc.worker`): what a client sees is gunicorn's.

`_Response` writes the very bytes gunicorn's `Response` writes (the head and a small body in
one send); connections kept alive between requests (registered one-shot with the poller, and
re-armed by the thread that served them) are served, closed and replaced without the
selector losing track of them; a client on its own that sends part of its next request right
after an answer holds no thread.
"""
import re
import socket
import time

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi
from gunicorn.http.parser import RequestParser

from pkisvc import worker
from tests.conftest import serve, stop


class Sock:
    """Records every sendall."""

    def __init__(self) -> None:
        self.sends: list[bytes] = []

    def sendall(self, data: bytes) -> None:
        self.sends.append(bytes(data))


def answer(response_class, request: bytes, status: str, headers, body: list[bytes]):
    req = next(RequestParser(Config(), [request], ("127.0.0.1", 40000)))
    sock = Sock()
    resp = response_class(req, sock, Config())
    resp.start_response(status, list(headers))
    for piece in body:
        resp.write(piece)
    resp.close()
    # The Date header is the one thing that may differ (a second may pass between the two).
    return re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", b"".join(sock.sends)), sock.sends


GET = b"GET /v1/certs/server HTTP/1.1\r\nHost: x\r\n\r\n"
CASES = [
    (GET, "200 OK", [("Content-Length", "5")], [b"hello"]),
    (GET, "200 OK", [("Content-Type", "application/json"), ("Content-Length", "0")], [b""]),
    (GET, "200 OK", [("Content-Length", "3")], [b"abcdef"]),  # never more than announced
    (GET, "200 OK", [("Content-Length", "4")], [b"ab", b"cd"]),
    (GET, "200 OK", [], [b"ab", b"cd"]),  # no length: chunked
    (GET, "200 OK", [("Content-Length", "70000")], [b"x" * 70000]),
    (GET, "304 NOT MODIFIED", [("ETag", '"7"')], [b""]),
    (GET, "204 NO CONTENT", [("Content-Length", "0")], []),
    (b"HEAD /v1/health HTTP/1.1\r\nHost: x\r\n\r\n", "200 OK", [("Content-Length", "5")],
     [b"hello"]),
    (b"GET / HTTP/1.0\r\n\r\n", "200 OK", [("Content-Length", "2")], [b"ok"]),
    (b"GET / HTTP/1.0\r\n\r\n", "200 OK", [], [b"ok"]),
    (b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", "404 NOT FOUND",
     [("Content-Length", "2"), ("Connection", "keep-alive")], [b"no"]),
]


@pytest.mark.parametrize("request_bytes, status, headers, body", CASES)
def test_the_worker_writes_the_answer_gunicorn_writes(request_bytes, status, headers, body):
    ours, sends = answer(worker._Response, request_bytes, status, headers, body)
    theirs, _ = answer(wsgi.Response, request_bytes, status, headers, body)
    assert ours == theirs
    one_piece = len(body) == 1 and len(body[0]) <= worker._Response.COALESCE
    if one_piece and status.startswith("200") and headers:
        assert len(sends) == 1  # the head and the body in one send


def request(sock: socket.socket, path: str = "/v1/health") -> bytes:
    """Send one keep-alive GET and read its whole answer (its Content-Length)."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(re.search(rb"(?i)content-length: (\d+)", head).group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk
        body += chunk
    assert len(body) == length  # nothing beyond the answer
    return head


@pytest.fixture
def one_worker(tmp_path):
    p, url = serve(tmp_path / "data", workers=1)
    try:
        yield int(url.rsplit(":", 1)[1])
    finally:
        stop(p)


def test_kept_alive_connections_come_and_go_without_the_poller_losing_track(one_worker):
    # Connections closed by the client between requests free descriptor numbers the next
    # ones get again: a stale registration would refuse them, or answer nobody.
    for round_ in range(30):
        conns = [socket.create_connection(("127.0.0.1", one_worker), timeout=10)
                 for _ in range(1 + round_ % 3)]
        for _ in range(3):
            for c in conns:
                assert request(c).startswith(b"HTTP/1.1 200 ")
        for c in conns[::2]:
            c.close()
        for c in conns[1::2]:  # half-closed by the client: the server closes its side too
            c.shutdown(socket.SHUT_WR)
            assert c.recv(1) == b""
            c.close()
    with socket.create_connection(("127.0.0.1", one_worker), timeout=10) as c:
        assert request(c).startswith(b"HTTP/1.1 200 ")


def test_a_lone_client_that_sends_part_of_its_next_request_holds_no_thread(one_worker):
    lone = socket.create_connection(("127.0.0.1", one_worker), timeout=10)
    try:
        for _ in range(20):  # back to back: the thread that answered waits for the next one
            assert request(lone).startswith(b"HTTP/1.1 200 ")
        lone.sendall(b"GET /v1/health HTTP/1.1\r\nHo")  # ... and the rest never comes (yet)
        # Every thread of the worker (4) and more are free for other clients meanwhile.
        others = [socket.create_connection(("127.0.0.1", one_worker), timeout=10)
                  for _ in range(6)]
        started = time.monotonic()
        for c in others:
            assert request(c).startswith(b"HTTP/1.1 200 ")
        assert time.monotonic() - started < 5
        for c in others:
            c.close()
        lone.sendall(b"st: x\r\n\r\n")  # the rest, within the deadline: answered
        data = lone.recv(65536)
        assert data.startswith(b"HTTP/1.1 200 "), data
    finally:
        lone.close()


def test_a_connection_closed_after_lingering_is_counted_closed_once(monkeypatch):
    """A connection closed with gunicorn's graceful close (its answer said `Connection:
    close`) leaves the worker's count once, whether the client's FIN or LINGER ends it: a
    count that sank below the open connections let `worker_connections` be exceeded."""
    from gunicorn.glogging import Logger

    cfg = Config()
    w = worker.BufferedThreadWorker(0, 0, [], None, 30, cfg, Logger(cfg))
    w.poller = worker.selectors.DefaultSelector()
    clock = [1000.0]
    monkeypatch.setattr(worker.time, "monotonic", lambda: clock[0])
    ours, theirs = socket.socketpair()
    try:
        w.nr_conns = 1
        conn = worker.BufferedConn(cfg, ours, ("127.0.0.1", 1), ("127.0.0.1", 2))
        w._linger(conn)
        theirs.close()  # the client's FIN: drained and closed at once
        for key, _ in w.poller.select(0):
            key.data(key.fileobj)
        assert w.nr_conns == 0
        clock[0] += worker.LINGER + 1  # ... and its lingering deadline passes later
        w.murder_pending()
        assert w.nr_conns == 0
    finally:
        w.poller.close()
