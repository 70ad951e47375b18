"""Pure planners: what each change makes of the generation it builds on.

A planner is a function of the base generation (parsed, or None for an empty store), the
profiles, the keys made for this change and `now`, and returns the Draft of the next
generation.  No backend and no clock here: the store reads the latest generation, calls the
planner, checks and writes its draft, and on a conflict calls it again on the new latest with
the same Keys, so a retry signs again but never makes a key twice.

A draft is built from its base by name (`dataclasses.replace`): what a planner does not name
is carried over, so an item added to the layout (model.KEY_PAIRS) needs no planner edited.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Callable, Mapping

from cryptography import x509

from pkisvc import pki
from pkisvc.errors import ConfigError, Conflict, InvalidMaterial, InvalidRequest, NotFound
from pkisvc.model import (
    CERT_FILES,
    ITEMS,
    KEY_FILES,
    KEY_PAIRS,
    LEAVES,
    TRUST_FILE,
    GenerationRecord,
    StoredGeneration,
    format_time,
    parse_time,
)
from pkisvc.settings import Settings, parse_sans

NEXT_CA_CERT, NEXT_CA_KEY = "next-ca.crt", "next-ca.key"  # phase 1 of a staged rotation
NEXT_CA_FILES = (NEXT_CA_CERT, NEXT_CA_KEY)
REPORT_ORDER = ("server", "kubecfg", "ca")  # `check-expiration` rows: leaves first
SA = "sa"  # the service-account key pair ([M]): sa.key signs, sa.pub is what verifies


def next_key_file(name: str) -> str:
    """Where phase 1 of a key pair's staged rotation keeps the key that signs next."""
    return f"next-{name}.key"


class NothingDue(Exception):
    """Raised by the renewal planner when nothing is due (any more)."""


class Keys:
    """The keys made for one change: each made the first time it is asked for, then reused.

    key_type is what the request asked for (None: each caller's default).  Tests pass `made`
    to plan with known keys.
    """

    def __init__(self, key_type: str | None = None,
                 made: Mapping[str, pki.PrivateKey] | None = None) -> None:
        self.key_type = key_type
        self.made: dict[str, pki.PrivateKey] = dict(made or {})

    def get(self, name: str, default_type: str) -> pki.PrivateKey:
        """The key `name` of this change, of the requested type or else default_type."""
        if name not in self.made:
            self.made[name] = pki.generate_key(self.key_type or default_type)
        return self.made[name]


@dataclass(frozen=True)
class Profiles:
    """What the settings say each item is: certificate profiles, key type, key-only items."""

    ca: pki.Profile
    leaves: Mapping[str, pki.Profile]
    key_type: str
    key_pairs: tuple[str, ...] = KEY_PAIRS

    @classmethod
    def from_settings(cls, s: Settings) -> Profiles:
        """Profiles of settings s (a re-issue keeps the replaced leaf's subject and SANs)."""
        server = pki.Profile("server", s.server.common_name, s.server.days, sans=pki.server_sans(
            s.server.sans, str(s.service_cidr), s.cluster_domain))
        client = pki.Profile("client", s.kubecfg.common_name, s.kubecfg.days,
                             organization=s.kubecfg.organization)
        return cls(pki.Profile("ca", s.ca.common_name, s.ca.days),
                   {"server": server, "kubecfg": client}, s.key_type)


@dataclass(frozen=True)
class Draft:
    """What a change wants the next generation to hold."""

    certs: pki.CertSet
    key_pairs: Mapping[str, pki.PrivateKey] = field(default_factory=dict)
    extra_files: Mapping[str, bytes] = field(default_factory=dict)
    source_version: int | None = None
    rotation: Mapping[str, Any] | None = None
    # Key pairs' verification bundles (`<name>.pub`) where they hold more than the signing
    # key's public key, the keys a staged key rotation publishes before they sign, and those
    # rotations' states.  Certificate changes and rollbacks carry all three unchanged.
    published: Mapping[str, tuple[pki.PublicKey, ...]] = field(default_factory=dict)
    next_keys: Mapping[str, pki.PrivateKey] = field(default_factory=dict)
    key_rotations: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Files kept byte for byte while the draft still holds what they encode: file name ->
    # (the parsed certificate, key or trust tuple, its stored bytes).  An import keeps the
    # exact files it was given (easy-rsa writes a text dump before each PEM), so hosts receive
    # what they hold already.
    verbatim: Mapping[str, tuple[Any, bytes]] = field(default_factory=dict)


@dataclass(frozen=True)
class SanChange:
    """An explicit change of the server's SANs: add some, remove some, or replace the list.

    None of them: a re-issue keeps the SANs of the certificate it replaces.
    """

    add: tuple[str, ...] = ()
    remove: tuple[str, ...] = ()
    whole: tuple[str, ...] | None = None

    def apply(self, current: tuple[str, ...]) -> tuple[str, ...]:
        """current with this change made.

        Raises: InvalidRequest when a SAN to remove is not there.
        """
        if self.whole is not None:
            return _unique(self.whole)
        have = {n.lower() for n in current}
        absent = [n for n in self.remove if n.lower() not in have]
        if absent:
            raise InvalidRequest(f"{absent[0]} is not a SAN of the current server certificate "
                                 f"({', '.join(current)})")
        gone = {n.lower() for n in self.remove}
        return _unique(tuple(n for n in current if n.lower() not in gone) + self.add)


