"""The audit chain (issue 17, acceptance 2): tampering done with the backend's own tools and the
service's storage token is named by `pkisvc verify`, shows in `/v1/health` and in the metric.

Files: a text editor's work (an edited member of a generation file, a copied generation, a
removed file; the same in the directories older stores hold) in data_dir.  Vault:
`bao kv put`, `bao kv metadata put`, `bao kv metadata delete` with the token the service uses.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pkisvc.app import create_app
from pkisvc.backends.files import FilesBackend
from pkisvc.errors import BackendUnavailable
from pkisvc.settings import Settings
from pkisvc.store import CertStore
from pkisvc.witness import Head, Witness
from tests import stored
from tests.conftest import make_settings, run_cli, wait_for

DAY = timedelta(days=1)


class Clock:
    def __init__(self, start: datetime) -> None:
        self.now = start

    def __call__(self) -> datetime:
        return self.now


def events_over_days(store: CertStore, clock: Clock, days: int) -> None:
    """One rotation and two appended events on each of `days` days, ending today."""
    for _ in range(days):
        store.rotate_leaf("server", actor="ops", reason="daily")
        store.create_token(f"t{clock.now:%Y%m%d}", ["read"], actor="ops")
        store.record_delivery(actor="ops", action="key-read", version=store.latest(),
                              items=("server",))
        clock.now += DAY


def health_and_metric(settings: Settings) -> tuple[dict[str, Any], str]:
    """A new service on the store (its check at start), once that check is done."""
    client = create_app(settings).test_client()

    def checked() -> dict[str, Any] | None:
        r = client.get("/v1/health")
        assert r.status_code == 200  # a break never takes the replica out of service
        body: dict[str, Any] = r.json
        return body if body["audit_chain"]["ok"] is not None else None
    health = wait_for(checked, timeout=60, what="the chain check at start")
    return health, client.get("/metrics").get_data(as_text=True)


def assert_named(settings: Settings, env: dict[str, str], *words: str) -> None:
    """`pkisvc verify` exits 1 naming the break (all words), as do health and the metric."""
    r = run_cli("verify", "-o", "json", env=env)
    assert r.returncode == 1, r.stdout + r.stderr
    first = json.loads(r.stdout)["first_break"]
    assert all(w in first for w in words), first
    health, metrics = health_and_metric(settings)
    assert health["status"] == "ok" and health["audit_chain"]["ok"] is False
    assert health["audit_chain"]["first_break"] == first
    assert f'pkisvc_audit_chain_ok{{cluster="{settings.cluster}"}} 0.0' in metrics


def assert_holds(settings: Settings, env: dict[str, str]) -> dict[str, Any]:
    r = run_cli("verify", "-o", "json", env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    health, metrics = health_and_metric(settings)
    assert health["audit_chain"] == {"ok": True, "first_break": None,
                                     "checked_at": health["audit_chain"]["checked_at"]}
    assert f'pkisvc_audit_chain_ok{{cluster="{settings.cluster}"}} 1.0' in metrics
    report: dict[str, Any] = json.loads(r.stdout)
    return report


# --- files ---------------------------------------------------------------------------------

@pytest.fixture
def files_store(tmp_path: Path) -> tuple[CertStore, Clock, Settings, dict[str, str]]:
    data = tmp_path / "data"
    settings = make_settings(data, **{"audit.keep": "30d"})
    clock = Clock(datetime.now(UTC).replace(microsecond=0) - 3 * DAY)
    store = CertStore(FilesBackend(data), settings, clock=clock)
    store.init(actor="ops")
    events_over_days(store, clock, 4)
    env = {"PKISVC_DATA_DIR": str(data), "PKISVC_AUDIT__KEEP": "30d"}
    return store, clock, settings, env


def period_files(data: Path) -> list[Path]:
    return sorted((data / "events").glob("*.jsonl"))


def test_an_untouched_store_verifies(files_store):
    _store, _, settings, env = files_store
    report = assert_holds(settings, env)
    assert report["versions"] == 5 and report["periods"] == 4
    assert report["events"] == 8
    assert oct(os.stat(settings.chain_key_path).st_mode & 0o777) == "0o600"


def test_an_edited_change_event_is_named(files_store):
    _, _, settings, env = files_store
    event = dict(stored.stored(settings.data_dir, 3).event or {})
    assert event["actor"] == "ops"
    stored.rewrite(settings.data_dir, 3, event={**event, "actor": "nobody"})
    assert_named(settings, env, "version 3", "MAC")


def test_edited_material_is_named(files_store):
    _, _, settings, env = files_store
    files = dict(stored.stored(settings.data_dir, 4).files)
    files["server.cert"] = files["server.cert"].replace(b"A", b"B", 1)
    stored.rewrite(settings.data_dir, 4, files=files)
    assert_named(settings, env, "version 4", "stored files differ")


def test_an_edited_appended_event_is_named(files_store):
    _, _, settings, env = files_store
    day = period_files(settings.data_dir)[1]
    day.write_text(day.read_text().replace('"action":"key-read"', '"action":"nothing"'))
    assert_named(settings, env, f"events of {day.stem}", "altered")


def test_a_back_dated_event_is_named(files_store):
    _, _, settings, env = files_store
    first = period_files(settings.data_dir)[0]
    lines = first.read_text().splitlines()
    forged = json.loads(lines[1])
    forged["event"]["actor"] = "intruder"
    forged["seq"] = len(lines)  # after the close: an event landing in a closed period
    first.write_text("\n".join([*lines, json.dumps(forged)]) + "\n")
    assert_named(settings, env, f"events of {first.stem}", "altered or inserted")


def test_a_version_written_around_pkisvc_is_named(files_store):
    _store, _, settings, env = files_store
    record = dict(stored.stored(settings.data_dir, 5).record)
    record.update(version=6, parent=5, reason="slipped in")
    stored.rewrite(settings.data_dir, 5, to=6, record=record)  # a copy of 5, its record edited
    (settings.data_dir / "current").write_text("6\n")
    assert FilesBackend(settings.data_dir).latest() == 6  # pkisvc would serve it
    assert_named(settings, env, "version 6", "MAC")


def test_older_directory_generations_verify_and_the_store_grows_in_files(files_store):
    """A store an older pkisvc began (versions as directories) reads, verifies and audits
    as before; its next version is a file."""
    store, _, settings, env = files_store
    data = settings.data_dir
    held = {v: store.read(v) for v in range(1, 6)}
    events = store.audit(limit=100)
    for v in (1, 2, 3):
        stored.as_directory(data, v)
    fresh = CertStore(FilesBackend(data), settings)
    assert {v: fresh.read(v) for v in range(1, 6)} == held
    assert fresh.versions() == store.versions()
    assert fresh.audit(limit=100) == events
    assert fresh.rotate_leaf("server", actor="ops").version == 6
    assert sorted(os.listdir(data / "generations")) == [
        "000001", "000002", "000003", "000004.gen", "000005.gen", "000006.gen"]
    assert assert_holds(settings, env)["versions"] == 6


def test_an_edited_event_in_an_older_directory_generation_is_named(files_store):
    _, _, settings, env = files_store
    event = stored.as_directory(settings.data_dir, 3) / "event.json"
    event.write_text(event.read_text().replace('"actor":"ops"', '"actor":"nobody"'))
    assert_named(settings, env, "version 3", "MAC")


def test_a_version_stored_both_as_file_and_directory_is_named_and_not_served(files_store):
    _, _, settings, env = files_store
    kept = stored.gen_file(settings.data_dir, 4).read_bytes()
    stored.as_directory(settings.data_dir, 4)
    stored.gen_file(settings.data_dir, 4).write_bytes(kept)
    with pytest.raises(BackendUnavailable, match="version 4: stored twice"):
        FilesBackend(settings.data_dir).read(4)
    assert_named(settings, env, "version 4", "stored twice")


def test_a_torn_generation_file_is_named(files_store):
    _, _, settings, env = files_store
    path = stored.gen_file(settings.data_dir, 3)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(BackendUnavailable, match="version 3: its file 000003.gen is unread"):
        FilesBackend(settings.data_dir).read(3)
    assert_named(settings, env, "version 3", "unreadable", "torn")


def test_a_purged_period_is_named(files_store):
    _, _, settings, env = files_store
    os.unlink(period_files(settings.data_dir)[2])
    assert_named(settings, env, "does not follow the period before it")


def test_purging_the_oldest_periods_within_audit_keep_is_named(files_store):
    _, _, settings, env = files_store
    for f in period_files(settings.data_dir)[:2]:
        os.unlink(f)
    assert_named(settings, env, "purged range")


def test_retention_prunes_whole_periods_and_the_chain_holds(files_store):
    store, clock, settings, _env = files_store
    days = [f.stem for f in period_files(settings.data_dir)]
    clock.now += 28 * DAY  # now - audit.keep (30d) falls on the third day
    assert store.prune_audit(actor="pkisvc:retention") == days[:2]
    left = [f.stem for f in period_files(settings.data_dir)]
    assert left[:-1] == days[2:]  # and the prune's own event opened the period of its day
    clock.now += 300 * DAY
    assert store.prune_audit(actor="pkisvc:retention") == days[2:]  # never the newest
    assert next(f.stem for f in period_files(settings.data_dir)) == left[-1]
    report = store.verify()
    assert report.ok, report.breaks
    assert any("pruned (audit.keep)" in n for n in report.notes)
    events = store.audit(limit=100)
    pruned = [e for e in events if e.action == "audit-prune"]
    assert [e.actor for e in pruned] == ["pkisvc:retention"] * 2
    # version events are never pruned: every change still lists
    assert [e.version for e in events if e.action in ("init", "rotate-server")] == [5, 4, 3, 2, 1]


# --- the witness: removing the newest entries (pkisvc.witness) ------------------------------

def witness_of(settings: Settings) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(settings.chain_witness_path.read_text())
    return doc


def test_the_witness_names_the_newest_this_host_wrote(files_store):
    _store, clock, settings, _env = files_store
    head = witness_of(settings)
    assert head["version"] == 5 and head["period"] == f"{clock.now - DAY:%Y%m%d}"
    assert head["seq"] == 2  # open, token-create, key-read
    assert oct(os.stat(settings.chain_witness_path).st_mode & 0o777) == "0o600"


def remove_versions_4_and_5(settings: Settings) -> None:
    """An editor in data_dir: the newest two generations gone, `current` moved back."""
    for v in (5, 4):
        stored.remove(settings.data_dir, v)
    (settings.data_dir / "current").write_text("3\n")
    assert FilesBackend(settings.data_dir).latest() == 3  # a whole, shorter chain


def test_removing_the_newest_versions_is_named(files_store):
    _, _, settings, env = files_store
    remove_versions_4_and_5(settings)
    assert_named(settings, env, "newest versions removed: store ends at 3, this host saw 5")


def with_admin_token(store: CertStore, clock: Clock) -> None:
    """An admin token made today, so that the service `assert_named` starts appends none."""
    clock.now -= DAY  # back from tomorrow, where `events_over_days` left it
    store.create_token("admin", ["admin", "secrets"], actor="ops")


def test_removing_the_last_events_of_today_is_named(files_store):
    store, clock, settings, env = files_store
    with_admin_token(store, clock)  # today: open, token-create, key-read, token-create
    today = period_files(settings.data_dir)[-1]
    lines = today.read_text().splitlines()
    today.write_text("\n".join(lines[:-2]) + "\n")
    assert_named(settings, env, "newest events removed", f"events of {today.stem} end at "
                 "entry 1, this host saw entry 3")


def test_removing_the_newest_versions_then_writing_again_stays_named(files_store):
    """Writes are never refused for the witness, and do not wash the removal away."""
    store, _, settings, env = files_store
    remove_versions_4_and_5(settings)
    for _ in range(4):  # 4, 5 (not the ones this host saw), then 6 and 7
        store.rotate_leaf("server", actor="ops", reason="after the removal")
    assert store.latest() == 7
    assert witness_of(settings)["version"] == 5
    assert_named(settings, env, "version 5 is not the one this host saw")


def test_a_forged_witness_is_named(files_store):
    _, _, settings, env = files_store
    head = witness_of(settings)
    head["version"] = 3  # to hide versions 4 and 5: the MAC no longer matches
    settings.chain_witness_path.write_text(json.dumps(head))
    assert_named(settings, env, "witness", "forged")


def test_a_lost_witness_is_a_first_run_and_is_made_again(files_store):
    _, _, settings, env = files_store
    settings.chain_witness_path.unlink()
    report = assert_holds(settings, env)
    assert any("no witness on this host yet" in n for n in report["notes"]), report
    assert witness_of(settings)["version"] == 5
    assert oct(os.stat(settings.chain_witness_path).st_mode & 0o777) == "0o600"


def test_a_torn_witness_is_taken_as_lost_not_as_forged(files_store):
    """What a power cut during its (unsynced) write may leave: not JSON at all."""
    _, _, settings, env = files_store
    settings.chain_witness_path.write_bytes(b"\0" * 100)
    report = assert_holds(settings, env)
    assert any("is torn" in n for n in report["notes"]), report
    assert witness_of(settings)["version"] == 5


def test_another_stores_witness_is_taken_as_lost(files_store):
    """One data_dir for two backends (`pkisvc migrate` into Vault on this host): each store
    starts its own witness over the other's, never compares against it."""
    _, _, settings, env = files_store
    other = Witness(settings.chain_witness_path)
    other.store = "vault:secret/pkisvc/prod"
    key, _ = FilesBackend(settings.data_dir).chain_key.load()
    other.raise_to(key, Head(version=99, version_mac="0" * 64))
    assert witness_of(settings)["store"] == "vault:secret/pkisvc/prod"
    report = assert_holds(settings, env)
    assert any("of another store" in n for n in report["notes"]), report
    assert witness_of(settings)["store"] == "files" and witness_of(settings)["version"] == 5


