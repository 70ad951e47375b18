"""The service-account key pair ([M], issue 16): sa.key signs, sa.pub verifies.

A verifier that is not ours decides: go-jose (tests/sa_verifier), the library kube-apiserver
checks tokens with, judges JWTs we sign with each version's sa.key against later sa.pub files.
"""
from __future__ import annotations

import base64
import json
import os
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from pkisvc import pki
from pkisvc.app import create_app
from pkisvc.backends.files import FilesBackend
from pkisvc.errors import Conflict, NotFound
from pkisvc.store import CertStore
from tests.conftest import make_settings, run_cli
from tests.sa_jwt import Verifier, build, sign
from tests.stored import gen_file, stored

T0 = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def verifier(tmp_path_factory: pytest.TempPathFactory) -> Verifier:
    work = tmp_path_factory.mktemp("sa-verifier")
    return Verifier(build(work), work)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def make_store(tmp_path: Path, **overrides: Any) -> tuple[CertStore, Clock]:
    clock = Clock()
    settings = make_settings(tmp_path / "data", **overrides)
    return CertStore(FilesBackend(tmp_path / "data"), settings, clock=clock), clock


def sa_files(store: CertStore, version: int | None = None) -> tuple[bytes, bytes]:
    files = store.read(version).files
    return files["sa.key"], files["sa.pub"]


def pub_fingerprints(sa_pub: bytes) -> list[str]:
    return [pki.key_fingerprint(k) for k in pki.load_public_keys(sa_pub, "sa.pub")]


# --- 1. every version's tokens against every later sa.pub -----------------------------------

@pytest.mark.parametrize("key_type, alg", [("rsa-2048", "RS256"), ("ecdsa-p256", "ES256")])
def test_tokens_verify_against_every_later_bundle_until_phase_3(tmp_path, verifier, key_type,
                                                                alg):
    store, clock = make_store(tmp_path, key_type=key_type, **{"sa.overlap": "2d"})
    store.init(actor="t")
    steps = [lambda: store.sa_step("start", actor="t"),
             lambda: store.rotate_leaf("server", actor="t"),
             lambda: store.sa_step("continue", actor="t"),
             lambda: store.start_rotation(actor="t"),  # a CA rotation open beside it
             lambda: store.continue_rotation(actor="t")]
    for step in steps:
        clock.now += timedelta(hours=1)
        step()
    with pytest.raises(Conflict, match="sa.overlap has not passed"):
        store.sa_step("finish", actor="t")
    clock.now += timedelta(days=2)
    finished = store.sa_step("finish", actor="t").version  # phase 3, no force needed now
    store.finish_rotation(actor="t")
    last = store.latest()
    assert last is not None

    first_key = sa_files(store, 1)[0]
    tokens = {v: sign(sa_files(store, v)[0]) for v in range(1, last + 1)}
    assert {_alg(t) for t in tokens.values()} == {alg}
    for later in range(1, last + 1):
        pub = sa_files(store, later)[1]
        mine = [v for v in tokens if v <= later]
        got = verifier.judge(pub, [tokens[v] for v in mine])
        for v, ok in zip(mine, got, strict=True):
            old_key = sa_files(store, v)[0] == first_key
            expected = not (old_key and later >= finished)
            assert ok == expected, (v, later, ok)
    # the bundle of phase 1 and 2 held both keys, then only the new one
    assert len(pub_fingerprints(sa_files(store, 2)[1])) == 2
    assert len(pub_fingerprints(sa_files(store, last)[1])) == 1
    assert pki.key_type_of(pki.load_key(sa_files(store, last)[0], "sa.key")) == key_type


def _alg(token: str) -> str:
    head = token.split(".")[0]
    return str(json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))["alg"])


# --- 2. certificate changes never touch the service-account key -----------------------------

def test_rotations_and_renewal_keep_tokens_verifying(tmp_path, verifier):
    store, clock = make_store(tmp_path)
    store.init(actor="t")
    sa_key, sa_pub = sa_files(store)
    token = sign(sa_key)
    assert verifier.verifies(sa_pub, token)
    changes = [lambda: store.rotate_leaf("server", actor="t"),
               lambda: store.rotate_leaf("kubecfg", actor="t"),
               lambda: store.rotate_ca(actor="t"),
               lambda: store.start_rotation(actor="t"),
               lambda: store.continue_rotation(actor="t"),
               lambda: store.finish_rotation(actor="t")]
    server_keys = {store.read().files["server.key"]}
    for change in changes:
        change()
        server_keys.add(store.read().files["server.key"])
        assert sa_files(store) == (sa_key, sa_pub)
        assert verifier.verifies(store.read().files["sa.pub"], token)
    assert len(server_keys) == 4  # init, rotate server, rotate ca, staged phase 2
    clock.now += timedelta(days=340)  # both leaves inside renew_before (30d of 365d)
    report, record = store.renew(actor="t")
    assert record is not None and {d["item"] for d in report["due"]} == {"server", "kubecfg"}
    assert sa_files(store) == (sa_key, sa_pub)
    assert verifier.verifies(sa_files(store)[1], token)


