"""Adopting a cluster made with easy-rsa (issue 15): its SANs and subjects survive every re-issue,
its files reach hosts byte for byte, and a set without its CA key rotates without an outage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pkisvc.app import create_app
from tests.conftest import make_settings, run_cli
from tests.easyrsa import LAYOUT, SANS, SERVER, make_cluster, seed_files
from tests.peers import write_host_files
from tests.test_staged_etcd import neighbours_talk

# Each test runs easy-rsa (RSA keys made by openssl) and a dozen CLI processes: up to 20 s on an
# idle machine, past the default 120 s limit when other work loads the two cores (seen at load 10).
pytestmark = pytest.mark.timeout(300)

KUBECFG_SUBJECT = "CN=kubecfg"  # easy-rsa's: no O=system:masters


def config(root: Path, **extra: Any) -> Path:
    """Settings for a store under root: leaves of 30 days, nothing about the SANs."""
    cfg = root / f"pkisvc-{len(list(root.glob('pkisvc-*.yaml')))}.yaml"
    cfg.write_text(json.dumps({"data_dir": str(root / "data"), "key_type": "rsa-2048",
                               "server": {"days": 30}, "kubecfg": {"days": 30}, **extra}))
    return cfg


def cli(cfg: Path, *args: str, code: int = 0) -> tuple[str, str]:
    r = run_cli("--config", str(cfg), *args)
    assert r.returncode == code, (args, r.stdout, r.stderr)
    return r.stdout, r.stderr


def show(cfg: Path, item: str) -> dict[str, Any]:
    return dict(json.loads(cli(cfg, "show", item, "-o", "json")[0]))


def assert_kept(cfg: Path, sans: tuple[str, ...] = SANS) -> None:
    """The current server certificate has exactly sans, and both leaves easy-rsa's subjects."""
    server, kubecfg = show(cfg, "server"), show(cfg, "kubecfg")
    assert sorted(server["sans"]) == sorted(sans), server
    assert server["subject"] == f"CN={SERVER}"
    assert kubecfg["subject"] == KUBECFG_SUBJECT


def test_an_easy_rsa_cluster_keeps_its_sans_and_subjects_through_every_reissue(tmp_path):
    made = make_cluster(tmp_path / "easyrsa")
    cfg = config(tmp_path)
    out, err = cli(cfg, "import", "--from-dir", str(seed_files(made, tmp_path / "adopt")))
    assert out.startswith("version 1: import")
    # The settings name none of the master's SANs: said, and nothing is refused or dropped.
    assert f"SANs the settings do not name: {SERVER}, 127.0.0.1" in err
    assert_kept(cfg)

    steps = [("rotate", "server"), ("rotate", "kubecfg"), ("rotate", "ca"),
             ("rotate", "ca", "--staged"), ("rotation", "continue"), ("rotation", "finish")]
    for step in steps:
        out, _ = cli(cfg, *step)
        assert "SANs removed" not in out
        assert_kept(cfg)
    ops = [v["operation"] for v in json.loads(cli(cfg, "versions", "-o", "json")[0])]
    assert ops[:6] == ["ca-stage-finish", "ca-stage-switch", "ca-stage-trust", "rotate-ca",
                       "rotate-kubecfg", "rotate-server"]

    # Renewal made due: the leaves of 30 days are inside a renew_before of 60.
    due = config(tmp_path, renew_before="60d", server={"days": 90}, kubecfg={"days": 90})
    out, _ = cli(due, "renew")
    assert "renewed: server" in out and "renewed: kubecfg" in out
    assert_kept(cfg)

    # --san adds, --remove-san removes (and says so), --sans replaces the whole list.
    out, _ = cli(cfg, "rotate", "server", "--san", "k8s-master-4")
    assert "server SANs added: k8s-master-4" in out
    assert_kept(cfg, (*SANS, "k8s-master-4"))
    out, _ = cli(cfg, "rotate", "server", "--remove-san", "k8s-master-4", "--reason", "gone")
    assert "server SANs removed: k8s-master-4" in out
    assert_kept(cfg)
    latest = json.loads(cli(cfg, "versions", "-o", "json")[0])[0]
    assert (latest["operation"], latest["sans_removed"]) == ("rotate-server", ["k8s-master-4"])
    cli(cfg, "rotate", "server", "--sans", "api.example,192.0.2.1", "--sans", "k8s-master-1")
    assert_kept(cfg, ("api.example", "192.0.2.1", "k8s-master-1"))
    cli(cfg, "rotate", "server", "--sans", ",".join(SANS))
    assert_kept(cfg)
    _, err = cli(cfg, "rotate", "server", "--remove-san", "nowhere.example", code=1)
    assert "nowhere.example is not a SAN" in err
    _, err = cli(cfg, "rotate", "server", "--sans", "a.example", "--san", "b.example", code=2)

    # Settings changed afterwards are reported, never applied: nothing is dropped.
    changed = config(tmp_path, server={"days": 30, "sans": ["k8s-master-2"]})
    for step in (("rotate", "server"), ("rotate", "ca")):
        _, err = cli(changed, *step)
        assert "the settings name SANs the server certificate" in err and "k8s-master-2" in err
        assert_kept(cfg)
    _, err = cli(changed, "show", "server")
    assert "k8s-master-2" in err
    (tmp_path / "host").mkdir()  # an empty host: doctor fails on it, and still says this
    out, _ = cli(changed, "doctor", "--root", str(tmp_path / "host"), "-o", "json", code=1)
    settings = [ch for ch in json.loads(out)["checks"] if ch["check"] == "settings"]
    assert [ch["status"] for ch in settings] and {ch["status"] for ch in settings} == {"WARN"}
    assert any("k8s-master-2" in ch["message"] for ch in settings)


