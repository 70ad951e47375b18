"""Reads within `vault.version_ttl`, answers held in memory through an outage ([O]).

Two `pkisvc serve` replicas on one OpenBao: a version written through one is served by the
other within the bound, a revoked token is refused by both within it, and with
`version_ttl: 0` both at once.  With OpenBao stopped the trust bundle, certificates and
pillar revalidations are answered from memory, marked stale; changes are refused and write
nothing; once OpenBao is back the answers are fresh again within the bound.
"""
from __future__ import annotations

import sys
import time

import pytest
import requests

from pkisvc.app import create_app
from pkisvc.backends.vault import VaultBackend
from tests.conftest import clean_env, free_port, make_settings, run_cli, start, stop, wait_for
from tests.openbao import OpenBao, PersistentOpenBao

pytestmark = pytest.mark.vault

# Added to every bound: a shared 2-core machine under other suites' load.
SLACK = 15.0
FRESH = {"Connection": "close"}  # a new connection each time: requests spread over workers


def serve_on(openbao, cluster, data, **settings: str):
    """`pkisvc serve` (2 workers) on the vault backend; return (process, url)."""
    port = free_port()
    env = clean_env(PKISVC_BACKEND="vault", PKISVC_CLUSTER=cluster, PKISVC_DATA_DIR=str(data),
                    PKISVC_VAULT__ADDR=openbao.addr, PKISVC_VAULT__TOKEN=openbao.token,
                    PKISVC_KEY_TYPE="ecdsa-p256",
                    **{f"PKISVC_VAULT__{k.upper()}": v for k, v in settings.items()})
    proc = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
                  "--workers", "2"], env, port)
    return proc, f"http://127.0.0.1:{port}", env


def versions_served(url, token, n=8):
    """The versions `GET /v1/certs/server` answers over n new connections (401: None)."""
    out = set()
    for _ in range(n):
        r = requests.get(f"{url}/v1/certs/server", timeout=10,
                         headers={**FRESH, "Authorization": f"Bearer {token}"})
        assert r.status_code in (200, 401), r.text
        out.add(r.json()["version"] if r.status_code == 200 else None)
    return out


@pytest.mark.parametrize("ttl", ["500ms", "0"])
def test_replicas_serve_a_version_and_refuse_a_revoked_token_within_version_ttl(
        openbao, tmp_path, ttl):
    cluster = openbao.settings_overrides()["cluster"]
    a = b = None
    try:
        a, url_a, env = serve_on(openbao, cluster, tmp_path / "a", version_ttl=ttl)
        b, url_b, _ = serve_on(openbao, cluster, tmp_path / "b", version_ttl=ttl)
        bound = 0.5 if ttl == "500ms" else 0.0
        admin = {"Authorization": f"Bearer {(tmp_path / 'a' / 'admin.token').read_text().strip()}"}
        reader = run_cli("token", "create", "reader", "--scope", "read", env=env)
        assert reader.returncode == 0, reader.stderr
        token = reader.stdout.strip()
        # A token made elsewhere is known everywhere within the bound.
        wait_for(lambda: versions_served(url_a, token) | versions_served(url_b, token) == {1},
                 bound + SLACK, "the new token on both replicas")

        with requests.Session() as writer:  # one kept-alive connection: one worker of A
            r = writer.post(f"{url_a}/v1/certs/server/rotate", headers=admin, timeout=60)
            written = time.monotonic()
            assert r.status_code == 201, r.text
            assert r.json()["version"] == 2
            # The worker that made the change serves it at once.
            r = writer.get(f"{url_a}/v1/certs/server",
                           headers={"Authorization": f"Bearer {token}"}, timeout=10)
            assert r.json()["version"] == 2
        if bound == 0:
            assert versions_served(url_b, token) == {2}  # at once, every worker of B
            assert versions_served(url_a, token) == {2}
        else:
            wait_for(lambda: versions_served(url_b, token) | versions_served(url_a, token)
                     == {2}, written + bound + SLACK - time.monotonic(), "version 2 on both")

        revoked = run_cli("token", "revoke", "reader", env=env)
        assert revoked.returncode == 0, revoked.stderr
        done = time.monotonic()
        if bound == 0:
            assert versions_served(url_a, token) | versions_served(url_b, token) == {None}
        else:
            wait_for(lambda: versions_served(url_a, token) | versions_served(url_b, token)
                     == {None}, done + bound + SLACK - time.monotonic(),
                     "the revocation on both replicas")
    finally:
        for proc in (a, b):
            if proc is not None:
                stop(proc)


