"""The files backend on disk: modes, crash debris, kill -9, an unusable data dir."""
import os
import random
import signal
import stat
import subprocess
import sys

import pytest

from pkisvc import pki
from pkisvc.backends.files import FilesBackend
from pkisvc.changes import parse_files
from pkisvc.errors import BackendUnavailable, VersionConflict
from pkisvc.store import CertStore
from tests.conftest import REPO, make_settings, wait_for
from tests.stored import gen_file, stored


@pytest.fixture
def backend(tmp_path):
    """This module is about files on disk: its `store` runs over the files backend only."""
    return FilesBackend(tmp_path / "data")


def mode(p):
    return stat.S_IMODE(os.stat(p).st_mode)


def test_key_files_0600_and_directories_0700(store, settings):
    store.init(actor="t")
    store.rotate_ca(actor="t")
    root = settings.data_dir
    assert mode(root) == 0o700
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            assert mode(os.path.join(dirpath, d)) == 0o700, d
        for f in filenames:
            assert mode(os.path.join(dirpath, f)) == 0o600, f
    # A version is one file holding its keys: 0600 like the rest (checked above).
    assert sorted(os.listdir(root / "generations")) == ["000001.gen", "000002.gen"]
    assert "ca.key" in stored(root, 2).files
    assert (root / "current").read_text() == "2\n"


def test_the_umask_cannot_loosen_modes(tmp_path):
    old = os.umask(0)
    try:
        settings = make_settings(tmp_path / "data")
        CertStore(FilesBackend(settings.data_dir), settings).init(actor="t")
    finally:
        os.umask(old)
    assert mode(gen_file(settings.data_dir, 1)) == 0o600  # holds server.key
    assert "server.key" in stored(settings.data_dir, 1).files
    assert mode(settings.data_dir / "generations") == 0o700


