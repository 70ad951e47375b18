"""CertStore: every operation on the cluster's PKI, over one Backend.

The store is the only part of pkisvc that reads the clock or talks to a backend.  Every change
builds a whole new generation on top of the latest one, checks it with `pki.check_set`, and
writes it with `expected=<the version it built on>`; a concurrent writer makes that write
conflict, and the change is rebuilt on the new latest and tried again (a bounded number of
times).  Every change appends one audit event.
"""
from __future__ import annotations

import hashlib
import logging
import random
import re
import secrets
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from pkisvc import pki
from pkisvc.backends.base import Backend
from pkisvc.errors import (
    AlreadyInitialised,
    BackendUnavailable,
    ConfigError,
    Conflict,
    InvalidMaterial,
    InvalidRequest,
    NotFound,
    VersionConflict,
)
from pkisvc.model import (
    CERT_FILES,
    ITEMS,
    KEY_FILES,
    LEAVES,
    SCOPES,
    TRUST_FILE,
    AuditEvent,
    GenerationRecord,
    ItemRecord,
    StoredGeneration,
    TokenRecord,
)
from pkisvc.settings import Settings, one_line, parse_san

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 60
AUDIT_PATIENCE = 15.0  # seconds a written change keeps trying to append its audit event
NEXT_CA_CERT, NEXT_CA_KEY = "next-ca.crt", "next-ca.key"  # phase 1 of a staged rotation
IMPORT_FILES = ("ca.crt", "ca.key", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key")


_TOKEN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")


def hash_token(token: str) -> str:
    """The sha256 (hex) under which a token is kept."""
    return hashlib.sha256(token.encode()).hexdigest()


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@dataclass(frozen=True)
class Draft:
    """What a change wants the next generation to hold."""

    certs: pki.CertSet
    extra_files: Mapping[str, bytes] = field(default_factory=dict)
    source_version: int | None = None
    rotation: Mapping[str, Any] | None = None


class CertStore:
    """The cluster's certificates: read them, change them, see their history."""

    def __init__(self, backend: Backend, settings: Settings,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.backend = backend
        self.settings = settings
        self._clock = clock

    def now(self) -> datetime:
        return self._clock()

    # --- reading -----------------------------------------------------------------------

    def latest(self) -> int | None:
        return self.backend.latest()

    def ping(self) -> None:
        self.backend.ping()

    def read(self, version: int | None = None) -> StoredGeneration:
        return self.backend.read(version)

    def versions(self) -> list[GenerationRecord]:
        """Every generation's record, newest first."""
        return list(reversed(self.backend.versions()))

    def material(self, version: int | None = None) -> pki.CertSet:
        return parse_files(self.read(version).files)

    def item(self, item: str, version: int | None = None) -> tuple[int, ItemRecord, bytes]:
        """Return (version, record, cert PEM) of one item."""
        if item not in ITEMS:
            raise NotFound(f"no item {item!r} (items: {', '.join(ITEMS)})")
        gen = self.read(version)
        return gen.version, gen.record.items[item], gen.files[CERT_FILES[item]]

    def key(self, item: str, version: int | None = None) -> tuple[int, bytes]:
        """Return (version, key PEM) of a leaf; the CA key never leaves through here."""
        if item not in LEAVES:
            raise NotFound(f"no private key for {item!r}")
        gen = self.read(version)
        return gen.version, gen.files[KEY_FILES[item]]

    def host_files(self, gen: StoredGeneration, names: tuple[str, ...] | list[str]
                   ) -> dict[str, bytes]:
        """Return the files hosts install, by their host names (`ca.crt` is the trust bundle)."""
        return {n: gen.files[TRUST_FILE if n == "ca.crt" else n] for n in names}

    def audit(self, since: datetime | None = None, limit: int = 100) -> list[AuditEvent]:
        return self.backend.audit(since=since, limit=limit)

    def tokens(self) -> list[TokenRecord]:
        return self.backend.tokens()

    def create_token(self, name: str, scopes: list[str] | tuple[str, ...], *, actor: str,
                     remote_addr: str | None = None) -> str:
        """Make an API token; return it (the only time it is seen: only its hash is kept)."""
        if not _TOKEN_NAME.match(name):
            raise InvalidRequest(f"token name {name!r}: letters, digits, '.', '_', '-' only")
        if not scopes or not set(scopes) <= set(SCOPES):
            raise InvalidRequest(f"scopes must be drawn from {', '.join(SCOPES)}")
        if any(t.name == name for t in self.settings.tokens):
            raise Conflict(f"a token named {name!r} is defined in the settings")
        token = "pks_" + secrets.token_urlsafe(32)
        now = pki.rfc3339(self.now())
        self.backend.put_token(TokenRecord(name, hash_token(token), tuple(scopes), now))
        self.backend.append_audit(AuditEvent(time=now, actor=actor, action="token-create",
                                             reason=f"{name}: {','.join(scopes)}",
                                             remote_addr=remote_addr))
        return token

    def revoke_token(self, name: str, *, actor: str, remote_addr: str | None = None) -> None:
        """Revoke an API token made by create_token."""
        self.backend.revoke_token(name)
        self.backend.append_audit(AuditEvent(time=pki.rfc3339(self.now()), actor=actor,
                                             action="token-revoke", reason=name,
                                             remote_addr=remote_addr))

    def expiration(self, version: int | None = None) -> list[dict[str, Any]]:
        """Rows for `check-expiration`: each certificate, its expiry and what is left."""
        gen = self.read(version)
        now = self.now()
        rows = []
        for item in ("server", "kubecfg", "ca"):
            rec = gen.record.items[item]
            not_after = _parse_time(rec.not_after)
            rows.append({
                "certificate": item, "file": CERT_FILES[item], "expires": rec.not_after,
                "residual_seconds": int((not_after - now).total_seconds()),
                "certificate_authority": "" if item == "ca" else "ca",
                "version": gen.version,
            })
        return rows

    # --- changes -----------------------------------------------------------------------

    def init(self, *, actor: str, reason: str = "", key_type: str | None = None,
             remote_addr: str | None = None) -> GenerationRecord:
        """Make the first generation: a new CA and both leaves.

        Raises: AlreadyInitialised when the store holds a generation.
        """
        keys = self._new_keys(key_type)
        return self._commit("init", actor, reason, lambda base: self._fresh_set(keys),
                            expect_empty=True, remote_addr=remote_addr)

    def ensure_initialised(self, *, actor: str) -> bool:
        """Initialise an empty store; return whether this call did it."""
        if self.latest() is not None:
            return False
        try:
            self.init(actor=actor, reason="first start")
        except AlreadyInitialised:
            return False
        return True

    def rotate_ca(self, *, actor: str, reason: str = "", key_type: str | None = None,
                  remote_addr: str | None = None) -> GenerationRecord:
        """Replace the CA and both leaves in one generation (the seed's procedure)."""
        keys = self._new_keys(key_type)

        def build(base: StoredGeneration | None) -> Draft:
            self._refuse_during_staged_rotation(base)
            return self._fresh_set(keys)
        return self._commit("rotate-ca", actor, reason, build, remote_addr=remote_addr)

    # --- renewal ------------------------------------------------------------------------

    def due(self, version: int | None = None) -> dict[str, Any]:
        """What renewal would do now: leaves inside `renew_before`, a CA inside `ca_warn_before`."""
        gen = self.read(version)
        now = self.now()
        s = self.settings
        due = []
        for item in LEAVES:
            left = int((_parse_time(gen.record.items[item].not_after) - now).total_seconds())
            if left < s.renew_before:
                due.append({"item": item, "not_after": gen.record.items[item].not_after,
                            "residual_seconds": left})
        ca_left = int((_parse_time(gen.record.items["ca"].not_after) - now).total_seconds())
        warning = None
        if ca_left < s.ca_warn_before:
            warning = (f"the CA expires {gen.record.items['ca'].not_after} "
                       f"({max(ca_left, 0) // 86400} days left): run a staged CA rotation "
                       "(pkisvc rotate ca --staged); renew never rotates the CA")
        return {"version": gen.version, "due": due, "ca_warning": warning}

    def renew(self, *, actor: str, dry_run: bool = False,
              remote_addr: str | None = None) -> tuple[dict[str, Any], GenerationRecord | None]:
        """Re-issue every leaf inside `renew_before` in one generation; nothing due, nothing done.

        Returns (what was due, the new record or None).
        """
        s = self.settings
        for item, days in (("server", s.server.days), ("kubecfg", s.kubecfg.days)):
            if days * 86400 <= s.renew_before:
                raise ConfigError(f"setting '{item}.days' ({days}d) must be longer than "
                                  f"'renew_before' ({s.renew_before // 86400}d), or every run "
                                  "would renew again")
        report = self.due()
        if dry_run or not report["due"]:
            return report, None
        keys: dict[str, pki.PrivateKey] = {}

        def build(base: StoredGeneration | None) -> Draft:
            assert base is not None
            if base.record.rotation:
                raise Conflict("a staged CA rotation is open: finish it (its second phase "
                               "re-issues both leaves) instead of renewing")
            cur, ca_key = signer(base)
            due_now = {d["item"] for d in self.due(base.version)["due"]}
            if not due_now:  # a concurrent writer renewed them meanwhile
                raise _NothingDue
            for item in due_now - set(keys):
                keys[item] = pki.generate_key(pki.key_type_of(ca_key))
            now = self.now()
            server, server_key, kubecfg, kubecfg_key = (cur.server, cur.server_key,
                                                        cur.kubecfg, cur.kubecfg_key)
            if "server" in due_now:
                server_key = keys["server"]
                server = pki.issue(self._server_profile(), cur.ca, ca_key, server_key,
                                   now=now)
            if "kubecfg" in due_now:
                kubecfg_key = keys["kubecfg"]
                kubecfg = pki.issue(self._client_profile(), cur.ca, ca_key, kubecfg_key,
                                    now=now)
            return Draft(pki.CertSet(cur.ca, ca_key, server, server_key, kubecfg,
                                     kubecfg_key, cur.trust), _extra_files(base))
        items = tuple(d["item"] for d in report["due"])
        reason = "due: " + ", ".join(f"{d['item']} expires {d['not_after']}"
                                     for d in report["due"])
        try:
            record = self._commit("renew", actor, reason, build, items=items,
                                  remote_addr=remote_addr)
        except _NothingDue:
            return {**report, "due": []}, None
        return report, record

    # --- staged CA rotation (DESIGN §6) --------------------------------------------------

    def rotation(self) -> dict[str, Any]:
        """The open staged rotation, if any: phase, CAs, and the step that comes next."""
        gen = self.read()
        state = dict(gen.record.rotation or {})
        phase = state.get("phase")
        return {"open": bool(state), "phase": phase, "version": gen.version,
                "old_ca": state.get("old_ca"), "new_ca": state.get("new_ca"),
                "next": {1: "continue", 2: "finish"}.get(phase) if phase else None,
                "abortable": phase == 1}

    def stage_trust(self, *, actor: str, reason: str = "", key_type: str | None = None,
                    remote_addr: str | None = None) -> GenerationRecord:
        """Phase 1: make the next CA and trust it beside the current one; leaves unchanged."""
        kt = key_type or self.settings.key_type
        next_key = pki.generate_key(kt)

        def build(base: StoredGeneration | None) -> Draft:
            assert base is not None
            self._refuse_during_staged_rotation(base)
            cur, ca_key = signer(base)
            s = self.settings
            next_ca = pki.make_ca(pki.Profile("ca", s.ca.common_name, s.ca.days), next_key,
                                  now=self.now())
            certs = pki.CertSet(cur.ca, ca_key, cur.server, cur.server_key, cur.kubecfg,
                                cur.kubecfg_key, (*cur.trust, next_ca))
            extra = {NEXT_CA_CERT: pki.cert_pem(next_ca), NEXT_CA_KEY: pki.key_pem(next_key)}
            state = {"phase": 1, "old_ca": pki.fingerprint(cur.ca),
                     "new_ca": pki.fingerprint(next_ca), "started": base.version + 1}
            return Draft(certs, extra, rotation=state)
        return self._commit("ca-stage-trust", actor, reason, build, items=("ca",),
                            remote_addr=remote_addr)

    def stage_switch(self, *, actor: str, reason: str = "",
                     remote_addr: str | None = None) -> GenerationRecord:
        """Phase 2: re-issue server and kubecfg from the new CA; trust stays old + new."""
        keys: dict[str, pki.PrivateKey] = {}

        def build(base: StoredGeneration | None) -> Draft:
            assert base is not None
            state = self._expect_phase(base, 1, "continue")
            next_ca = pki.load_cert(base.files[NEXT_CA_CERT], NEXT_CA_CERT)
            next_key = pki.load_key(base.files[NEXT_CA_KEY], NEXT_CA_KEY)
            cur = parse_files(base.files)
            if not keys:
                kt = pki.key_type_of(next_key)
                keys.update(server=pki.generate_key(kt), kubecfg=pki.generate_key(kt))
            now = self.now()
            server = pki.issue(self._server_profile(), next_ca, next_key, keys["server"], now=now)
            kubecfg = pki.issue(self._client_profile(), next_ca, next_key, keys["kubecfg"],
                                now=now)
            certs = pki.CertSet(next_ca, next_key, server, keys["server"], kubecfg,
                                keys["kubecfg"], cur.trust)
            return Draft(certs, rotation={**state, "phase": 2})
        return self._commit("ca-stage-switch", actor, reason, build, remote_addr=remote_addr)

    def stage_finish(self, *, actor: str, reason: str = "",
                     remote_addr: str | None = None) -> GenerationRecord:
        """Phase 3: trust only the new CA; the staged rotation is over."""
        return self._close_rotation("ca-stage-finish", 2, "finish", actor, reason, remote_addr)

    def stage_abort(self, *, actor: str, reason: str = "",
                    remote_addr: str | None = None) -> GenerationRecord:
        """Drop the next CA (phase 1 only: later, roll back instead)."""
        return self._close_rotation("ca-stage-abort", 1, "abort", actor, reason, remote_addr)

    def _close_rotation(self, operation: str, phase: int, step: str, actor: str, reason: str,
                        remote_addr: str | None) -> GenerationRecord:
        """End a staged rotation: trust only the signing CA, drop the next CA's files."""
        def build(base: StoredGeneration | None) -> Draft:
            assert base is not None
            self._expect_phase(base, phase, step)
            cur = parse_files(base.files)
            return Draft(pki.CertSet(cur.ca, cur.ca_key, cur.server, cur.server_key,
                                     cur.kubecfg, cur.kubecfg_key, (cur.ca,)))
        return self._commit(operation, actor, reason, build, items=("ca",),
                            remote_addr=remote_addr)

    @staticmethod
    def _expect_phase(base: StoredGeneration, phase: int, step: str) -> dict[str, Any]:
        state = dict(base.record.rotation or {})
        if state.get("phase") != phase:
            now = f"phase {state['phase']}" if state else "no staged rotation is open"
            hint = {"abort": " (after phase 1, roll back to the version before it instead)"}
            raise Conflict(f"cannot {step}: {now}{hint.get(step, '') if state else ''}")
        return state

    def rotate_leaf(self, item: str, *, actor: str, reason: str = "",
                    sans: list[str] | None = None, key_type: str | None = None,
                    remote_addr: str | None = None) -> GenerationRecord:
        """Re-issue `server` or `kubecfg` from the current CA."""
        if item == "ca":
            raise InvalidRequest("the CA is rotated with `rotate ca` (POST /v1/ca/rotate)")
        if item not in LEAVES:
            raise NotFound(f"no item {item!r} (leaves: {', '.join(LEAVES)})")
        if sans is not None and item != "server":
            raise InvalidRequest("only the server certificate has SANs")
        extra = tuple(parse_san_or_fail(s) for s in sans) if sans is not None else None
        new_key: list[pki.PrivateKey] = []

        def build(base: StoredGeneration | None) -> Draft:
            assert base is not None
            self._refuse_during_staged_rotation(base)
            cur, ca_key = signer(base)
            if not new_key:  # the key is made once; a retry only signs again
                new_key.append(pki.generate_key(key_type or pki.key_type_of(ca_key)))
            now = self.now()
            if item == "server":
                cert = pki.issue(self._server_profile(extra), cur.ca, ca_key, new_key[0],
                                 now=now)
                certs = pki.CertSet(cur.ca, ca_key, cert, new_key[0], cur.kubecfg,
                                    cur.kubecfg_key, cur.trust)
            else:
                cert = pki.issue(self._client_profile(), cur.ca, ca_key, new_key[0], now=now)
                certs = pki.CertSet(cur.ca, ca_key, cur.server, cur.server_key, cert,
                                    new_key[0], cur.trust)
            return Draft(certs, _extra_files(base), rotation=base.record.rotation)
        return self._commit(f"rotate-{item}", actor, reason, build, items=(item,),
                            remote_addr=remote_addr)

    def rollback(self, version: int, *, actor: str, reason: str = "",
                 remote_addr: str | None = None) -> GenerationRecord:
        """Make a new generation that copies `version` (with its rotation state)."""
        old = self.read(version)

        def build(base: StoredGeneration | None) -> Draft:
            return Draft(parse_files(old.files), _extra_files(old), source_version=version,
                         rotation=old.record.rotation)
        reason = reason or f"rollback to version {version}"
        return self._commit("rollback", actor, reason, build, remote_addr=remote_addr)

    def import_files(self, files: Mapping[str, bytes], *, actor: str, reason: str = "",
                     remote_addr: str | None = None) -> GenerationRecord:
        """Store an existing set (the seed's file names) as a new generation.

        Raises: InvalidMaterial naming the file at fault.
        """
        unknown = sorted(set(files) - set(IMPORT_FILES))
        if unknown:
            raise InvalidMaterial(f"{unknown[0]}: not one of {', '.join(IMPORT_FILES)}")
        missing = [n for n in IMPORT_FILES if n != "ca.key" and n not in files]
        if missing:
            raise InvalidMaterial(f"{missing[0]}: missing")
        certs = parse_import(files)

        def build(base: StoredGeneration | None) -> Draft:
            self._refuse_during_staged_rotation(base)
            return Draft(certs)
        return self._commit("import", actor, reason, build, allow_empty=True,
                            remote_addr=remote_addr)

    def issue_serving_cert(self, hosts: tuple[str, ...], *, actor: str, days: int = 90
                           ) -> tuple[bytes, bytes, bytes]:
        """Issue pkisvc's own HTTPS certificate for hosts from the current CA (audited).

        Returns (certificate PEM, key PEM, the trust bundle clients verify it with).
        Raises: Conflict when the current generation holds no CA key.
        """
        if not hosts:
            raise InvalidRequest("a serving certificate needs at least one host name or IP")
        gen = self.read()
        cur, ca_key = signer(gen)
        key = pki.generate_key(pki.key_type_of(ca_key))
        cert = pki.issue(pki.Profile("server", "pkisvc", days, sans=hosts), cur.ca, ca_key,
                         key, now=self.now())
        self.backend.append_audit(AuditEvent(
            time=pki.rfc3339(self.now()), actor=actor, action="self-tls", version=gen.version,
            items=("ca",), reason=f"pkisvc serving certificate {pki.fingerprint(cert)} for "
            + ", ".join(hosts)))
        return pki.cert_pem(cert), pki.key_pem(key), gen.files[TRUST_FILE]

    def record_delivery(self, *, actor: str, action: str, version: int,
                        items: tuple[str, ...], minion: str | None = None,
                        role: str | None = None, remote_addr: str | None = None) -> None:
        """Audit that key material left the service."""
        self.backend.append_audit(AuditEvent(
            time=pki.rfc3339(self.now()), actor=actor, action=action, version=version,
            items=items, minion=minion, role=role, remote_addr=remote_addr))

    # --- the one way a generation is written ------------------------------------------

    def _commit(self, operation: str, actor: str, reason: str,
                build: Callable[[StoredGeneration | None], Draft], *,
                items: tuple[str, ...] = ITEMS, expect_empty: bool = False,
                allow_empty: bool = False, remote_addr: str | None = None) -> GenerationRecord:
        for attempt in range(MAX_ATTEMPTS):
            parent = self.backend.latest()
            if expect_empty and parent is not None:
                raise AlreadyInitialised(f"the store is initialised (version {parent})")
            if parent is None and not (expect_empty or allow_empty):
                raise NotFound("the store is empty: run `pkisvc init`")
            base = self.backend.read(parent) if parent is not None else None
            draft = build(base)
            pki.check_set(draft.certs)
            gen = self._generation(draft, (parent or 0) + 1, parent, operation, actor, reason)
            try:
                version = self.backend.write(gen, expected=parent)
            except VersionConflict:
                if expect_empty:
                    raise AlreadyInitialised("the store was initialised meanwhile") from None
                log.info("%s met a concurrent writer on version %s; retrying", operation, parent)
                if attempt >= 1:  # back off, randomly, so racing writers spread out
                    time.sleep(random.uniform(0, min(0.25, 0.002 * 2 ** min(attempt, 7))))
                continue
            log.info("version %d written: %s by %s", version, operation, actor)
            self._audit_change(AuditEvent(
                time=gen.record.created_at, actor=actor, action=operation, version=version,
                items=items, reason=reason, remote_addr=remote_addr))
            return gen.record
        raise VersionConflict(f"{operation}: gave up after {MAX_ATTEMPTS} concurrent writers")

    def _audit_change(self, event: AuditEvent) -> None:
        """Append a written change's audit event, riding out a short outage.

        The generation exists already: giving up at once would leave a change nobody audited
        and answer 503 for a change that happened (a leader election takes a few seconds).
        """
        deadline = time.monotonic() + AUDIT_PATIENCE
        delay = 0.05
        retry = False
        while True:
            try:
                # A failed append may have landed (the answer was lost): never write it twice.
                if retry and event in self.backend.audit(since=_parse_time(event.time),
                                                         limit=10_000):
                    return
                retry = True
                self.backend.append_audit(event)
                return
            except BackendUnavailable as e:
                if time.monotonic() + delay > deadline:
                    log.error("version %s was written but its audit event was not: %s",
                              event.version, e.message)
                    raise
                log.warning("audit event of version %s: %s; trying again", event.version,
                            e.message)
                time.sleep(delay)
                delay = min(delay * 2, 1.0)

    def _generation(self, draft: Draft, version: int, parent: int | None, operation: str,
                    actor: str, reason: str) -> StoredGeneration:
        c = draft.certs
        files = {
            CERT_FILES["ca"]: pki.cert_pem(c.ca),
            CERT_FILES["server"]: pki.cert_pem(c.server),
            KEY_FILES["server"]: pki.key_pem(c.server_key),
            CERT_FILES["kubecfg"]: pki.cert_pem(c.kubecfg),
            KEY_FILES["kubecfg"]: pki.key_pem(c.kubecfg_key),
            TRUST_FILE: pki.bundle_pem(c.trust),
            **draft.extra_files,
        }
        if c.ca_key is not None:
            files[KEY_FILES["ca"]] = pki.key_pem(c.ca_key)
        record = GenerationRecord(
            version=version, parent=parent, created_at=pki.rfc3339(self.now()), actor=actor,
            operation=operation, reason=reason, key_type=pki.key_type_of(c.server_key),
            items={"ca": pki.describe(c.ca), "server": pki.describe(c.server),
                   "kubecfg": pki.describe(c.kubecfg)},
            trust=tuple(pki.fingerprint(t) for t in c.trust),
            source_version=draft.source_version, rotation=draft.rotation)
        return StoredGeneration(record, files)

    # --- profiles ----------------------------------------------------------------------

    def _new_keys(self, key_type: str | None) -> dict[str, pki.PrivateKey]:
        kt = key_type or self.settings.key_type
        return {item: pki.generate_key(kt) for item in ITEMS}

    def _server_profile(self, sans: tuple[str, ...] | None = None) -> pki.Profile:
        s = self.settings
        extra = s.server.sans if sans is None else sans
        return pki.Profile("server", s.server.common_name, s.server.days,
                           sans=pki.server_sans(extra, str(s.service_cidr), s.cluster_domain))

    def _client_profile(self) -> pki.Profile:
        k = self.settings.kubecfg
        return pki.Profile("client", k.common_name, k.days, organization=k.organization)

    def _fresh_set(self, keys: dict[str, pki.PrivateKey]) -> Draft:
        now = self.now()
        s = self.settings
        ca = pki.make_ca(pki.Profile("ca", s.ca.common_name, s.ca.days), keys["ca"], now=now)
        server = pki.issue(self._server_profile(), ca, keys["ca"], keys["server"], now=now)
        kubecfg = pki.issue(self._client_profile(), ca, keys["ca"], keys["kubecfg"], now=now)
        return Draft(pki.CertSet(ca, keys["ca"], server, keys["server"], kubecfg,
                                 keys["kubecfg"], (ca,)))

    @staticmethod
    def _refuse_during_staged_rotation(base: StoredGeneration | None) -> None:
        if base is not None and base.record.rotation:
            phase = base.record.rotation.get("phase")
            raise Conflict(f"a staged CA rotation is open (phase {phase}): continue, finish "
                           "or abort it first")


class _NothingDue(Exception):
    """Raised inside a renewal build when nothing is due any more."""


def _parse_time(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


def signer(gen: StoredGeneration) -> tuple[pki.CertSet, pki.PrivateKey]:
    """A generation's set and its CA key, for anything that signs with it.

    Raises: Conflict when the generation was imported without ca.key.
    """
    certs = parse_files(gen.files)
    if certs.ca_key is None:
        raise Conflict(f"version {gen.version} holds no CA key (it was imported without "
                       "ca.key): rotate the CA (immediately) before pkisvc can sign with it")
    return certs, certs.ca_key


def parse_san_or_fail(value: Any) -> str:
    try:
        return parse_san("sans", value)
    except ConfigError as e:
        raise InvalidRequest(e.message) from None


def _extra_files(gen: StoredGeneration) -> dict[str, bytes]:
    """Files a generation holds beyond the standard set (e.g. a staged rotation's next CA)."""
    standard = {*CERT_FILES.values(), *KEY_FILES.values(), TRUST_FILE}
    return {n: b for n, b in gen.files.items() if n not in standard}


def parse_files(files: Mapping[str, bytes]) -> pki.CertSet:
    """Parse a stored generation's files (written, and checked, by pkisvc)."""
    ca_key = files.get(KEY_FILES["ca"])
    return pki.CertSet(
        ca=pki.load_cert(files[CERT_FILES["ca"]], "ca.crt"),
        ca_key=pki.load_key(ca_key, "ca.key", trusted=True) if ca_key is not None else None,
        server=pki.load_cert(files[CERT_FILES["server"]], "server.cert"),
        server_key=pki.load_key(files[KEY_FILES["server"]], "server.key", trusted=True),
        kubecfg=pki.load_cert(files[CERT_FILES["kubecfg"]], "kubecfg.crt"),
        kubecfg_key=pki.load_key(files[KEY_FILES["kubecfg"]], "kubecfg.key", trusted=True),
        trust=tuple(pki.load_certs(files[TRUST_FILE], "trust bundle")),
    )


def parse_import(files: Mapping[str, bytes]) -> pki.CertSet:
    """Parse an imported set; ca.crt may be a bundle: its issuer of server.cert signs."""
    bundle = pki.load_certs(files["ca.crt"], "ca.crt")
    server = pki.load_cert(files["server.cert"], "server.cert")
    # CAs of one cluster share a name (old and new during a rotation): the signer is the one
    # whose key signed server.cert; failing that, check_set names what is wrong.
    signer = pki.issuer_among(server, bundle) or next(
        (c for c in bundle if c.subject == server.issuer), bundle[0])
    ca_key = files.get("ca.key")
    return pki.CertSet(
        ca=signer,
        ca_key=pki.load_key(ca_key, "ca.key") if ca_key is not None else None,
        server=server, server_key=pki.load_key(files["server.key"], "server.key"),
        kubecfg=pki.load_cert(files["kubecfg.crt"], "kubecfg.crt"),
        kubecfg_key=pki.load_key(files["kubecfg.key"], "kubecfg.key"),
        trust=tuple(bundle))


def read_import_dir(path: str | Path) -> dict[str, bytes]:
    """Read the seed's file names from a directory (ca.key is optional)."""
    root = Path(path)
    if not root.is_dir():
        raise InvalidRequest(f"{root}: not a directory")
    out = {}
    for name in IMPORT_FILES:
        f = root / name
        if f.is_file():
            try:
                out[name] = f.read_bytes()
            except OSError as e:
                raise InvalidMaterial(f"{f}: {e.strerror}") from None
    return out


def read_import_pillar(path: str | Path, key: str) -> dict[str, bytes]:
    """Read a pasted-pillar YAML file; key (`a:b`) names the mapping of file names to PEM."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise InvalidRequest(f"{path}: {e.strerror}") from None
    except yaml.YAMLError:
        raise InvalidRequest(f"{path}: not valid YAML") from None
    node: Any = doc
    for part in key.split(":"):
        if not isinstance(node, Mapping) or part not in node:
            raise InvalidRequest(f"{path}: no key {key!r} (missing {part!r})")
        node = node[part]
    if not isinstance(node, Mapping):
        raise InvalidRequest(f"{path}: {key!r} is not a mapping of file names to PEM")
    aliases = {n.replace(".", "_"): n for n in IMPORT_FILES}
    out: dict[str, bytes] = {}
    for name, value in node.items():
        fname = aliases.get(str(name), str(name))
        where = one_line(f"{key}:{name}")
        if fname not in IMPORT_FILES:
            raise InvalidMaterial(f"{where}: not one of {', '.join(IMPORT_FILES)}")
        if not isinstance(value, str):
            raise InvalidMaterial(f"{where}: not a PEM text")
        out[fname] = value.encode()
    return out
