import ipaddress
import logging
from pathlib import Path

import pytest

from pkisvc import settings as settings_mod
from pkisvc.errors import ConfigError
from pkisvc.settings import Settings


def test_defaults_are_the_design_table():
    s = Settings.load(env={})
    assert (s.cluster, s.backend, s.bind, s.key_type) == ("default", "files", "127.0.0.1:8800",
                                                         "rsa-2048")
    assert s.data_dir == Path("./pkisvc-data").absolute()
    assert (s.ca.common_name, s.ca.days) == ("kubernetes-ca", 3650)
    assert (s.server.common_name, s.server.sans, s.server.days) == ("kube-apiserver", (), 365)
    assert (s.kubecfg.common_name, s.kubecfg.organization, s.kubecfg.days) == (
        "kubecfg", "system:masters", 365)
    assert s.service_cidr == ipaddress.ip_network("10.0.0.0/24")
    assert s.cluster_domain == "cluster.local"
    assert (s.renew_before, s.ca_warn_before) == (30 * 86400, 180 * 86400)
    assert s.roles["node"] == ("ca.crt",)
    assert set(s.roles["master"]) == {"ca.crt", "server.cert", "server.key", "kubecfg.crt",
                                      "kubecfg.key", "sa.key", "sa.pub"}
    assert s.sa_overlap == 7 * 86400
    assert (s.vault.mount, s.vault.prefix, s.vault.timeout, s.vault.max_versions) == (
        "secret", "pkisvc", 5.0, 1000)


def test_file_then_environment_override(tmp_path):
    cfg = tmp_path / "pkisvc.yaml"
    cfg.write_text("cluster: prod\nkey_type: ecdsa-p384\n"
                   "server:\n  sans: [k8s-master-1, 10.1.2.3]\n"
                   "vault:\n  addr: http://127.0.0.1:1\n")
    env = {"PKISVC_KEY_TYPE": "rsa-3072", "PKISVC_VAULT__TIMEOUT": "2.5",
           "PKISVC_SERVER__SANS": '["lb.example.org"]', "VAULT_TOKEN": "from-vault-env"}
    s = Settings.load(cfg, env=env)
    assert s.cluster == "prod"
    assert s.key_type == "rsa-3072"
    assert s.server.sans == ("lb.example.org",)
    assert s.vault.addr == "http://127.0.0.1:1"
    assert s.vault.timeout == 2.5
    assert s.vault.token == "from-vault-env"


def test_config_path_from_environment(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("cluster: staging\n")
    assert Settings.load(env={"PKISVC_CONFIG": str(cfg)}).cluster == "staging"


@pytest.mark.parametrize("text, key", [
    ("colour: blue\n", "colour"),
    ("server:\n  sanz: []\n", "server.sanz"),
    ("key_type: dsa-1024\n", "key_type"),
    ("service_cidr: 10.0.0.1/33\n", "service_cidr"),
    ("service_cidr: 10.0.0.1/24\n", "service_cidr"),
    ("server:\n  sans: ['bad name!']\n", "server.sans"),
    ("renew_before: soon\n", "renew_before"),
    ("ca:\n  days: -3\n", "ca.days"),
    ("roles:\n  master: [ca.key]\n", "roles.master"),
    ("tokens: [{name: ops, sha256: xyz, scopes: [read]}]\n", "tokens[0].sha256"),
    ("tokens: [{name: ops, sha256: " + "a" * 64 + ", scopes: [root]}]\n", "tokens[0].scopes"),
    ("bind: localhost\n", "bind"),
    ("cluster: ../etc\n", "cluster"),
])
def test_bad_setting_names_the_key(tmp_path, text, key):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as e:
        Settings.load(cfg, env={})
    assert f"'{key}'" in e.value.message
    assert "\n" not in e.value.message


def test_bad_environment_value_names_the_key():
    with pytest.raises(ConfigError, match="'key_type'"):
        Settings.load(env={"PKISVC_KEY_TYPE": "rsa-1024"})


def test_unreadable_and_malformed_files_are_one_line(tmp_path):
    with pytest.raises(ConfigError, match="config file"):
        Settings.load(tmp_path / "missing.yaml", env={})
    bad = tmp_path / "bad.yaml"
    bad.write_text("cluster: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Settings.load(bad, env={})


def test_unknown_environment_variable_is_warned_about_once(caplog):
    settings_mod._warned.discard("PKISVC_COLOUR")
    with caplog.at_level(logging.WARNING, logger="pkisvc.settings"):
        Settings.load(env={"PKISVC_COLOUR": "blue"})
        Settings.load(env={"PKISVC_COLOUR": "blue"})
    assert [r.getMessage() for r in caplog.records].count(
        "ignoring unknown environment variable PKISVC_COLOUR") == 1


def test_durations():
    s = Settings.load(env={"PKISVC_RENEW_BEFORE": "12h", "PKISVC_CA_WARN_BEFORE": "90"})
    assert (s.renew_before, s.ca_warn_before) == (12 * 3600, 90)


def test_an_unknown_key_with_a_newline_fails_in_one_line(tmp_path):
    cfg = tmp_path / "pkisvc.yaml"
    cfg.write_text('"evil\\nkey": 1\nserver:\n  "x\\ry": 2\n')
    with pytest.raises(ConfigError) as e:
        Settings.load(cfg, env={})
    assert e.value.message == f"unknown setting 'evil\\nkey' in {cfg}"
    cfg.write_text('server:\n  "x\\ry": 2\n')
    with pytest.raises(ConfigError, match=r"'server\.x\\ry'") as e:
        Settings.load(cfg, env={})
    assert "\r" not in e.value.message