def test_a_witness_behind_is_raised_by_a_check(files_store, tmp_path):
    """Another host's witness (its own file) that saw less is raised, not a break."""
    store, _, settings, _env = files_store
    other = dataclasses.replace(settings, chain_witness_file=tmp_path / "other.head")
    replica = CertStore(FilesBackend.from_settings(other), other)
    replica.create_token("from-the-other", ["read"], actor="ops")
    behind = json.loads(other.chain_witness_path.read_text())
    store.rotate_leaf("server", actor="ops")  # this host's writes: the other saw neither
    store.create_token("later", ["read"], actor="ops")
    assert behind["version"] is None and witness_of(settings)["version"] == 6
    report = replica.verify()
    assert report.ok, report.breaks
    assert json.loads(other.chain_witness_path.read_text()) == witness_of(settings)


def test_events_of_one_second_list_in_the_order_they_happened(tmp_path):
    settings = make_settings(tmp_path / "data")
    clock = Clock(datetime(2026, 12, 1, 12, 0, tzinfo=UTC))
    store = CertStore(FilesBackend(tmp_path / "data"), settings, clock=clock)
    store.init(actor="ops")
    store.create_token("before", ["read"], actor="ops")
    store.rotate_leaf("server", actor="ops")
    store.record_delivery(actor="ops", action="key-read", version=2, items=("server",))
    store.rotate_leaf("kubecfg", actor="ops")
    assert [(e.action, e.version) for e in store.audit()] == [
        ("rotate-kubecfg", 3), ("key-read", 2), ("rotate-server", 2), ("token-create", None),
        ("init", 1)]


