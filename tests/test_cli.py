"""The `pkisvc` CLI: through click's runner and as a subprocess, as an operator runs it."""
import json
import os
import re
import stat
import tarfile

import pytest
import yaml
from click.testing import CliRunner

from pkisvc.cli import main, short_duration
from tests.conftest import openssl, run_cli
from tests.stored import unpack


@pytest.fixture
def cfg(tmp_path):
    """A config file on a temp data dir with the default key type (rsa-2048)."""
    f = tmp_path / "pkisvc.yaml"
    f.write_text(f"data_dir: {tmp_path / 'data'}\nserver:\n  sans: [k8s-master-1, 127.0.0.1]\n")
    return f


def cli(cfg, *args, ok=True):
    r = CliRunner().invoke(main, ["--config", str(cfg), *args], catch_exceptions=False)
    if ok:
        assert r.exit_code == 0, r.output
    return r


def pubkey(*args):
    r = openssl(*args)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_operator_session_versions_one_to_six(cfg, tmp_path):
    cli(cfg, "init")
    cli(cfg, "rotate", "ca")
    cli(cfg, "rotate", "ca", "--reason", "second")
    cli(cfg, "rotate", "server")
    cli(cfg, "rotate", "kubecfg")
    assert cli(cfg, "rollback", "2").output.strip() == "version 6: rollback"
    listed = json.loads(cli(cfg, "versions", "-o", "json").output)
    assert [(v["version"], v["operation"]) for v in listed] == [
        (6, "rollback"), (5, "rotate-kubecfg"), (4, "rotate-server"), (3, "rotate-ca"),
        (2, "rotate-ca"), (1, "init")]
    assert listed[3]["reason"] == "second"
    # Each stored version's files (unpacked from its generation file) are a whole set.
    gens = tmp_path / "unpacked"
    for v in range(1, 7):
        d = unpack(tmp_path / "data", v, gens)
        r = openssl("verify", "-CAfile", str(d / "ca.crt"), str(d / "server.cert"),
                    str(d / "kubecfg.crt"))
        assert r.returncode == 0, r.stdout + r.stderr
        for cert, key in (("ca.crt", "ca.key"), ("server.cert", "server.key"),
                          ("kubecfg.crt", "kubecfg.key")):
            assert pubkey("x509", "-in", str(d / cert), "-noout", "-pubkey") == pubkey(
                "pkey", "-in", str(d / key), "-pubout")
    assert (gens / "000006" / "server.cert").read_bytes() == (
        gens / "000002" / "server.cert").read_bytes()
    # The trust bundle and the signing CA agree with what `show` prints.
    shown = cli(cfg, "show", "ca", "--pem").output.encode()
    assert shown == (gens / "000006" / "ca.crt").read_bytes()


