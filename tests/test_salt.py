"""kubernetes.cert with real Salt 3008 and a real pkisvc under gunicorn (DESIGN §5, issue 5)."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import requests
from cryptography import x509
from cryptography.hazmat.primitives import hashes

from pkisvc import pki
from tests.conftest import REPO, clean_env, run_cli
from tests.salt_fixtures import (
    SEED_PATHS,
    SYSTEM_CA,
    Cluster,
    Masterless,
    Service,
    by_id,
    changed,
    salt_env,
    view_report,
)

HOST_FILES = ["ca.crt", "kubecfg.crt", "kubecfg.key", "sa.key", "sa.pub", "server.cert",
              "server.key"]
# What a CA rotation changes on a master: every file but the service-account pair ([M]).
CERT_STATES = {f"kubernetes-cert-file-{n}" for n in HOST_FILES if not n.startswith("sa.")} | {
    "kubernetes-cert-ca-local", "kubernetes-cert-update-ca", "kubernetes-cert-kubelet-ca"}
CA_STATES = {"kubernetes-cert-file-ca.crt", "kubernetes-cert-ca-local",
             "kubernetes-cert-update-ca", "kubernetes-cert-kubelet-ca"}


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory):
    s = Service(tmp_path_factory.mktemp("pkisvc")).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def local(service: Service, tmp_path_factory: pytest.TempPathFactory) -> Masterless:
    return Masterless(tmp_path_factory.mktemp("masterless"), service)


def fingerprint(pem: bytes) -> str:
    return x509.load_pem_x509_certificate(pem).fingerprint(hashes.SHA256()).hex()


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every file's bytes and every link's target under root."""
    out: dict[str, bytes | str] = {}
    for p in sorted(root.rglob("*")):
        if p.is_symlink():
            out[str(p)] = os.readlink(p)
        elif p.is_file():
            out[str(p)] = p.read_bytes()
    return out


# --- masterless ----------------------------------------------------------------------------

def test_each_minion_receives_only_its_roles_files(local: Masterless, service: Service):
    version = service.fingerprints()["version"]
    master = local.pillar("k8s-master-1")
    cert = master["kubernetes"]["cert"]
    assert (cert["role"], cert["version"]) == ("master", version)
    assert sorted(cert["files"]) == HOST_FILES
    assert cert["files"]["server.key"].startswith("-----BEGIN ")
    assert master["kubernetes"]["cluster_name"] == "test-cluster"  # merged with static pillar
    node = local.pillar("k8s-node-1")["kubernetes"]["cert"]
    assert (node["role"], sorted(node["files"])) == ("node", ["ca.crt"])
    other = local.pillar("other-1")
    assert "cert" not in other["kubernetes"] or set(other["kubernetes"]["cert"]) == {"lookup"}
    assert other["unrelated"] == {"formula": "data"}


