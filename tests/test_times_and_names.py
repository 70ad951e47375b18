"""Times are datetimes inside pkisvc and RFC 3339 text only at its edges; names match whole.

`model.parse_time`/`model.format_time` are the one pair that reads and writes RFC 3339; the
records keep timezone-aware datetimes (UTC, to the second) and write the same `…Z` text as
before.  Every identifier pattern matches the whole string: a trailing newline, which `$`
lets through, is refused everywhere a name enters.
"""
from __future__ import annotations

import hashlib
import json
import re
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from werkzeug.test import Client

from pkisvc.app import create_app
from pkisvc.backends.files import FilesBackend
from pkisvc.errors import ConfigError, InvalidRequest
from pkisvc.model import (
    AuditEvent,
    GenerationRecord,
    ItemRecord,
    TokenRecord,
    format_time,
    parse_time,
    valid_file_name,
)
from pkisvc.settings import Settings, is_dns_name
from pkisvc.store import CertStore
from pkisvc.tokens import new_token
from tests.conftest import REPO, make_settings
from tests.stored import stored

RFC3339_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ")


# --- times ---------------------------------------------------------------------------------

def test_parse_and_format_are_inverse_at_the_edges():
    t = parse_time("2026-11-29T12:00:00Z")
    assert t == datetime(2026, 11, 29, 12, tzinfo=UTC) and t.utcoffset() == timedelta(0)
    assert format_time(t) == "2026-11-29T12:00:00Z"
    # An offset is read as the instant it names, and written back in UTC.
    assert format_time(parse_time("2026-11-29T14:00:00+02:00")) == "2026-11-29T12:00:00Z"
    # Written to the second, as the records and the API always were.
    assert format_time(datetime(2026, 11, 29, 12, 0, 0, 999_999, tzinfo=UTC)) == (
        "2026-11-29T12:00:00Z")


@pytest.mark.parametrize("text", ["2026-11-29T12:00:00", "2026-11-29", "yesterday", "",
                                  "2026-11-29T12:00:00Z\n"])
def test_parse_time_refuses_text_without_a_zone_or_not_a_time(text):
    with pytest.raises(ValueError):
        parse_time(text)


def test_records_keep_datetimes_and_write_the_same_text():
    item = {"fingerprint": "f" * 64, "serial": "1", "subject": "CN=x", "issuer": "CN=x",
            "sans": ["a.example"], "not_before": "2026-01-01T00:00:00Z",
            "not_after": "2027-01-01T00:00:00Z"}
    gen = {"version": 2, "parent": 1, "created_at": "2026-11-29T12:00:00Z", "actor": "a",
           "operation": "rotate-ca", "reason": "r", "key_type": "ecdsa-p256",
           "items": {"ca": item, "server": item, "kubecfg": item}, "trust": ["f" * 64],
           "source_version": None, "rotation": None}
    event = {"time": "2026-11-29T12:00:01Z", "actor": "salt", "action": "pillar",
             "version": 2, "items": ["ca.crt"], "reason": "", "remote_addr": "127.0.0.1",
             "minion": "k8s-node-1", "role": "node"}
    token = {"name": "ops", "sha256": "a" * 64, "scopes": ["read"],
             "created_at": "2026-11-29T12:00:02Z"}
    rec = GenerationRecord.from_dict(gen)
    assert rec.created_at == datetime(2026, 11, 29, 12, tzinfo=UTC)
    assert rec.items["ca"].not_after == datetime(2027, 1, 1, tzinfo=UTC)
    assert AuditEvent.from_dict(event).time == datetime(2026, 11, 29, 12, 0, 1, tzinfo=UTC)
    assert TokenRecord.from_dict(token).created_at == datetime(2026, 11, 29, 12, 0, 2,
                                                               tzinfo=UTC)
    for cls, d in ((GenerationRecord, gen), (ItemRecord, item), (AuditEvent, event),
                   (TokenRecord, token)):
        back = cls.from_dict(d).to_dict()  # type: ignore[attr-defined]
        assert json.dumps(back) == json.dumps(d)
    # A token record written without a time reads as None and writes "" as it always did.
    old = TokenRecord.from_dict({"name": "ops", "sha256": "a" * 64, "scopes": ["read"]})
    assert old.created_at is None and old.to_dict()["created_at"] == ""


def test_a_record_survives_its_text():
    # Any aware time goes in; the record keeps UTC to the second, so the text reads back equal
    # (the store's exactly-once audit compares an event with the one the backend returns).
    t = datetime(2026, 11, 29, 14, 0, 0, 123_456, tzinfo=timezone(timedelta(hours=2)))
    e = AuditEvent(time=t, actor="a", action="rotate-ca", version=1)
    assert e.time == datetime(2026, 11, 29, 12, tzinfo=UTC) and e.time.tzinfo == UTC
    assert AuditEvent.from_dict(e.to_dict()) == e
    with pytest.raises(ValueError):
        AuditEvent(time=datetime(2026, 11, 29, 12), actor="a", action="rotate-ca")