def test_show_in_every_format(cfg):
    cli(cfg, "init")
    table = cli(cfg, "show", "server").output
    assert "fingerprint" in table and "kubernetes.default.svc" in table
    data = json.loads(cli(cfg, "show", "server", "-o", "json", "--pem").output)
    assert data["item"] == "server" and data["version"] == 1
    assert data["pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert "PRIVATE KEY" not in cli(cfg, "show", "kubecfg", "-o", "yaml").output
    assert yaml.safe_load(cli(cfg, "show", "trust", "-o", "yaml").output)["version"] == 1


def test_check_expiration_has_kubeadm_columns(cfg):
    cli(cfg, "init")
    out = cli(cfg, "check-expiration").output.splitlines()
    assert out[0].split() == ["CERTIFICATE", "EXPIRES", "RESIDUAL", "TIME", "CERTIFICATE",
                              "AUTHORITY"]
    assert out[1].startswith("server.cert") and out[1].endswith("ca")
    assert re.search(r"UTC\s+36[45]d\s", out[1])
    assert out[3].startswith("ca.crt") and re.search(r"\s(9|10)y$", out[3])
    rows = json.loads(cli(cfg, "check-expiration", "-o", "json").output)
    assert {r["certificate"] for r in rows} == {"ca", "server", "kubecfg"}
    assert yaml.safe_load(cli(cfg, "check-expiration", "-o", "yaml").output) == rows


def test_short_duration_is_kubeadms():
    assert [short_duration(s) for s in (0, 59, 3599, 47 * 3600, 364 * 86400, 3650 * 86400)] == [
        "<invalid>", "59s", "59m", "47h", "364d", "10y"]


def test_audit_lists_every_change(cfg):
    cli(cfg, "init")
    cli(cfg, "rotate", "server", "--reason", "new master")
    events = json.loads(cli(cfg, "audit", "-o", "json").output)
    assert [(e["action"], e["version"]) for e in events] == [("rotate-server", 2), ("init", 1)]
    assert events[0]["actor"].startswith("cli:") and events[0]["reason"] == "new master"


def test_export_pillar_then_import_round_trip(cfg, tmp_path):
    cli(cfg, "init")
    exported = cli(cfg, "export-pillar").output
    doc = yaml.safe_load(exported)
    assert set(doc["kubernetes"]["certs"]) == {"ca.crt", "server.cert", "server.key",
                                               "kubecfg.crt", "kubecfg.key"}
    assert "ca.key" not in exported
    pillar = tmp_path / "legacy.sls"
    pillar.write_text(exported)
    other = tmp_path / "other.yaml"
    other.write_text(f"data_dir: {tmp_path / 'other'}\n")
    cli(other, "import", "--from-pillar", str(pillar), "--key", "kubernetes:certs")
    a = json.loads(cli(cfg, "show", "server", "-o", "json").output)
    b = json.loads(cli(other, "show", "server", "-o", "json").output)
    assert a["fingerprint"] == b["fingerprint"]


def test_backup_holds_every_version_and_is_0600(cfg, tmp_path):
    cli(cfg, "init")
    cli(cfg, "rotate", "ca")
    dest = tmp_path / "backup.tar.gz"
    cli(cfg, "backup", "--to", str(dest))
    assert stat.S_IMODE(os.stat(dest).st_mode) == 0o600
    with tarfile.open(dest) as tar:
        names = tar.getnames()
    assert "pkisvc-backup/generations/000002/ca.key" in names
    assert "pkisvc-backup/generations/000001/record.json" in names
    assert "pkisvc-backup/audit.jsonl" in names


# --- as a subprocess: exit codes and one-line errors ---------------------------------------

def assert_one_line_error(r, *fragments, code=1):
    assert r.returncode == code, (r.stdout, r.stderr)
    assert "Traceback" not in r.stderr + r.stdout
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ")
    for f in fragments:
        assert f in lines[0]


def test_bad_config_is_one_line_and_exit_1(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"data_dir: {tmp_path}\ncolour: blue\n")
    assert_one_line_error(run_cli("--config", str(bad), "versions"), "unknown setting 'colour'")
    assert_one_line_error(run_cli("versions", env={"PKISVC_KEY_TYPE": "dsa",
                                                   "PKISVC_DATA_DIR": str(tmp_path)}),
                          "'key_type'")
    assert_one_line_error(run_cli("--config", str(tmp_path / "nope.yaml"), "versions"),
                          "nope.yaml")


def test_expected_errors_are_one_line_and_exit_1(cfg):
    env = {"PKISVC_CONFIG": str(cfg)}
    assert_one_line_error(run_cli("rotate", "ca", env=env), "pkisvc init")
    assert run_cli("init", env=env).returncode == 0
    assert_one_line_error(run_cli("init", env=env), "initialised")
    assert_one_line_error(run_cli("rollback", "99", env=env), "no version 99")
    assert_one_line_error(run_cli("import", "--from-dir", "/nonexistent", env=env),
                          "not a directory")


def test_usage_errors_exit_2(cfg):
    env = {"PKISVC_CONFIG": str(cfg)}
    for args in (["rollback", "abc"], ["show", "nope"], ["rotate", "everything"],
                 ["versions", "-o", "xml"], ["import"]):
        r = run_cli(*args, env=env)
        assert r.returncode == 2, (args, r.stderr)
        assert "Traceback" not in r.stderr


def test_no_private_key_without_asking(cfg):
    cli(cfg, "init")
    for args in (["versions"], ["show", "server"], ["show", "kubecfg", "--pem"], ["audit"],
                 ["check-expiration"]):
        assert "PRIVATE KEY" not in cli(cfg, *args).output


def test_self_tls_refuses_an_empty_store_and_configured_tls(tmp_path):
    empty = {"PKISVC_DATA_DIR": str(tmp_path / "empty"), "PKISVC_AUTO_INIT": "false"}
    r = run_cli("serve", "--self-tls", env=empty)
    assert r.returncode == 1 and re.fullmatch(r"error: [^\n]*run `pkisvc init`\n", r.stderr)
    both = {"PKISVC_DATA_DIR": str(tmp_path / "d"), "PKISVC_TLS__CERT": "/x.crt",
            "PKISVC_TLS__KEY": "/x.key", "PKISVC_KEY_TYPE": "ecdsa-p256"}
    r = run_cli("serve", "--self-tls", env=both)
    assert r.returncode == 2 and "exclude each other" in r.stderr
    assert not (tmp_path / "d").exists()  # refused before anything was made


def test_serving_hosts_name_what_was_bound():
    from pkisvc.cli import serving_hosts
    assert serving_hosts("127.0.0.1:8800") == ("127.0.0.1",)
    assert serving_hosts("[::1]:8800") == ("::1",)
    assert serving_hosts("pkisvc.example.org:443") == ("pkisvc.example.org",)
    assert serving_hosts("0.0.0.0:8800")[:3] == ("127.0.0.1", "::1", "localhost")
