"""The planners (pkisvc.changes) alone: no backend, no clock — a base, profiles, keys and now in,
a draft out.  `settle` does what the store does with a draft: check it, store it as files and
a record, and parse it back as the next base.
"""
from __future__ import annotations

import dataclasses
import functools
from datetime import UTC, datetime, timedelta

import pytest

from pkisvc import changes, metrics, pki
from pkisvc.backends.files import FilesBackend
from pkisvc.changes import Base, Draft, Keys, Planner, Profiles
from pkisvc.errors import Conflict, InvalidRequest, NotFound
from pkisvc.model import ITEMS
from pkisvc.store import CertStore
from tests.conftest import make_settings

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
LATER = NOW + timedelta(days=3650)  # every leaf and the CA are due by then


@pytest.fixture(scope="module")
def profiles(tmp_path_factory: pytest.TempPathFactory) -> Profiles:
    return Profiles.from_settings(make_settings(tmp_path_factory.mktemp("settings")))


def settle(draft: Draft, base: Base | None, operation: str = "test", *,
           key_pairs: tuple[str, ...] = (), now: datetime = NOW) -> Base:
    """Check a draft and make it the next generation, parsed, as the store would."""
    pki.check_set(draft.certs)
    version = base.version + 1 if base else 1
    gen = changes.generation(draft, version=version, parent=base.version if base else None,
                             created_at=now, actor="test", operation=operation, reason="")
    return changes.parse(gen, key_pairs)


def plan(planner: Planner, base: Base | None, profiles: Profiles, keys: Keys | None = None,
         now: datetime = NOW, **options: object) -> Draft:
    return functools.partial(planner, **options)(base, profiles, keys or Keys(), now)


@pytest.fixture(scope="module")
def first(profiles: Profiles) -> Base:
    return settle(plan(changes.init, None, profiles), None, "init")


def fingerprints(base_or_draft: Base | Draft) -> dict[str, str]:
    c = (base_or_draft.draft if isinstance(base_or_draft, Base) else base_or_draft).certs
    return {i: pki.fingerprint(getattr(c, i)) for i in ITEMS}


def key_bytes(key: pki.PrivateKey | None) -> bytes | None:
    return pki.key_pem(key) if key is not None else None


# --- what each planner changes, and what it keeps -----------------------------------------

def test_init_makes_a_whole_set_from_the_keys_it_is_given_at_now(profiles):
    made = {n: pki.generate_key("ecdsa-p256") for n in ITEMS}
    draft = plan(changes.init, None, profiles, Keys(made=made))
    pki.check_set(draft.certs)
    assert draft.certs.ca_key is made["ca"] and draft.certs.server_key is made["server"]
    assert draft.certs.kubecfg_key is made["kubecfg"]
    assert draft.certs.trust == (draft.certs.ca,)
    assert draft.certs.ca.not_valid_before_utc == NOW - pki.BACKDATE  # now came in, no clock


@pytest.mark.parametrize("item", ["server", "kubecfg"])
def test_rotating_a_leaf_changes_that_leaf_only(profiles, first, item):
    draft = plan(changes.rotate_leaf, first, profiles, item=item)
    after = settle(draft, first)
    other = "kubecfg" if item == "server" else "server"
    before_fp, after_fp = fingerprints(first), fingerprints(after)
    assert after_fp[item] != before_fp[item]
    assert after_fp["ca"] == before_fp["ca"] and after_fp[other] == before_fp[other]
    old, new = first.draft.certs, after.draft.certs
    assert key_bytes(getattr(new, f"{item}_key")) != key_bytes(getattr(old, f"{item}_key"))
    assert key_bytes(getattr(new, f"{other}_key")) == key_bytes(getattr(old, f"{other}_key"))
    assert key_bytes(new.ca_key) == key_bytes(old.ca_key)
    assert [pki.fingerprint(c) for c in new.trust] == [pki.fingerprint(c) for c in old.trust]