def _unique(names: tuple[str, ...]) -> tuple[str, ...]:
    seen: dict[str, str] = {}
    for n in names:
        seen.setdefault(n.lower(), n)
    return tuple(seen.values())


@dataclass(frozen=True)
class Base:
    """A stored generation: its record, and its content as a draft to build on (parsed when
    first asked for: a new CA never reads the old material).

    known: what some of its files hold, already parsed (file name -> (its bytes, the
    certificate, key or tuple they encode)); a file is taken from it only while its bytes are
    those (see `written`: a generation this process wrote is its next base unparsed).
    """

    record: GenerationRecord
    files: Mapping[str, bytes]
    key_pairs: tuple[str, ...] = KEY_PAIRS
    known: Mapping[str, tuple[bytes, Any]] = field(default_factory=dict, compare=False,
                                                   repr=False)

    @property
    def version(self) -> int:
        return self.record.version

    def _load(self, name: str, parse: Callable[[bytes, str], Any]) -> Any:
        data = self.files[name]
        hit = self.known.get(name)
        if hit is not None and (hit[0] is data or hit[0] == data):
            return hit[1]
        return parse(data, name)

    @functools.cached_property
    def draft(self) -> Draft:
        files, load = self.files, self._load
        pairs = {n: load(f"{n}.key", _trusted_key) for n in self.key_pairs
                 if f"{n}.key" in files}
        published = {n: load(f"{n}.pub", _public_keys) for n in pairs if f"{n}.pub" in files}
        next_keys = {n: load(next_key_file(n), _trusted_key)
                     for n in pairs if next_key_file(n) in files}
        rotations = self.record.extra.get("key_rotations") or {}
        standard = _standard_files(self.key_pairs)
        extra = {n: b for n, b in files.items() if n not in standard}
        certs = parse_files(files, load)
        return Draft(certs, pairs, extra, rotation=self.record.rotation,
                     verbatim=verbatim(certs, files), published=published,
                     next_keys=next_keys,
                     key_rotations={n: dict(v) for n, v in rotations.items() if n in pairs})


def _trusted_key(data: bytes, name: str) -> pki.PrivateKey:
    return pki.load_key(data, name, trusted=True)


def _public_keys(data: bytes, name: str) -> tuple[pki.PublicKey, ...]:
    return tuple(pki.load_public_keys(data, name))


def _bundle(data: bytes, name: str) -> tuple[x509.Certificate, ...]:
    return tuple(pki.load_certs(data, name))


# A planner, its options bound (functools.partial): (base, profiles, keys, now) -> draft.
Planner = Callable[[Base | None, Profiles, Keys, datetime], Draft]


# --- the layout: files <-> sets ---------------------------------------------------------

def _key_field(item: str) -> str:
    return f"{item}_key"  # pki.CertSet names each item's key `<item>_key`


def _standard_files(key_pairs: tuple[str, ...]) -> set[str]:
    return {*CERT_FILES.values(), *KEY_FILES.values(), TRUST_FILE,
            *(f"{n}.{ext}" for n in key_pairs for ext in ("key", "pub")),
            *(next_key_file(n) for n in key_pairs)}


def parse_files(files: Mapping[str, bytes],
                load: Callable[[str, Callable[[bytes, str], Any]], Any] | None = None
                ) -> pki.CertSet:
    """Parse a stored generation's certificate set (written, and checked, by pkisvc).

    load(name, parse): a file's content (Base._load: parsed already when it is known)."""
    get = load or (lambda name, parse: parse(files[name], name))
    fields: dict[str, Any] = {}
    for item in ITEMS:
        fields[item] = get(CERT_FILES[item], pki.load_cert)
        # Only ca.key may be missing (a set imported without it).
        present = item != "ca" or KEY_FILES[item] in files
        fields[_key_field(item)] = get(KEY_FILES[item], _trusted_key) if present else None
    return pki.CertSet(**fields, trust=get(TRUST_FILE, lambda d, _: _bundle(d, "trust bundle")))


def verbatim(certs: pki.CertSet, files: Mapping[str, bytes]) -> dict[str, tuple[Any, bytes]]:
    """What each stored file of certs holds, with its bytes (see Draft.verbatim)."""
    kept: dict[str, tuple[Any, bytes]] = {TRUST_FILE: (certs.trust, files[TRUST_FILE])}
    for item in ITEMS:
        kept[CERT_FILES[item]] = (getattr(certs, item), files[CERT_FILES[item]])
        key = getattr(certs, _key_field(item))
        if key is not None:
            kept[KEY_FILES[item]] = (key, files[KEY_FILES[item]])
    return kept


