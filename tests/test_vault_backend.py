"""The vault backend against a real OpenBao: KV history, replicas, outages, policies, AppRole."""
import base64
import dataclasses
import json
import re
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from click.testing import CliRunner

from pkisvc import chain
from pkisvc.app import create_app
from pkisvc.backends import load_backend
from pkisvc.backends import vault as vault_module
from pkisvc.backends.files import FilesBackend
from pkisvc.backends.vault import HEAD_MAX_DELAY, VaultBackend
from pkisvc.cli import main
from pkisvc.errors import BackendUnavailable, ConfigError, PermissionDenied, VersionConflict
from pkisvc.model import AuditEvent, StoredGeneration, TokenRecord
from pkisvc.store import CertStore
from pkisvc.testing import fake_generation
from pkisvc.testing.backend import NOON
from tests import stored
from tests.conftest import REPO, make_settings, run_cli, wait_for
from tests.openbao import OpenBao, PersistentOpenBao, policy, policy_token
from tests.test_store import assert_whole

pytestmark = pytest.mark.vault

READ_ONLY_POLICY = """
path "secret/data/pkisvc/{cluster}/*" {{
  capabilities = ["read"]
}}
path "secret/metadata/pkisvc/{cluster}/*" {{
  capabilities = ["read", "list"]
}}
"""


def vault_store(openbao, tmp_path, **overrides):
    settings = make_settings(tmp_path / "data", **openbao.settings_overrides(**overrides))
    return CertStore(load_backend(settings), settings), settings


def token_with(openbao, policy_text, cluster, name):
    root = openbao.client()
    root.sys.create_or_update_policy(name, policy_text.format(cluster=cluster))
    return root.auth.token.create(policies=[name], ttl="10m")["auth"]["client_token"]


def next_generation(gen, version):
    """A copy of gen as the given version (a write the contract allows)."""
    record = dataclasses.replace(gen.record, version=version, parent=version - 1)
    return StoredGeneration(record, gen.files)


def test_each_version_is_a_record_with_its_event_and_certificates_and_a_key_secret(
        openbao, tmp_path):
    store, settings = vault_store(openbao, tmp_path)
    store.init(actor="t")
    for i in range(24):
        [store.rotate_ca, lambda **kw: store.rotate_leaf("server", **kw),
         lambda **kw: store.rotate_leaf("kubecfg", **kw)][i % 3](actor="t", reason=f"r{i}")
    base = f"pkisvc/{settings.cluster}"
    kv = openbao.client().secrets.kv.v2
    assert store.backend.settle_head()  # head moves after the answer (close() waits so too)
    assert kv.read_secret_version(f"{base}/head", raise_on_deleted_version=True)[
        "data"]["data"] == {"version": 25}
    assert sorted(int(k.rstrip("/")) for k in kv.list_secrets(f"{base}/versions")[
        "data"]["keys"]) == list(range(1, 26))
    fresh = CertStore(load_backend(settings), settings)  # nothing cached
    events = {e.version: e for e in fresh.audit(limit=100)}
    for n in range(1, 26):
        listed = kv.list_secrets(f"{base}/versions/{n}")["data"]["keys"]
        assert len(listed) == 2 and "record" in listed  # one material, one record
        record = kv.read_secret_version(f"{base}/versions/{n}/record",
                                        raise_on_deleted_version=True)["data"]
        assert record["metadata"]["version"] == 1  # written once, never updated
        payload = record["data"]
        material = kv.read_secret_version(f"{base}/versions/{n}/material-"
                                          f"{payload['material']}",
                                          raise_on_deleted_version=True)["data"]["data"]
        keys = {k: base64.b64decode(v) for k, v in material["files"].items()}
        public = {k: base64.b64decode(v) for k, v in payload["files"].items()}
        gen = fresh.read(n)
        assert payload["record"] == gen.record.to_dict()
        assert {**keys, **public} == dict(gen.files)
        # Keys only in the material; certificates in the record, for an auditor.
        assert sorted(keys) == sorted(n for n in gen.files if n.endswith(".key"))
        assert {"ca.crt", "server.cert", "kubecfg.crt", "trust.crt"} <= set(public)
        assert "PRIVATE KEY" not in json.dumps(payload) + "".join(
            b.decode() for b in public.values())
        assert payload["event"] == events[n].to_dict()
        assert (events[n].action, events[n].reason) == (
            gen.record.operation, "" if n == 1 else f"r{n - 2}")
        assert_whole(fresh, n)


