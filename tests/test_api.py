"""The HTTP API through Flask's test client: scopes, bad input, pillar, metrics, OpenAPI."""
import json
import shutil

import pytest

from pkisvc.app import create_app
from pkisvc.backends.files import FilesBackend
from tests.conftest import chain_checked, make_settings

SCOPES = ["read", "secrets", "audit", "admin"]


@pytest.fixture
def app(tmp_path):
    settings = make_settings(tmp_path / "data",
                             roles={"master": ["ca.crt", "server.cert", "server.key",
                                               "kubecfg.crt", "kubecfg.key"],
                                    "node": ["ca.crt"]})
    return create_app(settings)


@pytest.fixture
def tokens(app):
    store = app.extensions["pkisvc"]
    return {s: store.create_token(f"t-{s}", [s], actor="test") for s in SCOPES}


def auth(token):
    return {"Authorization": f"Bearer {token}"}


def latest(app):
    return app.extensions["pkisvc"].latest()


# method, path, scope (None = open), JSON body, success status
ENDPOINTS = [
    ("GET", "/v1/health", None, None, 200),
    ("GET", "/v1/ca", None, None, 200),
    ("GET", "/v1/ca.pem", None, None, 200),
    ("GET", "/v1/openapi.json", None, None, 200),
    ("GET", "/metrics", None, None, 200),
    ("POST", "/v1/init", "admin", {}, 409),
    ("POST", "/v1/ca/rotate", "admin", {"reason": "matrix"}, 201),
    ("POST", "/v1/certs/server/rotate", "admin", {}, 201),
    ("POST", "/v1/certs/kubecfg/rotate", "admin", None, 201),
    ("POST", "/v1/rollback", "admin", {"version": 1}, 201),
    ("GET", "/v1/certs", "read", None, 200),
    ("GET", "/v1/certs/ca", "read", None, 200),
    ("GET", "/v1/certs/server?version=1", "read", None, 200),
    ("GET", "/v1/certs/server/key", "secrets", None, 200),
    ("GET", "/v1/certs/kubecfg/key?version=1", "secrets", None, 200),
    ("GET", "/v1/versions", "read", None, 200),
    ("GET", "/v1/versions/1", "read", None, 200),
    ("GET", "/v1/pillar/k8s-master-1?role=master", "secrets", None, 200),
    ("GET", "/v1/audit", "audit", None, 200),
    ("GET", "/v1/ca/rotation", "read", None, 200),
    ("POST", "/v1/ca/rotate/abort", "admin", {}, 409),
    ("POST", "/v1/ca/rotate/finish", "admin", None, 409),
]
IMPLIED = {"admin": {"admin", "read", "audit"}, "read": {"read"}, "secrets": {"secrets"},
           "audit": {"audit"}}


@pytest.mark.parametrize("method, path, scope, body, ok", ENDPOINTS,
                         ids=[f"{m} {p}" for m, p, *_ in ENDPOINTS])
def test_auth_matrix(app, tokens, method, path, scope, body, ok):
    client = app.test_client()
    kw = {"json": body} if body is not None else {}
    cases = [("none", {}), ("unknown", auth("pks_not-a-token")), ("garbage", {
        "Authorization": "Basic dXNlcjpwYXNz"})]
    cases += [(s, auth(tokens[s])) for s in SCOPES]
    for who, headers in cases:
        r = client.open(path, method=method, headers=headers, **kw)
        if scope is None:
            expected = ok
        elif who in ("none", "unknown", "garbage"):
            expected = 401
        else:
            expected = ok if scope in IMPLIED[who] else 403
        assert r.status_code == expected, (who, r.status_code, r.data[:200])
        if r.status_code >= 400:
            assert set(r.get_json()) >= {"error", "message"}


def test_private_keys_only_with_secrets_and_never_the_ca_key(app, tokens):
    client = app.test_client()
    for scope in ("read", "audit", "admin"):
        assert b"PRIVATE KEY" not in b"".join(
            client.get(p, headers=auth(tokens[scope])).data
            for p in ("/v1/certs", "/v1/certs/server", "/v1/versions", "/v1/audit", "/v1/ca"))
    r = client.get("/v1/certs/server/key", headers=auth(tokens["secrets"]))
    assert r.get_json()["pem"].startswith("-----BEGIN " + "PRIVATE KEY-----")
    r = client.get("/v1/certs/ca/key", headers=auth(tokens["secrets"]))
    assert r.status_code == 404
    assert b"PRIVATE" not in r.data
    r = client.post("/v1/certs/ca/rotate", headers=auth(tokens["admin"]))
    assert r.status_code == 400 and "/v1/ca/rotate" in r.get_json()["message"]