def test_the_api_adds_removes_and_replaces_sans_and_says_what_it_removed(tmp_path):
    settings = make_settings(tmp_path / "data")
    app = create_app(settings)
    store = app.extensions["pkisvc"]
    token = store.create_token("op", ["admin"], actor="t")
    h = {"Authorization": f"Bearer {token}"}
    c = app.test_client()
    first = set(store.read().record.items["server"].sans)

    r = c.post("/v1/certs/server/rotate", json={"add_sans": ["k8s-master-4"]}, headers=h)
    assert r.status_code == 201, r.get_json()
    assert r.get_json()["sans_added"] == ["k8s-master-4"]
    assert set(r.get_json()["items"]["server"]["sans"]) == first | {"k8s-master-4"}
    assert any("k8s-master-4" in w for w in r.get_json()["warnings"])
    r = c.post("/v1/certs/server/rotate", json={"remove_sans": ["k8s-master-4"]}, headers=h)
    assert r.status_code == 201 and r.get_json()["sans_removed"] == ["k8s-master-4"]
    assert c.get(f"/v1/versions/{r.get_json()['version']}", headers=h).get_json()[
        "sans_removed"] == ["k8s-master-4"]
    r = c.post("/v1/certs/server/rotate", json={"sans": ["api.example"]}, headers=h)
    assert r.status_code == 201 and r.get_json()["items"]["server"]["sans"] == ["api.example"]
    assert set(r.get_json()["sans_removed"]) == first
    r = c.post("/v1/certs/server/rotate", json={"sans": ["a.example"], "add_sans": ["b"]},
               headers=h)
    assert r.status_code == 400
    r = c.post("/v1/certs/kubecfg/rotate", json={"add_sans": ["a.example"]}, headers=h)
    assert r.status_code == 400
    # The overview shows the SANs, and where the settings differ from the certificate.
    page = c.get("/ui/", headers=h).text
    assert "SANs api.example" in page
    assert 'id="warnings"' in page and "has SANs the settings do not name: api.example" in page


