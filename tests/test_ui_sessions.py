"""The operator pages' sessions (issue 19, item 4): the cookie holds a session id, never the
token; logging out, expiry and revoking the token end it, on every worker and replica."""
import hashlib
import os
import re
from datetime import timedelta

import pytest
import requests

from pkisvc.app import create_app
from pkisvc.backends import load_backend
from pkisvc.backends.files import FilesBackend
from pkisvc.sessions import PER_TOKEN
from pkisvc.store import CertStore, utcnow
from pkisvc.tokens import hash_token
from tests.conftest import make_settings, serve, stop
from tests.test_ui import bearer, csrf, log_in, set_cookies

COOKIE = "pkisvc_ui"


def session_cookie(response):
    """The session id a response sets, from its Set-Cookie header."""
    for c in set_cookies(response):
        m = re.match(rf"{COOKIE}=([^;]*);", c)
        if m and "Path=/ui/" in c and m.group(1):
            return m.group(1)
    return None


def with_cookie(app, value):
    """A browser that holds exactly this session cookie (say, one copied before logout)."""
    client = app.test_client()
    client.set_cookie(COOKIE, value, path="/ui/")
    return client


def log_out(client):
    return client.post("/ui/logout", data={"csrf": csrf(client)})


def snapshot(data_dir):
    """Every file under the data dir with its size and mtime: what a write would change."""
    out = {}
    for root, _, files in os.walk(data_dir):
        for f in files:
            st = os.stat(os.path.join(root, f))
            out[os.path.join(root, f)] = (st.st_size, st.st_mtime_ns, st.st_ino)
    return out


@pytest.fixture
def app(tmp_path):
    """The service over a fresh files store (its first start wrote admin.token)."""
    return create_app(make_settings(tmp_path / "data"))


@pytest.fixture
def reader(store):
    """A token for the pages: read and audit."""
    return store.create_token("oncall", ["read", "audit"], actor="test")


@pytest.fixture
def store(app):
    return app.extensions["pkisvc"]


def test_the_cookie_holds_a_session_id_never_the_token(app, store, reader, tmp_path):
    client = app.test_client()
    r = log_in(client, reader, "/ui/minions")
    assert r.status_code == 303 and r.headers["Location"] == "/ui/minions"
    cookie = next(c for c in set_cookies(r) if c.startswith(f"{COOKIE}=pkui_"))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui/;" in cookie + ";"
    session_id = session_cookie(r)
    assert session_id.startswith("pkui_") and reader not in cookie
    assert client.get("/ui/minions").status_code == 200
    # The store keeps the session under a hash: neither the id nor the token is on disk.
    for path in snapshot(tmp_path / "data"):
        data = open(path, "rb").read()
        assert session_id.encode() not in data and reader.encode() not in data, path
    [held] = store.backend.sessions()
    assert (held.name, held.scopes, held.token_sha256) == ("oncall", ("read", "audit"),
                                                           hash_token(reader))
    assert held.expires - held.created == timedelta(hours=8)  # ui.session_ttl's default


def test_after_logout_the_cookie_is_refused_on_the_pages_and_on_the_api(app, store, reader):
    client = app.test_client()
    session_id = session_cookie(log_in(client, reader))
    assert client.get("/ui/audit").status_code == 200
    # A session id is never a bearer token, not even while the session lasts.
    assert app.test_client().get("/v1/audit", headers=bearer(session_id)).status_code == 401
    assert app.test_client().get("/ui/", headers=bearer(session_id)).status_code == 401
    r = log_out(client)
    assert r.status_code == 303 and r.headers["Location"] == "/ui/login"
    assert any(c.startswith(f"{COOKIE}=;") and "Path=/ui/" in c for c in set_cookies(r))
    assert store.backend.sessions() == []
    # The value copied before logout opens nothing any more.
    for path in ("/ui/", "/ui/minions", "/ui/audit", "/ui/history"):
        r = with_cookie(app, session_id).get(path)
        assert r.status_code == 302 and r.headers["Location"].startswith("/ui/login?"), path
        assert "expired=1" in r.headers["Location"]
    r = app.test_client().get("/v1/audit", headers=bearer(session_id))
    assert r.status_code == 401 and r.get_json()["error"] == "unauthorized"
    # The token itself still works on the API: logging out ends the session, not the token.
    assert app.test_client().get("/v1/audit", headers=bearer(reader)).status_code == 200