def test_replicas_see_each_others_writes_and_conflict(openbao):
    cluster = openbao.settings_overrides()["cluster"]
    token = openbao.service_token(cluster)
    a, b = (VaultBackend(openbao.addr, cluster=cluster, token=token) for _ in "ab")
    a.write(fake_generation(1), expected=None)
    assert a.read(1).version == 1  # cached in a from now on
    assert b.latest() == 1
    b.write(fake_generation(2, "from b"), expected=1)
    assert b.settle_head()  # b moves head after its answer; a sees it once moved
    assert a.latest() == 2
    assert a.read().record.reason == "from b"
    with pytest.raises(VersionConflict):
        a.write(fake_generation(2, "stale"), expected=1)
    assert [r.version for r in a.versions()] == [1, 2]


def test_history_and_events_are_read_without_reading_any_key(openbao):
    cluster = openbao.settings_overrides()["cluster"]
    writer = VaultBackend(openbao.addr, cluster=cluster, token=openbao.service_token(cluster))
    for v in (1, 2):
        writer.write(fake_generation(v, f"n{v}"), expected=v - 1 or None, event=AuditEvent(
            time=datetime(2026, 12, 4, 12, 0, v, tzinfo=UTC), actor="t", action="rotate-ca",
            version=v))
    # The shipped auditor policy: records, events and head, not the material secrets (keys).
    records_only = policy_token(openbao.client(), "auditor", cluster)
    auditor = VaultBackend(openbao.addr, cluster=cluster, token=records_only)
    assert auditor.latest() == 2
    assert [(r.version, r.reason) for r in auditor.versions()] == [(1, "n1"), (2, "n2")]
    assert [e.version for e in auditor.audit()] == [2, 1]
    with pytest.raises(PermissionDenied, match=r"versions/2/material-[0-9a-f]{16}$"):
        auditor.read()
    # ... and may walk the version chain (with the chain key), material unchecked
    key, unchained = writer.chain_key.load()
    report = chain.verify(key, unchained, auditor.chain_versions(), [], prunable_before=None)
    assert report.ok and report.versions == 2, report.breaks
    assert report.notes == ["material not checked (this token cannot read it)"]


def test_a_writer_killed_after_its_commit_leaves_head_behind_and_the_next_one_moves_it(
        openbao):
    cluster = openbao.settings_overrides()["cluster"]
    a = VaultBackend(openbao.addr, cluster=cluster, token=openbao.service_token(cluster))
    a.write(fake_generation(1), expected=None)
    assert a.settle_head()
    a._after_commit = lambda version, nonce: None  # killed between commit and head
    a.write(fake_generation(2, "committed"), expected=1)
    assert a.settle_head()
    kv = openbao.client().secrets.kv.v2
    assert kv.read_secret_version(f"pkisvc/{cluster}/head", raise_on_deleted_version=True)[
        "data"]["data"] == {"version": 1}
    del a._after_commit
    b = VaultBackend(openbao.addr, cluster=cluster, token=openbao.service_token(cluster))
    assert b.latest() == 2  # a new process looks past head once
    assert b.read().record.reason == "committed"
    a._after_commit = lambda version, nonce: None
    a.write(fake_generation(3, "committed too"), expected=2)
    assert a.settle_head()
    del a._after_commit
    assert b.latest() == 2  # head is behind again
    with pytest.raises(VersionConflict):  # the next writer's record conflicts ...
        b.write(fake_generation(3, "stale"), expected=2)
    assert b.latest() == a.latest() == 3  # ... and moves head on for everyone
    assert b.read(3).record.reason == "committed too"
    b.write(fake_generation(4), expected=3)
    assert b.settle_head()
    assert a.latest() == 4