def test_revoked_token_is_refused_at_once(app, tokens):
    client = app.test_client()
    assert client.get("/v1/versions", headers=auth(tokens["read"])).status_code == 200
    app.extensions["pkisvc"].revoke_token("t-read", actor="test")
    assert client.get("/v1/versions", headers=auth(tokens["read"])).status_code == 401


def test_static_token_from_settings(tmp_path):
    import hashlib
    token = "static-secret-token"
    settings = make_settings(tmp_path / "data", tokens=[
        {"name": "ci", "sha256": hashlib.sha256(token.encode()).hexdigest(), "scopes": ["read"]}])
    client = create_app(settings).test_client()
    assert client.get("/v1/versions", headers=auth(token)).status_code == 200
    assert client.get("/v1/audit", headers=auth(token)).status_code == 403


def test_first_start_writes_an_admin_token(app):
    path = app.extensions["pkisvc"].settings.data_dir / "admin.token"
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    token = path.read_text().strip()
    r = app.test_client().post("/v1/ca/rotate", headers=auth(token))
    assert r.status_code == 201 and r.get_json()["actor"] == "admin"
    create_app(app.extensions["pkisvc"].settings)  # a second start keeps the same token
    assert path.read_text().strip() == token


BAD = [
    ("POST", "/v1/ca/rotate", b"{not json", 400),
    ("POST", "/v1/ca/rotate", b"[1, 2]", 400),
    ("POST", "/v1/ca/rotate", b'{"reason": 5}', 400),
    ("POST", "/v1/ca/rotate", b'{"colour": "blue"}', 400),
    ("POST", "/v1/ca/rotate", b'{"mode": "sideways"}', 400),
    ("POST", "/v1/ca/rotate", b'{"key_type": "dsa"}', 400),
    ("POST", "/v1/ca/rotate", json.dumps({"reason": "x" * 2000}).encode(), 400),
    ("POST", "/v1/ca/rotate", b'{"reason": "' + b"x" * (65 * 1024) + b'"}', 413),
    ("POST", "/v1/rollback", b"{}", 400),
    ("POST", "/v1/rollback", b'{"version": "1"}', 400),
    ("POST", "/v1/rollback", b'{"version": true}', 400),
    ("POST", "/v1/rollback", b'{"version": 99}', 404),
    ("POST", "/v1/rollback", b'{"version": -3}', 400),
    ("POST", "/v1/certs/server/rotate", b'{"sans": "a.example"}', 400),
    ("POST", "/v1/certs/server/rotate", b'{"sans": [1]}', 400),
    ("POST", "/v1/certs/server/rotate", b'{"sans": ["bad name!"]}', 400),
    ("POST", "/v1/certs/etcd/rotate", b"{}", 404),
    ("GET", "/v1/certs/nope", None, 404),
    ("GET", "/v1/certs/..%2F..%2Fetc%2Fpasswd", None, 404),
    ("GET", "/v1/certs/ca%00", None, 404),
    ("GET", "/v1/certs/server?version=abc", None, 400),
    ("GET", "/v1/certs/server?version=999", None, 404),
    ("GET", "/v1/certs/server?version=0", None, 400),
    ("GET", "/v1/certs/kubecfg/key?version=%C2%B9", None, 400),  # "¹": isdigit(), not int()
    ("GET", "/v1/versions/999", None, 404),
    ("GET", "/v1/versions/..", None, 404),
    ("GET", "/v1/pillar/k8s-master-1", None, 400),
    ("GET", "/v1/pillar/k8s-master-1?role=root", None, 404),
    ("GET", "/v1/pillar/..%2Fetc?role=master", None, 404),
    ("GET", "/v1/pillar/%2E%2E?role=master", None, 400),
    ("GET", "/v1/audit?since=yesterday", None, 400),
    ("GET", "/v1/audit?limit=0", None, 400),
    ("DELETE", "/v1/versions", None, 405),
]


@pytest.mark.parametrize("method, path, data, status", BAD,
                         ids=[f"{m} {p[:40]}" for m, p, *_ in BAD])
