"""The hot reads through the WSGI fast path and through Flask alone: one answer, one audit.

Every case is sent twice to one app on the files backend (a tmp data dir): first to the Flask
app without the `FastReads` layer, then through it.  Status, ETag, Content-Type, body and the
audit events each request left must be the same.  Counting Flask's requests and the backend's
calls shows that the fast path answers the ordinary reads itself and falls back to Flask at
most once, without asking the backend again.
"""
from __future__ import annotations

import hashlib
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
from werkzeug.test import Client

from pkisvc import metrics
from pkisvc.answers import none_match
from pkisvc.app import create_app
from pkisvc.backends.files import FilesBackend
from pkisvc.fastpath import CERTS, PILLAR
from pkisvc.model import AuditEvent
from tests.conftest import make_settings

STATIC = "static-read-and-secrets"  # a settings token: checked without the backend


class CountingFiles(FilesBackend):
    """The real files backend, counting the calls the service makes to it."""

    calls = 0

    def latest(self) -> int | None:
        self.calls += 1
        return super().latest()

    def read(self, version: int | None = None) -> Any:
        self.calls += 1
        return super().read(version)

    def tokens(self) -> Any:
        self.calls += 1
        return super().tokens()

    def append_audit(self, event: Any) -> None:
        self.calls += 1
        super().append_audit(event)


class Service:
    def __init__(self, tmp_path: Path) -> None:
        self.settings = make_settings(
            tmp_path / "data",
            roles={"master": ["ca.crt", "server.cert", "server.key", "kubecfg.crt",
                              "kubecfg.key"], "node": ["ca.crt"]},
            tokens=[{"name": "static", "sha256": hashlib.sha256(STATIC.encode()).hexdigest(),
                     "scopes": ["read", "secrets"]}])
        self.backend = CountingFiles(self.settings.data_dir)
        self.app = create_app(self.settings, backend=self.backend)
        self.store = self.app.extensions["pkisvc"]
        self.tokens = {s: self.store.create_token(f"t-{s}", [s], actor="test")
                       for s in ("read", "secrets", "audit")}
        self.tokens["static"] = STATIC
        self.flask_requests = 0

        def seen() -> None:
            self.flask_requests += 1
        self.app.before_request(seen)
        self.fast = self.app.test_client()
        self.flask_alone = Client(self.app.wsgi_app.app)  # type: ignore[attr-defined]

    def events(self) -> list[dict[str, Any]]:
        """The appended events as the chain's periods hold them, oldest first, without the
        times.

        Read as stored, not through audit(): each send replays one delivery (the same change,
        so the same event id), which audit() lists once.
        """
        fresh = FilesBackend(self.settings.data_dir)
        out = [AuditEvent.from_dict(entry["event"]).to_dict()
               for period in fresh.chain_periods() for _, entry in period.entries
               if entry is not None and entry.get("kind") == "event"]
        for e in out:
            e.pop("time")
        return out

    def send(self, client: Client, path: str, headers: dict[str, str],
             during: Callable[[], Any]) -> dict[str, Any]:
        # Each path meets a minion that never fetched: a delivery is written and audited once
        # per change of what a minion holds, so a second send would leave nothing to compare.
        (self.settings.data_dir / "minions.jsonl").unlink(missing_ok=True)
        self.store._minions.clear()
        before = len(self.events())
        flask_before, calls_before = self.flask_requests, self.backend.calls
        with during():
            r = client.get(path, headers=headers, environ_base={"REMOTE_ADDR": "10.0.0.7"})
        return {"status": r.status_code, "etag": r.headers.get("ETag"),
                "type": r.headers.get("Content-Type"),
                "length": r.headers.get("Content-Length"), "body": r.get_data(),
                "audit": self.events()[before:],
                "flask": self.flask_requests - flask_before,
                "calls": self.backend.calls - calls_before}


@pytest.fixture
def service(tmp_path: Path) -> Service:
    return Service(tmp_path)


@contextmanager
def as_usual() -> Iterator[None]:
    yield


def damaged_token_store(service: Service) -> Callable[[], Any]:
    @contextmanager
    def during() -> Iterator[None]:
        path = service.settings.data_dir / "tokens.json"
        kept = path.read_bytes()
        path.write_bytes(b'[{"name": "t-read", "sha256": ')
        try:
            yield
        finally:
            path.write_bytes(kept)
    return during


