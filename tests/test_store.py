"""CertStore over a real backend: every operation, its history, its audit trail."""
import hashlib
import os
import subprocess
import sys

import pytest
import yaml

from pkisvc import pki
from pkisvc.changes import parse_files
from pkisvc.errors import (
    AlreadyInitialised,
    AnswerLost,
    BackendUnavailable,
    Conflict,
    InvalidMaterial,
    InvalidRequest,
    NotFound,
)
from pkisvc.imports import read_import_dir, read_import_pillar
from pkisvc.model import TRUST_FILE
from pkisvc.store import CertStore
from tests.conftest import REPO, make_settings, openssl


def assert_whole(store, version):
    gen = store.read(version)
    assert gen.record.version == version
    certs = parse_files(gen.files)
    pki.check_set(certs)
    assert gen.record.items["server"].fingerprint == pki.fingerprint(certs.server)
    assert gen.record.items["ca"].fingerprint == pki.fingerprint(certs.ca)
    return certs


def test_init_makes_version_one_and_only_once(store):
    rec = store.init(actor="t")
    assert (rec.version, rec.operation, rec.parent) == (1, "init", None)
    assert_whole(store, 1)
    with pytest.raises(AlreadyInitialised):
        store.init(actor="t")
    assert store.latest() == 1


def test_a_change_builds_on_the_generation_this_process_wrote_without_parsing_it(
        store, monkeypatch):
    store.init(actor="t")
    store.rotate_leaf("server", actor="t")
    parsed = []
    for name in ("load_cert", "load_certs", "load_key", "load_public_keys"):
        real = getattr(pki, name)
        monkeypatch.setattr(pki, name, lambda *a, real=real, name=name, **k: (
            parsed.append(name), real(*a, **k))[1])
    rec = store.rotate_leaf("kubecfg", actor="t")
    assert parsed == []  # version 2 was this process's own: its files are what it wrote
    two, three = store.read(2), store.read(3)
    assert {n for n in three.files if three.files[n] != two.files[n]} == {
        "kubecfg.crt", "kubecfg.key"}
    assert rec.items["server"] == two.record.items["server"]
    monkeypatch.undo()
    assert_whole(store, 3)


def test_a_change_builds_on_another_process_s_version_when_that_is_the_latest(
        backend, settings):
    # On files, another process's backend; on Vault this one's (the version is not ours).
    elsewhere = type(backend)(backend.root) if backend.name == "files" else backend
    one, other = CertStore(backend, settings), CertStore(elsewhere, settings)
    one.init(actor="t")
    one.rotate_leaf("server", actor="t")  # one keeps version 2 as its next base
    theirs = other.rotate_ca(actor="t")  # version 3, written elsewhere
    mine = one.rotate_leaf("kubecfg", actor="t")
    assert (mine.version, mine.parent) == (4, 3)
    assert mine.items["ca"] == theirs.items["ca"] and mine.items["server"] == theirs.items[
        "server"]
    assert_whole(one, 4)


def test_changes_on_an_empty_store_say_run_init(store):
    with pytest.raises(NotFound, match="pkisvc init"):
        store.rotate_ca(actor="t")


def test_rotate_ca_replaces_everything(store):
    store.init(actor="t")
    before = store.read(1).record
    rec = store.rotate_ca(actor="t", reason="yearly")
    assert (rec.version, rec.parent, rec.operation, rec.reason) == (2, 1, "rotate-ca", "yearly")
    for item in ("ca", "server", "kubecfg"):
        assert rec.items[item].fingerprint != before.items[item].fingerprint
    assert rec.trust == (rec.items["ca"].fingerprint,)
    assert_whole(store, 2)


@pytest.mark.parametrize("item, other", [("server", "kubecfg"), ("kubecfg", "server")])
def test_rotate_leaf_keeps_the_ca_and_the_other_leaf(store, item, other):
    store.init(actor="t")
    before = store.read(1)
    rec = store.rotate_leaf(item, actor="t")
    after = store.read(2)
    assert rec.operation == f"rotate-{item}"
    assert rec.items[item].fingerprint != before.record.items[item].fingerprint
    assert rec.items["ca"] == before.record.items["ca"]
    assert rec.items[other] == before.record.items[other]
    assert after.files["ca.key"] == before.files["ca.key"]
    assert_whole(store, 2)


def test_rotate_server_with_extra_sans(store):
    store.init(actor="t")
    rec = store.rotate_leaf("server", actor="t", add_sans=["k8s-master-9", "192.0.2.9"])
    assert {"k8s-master-9", "192.0.2.9", "kubernetes"} <= set(rec.items["server"].sans)
    with pytest.raises(InvalidRequest, match="neither an IP"):
        store.rotate_leaf("server", actor="t", add_sans=["bad name"])
    with pytest.raises(InvalidRequest, match="neither an IP"):
        store.rotate_leaf("server", actor="t", sans=["bad name"])
    with pytest.raises(InvalidRequest):
        store.rotate_leaf("ca", actor="t")
    with pytest.raises(NotFound):
        store.rotate_leaf("../etc", actor="t")
    assert store.latest() == 2


