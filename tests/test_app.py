"""The application factory, the first endpoints, and the service run as users run it."""
import sys

import pytest
import requests

from pkisvc.app import create_app
from pkisvc.backends.files import FilesBackend
from tests.conftest import clean_env, free_port, make_settings, start, stop, wait_for


@pytest.fixture
def client(settings):
    return create_app(settings).test_client()


def test_factory_initialises_an_empty_store(settings):
    app = create_app(settings)
    assert app.extensions["pkisvc"].latest() == 1
    assert FilesBackend(settings.data_dir).latest() == 1


def test_factory_can_leave_the_store_empty(tmp_path):
    settings = make_settings(tmp_path / "data", auto_init=False)
    r = create_app(settings).test_client().get("/v1/ca")
    assert r.status_code == 404
    assert r.get_json()["error"] == "not_found"


def test_health(client):
    r = client.get("/v1/health")
    assert r.status_code == 200
    body = r.get_json()
    assert {k: body[k] for k in ("status", "backend", "version")} == {
        "status": "ok", "backend": "ok", "version": 1}
    # The audit chain as the check at start found it (null until that check is done).
    checked = wait_for(lambda: client.get("/v1/health").get_json()["audit_chain"]["ok"]
                       is not None and client.get("/v1/health").get_json()["audit_chain"])
    assert checked["ok"] is True and checked["first_break"] is None


def test_health_with_the_backend_down(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("not a directory")
    settings = make_settings(blocker, auto_init=False)
    r = create_app(settings).test_client().get("/v1/health")
    assert r.status_code == 503
    assert r.get_json()["status"] == "degraded" and r.get_json()["backend"] == "down"


def test_ca_is_the_trust_bundle(client, settings):
    data = client.get("/v1/ca").get_json()
    gen = FilesBackend(settings.data_dir).read()
    assert data["version"] == 1
    assert data["pem"].encode() == gen.files["trust.crt"]
    pem = client.get("/v1/ca.pem")
    assert pem.data == gen.files["trust.crt"] and pem.headers["ETag"] == '"1"'
    assert b"PRIVATE KEY" not in pem.data


def test_errors_are_json(client):
    r = client.get("/v1/nope")
    assert r.status_code == 404 and r.get_json()["error"] == "not_found"
    r = client.post("/v1/health")
    assert r.status_code == 405 and r.get_json()["error"] == "method_not_allowed"


def test_pkisvc_serve_runs_gunicorn(tmp_path):
    port = free_port()
    env = clean_env(PKISVC_DATA_DIR=str(tmp_path / "data"), PKISVC_KEY_TYPE="ecdsa-p256")
    p = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--workers", "2"], env, port)
    try:
        for _ in range(10):  # several connections, so both workers answer
            r = requests.get(f"http://127.0.0.1:{port}/v1/ca", timeout=5)
            assert r.status_code == 200 and r.json()["version"] == 1
    finally:
        stop(p)
    assert p.returncode is not None


def test_plain_gunicorn_behaves_the_same(tmp_path):
    port = free_port()
    env = clean_env(PKISVC_DATA_DIR=str(tmp_path / "data"), PKISVC_KEY_TYPE="ecdsa-p256")
    p = start([sys.executable, "-m", "gunicorn", "--no-control-socket", "-w", "2", "-b",
               f"127.0.0.1:{port}", "pkisvc.app:create_app()"], env, port)
    try:
        assert requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5).json()[
            "version"] == 1
    finally:
        stop(p)


@pytest.mark.slow
def test_make_run_serves_health(tmp_path):
    port = free_port()
    env = clean_env()
    p = start(["make", "--no-print-directory", "run", f"BIND=127.0.0.1:{port}",
               f"DATA_DIR={tmp_path / 'data'}"], env, port)
    try:
        r = requests.get(f"http://127.0.0.1:{port}/v1/health", timeout=5)
        assert r.status_code == 200 and r.json()["status"] == "ok"
    finally:
        stop(p)
    assert (tmp_path / "data" / "current").read_text() == "1\n"
