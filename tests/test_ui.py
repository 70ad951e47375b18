"""The operator pages' rules through Flask's test client: access, cookies, CSP, no secrets."""
import base64
import hashlib
import re
from datetime import timedelta

import pytest

from pkisvc.app import create_app
from pkisvc.model import MinionState, parse_time
from pkisvc.ui import lifetimes, minion_table
from tests.conftest import chain_checked, make_settings

PAGES = ["/ui/", "/ui/history", "/ui/minions", "/ui/audit", "/ui/audit?kind=pillar&minion=m"]


@pytest.fixture
def app(tmp_path):
    return create_app(make_settings(tmp_path / "data"))


@pytest.fixture
def store(app):
    return app.extensions["pkisvc"]


@pytest.fixture
def tokens(store):
    made = {s: store.create_token(f"t-{s}", [s], actor="test")
            for s in ("read", "secrets", "audit", "admin")}
    made["ops"] = store.create_token("t-ops", ["admin", "secrets"], actor="test")
    return made


def bearer(token):
    return {"Authorization": f"Bearer {token}"}


def csrf(client):
    """Open the login form as a browser would; return the form's CSRF value."""
    page = client.get("/ui/login")
    return re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)


def log_in(client, token, next_page="/ui/"):
    return client.post("/ui/login", data={"token": token, "csrf": csrf(client),
                                          "next": next_page})


def set_cookies(response):
    return response.headers.getlist("Set-Cookie")


@pytest.mark.parametrize("path", PAGES)
def test_without_a_token_every_page_redirects_to_the_login_form(app, path):
    r = app.test_client().get(path)
    assert r.status_code == 302
    assert r.headers["Location"].startswith("/ui/login?next=")
    assert "PRIVATE KEY" not in r.text


def test_a_wrong_bearer_token_is_a_401_page_not_a_traceback(app, tokens):
    r = app.test_client().get("/ui/", headers=bearer("pks_nonsense"))
    assert r.status_code == 401
    assert r.mimetype == "text/html"
    assert "unknown token" in r.text and "Traceback" not in r.text


def test_a_wrong_token_in_the_form_shows_an_error(app, tokens):
    client = app.test_client()
    r = log_in(client, "pks_wrong")
    assert r.status_code == 401
    assert re.search(r'id="error">\s*unknown token', r.text)
    assert "Traceback" not in r.text and "pks_wrong" not in r.text
    assert not any(c.startswith("pkisvc_ui=") for c in set_cookies(r))


def test_scopes(app, tokens):
    client = app.test_client()
    for path in ("/ui/", "/ui/history"):
        assert client.get(path, headers=bearer(tokens["read"])).status_code == 200
        assert client.get(path, headers=bearer(tokens["audit"])).status_code == 403
        assert client.get(path, headers=bearer(tokens["secrets"])).status_code == 403
    for path in ("/ui/minions", "/ui/audit"):
        r = client.get(path, headers=bearer(tokens["read"]))
        assert r.status_code == 403 and "lacks the &#39;audit&#39; scope" in r.text
        assert client.get(path, headers=bearer(tokens["admin"])).status_code == 200
    r = log_in(client, tokens["secrets"])
    assert r.status_code == 403 and "lacks the &#39;read&#39; scope" in r.text


def test_login_sets_a_strict_httponly_cookie_and_goes_on(app, tokens):
    client = app.test_client()
    r = log_in(client, tokens["admin"], "/ui/history?page=1")
    assert r.status_code == 303 and r.headers["Location"] == "/ui/history?page=1"
    cookie = next(c for c in set_cookies(r) if c.startswith("pkisvc_ui="))
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/ui" in cookie
    assert "Secure" not in cookie  # plain http: a Secure cookie would never come back
    assert client.get("/ui/minions").status_code == 200  # the cookie alone lets us in


def test_the_cookie_is_secure_over_tls(app, tokens):
    client = app.test_client()
    client.get("/ui/login", base_url="https://localhost")
    value = client.get_cookie("pkisvc_ui_csrf", domain="localhost", path="/ui/").value
    r = client.post("/ui/login", base_url="https://localhost",
                    data={"token": tokens["read"], "csrf": value})
    assert r.status_code == 303
    cookie = next(c for c in set_cookies(r) if c.startswith("pkisvc_ui="))
    assert "Secure" in cookie and "HttpOnly" in cookie and "SameSite=Strict" in cookie