def test_a_reissue_keeps_the_certificates_sans_and_changes_only_what_it_is_asked(tmp_path):
    init_profiles = Profiles.from_settings(make_settings(
        tmp_path, **{"server.sans": ["k8s-master-1", "192.0.2.1"]}))
    base = settle(plan(changes.init, None, init_profiles), None)
    initial = pki.names_of(base.draft.certs.server)
    assert {"kubernetes", "k8s-master-1", "192.0.2.1"} <= set(initial)
    # Settings that changed since init (no extra SANs now) are not applied.
    later = Profiles.from_settings(make_settings(tmp_path))
    for planner in (changes.rotate_ca, changes.rotate_leaf):
        options = {"item": "server"} if planner is changes.rotate_leaf else {}
        kept = plan(planner, base, later, **options).certs.server
        assert pki.names_of(kept) == initial
        assert kept.subject == base.draft.certs.server.subject
    add = changes.leaf_request("server", add=["k8s-master-9", "192.0.2.9"])
    added = pki.names_of(plan(changes.rotate_leaf, base, later, item="server",
                              sans=add).certs.server)
    assert added == (*initial, "k8s-master-9", "192.0.2.9")
    remove = changes.leaf_request("server", remove=["K8S-MASTER-1"])
    assert pki.names_of(plan(changes.rotate_leaf, base, later, item="server",
                             sans=remove).certs.server) == tuple(
        n for n in initial if n != "k8s-master-1")
    whole = changes.leaf_request("server", sans=["a.example", "192.0.2.7"])
    assert pki.names_of(plan(changes.rotate_leaf, base, later, item="server",
                             sans=whole).certs.server) == ("a.example", "192.0.2.7")
    with pytest.raises(InvalidRequest, match="not a SAN"):
        plan(changes.rotate_leaf, base, later, item="server",
             sans=changes.leaf_request("server", remove=["nowhere.example"]))


def test_leaf_requests_are_refused_before_any_planning():
    with pytest.raises(InvalidRequest, match="rotate ca"):
        changes.leaf_request("ca")
    with pytest.raises(NotFound):
        changes.leaf_request("../etc")
    with pytest.raises(InvalidRequest, match="only the server"):
        changes.leaf_request("kubecfg", add=["a.example"])
    with pytest.raises(InvalidRequest):
        changes.leaf_request("server", sans=["bad name"])
    with pytest.raises(InvalidRequest, match="not both"):
        changes.leaf_request("server", sans=["a.example"], remove=["b.example"])


def test_rotate_ca_changes_every_certificate_and_trusts_only_the_new_ca(profiles, first):
    after = settle(plan(changes.rotate_ca, first, profiles), first)
    assert all(a != b for a, b in zip(fingerprints(after).values(),
                                      fingerprints(first).values(), strict=True))
    assert after.draft.certs.trust == (after.draft.certs.ca,)


def test_renew_reissues_only_what_is_due(profiles, first):
    # 30 days before the leaves expire, with renew_before = 31 days: both are due.
    leaves_end = first.draft.certs.server.not_valid_after_utc
    near = leaves_end - timedelta(days=30)
    after = settle(plan(changes.renew, first, profiles, now=near, renew_before=31 * 86400),
                   first, now=near)
    assert fingerprints(after)["ca"] == fingerprints(first)["ca"]
    assert fingerprints(after)["server"] != fingerprints(first)["server"]
    assert fingerprints(after)["kubecfg"] != fingerprints(first)["kubecfg"]
    with pytest.raises(changes.NothingDue):  # renewed: nothing is due on the new base
        plan(changes.renew, after, profiles, now=near, renew_before=31 * 86400)
    with pytest.raises(changes.NothingDue):
        plan(changes.renew, first, profiles, renew_before=86400)


