"""The shipped Vault policies (docs/vault) on a real OpenBao: the service's holds what the code
needs and no more, the auditor's reads history and never a key, the service cannot rewrite or
purge history; setup from zero (docs/vault/setup.sh, the declared audit device, AppRole with a
secret ID file); CLI runs and replicas leave no token behind."""
from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import hvac
import hvac.exceptions
import pytest

from pkisvc.backends.files import FilesBackend
from pkisvc.backends.vault import VaultBackend
from pkisvc.errors import PermissionDenied
from pkisvc.model import AuditEvent, MinionState, SessionRecord
from pkisvc.store import CertStore
from pkisvc.testing.backend import NOON
from tests.conftest import (
    REPO,
    clean_env,
    free_port,
    make_settings,
    run_cli,
    serve,
    start,
    stop,
    wait_for,
)
from tests.openbao import SETUP, PersistentOpenBao, policy, policy_token

pytestmark = pytest.mark.vault

BLOCK = re.compile(r'path "([^"]+)" \{\s*capabilities = \[([^\]]*)\]\s*\}')


def blocks(text: str) -> list[tuple[str, list[str]]]:
    """The (path, capabilities) of a policy, in order."""
    return [(p, re.findall(r'"([^"]+)"', caps)) for p, caps in BLOCK.findall(text)]


def hcl(rules: list[tuple[str, list[str]]]) -> str:
    return "".join(f'path "{p}" {{\n  capabilities = {json.dumps(c)}\n}}\n'
                   for p, c in rules if c)


def matches(pattern: str, path: str) -> bool:
    """Whether a policy path (`+` one segment, a trailing `*` anything) covers path."""
    rx = re.escape(pattern).replace(r"\+", "[^/]+").replace(r"\*", ".*")
    return re.fullmatch(rx, path) is not None


def snapshot(root: Any, base: str) -> dict[str, int]:
    """Every secret under base with its KV version, as the root token sees them."""
    kv, out = root.secrets.kv.v2, {}
    todo = [base]
    while todo:
        here = todo.pop()
        try:
            keys = kv.list_secrets(here)["data"]["keys"]
        except hvac.exceptions.InvalidPath:
            continue
        for k in keys:
            if k.endswith("/"):
                todo.append(f"{here}/{k.rstrip('/')}")
            else:
                path = f"{here}/{k}"
                out[path] = kv.read_secret_metadata(path)["data"]["current_version"]
    return out