# --- 3. adoption: the server key was the signing key ------------------------------------------

def test_adopting_the_server_key_keeps_its_tokens_through_a_server_rotation(tmp_path, verifier):
    donor, _ = make_store(tmp_path / "donor", key_type="rsa-2048")
    donor.init(actor="t")
    gen = donor.read()
    names = ("ca.key", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key")
    files = {"ca.crt": gen.files["trust.crt"], **{n: gen.files[n] for n in names}}
    legacy = sign(files["server.key"])  # issued by a kube-up cluster: signed with server.key

    store, _ = make_store(tmp_path / "adopted")
    store.import_files(files, actor="t", sa_from_server_key=True)
    assert store.read().files["sa.key"] == pki.key_pem(pki.load_key(files["server.key"], "k"))
    store.rotate_leaf("server", actor="t")
    assert store.read().files["server.key"] != files["server.key"]
    assert verifier.verifies(store.read().files["sa.pub"], legacy)

    # then a staged rotation moves the cluster off the old TLS key without breaking it
    store.sa_step("start", actor="t")
    assert verifier.verifies(store.read().files["sa.pub"], legacy)
    store.sa_step("continue", actor="t")
    fresh = sign(store.read().files["sa.key"])
    assert verifier.judge(store.read().files["sa.pub"], [legacy, fresh]) == [True, True]


def test_import_takes_kubeadm_sa_files_from_the_directory(tmp_path, verifier):
    donor, _ = make_store(tmp_path / "donor")
    donor.init(actor="t")
    gen = donor.read()
    src = tmp_path / "pki"
    src.mkdir()
    for n in ("server.cert", "server.key", "kubecfg.crt", "kubecfg.key", "ca.key"):
        (src / n).write_bytes(gen.files[n])
    (src / "ca.crt").write_bytes(gen.files["trust.crt"])
    # kubeadm makes sa.key with openssl-compatible PKCS#1 and sa.pub as PKIX
    subprocess.run(["openssl", "genrsa", "-traditional", "-out", str(src / "sa.key"), "2048"],
                   check=True, capture_output=True)
    subprocess.run(["openssl", "rsa", "-in", str(src / "sa.key"), "-pubout", "-out",
                    str(src / "sa.pub")], check=True, capture_output=True)
    token = sign((src / "sa.key").read_bytes())
    data = tmp_path / "data"
    env = {"PKISVC_DATA_DIR": str(data), "PKISVC_KEY_TYPE": "ecdsa-p256"}
    p = run_cli("import", "--from-dir", str(src), env=env)
    assert p.returncode == 0, p.stderr
    store = CertStore(FilesBackend(data), make_settings(data))
    assert pub_fingerprints(store.read().files["sa.pub"]) == pub_fingerprints(
        (src / "sa.pub").read_bytes())
    assert verifier.verifies(store.read().files["sa.pub"], token)
    p = run_cli("show", "sa", "-o", "json", env=env)
    assert p.returncode == 0, p.stderr
    shown = json.loads(p.stdout)
    assert shown["present"] and shown["published"] == pub_fingerprints(
        (src / "sa.pub").read_bytes())

    # sa.pub that does not hold sa.key's public key is refused, nothing written
    other = tmp_path / "other.pub"
    other.write_bytes(pki.public_key_pem(pki.generate_key("rsa-2048")))
    p = run_cli("import", "--from-dir", str(src), "--sa-pub", str(other), env=env)
    assert p.returncode == 1 and p.stderr.strip() == (
        "error: sa.pub does not hold the public key of sa.key"), p.stderr
    assert store.latest() == 1


# --- 5. phase 3 waits for sa.overlap, unless forced (audited) --------------------------------

def test_finish_before_the_overlap_is_refused_and_forced_is_audited(tmp_path):
    app = create_app(make_settings(tmp_path / "data"))
    store = app.extensions["pkisvc"]
    admin = {"Authorization": f"Bearer {store.create_token('adm', ['admin'], actor='t')}"}
    client = app.test_client()
    r = client.post("/v1/sa/rotate", json={"mode": "staged"}, headers=admin)
    assert r.status_code == 201 and "warning" not in r.json
    assert r.json["operation"] == "sa-stage-publish"
    assert r.json["key_pairs"]["sa"]["next"] in r.json["key_pairs"]["sa"]["published"]
    r = client.post("/v1/sa/rotate/finish", headers=admin)
    assert r.status_code == 409 and "cannot finish" in r.json["message"]
    assert client.post("/v1/sa/rotate/continue", headers=admin).status_code == 201
    state = client.get("/v1/sa/rotation", headers=admin).json
    assert state["phase"] == 2 and state["next"] == "finish"
    assert 0 < state["overlap_left_seconds"] <= 7 * 86400 == state["overlap_seconds"]

    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'pkisvc_sa_rotation_phase{cluster="default"} 2.0' in metrics
    assert 'pkisvc_sa_published_keys{cluster="default"} 2.0' in metrics
    r = client.post("/v1/sa/rotate/finish", json={"reason": "too soon"}, headers=admin)
    assert r.status_code == 409 and r.json["error"] == "conflict"
    message = r.json["message"]
    assert "\n" not in message and message.startswith("sa.overlap has not passed")
    assert "force" in message
    assert store.read().files["sa.pub"].count(b"BEGIN PUBLIC KEY") == 2

    r = client.post("/v1/sa/rotate/finish", json={"force": True, "reason": "key leaked"},
                    headers=admin)
    assert r.status_code == 201, r.json
    assert store.read().files["sa.pub"].count(b"BEGIN PUBLIC KEY") == 1
    event = store.audit(limit=1)[0]
    assert event.action == "sa-stage-finish" and event.items == ("sa",)
    assert event.reason.startswith("forced before sa.overlap") and "key leaked" in event.reason
    assert client.get("/v1/sa/rotation", headers=admin).json["open"] is False
    metrics = client.get("/metrics").get_data(as_text=True)
    assert 'pkisvc_sa_rotation_phase{cluster="default"} 0.0' in metrics
    assert 'pkisvc_sa_published_keys{cluster="default"} 1.0' in metrics
    assert 'pkisvc_rotations_total{cluster="default",operation="sa-stage-finish"} 1.0' in metrics


def test_immediate_rotation_replaces_the_key_and_says_what_breaks(tmp_path, verifier):
    data = tmp_path / "data"
    env = {"PKISVC_DATA_DIR": str(data), "PKISVC_KEY_TYPE": "ecdsa-p256"}
    assert run_cli("init", env=env).returncode == 0
    store = CertStore(FilesBackend(data), make_settings(data))
    old = sign(sa_files(store)[0])
    p = run_cli("rotate", "sa", env=env)
    assert p.returncode == 0, p.stderr
    assert "stops verifying" in p.stderr
    assert verifier.verifies(sa_files(store)[1], old) is False
    assert verifier.verifies(sa_files(store)[1], sign(sa_files(store)[0]))
    p = run_cli("versions", env=env)
    assert p.returncode == 0 and "sa-rotate" in p.stdout and " SA " in p.stdout

    app = create_app(make_settings(data))
    admin = {"Authorization": f"Bearer {store.create_token('adm', ['admin'], actor='t')}"}
    before = sign(sa_files(store)[0])
    r = app.test_client().post("/v1/sa/rotate", json={"reason": "leaked"}, headers=admin)
    assert r.status_code == 201 and "stops verifying" in r.json["warning"]
    assert r.json["operation"] == "sa-rotate"
    assert verifier.verifies(sa_files(store)[1], before) is False


# --- 6. a certificate rollback keeps the service-account material ------------------------------

def test_rollback_keeps_sa_material_and_abort_is_its_way_back(tmp_path, verifier):
    store, clock = make_store(tmp_path)
    store.init(actor="t")
    store.rotate_leaf("server", actor="t")
    store.sa_step("start", actor="t")
    phase1 = sa_files(store)
    store.rollback(1, actor="t")
    assert sa_files(store) == phase1
    assert store.sa_rotation()["phase"] == 1
    store.sa_step("continue", actor="t")
    phase2 = sa_files(store)
    token = sign(phase2[0])
    store.rollback(2, actor="t")
    assert sa_files(store) == phase2 and store.sa_rotation()["phase"] == 2
    assert verifier.verifies(sa_files(store)[1], token)
    with pytest.raises(Conflict, match="cannot abort"):
        store.sa_step("abort", actor="t")
    # an open service-account rotation blocks neither renewal nor a certificate rotation
    clock.now += timedelta(days=340)
    assert store.renew(actor="t")[1] is not None
    store.rotate_leaf("server", actor="t")
    assert sa_files(store) == phase2 and store.sa_rotation()["phase"] == 2

    other, _ = make_store(tmp_path / "other")
    other.init(actor="t")
    before = sa_files(other)
    other.sa_step("start", actor="t")
    other.sa_step("abort", actor="t")
    assert sa_files(other) == before and other.sa_rotation()["open"] is False
    with pytest.raises(NotFound):
        other.sa_step("sideways", actor="t")


# --- stores made before the service-account key ---------------------------------------------

def test_a_generation_without_sa_material_reads_and_gets_one_by_rotate_sa(tmp_path):
    store, _ = make_store(tmp_path)
    store.init(actor="t")
    gen = store.read()
    # write a generation as pkisvc wrote them before [M]: no sa.key, no sa.pub, no record
    files = {n: b for n, b in gen.files.items() if not n.startswith("sa.")}
    extra = {k: v for k, v in gen.record.extra.items() if k != "key_pairs"}
    record = type(gen.record).from_dict({**gen.record.to_dict(), "version": 2, "parent": 1,
                                         "operation": "rotate-server"})
    record = type(record)(**{**record.__dict__, "extra": extra})
    store.backend.write(type(gen)(record, files), expected=1)
    app = create_app(store.settings, store.backend)
    token = store.create_token("s", ["secrets", "read"], actor="t")
    client = app.test_client()
    r = client.get("/v1/pillar/k8s-master-1?role=master",
                   headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200 and "sa.key" not in r.json["files"]
    assert "server.key" in r.json["files"]
    assert client.get("/v1/sa/rotation", headers={"Authorization": f"Bearer {token}"}
                      ).json["present"] is False
    store.rotate_leaf("kubecfg", actor="t")  # certificate changes go on without one
    with pytest.raises(Conflict, match="holds no service-account key"):
        store.sa_step("start", actor="t")
    store.rotate_sa(actor="t")
    assert set(store.read().files) >= {"sa.key", "sa.pub"}
    held = gen_file(tmp_path / "data", store.latest())  # the version's file holds the key
    assert {"sa.key", "sa.pub"} <= set(stored(tmp_path / "data", store.latest()).files)
    assert oct(os.stat(held).st_mode & 0o777) == "0o600"


def test_the_command_line_drives_the_staged_rotation(tmp_path, verifier):
    data = tmp_path / "data"
    env = {"PKISVC_DATA_DIR": str(data), "PKISVC_KEY_TYPE": "rsa-2048"}
    donor, _ = make_store(tmp_path / "donor", key_type="rsa-2048")
    donor.init(actor="t")
    src = tmp_path / "adopt"
    src.mkdir()
    gen = donor.read()
    for n in ("server.cert", "server.key", "kubecfg.crt", "kubecfg.key", "ca.key"):
        (src / n).write_bytes(gen.files[n])
    (src / "ca.crt").write_bytes(gen.files["trust.crt"])
    legacy = sign(gen.files["server.key"])
    p = run_cli("import", "--from-dir", str(src), "--sa-from-server-key", env=env)
    assert p.returncode == 0, p.stderr

    def status() -> dict:
        r = run_cli("sa-rotation", "status", "-o", "json", env=env)
        assert r.returncode == 0, r.stderr
        return dict(json.loads(r.stdout))

    adopted = status()
    assert adopted["present"] and adopted["open"] is False
    assert adopted["fingerprint"] == pki.key_fingerprint(pki.load_key(gen.files["server.key"],
                                                                      "k"))
    for args in (("rotate", "sa", "--staged"), ("sa-rotation", "continue")):
        p = run_cli(*args, env=env)
        assert p.returncode == 0 and p.stderr == "", p.stderr
    assert status()["phase"] == 2
    p = run_cli("sa-rotation", "finish", env=env)
    assert p.returncode == 1 and p.stderr.startswith("error: sa.overlap has not passed")
    assert p.stderr.count("\n") == 1
    p = run_cli("sa-rotation", "abort", env=env)
    assert p.returncode == 1 and "cannot abort" in p.stderr
    store = CertStore(FilesBackend(data), make_settings(data))
    assert verifier.verifies(store.read().files["sa.pub"], legacy)
    p = run_cli("sa-rotation", "finish", "--force", "--reason", "drill", env=env)
    assert p.returncode == 0, p.stderr
    assert status()["open"] is False
    assert verifier.verifies(store.read().files["sa.pub"], legacy) is False
    p = run_cli("audit", "-o", "json", "--limit", "1", env=env)
    event = json.loads(p.stdout)[0]
    assert event["action"] == "sa-stage-finish" and event["reason"].startswith("forced")
