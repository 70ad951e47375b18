"""A trust bundle of two CAs (old + new, as during a staged rotation), judged by Go: etcd's
--trusted-ca-file and kubectl's certificate-authority-data let either CA's certificates in."""
from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_cli
from tests.peers import ApiServer, Etcd, Kubectl, find_kubectl, make_store, write_host_files


@pytest.fixture
def two_cas(tmp_path):
    """Versions 1 (CA1) and 2 (CA2) of one store, and a second store holding CA2's set with
    ca.crt = CA1 + CA2, imported as an operator would mid-rotation."""
    old, _ = make_store(tmp_path / "rotating", "ecdsa-p256")
    old.rotate_ca(actor="test")
    v1 = write_host_files(old, tmp_path / "v1", version=1)
    v2 = write_host_files(old, tmp_path / "v2", version=2)
    both, cfg = make_store(tmp_path / "both", "ecdsa-p256")
    files = {n: (v2 / n).read_bytes() for n in ("server.cert", "server.key", "kubecfg.crt",
                                                  "kubecfg.key")}
    files["ca.crt"] = (v1 / "ca.crt").read_bytes() + (v2 / "ca.crt").read_bytes()
    files["ca.key"] = old.read(2).files["ca.key"]
    rec = both.import_files(files, actor="test", reason="mid-rotation bundle")
    assert len(rec.trust) == 2
    return v1, v2, both, cfg


def test_import_finds_the_signing_ca_in_a_bundle_of_same_named_cas(two_cas):
    v1, v2, both, _ = two_cas
    gen = both.read()
    # Both CAs are "CN=kubernetes-ca": the signer is the one whose key signed server.cert.
    assert gen.files["ca.crt"] == (v2 / "ca.crt").read_bytes()
    assert gen.files["trust.crt"] == (v1 / "ca.crt").read_bytes() + (v2 / "ca.crt").read_bytes()


def test_etcd_with_a_two_ca_bundle_takes_clients_of_either_ca(tmp_path, two_cas):
    v1, _, both, _ = two_cas
    certs = write_host_files(both, tmp_path / "srv")
    (tmp_path / "etcd").mkdir()
    e = Etcd(certs, tmp_path / "etcd")
    try:
        e.start()
        for cert, key in ((certs / "kubecfg.crt", certs / "kubecfg.key"),
                          (v1 / "kubecfg.crt", v1 / "kubecfg.key")):
            r = e.etcdctl(cert, key, "put", "k", str(cert))
            assert r.returncode == 0, r.stderr
        assert e.rejections() == []
    finally:
        e.stop()


def test_kubectl_with_a_two_ca_bundle_trusts_servers_of_either_ca(tmp_path, two_cas):
    k = find_kubectl()
    if not k:
        pytest.fail("no kubectl: run `bash .ci/system-deps.sh` as root")
    kubectl = Kubectl.probe(k)
    v1, v2, both, cfg = two_cas
    bundle = tmp_path / "bundle.crt"
    bundle.write_bytes(both.read().files["trust.crt"])
    for served in (v1, v2):
        with ApiServer(served / "server.cert", served / "server.key", bundle) as api:
            r = run_cli("--config", str(cfg), "kubeconfig", "--server",
                        f"https://127.0.0.1:{api.port}")
            assert r.returncode == 0, r.stderr
            doc = yaml.safe_load(r.stdout)
            assert base64.b64decode(doc["clusters"][0]["cluster"][
                "certificate-authority-data"]).count(b"BEGIN CERTIFICATE") == 2
            kc = Path(tmp_path / f"kc-{served.name}.yaml")
            kc.write_text(r.stdout)
            r = kubectl.whoami(kc)
            assert r.returncode == 0, r.stderr
            assert '"username": "kubecfg"' in r.stdout.replace('":"', '": "')
