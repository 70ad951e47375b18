"""The service as users run it: gunicorn with several workers, the README walkthrough, TLS."""
import http.client
import json
import os
import re
import stat
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest
import requests

from pkisvc import pki
from pkisvc.backends.files import FilesBackend
from pkisvc.changes import parse_files
from pkisvc.store import CertStore
from tests.conftest import (
    REPO,
    clean_env,
    free_port,
    make_settings,
    serve,
    start,
    stop,
    wait_for,
)


@pytest.fixture
def service(tmp_path):
    """`pkisvc serve` with 2 workers on a free port; yields (base url, data dir)."""
    data = tmp_path / "pkisvc-data"
    p, url = serve(data)
    yield url, data
    stop(p)


def admin(data):
    return {"Authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}


def test_fifty_concurrent_rotations_are_gapless(service):
    url, data = service
    h = admin(data)

    def rotate(i):
        r = requests.post(f"{url}/v1/ca/rotate", json={"reason": f"r{i}"}, headers=h, timeout=60)
        return r.status_code, r.json()

    with ThreadPoolExecutor(max_workers=50) as pool:
        answers = list(pool.map(rotate, range(50)))
    assert all(status == 201 for status, _ in answers), answers
    acked = sorted(doc["version"] for _, doc in answers)
    assert acked == list(range(2, 52))
    backend = FilesBackend(data)
    assert [r.version for r in backend.versions()] == list(range(1, 52))
    for v in range(1, 52):
        pki.check_set(parse_files(backend.read(v).files))
    events = [e for e in backend.audit(limit=10000) if e.action == "rotate-ca"]
    assert sorted(e.version for e in events) == list(range(2, 52))
    assert {e.reason for e in events} == {f"r{i}" for i in range(50)}


def test_revoked_token_is_refused_by_every_worker(service):
    url, data = service
    token = subprocess.run([sys.executable, "-m", "pkisvc.cli", "token", "create", "grafana",
                            "--scope", "read"], capture_output=True, text=True, check=True,
                           env=clean_env(PKISVC_DATA_DIR=str(data))).stdout
    assert re.fullmatch(r"pks_\S+\n", token)
    h = {"Authorization": f"Bearer {token.strip()}", "Connection": "close"}
    # New connections spread over both workers.
    assert {requests.get(f"{url}/v1/versions", headers=h, timeout=5).status_code
            for _ in range(12)} == {200}
    subprocess.run([sys.executable, "-m", "pkisvc.cli", "token", "revoke", "grafana"],
                   check=True, capture_output=True, env=clean_env(PKISVC_DATA_DIR=str(data)))
    assert {requests.get(f"{url}/v1/versions", headers=h, timeout=5).status_code
            for _ in range(12)} == {401}


def test_metrics_agree_across_workers(service):
    url, data = service
    requests.post(f"{url}/v1/ca/rotate", headers=admin(data), timeout=30)
    bodies = {requests.get(f"{url}/metrics", headers={"Connection": "close"},
                           timeout=5).text for _ in range(8)}
    for text in bodies:
        assert 'pkisvc_generation{cluster="default"} 2.0' in text
        assert re.search(r'pkisvc_http_requests_total\{endpoint="/v1/ca/rotate",method="POST",'
                         r'status="201"\} 1\.0', text)


def walkthrough():
    readme = (REPO / "README.md").read_text()
    block = re.search(r"<!-- walkthrough:.*?-->\n```sh\n(.*?)```\n<!-- /walkthrough -->",
                      readme, re.S)
    assert block, "README lost its walkthrough block"
    return block.group(1)


def test_readme_walkthrough_works_verbatim(service, tmp_path):
    url, data = service
    port = url.rsplit(":", 1)[1]
    script = walkthrough().replace("127.0.0.1:8800", f"127.0.0.1:{port}")
    # The README runs from the checkout, where `make run` keeps ./pkisvc-data.
    r = subprocess.run(["bash", "-c", script], cwd=data.parent, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert '"status":"ok"' in r.stdout.replace(" ", "")
    assert (data.parent / "ca.crt").read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")
    backend = FilesBackend(data)
    assert [(v.version, v.operation) for v in backend.versions()] == [
        (1, "init"), (2, "rotate-ca"), (3, "rotate-kubecfg"), (4, "rollback")]
    assert backend.read(4).files == backend.read(1).files
    assert "pkisvc_certificate_expiration_timestamp_seconds" in r.stdout
    # The answer the README shows beside the health check has the fields the service sends.
    shown = re.search(r"/v1/health +# (\{.*\})$", script, re.M)
    assert shown, "the walkthrough's health line lost the answer it shows"
    answer = json.loads(r.stdout.splitlines()[0])
    assert set(json.loads(shown.group(1).replace("{…}", "{}"))) == set(answer)


def test_tls(tmp_path):
    now = datetime.now(UTC)
    ca_key, key = pki.generate_key("ecdsa-p256"), pki.generate_key("ecdsa-p256")
    ca = pki.make_ca(pki.Profile("ca", "api-ca", 30), ca_key, now=now)
    cert = pki.issue(pki.Profile("server", "pkisvc", 30, sans=("127.0.0.1",)), ca, ca_key, key,
                     now=now)
    (tmp_path / "ca.pem").write_bytes(pki.cert_pem(ca))
    (tmp_path / "tls.crt").write_bytes(pki.cert_pem(cert))
    (tmp_path / "tls.key").write_bytes(pki.key_pem(key))
    port = free_port()
    env = clean_env(PKISVC_DATA_DIR=str(tmp_path / "data"), PKISVC_KEY_TYPE="ecdsa-p256",
                    PKISVC_TLS__CERT=str(tmp_path / "tls.crt"),
                    PKISVC_TLS__KEY=str(tmp_path / "tls.key"))
    p = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--workers", "1"], env, port, scheme="https", verify=str(tmp_path / "ca.pem"))
    try:
        r = requests.get(f"https://127.0.0.1:{port}/v1/ca", verify=str(tmp_path / "ca.pem"),
                         timeout=5)
        assert r.status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{port}/v1/ca", timeout=5)
    finally:
        stop(p)


def _server_side_owner(server_port, client_port, workers):
    """The worker PID holding the server end of the connection from client_port."""
    inode = None
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in open(table).read().splitlines()[1:]:
            f = line.split()
            if (int(f[1].rsplit(":", 1)[1], 16), int(f[2].rsplit(":", 1)[1], 16)) == (
                    server_port, client_port):
                inode = f[9]
    for w in workers:
        for fd in os.listdir(f"/proc/{w}/fd"):
            try:
                if os.readlink(f"/proc/{w}/fd/{fd}") == f"socket:[{inode}]":
                    return w
            except FileNotFoundError:
                continue
    return None


def test_a_revoked_token_is_refused_at_once_by_each_of_four_workers(tmp_path):
    """Warm keep-alive connections pinned to every one of 4 workers, then a revocation."""
    port = free_port()
    data = tmp_path / "data"
    p = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--workers", "4"], clean_env(PKISVC_DATA_DIR=str(data),
                                            PKISVC_KEY_TYPE="ecdsa-p256"), port)
    try:
        settings = make_settings(data)
        store = CertStore(FilesBackend(data), settings)
        token = store.create_token("grafana", ["read"], actor="test")
        h = {"Authorization": f"Bearer {token}"}
        workers = wait_for(lambda: (lambda w: w if len(w) == 4 else None)(
            [int(w) for w in open(f"/proc/{p.pid}/task/{p.pid}/children").read().split()]),
            60, "four workers")

        def pin_one():
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
            c.request("GET", "/v1/versions", headers=h)
            r = c.getresponse()
            r.read()
            assert r.status == 200
            return c, _server_side_owner(port, c.sock.getsockname()[1], workers)

        # Every worker must have booted (it accepts only then) before connections are pinned:
        # gthread drops a connection idle for 2 s, so the pinning itself must be quick.
        booted = set()
        deadline = time.monotonic() + 90
        while booted != set(workers):
            assert time.monotonic() < deadline, booted
            c, owner = pin_one()
            booted.add(owner)
            c.close()
        conns, owners = [], {}
        while set(owners.values()) != set(workers):  # new connections until each worker has one
            assert len(conns) < 400, owners
            c, owner = pin_one()
            conns.append(c)
            owners[c] = owner
        store.revoke_token("grafana", actor="test")
        refused_by = set()
        for c in conns:  # the same warm connections, the same workers: refused everywhere
            try:
                for path in ("/v1/versions", "/v1/certs/server"):  # Flask and the fast path
                    c.request("GET", path, headers=h)
                    r = c.getresponse()
                    assert r.status == 401, (path, r.read())
                    r.read()
            except (http.client.RemoteDisconnected, ConnectionError):
                continue  # idle past gunicorn's keep-alive on a very busy machine
            assert _server_side_owner(port, c.sock.getsockname()[1], workers) == owners[c]
            refused_by.add(owners[c])
        assert refused_by == set(workers)
    finally:
        stop(p)


