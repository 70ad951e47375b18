"""docker/: no Docker engine runs here, so check what the files promise against the code."""
import logging
import re

import yaml

from pkisvc.settings import Settings
from tests.conftest import REPO

DOCKER = REPO / "docker"
APP = "pkisvc.app:create_app()"


def compose():
    return yaml.safe_load((DOCKER / "docker-compose.yml").read_text())


def test_compose_sets_only_variables_settings_reads(caplog):
    env = {k: str(v) for k, v in compose()["services"]["pkisvc"]["environment"].items()}
    assert env and all(k.startswith("PKISVC_") for k in env)
    with caplog.at_level(logging.WARNING, logger="pkisvc.settings"):
        settings = Settings.load(env=env)  # a bad value or unknown key would say which
    assert not [r for r in caplog.records if "unknown environment variable" in r.message]
    assert settings.backend == "vault"
    assert settings.vault.addr == "http://openbao:8200"
    assert settings.vault.token_file == "/run/secrets/pkisvc_vault_token"
    assert settings.vault.max_versions == 1000


def test_compose_runs_the_app_factory_with_a_token_from_a_file():
    c = compose()
    svc = c["services"]["pkisvc"]
    assert svc["command"][-1] == APP
    assert svc["build"]["dockerfile"] == "docker/Dockerfile"
    assert "pkisvc_vault_token" in svc["secrets"] and "pkisvc_vault_token" in c["secrets"]
    assert "/v1/health" in " ".join(svc["healthcheck"]["test"])
    assert c["services"]["openbao"]["command"] == ["server",
                                                   "-config=/openbao/config/openbao.hcl"]


def test_dockerfile_is_slim_non_root_gunicorn_with_a_healthcheck():
    text = (DOCKER / "Dockerfile").read_text()
    assert re.search(r"^FROM python:3\.11-slim$", text, re.M)
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and users[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*/v1/health", text, re.M)
    cmd = re.search(r"^CMD (\[.*\])$", text, re.M)
    assert cmd and yaml.safe_load(cmd.group(1))[-1] == APP
    assert "'/src[vault]'" in text  # hvac comes with the image


def test_bao_inside_the_openbao_container_reaches_its_listener():
    """The README's `docker compose exec openbao bao …` steps: the CLI defaults to https, the
    listener has no TLS, so the container must name the address and scheme."""
    hcl = (DOCKER / "openbao.hcl").read_text()
    assert re.search(r"tls_disable\s*=\s*true", hcl)
    port = re.search(r'address\s*=\s*"0\.0\.0\.0:(\d+)"', hcl).group(1)
    env = compose()["services"]["openbao"]["environment"]
    assert env["BAO_ADDR"] == f"http://127.0.0.1:{port}"
