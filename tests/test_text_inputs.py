"""Text that enters the store, and text an older version stored (issue 19, items 3, 5, 7, 9).

Every string a request or the CLI hands in to be stored or echoed is printable Unicode within
its limit, or the answer is a 400 `{"error", "message"}` (CLI: one line, exit 1) and nothing
is written.  Records an older version stored with such text (written here straight into the
files backend) are shown escaped by the pages and the CLI tables, never a 500 or a traceback.
hypothesis sends the same inputs to the full app (WSGI fast path in front) and to the Flask
app alone: one verdict, never a 5xx.
"""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from werkzeug.test import Client

from pkisvc.app import create_app
from pkisvc.backends.files import FilesBackend
from pkisvc.model import REASON_MAX, SANS_MAX, AuditEvent
from tests.conftest import make_settings, run_cli

# What the review sent, and its relatives: a lone surrogate, C0 (LF, ESC, an OSC title), C1,
# DEL, a bidi override, a line separator, and a value far over every limit.
HOSTILE = ["\ud800", "\udfff", "line1\nFAKE-ROW 99 rotate-ca", "\x1b]0;pwned\x07", "a\rb",
           "\x00", "\x85", "\x7f", "safe\u202etxt.exe", "x\u2028y", "x" * 10_000]
DEEP = "[" * 10_000 + "]" * 10_000


def raw_json(doc: Any) -> str:
    """JSON text as a client sends it; a lone surrogate travels as `\\ud800`."""
    return json.dumps(doc)


class Service:
    """A files-backend app with one admin token that also holds secrets."""

    def __init__(self, data: Path) -> None:
        self.settings = make_settings(data, **{"server.sans": ["k8s-master-1"]})
        self.app = create_app(self.settings)
        self.store = self.app.extensions["pkisvc"]
        self.token = self.store.create_token("ops", ["admin", "secrets", "audit"], actor="test")
        self.reader = self.store.create_token("reader", ["read"], actor="test")
        self.headers = {"Authorization": f"Bearer {self.token}"}
        self.full = self.app.test_client()
        self.flask_alone = Client(self.app.wsgi_app.app)  # type: ignore[attr-defined]

    def state(self) -> tuple[Any, ...]:
        """The latest version and the audit trail as a fresh reader sees them."""
        fresh = FilesBackend(self.settings.data_dir)
        return fresh.latest(), [e.to_dict() for e in fresh.audit(limit=100_000)]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Service:
    return Service(tmp_path_factory.mktemp("text") / "data")


def refused(r: Any) -> None:
    assert r.status_code == 400, r.get_data(as_text=True)
    body = r.get_json()
    assert set(body) == {"error", "message"} and body["error"] == "invalid_request"
    assert body["message"].isprintable()


def posts(value: str) -> list[tuple[str, str]]:
    """Every change request that takes text, with value in each field."""
    return [
        ("/v1/ca/rotate", raw_json({"reason": value})),
        ("/v1/ca/rotate", raw_json({"reason": "ok", "key_type": value})),
        ("/v1/ca/rotate", raw_json({"reason": "ok", "mode": value})),
        ("/v1/ca/rotate/continue", raw_json({"reason": value})),
        ("/v1/ca/rotate/abort", raw_json({"reason": value})),
        ("/v1/certs/server/rotate", raw_json({"reason": value})),
        ("/v1/certs/server/rotate", raw_json({"sans": [value]})),
        ("/v1/certs/server/rotate", raw_json({"sans": ["ok.example", value]})),
        ("/v1/certs/kubecfg/rotate", raw_json({"reason": value})),
        ("/v1/rollback", raw_json({"version": 1, "reason": value})),
        ("/v1/init", raw_json({"reason": value})),
        ("/v1/ca/rotate", raw_json({value: "x"})),
    ]


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v[:24]))
def test_hostile_text_in_a_change_is_a_400_and_writes_nothing(service, value):
    before = service.state()
    for path, body in posts(value):
        for client in (service.full, service.flask_alone):
            refused(client.post(path, data=body, headers={**service.headers,
                                                          "Content-Type": "application/json"}))
    assert service.state() == before


@pytest.mark.parametrize("body", [
    DEEP, "{" + '"a":{' * 10_000 + "}" * 10_001, raw_json({"reason": "x"})[:-1] + ', "sans": '
    + DEEP + "}", '{"sans": ' + DEEP + "}"], ids=["list", "object", "after-reason", "sans"])
@pytest.mark.parametrize("path", ["/v1/ca/rotate", "/v1/certs/server/rotate", "/v1/renew",
                                  "/v1/rollback"])
def test_json_nested_ten_thousand_deep_is_a_400(service, path, body):
    before = service.state()
    for client in (service.full, service.flask_alone):
        refused(client.post(path, data=body, headers=service.headers))
    assert service.state() == before


