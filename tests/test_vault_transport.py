"""The vault backend's one transport: kept-alive connections, redirects, cuts, TLS.

A TCP relay on a free loopback port sits between the backend and a real OpenBao: it counts
the connections the backend opens and can close them (as OpenBao does with idle ones) or cut
one after OpenBao answered and before the answer reaches the backend.
"""
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from pkisvc.backends.vault import VaultBackend
from pkisvc.errors import BackendUnavailable
from pkisvc.model import AuditEvent, TokenRecord, parse_time
from pkisvc.testing import fake_generation
from tests.openbao import OpenBao

pytestmark = pytest.mark.vault


class Relay:
    """Forward 127.0.0.1:<port> to a target port; count connections; close or cut them."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted = 0
        self.cut_answers = 0  # answers to drop (closing the connection instead)
        self.cut_after: bytes | None = None  # drop the answer to the next request naming this
        self.refuse: bytes | None = None  # close, unsent, every request naming this
        self._clients: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}"

    def close_clients(self) -> None:
        """Close every connection from the backend, as a server does with idle ones."""
        with self._lock:
            clients, self._clients = self._clients, []
        for c in clients:
            _close(c)

    def stop(self) -> None:
        self.listener.close()
        self.close_clients()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # stopped
            upstream = socket.create_connection(("127.0.0.1", self.target_port))
            with self._lock:
                self.accepted += 1
                self._clients.append(client)
            marked = threading.Event()  # this connection's next answer is to be cut
            threading.Thread(target=self._pump, args=(client, upstream, False, marked),
                             daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, True, marked),
                             daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, answers: bool,
              marked: threading.Event) -> None:
        try:
            while data := src.recv(65536):
                if answers:
                    with self._lock:
                        cut = self.cut_answers > 0 or marked.is_set()
                        self.cut_answers -= self.cut_answers > 0
                    if cut:
                        break  # OpenBao answered; the backend never sees it
                else:
                    with self._lock:
                        if self.refuse is not None and self.refuse in data:
                            break  # the request never reaches OpenBao
                        if self.cut_after is not None and self.cut_after in data:
                            self.cut_after = None
                            marked.set()
                dst.sendall(data)
        except OSError:
            pass
        _close(src)
        _close(dst)


def _close(s: socket.socket) -> None:
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    s.close()


@pytest.fixture
def relay(openbao):
    r = Relay(openbao.port)
    yield r
    r.stop()


def through(relay: Relay, openbao: OpenBao, **kw: Any) -> VaultBackend:
    over = openbao.settings_overrides()
    return VaultBackend(relay.url(), cluster=over["cluster"], token=over["vault.token"], **kw)


def event(n: int) -> AuditEvent:
    return AuditEvent(time=parse_time("2026-12-04T12:00:00Z"), actor="t", action=f"a{n}")


def test_reads_and_writes_of_one_thread_share_one_kept_alive_connection(openbao, relay):
    backend = through(relay, openbao)
    backend.write(fake_generation(1), expected=None)
    assert backend.settle_head()  # head is moved by a thread of its own (one more connection)
    for i in range(20):
        assert backend.latest() == 1
        backend.append_audit(event(i))
    backend.put_token(TokenRecord("ops", "a" * 64, ("read",), parse_time("2026-11-29T12:00:00Z")))
    assert [t.name for t in backend.tokens()] == ["ops"]
    assert len(backend.audit(limit=100)) == 20
    assert [r.version for r in backend.versions()] == [1]
    assert relay.accepted == 2  # this thread's, and head's mover's
    # Another thread has its own connection (a connection is never shared between threads).
    seen: list[int | None] = []
    t = threading.Thread(target=lambda: seen.append(backend.latest()))
    t.start()
    t.join()
    assert (seen, relay.accepted) == ([1], 3)
    backend.latest()
    assert relay.accepted == 3


def test_a_connection_closed_while_idle_is_replaced_for_writes_and_reads(openbao, relay):
    backend = through(relay, openbao)
    backend.write(fake_generation(1), expected=None)
    assert backend.settle_head()  # this thread's connection, and head's mover's
    relay.close_clients()  # the server's idle timeout
    assert backend.write(fake_generation(2), expected=1) == 2  # a write: noticed, not lost
    assert backend.settle_head()  # the mover's move: noticed too
    assert relay.accepted == 4
    relay.close_clients()
    assert backend.latest() == 2
    assert relay.accepted == 5


def test_a_commit_whose_answer_was_cut_is_read_back_and_a_write_is_not_resent(
        openbao, relay):
    backend = through(relay, openbao)
    backend.write(fake_generation(1), expected=None)
    relay.cut_after = b"/versions/2/record"  # OpenBao commits version 2; the answer is lost
    assert backend.write(fake_generation(2, "cut"), expected=1) == 2
    assert relay.cut_after is None  # the cut did happen
    # OpenBao took the write once (sent again, cas=0 would have refused it as a conflict).
    kv = openbao.client().secrets.kv.v2
    record = kv.read_secret_version(f"{backend.base}/versions/2/record",
                                    raise_on_deleted_version=True)["data"]
    assert record["metadata"]["version"] == 1
    assert backend.latest() == 2
    assert backend.read(2).record.reason == "cut"
    # Material written with its answer lost is not committed: the write fails, nothing shows.
    relay.cut_after = b"/versions/3/material-"
    with pytest.raises(BackendUnavailable, match="connection lost") as e:
        backend.write(fake_generation(3, "cut"), expected=2)
    assert str(e.value).startswith(f"vault at {relay.url()}: secret/data/pkisvc/")
    assert backend.latest() == 2
    # A read cut once is sent again on a fresh connection; cut twice, it is unavailable.
    relay.cut_answers = 1
    assert backend.latest() == 2
    relay.cut_answers = 2
    with pytest.raises(BackendUnavailable, match="connection lost"):
        backend.latest()
    assert backend.latest() == 2


def test_a_change_committed_behind_a_cut_answer_is_acknowledged_with_one_event(
        openbao, relay, tmp_path):
    from pkisvc.store import CertStore
    from tests.conftest import make_settings
    backend = through(relay, openbao)
    store = CertStore(backend, make_settings(tmp_path / "data"))
    store.init(actor="t")
    for n, path in enumerate((b"/versions/2/record", b"/versions/3/material-"), start=2):
        relay.cut_after = path
        record = store.rotate_leaf("server", actor="t", reason=f"cut {n}")
        assert relay.cut_after is None
        assert (record.version, store.latest()) == (n, n)
    events = [(e.version, e.reason) for e in store.audit()]
    assert events == [(3, "cut 3"), (2, "cut 2"), (1, "")]


def test_a_standby_redirecting_every_method_leads_reads_writes_and_lists_to_the_active(
        openbao):
    active = openbao.addr
    seen: list[str] = []

    class Standby(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as Vault's standby answers

        def redirect(self) -> None:
            seen.append(self.command)
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            self.send_response(307)
            self.send_header("Location", active + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_LIST = redirect

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Standby)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        over = openbao.settings_overrides()
        backend = VaultBackend(f"http://127.0.0.1:{server.server_port}",
                               cluster=over["cluster"], token=over["vault.token"])
        backend.write(fake_generation(1, "via the standby"), expected=None)
        backend.append_audit(event(1))
        assert backend.latest() == 1
        assert backend.read(1).record.reason == "via the standby"
        assert [e.action for e in backend.audit()] == ["a1"]  # LIST, then GET
        assert {"GET", "POST", "LIST"} <= set(seen)
        assert backend.addr == f"http://127.0.0.1:{server.server_port}"  # no fail-over
        direct = VaultBackend(active, cluster=over["cluster"], token=over["vault.token"])
        assert direct.read(1).record.reason == "via the standby"
    finally:
        server.shutdown()
        server.server_close()


def test_tls_with_ca_cert_keeps_one_connection_and_a_failed_handshake_moves_on(tmp_path):
    server = OpenBao(tmp_path / "tls-openbao", tls=True)
    relay = Relay(server.port)
    hangup = socket.create_server(("127.0.0.1", 0))  # accepts, then closes: no TLS at all

    def refuse_handshakes() -> None:
        while True:
            try:
                conn, _ = hangup.accept()
            except OSError:
                return
            conn.close()

    threading.Thread(target=refuse_handshakes, daemon=True).start()
    try:
        token = server.service_token("tls")
        backend = VaultBackend(relay.url("https"), cluster="tls", token=token,
                               ca_cert=server.ca_cert)
        backend.write(fake_generation(1), expected=None)
        assert backend.settle_head()
        for i in range(10):
            assert backend.latest() == 1
            backend.append_audit(event(i))
        assert relay.accepted == 2  # one TLS handshake for every call (and head's mover's)
        # Nothing is sent before the handshake: a node that fails it is passed over.
        dead = f"https://127.0.0.1:{hangup.getsockname()[1]}"
        both = VaultBackend(f"{dead},{server.addr}", cluster="tls", token=token,
                            ca_cert=server.ca_cert)
        assert both.latest() == 1
        assert both.addr == server.addr
        untrusting = VaultBackend(server.addr, cluster="tls", token=token)
        with pytest.raises(BackendUnavailable, match="cannot connect.*CERTIFICATE_VERIFY"):
            untrusting.latest()
    finally:
        hangup.close()
        relay.stop()
        server.stop()


def test_a_minions_state_lost_after_its_event_shows_the_change_once(openbao, relay, tmp_path):
    """The event of a minion's version change goes first: a state write that never arrives,
    or whose answer is cut, or an event whose answer is cut, leaves the change in /v1/audit
    once, and the minion's state right after the next answer."""
    from pkisvc.app import create_app
    from tests.conftest import make_settings
    backend = through(relay, openbao)
    app = create_app(make_settings(tmp_path / "data"), backend=backend)
    store = app.extensions["pkisvc"]
    h = {"Authorization": f"Bearer {store.create_token('salt', ['secrets', 'audit'], actor='t')}"}
    client = app.test_client()

    def ask(minion: str) -> int:
        return client.get(f"/v1/pillar/{minion}?role=node", headers=h).status_code

    def changes(minion: str) -> list[int]:
        r = client.get("/v1/audit?limit=1000", headers=h)
        return [e["version"] for e in r.get_json()["events"]
                if e["action"] == "pillar" and e["minion"] == minion]

    for m in ("k8s-node-1", "k8s-node-2", "k8s-node-3"):
        assert ask(m) == 200
    store.rotate_leaf("server", actor="t")
    state_write = f"POST /v1/secret/data/{backend.base}/minions/shards/".encode()
    relay.refuse = state_write  # the state write never reaches OpenBao
    assert ask("k8s-node-1") == 503
    assert changes("k8s-node-1") == [2, 1]  # the event went first
    assert backend.minion("k8s-node-1").version == 1
    relay.refuse = None
    assert ask("k8s-node-1") == 200
    assert backend.minion("k8s-node-1").version == 2
    assert changes("k8s-node-1") == [2, 1]  # written again, listed once

    relay.cut_after = state_write  # the state is written; its answer is lost: read back
    assert ask("k8s-node-2") == 200
    assert relay.cut_after is None
    assert (backend.minion("k8s-node-2").version, changes("k8s-node-2")) == (2, [2, 1])

    relay.cut_after = f"POST /v1/secret/data/{backend.base}/events/".encode()
    assert ask("k8s-node-3") == 503  # the event landed unacknowledged; the state waits
    assert relay.cut_after is None
    assert backend.minion("k8s-node-3").version == 1
    assert ask("k8s-node-3") == 200
    assert (backend.minion("k8s-node-3").version, changes("k8s-node-3")) == (2, [2, 1])
