"""Staged CA rotation (DESIGN §6): phases, their rules, and what each phase lets clients do."""
import itertools
import json

import pytest
from click.testing import CliRunner
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from pkisvc import pki
from pkisvc.app import create_app
from pkisvc.changes import parse_files
from pkisvc.cli import main
from pkisvc.errors import Conflict
from pkisvc.imports import read_import_dir
from tests.conftest import make_settings


def trusted(cert: x509.Certificate, trust: tuple[x509.Certificate, ...]) -> bool:
    """Whether cert verifies against some CA of a trust bundle (what a TLS peer checks)."""
    for ca in trust:
        try:
            cert.verify_directly_issued_by(ca)
            return True
        except (ValueError, TypeError, InvalidSignature):
            continue
    return False


def test_phases_keep_every_pair_of_neighbours_talking(store):
    store.init(actor="t")
    phases = [parse_files(store.read().files)]
    ops = [store.start_rotation, store.continue_rotation, store.finish_rotation]
    names = ["ca-stage-trust", "ca-stage-switch", "ca-stage-finish"]
    for op, name in zip(ops, names, strict=True):
        rec = op(actor="t")
        assert rec.operation == name
        phases.append(parse_files(store.read().files))
        pki.check_set(phases[-1])
    before, trust, switch, finish = phases
    old, new = before.ca, trust.trust[1]
    assert [c.subject for c in trust.trust] == [old.subject, new.subject]
    assert trust.server == before.server and trust.ca == old          # phase 1: leaves unchanged
    assert switch.ca == new and trusted(switch.server, (new,))        # phase 2: new CA signs
    assert switch.trust == (old, new)
    assert finish.trust == (new,) and finish.server == switch.server  # phase 3: only the new CA
    # Hosts roll out one by one: a host a phase ahead and a host a phase behind still accept
    # each other, as server and as client, both ways.
    for prev, cur in itertools.pairwise(phases):
        assert trusted(cur.server, prev.trust) and trusted(prev.server, cur.trust)
        assert trusted(cur.kubecfg, prev.trust) and trusted(prev.kubecfg, cur.trust)
    # An immediate rotation breaks exactly that: the old client is not trusted any more.
    store.rotate_ca(actor="t")
    after = parse_files(store.read().files)
    assert not trusted(finish.kubecfg, after.trust)
    assert not trusted(after.server, finish.trust)


def test_versions_show_every_phase(store):
    store.init(actor="t")
    store.start_rotation(actor="t")
    store.continue_rotation(actor="t")
    store.finish_rotation(actor="t")
    assert [r.operation for r in store.versions()] == [
        "ca-stage-finish", "ca-stage-switch", "ca-stage-trust", "init"]
    assert [bool(r.rotation) for r in store.versions()] == [False, True, True, False]


def test_phase_rules(store, tmp_path):
    store.init(actor="t")
    with pytest.raises(Conflict, match="no staged rotation"):
        store.continue_rotation(actor="t")
    store.start_rotation(actor="t")
    for change in (lambda: store.rotate_ca(actor="t"),
                   lambda: store.rotate_leaf("server", actor="t"),
                   lambda: store.start_rotation(actor="t"),
                   lambda: store.finish_rotation(actor="t")):
        with pytest.raises(Conflict):
            change()
    store.continue_rotation(actor="t")
    with pytest.raises(Conflict, match="roll back"):
        store.abort_rotation(actor="t")
    with pytest.raises(Conflict):
        store.rotate_leaf("kubecfg", actor="t")
    assert store.latest() == 3


def test_abort_in_phase_one_restores_the_old_trust(store):
    store.init(actor="t")
    before = store.read(1)
    store.start_rotation(actor="t")
    rec = store.abort_rotation(actor="t", reason="changed my mind")
    after = store.read()
    assert rec.operation == "ca-stage-abort" and rec.rotation is None
    assert after.files["trust.crt"] == before.files["trust.crt"]
    assert "next-ca.key" not in after.files
    store.rotate_leaf("server", actor="t")  # ordinary rotations work again