def test_rollback_copies_the_old_generation_and_names_it(profiles, first):
    later = settle(plan(changes.rotate_ca, first, profiles), first)
    back = plan(changes.rollback, later, profiles, old=first)
    assert fingerprints(back) == fingerprints(first)
    assert back.source_version == first.version
    assert settle(back, later).record.source_version == first.version
    # the next change is not a rollback any more
    assert plan(changes.rotate_leaf, settle(back, later), profiles,
                item="server").source_version is None


def test_import_holds_the_set_given_and_refuses_an_open_rotation(profiles, first):
    other = plan(changes.init, None, profiles)
    draft = plan(changes.import_set, first, profiles, certs=other.certs)
    assert fingerprints(draft) == fingerprints(other)
    assert plan(changes.import_set, None, profiles, certs=other.certs).certs is other.certs
    staged = settle(plan(changes.start_rotation, first, profiles), first)
    with pytest.raises(Conflict, match="staged CA rotation is open"):
        plan(changes.import_set, staged, profiles, certs=other.certs)


def test_a_set_imported_without_ca_key_signs_only_after_a_staged_rotation(profiles, first):
    keyless = settle(Draft(dataclasses.replace(first.draft.certs, ca_key=None)), first)
    assert "ca.key" not in changes.files_of(keyless.draft)
    for planner, options in ((changes.rotate_leaf, {"item": "server"}),
                             (changes.renew, {"renew_before": 10**9})):
        with pytest.raises(Conflict, match=r"holds no CA key.*pkisvc rotate ca --staged"):
            plan(planner, keyless, profiles, **options)
    assert plan(changes.rotate_ca, keyless, profiles).certs.ca_key is not None
    # Phase 1 needs no key of the old CA; phase 2 signs with the new one.
    one = settle(plan(changes.start_rotation, keyless, profiles), keyless)
    assert one.draft.certs.ca_key is None
    two = settle(plan(changes.continue_rotation, one, profiles), one)
    assert two.draft.certs.ca_key is not None
    assert pki.names_of(two.draft.certs.server) == pki.names_of(first.draft.certs.server)
    three = settle(plan(changes.finish_rotation, two, profiles), two)
    assert three.draft.certs.trust == (two.draft.certs.ca,)


# --- the staged rotation, phase by phase -----------------------------------------------------

def test_staged_rotation_phases(profiles, first):
    old_ca = first.draft.certs.ca
    one = settle(plan(changes.start_rotation, first, profiles), first)
    new_ca = pki.load_cert(one.draft.extra_files[changes.NEXT_CA_CERT], "next")
    assert one.record.rotation == {"phase": 1, "old_ca": pki.fingerprint(old_ca),
                                   "new_ca": pki.fingerprint(new_ca), "started": 2}
    assert one.draft.certs.trust == (old_ca, new_ca)
    assert fingerprints(one) == fingerprints(first)  # leaves unchanged in phase 1

    two = settle(plan(changes.continue_rotation, one, profiles), one)
    assert two.draft.certs.ca == new_ca and two.draft.certs.trust == (old_ca, new_ca)
    assert two.record.rotation is not None and two.record.rotation["phase"] == 2
    assert not set(changes.NEXT_CA_FILES) & set(changes.files_of(two.draft))
    for leaf in (two.draft.certs.server, two.draft.certs.kubecfg):
        leaf.verify_directly_issued_by(new_ca)

    three = settle(plan(changes.finish_rotation, two, profiles), two)
    assert three.draft.certs.trust == (new_ca,) and three.record.rotation is None
    assert fingerprints(three) == fingerprints(two)


def test_abort_drops_the_next_ca_in_phase_one_only(profiles, first):
    one = settle(plan(changes.start_rotation, first, profiles), first)
    aborted = plan(changes.abort_rotation, one, profiles)
    assert aborted.certs.trust == (first.draft.certs.ca,) and aborted.rotation is None
    assert not set(changes.NEXT_CA_FILES) & set(aborted.extra_files)
    two = settle(plan(changes.continue_rotation, one, profiles), one)
    with pytest.raises(Conflict, match="cannot abort: phase 2 .after phase 1, roll back"):
        plan(changes.abort_rotation, two, profiles)


