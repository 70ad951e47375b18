"""`pkisvc backup`'s tarball (pkisvc/backup.py), over both backends."""
import json
import stat
import tarfile

import pytest

from pkisvc import backup
from pkisvc.backends.files import FilesBackend
from pkisvc.errors import InvalidRequest
from pkisvc.store import CertStore
from tests.conftest import make_settings
from tests.stored import as_directory


def test_backup_holds_every_generation_the_audit_and_the_tokens_all_0600(store, tmp_path):
    store.init(actor="ops")
    store.rotate_ca(actor="ops", reason="yearly")
    token = store.create_token("deploy", ["read"], actor="ops")
    dest = tmp_path / "backup.tar.gz"
    assert backup.write(store, dest) == 2
    assert stat.S_IMODE(dest.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temp file
    with tarfile.open(dest) as tar:
        members = tar.getmembers()
        got = {m.name: tar.extractfile(m).read() for m in members}
    assert {m.mode for m in members} == {0o600}
    for rec in store.versions():
        base = f"pkisvc-backup/generations/{rec.version:06d}"
        assert json.loads(got.pop(f"{base}/record.json")) == rec.to_dict()
        for name, data in store.read(rec.version).files.items():
            assert got.pop(f"{base}/{name}") == data  # the CA key too
    events = [json.loads(line) for line in got.pop("pkisvc-backup/audit.jsonl").splitlines()]
    assert [e["action"] for e in events] == [e.action for e in reversed(store.audit())]
    assert [e["action"] for e in events][:2] == ["init", "rotate-ca"]  # oldest first
    tokens = json.loads(got.pop("pkisvc-backup/tokens.json"))
    assert [t["name"] for t in tokens] == ["deploy"]
    assert token.encode() not in json.dumps(tokens).encode()  # only its hash
    assert got == {}


@pytest.mark.parametrize("where", ["no-such-dir/backup.tar.gz", "a-directory"])
def test_a_backup_that_cannot_be_written_leaves_nothing_behind(store, tmp_path, where):
    store.init(actor="ops")
    (tmp_path / "a-directory").mkdir()
    (tmp_path / "a-directory" / "keep").write_text("x")
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(InvalidRequest, match=str(tmp_path / where)):
        backup.write(store, tmp_path / where)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_store_with_older_directory_generations_backs_up_alike(tmp_path):
    """Versions an older pkisvc wrote as directories and versions written as one file each
    give the tarball one layout: `generations/00000N/` with record.json and the files."""
    settings = make_settings(tmp_path / "data")
    store = CertStore(FilesBackend(settings.data_dir), settings)
    store.init(actor="ops")
    store.rotate_ca(actor="ops")
    assert backup.write(store, tmp_path / "files.tar.gz") == 2
    as_directory(settings.data_dir, 1)
    mixed = CertStore(FilesBackend(settings.data_dir), settings)
    assert backup.write(mixed, tmp_path / "mixed.tar.gz") == 2

    def members(path):
        with tarfile.open(path) as tar:
            return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
    assert members(tmp_path / "mixed.tar.gz") == members(tmp_path / "files.tar.gz")
    assert "pkisvc-backup/generations/000001/ca.key" in members(tmp_path / "mixed.tar.gz")