def test_sans_are_limited_in_number(service):
    before = service.state()
    for count in (SANS_MAX + 1, 7_000):  # 7,000 made a 129 KB certificate before
        body = raw_json({"sans": [f"s{i}" for i in range(count)]})
        assert len(body) < 64 * 1024  # under the body limit: refused for the count alone
        r = service.full.post("/v1/certs/server/rotate", data=body, headers=service.headers)
        refused(r)
        assert str(SANS_MAX) in r.get_json()["message"]
    assert service.state() == before
    r = service.full.post("/v1/certs/server/rotate", json={
        "sans": [f"n{i}.example" for i in range(SANS_MAX)], "reason": "ü 🧑‍💻 at the limit"},
        headers=service.headers)
    assert r.status_code == 201, r.get_json()
    r = service.full.post("/v1/certs/kubecfg/rotate", json={"reason": "y" * REASON_MAX},
                          headers=service.headers)
    assert r.status_code == 201, r.get_json()


def test_too_many_sans_in_the_settings_fail_in_one_line(tmp_path):
    from pkisvc.errors import ConfigError
    with pytest.raises(ConfigError, match=f"at most {SANS_MAX}"):
        make_settings(tmp_path, **{"server.sans": [f"n{i}.example" for i in range(SANS_MAX + 1)]})


@pytest.mark.parametrize("value", HOSTILE, ids=lambda v: repr(v[:24]))
def test_hostile_minion_ids_and_roles_are_400s_on_both_paths(service, value):
    before = service.state()
    minion = quote(value.encode("utf-8", "surrogatepass"), safe="")
    for client in (service.full, service.flask_alone):
        refused(client.get(f"/v1/pillar/{minion}?role=master", headers=service.headers))
        r = client.get(f"/v1/pillar/k8s-node-1?role={minion}", headers=service.headers)
        if "\ud800" <= value[0] <= "\udfff":  # not UTF-8: Werkzeug reads U+FFFD, no role
            assert r.status_code == 404 and set(r.get_json()) == {"error", "message"}
        else:
            refused(r)
    assert service.state() == before


# --- the CLI ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cfg(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    f = tmp / "pkisvc.yaml"
    f.write_text(f"data_dir: {tmp / 'data'}\nkey_type: ecdsa-p256\n")
    assert run_cli("--config", str(f), "init").returncode == 0
    return f


@pytest.mark.parametrize("args", [
    ["rotate", "ca", "--reason", "line1\nFAKE-ROW 99 rotate-ca\x1b]0;pwned\x07"],
    ["rotate", "kubecfg", "--reason", "x" * 10_000],
    ["rotate", "kubecfg", "--reason", "\u202eoops"],
    ["rotate", "server", "--san", "a\x1bb.example"],
    ["rotate", "server", *[f"--san=n{i}.example" for i in range(SANS_MAX + 1)]],
    ["rollback", "1", "--reason", "\x85"],
    ["init", "--reason", "\x01"],
], ids=["osc", "long", "bidi", "san", "sans", "c1", "soh"])
def test_hostile_text_on_the_command_line_is_one_line_and_exit_1(cfg, args):
    data = FilesBackend(Path(cfg.read_text().split()[1]))
    before = data.latest(), data.audit(limit=1000)
    r = run_cli("--config", str(cfg), *args)
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
    assert r.stderr.isascii() and "\x1b" not in r.stderr and "Traceback" not in r.stderr
    assert (data.latest(), data.audit(limit=1000)) == before


def test_a_lone_surrogate_on_the_command_line_is_refused(cfg):
    # What a Linux shell hands in for bytes that are not UTF-8 (Python's surrogateescape).
    r = run_cli("--config", str(cfg), "rotate", "kubecfg", "--reason", "caf\udce9")
    assert r.returncode == 1 and "U+DCE9" in r.stderr and "Traceback" not in r.stderr


# --- records an older version stored --------------------------------------------------------

POISON = "\ud800 line1\nFAKE-ROW 99 rotate-ca\x1b]0;pwned\x07 \u202eevil"


def poison(data_dir: Path) -> None:
    """Write a generation and audit events holding POISON as a version before the chain did
    (pkisvc now refuses to link text it could not store as sent): by hand, in its layout (a
    directory of files and record.json, no chain link, no event)."""
    backend = FilesBackend(data_dir)
    latest = backend.latest()
    gen = backend.read(latest)
    record = dataclasses.replace(gen.record, version=latest + 1, parent=latest,
                                 reason=POISON, actor=POISON)
    new = data_dir / "generations" / f"{latest + 1:06d}"
    new.mkdir()
    for name, data in gen.files.items():
        (new / name).write_bytes(data)
    (new / "record.json").write_text(json.dumps(record.to_dict()))
    (data_dir / "current").write_text(f"{latest + 1}\n")
    events = [AuditEvent(time=record.created_at, actor=POISON, action="rollback",
                         version=latest + 1, reason=POISON),
              AuditEvent(time=record.created_at, actor="salt", action="pillar",
                         version=latest + 1, minion=POISON, role="master")]
    with open(data_dir / "audit.jsonl", "a") as f:
        f.writelines(json.dumps(e.to_dict()) + "\n" for e in events)