@pytest.mark.parametrize("planner, message", [
    (changes.continue_rotation, "cannot continue: no staged rotation is open"),
    (changes.finish_rotation, "cannot finish: no staged rotation is open"),
    (changes.abort_rotation, "cannot abort: no staged rotation is open"),
])
def test_steps_out_of_order_are_refused(profiles, first, planner, message):
    with pytest.raises(Conflict, match=message):
        plan(planner, first, profiles)


@pytest.mark.parametrize("planner, options", [
    (changes.rotate_ca, {}), (changes.rotate_leaf, {"item": "server"}),
    (changes.start_rotation, {}), (changes.renew, {"renew_before": 10**9}),
])
def test_an_open_rotation_refuses_other_changes(profiles, first, planner, options):
    one = settle(plan(changes.start_rotation, first, profiles), first)
    with pytest.raises(Conflict, match="staged CA rotation is open"):
        plan(planner, one, profiles, **options)


def test_every_staged_step_keeps_its_stored_operation_name():
    assert {w: op for w, (op, _, _) in changes.STAGED_STEPS.items()} == {
        "start": "ca-stage-trust", "continue": "ca-stage-switch",
        "finish": "ca-stage-finish", "abort": "ca-stage-abort"}


# --- keys are made once per change, whatever the retries ------------------------------------

@pytest.mark.parametrize("planner, options, new_keys", [
    (changes.init, {}, {"ca", "server", "kubecfg"}),
    (changes.rotate_ca, {}, {"ca", "server", "kubecfg"}),
    (changes.rotate_leaf, {"item": "server"}, {"server"}),
    (changes.rotate_leaf, {"item": "kubecfg"}, {"kubecfg"}),
    (changes.renew, {"renew_before": 10**9}, {"server", "kubecfg"}),
    (changes.start_rotation, {}, {"next-ca"}),
])
def test_a_retry_on_a_new_base_signs_again_with_the_same_keys(profiles, first, planner, options,
                                                              new_keys):
    keys = Keys()
    draft = plan(planner, first, profiles, keys, **options)
    assert set(keys.made) == new_keys
    made = dict(keys.made)
    # A concurrent writer changed the store meanwhile: the change is planned again on it.
    concurrent = settle(plan(changes.rotate_leaf, first, profiles, item="kubecfg"), first)
    retry = plan(planner, concurrent, profiles, keys, NOW + timedelta(seconds=1), **options)
    assert keys.made == made and all(keys.made[n] is made[n] for n in made)
    for item in {"server", "kubecfg"} & new_keys:
        assert getattr(retry.certs, f"{item}_key") is made[item]
        assert getattr(retry.certs, item) != getattr(draft.certs, item)  # signed again
    if planner is changes.rotate_leaf and options["item"] == "server":
        assert retry.certs.kubecfg == concurrent.draft.certs.kubecfg  # built on the new base


def test_continue_makes_both_leaf_keys_once_of_the_next_cas_type(profiles, first):
    one = settle(plan(changes.start_rotation, first, profiles, Keys("ecdsa-p384")), first)
    keys = Keys()
    a = plan(changes.continue_rotation, one, profiles, keys)
    b = plan(changes.continue_rotation, one, profiles, keys)
    assert a.certs.server_key is b.certs.server_key and a.certs.kubecfg_key is b.certs.kubecfg_key
    assert pki.key_type_of(a.certs.server_key) == "ecdsa-p384"


def test_a_requested_key_type_wins_over_the_default():
    keys = Keys("ecdsa-p384")
    assert pki.key_type_of(keys.get("x", "ecdsa-p256")) == "ecdsa-p384"
    assert keys.get("x", "rsa-2048") is keys.get("x", "ecdsa-p256")