def test_rollback_copies_an_old_generation(store):
    store.init(actor="t")
    store.rotate_ca(actor="t")
    rec = store.rollback(1, actor="t", reason="bad CA")
    assert (rec.version, rec.operation, rec.source_version) == (3, "rollback", 1)
    assert dict(store.read(3).files) == dict(store.read(1).files)
    assert rec.items == store.read(1).record.items
    with pytest.raises(NotFound):
        store.rollback(7, actor="t")


def test_every_change_is_audited_once(store):
    store.init(actor="alice")
    store.rotate_ca(actor="bob", reason="r")
    store.rotate_leaf("server", actor="carol")
    store.rollback(1, actor="dave")
    events = store.audit()
    assert [(e.action, e.version, e.actor) for e in events] == [
        ("rollback", 4, "dave"), ("rotate-server", 3, "carol"), ("rotate-ca", 2, "bob"),
        ("init", 1, "alice")]
    assert events[2].reason == "r"
    assert events[1].items == ("server",)


def file_digests(root):
    out = {}
    for dirpath, _, names in os.walk(root / "generations"):
        for n in names:
            p = os.path.join(dirpath, n)
            st = os.stat(p)
            out[p] = (hashlib.sha256(open(p, "rb").read()).hexdigest(), st.st_ino, st.st_mtime_ns)
    return out


def test_twenty_five_rotations_rewrite_nothing(tmp_path):
    settings = make_settings(tmp_path / "data")
    from pkisvc.backends.files import FilesBackend
    store = CertStore(FilesBackend(settings.data_dir), settings)
    store.init(actor="t")
    snapshots = []
    for i in range(25):
        [store.rotate_ca, lambda **kw: store.rotate_leaf("server", **kw),
         lambda **kw: store.rotate_leaf("kubecfg", **kw)][i % 3](actor="t")
        snapshots.append(file_digests(settings.data_dir))
    final = file_digests(settings.data_dir)
    for snap in snapshots:
        assert all(final[p] == v for p, v in snap.items())
    fresh = CertStore(FilesBackend(settings.data_dir), settings)
    assert [r.version for r in fresh.versions()] == list(range(26, 0, -1))
    for v in range(1, 27):
        assert_whole(fresh, v)


def test_two_processes_rotating_at_once_leave_no_gap(tmp_path):
    settings = make_settings(tmp_path / "data")
    CertStore(__import__("pkisvc.backends.files", fromlist=["x"]).FilesBackend(
        settings.data_dir), settings).init(actor="t")
    procs = [subprocess.Popen([sys.executable, "-m", "tests.workers", f"proc{i}",
                               str(settings.data_dir), "20"], cwd=REPO,
                              stdout=subprocess.PIPE, text=True) for i in range(2)]
    acked = []
    for p in procs:
        out, _ = p.communicate(timeout=300)
        assert p.returncode == 0
        acked += [int(x) for x in out.split()]
    from pkisvc.backends.files import FilesBackend
    store = CertStore(FilesBackend(settings.data_dir), settings)
    assert sorted(acked) == list(range(2, 42))
    assert [r.version for r in store.versions()] == list(range(41, 0, -1))
    for r in store.versions():
        assert r.parent == (r.version - 1 or None)
        assert_whole(store, r.version)
    assert len([e for e in store.audit(limit=1000)]) == 41


# --- import ------------------------------------------------------------------------------