def outage(service: Service) -> Callable[[], Any]:
    @contextmanager
    def during() -> Iterator[None]:
        data = service.settings.data_dir
        moved = data.with_name("moved")
        shutil.move(data, moved)
        data.write_text("the disk went away")
        try:
            yield
        finally:
            data.unlink()
            shutil.move(moved, data)
    return during


M = "/v1/pillar/k8s-master-1?role=master"
# name, path, token, extra headers, what happens meanwhile, expected status, fast path alone?
CASES: list[tuple[str, str, str | None, dict[str, str], Any, int, bool]] = [
    ("cert", "/v1/certs/server", "read", {}, None, 200, True),
    ("cert by static token", "/v1/certs/ca", "static", {}, None, 200, True),
    ("cert without token", "/v1/certs/server", None, {}, None, 401, False),
    ("cert without read scope", "/v1/certs/server", "audit", {}, None, 403, False),
    ("cert unknown item", "/v1/certs/etcd", "read", {}, None, 404, False),
    ("cert of a version", "/v1/certs/kubecfg?version=1", "read", {}, None, 200, False),
    ("cert with a damaged token store", "/v1/certs/server", "read", {}, damaged_token_store,
     500, False),
    ("cert in an outage", "/v1/certs/server", "read", {}, outage, 503, False),
    ("cert in an outage, static token", "/v1/certs/server", "static", {}, outage, 503, False),
    ("pillar", M, "secrets", {}, None, 200, True),
    ("pillar node", "/v1/pillar/k8s-node-1?role=node", "secrets", {}, None, 200, True),
    ("pillar If-None-Match: *", M, "secrets", {"If-None-Match": "*"}, None, 304, True),
    ("pillar If-None-Match list", M, "secrets", {"If-None-Match": '"6", "1"'}, None, 304, True),
    ("pillar weak tag", M, "secrets", {"If-None-Match": 'W/"1"'}, None, 304, True),
    ("pillar weak tag in a list", M, "secrets", {"If-None-Match": 'W/"0" ,W/"1"'}, None, 304,
     True),
    ("pillar other tag", M, "secrets", {"If-None-Match": '"2"'}, None, 200, True),
    ("pillar other tags", M, "secrets", {"If-None-Match": '"11", W/"10"'}, None, 200, True),
    ("pillar without token", M, None, {}, None, 401, False),
    ("pillar without secrets scope", M, "read", {}, None, 403, False),
    ("pillar unknown role", "/v1/pillar/k8s-master-1?role=root", "secrets", {}, None, 404,
     False),
    ("pillar without role", "/v1/pillar/k8s-master-1", "secrets", {}, None, 400, False),
    ("pillar bad minion id", "/v1/pillar/-k8s?role=master", "secrets", {}, None, 400, False),
    ("pillar minion id with a trailing newline", "/v1/pillar/k8s-node-1%0A?role=master",
     "secrets", {}, None, 400, False),
    ("pillar minion id with a newline inside", "/v1/pillar/k8s%0Anode?role=node",
     "secrets", {}, None, 400, False),
    ("pillar with a damaged token store", M, "secrets", {}, damaged_token_store, 500, False),
    ("pillar in an outage", M, "secrets", {}, outage, 503, False),
    ("pillar in an outage, static token", M, "static", {"If-None-Match": '"1"'}, outage, 503,
     False),
]


@pytest.mark.parametrize("name, path, token, headers, during, status, fast_alone", CASES,
                         ids=[c[0] for c in CASES])
