"""`pkisvc doctor` on a host tree laid down at the formula's paths (DESIGN §5)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from pkisvc import doctor
from pkisvc.store import CertStore
from tests.conftest import run_cli
from tests.peers import make_store

MASTER = ("ca.crt", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key")
SYSTEM_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def lay_down(store: CertStore, root: Path, version: int | None = None,
             role: str = "master") -> Path:
    """Write what `kubernetes.cert.configured` writes, under root."""
    gen = store.read(version)
    files = store.host_files(gen, MASTER if role == "master" else ("ca.crt",))
    srv = root / "srv/kubernetes"
    srv.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (srv / name).write_bytes(data)
        if name.endswith(".key"):
            (srv / name).chmod(0o600)
    ca = files["ca.crt"]
    for p in ("usr/local/share/ca-certificates/kubernetes-ca.crt", "var/lib/kubelet/ca.crt"):
        (root / p).parent.mkdir(parents=True, exist_ok=True)
        (root / p).write_bytes(ca)
    certs = root / "etc/ssl/certs"
    certs.mkdir(parents=True, exist_ok=True)
    update_ca_certificates(root)
    link = certs / "kubernetes.pem"
    if link.is_symlink():
        link.unlink()
    link.symlink_to("/usr/local/share/ca-certificates/kubernetes-ca.crt")
    return root


def update_ca_certificates(root: Path) -> None:
    """Run Debian's update-ca-certificates under root, with only the local certificates (the
    whole system set costs ~2 s a run)."""
    conf, hooks = root / "etc/ca-certificates.conf", root / "etc/ca-certificates/update.d"
    hooks.mkdir(parents=True, exist_ok=True)
    conf.touch()
    tool = shutil.which("update-ca-certificates") or "/usr/sbin/update-ca-certificates"
    r = subprocess.run(
        [tool, "--fresh", "--certsconf", str(conf),
         "--certsdir", str(root / "usr/share/ca-certificates"),
         "--localcertsdir", str(root / "usr/local/share/ca-certificates"),
         "--etccertsdir", str(root / "etc/ssl/certs"), "--hooksdir", str(hooks)],
        capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def run_doctor(cfg: Path, root: Path, *args: str):
    r = run_cli("--config", str(cfg), "doctor", "--root", str(root), "-o", "json", *args)
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def failing(report: dict) -> list[tuple[str, str]]:
    return [(c["check"], c["path"]) for c in report["checks"] if c["status"] == "FAIL"]


@pytest.fixture
def host(tmp_path):
    store, cfg = make_store(tmp_path / "svc", "ecdsa-p256")
    return store, cfg, lay_down(store, tmp_path / "root")


def test_a_fresh_master_passes_every_check(host):
    _, cfg, root = host
    code, report = run_doctor(cfg, root)
    assert code == 0, report
    assert report["ok"] is True and report["store_version"] == 1
    assert {c["status"] for c in report["checks"]} == {"PASS"}
    assert {(c["check"], c["path"]) for c in report["checks"]} >= {
        ("ca", "/srv/kubernetes/ca.crt"), ("same-ca", "/var/lib/kubelet/ca.crt"),
        ("same-ca", "/usr/local/share/ca-certificates/kubernetes-ca.crt"),
        ("symlink", "/etc/ssl/certs/kubernetes.pem"),
        ("bundle", "/etc/ssl/certs/ca-certificates.crt"),
        ("leaf", "/srv/kubernetes/server.cert"), ("key", "/srv/kubernetes/server.key"),
        ("leaf", "/srv/kubernetes/kubecfg.crt"), ("key", "/srv/kubernetes/kubecfg.key"),
        ("expiry", "/srv/kubernetes/server.cert"), ("version", "/srv/kubernetes")}
    assert report["summary"] == {"pass": len(report["checks"]), "warn": 0, "fail": 0}


def test_json_shape_is_stable(host):
    _, cfg, root = host
    _, report = run_doctor(cfg, root)
    assert list(report) == ["root", "role", "now", "store_version", "ok", "summary", "checks"]
    assert list(report["summary"]) == ["pass", "warn", "fail"]
    for c in report["checks"]:
        assert list(c) == ["check", "path", "status", "message", "fix"]
    assert report["role"] == "master" and report["root"] == str(root)
    datetime.strptime(report["now"], "%Y-%m-%dT%H:%M:%SZ")


def _stale_kubelet(store, root, tmp):
    other, _ = make_store(tmp / "other", "ecdsa-p256")
    (root / "var/lib/kubelet/ca.crt").write_bytes(other.read().files["trust.crt"])


def _dangling_symlink(store, root, tmp):
    link = root / "etc/ssl/certs/kubernetes.pem"
    link.unlink()
    link.symlink_to("/usr/local/share/ca-certificates/kubernetes-ca.crt.dpkg-old")


def _bundle_without_ca(store, root, tmp):
    b = root / "etc/ssl/certs/ca-certificates.crt"
    b.write_bytes(b.read_bytes().replace(store.read().files["trust.crt"], b""))


def _key_mismatch(store, root, tmp):
    srv = root / "srv/kubernetes"
    (srv / "server.key").write_bytes((srv / "kubecfg.key").read_bytes())


def _readable_key(store, root, tmp):
    (root / "srv/kubernetes/kubecfg.key").chmod(0o644)


def _older_version(store, root, tmp):
    store.rotate_leaf("kubecfg", actor="test")


FAULTS = {
    "stale CA copy in /var/lib/kubelet": (
        _stale_kubelet, [("same-ca", "/var/lib/kubelet/ca.crt")], "stale copy",
        "restart kubelet"),
    "dangling symlink": (
        _dangling_symlink, [("symlink", "/etc/ssl/certs/kubernetes.pem")], "dangling",
        "ln -sfn /usr/local/share/ca-certificates/kubernetes-ca.crt "
        "/etc/ssl/certs/kubernetes.pem"),
    "CA bundle missing our CA": (
        _bundle_without_ca, [("bundle", "/etc/ssl/certs/ca-certificates.crt")],
        "does not contain", "update-ca-certificates"),
    "key not matching its cert": (
        _key_mismatch, [("key", "/srv/kubernetes/server.key")],
        "does not match /srv/kubernetes/server.cert", "state.apply kubernetes.cert.configured"),
    "key readable by others": (
        _readable_key, [("key-mode", "/srv/kubernetes/kubecfg.key")], "mode 0644",
        "chmod 0600 /srv/kubernetes/kubecfg.key"),
    "older version than the store's": (
        _older_version, [("version", "/srv/kubernetes")],
        "kubecfg.crt from version 1; latest is 2 (the store)", "saltutil.refresh_pillar"),
}


@pytest.mark.parametrize("fault", FAULTS)
def test_each_fault_fails_exactly_its_check_with_the_fix(host, tmp_path, fault):
    store, cfg, root = host
    make_fault, where, message, fix = FAULTS[fault]
    make_fault(store, root, tmp_path)
    r = run_cli("--config", str(cfg), "doctor", "--root", str(root))
    assert r.returncode == 1
    assert "PRIVATE KEY" not in r.stdout + r.stderr
    code, report = run_doctor(cfg, root)
    assert code == 1 and report["ok"] is False
    assert failing(report) == where
    bad = next(c for c in report["checks"] if c["status"] == "FAIL")
    assert message in bad["message"] and fix in bad["fix"]
    assert f"fix {where[0][1]} ({where[0][0]}): {bad['fix']}" in r.stdout


def test_expired_certificates_fail_and_soon_expiring_ones_warn(tmp_path):
    now = datetime.now(UTC).replace(microsecond=0)
    old, cfg = make_store(tmp_path / "old", "ecdsa-p256",
                          clock=lambda: now - timedelta(days=400))
    code, report = run_doctor(cfg, lay_down(old, tmp_path / "old-root"))
    assert code == 1
    assert failing(report) == [("expiry", "/srv/kubernetes/server.cert"),
                               ("expiry", "/srv/kubernetes/kubecfg.crt")]
    bad = [c for c in report["checks"] if c["status"] == "FAIL"]
    assert all(c["message"].startswith("expired at") for c in bad)
    assert "pkisvc rotate server" in bad[0]["fix"]

    soon, cfg = make_store(tmp_path / "soon", "ecdsa-p256",
                           clock=lambda: now - timedelta(days=350))
    code, report = run_doctor(cfg, lay_down(soon, tmp_path / "soon-root"))
    assert code == 0 and report["ok"] is True
    warned = [(c["check"], c["path"]) for c in report["checks"] if c["status"] == "WARN"]
    assert warned == [("expiry", "/srv/kubernetes/server.cert"),
                      ("expiry", "/srv/kubernetes/kubecfg.crt")]


def test_node_holds_only_the_ca(tmp_path):
    store, cfg = make_store(tmp_path / "svc", "ecdsa-p256")
    root = lay_down(store, tmp_path / "root", role="node")
    code, report = run_doctor(cfg, root, "--role", "node")
    assert code == 0, report
    assert not any(c["path"].endswith((".key", ".cert")) for c in report["checks"])
    (root / "srv/kubernetes/server.key").write_bytes(store.read().files["server.key"])
    code, report = run_doctor(cfg, root, "--role", "node")
    assert code == 0
    assert [(c["check"], c["status"]) for c in report["checks"]
            if c["status"] != "PASS"] == [("not-held", "WARN")]


def test_without_a_store_the_version_is_not_compared(host):
    _, cfg, root = host
    code, report = run_doctor(cfg, root, "--no-store")
    assert code == 0 and report["store_version"] is None
    assert "version" not in {c["check"] for c in report["checks"]}


def test_an_empty_tree_fails_without_a_traceback(tmp_path):
    _, cfg = make_store(tmp_path / "svc", "ecdsa-p256")
    (tmp_path / "empty").mkdir()
    r = run_cli("--config", str(cfg), "doctor", "--root", str(tmp_path / "empty"))
    assert r.returncode == 1 and "Traceback" not in r.stderr
    assert "FAIL" in r.stdout


def test_doctor_takes_the_clock_and_root_as_arguments(host):
    store, _, root = host
    later = store.now() + timedelta(days=400)
    report = doctor.run(root, now=later, expected=doctor.expected_from(store.versions()))
    assert ("expiry", "/srv/kubernetes/server.cert") in [
        (c.check, c.path) for c in report.checks if c.status == "FAIL"]
    assert os.fspath(root) == report.root


def test_url_compares_the_ca_with_the_running_service(host, tmp_path):
    import sys

    from tests.conftest import free_port
    from tests.test_app import clean_env, start, stop

    store, cfg, root = host
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    p = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--workers", "1"],
              clean_env(PKISVC_DATA_DIR=str(tmp_path / "svc" / "data")), port)
    try:
        code, report = run_doctor(cfg, root, "--url", url)
        assert code == 0 and report["store_version"] == 1
        assert [c["message"] for c in report["checks"] if c["check"] == "version"] == [
            f"matches version 1 (the service at {url})"]
        store.rotate_ca(actor="test")
        code, report = run_doctor(cfg, root, "--url", url)
        assert code == 1 and failing(report) == [("version", "/srv/kubernetes")]
        bad = next(c for c in report["checks"] if c["status"] == "FAIL")
        assert bad["message"].startswith("ca.crt is not the trust bundle of version 2")
        assert "saltutil.refresh_pillar" in bad["fix"]
    finally:
        stop(p)
    code, report = run_doctor(cfg, root, "--url", url)
    assert code == 0 and report["store_version"] is None
    warned = [c for c in report["checks"] if c["status"] == "WARN"]
    assert [(c["check"], c["message"].split(":")[:2]) for c in warned] == [
        ("version", ["not compared", " the service"])]
    assert f"127.0.0.1:{port}" in warned[0]["message"]


def test_kubectl_compares_the_ca_in_kube_system_secrets(host, tmp_path):
    from tests.peers import ApiServer, find_kubectl, write_host_files

    store, cfg, root = host
    kubectl = find_kubectl()
    if not kubectl:
        pytest.fail("no kubectl: run `bash .ci/system-deps.sh` as root")
    certs = write_host_files(store, tmp_path / "apiserver")
    other, _ = make_store(tmp_path / "other", "ecdsa-p256")
    with ApiServer(certs / "server.cert", certs / "server.key", certs / "ca.crt") as api:
        r = run_cli("--config", str(cfg), "kubeconfig", "--server",
                    f"https://127.0.0.1:{api.port}")
        assert r.returncode == 0, r.stderr
        kc = tmp_path / "kc.yaml"
        kc.write_text(r.stdout)
        args = ("--kubectl", "--kubeconfig", str(kc), "--kubectl-path", kubectl)
        api.secrets["default-token-abcde"] = {"ca.crt": store.read().files["trust.crt"],
                                              "token": b"not-a-real-token"}
        code, report = run_doctor(cfg, root, *args)
        assert code == 0, report
        assert [(c["path"], c["status"]) for c in report["checks"] if c["check"] == "secret"
                ] == [("kube-system/secret/default-token-abcde", "PASS")]
        # The seed's trouble: a secret still holds the CA from before the rotation.
        api.secrets["canal-token-xyz12"] = {"ca.crt": other.read().files["trust.crt"]}
        code, report = run_doctor(cfg, root, *args)
        assert code == 1
        assert failing(report) == [("secret", "kube-system/secret/canal-token-xyz12")]
        bad = next(c for c in report["checks"] if c["status"] == "FAIL")
        assert bad["message"].startswith("stale ca.crt")
        assert bad["fix"].startswith("kubectl -n kube-system delete secret canal-token-xyz12")
    code, report = run_doctor(cfg, root, *args)  # the API server is gone
    assert code == 0
    assert [(c["check"], c["status"]) for c in report["checks"] if c["status"] != "PASS"] == [
        ("secret", "WARN")]


def test_symlink_variants(host, tmp_path):
    store, _, root = host
    link = root / "etc/ssl/certs/kubernetes.pem"
    now = store.now()

    def symlink_check():
        report = doctor.run(root, now=now)
        return next((c.status, c.message) for c in report.checks if c.check == "symlink")

    link.unlink()
    link.symlink_to("../../../usr/local/share/ca-certificates/kubernetes-ca.crt")
    assert symlink_check() == ("PASS", "-> /usr/local/share/ca-certificates/kubernetes-ca.crt")
    other, _ = make_store(tmp_path / "other", "ecdsa-p256")
    (root / "etc/ssl/certs/old-ca.crt").write_bytes(other.read().files["trust.crt"])
    link.unlink()
    link.symlink_to("old-ca.crt")
    status, message = symlink_check()
    assert status == "FAIL" and message.startswith("-> /etc/ssl/certs/old-ca.crt holds")
    link.unlink()
    link.write_bytes(store.read().files["trust.crt"])
    assert symlink_check()[0] == "WARN"
    link.unlink()
    assert symlink_check() == ("FAIL", "missing")


def test_a_full_system_bundle_is_read(host):
    """The real system bundle (odd old roots included) with our CA appended, as hosts have."""
    store, _, root = host
    assert SYSTEM_BUNDLE.exists(), "no system bundle: .ci/system-deps.sh installs ca-certificates"
    bundle = root / "etc/ssl/certs/ca-certificates.crt"
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes() + store.read().files["trust.crt"])
    report = doctor.run(root, now=store.now())
    assert [(c.status, c.message) for c in report.checks if c.check == "bundle"] == [
        ("PASS", "contains the CA")]
    bundle.write_bytes(SYSTEM_BUNDLE.read_bytes())
    report = doctor.run(root, now=store.now())
    assert [c.status for c in report.checks if c.check == "bundle"] == ["FAIL"]


def test_doctor_follows_the_lookup_the_formula_recorded(host):
    """A pillar `lookup` override moves the files; configured records it; doctor follows."""
    _, cfg, root = host
    (root / "opt/k8s").mkdir(parents=True)
    (root / "srv/kubernetes").rename(root / "opt/k8s/pki")
    (root / "etc/kubelet").mkdir()
    (root / "var/lib/kubelet/ca.crt").rename(root / "etc/kubelet/ca.crt")
    code, report = run_doctor(cfg, root)
    assert code == 1 and ("present", "/srv/kubernetes/ca.crt") in failing(report)
    record = root / "etc/kubernetes-cert/lookup.json"
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"cert_dir": "/opt/k8s/pki", "kubelet_ca": "/etc/kubelet/ca.crt",
                                  "files": list(MASTER)}))
    code, report = run_doctor(cfg, root)
    assert code == 0, failing(report)
    paths = {c["path"] for c in report["checks"]}
    assert {"/opt/k8s/pki/ca.crt", "/opt/k8s/pki/server.key", "/etc/kubelet/ca.crt",
            "/opt/k8s/pki"} <= paths
    assert not any(p.startswith(("/srv/", "/var/lib/kubelet")) for p in paths)
    assert report["checks"][0]["check"] == "lookup" and report["checks"][0]["status"] == "PASS"
    record.write_text(json.dumps({"cert_dir": "opt/k8s"}))
    code, report = run_doctor(cfg, root)
    assert code == 1 and ("lookup", "/etc/kubernetes-cert/lookup.json") in failing(report)
    bad = report["checks"][0]
    assert bad["message"] == "cert_dir is not an absolute path; default paths used"
    assert "kubernetes.cert.configured" in bad["fix"]