def _encoded(draft: Draft, name: str, value: Any, encode: Callable[[Any], bytes]) -> bytes:
    """The bytes of file name: kept ones while the draft still holds value, else encoded."""
    kept = draft.verbatim.get(name)
    if kept is not None and (kept[0] is value or kept[0] == value):
        return kept[1]
    return encode(value)


def parse(gen: StoredGeneration, key_pairs: tuple[str, ...] = KEY_PAIRS) -> Base:
    """The base a change builds on: a stored generation, its files parsed when needed."""
    return Base(gen.record, gen.files, key_pairs)


def files_of(draft: Draft) -> dict[str, bytes]:
    """The files a draft is stored as (the seed's names; ca.key only when there is one)."""
    return {name: (value if encode is None else _encoded(draft, name, value, encode) if kept
                   else encode(value))
            for name, (value, encode, kept) in _layout(draft).items()}


Encode = Callable[[Any], bytes]


def _public_pems(bundle: tuple[pki.PublicKey, ...]) -> bytes:
    return b"".join(pki.public_pem(k) for k in bundle)


def _layout(draft: Draft) -> dict[str, tuple[Any, Encode | None, bool]]:
    """Each file of a draft: (what it holds, how that is encoded, whether bytes it was read
    from are kept, see Draft.verbatim); an extra file is (its bytes, None, False)."""
    c = draft.certs
    out: dict[str, tuple[Any, Encode | None, bool]] = {}
    for item in ITEMS:
        out[CERT_FILES[item]] = (getattr(c, item), pki.cert_pem, True)
        if item in LEAVES:
            out[KEY_FILES[item]] = (getattr(c, _key_field(item)), pki.key_pem, True)
    out[TRUST_FILE] = (tuple(c.trust), pki.bundle_pem, True)
    for name, key in draft.key_pairs.items():
        out[f"{name}.key"] = (key, pki.key_pem, False)
        out[f"{name}.pub"] = (tuple(published(draft, name)), _public_pems, False)
        if name in draft.next_keys:
            out[next_key_file(name)] = (draft.next_keys[name], pki.key_pem, False)
    out.update((n, (b, None, False)) for n, b in draft.extra_files.items())
    if c.ca_key is not None:
        out[KEY_FILES["ca"]] = (c.ca_key, pki.key_pem, True)
    return out


def written(gen: StoredGeneration, draft: Draft, key_pairs: tuple[str, ...] = KEY_PAIRS
            ) -> Base:
    """The base a generation is for the next change when this process made it from draft
    (gen is `generation(draft, ...)`): its files hold the draft's certificates and keys, so
    nothing is parsed again (extra files, a staged rotation's next CA, are parsed as usual).
    """
    known = {name: (gen.files[name], value)
             for name, (value, encode, _) in _layout(draft).items()
             if encode is not None and name in gen.files}
    return Base(gen.record, gen.files, key_pairs, known)


def generation(draft: Draft, *, version: int, parent: int | None, created_at: datetime,
               actor: str, operation: str, reason: str,
               base: GenerationRecord | None = None) -> StoredGeneration:
    """The stored generation of a draft: its files and its record (certificates, the key
    pairs by their public keys' fingerprints, and the server SANs the change added or
    removed against base)."""
    c = draft.certs
    items = {item: pki.describe(getattr(c, item)) for item in ITEMS}
    extra: dict[str, Any] = san_changes(base.items["server"].sans if base else None,
                                        items["server"].sans)
    if draft.key_pairs:
        extra["key_pairs"] = {n: key_pair_record(draft, n) for n in draft.key_pairs}
    if draft.key_rotations:
        extra["key_rotations"] = {n: dict(v) for n, v in draft.key_rotations.items()}
    record = GenerationRecord(
        version=version, parent=parent, created_at=created_at, actor=actor,
        operation=operation, reason=reason, key_type=pki.key_type_of(c.server_key),
        items=items, trust=tuple(pki.fingerprint(t) for t in c.trust),
        source_version=draft.source_version, rotation=draft.rotation, extra=extra)
    return StoredGeneration(record, files_of(draft))


def published(draft: Draft, name: str) -> tuple[pki.PublicKey, ...]:
    """The public keys `<name>.pub` holds: the bundle, or else the signing key's alone."""
    return draft.published.get(name) or (draft.key_pairs[name].public_key(),)


def key_pair_record(draft: Draft, name: str) -> dict[str, Any]:
    """What a generation records of a key pair: fingerprints only, never the key."""
    key = draft.key_pairs[name]
    rec: dict[str, Any] = {"fingerprint": pki.key_fingerprint(key),
                           "key_type": pki.key_type_of(key),
                           "published": [pki.key_fingerprint(k) for k in published(draft, name)]}
    if name in draft.next_keys:
        rec["next"] = pki.key_fingerprint(draft.next_keys[name])
    return rec


def check_key_pairs(draft: Draft) -> None:
    """Raises: InvalidMaterial when a key pair's bundle lacks its signing (or next) key."""
    for name, key in draft.key_pairs.items():
        bundle = {pki.key_fingerprint(k) for k in published(draft, name)}
        for what, k in (("signing key", key), ("next key", draft.next_keys.get(name))):
            if k is not None and pki.key_fingerprint(k) not in bundle:
                raise InvalidMaterial(f"{name}.pub does not hold the {what} of {name}.key")