def escaped_in(text: str) -> None:
    assert "\\ud800" in text and "\\n" in text and "\\x1b" in text and "\\u202e" in text
    assert not any(c in text for c in "\x1b\x07\u202e")


def test_pages_show_a_poisoned_record_escaped(tmp_path):
    service = Service(tmp_path / "data")
    poison(service.settings.data_dir)
    for page in ("/ui/history", "/ui/audit", "/ui/minions", "/ui/",
                 "/ui/audit?minion=line1", "/ui/audit?kind=rollback"):
        r = service.full.get(page, headers=service.headers)
        assert r.status_code == 200, (page, r.status_code)
        text = r.get_data().decode("utf-8")  # whole UTF-8: a lone surrogate has none
        assert "</html>" in text
        if page.startswith(("/ui/history", "/ui/audit")):
            escaped_in(text)
    # The API's JSON escapes them as JSON does: the record comes back as it was stored.
    r = service.full.get("/v1/versions", headers=service.headers)
    assert r.get_json()["versions"][0]["reason"] == POISON


@pytest.mark.parametrize("command", ["versions", "audit"])
def test_cli_tables_show_a_poisoned_record_escaped_and_json_keeps_it(tmp_path, command):
    f = tmp_path / "pkisvc.yaml"
    f.write_text(f"data_dir: {tmp_path / 'data'}\nkey_type: ecdsa-p256\n")
    assert run_cli("--config", str(f), "init").returncode == 0
    poison(tmp_path / "data")
    r = run_cli("--config", str(f), command)
    assert r.returncode == 0, r.stderr
    escaped_in(r.stdout)
    lines = r.stdout.splitlines()
    rows = {"versions": 3, "audit": 4}[command]  # the header, init (+ its event), the poison
    assert len(lines) == rows, r.stdout
    assert not any(line.startswith("FAKE-ROW") for line in lines)
    r = run_cli("--config", str(f), command, "-o", "json")
    assert r.returncode == 0, r.stderr
    assert POISON in [row.get("reason") for row in json.loads(r.stdout)]
    r = run_cli("--config", str(f), command, "-o", "yaml")
    assert r.returncode == 0 and "Traceback" not in r.stderr


# --- crafted query arguments and redirects on the pages ------------------------------------

@pytest.fixture(scope="module")
def paged(tmp_path_factory: pytest.TempPathFactory) -> Service:
    """A service with more than a page of history, audit events and minions."""
    service = Service(tmp_path_factory.mktemp("paged") / "data")
    for i in range(30):
        service.store.rotate_leaf("kubecfg", actor="test", reason=f"r{i}")
    for i in range(210):  # the minions page reads each minion's delivery state
        service.store.record_pillar(actor="salt", version=1, items=("ca.crt",),
                                    minion=f"m{i}", role="node")
    return service


@pytest.mark.parametrize("query", ["endpoint=x", "_method=POST", "_external=1",
                                   "_anchor=x", "_scheme=javascript", "page=2&endpoint=ui.audit",
                                   "minion=m&_method=GET", "behind=1&endpoint=ui.history"])
@pytest.mark.parametrize("page", ["/ui/history", "/ui/audit", "/ui/minions"])
def test_query_arguments_do_not_reach_url_for(paged, page, query):
    r = paged.full.get(f"{page}?{query}", headers=paged.headers)
    assert r.status_code == 200, r.get_data(as_text=True)[:300]
    links = re.findall(r'href="([^"]*page=[^"]*)"', r.get_data(as_text=True))
    if "behind" not in query:  # every minion is behind: the filter keeps them all
        assert links, "a pager"
    for link in links:
        assert link.startswith(page + "?") and "endpoint" not in link and "_" not in link, link


def test_control_characters_in_a_filter_are_shown_escaped(paged):
    r = paged.full.get("/ui/audit?kind=%0d%0a&minion=%1b", headers=paged.headers)
    assert r.status_code == 200
    assert 'value="\\x1b"' in r.get_data(as_text=True)


NEXTS = ["/ui/\r\nSet-Cookie: pkisvc_ui=x", "/ui/history\r\n\r\n<script>", "/ui/\n",
         "/ui/%0d%0aX: y", "/ui/\x00", "/ui/\x85", "/ui/\u2028"]