def test_bad_input_is_a_clear_4xx_and_writes_nothing(app, tokens, method, path, data, status):
    before = latest(app)
    audit_before = len(app.extensions["pkisvc"].audit(limit=10000))
    # One token that can do everything the path needs.
    store = app.extensions["pkisvc"]
    token = store.create_token("all", ["admin", "secrets"], actor="test")
    r = app.test_client().open(path, method=method, data=data, headers={
        **auth(token), "Content-Type": "application/json"})
    assert r.status_code == status, r.data[:300]
    body = r.get_json()
    assert body["error"] and body["message"]
    assert "Traceback" not in r.get_data(as_text=True)
    assert latest(app) == before
    # Only the token creation above was audited.
    assert len(store.audit(limit=10000)) == audit_before + 1


def test_backend_down_is_503_and_recovers(tmp_path):
    settings = make_settings(tmp_path / "data")
    app = create_app(settings)
    token = (settings.data_dir / "admin.token").read_text().strip()
    client = app.test_client()
    chain_checked(client)
    moved = tmp_path / "moved"
    shutil.move(settings.data_dir, moved)
    settings.data_dir.write_text("the disk went away")
    r = client.post("/v1/ca/rotate", headers=auth(token))
    assert r.status_code in (401, 503)  # tokens live in the backend too
    r = client.get("/v1/health")
    assert r.status_code == 503 and r.get_json() == {
        "status": "degraded", "backend": "down", "version": None}
    settings.data_dir.unlink()
    shutil.move(moved, settings.data_dir)
    assert client.get("/v1/health").status_code == 200
    r = client.post("/v1/ca/rotate", headers=auth(token))
    assert r.status_code == 201 and r.get_json()["version"] == 2
    assert [v.version for v in FilesBackend(settings.data_dir).versions()] == [1, 2]


def test_backend_down_during_a_rotation_is_503(tmp_path):
    import hashlib
    token = "static-admin"
    settings = make_settings(tmp_path / "data", tokens=[
        {"name": "ops", "sha256": hashlib.sha256(token.encode()).hexdigest(),
         "scopes": ["admin"]}])
    client = create_app(settings).test_client()
    chain_checked(client)
    moved = tmp_path / "moved"
    shutil.move(settings.data_dir, moved)
    settings.data_dir.write_text("gone")
    r = client.post("/v1/ca/rotate", headers=auth(token))
    assert r.status_code == 503 and r.get_json()["error"] == "backend_unavailable"
    assert "PRIVATE" not in r.get_data(as_text=True)
    settings.data_dir.unlink()
    shutil.move(moved, settings.data_dir)
    assert FilesBackend(settings.data_dir).latest() == 1
    assert not list((settings.data_dir / "tmp").iterdir())


def test_pillar_roles_etag_and_audit(app, tokens):
    client = app.test_client()
    h = auth(tokens["secrets"])
    r = client.get("/v1/pillar/k8s-master-1?role=master", headers=h)
    assert r.status_code == 200 and r.headers["ETag"] == '"1"'
    doc = r.get_json()
    assert doc["version"] == 1 and doc["role"] == "master"
    assert set(doc["files"]) == {"ca.crt", "server.cert", "server.key", "kubecfg.crt",
                                 "kubecfg.key"}
    assert doc["files"]["ca.crt"] == client.get("/v1/ca").get_json()["pem"]
    node = client.get("/v1/pillar/k8s-node-1?role=node", headers=h).get_json()
    assert set(node["files"]) == {"ca.crt"}
    r = client.get("/v1/pillar/k8s-master-1?role=master", headers={**h, "If-None-Match": '"1"'})
    assert r.status_code == 304 and r.headers["ETag"] == '"1"'
    client.post("/v1/ca/rotate", headers=auth(tokens["admin"]))
    r = client.get("/v1/pillar/k8s-master-1?role=master", headers={**h, "If-None-Match": '"1"'})
    assert r.status_code == 200 and r.get_json()["version"] == 2
    events = client.get("/v1/audit?limit=1000", headers=auth(tokens["audit"])).get_json()["events"]
    deliveries = [(e["minion"], e["version"], e["role"], len(e["items"]))
                  for e in events if e["action"] == "pillar"]
    # One event per change of what a minion holds: the 304 changed nothing (issue 17).
    assert deliveries == [("k8s-master-1", 2, "master", 5), ("k8s-node-1", 1, "node", 1),
                          ("k8s-master-1", 1, "master", 5)]
    assert all(e["actor"] == "t-secrets" and e["remote_addr"] for e in events
               if e["action"] == "pillar")
    assert "PRIVATE KEY" not in json.dumps(events)