def test_a_changed_store_writes_z_times_to_disk_and_reads_them_back(tmp_path):
    settings = make_settings(tmp_path / "data")
    store = CertStore(FilesBackend(settings.data_dir), settings)
    rec = store.init(actor="t")
    assert rec.created_at.tzinfo == UTC
    on_disk = dict(stored(tmp_path / "data", 1).record)  # as written in the generation file
    assert on_disk["created_at"] == format_time(rec.created_at)
    assert RFC3339_Z.fullmatch(on_disk["created_at"])
    assert RFC3339_Z.fullmatch(on_disk["items"]["server"]["not_after"])
    event = dict(stored(tmp_path / "data", 1).event or {})
    assert RFC3339_Z.fullmatch(event["time"])  # the change's event, committed with it
    assert store.audit()[0].time == rec.created_at
    assert store.audit(since=rec.created_at)[0].version == 1
    assert store.audit(since=rec.created_at + timedelta(seconds=1)) == []


def test_rfc3339_is_parsed_and_written_in_one_module():
    sources = [*sorted((REPO / "pkisvc").rglob("*.py")), *sorted((REPO / "backends").glob("*.py"))]
    readers = {p.relative_to(REPO).as_posix() for p in sources
               if re.search(r"fromisoformat|strptime|%Y-%m-%dT", p.read_text())}
    assert readers == {"pkisvc/model.py"}


# --- names match whole -----------------------------------------------------------------------

def test_file_names_refuse_a_trailing_newline():
    assert valid_file_name("ca.crt")
    assert not valid_file_name("ca.crt\n")


def test_token_names_refuse_a_trailing_newline():
    now = datetime(2026, 11, 29, 12, tzinfo=UTC)
    assert new_token("ops", ["read"], configured=set(), now=now)[1].name == "ops"
    with pytest.raises(InvalidRequest):
        new_token("ops\n", ["read"], configured=set(), now=now)


@pytest.mark.parametrize("env", [
    {"PKISVC_CLUSTER": "staging\n"},
    {"PKISVC_RENEW_BEFORE": "30d\n"},
    {"PKISVC_CA_WARN_BEFORE": "90\n"},
])
def test_settings_refuse_a_trailing_newline(env):
    with pytest.raises(ConfigError) as e:
        Settings.load(env=env)
    assert "\n" not in e.value.message


@pytest.mark.parametrize("text", [
    'roles:\n  "master\\n": [ca.crt]\n',
    'tokens: [{name: "ops\\n", sha256: ' + "a" * 64 + ", scopes: [read]}]\n",
    'cluster_domain: "cluster.local\\n"\n',
])
def test_setting_names_refuse_a_trailing_newline(tmp_path, text):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError):
        Settings.load(cfg, env={})
    cfg.write_text(text.replace("\\n", ""))
    Settings.load(cfg, env={})  # the same without the newline is fine


def test_dns_names_refuse_a_trailing_newline():
    assert is_dns_name("k8s.example") and not is_dns_name("k8s.example\n")


@pytest.fixture
def service(tmp_path: Path):
    settings = make_settings(
        tmp_path / "data", roles={"master": ["ca.crt", "server.cert", "server.key"],
                                  "node": ["ca.crt"]},
        tokens=[{"name": "salt", "sha256": hashlib.sha256(b"salt-token").hexdigest(),
                 "scopes": ["read", "secrets"]}])
    return create_app(settings), settings  # initialises the store


@pytest.mark.parametrize("path", [
    "/v1/pillar/k8s-node-1%0A?role=master",
    "/v1/pillar/k8s-node-1?role=node%0A",
])
def test_minion_ids_and_roles_refuse_a_trailing_newline(service, path):
    app, settings = service
    h = {"Authorization": "Bearer salt-token"}
    before = len(FilesBackend(settings.data_dir).audit(limit=1000))
    for client in (app.test_client(), Client(app.wsgi_app.app)):  # fast path, Flask alone
        assert client.get(path.replace("%0A", ""), headers=h).status_code == 200
        r = client.get(path, headers=h)
        assert r.status_code in (400, 404), path
        assert set(r.get_json()) >= {"error", "message"}
    backend = FilesBackend(settings.data_dir)
    events = backend.audit(limit=1000)
    # The two reads without the newline: one delivery state, one event (the second read
    # changed nothing), and nothing for the refused ones.
    assert len(events) == before + 1
    assert all("\n" not in (e.minion or "") + (e.role or "") for e in events)
    assert [(s.minion, s.role) for s in backend.minions()] == [
        ("k8s-node-1", path.split("role=")[1].replace("%0A", ""))]
