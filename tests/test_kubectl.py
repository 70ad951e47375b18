"""A real kubectl (Go) judges `pkisvc kubeconfig` and our certificates, against a TLS server
that requires client certificates signed by the cluster CA."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest
import yaml

from pkisvc import kubeconfig as kubeconfig_doc
from pkisvc.model import KEY_TYPES
from tests import badcerts
from tests.conftest import run_cli, wait_for
from tests.peers import ApiServer, Kubectl, find_kubectl, make_store, write_host_files


@pytest.fixture(scope="session")
def kubectl() -> Kubectl:
    k = find_kubectl()
    if not k:
        pytest.fail("no kubectl: run `bash .ci/system-deps.sh` as root")
    return Kubectl.probe(k)


def kubeconfig(cfg: Path, dest: Path, *args: str) -> dict:
    r = run_cli("--config", str(cfg), "kubeconfig", *args)
    assert r.returncode == 0, r.stderr
    dest.write_text(r.stdout)
    return yaml.safe_load(r.stdout)


def whoami(kubectl: Kubectl, kc: Path) -> dict:
    r = kubectl.whoami(kc)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["status"]["userInfo"]


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_kubectl_is_kubecfg_in_system_masters_for_every_key_type(tmp_path, kubectl, key_type):
    store, cfg = make_store(tmp_path, key_type)
    certs = write_host_files(store, tmp_path / "srv")
    with ApiServer(certs / "server.cert", certs / "server.key", certs / "ca.crt") as api:
        direct = kubeconfig(cfg, tmp_path / "direct.yaml",
                            "--server", f"https://127.0.0.1:{api.port}")
        named = kubeconfig(cfg, tmp_path / "named.yaml", "--server",
                           f"https://127.0.0.1:{api.port}",
                           "--tls-server-name", "kubernetes.default.svc")
        for kc in ("direct.yaml", "named.yaml"):
            user = whoami(kubectl, tmp_path / kc)
            assert user["username"] == "kubecfg"
            assert "system:masters" in user["groups"]
        assert api.rejected == []
    cluster = direct["clusters"][0]["cluster"]
    assert "tls-server-name" not in cluster
    assert named["clusters"][0]["cluster"]["tls-server-name"] == "kubernetes.default.svc"
    gen = store.read()
    assert base64.b64decode(cluster["certificate-authority-data"]) == gen.files["trust.crt"]
    user = direct["users"][0]["user"]
    assert base64.b64decode(user["client-certificate-data"]) == gen.files["kubecfg.crt"]
    assert base64.b64decode(user["client-key-data"]) == gen.files["kubecfg.key"]


def test_client_from_another_ca_is_refused(tmp_path, kubectl):
    store, cfg = make_store(tmp_path / "ours", "ecdsa-p256")
    _, other_cfg = make_store(tmp_path / "other", "ecdsa-p256")
    certs = write_host_files(store, tmp_path / "srv")
    with ApiServer(certs / "server.cert", certs / "server.key", certs / "ca.crt") as api:
        url = f"https://127.0.0.1:{api.port}"
        good = kubeconfig(cfg, tmp_path / "good.yaml", "--server", url)
        bad = kubeconfig(other_cfg, tmp_path / "bad.yaml", "--server", url)
        # Trust our CA (so kubectl accepts the server) but present the other CA's pair.
        bad["clusters"] = good["clusters"]
        (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
        r = kubectl.whoami(tmp_path / "bad.yaml")
        assert r.returncode != 0 and "kubecfg" not in r.stdout
        # TLS 1.3: the client may see the server's alert or just a reset, depending on
        # timing; the server's refusal is the fact.
        assert "Unable to connect to the server" in r.stderr, r.stderr
        refusal = wait_for(lambda: api.rejected, timeout=10, what="the server's refusal")
        assert "certificate verify failed" in refusal[-1]
        assert not any("selfsubjectreviews" in q for q in api.requests)


def test_name_outside_the_sans_is_refused_with_gos_words(tmp_path, kubectl):
    store, cfg = make_store(tmp_path, "ecdsa-p256")
    certs = write_host_files(store, tmp_path / "srv")
    with ApiServer(certs / "server.cert", certs / "server.key", certs / "ca.crt") as api:
        kubeconfig(cfg, tmp_path / "kc.yaml", "--server", f"https://localhost:{api.port}")
        r = kubectl.whoami(tmp_path / "kc.yaml")
    assert r.returncode != 0
    assert "x509: certificate is valid for" in r.stderr and "not localhost" in r.stderr


def test_kubeconfig_of_an_older_version(tmp_path):
    store, cfg = make_store(tmp_path, "ecdsa-p256")
    store.rotate_ca(actor="test")
    doc = kubeconfig(cfg, tmp_path / "kc.yaml", "--server", "https://k8s-master-1:6443",
                     "--version", "1")
    assert base64.b64decode(doc["users"][0]["user"]["client-certificate-data"]) == \
        store.read(1).files["kubecfg.crt"]
    assert doc["current-context"] == "kubecfg@default"
    assert [(e.action, e.version) for e in store.audit(limit=1)] == [("kubeconfig", 1)]


def test_kubeconfig_refuses_plain_http(tmp_path):
    _, cfg = make_store(tmp_path, "ecdsa-p256")
    r = run_cli("--config", str(cfg), "kubeconfig", "--server", "http://127.0.0.1:8080")
    assert r.returncode == 1
    assert r.stderr.startswith("error: --server") and r.stdout == ""


@pytest.fixture(scope="module")
def broken(tmp_path_factory):
    """One good ECDSA set and every mistake of the Go table built from it."""
    root = tmp_path_factory.mktemp("broken")
    store, _ = make_store(root, "ecdsa-p256")
    files = badcerts.set_files(store)
    return root, {m.name: m for m in badcerts.mistakes(files, root / "work")}


CLIENT_SIDE = ["serving cert without SANs", "negative serial", "serving cert without serverAuth",
               "root without CA:TRUE", "root without keyCertSign"]


@pytest.mark.parametrize("name", CLIENT_SIDE)
def test_kubectl_refuses_what_our_checks_refuse(broken, kubectl, name):
    if name == "negative serial" and kubectl.go < (1, 23):
        pytest.skip(f"{kubectl.path} is built with Go {kubectl.go}: Go refuses negative "
                    "serials from 1.23 on (our check refuses them anyway: test_pki)")
    root, table = broken
    m = table[name]
    d = root / name.replace(" ", "-").replace(":", "")
    d.mkdir()
    for n, data in m.files.items():
        (d / n).write_bytes(data)
    with ApiServer(d / "server.cert", d / "server.key", d / "ca.crt") as api:
        # Built from the broken files directly: the store would refuse them.
        (d / "kc.yaml").write_text(yaml.safe_dump(kubeconfig_doc.build(
            server=f"https://127.0.0.1:{api.port}", trust_pem=m.files["ca.crt"],
            cert_pem=m.files["kubecfg.crt"], key_pem=m.files["kubecfg.key"],
            cluster="default", user="kubecfg",
            # Without SANs Go names the CN fallback only when asked for that very name.
            tls_server_name="kube-apiserver" if "SANs" in name
            else "kubernetes.default.svc")))
        r = kubectl.whoami(d / "kc.yaml")
    assert r.returncode != 0
    assert m.go in r.stderr, r.stderr
    if name.startswith("root"):
        assert "parent certificate cannot sign this kind of certificate" in r.stderr