# --- vault ---------------------------------------------------------------------------------

def bao(openbao: Any, *args: str, stdin: str | None = None) -> str:
    """Run the real `bao` CLI with the service's own token."""
    from tests.openbao import bao_binary
    r = subprocess.run([str(bao_binary()), *args], input=stdin, capture_output=True, text=True,
                       env={"VAULT_ADDR": openbao.addr, "VAULT_TOKEN": openbao.token,
                            "HOME": str(openbao.workdir), "PATH": "/usr/bin:/bin"},
                       timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


@pytest.fixture
def vault_store(openbao, tmp_path):
    over = openbao.settings_overrides(**{"chain_key_file": str(tmp_path / "chain.key"),
                                         "data_dir": str(tmp_path / "data"),
                                         "key_type": "ecdsa-p256", "audit.keep": "30d"})
    settings = Settings.load(env={}, overrides=over)
    from pkisvc.backends.vault import VaultBackend
    clock = Clock(datetime.now(UTC).replace(microsecond=0) - 2 * DAY)
    store = CertStore(VaultBackend.from_settings(settings), settings, clock=clock)
    store.init(actor="ops")
    events_over_days(store, clock, 3)
    env = {"PKISVC_BACKEND": "vault", "PKISVC_CLUSTER": settings.cluster,
           "PKISVC_VAULT__ADDR": openbao.addr, "PKISVC_VAULT__TOKEN": openbao.token,
           "PKISVC_CHAIN_KEY_FILE": str(tmp_path / "chain.key"),
           "PKISVC_DATA_DIR": str(tmp_path / "data"), "PKISVC_AUDIT__KEEP": "30d"}
    base = f"secret/pkisvc/{settings.cluster}"
    return store, settings, env, base


def kv_get(openbao: Any, path: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(bao(openbao, "kv", "get", "-format=json", path))
    return data["data"]["data"]


def periods_of(openbao: Any, base: str) -> list[str]:
    return sorted(p.rstrip("/") for p in
                  json.loads(bao(openbao, "kv", "list", "-format=json", f"{base}/events")))


@pytest.mark.vault
def test_vault_an_untouched_store_verifies(openbao, vault_store):
    _store, settings, env, _base = vault_store
    report = assert_holds(settings, env)
    assert report["versions"] == 4 and report["periods"] == 3 and report["events"] == 6


@pytest.mark.vault
def test_vault_an_edited_event_is_named(openbao, vault_store):
    _, settings, env, base = vault_store
    day = periods_of(openbao, base)[1]
    path = f"{base}/events/{day}/000000002"
    entry = kv_get(openbao, path)
    entry["entry"]["event"]["actor"] = "nobody"
    bao(openbao, "kv", "put", path, "-", stdin=json.dumps(entry))
    assert_named(settings, env, f"events of {day}", "altered")


@pytest.mark.vault
def test_vault_a_back_dated_event_is_named(openbao, vault_store):
    _, settings, env, base = vault_store
    first = periods_of(openbao, base)[0]
    entry = kv_get(openbao, f"{base}/events/{first}/000000001")
    earlier = "20200101"
    entry["entry"].update(period=earlier, seq=0)
    bao(openbao, "kv", "put", f"{base}/events/{earlier}/000000000", "-",
        stdin=json.dumps(entry))
    assert_named(settings, env, f"events of {earlier}", "altered or inserted")


@pytest.mark.vault
def test_vault_a_version_written_around_pkisvc_is_named(openbao, vault_store):
    _store, settings, env, base = vault_store
    payload = kv_get(openbao, f"{base}/versions/4/record")
    material = kv_get(openbao, f"{base}/versions/4/material-{payload['material']}")
    bao(openbao, "kv", "put", f"{base}/versions/5/material-{payload['material']}", "-",
        stdin=json.dumps(material))
    payload["record"].update(version=5, parent=4, reason="slipped in")
    bao(openbao, "kv", "put", f"{base}/versions/5/record", "-", stdin=json.dumps(payload))
    bao(openbao, "kv", "put", f"{base}/head", "version=5")
    assert_named(settings, env, "version 5", "MAC")


@pytest.mark.vault
def test_vault_a_rewritten_record_is_named(openbao, vault_store):
    """`kv metadata put -max-versions=1` then a write: the original record is purged."""
    _, settings, env, base = vault_store
    path = f"{base}/versions/2/record"
    payload = kv_get(openbao, path)
    payload["record"]["reason"] = "nothing to see"
    bao(openbao, "kv", "metadata", "put", "-max-versions=1", path)
    bao(openbao, "kv", "put", path, "-", stdin=json.dumps(payload))
    assert_named(settings, env, "version 2", "rewritten")


@pytest.mark.vault
def test_vault_max_versions_one_then_a_rotation_loses_nothing(openbao, vault_store):
    store, settings, env, base = vault_store
    for path in (f"{base}/head", f"{base}/versions/1/record"):
        bao(openbao, "kv", "metadata", "put", "-max-versions=1", path)
    store.rotate_leaf("server", actor="ops")
    report = assert_holds(settings, env)
    assert report["versions"] == 5


@pytest.mark.vault
def test_vault_a_deleted_version_is_named(openbao, vault_store):
    _, settings, env, base = vault_store
    bao(openbao, "kv", "metadata", "delete", f"{base}/versions/2/record")
    assert_named(settings, env, "version 2", "missing")


@pytest.mark.vault
def test_vault_removing_the_newest_versions_is_named(openbao, vault_store):
    """Records deleted (a token that may delete metadata) and `head` put back."""
    _, settings, env, base = vault_store
    for v in (4, 3):
        bao(openbao, "kv", "metadata", "delete", f"{base}/versions/{v}/record")
    bao(openbao, "kv", "put", f"{base}/head", "version=2")
    assert_named(settings, env, "newest versions removed: store ends at 2, this host saw 4")


@pytest.mark.vault
def test_vault_removing_the_last_events_of_today_is_named(openbao, vault_store):
    store, settings, env, base = vault_store
    with_admin_token(store, store._clock)
    today = periods_of(openbao, base)[-1]
    for seq in (3, 2):
        bao(openbao, "kv", "metadata", "delete", f"{base}/events/{today}/{seq:09d}")
    assert_named(settings, env, "newest events removed", f"events of {today} end at entry 1, "
                 "this host saw entry 3")


@pytest.mark.vault
def test_vault_a_purged_event_is_named(openbao, vault_store):
    _, settings, env, base = vault_store
    day = periods_of(openbao, base)[1]
    bao(openbao, "kv", "metadata", "delete", f"{base}/events/{day}/000000001")
    assert_named(settings, env, f"events of {day}", "missing")


@pytest.mark.vault
def test_vault_each_replica_keeps_its_own_witness(openbao, vault_store, tmp_path):
    """Two replicas of one Vault store, each with its own data_dir: a version one of them
    wrote is witnessed there, and on the other once a check there held; removing it is then
    named on both."""
    store_a, settings_a, env_a, base = vault_store
    settings_b = dataclasses.replace(settings_a, data_dir=tmp_path / "replica-b")
    env_b = {**env_a, "PKISVC_DATA_DIR": str(settings_b.data_dir)}
    from pkisvc.backends.vault import VaultBackend
    store_b = CertStore(VaultBackend.from_settings(settings_b), settings_b,
                        clock=store_a._clock)
    store_b.rotate_leaf("server", actor="ops", reason="from replica b")
    assert witness_of(settings_b)["version"] == 5
    assert witness_of(settings_a)["version"] == 4  # a has not seen 5 yet
    r = run_cli("verify", "-o", "json", env=env_a)  # a check on a that holds raises a's
    assert r.returncode == 0, r.stdout + r.stderr
    assert witness_of(settings_a)["version"] == 5
    bao(openbao, "kv", "metadata", "delete", f"{base}/versions/5/record")
    bao(openbao, "kv", "put", f"{base}/head", "version=4")
    for settings, env in ((settings_a, env_a), (settings_b, env_b)):
        assert_named(settings, env, "newest versions removed: store ends at 4, this host saw 5",
                     str(settings.chain_witness_path))