def stored_head(openbao, cluster):
    """(the version head names, head's KV version) as stored now."""
    got = openbao.client().secrets.kv.v2.read_secret_version(
        f"pkisvc/{cluster}/head", raise_on_deleted_version=True)["data"]
    return got["data"]["version"], got["metadata"]["version"]


def test_a_rotation_answers_while_head_cannot_move_and_head_then_goes_to_the_newest(
        openbao, tmp_path):
    store, settings = vault_store(openbao, tmp_path)
    backend = store.backend
    store.init(actor="t")
    assert backend.settle_head() and stored_head(openbao, settings.cluster) == (1, 1)
    other = load_backend(settings)  # another process, reading head
    assert other.latest() == 1
    moving, release = threading.Event(), threading.Event()
    write = backend._write

    def held_head(path, data, cas):
        if path == backend._head_path:
            moving.set()
            assert release.wait(60)
        return write(path, data, cas)

    backend._write = held_head
    try:
        assert store.rotate_leaf("server", actor="t").version == 2  # head's move is held
        assert moving.wait(60)
        # Answered too, on the version this process committed (no conflict with its own).
        assert [store.rotate_leaf("server", actor="t").version for _ in "ab"] == [3, 4]
        assert store.latest() == backend.latest() == 4
        assert stored_head(openbao, settings.cluster) == (1, 1) and other.latest() == 1
    finally:
        release.set()
    assert backend.settle_head()
    # The held move (to 2) landed, then one move to the newest: 3 and 4 became one.
    assert stored_head(openbao, settings.cluster) == (4, 3)
    assert other.latest() == 4
    assert [r.version for r in other.versions()] == [1, 2, 3, 4]


def test_another_process_sees_a_rotation_within_version_ttl_of_its_answer(openbao, tmp_path):
    store, settings = vault_store(openbao, tmp_path)
    store.init(actor="t")
    other = CertStore(load_backend(settings), settings)  # a replica, its view kept
    assert other.latest() == 1
    for n in range(2, 6):
        assert store.rotate_leaf("server", actor="t").version == n
        answered = time.monotonic()
        bound = HEAD_MAX_DELAY + settings.vault.version_ttl  # README: "Reads do not ask ..."
        wait_for(lambda n=n: other.latest() == n, bound + SEEN_SLACK,
                 f"version {n} on the replica")
        assert time.monotonic() - answered < bound + SEEN_SLACK


SEEN_SLACK = 0.5  # head's write itself, and a loaded machine


def test_a_head_move_that_fails_leaves_head_behind_for_the_next_writer_to_heal(
        openbao, tmp_path, caplog):
    store, settings = vault_store(openbao, tmp_path)
    backend = store.backend
    store.init(actor="t")
    assert backend.settle_head()
    write = backend._write

    def refused(path, data, cas):
        if path == backend._head_path:
            raise BackendUnavailable("vault at test: head cannot be written")
        return write(path, data, cas)

    backend._write = refused
    assert store.rotate_leaf("server", actor="t").version == 2  # committed and answered
    assert backend.settle_head()
    assert stored_head(openbao, settings.cluster)[0] == 1  # behind, as a killed writer leaves it
    assert "moving secret/data/" in caplog.text
    backend._write = write
    elsewhere = CertStore(load_backend(settings), settings)
    assert elsewhere.rotate_leaf("server", actor="t").version == 3
    assert elsewhere.backend.settle_head()
    assert stored_head(openbao, settings.cluster)[0] == 3
    assert backend.latest() == 3 and backend.read(3).record.parent == 2


