"""Every export is an event naming who asked (issue 17): `backup`, `export-pillar`, `migrate`,
with the operator's identity from `--actor`, PKISVC_ACTOR or the Vault token."""
from __future__ import annotations

import getpass
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pkisvc.backends.files import FilesBackend
from pkisvc.backends.vault import VaultBackend
from pkisvc.cli import main


def config(tmp_path: Path, **extra: Any) -> Path:
    cfg = tmp_path / "pkisvc.yaml"
    cfg.write_text(json.dumps({"data_dir": str(tmp_path / "data"), "key_type": "ecdsa-p256",
                               **extra}))
    return cfg


def cli(cfg: Path, *args: str, env: dict[str, str] | None = None) -> str:
    r = CliRunner().invoke(main, ["--config", str(cfg), *args],
                           env={"PKISVC_ACTOR": None, **(env or {})}, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    return r.output


def exports(events: list[Any]) -> list[tuple[str, str]]:
    return [(e.action, e.actor) for e in events
            if e.action in ("backup", "export-pillar", "migrate")]


def test_backup_and_export_pillar_each_leave_one_event_naming_the_actor(tmp_path):
    cfg = config(tmp_path)
    cli(cfg, "init")
    dest = tmp_path / "b.tar.gz"
    cli(cfg, "--actor", "alice", "backup", "--to", str(dest))
    printed = cli(cfg, "export-pillar", env={"PKISVC_ACTOR": "bob"})
    assert "PRIVATE KEY" in printed
    cli(cfg, "export-pillar", "--version", "1")
    files = FilesBackend(tmp_path / "data")
    assert exports(files.audit()) == [("export-pillar", f"cli:{getpass.getuser()}"),
                                      ("export-pillar", "bob"), ("backup", "alice")]
    backup = next(e for e in files.audit() if e.action == "backup")
    assert backup.version == 1 and str(dest) in backup.reason
    assert set(backup.items) == {"ca", "server", "kubecfg"}
    with tarfile.open(dest) as tar:  # the backup carries its own event
        trail = tar.extractfile("pkisvc-backup/audit.jsonl").read().decode()  # type: ignore
    assert [json.loads(x)["action"] for x in trail.splitlines()][-1] == "backup"
    # Changes name the operator the same way.
    cli(cfg, "--actor", "carol", "rotate", "server")
    assert files.versions()[-1].actor == "carol"


@pytest.mark.parametrize("actor", ["", " padded", "two\nlines", "x" * 129])
def test_a_bad_actor_is_a_usage_error(tmp_path, actor):
    r = CliRunner().invoke(main, ["--config", str(config(tmp_path)), "--actor", actor, "init"])
    assert r.exit_code == 2 and "--actor" in r.output
    assert not (tmp_path / "data" / "generations").exists()


@pytest.mark.vault
def test_vault_token_display_name_is_the_actor_and_migrate_leaves_one_event(openbao,
                                                                            tmp_path):
    over = openbao.settings_overrides()
    token = openbao.service_token(over["cluster"], display_name="dana")
    vault = {"addr": openbao.addr, "token": token}
    files_cfg = config(tmp_path, cluster=over["cluster"], vault=vault)
    cli(files_cfg, "init")
    out = cli(files_cfg, "--actor", "erin", "migrate", "--to", "vault")
    assert out.startswith("migrated 1 versions")
    files = FilesBackend(tmp_path / "data")
    target = VaultBackend(openbao.addr, cluster=over["cluster"], token=over["vault.token"])
    for backend in (files, target):
        assert exports(backend.audit()) == [("migrate", "erin")]

    vault_cfg = config(tmp_path, backend="vault", cluster=over["cluster"], vault=vault)
    cli(vault_cfg, "backup", "--to", str(tmp_path / "v.tar.gz"))
    cli(vault_cfg, "rotate", "kubecfg")
    assert exports(target.audit())[0] == ("backup", "vault:token-dana")
    assert target.versions()[-1].actor == "vault:token-dana"
    cli(vault_cfg, "export-pillar", env={"PKISVC_ACTOR": "frank"})  # a name given wins
    assert exports(target.audit())[0] == ("export-pillar", "frank")