def test_import_keeps_the_exact_bytes_hosts_hold_and_warns_of_an_expired_leaf(tmp_path):
    made = make_cluster(tmp_path / "easyrsa")
    adopt = seed_files(made, tmp_path / "adopt")
    assert not (adopt / "server.cert").read_bytes().startswith(b"-----BEGIN")  # text dump
    cfg = config(tmp_path, server={"days": 30, "sans": [SERVER, "127.0.0.1"],
                                   "common_name": SERVER})
    _, err = cli(cfg, "import", "--from-dir", str(adopt))
    # The settings cover the imported SANs, nothing expired; only the kubecfg subject differs
    # (a setting cannot say "no organization"; the subject is kept anyway).
    assert err.splitlines() == ["warning: the kubecfg certificate's subject is CN=kubecfg, "
                                "the settings say CN=kubecfg,O=system:masters (kept by every "
                                "re-issue)"]
    host = write_host_files(store_of(cfg), tmp_path / "host")
    for name in ("ca.crt", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key"):
        assert (host / name).read_bytes() == (made / LAYOUT[name]).read_bytes(), name
    # A re-issue of one leaf leaves the other's bytes alone.
    cli(cfg, "rotate", "kubecfg")
    host = write_host_files(store_of(cfg), tmp_path / "host-2")
    assert (host / "server.cert").read_bytes() == (made / LAYOUT["server.cert"]).read_bytes()
    assert (host / "kubecfg.crt").read_bytes() != (made / LAYOUT["kubecfg.crt"]).read_bytes()

    # An expired leaf is imported, with a warning (renewal is the way on).
    expired = seed_files(made, tmp_path / "adopt-expired")
    (expired / "server.cert").write_bytes(expired_server(made))
    (tmp_path / "other").mkdir()
    _, err = cli(config(tmp_path / "other"), "import", "--from-dir", str(expired))
    assert "warning: server.cert (version 1) expired" in err


def expired_server(made: Path) -> bytes:
    """easy-rsa's server certificate again, signed by its CA, but expired yesterday."""
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization

    ca_key = serialization.load_pem_private_key((made / LAYOUT["ca.key"]).read_bytes(), None)
    ca = x509.load_pem_x509_certificate((made / LAYOUT["ca.crt"]).read_bytes())
    cur = x509.load_pem_x509_certificate((made / LAYOUT["server.cert"]).read_bytes())
    now = datetime.now(UTC)
    b = (x509.CertificateBuilder().subject_name(cur.subject).issuer_name(ca.subject)
         .public_key(cur.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - timedelta(days=400)).not_valid_after(now - timedelta(days=1)))
    for ext in cur.extensions:
        b = b.add_extension(ext.value, ext.critical)
    return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def store_of(cfg: Path) -> Any:
    from pkisvc.backends.files import FilesBackend
    from pkisvc.settings import Settings
    from pkisvc.store import CertStore
    s = Settings.load(str(cfg), env={})
    return CertStore(FilesBackend(s.data_dir), s)


def test_a_keyless_import_rotates_in_stages_and_etcd_accepts_every_neighbouring_pair(tmp_path):
    made = make_cluster(tmp_path / "easyrsa")
    cfg = config(tmp_path)
    cli(cfg, "import", "--from-pillar", str(pasted_pillar(made, tmp_path / "pillar.sls")),
        "--key", "kubernetes:certs")
    assert "ca.key" not in store_of(cfg).read().files
    for step in (("rotate", "server"), ("rotate", "kubecfg")):
        _, err = cli(cfg, *step, code=1)
        assert "holds no CA key" in err and "pkisvc rotate ca --staged" in err
    due = config(tmp_path, renew_before="900d", server={"days": 1000}, kubecfg={"days": 1000})
    out, err = cli(due, "renew", "--dry-run", code=1)
    assert "due: server" in out
    assert "renewal is impossible" in err and "pkisvc rotate ca --staged" in err
    _, err = cli(due, "renew", code=1)
    assert "pkisvc rotate ca --staged" in err

    store = store_of(cfg)
    hosts = {1: write_host_files(store, tmp_path / "v1")}
    for v, step in ((2, ("rotate", "ca", "--staged")), (3, ("rotation", "continue")),
                    (4, ("rotation", "finish"))):
        assert cli(cfg, *step)[0].startswith(f"version {v}: ")
        hosts[v] = write_host_files(store, tmp_path / f"v{v}")
        assert_kept(cfg)
    assert (hosts[1] / "server.cert").read_bytes() == (made / LAYOUT["server.cert"]).read_bytes()
    assert "ca.key" in store.read().files  # the new CA signs from here on
    cli(cfg, "rotate", "server")
    assert_kept(cfg)

    # etcd's own gRPC gateway dials etcd with the serving pair as a client pair, which
    # easy-rsa's server type (serverAuth only) is not: that alone is refused while the etcd
    # host serves easy-rsa's certificate (v1, v2); pkisvc's has both usages.
    neighbours_talk(store, {v: hosts[v] for v in (1, 2, 3, 4)}, tmp_path / "etcd-host",
                    tmp_path, lambda cur, words: cur <= 2 and words.endswith(
                        "certificate specifies an incompatible key usage"))


def pasted_pillar(made: Path, dest: Path) -> Path:
    """The seed's pasted pillar: the host files' PEM under kubernetes:certs, no ca.key."""
    import yaml
    certs = {name: (made / where).read_text() for name, where in LAYOUT.items()
             if name != "ca.key"}
    dest.write_text(yaml.safe_dump({"kubernetes": {"certs": certs}}))
    return dest
