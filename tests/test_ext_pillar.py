"""The `pkisvc` ext_pillar called as Salt calls it, against a real pkisvc under gunicorn."""
from __future__ import annotations

import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pkisvc.ext_pillar import pkisvc as ext
from tests.salt_fixtures import ROLES, Service

HOST_FILES = ["ca.crt", "kubecfg.crt", "kubecfg.key", "sa.key", "sa.pub", "server.cert",
              "server.key"]


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    s = Service(tmp_path_factory.mktemp("pkisvc")).start()
    yield s
    s.stop()


def conf(service: Service, **extra: Any) -> dict[str, Any]:
    return {"url": service.url, "token_file": str(service.token_file), "roles": ROLES,
            **extra}


def pillar_deliveries(service: Service) -> list[dict[str, Any]]:
    r = requests.get(f"{service.url}/v1/audit?limit=1000", headers=service.admin(), timeout=10)
    return [e for e in r.json()["events"] if e["action"] == "pillar"]


def test_the_role_comes_from_the_minion_id_never_from_grains(service: Service):
    as_node = ext.ext_pillar("k8s-node-7", {"grains": {"k8s_role": "master"}}, **conf(service))
    assert list(as_node["kubernetes"]["cert"]["files"]) == ["ca.crt"]
    assert ext.ext_pillar("db-1", {}, **conf(service)) == {}


def test_answers_are_cached_by_version_and_follow_a_rotation(service: Service):
    before = len(pillar_deliveries(service))
    first = ext.ext_pillar("k8s-master-1", {}, **conf(service))["kubernetes"]["cert"]
    second = ext.ext_pillar("k8s-master-2", {}, **conf(service))["kubernetes"]["cert"]
    assert first == second and first is not second
    # The second answer was a 304: only the first carried key material, yet both minions are
    # audited by id, the second with no items.
    new = pillar_deliveries(service)[: len(pillar_deliveries(service)) - before]
    assert [(e["minion"], len(e["items"])) for e in new] == [("k8s-master-2", 0),
                                                            ("k8s-master-1", len(HOST_FILES))]
    second["files"]["server.key"] = "changed by a later ext_pillar merge"
    third = ext.ext_pillar("k8s-master-3", {}, **conf(service))["kubernetes"]["cert"]
    assert third["files"] == first["files"]
    version = service.rotate_ca()
    rotated = ext.ext_pillar("k8s-master-1", {}, **conf(service))["kubernetes"]["cert"]
    assert rotated["version"] == version
    assert rotated["fingerprints"]["server.cert"] != first["fingerprints"]["server.cert"]


def test_eight_threads_across_a_rotation_never_see_a_half_set(service: Service):
    """As a master with 8 worker threads: every answer is one whole, consistent version."""
    start = service.fingerprints()["version"]

    def ask(i: int) -> tuple[str, dict[str, Any]]:
        minion = f"k8s-master-{i}" if i % 2 else f"k8s-node-{i}"
        return minion, ext.ext_pillar(minion, {}, **conf(service))

    with ThreadPoolExecutor(max_workers=8) as pool:
        futures = [pool.submit(ask, i) for i in range(400)]
        rotated = service.rotate_ca()
        answers = [f.result() for f in futures]
    seen = set()
    for minion, out in answers:
        cert = out["kubernetes"]["cert"]
        assert "error" not in cert, cert
        seen.add(cert["version"])
        expected = HOST_FILES if minion.startswith("k8s-master") else ["ca.crt"]
        assert sorted(cert["files"]) == expected
        for name, fp in cert["fingerprints"].items():
            pem = cert["files"][name].encode()
            assert x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex() == fp
    assert seen <= {start, rotated}
    after = ext.ext_pillar("k8s-master-1", {}, **conf(service))["kubernetes"]["cert"]
    assert after["version"] == rotated