def test_fast_path_and_flask_give_one_answer(service, name, path, token, headers, during,
                                             status, fast_alone):
    hdrs = {**headers, **({"Authorization": f"Bearer {service.tokens[token]}"}
                          if token else {})}
    meanwhile = during(service) if during else as_usual
    alone = service.send(service.flask_alone, path, hdrs, meanwhile)
    fast = service.send(service.fast, path, hdrs, meanwhile)
    assert alone["status"] == status, alone["body"][:300]
    for key in ("status", "etag", "type", "length", "body", "audit"):
        assert fast[key] == alone[key], key
    if status != 304:  # every answer that leaves the service is JSON, a 500 too
        assert alone["type"] == "application/json"
    if status >= 400:
        doc = fast["body"].decode()
        assert '"error"' in doc and '"message"' in doc and "Traceback" not in doc
        assert not fast["audit"]
    # The fast path answered the ordinary reads itself, and fell back to Flask at most once,
    # without asking the backend more than Flask alone did.
    assert alone["flask"] == 1
    assert fast["flask"] == (0 if fast_alone else 1)
    assert fast["calls"] <= alone["calls"]


def test_what_each_answer_audits(service):
    """Deliveries: the files on a 200, none on a 304, the minion id exactly as asked."""
    auth = {"Authorization": f"Bearer {service.tokens['secrets']}"}
    r = service.send(service.fast, M, {**auth, "If-None-Match": 'W/"1"'}, as_usual)
    assert r["status"] == 304 and r["etag"] == '"1"' and r["body"] == b""
    r2 = service.send(service.fast, M.replace("-1", "-2"), auth, as_usual)
    assert r2["status"] == 200 and r2["etag"] == '"1"'
    assert [(e["action"], e["actor"], e["minion"], e["role"], e["version"], len(e["items"]),
             e["remote_addr"]) for e in r["audit"] + r2["audit"]] == [
        ("pillar", "t-secrets", "k8s-master-1", "master", 1, 0, "10.0.0.7"),
        ("pillar", "t-secrets", "k8s-master-2", "master", 1, 5, "10.0.0.7")]
    r3 = service.send(service.fast, "/v1/pillar/k8s-node-1%0A?role=master", auth, as_usual)
    assert r3["status"] == 400 and not r3["audit"]
    assert all(e.get("minion") != "k8s-node-1\n" for e in service.events())


def test_a_new_version_changes_the_answer_on_both_paths(service):
    auth = {"Authorization": f"Bearer {service.tokens['secrets']}"}
    service.store.rotate_ca(actor="test")
    for client in (service.flask_alone, service.fast):
        r = client.get(M, headers={**auth, "If-None-Match": '"1"'})
        assert r.status_code == 200 and r.headers["ETag"] == '"2"'
        assert r.get_json()["version"] == 2
        assert client.get(M, headers={**auth, "If-None-Match": "*"}).status_code == 304


def count(endpoint: str, status: str) -> float:
    return sum(s.value for m in metrics.REQUESTS.collect() for s in m.samples
               if s.name.endswith("_total") and s.labels == {
                   "method": "GET", "endpoint": endpoint, "status": status})


def test_requests_are_counted_once_on_either_path(service):
    auth = {"Authorization": f"Bearer {service.tokens['secrets']}"}
    read = {"Authorization": f"Bearer {service.tokens['read']}"}
    before = {k: count(*k) for k in [(PILLAR, "200"), (PILLAR, "304"), (PILLAR, "503"),
                                     (CERTS, "200"), (CERTS, "401")]}
    service.fast.get(M, headers=auth)
    service.fast.get(M, headers={**auth, "If-None-Match": "*"})
    service.fast.get("/v1/certs/ca", headers=read)
    service.fast.get("/v1/certs/ca")
    with outage(service)():
        service.fast.get(M, headers={"Authorization": f"Bearer {STATIC}"})
    assert {k: count(*k) - v for k, v in before.items()} == {
        (PILLAR, "200"): 1, (PILLAR, "304"): 1, (PILLAR, "503"): 1, (CERTS, "200"): 1,
        (CERTS, "401"): 1}


@pytest.mark.parametrize("header, matches", [
    (None, False), ("", False), ("*", True), (' * ', True), ('"7"', True), ('W/"7"', True),
    ('"6", "7"', True), ('"6","7"', True), ('W/"6", W/"7"', True), ('"6"', False),
    ('"77"', False), ('"7 "', False), ('W/"17"', False), ('"a,7", "b"', False),
    ('"6", *', True), ("7", True),  # unquoted, as lenient clients send it (Werkzeug too)
])
def test_if_none_match_follows_rfc_9110(header, matches):
    assert none_match(header, "7") is matches