def openssl_set(d, *, other_ca_for=None):
    """Make a CA, server and kubecfg pair with the openssl CLI, the seed's file names."""
    d.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    ok = lambda r: r.returncode == 0 or pytest.fail(r.stderr)  # noqa: E731
    ok(openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-subj",
               "/CN=legacy-ca", "-days", "3650", "-addext", "basicConstraints=critical,CA:TRUE",
               "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d))
    ok(openssl("req", "-x509", *ec, "-keyout", "other.key", "-out", "other.crt", "-subj",
               "/CN=other-ca", "-days", "3650", "-addext", "basicConstraints=critical,CA:TRUE",
               "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d))
    (d / "server.ext").write_text("subjectAltName=DNS:kubernetes,IP:10.0.0.1\n"
                                  "extendedKeyUsage=serverAuth,clientAuth\n")
    (d / "client.ext").write_text("extendedKeyUsage=clientAuth\n")
    for name, subj, ext_file, key_file in (("server", "/CN=kube-apiserver", "server.ext",
                                            "server.key"),
                                           ("kubecfg", "/O=system:masters/CN=kubecfg",
                                            "client.ext", "kubecfg.key")):
        ca = "other" if other_ca_for == name else "ca"
        ok(openssl("req", "-new", *ec, "-keyout", key_file, "-out", f"{name}.csr", "-subj", subj,
                   cwd=d))
        cert = "server.cert" if name == "server" else "kubecfg.crt"
        ok(openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey",
                   f"{ca}.key", "-CAcreateserial", "-out", cert, "-days", "365", "-extfile",
                   ext_file, cwd=d))
    for junk in ("other.key", "other.crt", "server.csr", "kubecfg.csr", "server.ext",
                 "client.ext", "ca.srl", "other.srl"):
        (d / junk).unlink(missing_ok=True)
    return d


def openssl_fingerprint(path):
    out = openssl("x509", "-in", str(path), "-noout", "-fingerprint", "-sha256").stdout
    return out.split("=", 1)[1].strip().replace(":", "").lower()


def test_import_of_an_openssl_directory_keeps_fingerprints(store, tmp_path):
    d = openssl_set(tmp_path / "legacy")
    rec = store.import_files(read_import_dir(d), actor="t")
    assert (rec.version, rec.operation) == (1, "import")
    assert rec.items["ca"].fingerprint == openssl_fingerprint(d / "ca.crt")
    assert rec.items["server"].fingerprint == openssl_fingerprint(d / "server.cert")
    assert rec.items["kubecfg"].fingerprint == openssl_fingerprint(d / "kubecfg.crt")
    assert_whole(store, 1)
    store.rotate_leaf("server", actor="t")  # the imported CA key issues new leaves
    assert_whole(store, 2)


def test_import_refuses_a_key_that_does_not_match(store, tmp_path):
    d = openssl_set(tmp_path / "legacy")
    (d / "server.key").write_bytes((d / "kubecfg.key").read_bytes())
    with pytest.raises(InvalidMaterial, match="^server.key: does not match server.cert"):
        store.import_files(read_import_dir(d), actor="t")
    assert store.latest() is None


def test_import_refuses_a_leaf_from_another_ca(store, tmp_path):
    d = openssl_set(tmp_path / "legacy", other_ca_for="kubecfg")
    with pytest.raises(InvalidMaterial, match="^kubecfg.crt: not issued by"):
        store.import_files(read_import_dir(d), actor="t")
    assert store.latest() is None


def test_import_names_a_missing_file(store, tmp_path):
    d = openssl_set(tmp_path / "legacy")
    (d / "kubecfg.key").unlink()
    with pytest.raises(InvalidMaterial, match="^kubecfg.key: missing"):
        store.import_files(read_import_dir(d), actor="t")


def test_import_without_ca_key_cannot_issue_leaves_until_ca_rotation(store, tmp_path):
    d = openssl_set(tmp_path / "legacy")
    (d / "ca.key").unlink()
    store.import_files(read_import_dir(d), actor="t")
    with pytest.raises(Conflict, match="no CA key"):
        store.rotate_leaf("server", actor="t")
    store.rotate_ca(actor="t")
    store.rotate_leaf("server", actor="t")
    assert store.latest() == 3


def test_import_from_a_pasted_pillar(store, tmp_path):
    d = openssl_set(tmp_path / "legacy")
    pillar = {"kubernetes": {"certs": {
        "ca.crt": (d / "ca.crt").read_text(), "ca_key": (d / "ca.key").read_text(),
        "server.cert": (d / "server.cert").read_text(),
        "server.key": (d / "server.key").read_text(),
        "kubecfg.crt": (d / "kubecfg.crt").read_text(),
        "kubecfg.key": (d / "kubecfg.key").read_text()}}}
    f = tmp_path / "kubernetes.sls"
    f.write_text(yaml.safe_dump(pillar))
    rec = store.import_files(read_import_pillar(f, "kubernetes:certs"), actor="t")
    assert rec.items["server"].fingerprint == openssl_fingerprint(d / "server.cert")
    with pytest.raises(InvalidRequest, match="no key 'kubernetes:cert'"):
        read_import_pillar(f, "kubernetes:cert")


def test_trust_bundle_is_what_hosts_get_as_ca_crt(store):
    store.init(actor="t")
    gen = store.read()
    files = store.host_files(gen, ["ca.crt", "server.key"])
    assert files["ca.crt"] == gen.files[TRUST_FILE]
    assert files["server.key"] == gen.files["server.key"]


class _AuditOutage:
    """A backend whose audit appends fail a few times (a Vault leader election) then work."""

    def __init__(self, backend, failures, lost_answers=0):
        self._backend, self.failures, self.lost_answers = backend, failures, lost_answers

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def append_audit(self, event):
        if self.lost_answers:  # written, but the answer never came back
            self.lost_answers -= 1
            self._backend.append_audit(event)
            raise BackendUnavailable("vault at http://127.0.0.1:1: connection reset")
        if self.failures:
            self.failures -= 1
            raise BackendUnavailable("vault at http://127.0.0.1:1: local node not active")
        self._backend.append_audit(event)


def test_a_written_change_is_audited_through_a_short_outage(tmp_path):
    from pkisvc.backends.files import FilesBackend
    backend = _AuditOutage(FilesBackend(tmp_path / "data"), failures=0)
    s = CertStore(backend, make_settings(tmp_path / "data"))
    s.init(actor="test")
    backend.failures = 3
    record = s.rotate_leaf("server", actor="test", reason="during an election")
    assert record.version == 2  # acknowledged: the change happened and is audited
    events = [e for e in s.audit() if e.version == 2]
    assert [(e.action, e.reason) for e in events] == [("rotate-server", "during an election")]


def test_an_audit_event_whose_answer_was_lost_is_not_written_twice(tmp_path):
    from pkisvc.backends.files import FilesBackend
    backend = _AuditOutage(FilesBackend(tmp_path / "data"), failures=0)
    s = CertStore(backend, make_settings(tmp_path / "data"))
    s.init(actor="test")
    backend.lost_answers, backend.failures = 1, 1
    assert s.rotate_leaf("kubecfg", actor="test").version == 2
    assert [e.action for e in s.audit() if e.version == 2] == ["rotate-kubecfg"]


def test_a_pasted_pillar_key_with_a_newline_is_named_in_one_line(tmp_path):
    path = tmp_path / "pillar.sls"
    path.write_text(yaml.safe_dump({"kubernetes": {"cert": {"evil\nname": "x"}}}))
    with pytest.raises(InvalidMaterial) as e:
        read_import_pillar(path, "kubernetes:cert")
    assert e.value.message.startswith("kubernetes:cert:evil\\nname: not one of")
    assert "\n" not in e.value.message


def test_import_refuses_a_ca_whose_issuer_cannot_be_parsed(store, tmp_path):
    """Found by hypothesis: the CA's issuer name is broken but its key still signs the leaves;
    cryptography parses names lazily, so this escaped as a bare ValueError (a traceback)."""
    from cryptography import x509
    from cryptography.hazmat.primitives.serialization import Encoding

    store.init(actor="test")
    gen = store.read()
    files = {n: gen.files["trust.crt" if n == "ca.crt" else n]
             for n in ("ca.crt", "ca.key", "server.cert", "server.key", "kubecfg.crt",
                       "kubecfg.key")}
    ca = x509.load_pem_x509_certificate(files["ca.crt"])
    der = bytearray(ca.public_bytes(Encoding.DER))
    at = der.find(ca.issuer.public_bytes())
    der[at + 13] = 0xFF  # a byte of the CN's UTF8String: no longer UTF-8
    files["ca.crt"] = pki.cert_pem(x509.load_der_x509_certificate(bytes(der)))
    before = store.latest(), len(store.audit(limit=10**6))
    with pytest.raises(InvalidMaterial, match=r"^ca\.crt: not a valid PEM certificate$"):
        store.import_files(files, actor="test")
    assert (store.latest(), len(store.audit(limit=10**6))) == before


class _LostWriteAnswers:
    """A backend whose writes land but whose answers are lost (a connection cut), and whose
    reads fail a few times after (the node is being replaced)."""

    def __init__(self, backend, lost, reads_failing_after=0):
        self._backend, self.lost, self.after = backend, lost, reads_failing_after
        self.failed_reads = 0

    def __getattr__(self, name):
        return getattr(self._backend, name)

    def write(self, gen, *, expected, event=None):
        version = self._backend.write(gen, expected=expected, event=event)
        if self.lost:
            self.lost -= 1
            self.failed_reads = self.after
            raise AnswerLost("vault at http://127.0.0.1:1: connection lost")
        return version

    def read(self, version=None):
        if self.failed_reads:
            self.failed_reads -= 1
            raise BackendUnavailable("vault at http://127.0.0.1:1: cannot connect")
        return self._backend.read(version)


def test_a_committed_change_whose_answer_was_lost_is_reported_done_with_one_event(tmp_path):
    from pkisvc.backends.files import FilesBackend
    backend = _LostWriteAnswers(FilesBackend(tmp_path / "data"), lost=0)
    s = CertStore(backend, make_settings(tmp_path / "data"))
    s.init(actor="test")
    backend.lost, backend.after = 1, 2
    record = s.rotate_leaf("server", actor="test", reason="answer lost")
    assert (record.version, s.latest()) == (2, 2)
    assert s.read(2).record == record
    assert [(e.action, e.reason) for e in s.audit() if e.version == 2] == [
        ("rotate-server", "answer lost")]