def test_a_replica_that_only_reads_moves_a_head_left_behind(openbao, tmp_path, monkeypatch):
    """A writer that never moved head (killed after its answer) does not hide its version
    from a replica that only reads: the replica looks past head every HEAL_EVERY seconds."""
    monkeypatch.setattr(vault_module, "HEAL_EVERY", 0.5)
    store, settings = vault_store(openbao, tmp_path)
    store.init(actor="t")
    assert store.backend.settle_head()
    reader = load_backend(settings)
    assert reader.latest() == 1  # its first look past head: nothing there
    write = store.backend._write

    def killed_before_head(path, data, cas):
        if path == store.backend._head_path:
            raise BackendUnavailable("vault at test: the writer is gone")
        return write(path, data, cas)

    store.backend._write = killed_before_head
    assert store.rotate_leaf("server", actor="t").version == 2
    assert store.backend.settle_head()
    assert stored_head(openbao, settings.cluster)[0] == 1
    wait_for(lambda: reader.latest() == 2, 0.5 + SEEN_SLACK + 5, "the replica to look past head")
    assert stored_head(openbao, settings.cluster)[0] == 2  # and it moved head for everyone


def test_a_first_layout_store_is_read_as_it_is_and_written_on_in_the_new_one(openbao):
    cluster = openbao.settings_overrides()["cluster"]
    kv = openbao.client().secrets.kv.v2
    old = f"pkisvc/{cluster}/material"
    kv.update_metadata(old, max_versions=1000, cas_required=True)
    for v in (1, 2):
        gen = fake_generation(v, f"old{v}")
        kv.create_or_update_secret(old, cas=v - 1, secret={
            "pkisvc": 1, "record": gen.record.to_dict(),
            "files": {n: base64.b64encode(b).decode() for n, b in gen.files.items()}})
    backend = VaultBackend(openbao.addr, cluster=cluster, token=openbao.service_token(cluster))
    assert backend.latest() == 2
    assert dict(backend.read(1).files) == dict(fake_generation(1, "old1").files)
    with pytest.raises(VersionConflict):
        backend.write(fake_generation(2, "stale"), expected=1)
    backend.write(fake_generation(3, "new"), expected=2)
    fresh = VaultBackend(openbao.addr, cluster=cluster, token=openbao.service_token(cluster))
    assert fresh.latest() == 3
    assert [r.reason for r in fresh.versions()] == ["old1", "old2", "new"]
    assert fresh.read(2).record.reason == "old2"
    with pytest.raises(VersionConflict):  # a stale writer meets the first layout's versions
        fresh.write(fake_generation(2, "stale"), expected=1)
    assert kv.read_secret_metadata(old)["data"]["current_version"] == 2  # left as it was


