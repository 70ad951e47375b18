"""pkisvc is stateless over the vault backend: two separate services (two gunicorns) on one
OpenBao stay gapless under concurrent rotations, through check-and-set alone."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from pkisvc import pki
from pkisvc.backends.vault import VaultBackend
from pkisvc.changes import parse_files
from pkisvc.settings import Settings
from tests.conftest import clean_env, free_port, start, stop, wait_for

pytestmark = pytest.mark.vault


def test_two_services_on_one_openbao_stay_gapless(openbao, tmp_path):
    overrides = openbao.settings_overrides(key_type="ecdsa-p256")
    env = clean_env(
        PKISVC_BACKEND="vault", PKISVC_CLUSTER=overrides["cluster"],
        PKISVC_VAULT__ADDR=overrides["vault.addr"], PKISVC_VAULT__TOKEN=overrides["vault.token"],
        PKISVC_KEY_TYPE="ecdsa-p256",
        PKISVC_CHAIN_KEY_FILE=overrides["chain_key_file"])  # one key for both replicas
    if overrides.get("vault.ca_cert"):
        env["PKISVC_VAULT__CA_CERT"] = overrides["vault.ca_cert"]
    services = []
    try:
        for i in range(2):
            port = free_port()
            # Separate hosts in all but address: own data dir (only admin.token lives there).
            e = {**env, "PKISVC_DATA_DIR": str(tmp_path / f"host{i}")}
            services.append((start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind",
                                    f"127.0.0.1:{port}", "--workers", "2"], e, port),
                             f"http://127.0.0.1:{port}"))
        # Both started on an empty store and raced to initialise it: one version 1.
        settings = Settings.load(env={}, overrides=overrides)
        backend = VaultBackend.from_settings(settings)
        assert [r.operation for r in backend.versions()] == ["init"]
        token = (tmp_path / "host0" / "admin.token").read_text().strip()

        def rotate(i: int) -> tuple[int, dict]:
            url = services[i % 2][1]
            r = requests.post(f"{url}/v1/ca/rotate", json={"reason": f"r{i}"},
                              headers={"Authorization": f"Bearer {token}"}, timeout=120)
            return r.status_code, r.json()

        with ThreadPoolExecutor(max_workers=30) as pool:
            answers = list(pool.map(rotate, range(30)))
        assert all(status == 201 for status, _ in answers), answers
        assert sorted(doc["version"] for _, doc in answers) == list(range(2, 32))
        # head moves after the answers, within HEAD_MAX_DELAY and a write (README)
        wait_for(lambda: backend.latest() == 31, 30, "head on the last version")
        records = backend.versions()
        assert [r.version for r in records] == list(range(1, 32))
        assert sorted(r.reason for r in records[1:]) == sorted(f"r{i}" for i in range(30))
        for r in records:
            pki.check_set(parse_files(backend.read(r.version).files))
        events = [e for e in backend.audit(limit=1000) if e.action == "rotate-ca"]
        assert sorted(e.version for e in events) == list(range(2, 32))
    finally:
        for proc, _ in services:
            stop(proc)
