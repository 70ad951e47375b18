"""Serving under attack from the network, with no token (issue 19, items 1, 2 and 8).

Real `pkisvc serve` processes (2 workers) on free loopback ports.  Slow clients — header
bytes, POST body bytes or TLS handshake bytes dripped one a second — must neither slow the
hot reads down nor stay connected; invented HTTP methods must not add `/metrics` series;
refused tokens are logged (a few lines, never the token) and counted, and write nothing.
"""
import re
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from tests.conftest import REPO, clean_env, free_port, serve, start, stop, wait_for

pytestmark = pytest.mark.slow
SLOW_CLIENTS = 50


class Drip:
    """SLOW_CLIENTS connections that each send one byte of `payload` a second, reconnecting
    when the server closes them; counts the closes and any answer other than a refusal."""

    def __init__(self, connect, payload: bytes, prefix: bytes = b"") -> None:
        self.connect, self.payload, self.prefix = connect, payload, prefix
        self.closed_by_server = 0
        self.answered: list[bytes] = []  # first bytes of answers that are not 408/413
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(timeout=30)

    def _open(self):
        s = self.connect()
        if self.prefix:
            s.sendall(self.prefix)
        s.setblocking(False)
        return [s, 0]

    def _run(self) -> None:
        slots = [self._open() for _ in range(SLOW_CLIENTS)]
        while not self._stop.wait(1.0):
            for slot in slots:
                s, sent = slot
                try:
                    data = s.recv(4096)
                except (BlockingIOError, ssl.SSLWantReadError):
                    data = None
                except OSError:
                    data = b""
                if data is None and sent < len(self.payload):
                    try:
                        s.send(self.payload[sent:sent + 1])
                        slot[1] += 1
                        continue
                    except (BlockingIOError, ssl.SSLWantWriteError):
                        continue
                    except OSError:
                        data = b""
                if data is None:
                    continue
                if data and not data.startswith((b"HTTP/1.1 408", b"HTTP/1.1 413")):
                    self.answered.append(data[:40])
                self.closed_by_server += 1
                s.close()
                try:
                    slot[:] = self._open()
                except OSError as e:
                    self.errors.append(repr(e))
        for s, _ in slots:
            s.close()


def read_hot_paths(url: str, token: str, seconds: float, verify=True) -> list[float]:
    """Read /v1/certs/server and /v1/health in turn for seconds; every wait, in seconds."""
    session = requests.Session()
    waits = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for path, headers in (("/v1/certs/server", {"Authorization": f"Bearer {token}"}),
                              ("/v1/health", {})):
            t = time.monotonic()
            r = session.get(url + path, headers=headers, timeout=10, verify=verify)
            waits.append(time.monotonic() - t)
            assert r.status_code == 200, (path, r.status_code, r.text)
        time.sleep(0.05)
    return waits


def plain(port):
    return lambda: socket.create_connection(("127.0.0.1", port), timeout=5)


def port_of(url):
    return int(url.rsplit(":", 1)[1])


@pytest.fixture
def served(tmp_path):
    """`pkisvc serve`, 2 workers: (url, admin token)."""
    p, url = serve(tmp_path / "pkisvc-data", workers=2)
    try:
        yield url, (tmp_path / "pkisvc-data" / "admin.token").read_text().strip()
    finally:
        stop(p)


def test_fifty_slow_header_clients_do_not_slow_the_hot_reads(served):
    url, token = served
    read_hot_paths(url, token, 1)  # warm: both workers have the bodies cached
    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    with Drip(plain(port_of(url)), head) as drip:
        waits = read_hot_paths(url, token, 30)
    assert max(waits) < 1.0, f"slowest read {max(waits):.2f}s of {len(waits)}"
    assert len(waits) > 100
    # The server cut every slow client off (at its request deadline), more than once each.
    assert drip.closed_by_server >= 2 * SLOW_CLIENTS, drip.closed_by_server
    assert drip.answered == [] and drip.errors == []