def san_changes(before: tuple[str, ...] | None, after: tuple[str, ...]) -> dict[str, Any]:
    """The record fields naming the server SANs a change added and removed (none: {})."""
    if before is None:
        return {}
    out = {"sans_added": [n for n in after if n not in before],
           "sans_removed": [n for n in before if n not in after]}
    return {k: v for k, v in out.items() if v}


def no_ca_key(version: int) -> str:
    """Why a generation without a CA key cannot sign, and the way on."""
    return (f"version {version} holds no CA key (it was imported without ca.key), so pkisvc "
            "cannot sign with its CA: start a staged CA rotation (pkisvc rotate ca --staged, "
            "POST /v1/ca/rotate {\"mode\": \"staged\"}); its new CA signs from phase 2 on, "
            "with no host left distrusting the other")


def signer(base: Base) -> tuple[x509.Certificate, pki.PrivateKey]:
    """The CA that signs for a generation, and its key.

    Raises: Conflict when the generation was imported without ca.key.
    """
    certs = base.draft.certs
    if certs.ca_key is None:
        raise Conflict(no_ca_key(base.version))
    return certs.ca, certs.ca_key


def _with_key_pairs(draft: Draft, base: Base | None, profiles: Profiles, keys: Keys) -> Draft:
    """draft holding the base's key-only items (with their bundles and open rotations), and
    new keys for any the base lacks."""
    kept = _keeping_key_pairs(draft, base)
    pairs = {n: kept.key_pairs[n] if n in kept.key_pairs else keys.get(n, profiles.key_type)
             for n in profiles.key_pairs}
    return replace(kept, key_pairs={**kept.key_pairs, **pairs})


def _keeping_key_pairs(draft: Draft, base: Base | None) -> Draft:
    """draft with the key pairs of base exactly as they are (none when base has none)."""
    if base is None or not base.key_pairs:
        return replace(draft, key_pairs={}, published={}, next_keys={}, key_rotations={})
    d = base.draft
    return replace(draft, key_pairs=dict(d.key_pairs), published=dict(d.published),
                   next_keys=dict(d.next_keys), key_rotations=dict(d.key_rotations))


def _leaves(items: tuple[str, ...] | set[str], profiles: Profiles, keys: Keys,
            ca: x509.Certificate, ca_key: pki.PrivateKey, now: datetime,
            replaced: pki.CertSet | None = None, sans: SanChange = SanChange()
            ) -> dict[str, Any]:
    """The CertSet fields of each leaf in items, issued by ca on this change's key for it.

    A leaf that replaces one of `replaced` keeps its subject and SANs (the server's changed
    by sans only); the settings' profiles are for a first issue.
    """
    fields: dict[str, Any] = {}
    for item in LEAVES:
        if item in items:
            profile = profiles.leaves[item]
            if replaced is not None:
                old = getattr(replaced, item)
                kept = pki.names_of(old)
                profile = pki.reissue_profile(
                    profile, old, sans.apply(kept) if item == "server" else kept)
            key = keys.get(item, pki.key_type_of(ca_key))
            fields[item] = pki.issue(profile, ca, ca_key, key, now=now)
            fields[_key_field(item)] = key
    return fields


def _fresh_certs(profiles: Profiles, keys: Keys, now: datetime,
                 replaced: pki.CertSet | None = None) -> pki.CertSet:
    ca_key = keys.get("ca", profiles.key_type)
    ca = pki.make_ca(profiles.ca, ca_key, now=now)
    return pki.CertSet(ca=ca, ca_key=ca_key, trust=(ca,),
                       **_leaves(LEAVES, profiles, keys, ca, ca_key, now, replaced))


def refuse_during_staged_rotation(base: Base | None) -> None:
    """Raises: Conflict when a staged CA rotation is open."""
    if base is not None and base.record.rotation:
        phase = base.record.rotation.get("phase")
        raise Conflict(f"a staged CA rotation is open (phase {phase}): continue, finish "
                       "or abort it first")


def _expect_phase(base: Base, phase: int, step: str) -> dict[str, Any]:
    state = dict(base.record.rotation or {})
    if state.get("phase") != phase:
        now = f"phase {state['phase']}" if state else "no staged rotation is open"
        hint = {"abort": " (after phase 1, roll back to the version before it instead)"}
        raise Conflict(f"cannot {step}: {now}{hint.get(step, '') if state else ''}")
    return state


def _need(base: Base | None) -> Base:
    if base is None:  # the store refuses an empty store before planning (NotFound)
        raise Conflict("no generation to change")
    return base


# --- requests, checked before any planning ------------------------------------------------