def test_configured_installs_the_master_set_once_and_removed_cleans_up(local: Masterless):
    root = local.root("k8s-master-1")
    states = local.apply("k8s-master-1", "kubernetes.cert.configured")
    assert all(s["result"] is True for s in states.values()), states
    cert = local.pillar("k8s-master-1")["kubernetes"]["cert"]
    for name, pem in cert["files"].items():
        path = root / "srv/kubernetes" / name
        assert path.read_text() == pem
        assert stat.S_IMODE(path.stat().st_mode) == (0o600 if name.endswith(".key") else 0o644)
    ca = cert["files"]["ca.crt"]
    local_ca = root / "usr/local/share/ca-certificates/kubernetes-ca.crt"
    assert local_ca.read_text() == ca
    assert ca.strip() in (root / "etc/ssl/certs/ca-certificates.crt").read_text()
    # The link names the host's path: the tree is right when the prefix becomes /.
    link = root / "etc/ssl/certs/kubernetes.pem"
    assert os.readlink(link) == "/usr/local/share/ca-certificates/kubernetes-ca.crt"
    assert (root / os.readlink(link).lstrip("/")).read_text() == ca
    assert (root / "var/lib/kubelet/ca.crt").read_text() == ca
    assert json.loads((root / "etc/kubernetes-cert/lookup.json").read_text()) == {
        "cert_dir": "/srv/kubernetes",
        "files": ["ca.crt", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key", "sa.key",
                  "sa.pub"],
        "key_files": ["server.key", "kubecfg.key", "sa.key"], "ca_file": "ca.crt",
        "ca_local": "/usr/local/share/ca-certificates/kubernetes-ca.crt",
        "ca_link": "/etc/ssl/certs/kubernetes.pem",
        "ca_store": "/etc/ssl/certs/ca-certificates.crt", "kubelet_ca": "/var/lib/kubelet/ca.crt"}

    again = local.apply("k8s-master-1", "kubernetes.cert.configured")
    assert all(s["result"] is True for s in again.values()), again
    assert changed(again) == set()

    report = view_report(local.apply("k8s-master-1", "kubernetes.cert.view"))
    assert report["differs_from_pillar"] == []
    assert report["pillar"] == {"version": cert["version"], "role": "master"}
    server = report["files"]["server.cert"]
    assert server["pkisvc_version"] == cert["version"]
    assert server["certificates"][0]["fingerprint"] == cert["fingerprints"]["server.cert"]
    for name in ("ca.crt", "server.cert", "kubecfg.crt"):
        installed = x509.load_pem_x509_certificate((root / "srv/kubernetes" / name).read_bytes())
        (shown,) = report["files"][name]["certificates"]
        assert shown["fingerprint"] == installed.fingerprint(hashes.SHA256()).hex()
        assert shown["serial"] == format(installed.serial_number, "x")
        assert shown["subject"] == installed.subject.rfc4514_string()
    assert {"subject", "issuer", "serial", "not_after"} <= set(server["certificates"][0])

    removed = local.apply("k8s-master-1", "kubernetes.cert.removed")
    assert all(s["result"] is True for s in removed.values()), removed
    assert [p for p in SEED_PATHS if (root / p).exists()] == []
    made = ("etc/ssl/certs/kubernetes.pem", "var/lib/kubelet/ca.crt", "etc/kubernetes-cert")
    assert [p for p in made if (root / p).exists() or (root / p).is_symlink()] == []
    assert ca.strip() not in (root / "etc/ssl/certs/ca-certificates.crt").read_text()


def test_node_gets_only_the_ca_and_loses_master_files(local: Masterless):
    root = local.root("k8s-node-1")
    (root / "srv/kubernetes").mkdir(parents=True)
    (root / "srv/kubernetes/server.key").write_text("left over from a master\n")
    states = local.apply("k8s-node-1", "kubernetes.cert.configured")
    assert all(s["result"] is True for s in states.values()), states
    assert sorted(os.listdir(root / "srv/kubernetes")) == ["ca.crt"]
    assert (root / "var/lib/kubelet/ca.crt").exists()


def test_minion_without_role_fails_touching_nothing(local: Masterless):
    root = local.root("other-1")
    before = snapshot(root)
    states = local.apply("other-1", "kubernetes.cert.configured")
    (only,) = states.values()
    assert only["result"] is False and "no certificate material" in only["comment"]
    assert snapshot(root) == before


def test_view_flags_hand_edits_and_never_shows_a_key(local: Masterless):
    root = local.root("k8s-master-2")
    local.apply("k8s-master-2", "kubernetes.cert.configured")
    with open(root / "srv/kubernetes/server.key", "a") as f:
        f.write("# edited by hand\n")
    # Someone pasted a key into a certificate file: view must still print no key.
    with open(root / "srv/kubernetes/kubecfg.crt", "a") as f:
        f.write((root / "srv/kubernetes/kubecfg.key").read_text())
    r = local.run("k8s-master-2", "state.apply", "kubernetes.cert.view",
                  'pillar={"kubernetes": {"cert": {"lookup": {"show_pem": true}}}}')
    assert "PRIVATE KEY" not in r.stdout + r.stderr
    assert "BEGIN CERTIFICATE" in r.stdout  # show_pem prints certificates
    report = view_report(by_id(json.loads(r.stdout)["local"]))
    assert sorted(report["differs_from_pillar"]) == ["kubecfg.crt", "server.key"]
    assert report["files"]["server.key"] == {
        "path": str(root / "srv/kubernetes/server.key"), "installed": True,
        "matches_pillar": False, "pkisvc_version": None, "kind": "private key",
        "sha256": hashlib.sha256((root / "srv/kubernetes/server.key").read_bytes()).hexdigest()}
    assert report["files"]["ca.crt"]["matches_pillar"] is True