def test_pipelined_reads_keep_order_and_a_client_that_never_reads_holds_no_one_up(served):
    """The poller reads what a socket holds and leaves pipelined bytes for the next turn:
    pipelined reads come back in order, and clients that pipeline reads and never read the
    answers (their socket buffers full) hold no one else up."""
    url, token = served
    read_hot_paths(url, token, 1)
    one = (f"GET /v1/certs/server HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
           "\r\n").encode()
    health = b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n"
    with socket.create_connection(("127.0.0.1", port_of(url)), timeout=10) as s:
        s.sendall(one + health + one + one)
        f = s.makefile("rb")
        bodies = []
        for _ in range(4):
            assert f.readline().startswith(b"HTTP/1.1 200"), "an answer out of order"
            length = 0
            while (line := f.readline()) != b"\r\n":
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            bodies.append(f.read(length))
        assert b'"item": "server"' in bodies[0] and b'"status"' in bodies[1]
        assert bodies[0] == bodies[2] == bodies[3]
    hogs = []
    try:
        for _ in range(2):
            hog = socket.create_connection(("127.0.0.1", port_of(url)), timeout=10)
            hog.setblocking(False)
            hogs.append(hog)
        sent = 0
        deadline = time.monotonic() + 10
        while sent < 4 * 1024 * 1024 and time.monotonic() < deadline:  # until they stall
            for hog in hogs:
                try:
                    sent += hog.send(one * 64)
                except BlockingIOError:
                    pass
        waits = read_hot_paths(url, token, 5)
    finally:
        for hog in hogs:
            hog.close()
    assert max(waits) < 1.0, f"slowest read {max(waits):.2f}s of {len(waits)}"


def test_slow_post_bodies_to_the_login_form_do_not_slow_the_hot_reads(served):
    url, token = served
    head = (b"POST /ui/login HTTP/1.1\r\nHost: x\r\nContent-Type: "
            b"application/x-www-form-urlencoded\r\nContent-Length: 300\r\n\r\n")
    body = b"csrf=x&token=" + b"a" * 287
    with Drip(plain(port_of(url)), body, prefix=head) as drip:
        waits = read_hot_paths(url, token, 15)
    assert max(waits) < 1.0, f"slowest read {max(waits):.2f}s of {len(waits)}"
    assert drip.closed_by_server >= SLOW_CLIENTS
    assert drip.answered == [] and drip.errors == []


def client_hello() -> bytes:
    """The first flight of a TLS client, as bytes to drip."""
    ctx = ssl.create_default_context()
    ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def test_slow_tls_handshakes_and_slow_tls_headers_under_self_tls(tmp_path):
    data = tmp_path / "pkisvc-data"
    port = free_port()
    ca = data / "tls" / "ca.crt"
    p = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--workers", "2", "--self-tls"],
              clean_env(PKISVC_DATA_DIR=str(data), PKISVC_KEY_TYPE="ecdsa-p256"), port,
              scheme="https", verify=str(ca))
    url = f"https://127.0.0.1:{port}"
    token = (data / "admin.token").read_text().strip()
    ctx = ssl.create_default_context(cafile=str(ca))

    def tls():
        return ctx.wrap_socket(socket.create_connection(("127.0.0.1", port), timeout=5),
                               server_hostname="127.0.0.1")

    head = b"GET /v1/health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 200 + b"\r\n\r\n"
    try:
        read_hot_paths(url, token, 1, verify=str(ca))
        with Drip(plain(port), client_hello()) as handshakes, Drip(tls, head) as headers:
            waits = read_hot_paths(url, token, 15, verify=str(ca))
    finally:
        stop(p)
    assert max(waits) < 1.0, f"slowest read {max(waits):.2f}s of {len(waits)}"
    assert handshakes.closed_by_server >= SLOW_CLIENTS
    assert headers.closed_by_server >= SLOW_CLIENTS
    assert headers.answered == [] and headers.errors == [] and handshakes.errors == []