def leaf_request(item: str, *, add: list[str] | tuple[str, ...] = (),
                 remove: list[str] | tuple[str, ...] = (),
                 sans: list[str] | tuple[str, ...] | None = None) -> SanChange:
    """Check a leaf rotation's item and SAN change; return the change with its SANs parsed.

    Raises: InvalidRequest or NotFound naming what is wrong.
    """
    if item == "ca":
        raise InvalidRequest("the CA is rotated with `rotate ca` (POST /v1/ca/rotate)")
    if item not in LEAVES:
        raise NotFound(f"no item {item!r} (leaves: {', '.join(LEAVES)})")
    change_asked = bool(add or remove) or sans is not None
    if change_asked and item != "server":
        raise InvalidRequest("only the server certificate has SANs")
    if sans is not None and (add or remove):
        raise InvalidRequest("give either the whole list of SANs or SANs to add and remove, "
                             "not both")
    try:
        return SanChange(parse_sans("add_sans", add or []),
                         parse_sans("remove_sans", remove or []),
                         parse_sans("sans", sans) if sans is not None else None)
    except ConfigError as e:
        raise InvalidRequest(e.message) from None


def check_renewal_settings(s: Settings) -> None:
    """Raises: ConfigError when a leaf would be due again as soon as it is renewed."""
    for item, days in (("server", s.server.days), ("kubecfg", s.kubecfg.days)):
        if days * 86400 <= s.renew_before:
            raise ConfigError(f"setting '{item}.days' ({days}d) must be longer than "
                              f"'renew_before' ({s.renew_before // 86400}d), or every run "
                              "would renew again")


def serving_cert(base: Base, hosts: tuple[str, ...], days: int, now: datetime
                 ) -> tuple[x509.Certificate, pki.PrivateKey]:
    """pkisvc's own HTTPS certificate for hosts, from the base's CA, on a new key.

    Raises: Conflict when the base holds no CA key.
    """
    ca, ca_key = signer(base)
    key = pki.generate_key(pki.key_type_of(ca_key))
    return pki.issue(pki.Profile("server", "pkisvc", days, sans=hosts), ca, ca_key, key,
                     now=now), key


# --- planners ---------------------------------------------------------------------------

def init(base: Base | None, profiles: Profiles, keys: Keys, now: datetime) -> Draft:
    """The first generation: a new CA, both leaves, every key-only item."""
    return _with_key_pairs(Draft(_fresh_certs(profiles, keys, now)), None, profiles, keys)


def rotate_ca(base: Base | None, profiles: Profiles, keys: Keys, now: datetime) -> Draft:
    """A new CA and both leaves (their subjects and SANs kept) in one generation; key-only
    items are kept as they are."""
    refuse_during_staged_rotation(base)
    replaced = base.draft.certs if base is not None else None
    return _keeping_key_pairs(Draft(_fresh_certs(profiles, keys, now, replaced)), base)


def rotate_leaf(base: Base | None, profiles: Profiles, keys: Keys, now: datetime, *,
                item: str, sans: SanChange = SanChange()) -> Draft:
    """Re-issue one leaf from the current CA on a new key (subject and SANs kept, the
    server's changed only by sans); everything else is kept."""
    base = _need(base)
    refuse_during_staged_rotation(base)
    ca, ca_key = signer(base)
    return replace(base.draft, source_version=None, certs=replace(
        base.draft.certs,
        **_leaves((item,), profiles, keys, ca, ca_key, now, base.draft.certs, sans)))


def renew(base: Base | None, profiles: Profiles, keys: Keys, now: datetime, *,
          renew_before: int) -> Draft:
    """Re-issue every leaf inside renew_before.

    Raises: NothingDue when none is (a concurrent writer renewed them meanwhile).
    """
    base = _need(base)
    if base.record.rotation:
        raise Conflict("a staged CA rotation is open: finish it (its second phase "
                       "re-issues both leaves) instead of renewing")
    ca, ca_key = signer(base)
    due_now = {d["item"] for d in due(base.record, now, renew_before)}
    if not due_now:
        raise NothingDue
    return replace(base.draft, source_version=None, rotation=None, certs=replace(
        base.draft.certs, **_leaves(due_now, profiles, keys, ca, ca_key, now, base.draft.certs)))


def start_rotation(base: Base | None, profiles: Profiles, keys: Keys, now: datetime) -> Draft:
    """Phase 1: make the next CA and trust it beside the current one; leaves unchanged."""
    base = _need(base)
    refuse_during_staged_rotation(base)
    ca = base.draft.certs.ca  # no key needed: the next CA signs from phase 2 on
    next_key = keys.get("next-ca", profiles.key_type)
    next_ca = pki.make_ca(profiles.ca, next_key, now=now)
    cur = base.draft.certs
    state = {"phase": 1, "old_ca": pki.fingerprint(ca), "new_ca": pki.fingerprint(next_ca),
             "started": base.version + 1}
    return replace(base.draft, source_version=None, rotation=state,
                   certs=replace(cur, trust=(*cur.trust, next_ca)),
                   extra_files={**base.draft.extra_files, NEXT_CA_CERT: pki.cert_pem(next_ca),
                                NEXT_CA_KEY: pki.key_pem(next_key)})