def test_a_standby_that_redirects_to_the_active_node_is_followed(openbao):
    active = openbao.addr

    class Standby(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(307)
            self.send_header("Location", active + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Standby)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        over = openbao.settings_overrides()
        cluster, token = over["cluster"], over["vault.token"]
        writer = VaultBackend(active, cluster=cluster, token=token)
        writer.write(fake_generation(1, "via the active node"), expected=None)
        assert writer.settle_head()  # this standby redirects reads only: no head to heal
        standby = VaultBackend(f"http://127.0.0.1:{server.server_port}", cluster=cluster,
                               token=token)
        assert standby.latest() == 1
        assert standby.read(1).record.reason == "via the active node"
    finally:
        server.shutdown()
        server.server_close()


def test_openbao_paused_or_stopped_is_backend_unavailable_within_the_timeout(tmp_path):
    server = OpenBao(tmp_path / "own-openbao")  # its own server: this test stops it
    try:
        backend = VaultBackend(server.addr, cluster="outage",
                               token=server.service_token("outage"), timeout=1)
        backend.write(fake_generation(1), expected=None)
        gen2 = next_generation(backend.read(1), 2)
        client = create_app(make_settings(tmp_path / "data", backend="vault"),
                            backend).test_client()
        assert client.get("/v1/health").status_code == 200
        server.pause()  # SIGSTOP: connections are accepted, nothing answers
        t0 = time.monotonic()
        r = client.get("/v1/health")
        assert time.monotonic() - t0 < 1.9
        assert (r.status_code, r.get_json()["backend"]) == (503, "down")
        # The trust bundle held in memory is still served, marked stale ([O]).
        t0 = time.monotonic()
        r = client.get("/v1/ca")
        assert time.monotonic() - t0 < 1.9
        assert r.status_code == 200 and "PKISVC-Stale" in r.headers
        for attempt in (backend.latest, lambda: backend.write(gen2, expected=1),
                        backend.ping):
            t0 = time.monotonic()
            with pytest.raises(BackendUnavailable, match="no answer within 1s") as e:
                attempt()
            assert time.monotonic() - t0 < 1.9
        assert backend.read(1).version == 1  # immutable versions are served from memory
        server.resume()
        # The same backend object serves again; the timed-out write landed whole or not at all.
        assert client.get("/v1/health").status_code == 200
        assert backend.latest() in (1, 2)
        if backend.latest() == 2:
            assert dict(backend.read(2).files) == dict(gen2.files)
        server.stop()
        t0 = time.monotonic()
        with pytest.raises(BackendUnavailable, match="cannot connect") as e:
            backend.latest()
        assert time.monotonic() - t0 < 1.0
        assert "Traceback" not in str(e.value) and len(str(e.value)) < 300
    finally:
        server.stop()


def test_read_only_token_reads_but_writes_are_permission_denied(openbao, tmp_path):
    store, settings = vault_store(openbao, tmp_path)
    store.init(actor="t")
    cluster = settings.cluster
    ro = token_with(openbao, READ_ONLY_POLICY, cluster, f"ro-{cluster}")
    backend = VaultBackend(openbao.addr, cluster=cluster, token=ro)
    assert backend.latest() == 1
    assert [r.version for r in backend.versions()] == [1]
    backend.ping()
    with pytest.raises(PermissionDenied) as e:
        backend.write(next_generation(backend.read(1), 2), expected=1)
    assert re.fullmatch(f"permission denied on secret/data/pkisvc/{cluster}/versions/2/"
                        "material-[0-9a-f]{16}: the token's policy lacks 'create'", str(e.value))
    with pytest.raises(PermissionDenied, match=f"on secret/data/pkisvc/{cluster}/tokens"):
        backend.put_token(TokenRecord("x", "a" * 64, ("read",), NOON))
    # An operator sees one line, not a traceback, and never the token.
    token_file = tmp_path / "ro.token"
    token_file.write_text(ro + "\n")
    cfg = tmp_path / "pkisvc.yaml"
    cfg.write_text(json.dumps({"backend": "vault", "cluster": cluster, "key_type": "ecdsa-p256",
                               "chain_key_file": str(settings.chain_key_path),
                               "vault": {"addr": openbao.addr,
                                         "token_file": str(token_file)}}))
    r = run_cli("--config", str(cfg), "rotate", "ca")
    assert r.returncode == 1
    assert re.fullmatch(f"error: permission denied on secret/data/pkisvc/{cluster}/versions/2/"
                        "material-[0-9a-f]{16}: the token's policy lacks 'create'\n", r.stderr)
    assert ro not in r.stdout + r.stderr
    assert store.latest() == 1


def test_approle_and_short_lived_tokens_with_a_prefix_policy_are_renewed(openbao, tmp_path):
    root = openbao.client()
    if "approle/" not in root.sys.list_auth_methods()["data"]:
        root.sys.enable_auth_method("approle")
    _, settings = vault_store(openbao, tmp_path)
    cluster = settings.cluster
    root.sys.create_or_update_policy(f"pkisvc-{cluster}", policy("service", cluster))
    approle = root.auth.approle
    # A one-use secret_id: once its token expires the backend could not log in again, so
    # working past the TTL proves the token was renewed.  The second role's max TTL ends its
    # tokens early: that backend must log in again with its (reusable) secret_id.
    approle.create_or_update_approle(f"r1-{cluster}", token_policies=[f"pkisvc-{cluster}"],
                                     token_ttl="2s", token_max_ttl="5m", secret_id_num_uses=1)
    approle.create_or_update_approle(f"r2-{cluster}", token_policies=[f"pkisvc-{cluster}"],
                                     token_ttl="1s", token_max_ttl="2s")
    creds = [(approle.read_role_id(f"{r}-{cluster}")["data"]["role_id"],
              approle.generate_secret_id(f"{r}-{cluster}")["data"]["secret_id"])
             for r in ("r1", "r2")]
    renewing, relogging = (VaultBackend(openbao.addr, cluster=cluster, role_id=role_id,
                                        secret_id=secret_id) for role_id, secret_id in creds)
    s = CertStore(renewing, settings)
    s.init(actor="approle")
    s.rotate_leaf("server", actor="approle")
    renewing.put_token(TokenRecord("ops", "b" * 64, ("read",), NOON))
    assert [e.action for e in s.audit()] == ["rotate-server", "init"]
    # A plain token with a short TTL (as an agent or an operator hands out) is renewed too;
    # made here, just before its first use (on a loaded machine the writes above can outlast
    # its 2 s).
    short = root.auth.token.create(policies=[f"pkisvc-{cluster}"], ttl="2s",
                                   explicit_max_ttl="5m")["auth"]["client_token"]
    static = VaultBackend(openbao.addr, cluster=cluster, token=short)
    deadline = time.monotonic() + 5  # 2.5 TTLs of the renewing backend's token
    while time.monotonic() < deadline:
        assert renewing.latest() == 2
        assert relogging.latest() == 2
        assert static.latest() == 2
        time.sleep(0.2)  # pacing the calls, not waiting for anything
    assert [t.name for t in relogging.tokens()] == ["ops"]
    bad = VaultBackend(openbao.addr, cluster=cluster, role_id=creds[1][0],
                       secret_id="not-the-secret-id")
    with pytest.raises(PermissionDenied, match="^permission denied on auth/approle/login") as e:
        bad.latest()
    assert creds[1][1] not in str(e.value) and "not-the-secret-id" not in str(e.value)


def test_vault_backend_needs_credentials(tmp_path):
    settings = make_settings(tmp_path / "data", backend="vault")
    with pytest.raises(ConfigError, match="vault.token"):
        load_backend(settings)
    settings = make_settings(tmp_path / "data", backend="vault", **{"vault.role_id": "r"})
    with pytest.raises(ConfigError, match="go together"):
        load_backend(settings)
    settings = make_settings(tmp_path / "data", backend="vault", **{
        "vault.role_id": "r", "vault.secret_id": "s", "vault.secret_id_file": "/f"})
    with pytest.raises(ConfigError, match="exclude each other"):
        load_backend(settings)


def test_migrate_keeps_history_numbers_audit_and_tokens_and_refuses_a_second_run(
        openbao, tmp_path):
    data = tmp_path / "data"
    overrides = openbao.settings_overrides(backend="files", data_dir=str(data),
                                           key_type="ecdsa-p256")
    cfg = tmp_path / "pkisvc.yaml"
    cfg.write_text(json.dumps({
        "backend": "files", "data_dir": str(data), "key_type": "ecdsa-p256",
        "cluster": overrides["cluster"],
        "vault": {"addr": openbao.addr, "token": overrides["vault.token"]}}))

    def cli(*args, env=None):
        return CliRunner().invoke(main, ["--config", str(cfg), *args], env=env,
                                  catch_exceptions=False)

    r = cli("migrate", "--to", "vault")
    assert (r.exit_code, r.output) == (1, f"error: FilesBackend({str(data)!r}) is empty: "
                                          "nothing to migrate\n")
    for args in (["init"], ["rotate", "ca"], ["rotate", "server"], ["rollback", "1"]):
        assert cli(*args).exit_code == 0
    for v in (1, 2):  # as an older pkisvc wrote them: directories, migrated alike
        stored.as_directory(data, v)
    files = FilesBackend(data)
    files.put_token(TokenRecord("ops", "c" * 64, ("read", "admin"), NOON))
    r = cli("migrate", "--to", "vault")
    assert r.exit_code == 0, r.output
    assert r.output.startswith("migrated 4 versions, 4 audit events and 1 tokens to vault")
    assert r.output.splitlines()[1] == (
        "each version keeps its original time in its record (what `pkisvc versions` shows); "
        "vault's own creation time of each secret is the migration's: it cannot be set")

    vault = VaultBackend(openbao.addr, cluster=overrides["cluster"],
                         token=overrides["vault.token"])
    assert [r.to_dict() for r in vault.versions()] == [r.to_dict() for r in files.versions()]
    for v in range(1, 5):
        assert dict(vault.read(v).files) == dict(files.read(v).files)
    assert vault.audit() == files.audit()
    assert vault.tokens() == files.tokens()
    listed = openbao.client().secrets.kv.v2.list_secrets(
        f"pkisvc/{overrides['cluster']}/versions")["data"]["keys"]
    assert sorted(int(v.rstrip("/")) for v in listed) == [1, 2, 3, 4]
    listed = json.loads(cli("versions", "-o", "json", env={"PKISVC_BACKEND": "vault"}).output)
    assert [v["version"] for v in listed] == [4, 3, 2, 1]

    r = run_cli("--config", str(cfg), "migrate", "--to", "vault")
    assert r.returncode == 1
    assert r.stderr.startswith("error: VaultBackend(") and "refusing to migrate" in r.stderr
    assert r.stderr.count("\n") == 1
    assert [v.version for v in vault.versions()] == [1, 2, 3, 4]


def test_tls_openbao_needs_its_ca_cert(tmp_path):
    server = OpenBao(tmp_path / "tls-openbao", tls=True)
    try:
        store, settings = vault_store(server, tmp_path)
        store.init(actor="t")
        assert store.read().version == 1
        untrusting = VaultBackend(server.addr, cluster=settings.cluster,
                                  token=settings.vault.token)
        with pytest.raises(BackendUnavailable, match="CERTIFICATE_VERIFY_FAILED|certificate"):
            untrusting.latest()
    finally:
        server.stop()


def test_two_processes_rotating_on_one_openbao_leave_no_gap(openbao, tmp_path):
    store, settings = vault_store(openbao, tmp_path)
    store.init(actor="t")
    extra = json.dumps(openbao.settings_overrides(cluster=settings.cluster))
    procs = [subprocess.Popen([sys.executable, "-m", "tests.workers", f"proc{i}",
                               str(tmp_path / "unused"), "15", extra], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    acked = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        acked += [int(x) for x in out.split()]
    assert sorted(acked) == list(range(2, 32))
    fresh = CertStore(load_backend(settings), settings)
    assert [r.version for r in fresh.versions()] == list(range(31, 0, -1))
    for r in fresh.versions():
        assert r.parent == (r.version - 1 or None)
        assert_whole(fresh, r.version)
    assert len(fresh.audit(limit=1000)) == 31


def test_the_same_process_serves_again_when_a_persistent_openbao_comes_back(tmp_path):
    server = PersistentOpenBao(tmp_path / "persistent-openbao")
    try:
        settings = make_settings(tmp_path / "data", backend="vault", cluster="restart",
                                 **{"vault.addr": server.addr,
                                    "vault.token": server.service_token("restart"),
                                    "vault.timeout": 2})
        client = create_app(settings).test_client()  # initialises version 1
        assert client.get("/v1/health").get_json()["version"] == 1
        store = client.application.extensions["pkisvc"]
        server.stop()
        t0 = time.monotonic()
        r = client.get("/v1/health")
        assert (r.status_code, r.get_json()["backend"]) == (503, "down")
        assert time.monotonic() - t0 < 2
        with pytest.raises(BackendUnavailable):
            store.rotate_ca(actor="t")
        server.start()  # same storage, same port, unsealed again
        health = client.get("/v1/health").get_json()
        assert {k: health[k] for k in ("status", "backend", "version")} == {
            "status": "ok", "backend": "ok", "version": 1}
        assert health["audit_chain"]["ok"] is not False  # an outage is not a break
        assert store.rotate_ca(actor="t").version == 2
        assert_whole(store, 2)
    finally:
        server.stop()


def test_an_operator_session_over_vault(openbao, tmp_path):
    overrides = openbao.settings_overrides()
    cfg = tmp_path / "pkisvc.yaml"
    cfg.write_text(json.dumps({"backend": "vault", "cluster": overrides["cluster"],
                               "key_type": "ecdsa-p256", "data_dir": str(tmp_path / "data"),
                               "vault": {"addr": openbao.addr,
                                         "token": overrides["vault.token"]}}))

    def cli(*args, code=0):
        r = CliRunner().invoke(main, ["--config", str(cfg), *args], catch_exceptions=False)
        assert r.exit_code == code, r.output
        return r.output

    cli("init")
    assert cli("init", code=1).startswith("error: ")
    cli("rotate", "ca", "--reason", "yearly")
    cli("rotate", "server", "--san", "k8s-master-9")
    # Version 1 had no k8s-master-9: the rollback says it removes it.
    assert cli("rollback", "1").splitlines() == [
        "version 4: rollback", "server SANs removed: k8s-master-9"]
    listed = json.loads(cli("versions", "-o", "json"))
    assert [(v["version"], v["operation"]) for v in listed] == [
        (4, "rollback"), (3, "rotate-server"), (2, "rotate-ca"), (1, "init")]
    assert "k8s-master-9" in json.loads(cli("show", "server", "--version", "3",
                                             "-o", "json"))["sans"]
    assert [e["action"] for e in json.loads(cli("audit", "-o", "json"))] == [
        "rollback", "rotate-server", "rotate-ca", "init"]
    dest = tmp_path / "backup.tar.gz"
    assert cli("backup", "--to", str(dest)).startswith("backup of 4 versions")
    assert not (tmp_path / "data" / "generations").exists()  # nothing went to the files backend


@pytest.mark.slow
def test_more_versions_than_any_max_versions_are_all_kept(openbao, tmp_path):
    """Issue 17, acceptance 5: 1,100 versions (ECDSA rollbacks, to keep it quick)."""
    store, settings = vault_store(openbao, tmp_path, key_type="ecdsa-p256")
    store.init(actor="t")
    store.rotate_leaf("server", actor="t", reason="two")
    started = time.monotonic()
    for n in range(3, 1101):
        assert store.rollback(1 + n % 2, actor="t").version == n
    writing = time.monotonic() - started
    fresh = CertStore(load_backend(settings), settings)  # nothing cached
    assert [r.version for r in fresh.versions()] == list(range(1100, 0, -1))
    second = fresh.read(2).record.items["server"].fingerprint
    for n in range(1, 1101):
        gen = fresh.read(n)
        assert gen.version == n and gen.files["server.key"]
    assert fresh.rollback(2, actor="t").version == 1101
    assert fresh.read().record.items["server"].fingerprint == second
    assert_whole(fresh, 1101)
    assert len(fresh.audit(limit=2000)) == 1101
    print(f"\n1,100 versions on OpenBao: {writing:.1f}s of writes "
          f"({writing / 1098 * 1000:.1f} ms a rollback)")