def series(text: str) -> set[str]:
    return {line.rsplit(" ", 1)[0] for line in text.splitlines()
            if line and not line.startswith("#")}


def test_invented_methods_add_no_metrics_series(served):
    url, token = served
    port = port_of(url)

    def invented(n, start=0):
        """n requests with made-up methods on one kept-alive connection; their statuses."""
        statuses = []
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            f = s.makefile("rb")
            for i in range(start, start + n):
                path = ("/nope", "/v1/health", "/v1/certs/server", f"/x{i}")[i % 4]
                s.sendall(f"Z{i:04d}Q {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
                status = f.readline().split()[1]
                length = 0
                while (line := f.readline()) not in (b"\r\n", b""):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":")[1])
                f.read(length)
                statuses.append(int(status))
        return statuses

    requests.get(url + "/v1/certs/server", headers={"Authorization": f"Bearer {token}"},
                 timeout=5)
    invented(8)  # the fixed label `other` and the refusals' statuses exist now
    before = {requests.get(url + "/metrics", timeout=5).text for _ in range(4)}
    statuses = invented(1000, start=8)
    assert set(statuses) <= {404, 405}, set(statuses)
    after = [requests.get(url + "/metrics", timeout=5).text for _ in range(4)]
    baseline = set().union(*(series(t) for t in before))
    for text in after:
        assert series(text) <= baseline, sorted(series(text) - baseline)[:5]
        assert "Z0" not in text and "/x1" not in text
        assert 'method="other"' in text
    # Each endpoint's count went up: the requests were seen, only their labels were bounded.
    m = re.search(r'pkisvc_http_requests_total\{endpoint="unknown",method="other",'
                  r'status="404"\} (\d+)', after[-1])
    assert m and int(m.group(1)) >= 500


def serve_logged(data: Path, log: Path):
    """`pkisvc serve` (2 workers) with its service log in a file; (process, url)."""
    port = free_port()
    env = clean_env(PKISVC_DATA_DIR=str(data), PKISVC_KEY_TYPE="ecdsa-p256")
    p = subprocess.Popen([sys.executable, "-m", "pkisvc.cli", "serve", "--bind",
                          f"127.0.0.1:{port}", "--workers", "2"], cwd=REPO, env=env,
                         start_new_session=True, stdout=subprocess.DEVNULL,
                         stderr=log.open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(url + "/v1/health", timeout=2).status_code == 200, 120,
                 "the service to answer")
    except BaseException:
        stop(p)
        raise
    return p, url


def snapshot(data: Path) -> dict[str, tuple[int, int]]:
    return {str(f.relative_to(data)): (f.stat().st_size, f.stat().st_mtime_ns)
            for f in data.rglob("*") if f.is_file()}