def test_logout_needs_the_forms_csrf_value(app, store, reader):
    client = app.test_client()
    log_in(client, reader)
    assert client.post("/ui/logout", data={"csrf": "forged"}).status_code == 403
    r = client.post("/ui/logout", data={"csrf": csrf(client)},
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 403
    assert client.get("/ui/").status_code == 200  # still logged in
    assert len(store.backend.sessions()) == 1


def test_a_token_holding_secrets_cannot_log_in_and_the_page_says_so(app, store, tmp_path):
    first_start = (tmp_path / "data" / "admin.token").read_text().strip()  # admin + secrets
    ops = store.create_token("ops", ["read", "audit", "secrets"], actor="test")
    for token, name in ((first_start, "admin"), (ops, "ops")):
        client = app.test_client()
        r = log_in(client, token)
        assert r.status_code == 403
        assert re.search(rf"id=\"error\">\s*token &#39;{name}&#39; holds the &#39;secrets&#39;",
                         r.text)
        assert not any(c.startswith(f"{COOKIE}=") for c in set_cookies(r))
        assert client.get("/ui/").status_code == 302
    assert store.backend.sessions() == []


def test_a_refused_login_writes_nothing(app, store, reader, tmp_path):
    ops = store.create_token("ops", ["admin", "secrets"], actor="test")
    audit_only = store.create_token("auditor", ["audit"], actor="test")
    data = tmp_path / "data"
    log_out(app.test_client())  # a logout without a session writes nothing either
    before = snapshot(data)
    client = app.test_client()
    form = csrf(client)
    attempts = [({"token": reader, "csrf": "forged"}, 403),  # not our form
                ({"token": "pks_wrong", "csrf": form}, 401),
                ({"token": "pkui_" + "A" * 43, "csrf": form}, 401),  # a session id is no token
                ({"token": audit_only, "csrf": form}, 403),  # lacks read
                ({"token": ops, "csrf": form}, 403)]  # holds secrets
    for _ in range(20):
        for fields, status in attempts:
            assert client.post("/ui/login", data=fields).status_code == status
        assert with_cookie(app, "pkui_" + "B" * 43).get("/ui/").status_code == 302
        assert with_cookie(app, reader).get("/ui/").status_code == 302  # the old raw cookie
    assert snapshot(data) == before


@pytest.fixture(params=["files", pytest.param("vault", marks=pytest.mark.vault)])
def shared(request, tmp_path):
    """Settings for two app instances (two workers, or two replicas) over one store; the
    Vault one holds the shipped service policy (no delete)."""
    if request.param == "files":
        return make_settings(tmp_path / "data")
    openbao = request.getfixturevalue("openbao")
    return make_settings(tmp_path / "data", **openbao.settings_overrides())


def test_a_session_opened_on_one_worker_works_and_ends_on_another(shared):
    a, b = create_app(shared), create_app(shared)
    token = a.extensions["pkisvc"].create_token("oncall", ["read", "audit"], actor="test")
    on_a = a.test_client()
    session_id = session_cookie(log_in(on_a, token))
    on_b = with_cookie(b, session_id)
    assert on_b.get("/ui/minions").status_code == 200
    assert on_b.get("/ui/").status_code == 200
    # Logged out on b (b's own form: the CSRF cookie is b's), refused on a at once.
    assert log_out(on_b).status_code == 303
    assert with_cookie(a, session_id).get("/ui/").status_code == 302
    assert on_a.get("/ui/audit").status_code == 302
    assert a.extensions["pkisvc"].backend.sessions() == []


def test_revoking_the_token_ends_its_sessions(app, store, reader):
    other = store.create_token("other", ["read"], actor="test")
    mine = [session_cookie(log_in(app.test_client(), reader)) for _ in range(2)]
    theirs = session_cookie(log_in(app.test_client(), other))
    store.revoke_token("oncall", actor="test")
    r = with_cookie(app, mine[0]).get("/ui/")
    assert r.status_code == 302 and "expired=1" in r.headers["Location"]
    assert "no longer valid" in app.test_client().get(r.headers["Location"]).text
    assert with_cookie(app, mine[1]).get("/ui/history").status_code == 302
    assert with_cookie(app, theirs).get("/ui/history").status_code == 200
    # A new token under the old name does not bring the old sessions back.
    store.create_token("oncall", ["read", "audit"], actor="test")
    assert with_cookie(app, mine[1]).get("/ui/").status_code == 302
    # Both were removed when presented; the other token's stays.
    assert [s.name for s in store.backend.sessions()] == ["other"]


def test_an_expired_session_is_refused_and_cleaned_up(app, store, reader, tmp_path):
    # Sessions opened earlier, by another process over the same store that sees no idle
    # limit (its own logins would clean the others up).
    backend = FilesBackend(tmp_path / "data")
    settings = make_settings(tmp_path / "data", **{"ui.session_idle": "0"})
    now = utcnow()

    def opened(ago, token=reader):
        return CertStore(backend, settings, clock=lambda: now - ago).open_session(
            hash_token(token))

    expired = opened(timedelta(hours=8, seconds=1))  # past ui.session_ttl (8h)
    idle = opened(timedelta(hours=1, minutes=1))  # unused past ui.session_idle (1h)
    fresh = opened(timedelta(minutes=59))
    assert with_cookie(app, expired).get("/ui/").status_code == 302
    assert with_cookie(app, idle).get("/ui/").status_code == 302
    assert with_cookie(app, fresh).get("/ui/").status_code == 200
    assert len(store.backend.sessions()) == 1  # the two that ended were removed
    # Ended sessions nobody presents again go at the next login, whoever logs in.
    other = store.create_token("other", ["read"], actor="test")
    opened(timedelta(hours=9))
    opened(timedelta(hours=9), token=other)
    assert len(store.backend.sessions()) == 3
    log_in(app.test_client(), other)
    assert sorted(s.name for s in store.backend.sessions()) == ["oncall", "other"]


def test_use_keeps_a_session_from_going_idle_until_its_ttl(tmp_path):
    settings = make_settings(tmp_path / "data", **{"ui.session_ttl": "3h",
                                                   "ui.session_idle": "1h"})
    backend = FilesBackend(tmp_path / "data")
    token = CertStore(backend, settings).create_token("oncall", ["read"], actor="test")
    t0 = utcnow()

    def at(minutes):
        return CertStore(backend, settings, clock=lambda: t0 + timedelta(minutes=minutes))

    session_id = at(0).open_session(hash_token(token))
    for minutes in (50, 100, 150, 179):  # used every 50 minutes: never idle for an hour
        assert at(minutes).session(session_id) is not None, minutes
        assert backend.sessions()[0].seen == t0 + timedelta(minutes=minutes)
    assert at(180).session(session_id) is None  # the absolute limit holds all the same
    assert backend.sessions() == []
    # Without an idle limit a session is never written back: reads only.
    unlimited = make_settings(tmp_path / "data", **{"ui.session_idle": "0"})
    session_id = CertStore(backend, unlimited).open_session(hash_token(token))
    before = backend.sessions()
    for minutes in (30, 90, 400):
        s = CertStore(backend, unlimited, clock=lambda m=minutes: t0 + timedelta(minutes=m))
        assert s.session(session_id) is not None
    assert backend.sessions() == before


def test_logging_in_again_replaces_the_browsers_session(app, store, reader):
    client = app.test_client()
    first = session_cookie(log_in(client, reader))
    second = session_cookie(log_in(client, reader))
    assert first != second
    assert client.get("/ui/").status_code == 200
    assert with_cookie(app, first).get("/ui/").status_code == 302
    assert len(store.backend.sessions()) == 1


def test_one_token_holds_a_bounded_number_of_sessions(app, store, reader):
    ids = [session_cookie(log_in(app.test_client(), reader)) for _ in range(PER_TOKEN + 2)]
    assert len(store.backend.sessions()) == PER_TOKEN
    assert [with_cookie(app, i).get("/ui/").status_code for i in ids] == \
        [302, 302] + [200] * PER_TOKEN  # the oldest went


def test_a_settings_token_logs_in_and_a_changed_scope_ends_its_session(tmp_path):
    token = "static-reader"
    spec = {"name": "oncall", "sha256": hashlib.sha256(token.encode()).hexdigest(),
            "scopes": ["read", "audit"]}
    app = create_app(make_settings(tmp_path / "data", tokens=[spec]))
    session_id = session_cookie(log_in(app.test_client(), token))
    assert with_cookie(app, session_id).get("/ui/minions").status_code == 200
    # The service restarted with the token now limited to `read`: its session ended.
    narrower = create_app(make_settings(tmp_path / "data",
                                        tokens=[{**spec, "scopes": ["read"]}]))
    assert with_cookie(narrower, session_id).get("/ui/").status_code == 302


def test_sessions_over_pkisvc_serve_with_two_workers(tmp_path):
    data = tmp_path / "data"
    p, url = serve(data, workers=2)
    try:
        settings = make_settings(data)
        token = CertStore(load_backend(settings), settings).create_token(
            "oncall", ["read", "audit"], actor="test")
        browser = requests.Session()
        form = browser.get(f"{url}/ui/login", timeout=30)
        value = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
        r = browser.post(f"{url}/ui/login", data={"token": token, "csrf": value},
                         allow_redirects=False, timeout=30)
        assert r.status_code == 303
        session_id = browser.cookies.get(COOKIE, path="/ui/")
        assert session_id.startswith("pkui_")
        # Many requests over new connections: both workers answer some of them.
        for _ in range(20):
            r = requests.get(f"{url}/ui/minions", cookies={COOKIE: session_id},
                             allow_redirects=False, timeout=30)
            assert r.status_code == 200
        page = browser.get(f"{url}/ui/", timeout=30)
        value = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
        r = browser.post(f"{url}/ui/logout", data={"csrf": value}, allow_redirects=False,
                         timeout=30)
        assert r.status_code == 303
        for _ in range(20):
            r = requests.get(f"{url}/ui/", cookies={COOKIE: session_id},
                             allow_redirects=False, timeout=30)
            assert r.status_code == 302
        r = requests.get(f"{url}/v1/audit", headers=bearer(session_id), timeout=30)
        assert r.status_code == 401
    finally:
        stop(p)