def continue_rotation(base: Base | None, profiles: Profiles, keys: Keys,
                      now: datetime) -> Draft:
    """Phase 2: re-issue both leaves from the next CA, which signs from now on."""
    base = _need(base)
    state = _expect_phase(base, 1, "continue")
    files = base.draft.extra_files
    next_ca = pki.load_cert(files[NEXT_CA_CERT], NEXT_CA_CERT)
    next_key = pki.load_key(files[NEXT_CA_KEY], NEXT_CA_KEY)
    certs = replace(base.draft.certs, ca=next_ca, ca_key=next_key,
                    **_leaves(LEAVES, profiles, keys, next_ca, next_key, now, base.draft.certs))
    return replace(base.draft, source_version=None, certs=certs, rotation={**state, "phase": 2},
                   extra_files=_without_next_ca(files))


def finish_rotation(base: Base | None, profiles: Profiles, keys: Keys, now: datetime) -> Draft:
    """Phase 3: trust only the new CA; the staged rotation is over."""
    return _close_rotation(_need(base), 2, "finish")


def abort_rotation(base: Base | None, profiles: Profiles, keys: Keys, now: datetime) -> Draft:
    """Drop the next CA (phase 1 only: later, roll back instead)."""
    return _close_rotation(_need(base), 1, "abort")


def _close_rotation(base: Base, phase: int, step: str) -> Draft:
    """End a staged rotation: trust only the signing CA, drop the next CA's files."""
    _expect_phase(base, phase, step)
    cur = base.draft.certs
    return replace(base.draft, source_version=None, rotation=None,
                   certs=replace(cur, trust=(cur.ca,)),
                   extra_files=_without_next_ca(base.draft.extra_files))


def _without_next_ca(files: Mapping[str, bytes]) -> dict[str, bytes]:
    return {n: b for n, b in files.items() if n not in NEXT_CA_FILES}


def rollback(base: Base | None, profiles: Profiles, keys: Keys, now: datetime, *,
             old: Base) -> Draft:
    """A copy of an old generation's certificates (with the CA rotation state) as the next
    one.  Key pairs stay as they are now: an old service-account signer would break every
    token signed since (the key pair has its own way back: abort)."""
    return _keeping_key_pairs(replace(old.draft, source_version=old.version), base)


def import_set(base: Base | None, profiles: Profiles, keys: Keys, now: datetime, *,
               certs: pki.CertSet, kept: Mapping[str, tuple[Any, bytes]] | None = None,
               sa: SAMaterial | None = None) -> Draft:
    """An imported set as the next generation (kept: its files byte for byte, see
    Draft.verbatim); key-only items are kept (or made).

    sa: the service-account key and bundle the cluster already uses (adoption); it replaces
    the stored one and closes any open service-account rotation.
    """
    refuse_during_staged_rotation(base)
    draft = _with_key_pairs(Draft(certs, verbatim=kept or {}), base, profiles, keys)
    if sa is None:
        return draft
    key, bundle = sa
    return replace(draft, key_pairs={**draft.key_pairs, SA: key},
                   published={**draft.published, SA: bundle or (key.public_key(),)},
                   next_keys=_without(draft.next_keys, SA),
                   key_rotations=_without(draft.key_rotations, SA))


# --- the service-account key pair ([M]) ------------------------------------------------------
# The same shape as the staged CA rotation, and independent of it: phase 1 publishes the next
# key beside the current one (sa.pub), phase 2 makes it the signer (sa.key), phase 3 drops
# every other public key once `sa.overlap` has passed since phase 2.  Certificates are never
# touched, and no certificate change touches these.

SAMaterial = tuple[pki.PrivateKey, tuple[pki.PublicKey, ...]]
SA_IMMEDIATE_WARNING = (
    "every service-account token signed by the old key stops verifying once the masters "
    "install this version: pods that use one fail until they get a new token (projected "
    "tokens: the kubelet refreshes them; legacy token secrets must be deleted)")


def _without(m: Mapping[str, Any], name: str) -> dict[str, Any]:
    return {k: v for k, v in m.items() if k != name}


def _sa_key(base: Base) -> pki.PrivateKey:
    key = base.draft.key_pairs.get(SA)
    if key is None:
        raise Conflict(f"version {base.version} holds no service-account key: make one with "
                       "`pkisvc rotate sa` (immediate: nothing verifies with sa.pub yet) or "
                       "adopt the cluster's own (`pkisvc import --sa-from-server-key`)")
    return key


def _expect_sa_phase(base: Base, phase: int | None, step: str) -> dict[str, Any]:
    state = dict(base.draft.key_rotations.get(SA) or {})
    if state.get("phase") != phase:
        now = (f"service-account rotation phase {state['phase']}" if state
               else "no service-account rotation is open")
        hint = (" (after phase 1 the old key is no longer the signer: finish instead)"
                if step == "abort" and state else "")
        raise Conflict(f"cannot {step} the service-account rotation: {now}{hint}")
    return state


def rotate_sa(base: Base | None, profiles: Profiles, keys: Keys, now: datetime) -> Draft:
    """Immediate: a new service-account key that alone signs and verifies (every token
    signed before stops verifying); closes an open service-account rotation."""
    base = _need(base)
    key = keys.get("next-sa", profiles.key_type)
    d = base.draft
    return replace(d, source_version=None, key_pairs={**d.key_pairs, SA: key},
                   published={**d.published, SA: (key.public_key(),)},
                   next_keys=_without(d.next_keys, SA),
                   key_rotations=_without(d.key_rotations, SA))