@pytest.mark.parametrize("target", NEXTS, ids=lambda v: repr(v[:24]))
def test_crlf_in_next_is_a_safe_redirect(service, target):
    client = service.app.test_client()
    page = client.get("/ui/login", query_string={"next": target})
    assert page.status_code == 200
    csrf = re.search(r'name="csrf" value="([^"]+)"', page.text).group(1)
    r = client.post("/ui/login", data={"token": service.reader, "csrf": csrf, "next": target})
    assert r.status_code in (303, 400), r.status_code
    if r.status_code == 303:
        location = r.headers["Location"]
        assert location.isprintable() and location.startswith("/ui/")
        assert "Set-Cookie" not in location or "%" in location
        assert not any(h.lower() == "x" for h, _ in r.headers)


def test_control_characters_in_a_page_path_go_to_login_safely(service):
    r = service.app.test_client().get("/ui/%0d%0aSet-Cookie:%20x=y")
    assert r.status_code in (302, 404)
    assert "\r" not in r.headers.get("Location", "") and "\n" not in r.headers.get("Location",
                                                                                   "")


# --- acceptance 6: one verdict on both paths --------------------------------------------------

FUZZ = settings(max_examples=120, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])
pieces = st.sampled_from(["\ud800", "\udc80", "\n", "\r\n", "\x1b", "\x00", "\x07", "\x7f",
                          "\x85", "\u202e", "\u2066", "\u2028", "ü", "🧑‍💻", " ", "a", "-", ".",
                          "%", "/", "?", "&", "="])
text = (st.lists(st.text(max_size=4) | pieces, max_size=6).map("".join)
        | st.sampled_from(["x" * 10_000, "k8s-node-1", "master", "node", "server", "ca"]))


def is_bad(value: str, limit: int) -> bool:
    return len(value) > limit or any(c in value for c in (
        "\ud800", "\udc80", "\n", "\r", "\x1b", "\x00", "\x07", "\x7f", "\x85", "\u202e",
        "\u2066", "\u2028"))


def moved(segment: str) -> bool:
    """Tell whether a path segment may be answered by Werkzeug's 308 (`/v1/certs/` and `//`)."""
    return not segment or "/" in segment


def both(service: Service, method: str, path: str, **kwargs: Any) -> int:
    """Send one request to the full app and to Flask alone; return the one status."""
    answers = []
    for client in (service.full, service.flask_alone):
        r = client.open(path, method=method, headers=service.headers, **kwargs)
        assert r.status_code < 500, r.get_data(as_text=True)[:300]
        body = r.get_json(silent=True)
        if r.status_code >= 400:
            assert set(body) == {"error", "message"}, body
        answers.append((r.status_code, body if method == "GET" else body and body.get("error")))
    assert answers[0] == answers[1], answers
    return answers[0][0]


@FUZZ
@given(minion=text, role=text, item=text, version=text)
def test_hot_reads_give_one_verdict_on_both_paths(service, minion, role, item, version):
    before = service.state()[0]

    def url(v: str) -> str:
        return quote(v.encode("utf-8", "surrogatepass"), safe="")
    status = both(service, "GET", f"/v1/pillar/{url(minion)}?role={url(role)}")
    if is_bad(minion, 253) or is_bad(role, 64):
        assert status in (400, 404) or (moved(minion) and status == 308)
    status = both(service, "GET", f"/v1/certs/{url(item)}?version={url(version)}")
    assert status in (200, 400, 404) or (moved(item) and status == 308)
    both(service, "GET", f"/v1/certs/{url(item)}")
    assert service.state()[0] == before


@FUZZ
@given(path=st.sampled_from(["/v1/ca/rotate/abort", "/v1/certs/server/rotate",
                             "/v1/certs/kubecfg/rotate", "/v1/rollback", "/v1/init"]),
       reason=text, sans=st.lists(text, max_size=3), deep=st.sampled_from([0, 0, 2_000, 10_000]),
       field=st.sampled_from(["reason", "sans", "none"]))
def test_changes_give_one_verdict_on_both_paths(service, path, reason, sans, deep, field):
    doc: dict[str, Any] = {"version": 1} if path == "/v1/rollback" else {}
    if field == "reason":
        doc["reason"] = reason
    elif field == "sans" and path == "/v1/certs/server/rotate":
        doc["sans"] = sans
    body = raw_json(doc)
    if deep > 1000:
        body = body[:-1] + (", " if doc else "") + '"reason": ' + "[" * deep + "]" * deep + "}"
    before = service.state()
    status = both(service, "POST", path, data=body, content_type="application/json")
    if deep > 1000 or (field == "reason" and is_bad(reason, REASON_MAX)) or (
            "sans" in doc and any(is_bad(s, 253) for s in sans)):
        assert status == 400
        assert service.state() == before