# --- the service is down -------------------------------------------------------------------

def test_service_down_puts_an_error_in_pillar_and_configured_touches_nothing(
        tmp_path: Path):
    service = Service(tmp_path / "svc").start()
    try:
        local = Masterless(tmp_path / "salt", service)
        root = local.root("k8s-master-1")
        ok = local.apply("k8s-master-1", "kubernetes.cert.configured")
        assert all(s["result"] is True for s in ok.values()), (ok, service.state())
    finally:
        service.stop()
    before = snapshot(root)
    pillar = local.pillar("k8s-master-1")
    error = pillar["kubernetes"]["cert"]["error"]
    assert "connection refused" in error and service.url in error
    assert set(pillar["kubernetes"]["cert"]) == {"error", "lookup"}  # never a half set
    assert pillar["kubernetes"]["cluster_name"] == "test-cluster"
    assert pillar["unrelated"] == {"formula": "data"}
    assert "_errors" not in pillar
    states = local.apply("k8s-master-1", "kubernetes.cert.configured")
    (only,) = states.values()
    assert only["result"] is False and error in only["comment"]
    assert snapshot(root) == before
    log = (local.config_dir("k8s-master-1") / "root/var/log/salt/minion").read_text()
    assert "pkisvc ext_pillar for k8s-master-1" in log
    assert service.token_file.read_text().strip() not in log


# --- how Salt finds the module -------------------------------------------------------------

LOADED_FROM = """
import inspect, sys, salt.config, salt.loader
opts = salt.config.minion_config(sys.argv[1])
print(inspect.getfile(salt.loader.pillars(opts, {})["pkisvc"].func))
"""


def loaded_from(local: Masterless, minion_id: str, env: dict[str, str]) -> Path:
    conf = local.config_dir(minion_id) / "minion"
    # Not from the checkout: `python -c` would put it first on sys.path.
    r = subprocess.run([sys.executable, "-c", LOADED_FROM, str(conf)], capture_output=True,
                       text=True, env=env, timeout=60, cwd=local.base)
    assert r.returncode == 0, r.stderr[-3000:]
    return Path(r.stdout.strip().splitlines()[-1])


def test_module_loads_by_entry_point_and_by_module_dirs(service: Service, tmp_path: Path):
    by_entry_point = Masterless(tmp_path / "ep", service)
    assert loaded_from(by_entry_point, "k8s-node-1", salt_env()).resolve() == (
        REPO / "ext_pillar/pkisvc.py").resolve()
    mods = tmp_path / "extmods"
    (mods / "pillar").mkdir(parents=True)
    shutil.copy(REPO / "ext_pillar/pkisvc.py", mods / "pillar/pkisvc.py")
    by_dirs = Masterless(tmp_path / "dirs", service, module_dirs=[str(mods)])
    assert loaded_from(by_dirs, "k8s-node-1", salt_env()) == mods / "pillar/pkisvc.py"
    assert list(by_dirs.pillar("k8s-node-1")["kubernetes"]["cert"]["files"]) == ["ca.crt"]


FORMULA_FILES = ("init.sls", "configured.sls", "lookup.sls", "removed.sls", "view.sls",
                 "map.jinja", "defaults.yaml", "orch/rotate.sls", "orch/defaults.yaml")