def start_sa_rotation(base: Base | None, profiles: Profiles, keys: Keys,
                      now: datetime) -> Draft:
    """Phase 1: publish the next key beside the current one; the current one still signs."""
    base = _need(base)
    current = _sa_key(base)
    _expect_sa_phase(base, None, "start")
    new = keys.get("next-sa", profiles.key_type)
    d = base.draft
    state = {"phase": 1, "old": pki.key_fingerprint(current), "new": pki.key_fingerprint(new),
             "started": base.version + 1}
    return replace(d, source_version=None,
                   published={**d.published, SA: (*published(d, SA), new.public_key())},
                   next_keys={**d.next_keys, SA: new},
                   key_rotations={**d.key_rotations, SA: state})


def continue_sa_rotation(base: Base | None, profiles: Profiles, keys: Keys,
                         now: datetime) -> Draft:
    """Phase 2: the published next key signs from now on; both keys still verify."""
    base = _need(base)
    state = _expect_sa_phase(base, 1, "continue")
    d = base.draft
    return replace(d, source_version=None, key_pairs={**d.key_pairs, SA: d.next_keys[SA]},
                   next_keys=_without(d.next_keys, SA),
                   key_rotations={**d.key_rotations,
                                  SA: {**state, "phase": 2, "switched_at": format_time(now)}})


def sa_overlap_left(state: Mapping[str, Any], now: datetime, overlap: int) -> int:
    """Seconds of `sa.overlap` still to run since phase 2 (0 when it has passed)."""
    switched = parse_time(state["switched_at"])
    return max(0, int((switched - now).total_seconds()) + overlap)


def finish_sa_rotation(base: Base | None, profiles: Profiles, keys: Keys, now: datetime, *,
                       overlap: int, force: bool = False) -> Draft:
    """Phase 3: sa.pub holds the signing key alone; refused before `sa.overlap` has passed
    since phase 2 unless forced (tokens signed by the old key stop verifying)."""
    base = _need(base)
    state = _expect_sa_phase(base, 2, "finish")
    left = sa_overlap_left(state, now, overlap)
    if left and not force:
        raise Conflict(
            f"sa.overlap has not passed: the old service-account key signed until "
            f"{state['switched_at']}; tokens it signed may still be in use for "
            f"{_duration(left)} more (finish then, or force it)")
    d = base.draft
    return replace(d, source_version=None, published=_without(d.published, SA),
                   key_rotations=_without(d.key_rotations, SA))


def abort_sa_rotation(base: Base | None, profiles: Profiles, keys: Keys,
                      now: datetime) -> Draft:
    """Unpublish the next key (phase 1 only: it has signed nothing yet)."""
    base = _need(base)
    state = _expect_sa_phase(base, 1, "abort")
    d = base.draft
    kept = tuple(k for k in published(d, SA) if pki.key_fingerprint(k) != state["new"])
    return replace(d, source_version=None, published={**d.published, SA: kept},
                   next_keys=_without(d.next_keys, SA),
                   key_rotations=_without(d.key_rotations, SA))