def test_login_needs_the_forms_own_csrf_value(app, tokens):
    client = app.test_client()
    csrf(client)
    r = client.post("/ui/login", data={"token": tokens["read"], "csrf": "forged"})
    assert r.status_code == 403
    fresh = app.test_client()  # a cross-site form: no CSRF cookie (SameSite=Strict)
    r = fresh.post("/ui/login", data={"token": tokens["read"], "csrf": "x"})
    assert r.status_code == 403
    r = client.post("/ui/login", data={"token": tokens["read"], "csrf": csrf(client)},
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 403


def test_login_never_redirects_off_site(app, tokens):
    for target in ("//evil.example/", "https://evil.example/ui/", "/ui/\\evil", "/v1/audit"):
        r = log_in(app.test_client(), tokens["read"], target)
        assert r.status_code == 303 and r.headers["Location"] == "/ui/", target


def test_a_revoked_token_sends_the_browser_back_to_log_in(app, store, tokens):
    client = app.test_client()
    log_in(client, tokens["read"])
    assert client.get("/ui/").status_code == 200
    store.revoke_token("t-read", actor="test")
    r = client.get("/ui/history")
    assert r.status_code == 302 and "expired=1" in r.headers["Location"]
    assert any(c.startswith("pkisvc_ui=;") for c in set_cookies(r))
    assert "no longer valid" in client.get(r.headers["Location"]).text


def test_logout_forgets_the_token(app, tokens):
    client = app.test_client()
    log_in(client, tokens["read"])
    r = client.post("/ui/logout", data={"csrf": csrf(client)})
    assert r.status_code == 303
    assert client.get("/ui/").status_code == 302


def _style_hash(html):
    css = re.search(r"<style>(.*?)</style>", html, re.S).group(1)
    return base64.b64encode(hashlib.sha256(css.encode()).digest()).decode()


def test_every_page_sets_a_strict_csp_and_holds_no_script_or_secret(app, store, tokens):
    client = app.test_client()
    h = bearer(tokens["ops"])
    client.get("/v1/pillar/k8s-master-1?role=master", headers=h)
    client.get("/v1/certs/server/key", headers=h)
    client.post("/v1/ca/rotate", json={"mode": "staged"}, headers=h)
    pages = [client.get(p, headers=h) for p in PAGES]
    pages.append(client.get("/ui/login"))
    pages.append(client.get("/ui/minions", headers=bearer(tokens["read"])))  # a 403 page
    for r in pages:
        csp = r.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "unsafe" not in csp
        assert "frame-ancestors 'none'" in csp and "form-action 'self'" in csp
        assert f"style-src 'sha256-{_style_hash(r.text)}'" in csp
        assert r.headers["X-Content-Type-Options"] == "nosniff"
        assert r.headers["Cache-Control"] == "no-store"
        assert "<script" not in r.text and " style=" not in r.text
        assert re.search(r"\son[a-z]+=", r.text) is None  # no inline event handlers
        assert "PRIVATE KEY" not in r.text
        assert not any(t in r.text for t in tokens.values())


def test_overview_shows_version_bars_trust_and_rotation(app, store, tokens):
    client = app.test_client()
    h = bearer(tokens["admin"])
    r = client.get("/ui/", headers=h)
    assert 'id="version">version 1<' in r.text
    assert len(re.findall(r'<svg class="bar" data-item="(ca|server|kubecfg)" '
                          r'data-state="ok"', r.text)) == 3
    assert "none open" in r.text
    client.post("/v1/ca/rotate", json={"mode": "staged"}, headers=h)
    r = client.get("/ui/", headers=h)
    assert 'id="version">version 2<' in r.text
    assert "phase 1 of 3" in r.text and "<code>continue</code>" in r.text
    rec = store.read().record
    for fp in rec.trust:
        assert fp in r.text
    assert "new CA" in r.text and "old CA (signing)" in r.text


def test_overview_and_history_show_the_service_account_key_by_fingerprint_only(
        app, store, tokens):
    client = app.test_client()
    h = bearer(tokens["admin"])
    store.sa_step("start", actor="test")  # phase 1: the next key published beside the current
    state = store.sa_rotation()
    page = client.get("/ui/", headers=h).text
    table = re.search(r'<table id="sa">(.*?)</table>', page, re.S).group(1)
    assert state["fingerprint"] in table and state["key_type"] in table
    assert state["new"] in table and state["old"] == state["fingerprint"]
    assert "accepted (<code>sa.pub</code>) · new" in table
    assert "phase 1 of 3" in re.search(r'id="sa-rotation">(.*?)</p>', page, re.S).group(1)
    history = client.get("/ui/history", headers=h).text
    shown = dict(re.findall(r'data-sa="(\d+)">([0-9a-f]{64})<', history))
    assert shown == {str(r.version): state["fingerprint"] for r in store.versions()}
    gen = store.read()
    for name in ("sa.key", "sa.pub"):  # neither key's material, in any encoding
        body = b"".join(gen.files[name].splitlines()[1:-1]).decode()
        assert body[:40] not in page and body[:40] not in history
    assert "PRIVATE KEY" not in page + history and "PUBLIC KEY" not in page + history


def test_expiry_bar_colours():
    from pkisvc.model import GenerationRecord, ItemRecord
    item = ItemRecord("f" * 64, "01", "CN=x", "CN=x", (), parse_time("2026-01-01T00:00:00Z"),
                      parse_time("2027-01-01T00:00:00Z"))
    rec = GenerationRecord(1, None, parse_time("2026-01-01T00:00:00Z"), "a", "init", "",
                           "ecdsa-p256",
                           {"ca": item, "server": item, "kubecfg": item}, ("f" * 64,))
    from datetime import datetime
    end = datetime.fromisoformat("2027-01-01T00:00:00+00:00")
    states = {days: lifetimes(rec, end - timedelta(days=days))[1].state
              for days in (200, 29, 6, -1)}
    assert states == {200: "ok", 29: "warn", 6: "critical", -1: "critical"}
    assert lifetimes(rec, end + timedelta(days=3))[0].fraction == 0.0
    assert lifetimes(rec, end - timedelta(days=400))[0].fraction == 1.0


def _record(version, ca="c", server="s", kubecfg="k", trust=("c",)):
    from pkisvc.model import GenerationRecord, ItemRecord

    def item(fp):
        return ItemRecord(fp, "01", "CN=x", "CN=x", (), parse_time("2026-01-01T00:00:00Z"),
                          parse_time("2027-01-01T00:00:00Z"))
    return GenerationRecord(version, version - 1 or None, parse_time("2026-01-01T00:00:00Z"),
                            "a", "init",
                            "", "ecdsa-p256", {"ca": item(ca), "server": item(server),
                                               "kubecfg": item(kubecfg)}, trust)


T0 = parse_time("2026-11-29T12:00:00Z")


def test_minion_table_flags_minions_behind_the_current_version():
    roles = {"node": ("ca.crt",), "master": ("ca.crt", "server.cert", "server.key")}

    def st(minion, version, t, role="node"):
        t = T0 + timedelta(minutes=int(t[1:] or 0))
        return MinionState(minion, role, version, received=t, asked=t)
    # v2 re-issued the server pair only; v3 rotated the CA.
    records = {1: _record(1), 2: _record(2, server="s2"),
               3: _record(3, ca="c3", server="s3", kubecfg="k3", trust=("c3",))}
    table = minion_table([st("a", 3, "t4"), st("b", 2, "t2"), st("c", 1, "t0")], records[3],
                         records, roles)
    assert [(m.minion, m.version, m.behind, m.changed) for m in table] == [
        ("b", 2, 1, True), ("c", 1, 2, True), ("a", 3, 0, False)]
    assert table[2].time == T0 + timedelta(minutes=4)
    # Against version 2, a node that fetched version 1 holds the same ca.crt; a master not.
    table = minion_table([st("n", 1, "t1"), st("m", 1, "t0", role="master")],
                         records[2], records, roles)
    assert [(m.minion, m.behind, m.changed) for m in table] == [("m", 1, True),
                                                                ("n", 1, False)]
    # A version the table has no record of counts as changed, and so does a role now unknown.
    assert minion_table([st("x", 7, "t")], _record(9), records, roles)[0].changed
    assert minion_table([st("y", 1, "t", role="gone")], records[2], records, roles)[0].changed


def test_minions_page_after_a_rotation(app, store, tokens):
    client = app.test_client()
    h = bearer(tokens["ops"])
    for m in ("k8s-master-1", "k8s-node-1"):
        client.get(f"/v1/pillar/{m}?role={'master' if 'master' in m else 'node'}", headers=h)
    client.post("/v1/ca/rotate", headers=h)
    client.get("/v1/pillar/k8s-node-1?role=node", headers=h)
    page = client.get("/ui/minions", headers=h).text
    assert re.search(r'data-minion="k8s-master-1" class="behind changed"', page)
    assert re.search(r'data-minion="k8s-node-1" >', page)
    only = client.get("/ui/minions?behind=1", headers=h).text
    assert "k8s-master-1" in only and "k8s-node-1" not in only


def test_history_is_paged_newest_first(app, store, tokens):
    for i in range(29):
        store.rotate_leaf("kubecfg", actor="test", reason=f"r{i}")
    client = app.test_client()
    h = bearer(tokens["read"])
    first = client.get("/ui/history", headers=h).text
    versions = [int(v) for v in re.findall(r'<tr data-version="(\d+)"', first)]
    assert versions == list(range(30, 5, -1))
    assert "page 1 of 2" in first and 'rel="next"' in first
    second = client.get("/ui/history?page=2", headers=h).text
    assert [int(v) for v in re.findall(r'<tr data-version="(\d+)"', second)] == [5, 4, 3, 2, 1]
    assert client.get("/ui/history?page=x", headers=h).status_code == 200


def test_audit_page_filters_by_kind_and_minion(app, tokens):
    client = app.test_client()
    h = bearer(tokens["ops"])
    client.get("/v1/pillar/k8s-node-1?role=node", headers=h)
    client.get("/v1/pillar/k8s-node-2?role=node", headers=h)
    client.post("/v1/certs/server/rotate", headers=h)
    page = client.get("/ui/audit?kind=pillar&minion=node-2", headers=h).text
    assert re.findall(r'data-action="([^"]+)"', page) == ["pillar"]
    assert "k8s-node-2" in page and "<td>k8s-node-1</td>" not in page
    page = client.get("/ui/audit?kind=rotate-server", headers=h).text
    assert re.findall(r'data-action="([^"]+)"', page) == ["rotate-server"]


def test_the_wheel_ships_every_template():
    import ast
    import fnmatch
    from pathlib import Path

    from tests.conftest import REPO
    call = next(n for n in ast.walk(ast.parse((REPO / "setup.py").read_text()))
                if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    package_data = ast.literal_eval(next(k.value for k in call.keywords
                                         if k.arg == "package_data"))
    templates = Path(REPO / "pkisvc" / "templates")
    for f in templates.iterdir():
        name = f"templates/{f.name}"
        assert any(fnmatch.fnmatch(name, p) for p in package_data["pkisvc"]), name


def test_backend_down_is_a_503_page_and_keeps_the_login(tmp_path):
    import hashlib
    import shutil
    token = "static-reader"
    settings = make_settings(tmp_path / "data", tokens=[
        {"name": "oncall", "sha256": hashlib.sha256(token.encode()).hexdigest(),
         "scopes": ["read", "audit"]}])
    client = create_app(settings).test_client()
    log_in(client, token)
    chain_checked(client)
    moved = tmp_path / "moved"
    shutil.move(settings.data_dir, moved)
    settings.data_dir.write_text("the disk went away")
    for path in ("/ui/", "/ui/minions"):
        r = client.get(path)
        assert r.status_code == 503 and r.mimetype == "text/html"
        assert "Backend unavailable" in r.text and "Traceback" not in r.text
        assert "Content-Security-Policy" in r.headers
        assert not any(c.startswith("pkisvc_ui=") for c in set_cookies(r))
    settings.data_dir.unlink()
    shutil.move(moved, settings.data_dir)
    assert client.get("/ui/").status_code == 200  # the same login, once it is back


def test_minions_over_each_backend(backend, settings, tmp_path):
    """The table comes from the store's audit trail, whichever backend keeps it."""
    app = create_app(settings, backend=backend)
    store = app.extensions["pkisvc"]
    token = store.create_token("t-ops", ["admin", "secrets"], actor="test")
    client = app.test_client()
    h = bearer(token)
    client.get("/v1/pillar/k8s-node-1?role=node", headers=h)
    client.get("/v1/pillar/k8s-node-2?role=node", headers=h)
    client.post("/v1/certs/server/rotate", headers=h)
    client.get("/v1/pillar/k8s-node-2?role=node", headers=h)
    page = client.get("/ui/minions", headers=h).text
    # A node holds only ca.crt, which a server rotation leaves alone: behind, same files.
    assert re.search(r'data-minion="k8s-node-1" class="behind">.*?same files', page, re.S)
    assert re.search(r'data-minion="k8s-node-2" >', page)
    assert "<strong>1</strong> behind" in page and "<strong>0</strong> of them" in page
