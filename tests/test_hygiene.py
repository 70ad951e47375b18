"""Secret hygiene: where keys and tokens must never show up (issue 9, items 5 and 6).

A service with four workers, debug logging and the access log on takes changes, deliveries and
refusals; then its log, audit trail, error answers, /metrics, node pillar, the CLI's listings
and the data dir are searched for a private key block and for the tokens.
"""
import os
import stat
import subprocess
import sys

import pytest
import requests

from pkisvc.store import CertStore
from pkisvc.tokens import hash_token
from tests.conftest import (
    REPO,
    clean_env,
    free_port,
    make_settings,
    run_cli,
    stop,
    vault_backend,
    wait_for,
)
from tests.storm import assert_no_secrets

pytestmark = pytest.mark.slow


def serve_logged(data, log, workers=4):
    port = free_port()
    env = clean_env(PKISVC_DATA_DIR=str(data), PKISVC_KEY_TYPE="ecdsa-p256",
                    PKISVC_LOG_LEVEL="debug", PKISVC_ACCESS_LOG="true")
    with open(log, "wb") as out:
        p = subprocess.Popen([sys.executable, "-m", "pkisvc.cli", "serve", "--bind",
                              f"127.0.0.1:{port}", "--workers", str(workers)], cwd=REPO,
                             env=env, start_new_session=True, stdout=out,
                             stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: requests.get(f"{url}/v1/health", timeout=2).status_code == 200, 120,
                 "the service")
    except BaseException:
        stop(p)
        raise
    return p, url


def test_no_key_or_token_in_logs_audit_errors_metrics_node_pillar_or_listings(tmp_path):
    data = tmp_path / "data"
    log = tmp_path / "service.log"
    p, url = serve_logged(data, log)
    env = clean_env(PKISVC_DATA_DIR=str(data), PKISVC_KEY_TYPE="ecdsa-p256")
    admin = (data / "admin.token").read_text().strip()
    minted = run_cli("token", "create", "salt-master", "--scope", "secrets", "--scope", "read",
                     env=env).stdout.strip()
    revoked = run_cli("token", "create", "old", "--scope", "read", env=env).stdout.strip()
    run_cli("token", "revoke", "old", env=env)
    reader = run_cli("token", "create", "grafana", "--scope", "read", env=env).stdout.strip()
    tokens = (admin, minted, revoked, reader)
    h = {"Authorization": f"Bearer {admin}"}
    m = {"Authorization": f"Bearer {minted}"}
    seen = []
    try:
        for path in ("/v1/ca/rotate", "/v1/certs/server/rotate", "/v1/certs/kubecfg/rotate"):
            assert requests.post(url + path, json={"reason": "hygiene"}, headers=h,
                                 timeout=60).status_code == 201
        key = requests.get(f"{url}/v1/certs/server/key", headers=m, timeout=10)
        assert "PRIVATE KEY" in key.json()["pem"]  # the secrets scope gets it, and it is audited
        master = requests.get(f"{url}/v1/pillar/k8s-master-1?role=master", headers=m, timeout=10)
        assert "PRIVATE KEY" in master.text  # by design; everything below must not hold one
        for _ in range(4):
            node = requests.get(f"{url}/v1/pillar/k8s-node-1?role=node", headers=m, timeout=10)
            assert node.status_code == 200 and set(node.json()["files"]) == {"ca.crt"}
            seen.append(node.text)
        # Refusals: unknown, revoked and wrong-scope tokens, bad bodies, path tricks, a key
        # request with the token in the query string and in the body.
        for method, path, headers, body in [
            ("GET", "/v1/certs/server/key", {"Authorization": f"Bearer {revoked}"}, None),
            ("GET", "/v1/certs/server/key", {"Authorization": f"Bearer {reader}"}, None),
            ("GET", f"/v1/certs/server/key?token={minted}", {}, None),
            ("POST", "/v1/ca/rotate", h, f'{{"reason": 1, "token": "{minted}"}}'),
            ("POST", "/v1/rollback", h, '{"version": 99999}'),
            ("GET", "/v1/certs/ca/key", m, None),
            ("GET", "/v1/certs/..%2f..%2fca.key", h, None),
            ("GET", "/v1/pillar/k8s-node-1?role=admin", m, None),
            ("POST", "/v1/certs/server/rotate", h, '{"sans": ["not a name!"]}'),
        ]:
            r = requests.request(method, url + path, headers=headers, data=body, timeout=10)
            assert 400 <= r.status_code < 500, (path, r.status_code, r.text)
            seen.append(r.text)
        seen.append(requests.get(f"{url}/metrics", timeout=10).text)
        seen.append(requests.get(f"{url}/v1/audit?limit=10000", headers=h, timeout=10).text)
        seen.append(requests.get(f"{url}/v1/versions", headers=h, timeout=10).text)
    finally:
        stop(p)
    listings = [("versions",), ("versions", "-o", "json"), ("show", "server"),
                ("show", "kubecfg", "-o", "yaml"), ("show", "ca", "-o", "json"),
                ("show", "trust"), ("audit", "--limit", "1000"), ("audit", "-o", "json"),
                ("check-expiration",), ("token", "list", "-o", "json"), ("rotate", "server"),
                ("rollback", "2"), ("-v", "rotate", "kubecfg"), ("doctor", "--root",
                                                                  str(tmp_path / "host"))]
    for args in listings:
        r = run_cli(*args, env=env)
        assert "Traceback" not in r.stderr, r.stderr
        seen += [r.stdout, r.stderr]
    seen.append(log.read_text())
    seen += [p.read_text() for p in (data / "events").glob("*.jsonl")]
    assert_no_secrets(seen, *tokens)
    # Tokens exist only as sha256 in the data dir (admin.token is the operator's copy, 0600).
    for path in data.rglob("*"):
        if path.is_file() and path.name != "admin.token":
            raw = path.read_bytes()
            assert not any(t.encode() in raw for t in tokens), path
    assert hash_token(minted).encode() in (data / "tokens.json").read_bytes()
    # File modes: directories 0700, files 0600, the whole tree.
    for path in [data, *data.rglob("*")]:
        mode = stat.S_IMODE(path.lstat().st_mode)
        assert mode == (0o700 if path.is_dir() else 0o600), (path, oct(mode))


@pytest.mark.vault
def test_vault_keeps_only_token_hashes(openbao):
    backend = vault_backend(openbao)
    settings = make_settings(openbao.workdir / "unused")
    store = CertStore(backend, settings)
    store.init(actor="test")
    token = store.create_token("salt-master", ["secrets"], actor="test")
    client = openbao.client()
    found = []

    def walk(path):
        for key in client.secrets.kv.v2.list_secrets(path, mount_point="secret")["data"]["keys"]:
            if key.endswith("/"):
                walk(path + key)
            else:
                found.append(str(client.secrets.kv.v2.read_secret_version(
                    path + key, mount_point="secret", raise_on_deleted_version=True)))
    walk(backend.base + "/")
    assert len(found) >= 3  # material, tokens, audit events
    assert all(token not in text for text in found)
    assert any(hash_token(token) in text for text in found)
    assert os.environ.get("VAULT_TOKEN", "\0") not in "".join(found)
