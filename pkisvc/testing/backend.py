"""The contract every backend passes, as abstract tests a backend only feeds a fixture to."""
from __future__ import annotations

import dataclasses
import hashlib
from datetime import UTC, datetime, timedelta

import pytest

from pkisvc import chain
from pkisvc.backends.base import Backend
from pkisvc.errors import Conflict, NotFound, PkiError, VersionConflict
from pkisvc.model import (
    AuditEvent,
    GenerationRecord,
    Installed,
    InstalledFile,
    ItemRecord,
    MinionState,
    SessionRecord,
    StoredGeneration,
    TokenRecord,
)


def fake_session(seed: str, opened_by: str = "t1") -> SessionRecord:
    """Return a session record under the sha256 of seed, opened by the token so named."""
    start = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
    return SessionRecord(sha256=hashlib.sha256(seed.encode()).hexdigest(), name=opened_by,
                         token_sha256=hashlib.sha256(opened_by.encode()).hexdigest(),
                         scopes=("read", "audit"), created=start,
                         expires=start + timedelta(hours=8), seen=start)

NOON = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)


def fake_generation(version: int, note: str = "") -> StoredGeneration:
    """Return a generation of placeholder bytes: backends store bytes, not certificates."""
    item = ItemRecord(fingerprint=f"{version:064x}", serial="1", subject="CN=x", issuer="CN=x",
                      sans=(), not_before=datetime(2026, 1, 1, tzinfo=UTC),
                      not_after=datetime(2027, 1, 1, tzinfo=UTC))
    record = GenerationRecord(
        version=version, parent=version - 1 or None, created_at=NOON,
        actor="test", operation="rotate-ca", reason=note, key_type="ecdsa-p256",
        items={"ca": item, "server": item, "kubecfg": item}, trust=(item.fingerprint,))
    files = {"ca.crt": f"cert {version} {note}".encode(), "ca.key": b"\x00key" * version,
             "server.cert": b"s", "trust.crt": b"t"}
    return StoredGeneration(record, files)