def test_refused_tokens_are_logged_a_few_times_counted_and_write_nothing(tmp_path):
    data, log = tmp_path / "pkisvc-data", tmp_path / "service.log"
    p, url = serve_logged(data, log)
    try:
        token = (data / "admin.token").read_text().strip()
        read = requests.Session()
        read.headers["Authorization"] = f"Bearer {token}"
        before = snapshot(data)
        wrong = "pks_wrong-" + "q" * 30
        s = requests.Session()
        for i in range(300):
            path = ("/v1/certs/server", "/v1/audit", "/v1/versions")[i % 3]
            assert s.get(url + path, headers={"Authorization": f"Bearer {wrong}{i}"},
                         timeout=5).status_code == 401
        # A refused login on the operator pages, the way a browser sends it.
        form = s.get(url + "/ui/login", timeout=5)
        csrf = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = s.post(url + "/ui/login", data={"csrf": csrf, "token": wrong, "next": "/ui/"},
                   timeout=5)
        assert r.status_code == 401
        assert snapshot(data) == before  # nothing written for any refusal

        def refused_total():
            text = requests.get(url + "/metrics", timeout=5).text
            return sum(float(v) for v in re.findall(
                r'^pkisvc_auth_refused_total\{[^}]*\} (\S+)$', text, re.M))

        wait_for(lambda: refused_total() == 301, 10, "all 301 refusals counted")
        # The tail of the burst is summed into one line when its window ends (10 s).
        wait_for(lambda: "more in" in log.read_text(), 30, "the summary line")
    finally:
        stop(p)
    text = log.read_text()
    lines = [line for line in text.splitlines() if "refused authentication" in line]
    assert 2 <= len(lines) <= 6, lines  # at most about one a window per worker
    assert wrong not in text and token not in text
    # pkisvc's own lines reach the service log, in gunicorn's format.
    assert re.search(r"\[\d+\] \[WARNING\] refused authentication: 401 on /v1/", text)
    assert re.search(r"refused authentication: \d+ more in 10s \(.*401 on /v1/audit", text)


REQUESTS = [
    b"GET /v1/health HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /ui/login HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\ntoken=a&b=c",
    b"POST /v1/ca/rotate HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"4;ext=1\r\n{\"a\"\r\n3\r\n:1}\r\n0\r\n\r\n",
    b"POST /x HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nab\r\n0\r\nX-T: 1\r\n\r\n",
]


@pytest.mark.parametrize("request_bytes", REQUESTS)
def test_the_poller_finds_where_a_request_ends_byte_by_byte(request_bytes):
    from pkisvc.worker import NEED_MORE, Framing
    framing, buf = Framing(), bytearray()
    nxt = b"GET /next HTTP/1.1\r\n"  # pipelined behind it
    for i, byte in enumerate(request_bytes + nxt):
        buf.append(byte)
        end = framing.end(buf)
        if i + 1 < len(request_bytes):
            assert end == NEED_MORE, (i, bytes(buf))
        else:
            assert end == len(request_bytes)


@pytest.mark.parametrize("head, status", [
    (b"POST / HTTP/1.1\r\nContent-Length: 65537\r\n\r\n", "413"),
    (b"GET / HTTP/1.1\r\nX: " + b"a" * 70000, "431"),
    (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + b"1\r\na\r\n" * 30000, "413"),
])
def test_the_poller_refuses_what_is_over_the_limits(head, status):
    from pkisvc.worker import Framing, Incomplete
    with pytest.raises(Incomplete) as e:
        Framing().end(head)
    assert e.value.status.startswith(status)


@pytest.mark.parametrize("malformed", [
    b"POST / HTTP/1.1\r\nContent-Length: 5x\r\n\r\n",
    b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0x5\r\n",
    b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
    b"GET / HTTP/1.1\nHost: x\n\n",
])
def test_malformed_framing_goes_to_the_parser_at_once(malformed):
    from pkisvc.worker import NEED_MORE, Framing
    assert Framing().end(malformed) != NEED_MORE


def test_plain_gunicorn_with_the_worker_class_cuts_slow_clients_off(tmp_path):
    """The README's line for running gunicorn without pkisvc's config file."""
    port = free_port()
    env = clean_env(PKISVC_DATA_DIR=str(tmp_path / "data"), PKISVC_KEY_TYPE="ecdsa-p256")
    p = start([sys.executable, "-m", "gunicorn", "--no-control-socket", "-w", "1",
               "--worker-class", "pkisvc.worker.BufferedThreadWorker", "--threads", "4",
               "-b", f"127.0.0.1:{port}", "pkisvc.app:create_app()"], env, port)
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
            slow.sendall(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n")  # never finished
            t = time.monotonic()
            assert requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).ok
            assert slow.recv(100).startswith(b"HTTP/1.1 408")
            assert 5 < time.monotonic() - t < 25
    finally:
        stop(p)