def test_rollback_is_always_allowed_and_brings_its_rotation_state(store):
    store.init(actor="t")
    store.start_rotation(actor="t")
    store.continue_rotation(actor="t")
    rec = store.rollback(2, actor="t", reason="phase 2 broke kubelets")
    assert rec.rotation["phase"] == 1 and store.rotation()["next"] == "continue"
    assert "next-ca.key" in store.read().files
    store.continue_rotation(actor="t")  # ... and the rotation goes on from there
    store.rollback(1, actor="t")
    assert store.rotation()["open"] is False


def test_api_and_metrics(tmp_path):
    app = create_app(make_settings(tmp_path / "data"))
    token = app.extensions["pkisvc"].create_token("ops", ["admin"], actor="t")
    h = {"Authorization": f"Bearer {token}"}
    c = app.test_client()
    assert c.get("/v1/ca/rotation", headers=h).get_json()["open"] is False
    r = c.post("/v1/ca/rotate", json={"mode": "staged"}, headers=h)
    assert r.status_code == 201 and r.get_json()["operation"] == "ca-stage-trust"
    assert len(r.get_json()["trust"]) == 2
    assert c.post("/v1/ca/rotate", headers=h).status_code == 409
    assert c.post("/v1/certs/server/rotate", headers=h).status_code == 409
    assert c.post("/v1/ca/rotate/finish", headers=h).status_code == 409
    status = c.get("/v1/ca/rotation", headers=h).get_json()
    assert (status["phase"], status["next"], status["abortable"]) == (1, "continue", True)
    assert 'pkisvc_ca_rotation_phase{cluster="default"} 1.0' in c.get("/metrics").get_data(
        as_text=True)
    assert c.post("/v1/ca/rotate/continue", headers=h).status_code == 201
    assert c.post("/v1/ca/rotate/abort", headers=h).status_code == 409
    r = c.post("/v1/ca/rotate/finish", headers=h, json={"reason": "all hosts done"})
    assert r.status_code == 201 and len(r.get_json()["trust"]) == 1
    assert c.post("/v1/ca/rotate/sideways", headers=h).status_code == 404
    assert 'pkisvc_ca_rotation_phase{cluster="default"} 0.0' in c.get("/metrics").get_data(
        as_text=True)
    # Hosts get the bundle as ca.crt during the rotation.
    assert c.get("/v1/versions/2", headers=h).get_json()["rotation"]["phase"] == 1


def test_cli(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data_dir: {tmp_path / 'data'}\nkey_type: ecdsa-p256\n")

    def run(*args, code=0):
        r = CliRunner().invoke(main, ["--config", str(cfg), *args])
        assert r.exit_code == code, r.output
        return r.output
    run("init")
    assert run("rotate", "ca", "--staged").strip() == "version 2: ca-stage-trust"
    assert json.loads(run("rotation", "status", "-o", "json"))["next"] == "continue"
    assert "error: cannot abort" not in run("rotation", "continue")
    r = CliRunner().invoke(main, ["--config", str(cfg), "rotation", "abort"])
    assert r.exit_code == 1 and "cannot abort: phase 2" in r.output
    assert run("rotation", "finish").strip() == "version 4: ca-stage-finish"


def test_imported_set_without_ca_key_stages_and_signs_from_phase_2(store, tmp_path):
    from tests.test_store import openssl_set
    d = openssl_set(tmp_path / "legacy")
    (d / "ca.key").unlink()
    store.import_files(read_import_dir(d), actor="t")
    with pytest.raises(Conflict, match=r"pkisvc rotate ca --staged"):
        store.rotate_leaf("server", actor="t")
    assert store.start_rotation(actor="t").operation == "ca-stage-trust"
    assert "ca.key" not in store.read().files
    store.continue_rotation(actor="t")
    assert "ca.key" in store.read().files  # the new CA signs from phase 2 on
    store.finish_rotation(actor="t")
    assert store.rotate_leaf("server", actor="t").operation == "rotate-server"