def _duration(seconds: int) -> str:
    if seconds >= 86400:
        return f"{seconds // 86400}d {seconds % 86400 // 3600}h"
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{max(seconds // 60, 1)}m"


# The service-account steps by their API/CLI word: operation stored in records, planner, and
# whether the step takes the overlap (finish).
SA_STEPS: dict[str, tuple[str, Planner]] = {
    "immediate": ("sa-rotate", rotate_sa),
    "start": ("sa-stage-publish", start_sa_rotation),
    "continue": ("sa-stage-switch", continue_sa_rotation),
    "abort": ("sa-stage-abort", abort_sa_rotation),
}


def sa_state(gen: GenerationRecord) -> dict[str, Any]:
    """The service-account key of a generation and its open rotation, if any."""
    pair = (gen.extra.get("key_pairs") or {}).get(SA)
    state = dict((gen.extra.get("key_rotations") or {}).get(SA) or {})
    phase = state.get("phase")
    return {"version": gen.version, "present": pair is not None,
            "fingerprint": pair["fingerprint"] if pair else None,
            "key_type": pair["key_type"] if pair else None,
            "published": list(pair["published"]) if pair else [],
            "open": bool(state), "phase": phase, "old": state.get("old"),
            "new": state.get("new"), "switched_at": state.get("switched_at"),
            "next": {1: "continue", 2: "finish"}.get(phase) if phase else None,
            "abortable": phase == 1}


# Each staged phase by its API/CLI word: the operation name stored in records (stored data:
# never renamed), its planner, and the items its audit event names.
STAGED_STEPS: dict[str, tuple[str, Planner, tuple[str, ...]]] = {
    "start": ("ca-stage-trust", start_rotation, ("ca",)),
    "continue": ("ca-stage-switch", continue_rotation, ITEMS),
    "finish": ("ca-stage-finish", finish_rotation, ("ca",)),
    "abort": ("ca-stage-abort", abort_rotation, ("ca",)),
}


# --- reports (records and now in, rows out) ------------------------------------------------

def _left(not_after: datetime, now: datetime) -> int:
    return int((not_after - now).total_seconds())


def expiration(gen: GenerationRecord, now: datetime) -> list[dict[str, Any]]:
    """Rows for `check-expiration`: each certificate, its expiry (a datetime) and what is left."""
    return [{"certificate": item, "file": CERT_FILES[item], "expires": rec.not_after,
             "residual_seconds": _left(rec.not_after, now),
             "certificate_authority": "" if item == "ca" else "ca", "version": gen.version}
            for item in REPORT_ORDER for rec in (gen.items[item],)]


def due(gen: GenerationRecord, now: datetime, renew_before: int) -> list[dict[str, Any]]:
    """The leaves renewal re-issues now: those inside renew_before."""
    rows: list[dict[str, Any]] = [
        {"item": item, "not_after": format_time(gen.items[item].not_after),
         "residual_seconds": _left(gen.items[item].not_after, now)} for item in LEAVES]
    return [r for r in rows if r["residual_seconds"] < renew_before]


def ca_warning(gen: GenerationRecord, now: datetime, ca_warn_before: int) -> str | None:
    """Why the CA needs a staged rotation soon, or None."""
    not_after = gen.items["ca"].not_after
    left = _left(not_after, now)
    if left >= ca_warn_before:
        return None
    return (f"the CA expires {format_time(not_after)} ({max(left, 0) // 86400} days left): "
            "run a staged CA rotation (pkisvc rotate ca --staged); renew never rotates the CA")


def renewal_blocker(gen: GenerationRecord, has_ca_key: bool) -> str | None:
    """Why renewal cannot re-issue anything in gen now, or None."""
    if gen.rotation:
        return (f"a staged CA rotation is open (phase {gen.rotation.get('phase')}): finish "
                "it (its second phase re-issues both leaves) instead of renewing")
    return None if has_ca_key else no_ca_key(gen.version)


def renewal_report(gen: GenerationRecord, now: datetime, s: Settings,
                   has_ca_key: bool = True) -> dict[str, Any]:
    """What renewal would do now: leaves inside `renew_before`, a CA inside `ca_warn_before`,
    and what stops it (`blocked`, only when something does)."""
    report = {"version": gen.version, "due": due(gen, now, s.renew_before),
              "ca_warning": ca_warning(gen, now, s.ca_warn_before)}
    blocked = renewal_blocker(gen, has_ca_key)
    return {**report, "blocked": blocked} if blocked else report


def settings_drift(gen: GenerationRecord, s: Settings) -> list[str]:
    """Where the settings differ from gen's leaves: reported, never applied (a re-issue keeps
    the subject and SANs of the certificate it replaces; the settings are what `init` used)."""
    profiles = Profiles.from_settings(s)
    have, want = gen.items["server"].sans, profiles.leaves["server"].sans
    at = f"the server certificate (version {gen.version})"
    out = [f"{text}: {', '.join(names)} ({advice})" for names, text, advice in (
        (_not_in(want, have), f"the settings name SANs {at} does not have",
         "add them with `pkisvc rotate server --san NAME`; settings are used only by init"),
        (_not_in(have, want), f"{at} has SANs the settings do not name",
         "kept by every re-issue; `pkisvc rotate server --remove-san NAME` drops one"))
        if names]
    for item in LEAVES:
        said = pki.subject_of(profiles.leaves[item])
        if gen.items[item].subject != said:
            out.append(f"the {item} certificate's subject is {gen.items[item].subject}, the "
                       f"settings say {said} (kept by every re-issue)")
    return out


def _not_in(names: tuple[str, ...], others: tuple[str, ...]) -> list[str]:
    """names (in order) that others lack; DNS names compare case-insensitively."""
    known = {n.lower() for n in others}
    return [n for n in names if n.lower() not in known]


def expired(gen: GenerationRecord, now: datetime) -> list[str]:
    """A line for each of gen's certificates that has expired."""
    return [f"{CERT_FILES[item]} (version {gen.version}) expired {format_time(rec.not_after)}"
            for item in REPORT_ORDER for rec in (gen.items[item],)
            if _left(rec.not_after, now) <= 0]


def renewal_reason(report: Mapping[str, Any]) -> str:
    """The audit reason of a renewal: what was due."""
    return "due: " + ", ".join(f"{d['item']} expires {d['not_after']}" for d in report["due"])


def rotation_state(gen: GenerationRecord) -> dict[str, Any]:
    """The open staged rotation, if any: phase, CAs, and the step that comes next."""
    state = dict(gen.rotation or {})
    phase = state.get("phase")
    return {"open": bool(state), "phase": phase, "version": gen.version,
            "old_ca": state.get("old_ca"), "new_ca": state.get("new_ca"),
            "next": {1: "continue", 2: "finish"}.get(phase) if phase else None,
            "abortable": phase == 1}