@pytest.fixture(scope="module")
def first_layout_generation(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A real version 1 (EC keys), to be stored in a cluster the way the first layout did."""
    data = tmp_path_factory.mktemp("gen") / "data"
    files = FilesBackend(data)
    CertStore(files, make_settings(data)).init(actor="t")
    return files.read(1)


def first_layout_store(root: Any, cluster: str, gen: Any) -> None:
    """Version 1 in the first layout's `material` secret: the one thing the service only
    reads (data and metadata), so every grant of its policy has a use below."""
    root.secrets.kv.v2.create_or_update_secret(f"pkisvc/{cluster}/material", cas=0, secret={
        "pkisvc": 1, "record": gen.record.to_dict(),
        "files": {n: base64.b64encode(b).decode() for n, b in gen.files.items()}})
    # ... and an appended event of that time, under audit/ (before the chain's events/).
    old = AuditEvent(NOON, "t", "token-create", reason="from before the chain")
    root.secrets.kv.v2.create_or_update_secret(
        f"pkisvc/{cluster}/audit/{NOON:%Y%m%d}/0001", cas=0, secret={"event": old.to_dict()})


def operations(backend: VaultBackend, store: CertStore,
               other: VaultBackend) -> list[tuple[str, Callable[[], Any]]]:
    """What the service does with Vault, in an order where each step may rely on the last
    (other: another process with the same token)."""
    session = SessionRecord("a" * 64, "ops", "b" * 64, ("read",), NOON, NOON, NOON)
    second = SessionRecord("c" * 64, "ops", "b" * 64, ("read",), NOON, NOON, NOON)
    asked = MinionState("k8s-node-1", "node", 1, received=NOON, asked=NOON)
    moved = MinionState("k8s-node-1", "node", 2, received=NOON, asked=NOON)
    return [
        ("read version 1", lambda: backend.read(1)),
        ("rotate ca", lambda: store.rotate_ca(actor="t")),
        ("rotate server", lambda: store.rotate_leaf("server", actor="t")),
        ("another process reads it", lambda: other.read(3)),
        ("create a token", lambda: store.create_token("ops", ["read"], actor="t")),
        ("another process reads the audit trail", lambda: other.audit(limit=100)),
        ("open a session", lambda: backend.add_session(session)),
        ("open another", lambda: backend.add_session(second)),
        ("a minion's first state", lambda: backend.put_minion(asked, expected=None)),
        ("its next state", lambda: backend.put_minion(moved, expected=asked)),
    ]


def test_the_service_policy_is_all_it_needs_each_grant_removed_refuses_cleanly(
        openbao, tmp_path, first_layout_generation):
    """[O] acceptance 1: each capability of the shipped service policy removed in turn gives
    one clear error, and the operation refused writes nothing (no version without its event,
    no token without its event)."""
    root = openbao.client()
    rules = blocks(policy("service", "CLUSTER"))
    grants = sum(len(c) for _, c in rules)
    assert len(rules) >= 10 and grants >= 21  # every block parsed
    # The whole policy does everything.
    cluster = openbao.settings_overrides()["cluster"]
    first_layout_store(root, cluster, first_layout_generation)
    token = openbao.service_token(cluster)
    backend, other = (VaultBackend(openbao.addr, cluster=cluster, token=token) for _ in "ab")
    store = CertStore(backend, make_settings(tmp_path / "data"))
    for _, op in operations(backend, store, other):
        op()
    refusals = {}
    for i, (pattern, caps) in enumerate(rules):
        for cap in caps:
            cluster = openbao.settings_overrides()["cluster"]
            first_layout_store(root, cluster, first_layout_generation)
            reduced = [(p, [c for c in cs if (j, c) != (i, cap)]) for j, (p, cs) in
                       enumerate(blocks(policy("service", cluster)))]
            token = policy_token(root, "reduced", cluster, text=hcl(reduced))
            backend, other = (VaultBackend(openbao.addr, cluster=cluster, token=token)
                              for _ in "ab")
            store = CertStore(backend, make_settings(tmp_path / "data"))
            base = f"pkisvc/{cluster}"
            for what, op in operations(backend, store, other):
                # The ops before moved head after their answers: land those moves first.
                assert backend.settle_head() and other.settle_head()
                before = snapshot(root, base)
                try:
                    op()
                except PermissionDenied as e:
                    message = str(e)
                    assert snapshot(root, base) == before, f"{cap} on {pattern}: {what} wrote"
                    break
            else:
                raise AssertionError(f"{cap!r} on {pattern} is granted but never needed")
            assert "\n" not in message and token not in message
            named = re.fullmatch(r"permission denied on (\S+?)(: the token's policy lacks "
                                 r"'(\w+)')?", message)
            assert named, message
            assert matches(pattern.replace("CLUSTER", cluster), named[1]) or (
                named[3] == cap), (pattern, cap, message)
            # Whatever was written before the refusal is whole: each version has its event.
            check = VaultBackend(openbao.addr, cluster=cluster, token=openbao.token)
            for record in check.versions()[1:]:
                assert [e.version for e in check.audit(limit=100)
                        if e.action == record.operation].count(record.version) == 1
            refusals[(pattern, cap)] = f"{what}: {message}"
    assert len(refusals) == grants
    print("\n" + "\n".join(f"{cap:>6} {p.split('CLUSTER/')[-1]:<28} {m}"
                           for (p, cap), m in refusals.items()))


def test_the_service_policy_cannot_rewrite_purge_or_cap_history(openbao, tmp_path):
    """[O] acceptance 2, the service's side: with its own token nothing written can change."""
    over = openbao.settings_overrides()
    cluster, token = over["cluster"], over["vault.token"]
    backend = VaultBackend(openbao.addr, cluster=cluster, token=token)
    store = CertStore(backend, make_settings(tmp_path / "data"))
    store.init(actor="t")
    store.create_token("ops", ["read"], actor="t")
    base = f"pkisvc/{cluster}"
    root_kv = openbao.client().secrets.kv.v2
    record = f"{base}/versions/1/record"
    material = f"{base}/versions/1/" + next(
        k for k in root_kv.list_secrets(f"{base}/versions/1")["data"]["keys"]
        if k.startswith("material-"))
    event = f"{base}/events/" + root_kv.list_secrets(f"{base}/events")["data"]["keys"][0]
    event += root_kv.list_secrets(event)["data"]["keys"][0]
    before = snapshot(openbao.client(), base)
    kv = openbao.client(token).secrets.kv.v2
    attempts = {
        "lower max_versions": lambda p: kv.update_metadata(p, max_versions=1),
        "require no cas": lambda p: kv.update_metadata(p, cas_required=False),
        "delete metadata": lambda p: kv.delete_metadata_and_all_versions(p),
        "delete the latest version": lambda p: kv.delete_latest_version_of_secret(p),
        "delete version 1": lambda p: kv.delete_secret_versions(p, versions=[1]),
        "destroy version 1": lambda p: kv.destroy_secret_versions(p, versions=[1]),
        "rewrite": lambda p: kv.create_or_update_secret(p, secret={"x": 1}),
        "rewrite under cas": lambda p: kv.create_or_update_secret(p, secret={"x": 1}, cas=1),
    }
    for path in (record, material, event, f"{base}/head", f"{base}/tokens"):
        for what, attempt in attempts.items():
            if what.startswith("rewrite") and path.endswith(("/head", "/tokens")):
                continue  # the service moves head and changes the token list (under cas)
            with pytest.raises(hvac.exceptions.Forbidden):
                attempt(path)
    assert snapshot(openbao.client(), base) == before
    assert backend.read(1).record.operation == "init"


def test_the_auditor_reads_history_and_is_refused_every_key(openbao, tmp_path):
    """[N] acceptance 4, [O] acceptance 2: docs/vault/pkisvc-auditor.hcl."""
    over = openbao.settings_overrides()
    cluster = over["cluster"]
    service = VaultBackend(openbao.addr, cluster=cluster, token=over["vault.token"])
    store = CertStore(service, make_settings(tmp_path / "data"))
    store.init(actor="t")
    store.rotate_ca(actor="t", reason="yearly")
    store.rotate_leaf("server", actor="t")
    store.create_token("ops", ["read"], actor="t")
    service.put_minion(MinionState("k8s-node-1", "node", 3, received=NOON, asked=NOON),
                       expected=None)
    token = policy_token(openbao.client(), "auditor", cluster)
    auditor = VaultBackend(openbao.addr, cluster=cluster, token=token)
    assert [(r.version, r.operation, r.reason) for r in auditor.versions()] == [
        (1, "init", ""), (2, "rotate-ca", "yearly"), (3, "rotate-server", "")]
    assert [e.action for e in auditor.audit()] == [
        "token-create", "rotate-server", "rotate-ca", "init"]
    assert auditor.minion("k8s-node-1").version == 3
    kv = openbao.client(token).secrets.kv.v2
    base = f"pkisvc/{cluster}"
    for v in (1, 2, 3):
        gen = service.read(v)
        payload = kv.read_secret_version(f"{base}/versions/{v}/record",
                                         raise_on_deleted_version=True)["data"]["data"]
        certs = {n: base64.b64decode(b) for n, b in payload["files"].items()}
        assert certs == {n: b for n, b in gen.files.items() if not n.endswith(".key")}
        assert payload["record"]["items"]["ca"]["fingerprint"] == \
            gen.record.items["ca"].fingerprint
        keys = [k for k in kv.list_secrets(f"{base}/versions/{v}")["data"]["keys"]
                if k != "record"]
        assert keys and all(k.startswith("material-") for k in keys)
        for k in keys:
            with pytest.raises(hvac.exceptions.Forbidden):
                kv.read_secret_version(f"{base}/versions/{v}/{k}", raise_on_deleted_version=True)
    with pytest.raises(PermissionDenied, match="material-"):
        auditor.read(3)
    for secret in ("tokens", "sessions", "material"):
        with pytest.raises(hvac.exceptions.Forbidden):
            kv.read_secret_version(f"{base}/{secret}", raise_on_deleted_version=True)
    with pytest.raises(PermissionDenied):  # and it writes nothing
        auditor.put_minion(MinionState("k8s-node-2", "node", 3, received=NOON, asked=NOON),
                           expected=None)
    # The same through the command line, with the auditor's token in a file.
    token_file = tmp_path / "auditor.token"
    token_file.write_text(token + "\n")
    cfg = tmp_path / "auditor.yaml"
    cfg.write_text(json.dumps({"backend": "vault", "cluster": cluster,
                               "data_dir": str(tmp_path / "auditor-data"), "vault": {
                                   "addr": openbao.addr, "token_file": str(token_file)}}))
    r = run_cli("--config", str(cfg), "versions", "-o", "json")
    assert r.returncode == 0, r.stderr
    assert [v["version"] for v in json.loads(r.stdout)] == [3, 2, 1]
    r = run_cli("--config", str(cfg), "show", "server", "--pem")
    assert r.returncode == 1 and r.stderr.startswith("error: permission denied on ")


def accessors(root: Any) -> set[str]:
    return set(root.adapter.list("/v1/auth/token/accessors")["data"]["keys"])


def test_setup_from_zero_on_raft_then_cli_runs_leave_no_token(tmp_path):
    """The README's Vault section, on a persistent OpenBao 2.x: the audit device declared as
    docker/openbao.hcl does, docs/vault/setup.sh (mount, policies, AppRole bound to loopback,
    a secret ID file); then CLI runs log in with AppRole and revoke their tokens."""
    stanza = re.search(r'^audit "file" "pkisvc" \{.*?^\}', (REPO / "docker" / "openbao.hcl")
                       .read_text(), re.M | re.S)
    assert stanza
    audit_log = tmp_path / "audit.log"
    server = PersistentOpenBao(tmp_path / "bao", extra_config=stanza[0].replace(
        "/openbao/logs/audit.log", str(audit_log)))
    try:
        env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "HOME": str(tmp_path),
               "BAO_ADDR": server.addr, "BAO_TOKEN": server.token, "CLUSTER": "prod",
               "MOUNT": "pkisvc-kv", "CIDRS": "127.0.0.1/32"}
        r = subprocess.run(["bash", str(SETUP), "apply"], env=env, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert r.stderr == ""  # no warning: the audit device is there
        assert r.stdout.splitlines()[:-1] == [
            "enabled KV v2 at pkisvc-kv/", "policy pkisvc-prod written",
            "policy pkisvc-prod-auditor written", "policy pkisvc-prod-admin written",
            "enabled AppRole at approle/", "AppRole role pkisvc-prod written"]
        role_id = r.stdout.splitlines()[-1].removeprefix("role_id: ")
        secret_id = tmp_path / "secret-id"
        r = subprocess.run(["bash", str(SETUP), "secret-id", str(secret_id)], env=env,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert os.stat(secret_id).st_mode & 0o777 == 0o600
        assert secret_id.read_text().strip() not in r.stdout + r.stderr
        root = server.client()
        assert {"pkisvc-prod", "pkisvc-prod-auditor", "pkisvc-prod-admin"} <= set(
            root.sys.list_acl_policies()["data"]["keys"])
        cfg = tmp_path / "pkisvc.yaml"
        cfg.write_text(json.dumps({
            "backend": "vault", "cluster": "prod", "key_type": "ecdsa-p256",
            "data_dir": str(tmp_path / "data"),
            "vault": {"addr": server.addr, "mount": "pkisvc-kv", "role_id": role_id,
                      "secret_id_file": str(secret_id)}}))
        before = accessors(root)
        for args in (["init"], ["rotate", "server", "--san", "k8s-master-9"], ["versions"],
                     ["audit"], ["token", "create", "salt-master", "--scope", "secrets"],
                     ["rotate", "ca"]):
            r = run_cli("--config", str(cfg), *args)
            assert r.returncode == 0, (args, r.stderr)
        assert accessors(root) == before  # every run revoked the token it logged in for
        assert r.stdout.startswith("version 3: rotate-ca")
        # The service too: each worker logs in, and revokes its token when it stops.
        port = free_port()
        p = start([sys.executable, "-m", "pkisvc.cli", "--config", str(cfg), "serve",
                   "--bind", f"127.0.0.1:{port}", "--workers", "2"], clean_env(), port)
        try:
            wait_for(lambda: len(accessors(root) - before) == 2, 60, "both workers to log in")
        finally:
            stop(p)
        assert accessors(root) == before
        log = audit_log.read_text()
        assert "pkisvc-kv/data/pkisvc/prod/versions/3/record" in log
        assert "auth/approle/login" in log and "auth/token/revoke-self" in log
        assert "PRIVATE KEY" not in log and "BEGIN CERTIFICATE" not in log  # HMAC'd values
    finally:
        server.stop()


def test_a_replica_on_an_empty_data_dir_makes_no_admin_token(openbao, tmp_path):
    """[O] acceptance 5: the second replica of a cluster finds the store's admin token."""
    over = openbao.settings_overrides()
    env = {"PKISVC_BACKEND": "vault", "PKISVC_CLUSTER": over["cluster"],
           "PKISVC_VAULT__ADDR": openbao.addr, "PKISVC_VAULT__TOKEN": over["vault.token"]}
    first, _ = serve(tmp_path / "a", 1, **env)
    try:
        assert (tmp_path / "a" / "admin.token").exists()
        second, _ = serve(tmp_path / "b", 1, **env)
        stop(second)
    finally:
        stop(first)
    assert not (tmp_path / "b" / "admin.token").exists()
    backend = VaultBackend(openbao.addr, cluster=over["cluster"], token=over["vault.token"])
    assert [t.name for t in backend.tokens()] == ["admin"]
    assert [e.action for e in backend.audit()].count("token-create") == 1