def test_self_tls_serves_https_with_a_certificate_from_the_store(tmp_path):
    port = free_port()
    data = tmp_path / "data"
    env = clean_env(PKISVC_DATA_DIR=str(data), PKISVC_KEY_TYPE="ecdsa-p256")
    ca_file = data / "tls" / "ca.crt"
    p = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--workers", "2", "--self-tls"], env, port, scheme="https", verify=str(ca_file))
    try:
        r = requests.get(f"https://127.0.0.1:{port}/v1/ca", verify=str(ca_file), timeout=5)
        assert r.status_code == 200
        with pytest.raises(requests.exceptions.SSLError):
            requests.get(f"https://127.0.0.1:{port}/v1/ca", timeout=5)
    finally:
        stop(p)
    assert stat.S_IMODE((data / "tls").stat().st_mode) == 0o700
    for name in ("tls.crt", "tls.key", "ca.crt"):
        assert stat.S_IMODE((data / "tls" / name).stat().st_mode) == 0o600
    backend = FilesBackend(data)
    cert = pki.load_cert((data / "tls" / "tls.crt").read_bytes(), "tls.crt")
    ca = pki.load_cert(backend.read().files["ca.crt"], "ca.crt")
    assert cert.issuer == ca.subject and pki.issuer_among(cert, [ca]) is ca
    assert [e.action for e in backend.audit() if e.action == "self-tls"] == ["self-tls"]
    assert ca_file.read_bytes() == backend.read().files["trust.crt"]