# --- a new key-only item needs no planner, report, metric or renewal edited -----------------

def rotate_fake(base: Base | None, profiles: Profiles, keys: Keys, now: datetime) -> Draft:
    """The one planner a new key-only item brings: a new key pair, every certificate kept."""
    assert base is not None
    pairs = {**base.draft.key_pairs, "fake": keys.get("fake", profiles.key_type)}
    return dataclasses.replace(base.draft, key_pairs=pairs, source_version=None)


def test_a_key_only_item_is_made_once_and_kept_by_every_other_change(profiles, tmp_path):
    fake = dataclasses.replace(profiles, key_pairs=("fake",))
    gens = [settle(plan(changes.init, None, fake), None, key_pairs=("fake",))]

    def step(planner: Planner, now: datetime = NOW, **options: object) -> Base:
        gens.append(settle(plan(planner, gens[-1], fake, now=now, **options), gens[-1],
                           key_pairs=("fake",), now=now))
        return gens[-1]

    def fake_key(base: Base) -> bytes:
        return pki.key_pem(base.draft.key_pairs["fake"])

    files = changes.files_of(gens[0].draft)
    first_key = fake_key(gens[0])
    assert files["fake.pub"] == pki.public_key_pem(gens[0].draft.key_pairs["fake"])
    assert b"PRIVATE KEY" in files["fake.key"] and b"PRIVATE" not in files["fake.pub"]
    assert set(gens[0].record.items) == set(ITEMS)  # a record describes certificates only

    for planner, options in ((changes.rotate_leaf, {"item": "server"}),
                             (changes.rotate_leaf, {"item": "kubecfg"}),
                             (changes.rotate_ca, {}),
                             (changes.start_rotation, {}), (changes.continue_rotation, {}),
                             (changes.finish_rotation, {}),
                             (changes.start_rotation, {}), (changes.abort_rotation, {}),
                             (changes.import_set, {"certs": gens[0].draft.certs})):
        assert fake_key(step(planner, **options)) == first_key, planner.__name__
    assert fake_key(step(changes.renew, LATER, renew_before=31 * 86400)) == first_key

    rotated = step(rotate_fake)
    assert fake_key(rotated) != first_key
    assert fingerprints(rotated) == fingerprints(gens[-2])  # no certificate changed
    assert fake_key(step(changes.rotate_leaf, item="server")) == fake_key(rotated)
    assert fake_key(step(changes.rollback, old=gens[0])) == first_key

    # The reports are of certificates: the key-only item is in none of them.
    last = gens[-1].record
    assert [r["certificate"] for r in changes.expiration(last, LATER)] == [
        "server", "kubecfg", "ca"]
    report = changes.renewal_report(last, LATER, make_settings(tmp_path))
    assert {d["item"] for d in report["due"]} == {"server", "kubecfg"}


def test_metrics_and_the_store_pass_a_key_only_item_by(profiles, tmp_path):
    """Written to a real files store: metrics, check-expiration and renew ignore the item."""
    fake = dataclasses.replace(profiles, key_pairs=("fake",))
    draft = plan(changes.init, None, fake)
    gen = changes.generation(draft, version=1, parent=None, created_at=NOW, actor="t",
                             operation="init", reason="")
    backend = FilesBackend(tmp_path / "data")
    backend.write(gen, expected=None)
    store = CertStore(backend, make_settings(tmp_path / "data"), clock=lambda: LATER)
    text = metrics.render(store).decode()
    assert 'item="server"' in text and "fake" not in text
    assert [r["certificate"] for r in store.expiration()] == ["server", "kubecfg", "ca"]
    report, record = store.renew(actor="t")
    assert record is not None and {d["item"] for d in report["due"]} == {"server", "kubecfg"}
    assert store.read().files["fake.key"] == gen.files["fake.key"]
    assert store.read().files["fake.pub"] == gen.files["fake.pub"]