def test_the_wheel_make_builds_carries_everything_the_salt_master_needs(
        service: Service, tmp_path: Path):
    """`make wheel`, installed into a fresh venv: the ext_pillar (found by its entry point),
    the runner, the formula with its orchestration, and `pkisvc formula-path` naming it."""
    dist = tmp_path / "dist"
    r = subprocess.run(["make", "-C", str(REPO), "wheel", f"DIST={dist}"], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = dist.glob("pkisvc-*-py3-none-any.whl")
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    site = Path(next(venv.glob("lib/python3*/site-packages")))
    subprocess.run([str(venv / "bin/pip"), "install", "-q", "--no-deps",
                    "--disable-pip-version-check", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    # Salt and pkisvc's dependencies from this test's environment, after the venv's own
    # site-packages (its pkisvc comes first).
    deps = [p for p in sys.path if p.endswith("site-packages")]
    (site / "zz-deps.pth").write_text("\n".join(deps) + "\n")
    pkg = site / "pkisvc"
    assert (pkg / "ext_pillar/pkisvc.py").is_file()
    assert (pkg / "ext_pillar/runners/pkisvc.py").is_file()
    for name in FORMULA_FILES:
        assert (pkg / "formula/kubernetes/cert" / name).is_file(), name
    r = subprocess.run([str(venv / "bin/pkisvc"), "formula-path"], capture_output=True,
                       text=True, timeout=60, env=clean_env())
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()) == pkg / "formula"
    env = {**salt_env(), "PATH": f"{venv / 'bin'}:{salt_env()['PATH']}"}
    local = Masterless(tmp_path / "salt", service, env=env)
    conf = local.config_dir("k8s-master-9") / "minion"
    r = subprocess.run([str(venv / "bin/python"), "-c", LOADED_FROM, str(conf)],
                       capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip().splitlines()[-1]) == pkg / "ext_pillar/pkisvc.py"
    r = subprocess.run([str(venv / "bin/python"), "-c", RUNNER_FROM, str(conf)],
                       capture_output=True, text=True, env=env, timeout=60, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert Path(r.stdout.strip().splitlines()[-1]) == pkg / "ext_pillar/runners/pkisvc.py"


RUNNER_FROM = """
import inspect, sys, salt.config, salt.loader
opts = salt.config.minion_config(sys.argv[1])
print(inspect.getfile(salt.loader.runner(opts)["pkisvc.targets"].func))
"""


# --- a master and two minions on loopback ---------------------------------------------------

@pytest.fixture(scope="module")
def cluster():
    # A short root: Salt's IPC sockets live under each root_dir, and a Unix socket path
    # longer than 107 bytes (easy under pytest's tmp_path) silently breaks job returns.
    base = Path(tempfile.mkdtemp(prefix="k8s-salt-", dir="/tmp"))
    service = Service(base / "svc").start()
    c = Cluster(base, service, {"k8s-master-1": {}, "k8s-node-1": {"k8s_role": "master"}})
    try:
        yield c.start()
    finally:
        c.stop()
        service.stop()
        shutil.rmtree(base, ignore_errors=True)


def test_rotation_reaches_minions_through_pillar(cluster: Cluster):
    for minion in ("k8s-master-1", "k8s-node-1"):
        first = cluster.apply(minion, "kubernetes.cert.configured")
        assert all(s["result"] is True for s in first.values()), first
    version = cluster.service.rotate_ca()
    assert cluster.salt("*", "saltutil.refresh_pillar") == {
        "k8s-master-1": True, "k8s-node-1": True}

    states = cluster.apply("k8s-master-1", "kubernetes.cert.configured")
    assert all(s["result"] is True for s in states.values()), states
    assert changed(states) == CERT_STATES
    certs = cluster.service.fingerprints()
    assert certs["version"] == version
    installed = cluster.hosts / "k8s-master-1/srv/kubernetes"
    assert fingerprint((installed / "server.cert").read_bytes()) == (
        certs["items"]["server"]["fingerprint"])
    assert fingerprint((installed / "kubecfg.crt").read_bytes()) == (
        certs["items"]["kubecfg"]["fingerprint"])
    assert fingerprint((installed / "ca.crt").read_bytes()) == certs["items"]["ca"]["fingerprint"]

    node = cluster.apply("k8s-node-1", "kubernetes.cert.configured")
    assert all(s["result"] is True for s in node.values()), node
    assert changed(node) == CA_STATES
    assert os.listdir(cluster.hosts / "k8s-node-1/srv/kubernetes") == ["ca.crt"]
    assert fingerprint((cluster.hosts / "k8s-node-1/var/lib/kubelet/ca.crt").read_bytes()) == (
        certs["items"]["ca"]["fingerprint"])


def test_a_node_claiming_the_master_grain_gets_only_the_ca(cluster: Cluster):
    assert cluster.salt("k8s-node-1", "grains.get", "k8s_role") == {"k8s-node-1": "master"}
    pillar = cluster.salt("k8s-node-1", "pillar.items", "unmask=True")["k8s-node-1"]
    assert pillar["kubernetes"]["cert"]["role"] == "node"
    assert list(pillar["kubernetes"]["cert"]["files"]) == ["ca.crt"]


SYSTEM_STORE = (Path("/etc/ssl/certs"), Path("/usr/local/share/ca-certificates"))


def system_store() -> dict[str, str]:
    """The machine's own CA store: the bundle's sha256 and every entry's name or link."""
    out = {}
    for d in SYSTEM_STORE:
        for p in sorted(d.iterdir()) if d.exists() else ():
            out[str(p)] = os.readlink(p) if p.is_symlink() else (
                hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
    return out


def doctor_json(cluster: Cluster, root: Path, role: str) -> tuple[int, dict]:
    r = run_cli("doctor", "--root", str(root), "--role", role, "--url", cluster.service.url,
                "-o", "json")
    assert r.returncode in (0, 1), r.stderr
    return r.returncode, json.loads(r.stdout)


def fails(report: dict) -> dict[tuple[str, str], str]:
    return {(c["check"], c["path"]): c["fix"] for c in report["checks"] if c["status"] == "FAIL"}


def test_two_prefixes_at_once_leave_the_system_store_alone(cluster: Cluster):
    """Acceptance 5: two minions, one host, different prefixes, configured at the same time."""
    before = system_store()
    cluster.service.rotate_ca()  # so both have a new CA to install at once
    assert cluster.salt("*", "saltutil.refresh_pillar") == {
        "k8s-master-1": True, "k8s-node-1": True}
    both = cluster.salt("*", "state.apply", "kubernetes.cert.configured")
    ca = requests.get(f"{cluster.service.url}/v1/ca", timeout=10).json()["pem"]
    for minion in ("k8s-master-1", "k8s-node-1"):
        states = by_id(both[minion])
        assert all(s["result"] is True for s in states.values()), states
        assert "kubernetes-cert-update-ca" in changed(states)
        bundle = (cluster.hosts / minion / "etc/ssl/certs/ca-certificates.crt").read_text()
        assert bundle.count(ca.strip()) == 1  # its own bundle: the new CA, once
        assert bundle.count("BEGIN CERTIFICATE") == 2  # and the prefix's one system root
    assert system_store() == before

    master, node = cluster.hosts / "k8s-master-1", cluster.hosts / "k8s-node-1"
    code, report = doctor_json(cluster, node, "node")
    assert code == 0, fails(report)
    code, report = doctor_json(cluster, master, "master")
    assert code == 0, fails(report)
    assert ("lookup", "/etc/kubernetes-cert/lookup.json", "PASS") in {
        (c["check"], c["path"], c["status"]) for c in report["checks"]}

    # The seed's troubleshooting list: every place the CA is must hold the same certificate.
    apply = "salt-call state.apply kubernetes.cert.configured"
    other = SYSTEM_CA  # a CA that is not this cluster's
    breaks = {
        "/srv/kubernetes/ca.crt": (None, {
            ("present", "/srv/kubernetes/ca.crt"): apply,
            ("version", "/srv/kubernetes"): f"salt-call saltutil.refresh_pillar && {apply}"}),
        "/usr/local/share/ca-certificates/kubernetes-ca.crt": (other, {
            ("same-ca", "/usr/local/share/ca-certificates/kubernetes-ca.crt"): apply,
            ("symlink", "/etc/ssl/certs/kubernetes.pem"): apply}),
        "/etc/ssl/certs/kubernetes.pem": (None, {
            ("symlink", "/etc/ssl/certs/kubernetes.pem"):
                "ln -sfn /usr/local/share/ca-certificates/kubernetes-ca.crt "
                f"/etc/ssl/certs/kubernetes.pem (or: {apply})"}),
        "/etc/ssl/certs/ca-certificates.crt": (b"", {
            ("bundle", "/etc/ssl/certs/ca-certificates.crt"):
                f"update-ca-certificates (or: {apply})"}),
        "/var/lib/kubelet/ca.crt": (other, {
            ("same-ca", "/var/lib/kubelet/ca.crt"): f"{apply}, then systemctl restart kubelet"}),
    }
    for host_path, (content, want) in breaks.items():
        path = master / host_path.lstrip("/")
        saved = os.readlink(path) if path.is_symlink() else path.read_bytes()
        path.unlink()
        if content is not None:
            path.write_bytes(content)
        try:
            code, report = doctor_json(cluster, master, "master")
            assert code == 1 and fails(report) == want, host_path
        finally:
            path.unlink(missing_ok=True)
            if isinstance(saved, str):
                path.symlink_to(saved)
            else:
                path.write_bytes(saved)
    code, report = doctor_json(cluster, master, "master")
    assert code == 0, fails(report)



def test_service_account_phases_reach_masters_only(cluster: Cluster):
    """[M]: after each phase of a service-account rotation `configured` gives the master the
    bundle of that phase (sa.key 0600); the node holds neither file."""
    url, admin = cluster.service.url, cluster.service.admin()
    master = cluster.hosts / "k8s-master-1/srv/kubernetes"
    node = cluster.hosts / "k8s-node-1/srv/kubernetes"

    def state() -> dict:
        r = requests.get(f"{url}/v1/sa/rotation", headers=admin, timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def step(path: str, body: dict | None = None) -> None:
        r = requests.post(f"{url}/v1/sa/{path}", json=body or {}, headers=admin, timeout=30)
        assert r.status_code == 201, r.text

    def apply_and_check(expected_pub: list[str]) -> None:
        assert cluster.salt("*", "saltutil.refresh_pillar") == {
            "k8s-master-1": True, "k8s-node-1": True}
        for minion in ("k8s-master-1", "k8s-node-1"):
            states = cluster.apply(minion, "kubernetes.cert.configured")
            assert all(s["result"] is True for s in states.values()), states
        pub = pki.load_public_keys((master / "sa.pub").read_bytes(), "sa.pub")
        assert [pki.key_fingerprint(k) for k in pub] == expected_pub
        key = pki.load_key((master / "sa.key").read_bytes(), "sa.key")
        assert pki.key_fingerprint(key) == state()["fingerprint"]
        assert stat.S_IMODE((master / "sa.key").stat().st_mode) == 0o600
        assert not (node / "sa.key").exists() and not (node / "sa.pub").exists()
        # The master reports what its minions installed ([Q]): the next step's gate.
        r = cluster.run("pkisvc.report", "minions=k8s-master-1,k8s-node-1")
        assert r.returncode == 0, r.stdout + r.stderr

    old = state()["fingerprint"]
    apply_and_check([old])
    step("rotate", {"mode": "staged"})
    new = state()["new"]
    apply_and_check([old, new])
    step("rotate/continue")
    assert state()["fingerprint"] == new
    apply_and_check([old, new])
    step("rotate/finish", {"force": True, "reason": "salt test"})
    apply_and_check([new])
