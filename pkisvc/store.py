"""CertStore: the commit core over one Backend, and thin operations that call the planners.

The store is the only part of pkisvc that reads the clock or talks to a backend.  Every change
is planned (`pkisvc.changes`) on top of the latest generation, checked with `pki.check_set`,
and written with `expected=<the version it built on>`; a concurrent writer makes that write
conflict, and the change is planned again on the new latest (with the keys it made already)
and tried again (a bounded number of times).  Every change's audit event is written with its
generation, in the same commit (`Backend.write(..., event=)`): a version never exists without
it.  When the backend's answer to a write is lost (a connection cut after the request was
sent), the store reads back before it answers: a committed change is reported as done.

Reads of the latest version and of the tokens list go through `pkisvc.freshness`: on the
vault backend they are served from memory within `vault.version_ttl` of a read, and for up to
`vault.stale_for` while Vault cannot be reached (marked stale); a change never plans on them.
The minions' states are held the same way (never stale), and every listing of them — the
minions page, `/v1/hosts`, `pkisvc hosts`, the metrics, the gates — reads one `Fleet`, made
again only when a state, the latest version or (for a host's silent/expired state) the clock
moved it.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import random
import re
import threading
import time
from bisect import bisect_left, bisect_right
from datetime import UTC, datetime, timedelta
from typing import Any, Callable, Mapping

from pkisvc import chain, changes, hosts, pki, sessions
from pkisvc.backends.base import Backend
from pkisvc.changes import Keys, Planner, Profiles
from pkisvc.errors import (
    AlreadyInitialised,
    AnswerLost,
    BackendUnavailable,
    Conflict,
    Forbidden,
    HostsBehind,
    InvalidMaterial,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PkiError,
    Unauthorized,
    VersionConflict,
)
from pkisvc.freshness import Kept, Seen, Watcher
from pkisvc.imports import check_import, kept_bytes
from pkisvc.model import (
    ACTOR_MAX,
    CERT_FILES,
    HOST_FILES,
    ITEMS,
    KEY_FILES,
    LEAVES,
    MINION_ID,
    REASON_MAX,
    SA_FILES,
    TRUST_FILE,
    AuditEvent,
    GenerationRecord,
    Installed,
    ItemRecord,
    MinionState,
    SessionRecord,
    StoredGeneration,
    TokenRecord,
    check_text,
    format_time,
    valid_file_name,
)
from pkisvc.settings import Settings
from pkisvc.tokens import new_token
from pkisvc.witness import Damaged, Lost, Witness, compare, tips

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 60
SETTLE_PATIENCE = 15.0  # seconds a write whose answer was lost keeps asking what became of it
CHAIN_RETRY = 30.0  # seconds before the chain is checked again when the store was away
# Host files a staged CA rotation changes (its gates wait for hosts holding any of them).
CA_HOST_FILES = tuple(n for n in HOST_FILES if n not in SA_FILES)
STATE_ATTEMPTS = 3  # writers of one minion's state racing each other before we leave it


@dataclasses.dataclass(frozen=True)
class Fleet:
    """Every known minion at one moment (`CertStore.fleet`): shared, never changed."""

    latest: int  # 0: the store is empty (no views then)
    states: list[MinionState]  # by minion id
    views: list[dict[str, Any]]  # each minion's host view (pkisvc.hosts), same order
    counts: dict[str, int]  # hosts by state
    until: datetime  # the views' states hold until then (the clock moves them after)

    def index(self, minion: str, *, past: bool = False) -> int:
        """Where minion is (or would be) in states; past: the first after it."""
        find = bisect_right if past else bisect_left
        return find(self.states, minion, key=lambda s: s.minion)


def _replaced(states: list[MinionState], minion: str, state: MinionState | None
              ) -> list[MinionState]:
    """states (by minion id) with minion's replaced by state (None: taken out)."""
    i = bisect_left(states, minion, key=lambda s: s.minion)
    out = list(states)
    if i < len(out) and out[i].minion == minion:
        out[i:i + 1] = [] if state is None else [state]
    elif state is not None:
        out.insert(i, state)
    return out


def utcnow() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