def test_a_refused_token_is_an_error_that_never_shows_the_token(service: Service,
                                                                 tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture):
    bad = tmp_path / "token"
    bad.write_text("pks_not-a-real-token-but-secret\n")
    out = ext.ext_pillar("k8s-master-1", {}, **conf(service, token_file=str(bad)))
    error = out["kubernetes"]["cert"]["error"]
    assert "401" in error and "pks_not" not in error
    assert "pks_not" not in caplog.text and "k8s-master-1" in caplog.text


def test_bad_options_are_errors_not_exceptions(service: Service):
    typo = ext.ext_pillar("k8s-master-1", {}, **conf(service), tiemout=3)
    assert "tiemout" in typo["kubernetes"]["cert"]["error"]
    bad_timeout = ext.ext_pillar("k8s-master-1", {}, **conf(service, timeout="soon"))
    assert "timeout" in bad_timeout["kubernetes"]["cert"]["error"]
    no_roles = ext.ext_pillar("k8s-master-1", {}, **conf(service, roles=None))
    assert "roles" in no_roles["kubernetes"]["cert"]["error"]
    other_key = ext.ext_pillar("k8s-node-1", {}, **conf(service, pillar_key="k8s",
                                                       token_file="/nonexistent"))
    assert set(other_key) == {"k8s"} and "/nonexistent" in other_key["k8s"]["cert"]["error"]


def test_a_silent_peer_times_out(tmp_path: Path):
    with socket.socket() as s:  # listens, never answers
        s.bind(("127.0.0.1", 0))
        s.listen(8)
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
        token = tmp_path / "token"
        token.write_text("pks_x\n")
        out = ext.ext_pillar("k8s-node-1", {}, url=url, token_file=str(token), roles=ROLES,
                             timeout=0.3)
    assert out == {"kubernetes": {"cert": {"error": f"pkisvc at {url}: timed out"}}}


@pytest.mark.parametrize(("status", "body", "words"), [
    (502, b"<html>bad gateway</html>", "answered 502"),
    (200, b"<html>a login page</html>", "not JSON"),
    (200, b'{"version": 3, "role": "node", "files": {}}', "without a complete set"),
])
def test_a_broken_proxy_in_front_of_pkisvc_is_an_error(tmp_path: Path, status: int,
                                                       body: bytes, words: str):
    class Proxy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Proxy)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        token = tmp_path / "token"
        token.write_text("pks_x\n")
        out = ext.ext_pillar("k8s-node-1", {}, url=f"http://127.0.0.1:{server.server_port}",
                             token_file=str(token), roles=ROLES)
    finally:
        server.shutdown()
        server.server_close()
    assert list(out["kubernetes"]["cert"]) == ["error"]
    assert words in out["kubernetes"]["cert"]["error"]


def test_https_service_is_verified_with_ca_cert(tmp_path):
    """The ext_pillar against `pkisvc serve --self-tls`: trusted through ca_cert, refused
    (as a pillar error, never an exception) without it."""
    import sys

    from tests.conftest import clean_env, free_port, start, stop
    port = free_port()
    data = tmp_path / "data"
    ca_file = data / "tls" / "ca.crt"
    p = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--workers", "1", "--self-tls"],
              clean_env(PKISVC_DATA_DIR=str(data), PKISVC_KEY_TYPE="ecdsa-p256"), port,
              scheme="https", verify=str(ca_file))
    try:
        opts = {"url": f"https://127.0.0.1:{port}", "token_file": str(data / "admin.token"),
                "roles": ROLES}
        good = ext.ext_pillar("k8s-master-1", {}, ca_cert=str(ca_file), **opts)
        assert set(good["kubernetes"]["cert"]["files"]) == set(HOST_FILES)
        bad = ext.ext_pillar("k8s-master-2", {}, **opts)  # the system trust store only
        assert set(bad["kubernetes"]["cert"]) == {"error"}
        assert "certificate" in bad["kubernetes"]["cert"]["error"].lower()
        assert "PRIVATE KEY" not in bad["kubernetes"]["cert"]["error"]
    finally:
        stop(p)