class BackendContract:
    """What pkisvc relies on from a backend (`pkisvc.backends.base.Backend`).

    Subclass it as `Test<Name>Backend` and override the `backend` fixture so that it returns a
    fresh, empty backend for every test.
    """

    @pytest.fixture
    def backend(self) -> Backend:
        """Return a fresh, empty backend: override this in the subclass."""
        pytest.fail(f"{type(self).__name__} must override the `backend` fixture")

    def test_is_a_backend(self, backend: Backend) -> None:
        assert isinstance(backend, Backend)
        assert isinstance(backend.name, str) and backend.name

    def test_empty_store(self, backend: Backend) -> None:
        assert backend.latest() is None
        assert backend.versions() == []
        with pytest.raises(NotFound):
            backend.read()
        with pytest.raises(NotFound):
            backend.read(1)

    def test_write_then_read_byte_for_byte(self, backend: Backend) -> None:
        gen = fake_generation(1)
        assert backend.write(gen, expected=None) == 1
        assert backend.latest() == 1
        for got in (backend.read(), backend.read(1)):
            assert dict(got.files) == dict(gen.files)
            assert got.record.to_dict() == gen.record.to_dict()

    def test_stale_writer_conflicts(self, backend: Backend) -> None:
        backend.write(fake_generation(1), expected=None)
        with pytest.raises(VersionConflict):
            backend.write(fake_generation(1, "second init"), expected=None)
        backend.write(fake_generation(2), expected=1)
        with pytest.raises(VersionConflict):
            backend.write(fake_generation(2, "stale"), expected=1)
        assert backend.latest() == 2
        assert backend.read(2).record.reason == ""

    def test_history_survives_more_than_ten_versions(self, backend: Backend) -> None:
        for v in range(1, 26):
            backend.write(fake_generation(v, f"n{v}"), expected=v - 1 or None)
        assert [r.version for r in backend.versions()] == list(range(1, 26))
        for v in range(1, 26):
            assert dict(backend.read(v).files) == dict(fake_generation(v, f"n{v}").files)

    @pytest.mark.parametrize("version", [0, -1, 99])
    def test_unknown_version_is_not_found(self, backend: Backend, version: int) -> None:
        backend.write(fake_generation(1), expected=None)
        with pytest.raises(NotFound):
            backend.read(version)

    def test_version_must_follow_expected(self, backend: Backend) -> None:
        with pytest.raises(PkiError):
            backend.write(fake_generation(3), expected=None)
        assert backend.latest() is None

    @pytest.mark.parametrize("name", ["../escape", "a/b", "nul\x00", "..", "record.json"])
    def test_path_like_file_names_are_refused(self, backend: Backend, name: str) -> None:
        gen = fake_generation(1)
        bad = StoredGeneration(gen.record, {**gen.files, name: b"x"})
        with pytest.raises(PkiError):
            backend.write(bad, expected=None)
        assert backend.latest() is None

    def test_audit_newest_first_with_since_and_limit(self, backend: Backend) -> None:
        base = NOON
        for i in range(5):
            t = base + timedelta(minutes=i)
            backend.append_audit(AuditEvent(time=t, actor="a", action="rotate-ca", version=i + 1))
        assert [e.version for e in backend.audit()] == [5, 4, 3, 2, 1]
        assert [e.version for e in backend.audit(limit=2)] == [5, 4]
        assert [e.version for e in backend.audit(since=base + timedelta(minutes=3))] == [5, 4]

    def test_audit_keeps_every_field(self, backend: Backend) -> None:
        e = AuditEvent(time=NOON, actor="salt-master", action="pillar",
                       version=3, items=("ca", "server"), remote_addr="127.0.0.1",
                       minion="k8s-master-1", role="master")
        backend.append_audit(e)
        assert backend.audit() == [e]

    def test_a_change_event_is_committed_with_its_generation(self, backend: Backend) -> None:
        base = NOON

        def at(minutes: int) -> datetime:
            return base + timedelta(minutes=minutes)

        for v in range(1, 5):
            change = AuditEvent(time=at(2 * v), actor="a", action="rotate-ca", version=v,
                                items=("ca",), reason=f"n{v}", remote_addr="127.0.0.1")
            assert backend.write(fake_generation(v), expected=v - 1 or None,
                                 event=change) == v
            backend.append_audit(AuditEvent(time=at(2 * v + 1), actor="s", action="pillar",
                                            version=v, minion=f"m{v}"))
        stale = AuditEvent(time=at(20), actor="a", action="rotate-ca", version=4)
        with pytest.raises(VersionConflict):  # a refused write leaves no event
            backend.write(fake_generation(4, "stale"), expected=3, event=stale)
        events = backend.audit()
        assert [(e.action, e.version) for e in events] == [
            ("pillar", 4), ("rotate-ca", 4), ("pillar", 3), ("rotate-ca", 3),
            ("pillar", 2), ("rotate-ca", 2), ("pillar", 1), ("rotate-ca", 1)]
        assert events[1] == AuditEvent(time=at(8), actor="a", action="rotate-ca", version=4,
                                       items=("ca",), reason="n4", remote_addr="127.0.0.1")
        assert [e.time for e in backend.audit(limit=3)] == [at(9), at(8), at(7)]
        assert [e.time for e in backend.audit(since=base + timedelta(minutes=5))] == [
            at(9), at(8), at(7), at(6), at(5)]
        assert backend.audit(since=base + timedelta(minutes=5), limit=2) == events[:2]

    # --- the audit chain (pkisvc.chain) ------------------------------------------------

    def test_versions_are_chained_as_stored(self, backend: Backend) -> None:
        for v in range(1, 4):
            backend.write(fake_generation(v), expected=v - 1 or None,
                          event=AuditEvent(time=NOON, actor="a", action="rotate-ca", version=v))
        stored = backend.chain_versions()
        assert [s.version for s in stored] == [1, 2, 3]
        assert all(s.link is not None and not s.problems for s in stored)
        assert stored[2].record == backend.read(3).record.to_dict()
        assert stored[2].files in (None, chain.file_digests(fake_generation(3).files))
        assert stored[1].link is not None and stored[2].link is not None
        assert stored[2].link["prev"] == stored[1].link["mac"]
        key, unchained = backend.chain_key.load()
        report = chain.verify(key, unchained, stored, backend.chain_periods(),
                              prunable_before=None)
        assert report.ok, report.breaks
        assert report.versions == 3

    def test_appended_events_are_chained_per_period(self, backend: Backend) -> None:
        days = [NOON + timedelta(days=d) for d in range(3)]
        for t in days:
            for minute in range(2):
                backend.append_audit(AuditEvent(time=t + timedelta(minutes=minute),
                                                actor="a", action="key-read"))
        periods = backend.chain_periods()
        assert [p.period for p in periods] == [chain.period_of(t) for t in days]
        # a checkpoint, two events, and (but in the newest) a close naming the next
        assert [[e["kind"] for _, e in p.entries if e] for p in periods] == [
            ["open", "event", "event", "close"], ["open", "event", "event", "close"],
            ["open", "event", "event"]]
        key, unchained = backend.chain_key.load()
        report = chain.verify(key, unchained, [], periods, prunable_before=None)
        assert report.ok and report.events == 6 and report.periods == 3, report.breaks
        # a late event (of an earlier day) goes into the newest period, never a closed one
        backend.append_audit(AuditEvent(time=days[0], actor="late", action="key-read"))
        assert len(backend.chain_periods()[-1].entries) == 4
        assert backend.audit(limit=20)[0].actor == "late"  # listed in the chain's order

    def test_pruning_drops_whole_old_periods_never_the_newest(self, backend: Backend) -> None:
        days = [NOON + timedelta(days=d) for d in range(3)]
        for t in days:
            backend.append_audit(AuditEvent(time=t, actor="a", action="key-read"))
        names = [chain.period_of(t) for t in days]
        assert backend.prune_periods(names[2]) == names[:2]
        assert backend.prune_periods("99999999") == []  # the newest period stays
        assert [p.period for p in backend.chain_periods()] == names[2:]
        assert [e.time for e in backend.audit()] == [days[2]]
        key, unchained = backend.chain_key.load()
        report = chain.verify(key, unchained, [], backend.chain_periods(),
                              prunable_before=names[2])
        assert report.ok, report.breaks
        assert report.notes == [f"events up to {names[1]} were pruned (audit.keep)"]
        purged = chain.verify(key, unchained, [], backend.chain_periods(),
                              prunable_before=names[0])
        assert "purged range" in (purged.breaks or [""])[0]

    def test_text_that_cannot_be_stored_as_sent_is_refused(self, backend: Backend) -> None:
        # OpenBao would keep U+FFFD for a lone surrogate: the digest of what is read back
        # would not be the one linked.  Refused before anything is written.
        gen = fake_generation(1)
        bad = StoredGeneration(dataclasses.replace(gen.record, reason="\ud800"), gen.files)
        with pytest.raises(PkiError):
            backend.write(bad, expected=None)
        with pytest.raises(PkiError):
            backend.append_audit(AuditEvent(time=NOON, actor="\udc80", action="key-read"))
        assert backend.latest() is None and backend.audit() == []
        assert backend.chain_periods() == []

    def test_events_of_one_second_keep_their_order(self, backend: Backend) -> None:
        def change(v: int) -> None:
            backend.write(fake_generation(v), expected=v - 1 or None,
                          event=AuditEvent(time=NOON, actor="a", action="rotate-ca", version=v))
        change(1)
        backend.append_audit(AuditEvent(time=NOON, actor="a", action="token-create"))
        change(2)
        backend.append_audit(AuditEvent(time=NOON, actor="a", action="key-read", version=2))
        backend.append_audit(AuditEvent(time=NOON, actor="b", action="key-read", version=2))
        assert [(e.action, e.actor, e.version) for e in backend.audit()] == [
            ("key-read", "b", 2), ("key-read", "a", 2), ("rotate-ca", "a", 2),
            ("token-create", "a", None), ("rotate-ca", "a", 1)]

    def test_tokens(self, backend: Backend) -> None:
        t = TokenRecord("ops", "a" * 64, ("read", "admin"), NOON)
        backend.put_token(t)
        assert backend.tokens() == [t]
        with pytest.raises(Conflict):
            backend.put_token(t)
        backend.revoke_token("ops")
        assert backend.tokens() == []
        with pytest.raises(NotFound):
            backend.revoke_token("ops")

    # --- the operator pages' sessions --------------------------------------------------

    def test_sessions_add_find_touch_end(self, backend: Backend) -> None:
        a, b = fake_session("a"), fake_session("b", opened_by="t2")
        assert backend.sessions() == [] and backend.session(a.sha256) is None
        backend.add_session(a)
        backend.add_session(b)
        assert backend.session(a.sha256) == a
        c = fake_session("c")  # the same times as a: only the order tells which came first
        backend.add_session(c)
        assert [s.sha256 for s in backend.sessions()] == [a.sha256, b.sha256, c.sha256]
        with pytest.raises(Conflict):
            backend.add_session(dataclasses.replace(b, name="someone else"))
        later = a.seen + timedelta(minutes=5)
        assert backend.touch_session(a.sha256, later) is True
        assert backend.session(a.sha256) == dataclasses.replace(a, seen=later)
        assert [s.sha256 for s in backend.sessions()] == [a.sha256, b.sha256, c.sha256]
        backend.end_sessions([a.sha256, fake_session("never").sha256])
        assert backend.session(a.sha256) is None
        assert backend.touch_session(a.sha256, later) is False  # an ended one stays ended
        assert backend.session(a.sha256) is None
        assert backend.sessions() == [b, c]
        backend.end_sessions([])
        assert backend.sessions() == [b, c]
        assert backend.latest() is None and backend.audit() == []  # sessions are not history

    @pytest.mark.parametrize("digest", ["../x", "A" * 64, "a" * 63, "", "a" * 63 + "\n"])
    def test_sessions_are_kept_under_a_hash_only(self, backend: Backend, digest: str) -> None:
        with pytest.raises(PkiError):
            backend.session(digest)
        with pytest.raises(PkiError):
            backend.add_session(dataclasses.replace(fake_session("x"), sha256=digest))
        with pytest.raises(PkiError):
            backend.end_sessions([digest])
        assert backend.sessions() == []

    def test_ping(self, backend: Backend) -> None:
        backend.ping()

    # --- minions' delivery states ----------------------------------------------------------

    def test_minion_state_round_trip(self, backend: Backend) -> None:
        assert backend.minion("k8s-node-1") is None
        assert backend.minions() == []
        first = MinionState("k8s-node-1", "node", 3, NOON, NOON)
        backend.put_minion(first, expected=None)
        assert backend.minion("k8s-node-1") == first
        touched = MinionState("k8s-node-1", "node", 3, first.received, NOON + timedelta(minutes=10))
        backend.put_minion(touched, expected=first)
        assert backend.minion("k8s-node-1") == touched
        assert backend.minions() == [touched]

    def test_a_host_report_is_kept_and_a_forgotten_minion_is_gone(self, backend: Backend
                                                                   ) -> None:
        first = MinionState("k8s-master-1", "master", 2, NOON, NOON)
        backend.put_minion(first, expected=None)
        backend.put_minion(MinionState("k8s-node-1", "node", 2, NOON, NOON), expected=None)
        reported = dataclasses.replace(first, installed=Installed(
            reported=NOON + timedelta(minutes=1), state="kubernetes.cert.configured",
            result=True, version=2, reporter="salt-master",
            files={"ca.crt": InstalledFile("ab" * 32, 2), "server.key": InstalledFile(None, None)}))
        backend.put_minion(reported, expected=first)
        assert backend.minion("k8s-master-1") == reported
        backend.forget_minion("k8s-master-1")
        assert backend.minion("k8s-master-1") is None
        assert [m.minion for m in backend.minions()] == ["k8s-node-1"]
        with pytest.raises(NotFound):
            backend.forget_minion("k8s-master-1")
        backend.put_minion(first, expected=None)  # it asks again: known again
        assert backend.minion("k8s-master-1") == first

    def test_minion_state_is_replaced_only_if_unchanged(self, backend: Backend) -> None:
        five = timedelta(minutes=5)
        a = MinionState("m-1", "master", 1, NOON, NOON)
        b = MinionState("m-1", "master", 2, NOON + five, NOON + five)
        backend.put_minion(a, expected=None)
        with pytest.raises(VersionConflict):
            backend.put_minion(b, expected=None)  # someone wrote it first
        backend.put_minion(b, expected=a)
        with pytest.raises(VersionConflict):
            backend.put_minion(a, expected=a)  # a stale view
        assert backend.minion("m-1") == b

    def test_every_minion_listed_by_id(self, backend: Backend) -> None:
        names = [f"k8s-node-{i:03d}" for i in range(40, 0, -1)] + ["k8s-master-1"]
        for i, m in enumerate(names):
            backend.put_minion(MinionState(m, "node", i + 1, NOON, NOON), expected=None)
        for v in (2, 3):  # later changes replace, never add
            old = backend.minion("k8s-node-007")
            assert old is not None
            backend.put_minion(MinionState(old.minion, old.role, 100 + v, old.received,
                                           old.asked), expected=old)
        listed = backend.minions()
        assert [s.minion for s in listed] == sorted(names)
        assert {s.minion: s.version for s in listed}["k8s-node-007"] == 103
        assert backend.latest() is None and backend.audit() == []  # states are not history

    @pytest.mark.parametrize("minion", ["../x", "a/b", "", ".hidden", "nul\x00"])
    def test_path_like_minion_ids_are_refused(self, backend: Backend, minion: str) -> None:
        with pytest.raises(PkiError):
            backend.put_minion(MinionState(minion, "node", 1, NOON, NOON), expected=None)
        with pytest.raises(PkiError):
            backend.minion(minion)
        assert backend.minions() == []

    def test_identity_is_a_name_or_none(self, backend: Backend) -> None:
        who = backend.identity()
        assert who is None or (isinstance(who, str) and who)