class CertStore:
    """The cluster's certificates: read them, change them, see their history."""

    def __init__(self, backend: Backend, settings: Settings,
                 clock: Callable[[], datetime] = utcnow) -> None:
        self.backend = backend
        self.settings = settings
        self._clock = clock
        # Each minion's state as this process last read or wrote it, with its `asked` parsed:
        # an unchanged pillar answer is decided here, with no backend read.
        self._minions: dict[str, MinionState] = {}
        self._file_digests: dict[int, dict[str, str]] = {}
        # Per minion: (its state, the latest version, its facts, their verdict, its view).
        self._host_facts: dict[str, tuple[MinionState, int, dict[str, Any], str,
                                          dict[str, Any]]] = {}
        self._fleet: Fleet | None = None
        self._fleet_lock = threading.Lock()
        self._touch = timedelta(seconds=settings.delivery.touch_interval)
        self.chain_status: dict[str, Any] | None = None  # the last check (None: not yet)
        self._prune_refused = False  # the token may not delete old event days (said once)
        self._chain_watch: threading.Thread | None = None
        # The base of the next change (the latest version, parsed): one, so memory stays flat.
        self._kept_base: changes.Base | None = None

        # The latest version and the tokens list as hot reads see them (pkisvc.freshness):
        # on the vault backend within `vault.version_ttl` of a read, and served stale for up
        # to `vault.stale_for` while Vault cannot be reached; elsewhere read every time.
        remote = getattr(backend, "name", None) == "vault"
        ttl = settings.vault.version_ttl if remote else 0.0
        stale_for = settings.vault.stale_for if remote else 0.0
        self._latest: Kept[int | None] = Kept(backend.latest, ttl=ttl, stale_for=stale_for,
                                              monotonic=True)
        self._tokens: Kept[list[TokenRecord]] = Kept(backend.tokens, ttl=ttl,
                                                     stale_for=stale_for)
        # The minions' states: dozens of secrets on Vault, so re-read ahead on use rather than
        # polled; never served stale (an outage answers 503).
        self._states: Kept[list[MinionState]] = Kept(backend.minions, ttl=ttl, stale_for=0.0,
                                                     ahead=True)
        self._watcher: Watcher | None = None
        if ttl > 0:
            self._watcher = Watcher(ttl / 2)
            self._watcher.watch(self._latest)
            self._watcher.watch(self._tokens)
        self._watching = False

    def now(self) -> datetime:
        return self._clock()

    def watch(self) -> None:
        """Re-read the hot values in the background (a serving process; see freshness)."""
        self._watching = self._watcher is not None

    # --- reading -----------------------------------------------------------------------

    def latest(self) -> int | None:
        """The latest version as hot reads see it (within `vault.version_ttl`)."""
        return self.latest_seen().value

    def latest_seen(self) -> Seen[int | None]:
        """The latest version, and its age when it is served stale (the backend is down)."""
        if self._watching:
            self._watcher.ensure_running()  # type: ignore[union-attr]
        return self._latest.get()

    def ping(self) -> None:
        self.backend.ping()

    def read(self, version: int | None = None) -> StoredGeneration:
        """A version (the latest as `latest()` sees it by default)."""
        if version is None:
            version = self.latest()
        return self.backend.read(version)

    def versions(self) -> list[GenerationRecord]:
        """Every generation's record, newest first."""
        return list(reversed(self.backend.versions()))

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
        """Return the files hosts install, by their host names (`ca.crt` is the trust bundle).

        A generation without a service-account key (made before [M]) has no sa.key/sa.pub:
        a role that names them gets the rest.
        """
        return {n: gen.files[TRUST_FILE if n == "ca.crt" else n] for n in names
                if n not in SA_FILES or n in gen.files}

    def audit(self, since: datetime | None = None, limit: int = 100) -> list[AuditEvent]:
        return self.backend.audit(since=since, limit=limit)

    def tokens(self) -> list[TokenRecord]:
        return self.tokens_seen().value

    def tokens_seen(self) -> Seen[list[TokenRecord]]:
        """The tokens kept by the backend (within `vault.version_ttl`; stale in an outage)."""
        if self._watching:
            self._watcher.ensure_running()  # type: ignore[union-attr]
        return self._tokens.get()

    def expiration(self, version: int | None = None) -> list[dict[str, Any]]:
        """Rows for `check-expiration`: each certificate, its expiry and what is left."""
        return changes.expiration(self.read(version).record, self.now())

    def due(self, version: int | None = None) -> dict[str, Any]:
        """What renewal would do now: leaves inside `renew_before`, a CA inside `ca_warn_before`,
        and what stops it (`blocked`)."""
        gen = self.read(version)
        return changes.renewal_report(gen.record, self.now(), self.settings,
                                      has_ca_key=KEY_FILES["ca"] in gen.files)

    def warnings(self, record: GenerationRecord) -> list[str]:
        """What an operator should know of record: expired certificates, and where the
        settings differ from its leaves (never applied)."""
        return [*changes.expired(record, self.now()),
                *changes.settings_drift(record, self.settings)]

    def rotation(self) -> dict[str, Any]:
        """The open staged rotation, if any: phase, CAs, and the step that comes next."""
        return changes.rotation_state(self.read().record)

    def sa_rotation(self) -> dict[str, Any]:
        """The service-account key, its open rotation if any, and when phase 3 is allowed."""
        state = changes.sa_state(self.read().record)
        state["overlap_seconds"] = self.settings.sa_overlap
        state["overlap_left_seconds"] = (
            changes.sa_overlap_left(state, self.now(), self.settings.sa_overlap)
            if state["phase"] == 2 else None)
        return state

    # --- the audit chain (pkisvc.chain) ------------------------------------------------

    def verify(self) -> chain.Report:
        """Walk the audit chain as stored; every break, the first first."""
        if not self.backend.chain_key.exists():
            report = chain.Report()
            stored = self.backend.chain_versions()
            report.versions = len(stored)
            if any(v.link is not None for v in stored) or self.backend.chain_periods():
                report.breaks.append(f"the chain key ({self.backend.chain_key.path}) is "
                                     "missing while the store is chained")
            else:
                report.notes.append("no chain key yet: nothing is chained")
            return report
        key, unchained = self.backend.chain_key.load()
        witness: Witness | None = getattr(self.backend, "witness", None)
        lost = None
        try:
            # Read before the store: it then names nothing committed after the store's read.
            seen, damaged = (witness.read(key) if witness else None), None
        except Lost as e:
            seen, damaged, lost = None, None, str(e)
        except Damaged as e:
            seen, damaged = None, str(e)
        versions, periods = self.backend.chain_versions(), self.backend.chain_periods()
        floor = self._prune_floor()
        report = chain.verify(key, unchained, versions, periods, prunable_before=floor)
        if witness is None:
            return report
        if damaged:
            report.breaks.append(damaged)
        elif seen is None:
            report.notes.append(f"{lost or f'no witness on this host yet ({witness.path})'}: "
                                "removals of the newest entries are told from now on")
        else:
            report.breaks.extend(compare(seen, versions, periods, prunable_before=floor,
                                         where=f"witness {witness.path}"))
        if report.ok:
            witness.raise_to(key, tips(versions, periods))
        return report

    def _prune_floor(self) -> str | None:
        keep = self.settings.audit.keep
        return chain.period_of(self.now() - timedelta(seconds=keep)) if keep else None

    def prune_audit(self, *, actor: str) -> list[str]:
        """Drop the appended events of periods older than `audit.keep` (whole periods; the
        checkpoint of the oldest kept one says what came before); audited when any went."""
        floor = self._prune_floor()
        if floor is None:
            return []
        gone = self.backend.prune_periods(floor)
        if gone:
            log.info("audit events of %s..%s pruned (audit.keep)", gone[0], gone[-1])
            self._audit(actor, "audit-prune",
                        reason=f"events of {gone[0]}..{gone[-1]} removed by audit.keep")
        return gone

    def check_chain(self) -> dict[str, Any] | None:
        """Verify the chain, keep the outcome for health and metrics; then, if it held,
        prune by `audit.keep` (a broken chain keeps every period: the evidence).  None when
        the backend could not be read (nothing decided)."""
        try:
            status = self.verify().to_dict()
        except BackendUnavailable as e:
            # Not a break: the store cannot be read now.  The last outcome stands, and the
            # watch tries again soon (CHAIN_RETRY) rather than after a whole interval.
            log.warning("audit chain: not checked now: %s", e.message)
            return None
        except PkiError as e:
            status = {"ok": False, "first_break": f"cannot check: {e.message}"}
        status["checked_at"] = self.now()
        self.chain_status = status
        if not status["ok"]:
            log.error("audit chain: %s", status["first_break"])
            return status
        try:
            self.prune_audit(actor="pkisvc:retention")
        except PermissionDenied as e:
            # The shipped Vault service policy deletes nothing: retention there is an
            # operator's `pkisvc verify --prune` with the admin policy.  Said once.
            if not self._prune_refused:
                log.info("audit retention: %s (prune with `pkisvc verify --prune` and a "
                         "token that may delete old event days)", e.message)
            self._prune_refused = True
        except PkiError as e:
            log.warning("audit retention: %s", e.message)
        return status

    def watch_chain(self) -> None:
        """Check the chain now, in the background, and every `audit.verify_interval`."""
        if self._chain_watch is not None:
            return
        interval = self.settings.audit.verify_interval

        def run() -> None:
            while True:
                checked: dict[str, Any] | None = {}
                try:
                    checked = self.check_chain()
                except Exception:  # a bug must not end the watch silently
                    log.exception("audit chain: the check failed")
                if checked is None:
                    time.sleep(CHAIN_RETRY)  # the backend was away: soon, whatever interval
                    continue
                if not interval:
                    return
                time.sleep(interval)
        self._chain_watch = threading.Thread(target=run, name="pkisvc-chain", daemon=True)
        self._chain_watch.start()

    # --- the operator pages' sessions (`pkisvc.sessions` decides; only hashes are stored) --

    def open_session(self, token_sha256: str, *, replacing: str | None = None) -> str:
        """Open a session for the token with that hash, which just logged in; return its id
        (the only time it is seen).  Sessions that ended, this token's oldest beyond
        `sessions.PER_TOKEN`, and the session `replacing` (the browser's previous id), if
        any, are removed first.

        Raises: Unauthorized when the token is gone (revoked meanwhile).
        """
        now, idle = self.now(), self.settings.ui.session_idle
        tokens = self._token_table()
        token = tokens.get(token_sha256)
        if token is None:
            raise Unauthorized("unknown token")
        gone = sessions.to_end(self.backend.sessions(), tokens, now=now, idle=idle,
                               opening=token_sha256)
        previous = sessions.session_hash(replacing) if replacing else None
        if previous is not None:
            gone.append(previous)
        if gone:
            self.backend.end_sessions(gone)
        session_id, record = sessions.new_session(token_sha256, token, now=now,
                                                  ttl=self.settings.ui.session_ttl)
        self.backend.add_session(record)
        return session_id

    def session(self, session_id: str) -> SessionRecord | None:
        """The session with that id while it lets its holder in, else None (one that ended
        is removed).  Its token is looked up again: a revoked token ends its sessions."""
        digest = sessions.session_hash(session_id)
        if digest is None:
            return None  # not an id we make: no backend read
        held = self.backend.session(digest)
        if held is None:
            return None
        now, idle = self.now(), self.settings.ui.session_idle
        why = sessions.ended(held, self._token(held.token_sha256), now=now, idle=idle)
        try:
            if why:
                self.backend.end_sessions([digest])
                return None
            if sessions.touch_due(held, now=now, idle=idle) and \
                    not self.backend.touch_session(digest, now):
                return None  # ended meanwhile (a logout in another worker)
        except PkiError as e:
            # A store that reads but cannot write now: the session is refused or kept all the
            # same (removed at a later login; its last use written next time).
            log.warning("operator pages: cannot update session %s... (%s): %s", digest[:8],
                        why or "last use", e.message)
            return None if why else held
        return held

    def end_session(self, session_id: str) -> None:
        """End the session with that id (logout); nothing when there is none."""
        digest = sessions.session_hash(session_id)
        if digest is not None:
            self.backend.end_sessions([digest])

    def _token(self, sha256: str) -> tuple[str, tuple[str, ...]] | None:
        """(name, scopes) of the token with that hash: the settings first (no backend read)."""
        for t in self.settings.tokens:
            if t.sha256 == sha256:
                return t.name, t.scopes
        return self._token_table().get(sha256)

    def _token_table(self) -> dict[str, tuple[str, tuple[str, ...]]]:
        return {**{t.sha256: (t.name, t.scopes) for t in self.tokens()},
                **{t.sha256: (t.name, t.scopes) for t in self.settings.tokens}}

    # --- what is not a generation: tokens, deliveries, the service's own certificate -----

    def create_token(self, name: str, scopes: list[str] | tuple[str, ...], *, actor: str,
                     remote_addr: str | None = None) -> str:
        """Make an API token; return it (the only time it is seen: only its hash is kept)."""
        token, record = new_token(name, scopes, now=self.now(),
                                  configured={t.name for t in self.settings.tokens})
        try:
            self.backend.put_token(record)
        finally:
            self._tokens.expire()
        self._audit(actor, "token-create", reason=f"{name}: {','.join(scopes)}",
                    remote_addr=remote_addr)
        return token

    def revoke_token(self, name: str, *, actor: str, remote_addr: str | None = None) -> None:
        """Revoke an API token made by create_token."""
        try:
            self.backend.revoke_token(name)
        finally:
            self._tokens.expire()
        self._audit(actor, "token-revoke", reason=name, remote_addr=remote_addr)

    def record_delivery(self, *, actor: str, action: str, version: int | None,
                        items: tuple[str, ...], minion: str | None = None,
                        role: str | None = None, remote_addr: str | None = None,
                        reason: str = "") -> None:
        """Audit that key material left the service (a key read, a kubeconfig, an export)."""
        self._audit(actor, action, version=version, items=items, minion=minion, role=role,
                    remote_addr=remote_addr, reason=reason)

    def record_pillar(self, *, actor: str, minion: str, role: str, version: int,
                      items: tuple[str, ...], remote_addr: str | None = None) -> None:
        """Note that minion holds version for role (a pillar answer, a 304 included).

        Writes only when the minion's version or role changed (one `pillar` audit event, then
        its state) or its stored "last asked" is older than `delivery.touch_interval` (its
        state alone).  An unchanged answer is decided from what this process saw last; a view
        another process made stale costs a conflict and a read, never a missed change.

        The event goes first, under an id the change alone decides (`delivery_id`): killed or
        cut off between the two writes, the state still names the old version, the next
        answer makes the same change again, and its event, written again, is listed once.  So
        every state a minion is seen in has its event.  A state another writer changed first
        (a conflict) is retried on the new state without a second event: one answer, one
        delivery, one event.
        """
        now = self.now()
        seen = self._minions.get(minion)
        same = seen is not None and seen.version == version and seen.role == role
        if same and seen is not None and now < seen.asked + self._touch:
            return
        revalidation = not items  # a 304: the minion holds it already, nothing leaves
        try:
            # A change (as far as this process knows) is decided on the stored state.
            held = seen if same else self.backend.minion(minion)
        except BackendUnavailable as e:
            if not revalidation:
                raise
            log.warning("minion %s: delivery state not read (answered 304): %s", minion,
                        e.message)
            return
        event_written = False  # this answer's event is in the store: one per delivery
        for _ in range(STATE_ATTEMPTS):
            change = held is None or held.version != version or held.role != role
            if held is not None and not change:
                if now < held.asked + self._touch:  # another process touched it meanwhile
                    self._saw(minion, held)
                    return
                new = dataclasses.replace(held, asked=now)
            else:
                if held is not None:  # its last report ([Q]) stays with it
                    new = dataclasses.replace(held, role=role, version=version, received=now,
                                              asked=now)
                else:
                    new = MinionState(minion, role, version, received=now, asked=now)
            try:
                if change and not event_written:  # the event first (see above)
                    self.backend.append_audit(AuditEvent(
                        time=now, actor=actor, action="pillar", version=version, items=items,
                        remote_addr=remote_addr, minion=minion, role=role,
                        id=delivery_id(held, new)))
                    event_written = True
                self._put_minion(new, held)
            except VersionConflict:
                held = self.backend.minion(minion)
                continue
            except BackendUnavailable as e:
                if change and not revalidation:
                    raise
                log.warning("minion %s: %s not stored: %s", minion,
                            f"holding version {version}" if change else "last asked",
                            e.message)
                return
            self._saw(minion, new)
            return
        log.info("minion %s: its state kept changing under us; left to the other writers",
                 minion)

    def _put_minion(self, new: MinionState, held: MinionState | None) -> None:
        """Replace held by new; an answer lost on the way is settled by reading back."""
        try:
            self.backend.put_minion(new, expected=held)
        except AnswerLost as lost:
            log.warning("minion %s: %s; reading its state back", new.minion, lost.message)
            try:
                landed = self.backend.minion(new.minion) == new
            except BackendUnavailable:
                landed = False
            if not landed:
                raise

    def _saw(self, minion: str, state: MinionState | None) -> None:
        """Keep a minion's state this process wrote or read (None: forgotten) for its pillar
        answers, and show it in the listings at once."""
        if state is None:
            self._minions.pop(minion, None)
            self._host_facts.pop(minion, None)
        else:
            self._minions[minion] = state
        self._states.amend(lambda states: _replaced(states, minion, state))

    # --- hosts: what each minion has installed ([Q]; `pkisvc.hosts` judges) --------------

    def _digests(self, version: int) -> dict[str, str]:
        """sha256 of every host file of a version (generations never change: kept)."""
        table = self._file_digests.get(version)
        if table is None:
            gen = self.read(version)
            table = self._file_digests[version] = hosts.digests(
                self.host_files(gen, [n for n in HOST_FILES if n in gen.files or n == "ca.crt"]))
        return table

    def _role_files(self, role: str | None, table: Mapping[str, str]) -> list[str]:
        return [n for n in self.settings.roles.get(role or "", ()) if n in table]

    def report_host(self, minion: str, *, claimed: str, state: str, result: bool,
                    files: Mapping[str, str | None], actor: str,
                    remote_addr: str | None = None) -> dict[str, Any]:
        """Keep what the Salt master reports minion has installed; return its host view.

        minion: Salt's authenticated id (the job return's); claimed: the id the host's own
        state output names.  Raises: Forbidden when they differ; Conflict when pkisvc never
        delivered to minion (its pillar comes first).
        """
        check_minion_report(minion, claimed, state, files)
        latest = self.latest()
        if latest is None:
            raise NotFound("the store is empty: run `pkisvc init`")
        held = self.backend.minion(minion)
        for _ in range(STATE_ATTEMPTS):
            if held is None:
                raise Conflict(f"minion {minion}: pkisvc never delivered to it (its pillar "
                               "comes before its report)")
            names = self._role_files(held.role, self._digests(latest))
            window = range(latest, max(0, latest - hosts.MATCH_WINDOW), -1)
            matched, version = hosts.match(files, names,
                                           ((v, self._digests(v)) for v in window))
            installed = Installed(reported=self.now(), state=state, result=result,
                                  files=matched, version=version, reporter=actor)
            new = dataclasses.replace(held, installed=installed)
            try:
                self.backend.put_minion(new, expected=held)
            except VersionConflict:
                held = self.backend.minion(minion)
                continue
            self._saw(minion, new)
            before = held.installed.version if held.installed else None
            if version != before:
                self._audit(actor, "host-installed", version=version, minion=minion,
                            role=held.role, remote_addr=remote_addr,
                            reason=f"{state}: {'ok' if result else 'failed'}")
            return self._host_view(new, latest, self._cuts(self.now()))
        raise VersionConflict(f"minion {minion}: its state kept changing; report again")

    def _host_view(self, state: MinionState, latest: int, cuts: Mapping[str, datetime]
                   ) -> dict[str, Any]:
        """A host's view (`hosts.facts` and its state) against latest.  Its facts change only
        with its state or the current version, its state with the clock too: kept while the
        backend hands back the same state object (both backends keep unchanged ones), so a
        listing costs a comparison or two per host."""
        kept = self._host_facts.get(state.minion)
        if kept is not None and kept[0] is state and kept[1] == latest:
            found, files_say, view = kept[2], kept[3], kept[4]
        else:
            table = self._digests(latest)
            expected = {n: table[n] for n in self._role_files(state.role, table)}
            found = hosts.facts(state, current=latest, expected=expected)
            files_say, view = hosts.verdict(found), {}
        label = hosts.label(files_say, state, **cuts)
        if view.get("state") != label:
            view = {**found, "state": label}
        self._host_facts[state.minion] = (state, latest, found, files_say, view)
        return view

    def _cuts(self, now: datetime) -> dict[str, datetime]:
        return {"silent_before": now - timedelta(seconds=self.settings.hosts.silent_after),
                "expire_before": now - timedelta(seconds=self.settings.hosts.expire_after)}

    def fleet(self, *, strict: bool = False) -> Fleet:
        """Every known minion's state and host view, as listings and gates read them.

        Within `vault.version_ttl` on the vault backend (this process's own writes at once);
        strict: read now (the gates).  Made again only when a state or the latest version
        changed, or the clock turned a host silent or expired."""
        latest = self.latest() or 0
        states = self.backend.minions() if strict else self._states.get().value
        now = self.now()
        with self._fleet_lock:  # one thread makes it; the others wait for it
            held = self._fleet
            if held is None or held.states is not states or held.latest != latest or (
                    now > held.until):
                held = self._fleet = self._made_fleet(latest, states, now)
            return held

    def _made_fleet(self, latest: int, states: list[MinionState], now: datetime) -> Fleet:
        cuts = self._cuts(now)
        silent = timedelta(seconds=self.settings.hosts.silent_after)
        expire = timedelta(seconds=self.settings.hosts.expire_after)
        views: list[dict[str, Any]] = []
        counts, until = dict.fromkeys(hosts.STATES, 0), datetime.max.replace(tzinfo=UTC)
        for s in states if latest else ():
            view = self._host_view(s, latest, cuts)
            views.append(view)
            counts[view["state"]] += 1
            for t in hosts.turns(s, silent_after=silent, expire_after=expire):
                if now <= t < until:
                    until = t
        if len(self._host_facts) > len(states):  # minions another process forgot: let go
            listed = {s.minion for s in states}
            for minion in [m for m in list(self._host_facts) if m not in listed]:
                self._host_facts.pop(minion, None)
        return Fleet(latest, states, views, counts, until)

    def hosts(self, *, strict: bool = False) -> list[dict[str, Any]]:
        """Every known minion: delivered and installed versions, per-file drift, state."""
        return self.fleet(strict=strict).views

    def host_page(self, *, after: str = "", only: str | None = None, limit: int | None
                  ) -> tuple[list[dict[str, Any]], dict[str, int], str | None]:
        """Hosts in minion-id order after `after` (those in state `only`, if given), at most
        limit of them (None: all); the counts by state of every host; the `after` of the
        next page (None: this is the last)."""
        fleet = self.fleet()
        page: list[dict[str, Any]] = []
        more = None
        for view in fleet.views[fleet.index(after, past=True):]:
            if only is None or view["state"] == only:
                if limit is not None and len(page) == limit:
                    more = page[-1]["minion"] if page else after
                    break
                page.append(view)
        return page, fleet.counts, more

    def forget_host(self, minion: str, *, actor: str, remote_addr: str | None = None) -> None:
        """Drop a minion's delivery state and reports (a decommissioned host; audited).

        Raises: NotFound when pkisvc holds nothing of it.
        """
        self.backend.forget_minion(minion)
        self._saw(minion, None)
        self._audit(actor, "host-forget", minion=minion, remote_addr=remote_addr)

    def _gate(self, step: str, affected: tuple[str, ...], force: bool, reason: str) -> str:
        """Refuse step while a host holding an affected file has not installed the current
        version; with force, return the reason the change records (marked forced)."""
        late = hosts.behind(self.hosts(strict=True), affected)
        if not late:
            return reason
        if not force:
            raise HostsBehind(hosts.refusal(step, late), hosts=late)
        names = ", ".join(h["minion"] for h in late[:20])
        return (f"forced past {len(late)} host(s) not on the current phase ({names})"
                + (f": {reason}" if reason else ""))

    def issue_serving_cert(self, hosts: tuple[str, ...], *, actor: str, days: int = 90
                           ) -> tuple[bytes, bytes, bytes]:
        """Issue pkisvc's own HTTPS certificate for hosts from the current CA (audited).

        Returns (certificate PEM, key PEM, the trust bundle clients verify it with).
        Raises: Conflict when the current generation holds no CA key.
        """
        if not hosts:
            raise InvalidRequest("a serving certificate needs at least one host name or IP")
        gen = self.read()
        cert, key = changes.serving_cert(changes.parse(gen), hosts, days, self.now())
        self._audit(actor, "self-tls", version=gen.version, items=("ca",),
                    reason=f"pkisvc serving certificate {pki.fingerprint(cert)} for "
                    + ", ".join(hosts))
        return pki.cert_pem(cert), pki.key_pem(key), gen.files[TRUST_FILE]

    def _audit(self, actor: str, action: str, **fields: Any) -> None:
        self.backend.append_audit(AuditEvent(time=self.now(), actor=actor,
                                             action=action, **fields))

    # --- changes: each a planner handed to _commit ------------------------------------

    def init(self, *, actor: str, reason: str = "", key_type: str | None = None,
             remote_addr: str | None = None) -> GenerationRecord:
        """Make the first generation (AlreadyInitialised when the store holds one)."""
        return self._commit("init", changes.init, actor, reason, key_type=key_type,
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
        return self._commit("rotate-ca", changes.rotate_ca, actor, reason, key_type=key_type,
                            remote_addr=remote_addr)

    def rotate_leaf(self, item: str, *, actor: str, reason: str = "",
                    add_sans: list[str] | tuple[str, ...] = (),
                    remove_sans: list[str] | tuple[str, ...] = (),
                    sans: list[str] | tuple[str, ...] | None = None,
                    key_type: str | None = None,
                    remote_addr: str | None = None) -> GenerationRecord:
        """Re-issue `server` or `kubecfg` from the current CA, keeping its subject and SANs;
        the server's SANs change only by add_sans, remove_sans, or sans (the whole list)."""
        change = changes.leaf_request(item, add=add_sans, remove=remove_sans, sans=sans)
        plan = functools.partial(changes.rotate_leaf, item=item, sans=change)
        return self._commit(f"rotate-{item}", plan, actor, reason, key_type=key_type,
                            items=(item,), remote_addr=remote_addr)

    def renew(self, *, actor: str, dry_run: bool = False,
              remote_addr: str | None = None) -> tuple[dict[str, Any], GenerationRecord | None]:
        """Re-issue the leaves inside `renew_before`; return (what was due, the record or None)."""
        changes.check_renewal_settings(self.settings)
        report = self.due()
        if dry_run or not report["due"]:
            return report, None
        plan = functools.partial(changes.renew, renew_before=self.settings.renew_before)
        try:
            return report, self._commit("renew", plan, actor, changes.renewal_reason(report),
                                        items=tuple(d["item"] for d in report["due"]),
                                        remote_addr=remote_addr)
        except changes.NothingDue:  # a concurrent writer renewed them meanwhile
            return {**report, "due": []}, None

    # Staged CA rotation (DESIGN §6): one method per step, named by its API/CLI word.

    def start_rotation(self, *, actor: str, reason: str = "", key_type: str | None = None,
                       remote_addr: str | None = None) -> GenerationRecord:
        """Phase 1: make the next CA and trust it beside the current one; leaves unchanged."""
        return self._step("start", actor, reason, remote_addr, key_type=key_type)

    def continue_rotation(self, *, actor: str, reason: str = "", force: bool = False,
                          remote_addr: str | None = None) -> GenerationRecord:
        """Phase 2: re-issue server and kubecfg from the new CA; trust stays old + new.

        Raises: HostsBehind while a host has not installed phase 1 (force: audited).
        """
        reason = self._ca_gate("continue", force, reason)
        return self._step("continue", actor, reason, remote_addr)

    def finish_rotation(self, *, actor: str, reason: str = "", force: bool = False,
                        remote_addr: str | None = None) -> GenerationRecord:
        """Phase 3: trust only the new CA; the staged rotation is over.

        Raises: HostsBehind while a host has not installed phase 2 (force: audited).
        """
        reason = self._ca_gate("finish", force, reason)
        return self._step("finish", actor, reason, remote_addr)

    def _ca_gate(self, step: str, force: bool, reason: str) -> str:
        if self.rotation().get("next") != step:
            return reason  # out of order: the planner refuses it with its own words
        return self._gate(f"rotation {step}", CA_HOST_FILES, force, reason)

    def abort_rotation(self, *, actor: str, reason: str = "",
                       remote_addr: str | None = None) -> GenerationRecord:
        """Drop the next CA (phase 1 only: later, roll back instead)."""
        return self._step("abort", actor, reason, remote_addr)

    def _step(self, step: str, actor: str, reason: str, remote_addr: str | None,
              key_type: str | None = None) -> GenerationRecord:
        operation, plan, items = changes.STAGED_STEPS[step]
        return self._commit(operation, plan, actor, reason, key_type=key_type, items=items,
                            remote_addr=remote_addr)

    # The service-account key ([M]): its own staged rotation, independent of the CA's.

    def rotate_sa(self, *, actor: str, reason: str = "", key_type: str | None = None,
                  remote_addr: str | None = None) -> GenerationRecord:
        """Immediate: a new service-account key alone (tokens signed before stop verifying)."""
        return self.sa_step("immediate", actor=actor, reason=reason, key_type=key_type,
                            remote_addr=remote_addr)

    def sa_step(self, step: str, *, actor: str, reason: str = "", key_type: str | None = None,
                force: bool = False, remote_addr: str | None = None) -> GenerationRecord:
        """One step of the service-account rotation by its API/CLI word: `immediate`,
        `start`, `continue`, `finish` (force: before `sa.overlap` has passed, audited),
        `abort`."""
        if step == "finish":
            overlap = self.settings.sa_overlap
            plan: Planner = functools.partial(changes.finish_sa_rotation, overlap=overlap,
                                              force=force)
            state = self.sa_rotation()
            if state["phase"] == 2:
                reason = self._gate("service-account rotation finish", SA_FILES, force, reason)
            if force and state["phase"] == 2 and state["overlap_left_seconds"]:
                reason = (f"forced before sa.overlap ({state['overlap_left_seconds']}s left)"
                          + (f": {reason}" if reason else ""))
            operation = "sa-stage-finish"
        elif step in changes.SA_STEPS:
            operation, plan = changes.SA_STEPS[step]
            if step == "continue" and self.sa_rotation()["phase"] == 1:
                reason = self._gate("service-account rotation continue", SA_FILES, force,
                                    reason)
        else:
            raise NotFound(f"no service-account rotation step {step!r}")
        return self._commit(operation, plan, actor, reason, key_type=key_type, items=("sa",),
                            remote_addr=remote_addr)

    def rollback(self, version: int, *, actor: str, reason: str = "",
                 remote_addr: str | None = None) -> GenerationRecord:
        """Make a new generation that copies `version` (with its rotation state)."""
        old = changes.parse(self.read(version))
        reason = reason or f"rollback to version {version}"
        return self._commit("rollback", functools.partial(changes.rollback, old=old), actor,
                            reason, remote_addr=remote_addr)

    def import_files(self, files: Mapping[str, bytes], *, actor: str, reason: str = "",
                     sa_from_server_key: bool = False, sa_files: Mapping[str, bytes] | None = None,
                     remote_addr: str | None = None) -> GenerationRecord:
        """Store an existing set (the seed's file names) as a new generation.

        sa_from_server_key: the imported server.key is the cluster's service-account key too
        (kube-up's flags); sa_files: kubeadm-style `sa.key` (and optionally `sa.pub`).
        """
        certs = check_import(files)
        sa = sa_material(certs, sa_from_server_key, sa_files)
        plan = functools.partial(changes.import_set, certs=certs,
                                 kept=kept_bytes(certs, files), sa=sa)
        return self._commit("import", plan, actor, reason, allow_empty=True,
                            remote_addr=remote_addr)

    # --- the one way a generation is written ------------------------------------------

    def _base(self, version: int, key_pairs: tuple[str, ...]) -> changes.Base:
        """Version as the base of a change: parsed once, and kept while it is the latest (the
        generation this process wrote last is kept unparsed, see `changes.written`).  Kept
        only while the backend still holds the very files and record it was made of."""
        gen = self.backend.read(version)
        kept = self._kept_base
        if (kept is not None and kept.version == version and kept.key_pairs == key_pairs
                and (kept.files is gen.files or kept.files == gen.files)
                and (kept.record is gen.record or kept.record == gen.record)):
            return kept
        base = changes.parse(gen, key_pairs)
        self._kept_base = base
        return base

    def _commit(self, operation: str, plan: Planner, actor: str, reason: str, *,
                key_type: str | None = None, profiles: Profiles | None = None,
                items: tuple[str, ...] = ITEMS, expect_empty: bool = False,
                allow_empty: bool = False, remote_addr: str | None = None) -> GenerationRecord:
        check_text("actor", actor, ACTOR_MAX)
        check_text("reason", reason, REASON_MAX)
        keys = Keys(key_type)  # made the first time a planner asks; every retry reuses them
        profiles = profiles or Profiles.from_settings(self.settings)
        for attempt in range(MAX_ATTEMPTS):
            started = time.monotonic()
            parent = self.backend.latest()  # never the kept view: a change builds on the latest
            self._latest.learn(parent, at=started)
            if expect_empty and parent is not None:
                raise AlreadyInitialised(f"the store is initialised (version {parent})")
            if parent is None and not (expect_empty or allow_empty):
                raise NotFound("the store is empty: run `pkisvc init`")
            base = self._base(parent, profiles.key_pairs) if parent is not None else None
            draft = plan(base, profiles, keys, self.now())
            pki.check_set(draft.certs)
            changes.check_key_pairs(draft)
            gen = changes.generation(draft, version=(parent or 0) + 1, parent=parent,
                                     created_at=self.now(), actor=actor, operation=operation,
                                     reason=reason, base=base.record if base else None)
            event = AuditEvent(time=gen.record.created_at, actor=actor, action=operation,
                               version=gen.version, items=items, reason=reason,
                               remote_addr=remote_addr)
            try:
                try:
                    version = self.backend.write(gen, expected=parent, event=event)
                except AnswerLost as e:
                    version = _settle(self.backend, gen, parent, event, e)
            except VersionConflict:
                if expect_empty:
                    raise AlreadyInitialised("the store was initialised meanwhile") from None
                log.info("%s met a concurrent writer on version %s; retrying", operation, parent)
                if attempt >= 1:  # back off, randomly, so racing writers spread out
                    time.sleep(random.uniform(0, min(0.25, 0.002 * 2 ** min(attempt, 7))))
                continue
            self._latest.learn(version, at=started)  # this process serves its change at once
            if version == gen.version:
                self._kept_base = changes.written(gen, draft, profiles.key_pairs)
            log.info("version %d written: %s by %s", version, operation, actor)
            return gen.record
        raise VersionConflict(f"{operation}: gave up after {MAX_ATTEMPTS} concurrent writers")


_SHA256 = re.compile(r"[0-9a-f]{64}")
REPORT_FILES_MAX = 64


def check_minion_report(minion: str, claimed: str, state: str,
                        files: Mapping[str, str | None]) -> None:
    """Refuse a report that is not one host's own, well-formed account of its files.

    Raises: Forbidden (claimed is another minion); InvalidRequest.
    """
    if not MINION_ID.fullmatch(minion):
        raise InvalidRequest("not a minion id")
    if claimed != minion:
        raise Forbidden(f"a report for minion {str(claimed)[:64]!r} came from minion {minion}: "
                        "a minion reports only for itself")
    check_text("state", state, 256)
    if len(files) > REPORT_FILES_MAX:
        raise InvalidRequest(f"a report names at most {REPORT_FILES_MAX} files")
    for name, digest in files.items():
        if not valid_file_name(name):
            raise InvalidRequest(f"not a host file name: {name[:64]!r}")
        if digest is not None and not (isinstance(digest, str) and _SHA256.fullmatch(digest)):
            raise InvalidRequest(f"{name}: sha256 must be 64 lowercase hex digits or null")


def delivery_id(held: MinionState | None, new: MinionState) -> str:
    """The id of the event of one change of a minion's state, from held to new: the same at
    every attempt (it leaves out the times of this attempt), different for every change (it
    names the state changed, which a change replaces)."""
    before = [held.role, held.version, format_time(held.received)] if held else None
    text = json.dumps([new.minion, before, new.role, new.version], separators=(",", ":"))
    return "pillar-" + hashlib.sha256(text.encode()).hexdigest()[:32]


def sa_material(certs: pki.CertSet, from_server_key: bool,
                files: Mapping[str, bytes] | None) -> changes.SAMaterial | None:
    """The service-account key (and bundle) an import adopts, or None.

    Raises: InvalidRequest when both ways are asked for; InvalidMaterial when sa.pub does not
    hold sa.key's public key.
    """
    if from_server_key and files:
        raise InvalidRequest("adopt the service-account key from server.key or from sa.key, "
                             "not both")
    if from_server_key:
        return certs.server_key, (certs.server_key.public_key(),)
    if not files:
        return None
    if "sa.key" not in files:
        raise InvalidRequest("sa.key: missing (sa.pub alone cannot sign)")
    key = pki.load_key(files["sa.key"], "sa.key")
    bundle = (tuple(pki.load_public_keys(files["sa.pub"], "sa.pub")) if "sa.pub" in files
              else (key.public_key(),))
    if pki.key_fingerprint(key) not in {pki.key_fingerprint(k) for k in bundle}:
        raise InvalidMaterial("sa.pub does not hold the public key of sa.key")
    return key, bundle


def _settle(backend: Backend, gen: StoredGeneration, parent: int | None, event: AuditEvent,
            failure: AnswerLost) -> int:
    """Find out what became of a write whose answer did not come (it may have committed).

    Reads the version back: ours (same record) is done; another's is a VersionConflict (the
    change is planned again); none yet, the write is sent again — the backend's check-and-set
    makes a second landing impossible.  Gives up with the failure after SETTLE_PATIENCE.
    """
    mine = gen.record.to_dict()
    cause: BackendUnavailable = failure
    deadline = time.monotonic() + SETTLE_PATIENCE
    delay = 0.05
    while True:
        log.warning("version %d: %s; reading back what became of the write", gen.version,
                    cause.message)
        try:
            try:
                found = backend.read(gen.version)
            except NotFound:
                try:
                    return backend.write(gen, expected=parent, event=event)
                except VersionConflict:  # it met a version: ours (it landed meanwhile) or not
                    try:
                        found = backend.read(gen.version)
                    except NotFound:
                        raise VersionConflict(f"the store moved past {parent}") from None
            if found.record.to_dict() != mine:
                raise VersionConflict(f"version {gen.version} was written by another writer")
            log.info("version %d was committed (its answer was lost)", gen.version)
            return gen.version
        except PermissionDenied:
            raise
        except BackendUnavailable as e:
            cause = e
        if time.monotonic() + delay > deadline:
            log.error("version %d: cannot tell whether it was written: %s", gen.version,
                      cause.message)
            raise cause
        time.sleep(delay)
        delay = min(delay * 2, 1.0)