def test_openbao_stopped_answers_from_memory_marked_stale_and_refuses_changes(tmp_path):
    server = PersistentOpenBao(tmp_path / "openbao")  # its own: this test stops it
    proc = None
    try:
        proc, url, env = serve_on(server, "outage", tmp_path / "data")
        admin = {"Authorization":
                 f"Bearer {(tmp_path / 'data' / 'admin.token').read_text().strip()}"}
        master = run_cli("token", "create", "salt-master", "--scope", "secrets", env=env)
        assert master.returncode == 0, master.stderr
        secrets_h = {"Authorization": f"Bearer {master.stdout.strip()}"}
        pillar = f"{url}/v1/pillar/k8s-master-1?role=master"
        first = wait_for(lambda: (lambda r: r if r.status_code == 200 else None)(
            requests.get(pillar, headers={**FRESH, **secrets_h}, timeout=10)),
            SLACK, "the master's token")
        etag = first.headers["ETag"]
        bundle = requests.get(f"{url}/v1/ca.pem", timeout=10)
        assert bundle.status_code == 200 and "PKISVC-Stale" not in bundle.headers
        # Both workers hold the token (a revalidation on each before Vault goes): a worker
        # that last read the tokens within vault.version_ttl may not know it yet.
        wait_for(lambda: all(
            requests.get(pillar, headers={**FRESH, **secrets_h, "If-None-Match": etag},
                         timeout=10).status_code == 304 for _ in range(8)),
            SLACK, "both workers to revalidate with the new token")

        backend = VaultBackend(server.addr, cluster="outage", token=server.token)
        events = backend.audit()
        server.stop()  # by PID

        def stale_everywhere():
            answers = [requests.get(f"{url}/v1/ca.pem", headers=FRESH, timeout=10)
                       for _ in range(8)]
            return all(r.status_code == 200 and "PKISVC-Stale" in r.headers for r in answers)
        wait_for(stale_everywhere, 0.5 + SLACK, "stale answers from both workers")
        for _ in range(8):
            r = requests.get(f"{url}/v1/ca.pem", headers=FRESH, timeout=10)
            assert (r.status_code, r.content, r.headers["ETag"]) == (
                200, bundle.content, bundle.headers["ETag"])
            assert int(r.headers["PKISVC-Stale"]) >= 0
            r = requests.get(pillar, headers={**FRESH, **secrets_h, "If-None-Match": etag},
                             timeout=10)
            assert r.status_code == 304 and "PKISVC-Stale" in r.headers
        r = requests.get(f"{url}/v1/ca", timeout=10)
        assert r.status_code == 200 and r.json()["pem"] == bundle.text
        # Keys leave only with their delivery recorded, and changes wait for Vault: 503.
        r = requests.get(pillar, headers=secrets_h, timeout=10)
        assert (r.status_code, r.json()["error"]) == (503, "backend_unavailable")
        r = requests.post(f"{url}/v1/ca/rotate", headers=admin, timeout=60)
        assert (r.status_code, r.json()["error"]) == (503, "backend_unavailable")
        assert requests.get(f"{url}/v1/health", timeout=10).status_code == 503
        metrics = requests.get(f"{url}/metrics", timeout=10).text
        assert 'pkisvc_stale_answers_total{endpoint="/v1/ca.pem"}' in metrics

        server.start()  # same storage, same port, unsealed again
        back = time.monotonic()
        assert backend.latest() == 1  # the refused rotation wrote nothing
        assert backend.audit() == events

        def fresh_everywhere():
            answers = [requests.get(f"{url}/v1/ca.pem", headers=FRESH, timeout=10)
                       for _ in range(8)]
            return all(r.status_code == 200 and "PKISVC-Stale" not in r.headers
                       for r in answers)
        wait_for(fresh_everywhere, back + 0.5 + SLACK - time.monotonic(), "fresh answers")
        r = requests.post(f"{url}/v1/ca/rotate", headers=admin, timeout=60)
        assert r.status_code == 201 and r.json()["version"] == 2
    finally:
        if proc is not None:
            stop(proc)
        server.stop()


def test_memory_outlives_an_outage_only_for_stale_for(tmp_path):
    server = OpenBao(tmp_path / "openbao")  # its own: this test stops it
    try:
        apps = {}
        for stale_for in ("0", "8"):
            settings = make_settings(tmp_path / f"data{stale_for}", cluster="stale-for",
                                     **{"backend": "vault", "vault.addr": server.addr,
                                        "vault.token": server.token,
                                        "vault.stale_for": stale_for})
            apps[stale_for] = create_app(settings).test_client()
        for client in apps.values():
            assert client.get("/v1/ca.pem").status_code == 200
        server.stop()
        r = apps["8"].get("/v1/ca.pem")
        assert r.status_code == 200  # fresh (within the bound) or stale, not refused
        wait_for(lambda: "PKISVC-Stale" in apps["8"].get("/v1/ca.pem").headers, SLACK,
                 "a stale answer")
        # stale_for 0: today's strict answer once the bound has passed.
        wait_for(lambda: apps["0"].get("/v1/ca.pem").status_code == 503, SLACK, "a 503")
        # ... and once what it holds is older than stale_for, a 503 there too.
        wait_for(lambda: apps["8"].get("/v1/ca.pem").status_code == 503, 8 + SLACK, "a 503")
    finally:
        server.stop()