def test_debris_is_never_mistaken_for_a_generation(store, settings):
    store.init(actor="t")
    root = settings.data_dir
    whole = gen_file(root, 1).read_bytes()
    torn = root / "tmp" / "000002.gen.999.dead"  # a writer killed before its link
    torn.write_bytes(whole[:len(whole) // 2])
    half = root / "tmp" / "000002.999.dead"  # an older pkisvc's staging directory
    half.mkdir()
    (half / "ca.crt").write_bytes(b"half written")
    (root / "generations" / "notes").mkdir()
    (root / "generations" / "000002.partial").mkdir()
    (root / "generations" / "000002.gen.partial").write_bytes(whole)
    (root / "generations" / "0000002.gen").write_bytes(whole)  # not a name pkisvc writes
    fresh = CertStore(FilesBackend(root), settings)
    assert fresh.latest() == 1
    assert [r.version for r in fresh.versions()] == [1]
    assert fresh.rotate_ca(actor="t").version == 2
    assert not half.exists() and not torn.exists()
    assert stored(root, 2).record["operation"] == "rotate-ca"


def test_a_whole_generation_ahead_of_current_is_rolled_forward(store, settings):
    store.init(actor="t")
    store.rotate_ca(actor="t")
    (settings.data_dir / "current").write_text("1\n")  # a crash between rename and `current`
    fresh = CertStore(FilesBackend(settings.data_dir), settings)
    assert fresh.latest() == 2
    assert fresh.rotate_ca(actor="t").version == 3


def test_a_torn_current_is_recovered_from_the_generations(store, settings):
    store.init(actor="t")
    store.rotate_ca(actor="t")
    (settings.data_dir / "current").write_bytes(b"")  # lost in a power cut before writeback
    fresh = CertStore(FilesBackend(settings.data_dir), settings)
    assert fresh.latest() == 2
    assert (settings.data_dir / "current").read_text() == "2\n"


def test_unusable_data_dir_is_backend_unavailable_and_writes_nothing(tmp_path):
    blocker = tmp_path / "data"
    blocker.write_text("a file where the data dir should be")
    settings = make_settings(blocker)
    store = CertStore(FilesBackend(blocker), settings)
    with pytest.raises(BackendUnavailable, match="files backend at .*data"):
        store.init(actor="t")
    with pytest.raises(BackendUnavailable):
        store.ping()
    assert blocker.read_text() == "a file where the data dir should be"


def test_torn_audit_line_is_skipped(store, settings):
    store.init(actor="t")
    store.create_token("a", ["read"], actor="t")
    (day,) = (settings.data_dir / "events").glob("*.jsonl")
    with open(day, "ab") as f:
        f.write(b'{"period": "2026')  # a crash mid-append
    store.create_token("b", ["read"], actor="t")
    store.rotate_ca(actor="t")
    assert [(e.action, e.version) for e in store.audit()] == [
        ("rotate-ca", 2), ("token-create", None), ("token-create", None), ("init", 1)]
    assert store.verify().ok  # never acknowledged, so no link was lost


@pytest.mark.slow
def test_sigkill_mid_rotation_twenty_times(tmp_path):
    settings = make_settings(tmp_path / "data")
    CertStore(FilesBackend(settings.data_dir), settings).init(actor="t")
    acked: list[int] = []
    rng = random.Random(7)
    for _ in range(20):
        p = subprocess.Popen([sys.executable, "-m", "tests.workers", "crash",
                              str(settings.data_dir), "100000"], cwd=REPO,
                             stdout=subprocess.PIPE, text=True)
        assert p.stdout is not None
        first = wait_for(p.stdout.readline, 60, "the worker's first rotation")
        acked.append(int(first))
        # Let it run into the middle of further rotations, then kill it without warning.
        deadline_lines = rng.randint(1, 15)
        for _ in range(deadline_lines):
            line = p.stdout.readline()
            if line:
                acked.append(int(line))
        os.kill(p.pid, signal.SIGKILL)
        rest, _ = p.communicate(timeout=30)
        acked += [int(x) for x in rest.split()]
        assert p.returncode == -signal.SIGKILL

        store = CertStore(FilesBackend(settings.data_dir), settings)
        latest = store.latest()
        assert latest is not None and latest >= max(acked)
        records = store.versions()
        assert [r.version for r in records] == list(range(latest, 0, -1))
        pki.check_set(parse_files(store.read().files))
    # Every generation, including those written just before a kill, is whole.
    store = CertStore(FilesBackend(settings.data_dir), settings)
    for r in store.versions():
        gen = store.read(r.version)
        pki.check_set(parse_files(gen.files))
        assert gen.record.version == r.version
    assert set(acked) <= {r.version for r in store.versions()}


def _state(minion, version):
    from pkisvc.model import MinionState, parse_time
    t = parse_time("2026-11-29T12:00:00Z")
    return MinionState(minion, "node", version, t, t)


def test_minion_states_stay_compact_and_every_process_sees_them(tmp_path):
    from pkisvc.backends.files import COMPACT_SLACK
    writer, reader = FilesBackend(tmp_path / "data"), FilesBackend(tmp_path / "data")
    held = {}
    for i in range(COMPACT_SLACK + 300):  # 50 minions, each changing many times
        m = f"k8s-node-{i % 50}"
        new = _state(m, i + 1)
        writer.put_minion(new, expected=held.get(m))
        held[m] = new
        if i % 97 == 0:  # the other process reads along, compactions included
            assert reader.minion(m) == new
    lines = (tmp_path / "data" / "minions.jsonl").read_bytes().splitlines()
    assert len(lines) <= 2 * 50 + COMPACT_SLACK
    assert {s.minion: s for s in reader.minions()} == held
    assert {s.minion: s for s in FilesBackend(tmp_path / "data").minions()} == held
    assert mode(tmp_path / "data" / "minions.jsonl") == 0o600


def test_torn_minion_state_line_is_skipped(tmp_path):
    b = FilesBackend(tmp_path / "data")
    b.put_minion(_state("a", 1), expected=None)
    with open(tmp_path / "data" / "minions.jsonl", "ab") as f:
        f.write(b'{"minion":"b","role":"node","vers')  # a crash mid-append
    b.put_minion(_state("c", 1), expected=None)
    assert [s.minion for s in FilesBackend(tmp_path / "data").minions()] == ["a", "c"]


def test_a_generation_file_is_never_replaced(store, settings):
    """Whatever lands version 2 first keeps it: a writer that finds the name taken once its
    own file is durable (a process not holding the lock put it there) conflicts, and leaves
    nothing behind."""
    store.init(actor="t")
    gen = store.read(1)
    other = gen_file(settings.data_dir, 1).read_bytes()

    class Raced(FilesBackend):
        def _recover(self) -> None:
            super()._recover()
            if not gen_file(self.root, 2).exists():
                gen_file(self.root, 2).write_bytes(other)

    record = type(gen.record).from_dict({**gen.record.to_dict(), "version": 2, "parent": 1})
    with pytest.raises(VersionConflict, match="version 2 already exists"):
        Raced(settings.data_dir).write(type(gen)(record, gen.files), expected=1)
    assert gen_file(settings.data_dir, 2).read_bytes() == other
    assert os.listdir(settings.data_dir / "tmp") == []