def test_key_delivery_is_audited(app, tokens):
    client = app.test_client()
    client.get("/v1/certs/kubecfg/key", headers=auth(tokens["secrets"]))
    e = client.get("/v1/audit?limit=1", headers=auth(tokens["audit"])).get_json()["events"][0]
    assert (e["action"], e["items"], e["version"], e["actor"]) == ("key", ["kubecfg"], 1,
                                                                    "t-secrets")


def test_audit_since(app, tokens):
    client = app.test_client()
    h = auth(tokens["audit"])
    events = client.get("/v1/audit", headers=h).get_json()["events"]
    assert client.get("/v1/audit?since=2999-01-01T00:00:00Z", headers=h).get_json() == {
        "events": []}
    assert len(client.get("/v1/audit?since=2000-01-01T00:00:00Z", headers=h).get_json()[
        "events"]) == len(events)


def test_metrics_are_read_from_the_store(app, tokens):
    client = app.test_client()
    client.post("/v1/ca/rotate", headers=auth(tokens["admin"]))
    text = client.get("/metrics").get_data(as_text=True)
    store = app.extensions["pkisvc"]
    rec = store.read().record
    assert 'pkisvc_generation{cluster="default"} 2.0' in text
    assert 'pkisvc_rotations_total{cluster="default",operation="rotate-ca"} 1.0' in text
    from prometheus_client.parser import text_string_to_metric_families
    samples = {(s.name, s.labels.get("item")): s.value
               for f in text_string_to_metric_families(text) for s in f.samples}
    for item in ("ca", "server", "kubecfg"):
        for field, metric in (("not_after", "pkisvc_certificate_expiration_timestamp_seconds"),
                              ("not_before", "pkisvc_certificate_not_before_timestamp_seconds")):
            assert samples[(metric, item)] == getattr(rec.items[item], field).timestamp()
    assert 'pkisvc_http_requests_total{endpoint="/v1/ca/rotate",method="POST",status="201"}' in text
    assert "pkisvc_http_request_duration_seconds_bucket" in text


def test_metrics_scope(tmp_path):
    settings = make_settings(tmp_path / "data", metrics_scope="read")
    app = create_app(settings)
    token = app.extensions["pkisvc"].create_token("prom", ["read"], actor="t")
    assert app.test_client().get("/metrics").status_code == 401
    assert app.test_client().get("/metrics", headers=auth(token)).status_code == 200


def test_openapi_describes_every_route(app):
    from openapi_spec_validator import validate
    doc = app.test_client().get("/v1/openapi.json").get_json()
    validate(doc)
    routes = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":
            continue
        if rule.endpoint.startswith("ui."):
            continue  # the operator pages are HTML for people, not API (docs/decisions.md)
        path = rule.rule.replace("<int:version>", "{version}")
        for arg in rule.arguments:
            path = path.replace(f"<{arg}>", "{" + arg + "}")
        for method in rule.methods - {"HEAD", "OPTIONS"}:
            routes.add((path, method.lower()))
    documented = {(p, m) for p, ops in doc["paths"].items() for m in ops}
    assert routes == documented
    # The answers served from memory during a backend outage say so in a documented header.
    paths = doc["paths"]
    for path, status in (("/v1/ca", "200"), ("/v1/ca.pem", "200"),
                         ("/v1/certs/{item}", "200"), ("/v1/pillar/{minion_id}", "304")):
        assert "PKISVC-Stale" in paths[path]["get"]["responses"][status]["headers"], path


def test_fast_path_answers_as_flask_does(app, tokens):
    client = app.test_client()
    h = auth(tokens["read"])
    fast = client.get("/v1/certs/server", headers=h)  # served by FastReads
    slow = client.get("/v1/certs/server?version=1", headers=h)  # a query: served by Flask
    assert fast.status_code == slow.status_code == 200
    assert fast.get_json() == slow.get_json()
    assert fast.headers["Content-Type"] == slow.headers["Content-Type"] == "application/json"
    app.extensions["pkisvc"].revoke_token("t-read", actor="test")
    r = client.get("/v1/certs/server", headers=h)
    assert r.status_code == 401 and r.get_json()["error"] == "unauthorized"
    assert client.get("/v1/certs/server", headers=auth(tokens["audit"])).status_code == 403
    client.post("/v1/ca/rotate", headers=auth(tokens["admin"]))
    assert client.get("/v1/certs/server", headers=auth(tokens["admin"])).get_json()["version"] == 2
