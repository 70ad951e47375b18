"""The Vault / OpenBao backend: a few KV v2 secrets per version, one commit point each.

    <mount>/data/<prefix>/<cluster>/versions/<n>/material-<nonce>  the private keys, base64
    <mount>/data/<prefix>/<cluster>/versions/<n>/record           record + change event +
                                                                   certificates + chain link:
                                                                   the commit, cas=0
    <mount>/data/<prefix>/<cluster>/head                          {"version": n}, moved after
    <mount>/data/<prefix>/<cluster>/events/<day>/<seq>            one chain entry per appended
                                                                   event (pkisvc.chain), cas=0
    <mount>/data/<prefix>/<cluster>/audit/<day>/<key>             appended events from before
                                                                   the chain (read only)
    <mount>/data/<prefix>/<cluster>/tokens                        the hashed API tokens
    <mount>/data/<prefix>/<cluster>/sessions                      the operator pages' sessions
    <mount>/data/<prefix>/<cluster>/minions/shards/<nn>           minions' delivery states: each
                                                                   minion in the one of 64 its
                                                                   id's sha256 picks
    <mount>/data/<prefix>/<cluster>/minions/stamp                 moved after each shard write:
                                                                   a listing reads the shards
                                                                   only when it moved

KV cannot write two secrets in one transaction, so a version has one commit point: its
`record` secret, created with `cas=0` (Vault refuses a second one, so one writer wins each
number).  The writer first writes the private keys to a `material-<nonce>` secret of its own,
then the record naming that nonce, with the certificates and the change's audit event.
Material no record names is invisible (a writer killed in between, or one that lost the race)
and is deleted by the writer that commits that version when its policy lets it delete (the
shipped one, docs/vault/pkisvc-service.hcl, does not: it creates records and material and never
changes or deletes them).  Before its first write of each kind, a process asks Vault whether
its token may do every step of that write, so a refusal comes before anything is written.
Every secret holds one KV version, so no `max_versions` can drop history, and records
(history, events, certificates) can be read by a policy that cannot read
`material-*` (docs/vault/pkisvc-auditor.hcl).  Records of layout 2 have no certificates:
their material holds every file.

`head` says the latest version; it is moved (cas, never backwards) after the commit, so a
reader asks one small secret.  The move is not part of the write's answer: a thread of the
writing process (`_HeadMover`, one per backend and process) makes it once this process's
commits pause (at most HEAD_MAX_DELAY after the answer), in order, only ever to the newest
version this process committed, while this process's own `latest()` already counts what it
committed.  Other processes see the version once `head` moved (at most HEAD_MAX_DELAY and one
KV write after the answer), then within `vault.version_ttl` (with `version_ttl: 0`, every
change seen everywhere at once, head is moved before the answer, as it was).  `close()` waits
for the move (a CLI run, a worker that stops).  The records are the truth: a writer killed
between its commit and `head` (now: also just after its answer) leaves `head` behind, and the
next writer (whose record create then conflicts) or any process reading (at its first
`latest()`, then every HEAL_EVERY seconds) finds the committed records past `head` and moves
it on.

A store in the first layout (one `material` secret, KV version N = pkisvc version N, events
under audit/) is read as it is: its versions are read from `material` and the next write adds
version N+1 in this layout, so an upgrade needs no migration step.

Versions never change once written, so they are cached in memory; `latest()` always asks
Vault.  Every Vault call goes through `vault_client.VaultClient.call()`: the nodes of
`vault.addr` with fail-over, the token kept alive, every failure as `NotFound`,
`VersionConflict`, `BackendUnavailable` (`AnswerLost` when a request may have landed) or
`PermissionDenied` (messages name paths, never tokens or payloads).
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import logging
import os
import secrets
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Collection, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol, TypeVar

from pkisvc import chain
from pkisvc.backends import periods
from pkisvc.backends.base import (
    Order,
    appended_order,
    checked_digest,
    checked_minion,
    checked_version,
    merged_events,
)
from pkisvc.backends.vault_client import VaultClient
from pkisvc.errors import (
    AnswerLost,
    BackendUnavailable,
    Conflict,
    NotFound,
    PermissionDenied,
    VersionConflict,
)
from pkisvc.memo import Memo
from pkisvc.model import (
    AuditEvent,
    GenerationRecord,
    MinionState,
    SessionRecord,
    StoredGeneration,
    TokenRecord,
)
from pkisvc.settings import Settings
from pkisvc.witness import Witness

log = logging.getLogger(__name__)


class _Listed(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


T = TypeVar("T", bound=_Listed)  # a record kept in a list secret (tokens, sessions)

FORMAT = 3  # records hold the public files; 2: every file in the material (read only)
READABLE = (2, 3)  # the per-version layouts read; 1 is the first layout's payload
PUBLIC = (".crt", ".cert", ".pub")  # files kept in the record; all others (keys) in material
RESERVED = "record.json"  # the files backend's record; refused here too, so backends agree
CACHE_SIZE = 64  # whole generations kept in memory; records are kept for every version
EVENT_CACHE_SIZE = 4096  # audit events read back (they never change either)
UPDATE_ATTEMPTS = 10  # read-modify-write of the tokens list or head under cas
HEAD_LAG = 60  # seconds a record past `head` is taken for a live writer's, not a dead one's
# head's move waits for this process's commits to pause this long, but never more than
# HEAD_MAX_DELAY after the first commit it is behind (see _HeadMover)
HEAD_SETTLE = 0.005
HEAD_MAX_DELAY = 0.05
HEAL_EVERY = 10.0  # seconds between latest()'s looks past head (a writer killed before moving it)
MOVER_IDLE = 30.0  # seconds the thread that moves head waits for the next commit, then ends
CLOSE_PATIENCE = 30.0  # seconds close() waits for head's move (each Vault call has its timeout)
MINION_READERS = 8  # concurrent reads when every minion's state is asked for
MINION_SHARDS = 64  # secrets the minions' states are spread over (fixed: changing it moves them)
# Seconds after which a listing reads every shard even when `minions/stamp` did not move: the
# bound for a writer that never moved it (killed between the two writes, or a pkisvc from
# before the stamp).
MINION_FULL_EVERY = 30.0


class VaultBackend:
    """Generations as per-version KV v2 secrets in Vault or OpenBao."""

    name = "vault"
    # KV's created_time is the write's: a migrated version's original time is its record's.
    sets_stored_time = False

    def __init__(self, addr: str, *, cluster: str, mount: str = "secret",
                 prefix: str = "pkisvc", token: str | None = None,
                 token_file: str | None = None, role_id: str | None = None,
                 secret_id: str | None = None, ca_cert: str | None = None,
                 timeout: float = 5.0, max_versions: int = 1000,
                 secret_id_file: str | None = None,
                 chain_key: chain.ChainKey | None = None,
                 witness: Witness | None = None, head_after_answer: bool = True) -> None:
        self.vault = VaultClient(addr, token=token, token_file=token_file, role_id=role_id,
                                 secret_id=secret_id, ca_cert=ca_cert, timeout=timeout,
                                 secret_id_file=secret_id_file)
        self.mount = mount
        self.base = f"{prefix}/{cluster}"
        # Only the first layout's single secret had a KV history to cap; kept for settings.
        self.max_versions = max_versions
        self._versions = f"{self.base}/versions"
        self._head_path = f"{self.base}/head"
        self._material = f"{self.base}/material"  # the first layout (read only)
        self._audit_dir = f"{self.base}/audit"  # appended events from before the chain
        self._events_dir = f"{self.base}/events"
        # None: a key kept in memory only — for tests and tools; from_settings gives a file.
        self.chain_key = chain_key or chain.ChainKey(None)
        self.witness = witness  # this host's witness of the chain's newest (pkisvc.witness)
        if witness is not None:
            witness.store = f"vault:{mount}/{self.base}"
        self._links: dict[int, dict[str, Any] | None] = {}
        self._tail: Mapping[str, Any] | None = None  # the event chain's last entry seen
        self._tokens_path = f"{self.base}/tokens"
        self._minions_dir = f"{self.base}/minions"
        self._sessions_path = f"{self.base}/sessions"
        self._lock = threading.RLock()
        self._cache: Memo[int, StoredGeneration] = Memo(CACHE_SIZE)
        self._records: dict[int, GenerationRecord] = {}
        self._nonces: dict[int, str | None] = {}  # None: a version of the first layout
        # Each version's change event (None: written before events moved into the version).
        self._changes: dict[int, AuditEvent | None] = {}
        self._events: OrderedDict[str, tuple[Order, AuditEvent]] = OrderedDict()
        self._healed_at: float | None = None  # when latest() last looked past head
        self._head_seen: tuple[int, int] | None = None  # the last head read or written
        self._mover: _HeadMover | None = None  # moves head after commits (this process's)
        self._writing = 0  # version writes under way in this process
        # False: a write moves head before it answers (`vault.version_ttl: 0`, where every
        # change is to be seen everywhere at once).
        self.head_after_answer = head_after_answer
        self._public: OrderedDict[int, dict[str, bytes]] = OrderedDict()  # records' files
        # Whether the token may delete uncommitted material; None until the capabilities a
        # version write needs were checked (once per process, before its first write).
        self._may_delete: bool | None = None
        # A record this process lost a race for: racing writers may leave material behind
        # (see _after_commit).
        self._raced = False
        self._checked: set[str] = set()  # the kinds of audited change checked likewise
        self._first_layout_top: int | None = None  # read once, when a write needs it
        self._shards: dict[str, tuple[int, dict[str, MinionState]]] = {}  # as last read
        # The last listing, by the shards' KV versions: the same list while none changed.
        self._listed: tuple[tuple[int, ...], list[MinionState]] | None = None
        self._stamp_path = f"{self._minions_dir}/stamp"
        self._stamp_seen = 0  # the stamp's KV version as this process last read or wrote it
        # (the stamp's version before, monotonic time when) the last read of every shard began
        self._full_read: tuple[int, float] | None = None
        self._readers: ThreadPoolExecutor | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultBackend:
        v = settings.vault
        return cls(v.addr, cluster=settings.cluster, mount=v.mount, prefix=v.prefix,
                   token=v.token, token_file=v.token_file, role_id=v.role_id,
                   secret_id=v.secret_id, ca_cert=v.ca_cert, timeout=v.timeout,
                   max_versions=v.max_versions, secret_id_file=v.secret_id_file,
                   chain_key=chain.ChainKey(settings.chain_key_path),
                   witness=Witness(settings.chain_witness_path),
                   head_after_answer=v.version_ttl > 0)

    @property
    def addr(self) -> str:
        """The node in use (the first of `vault.addr` that could be reached)."""
        return self.vault.addr

    def __repr__(self) -> str:
        return f"VaultBackend({self.addr!r}, {self.mount}/{self.base})"

    # --- plumbing ----------------------------------------------------------------------

    def _data(self, path: str) -> str:
        return f"{self.mount}/data/{path}"

    def _meta(self, path: str) -> str:
        return f"{self.mount}/metadata/{path}"

    def _read(self, path: str, version: int | None = None) -> dict[str, Any]:
        # hvac's read_secret_version(raise_on_deleted_version=True), without its per-call URL
        # formatting (this is a hot read): a deleted or destroyed version is a 404 too.
        url = f"/v1/{urllib.parse.quote(self._data(path))}"
        if version is not None:
            url += f"?version={int(version)}"
        resp: dict[str, Any] = self.vault.call(self._data(path), lambda: self.vault.get(url))
        return resp

    def _write(self, path: str, data: Mapping[str, Any], cas: int | None) -> int:
        """Write under cas.  A create (cas=0) where another writer's secret already is raises
        VersionConflict, also under a policy that may create but not update (the shipped
        one): Vault answers that with "permission denied", so it is read back to tell."""
        try:
            resp = self.vault.call(self._data(path), lambda: self.vault.kv.create_or_update_secret(
                path, secret=dict(data), cas=cas, mount_point=self.mount))
        except PermissionDenied:
            if cas == 0 and self._exists(path):
                raise VersionConflict(f"{self._data(path)} exists") from None
            raise
        return int(self.vault.dig(resp, self._data(path), "data", "version"))

    def _list(self, path: str) -> list[str]:
        try:
            resp = self.vault.call(self._meta(path), lambda: self.vault.kv.list_secrets(
                path, mount_point=self.mount))
        except NotFound:
            return []
        return [str(k) for k in self.vault.dig(resp, self._meta(path), "data", "keys")]

    def _record_path(self, version: int) -> str:
        return f"{self._versions}/{version}/record"

    def _material_path(self, version: int, nonce: str) -> str:
        return f"{self._versions}/{version}/material-{nonce}"

    def _remember(self, gen: StoredGeneration) -> None:
        self._cache.put(gen.version, gen)

    def _cached(self, version: int) -> StoredGeneration | None:
        return self._cache.get(version)

    def _note(self, version: int, record: GenerationRecord, event: AuditEvent | None,
              nonce: str | None, link: dict[str, Any] | None = None) -> None:
        with self._lock:
            self._records[version] = record
            self._changes[version] = event
            self._nonces[version] = nonce
            self._links[version] = link

    def _unreadable(self, where: str) -> BackendUnavailable:
        return BackendUnavailable(f"vault at {self.addr}: {where} is not a pkisvc generation")

    # --- generations -------------------------------------------------------------------

    def _head(self) -> tuple[int, int] | None:
        """(the version `head` names, head's own KV version), or None before the first."""
        try:
            resp = self._read(self._head_path)
        except NotFound:
            return None
        where = self._data(self._head_path)
        head = (int(self.vault.dig(resp, where, "data", "data", "version")),
                int(self.vault.dig(resp, where, "data", "metadata", "version")))
        seen = self._head_seen
        if seen is None or head[1] >= seen[1]:  # a read may end after a newer move (the mover)
            self._head_seen = head
        return head

    def latest(self) -> int | None:
        # Asked on every hot read, never cached (another replica may have written since):
        # one read of a small secret.
        head = self._head()
        top = head[0] if head is not None else self._first_layout_latest()
        top = max(top, self._moving())  # committed here, head maybe not moved yet
        now = time.monotonic()
        if self._healed_at is None or now - self._healed_at >= HEAL_EVERY:
            # Past head, now and then: a writer killed before it moved head leaves it behind,
            # and a replica that only reads would otherwise not see that version until the
            # next writer came.  One read (of a record that is not there) per HEAL_EVERY.
            top = self._heal(top)
            self._healed_at = now
        return top or None

    def _heal(self, top: int, level: int = logging.WARNING) -> int:
        """Move `head` past the committed records beyond it (a writer killed after its
        commit, or one about to move it); return the latest version.  A record made in the
        last HEAD_LAG seconds is most likely a live writer's about to move it: said quietly."""
        v = top
        newest: GenerationRecord | None = None
        while (rec := self._record(v + 1, first_layout=False)) is not None:
            v, newest = v + 1, rec
        if newest is not None:
            if datetime.now(UTC) - newest.created_at < timedelta(seconds=HEAD_LAG):
                level = logging.INFO
            log.log(level, "%s was behind: versions %d..%d were committed; moving it",
                    self._data(self._head_path), top + 1, v)
            self._advance_head(v)
        return v

    def _advance_head(self, version: int) -> None:
        # First with the head last seen (by this process, usually its own last move): one
        # write; a conflict means someone moved it since, so read it and decide again.
        head = self._head_seen
        for _ in range(UPDATE_ATTEMPTS):
            if head is not None and head[0] >= version:
                return  # never backwards: a later writer moved it already
            try:
                kv = self._write(self._head_path, {"version": version},
                                 cas=head[1] if head is not None else 0)
            except VersionConflict:
                head = self._head()
                continue
            self._head_seen = (version, kv)
            return
        raise VersionConflict(f"{self._data(self._head_path)}: too many concurrent writers")

    def _first_layout_latest(self) -> int:
        """The latest version of a store in the first layout (0: none)."""
        try:
            resp = self.vault.call(self._meta(self._material),
                                   lambda: self.vault.kv.read_secret_metadata(
                                       self._material, mount_point=self.mount))
        except NotFound:
            return 0
        return int(self.vault.dig(resp, self._meta(self._material), "data",
                                  "current_version"))

    def _record(self, version: int, *, first_layout: bool = True) -> GenerationRecord | None:
        """Return a version's record (read once), or None when there is no such version."""
        with self._lock:
            rec = self._records.get(version)
        if rec is not None:
            return rec
        try:
            resp = self._read(self._record_path(version))
        except NotFound:
            if not first_layout:
                return None
            try:
                return self._read_first_layout(version).record
            except NotFound:
                return None
        where = self._data(self._record_path(version))
        try:
            payload = resp["data"]["data"]
            if payload.get("pkisvc") not in READABLE:
                raise ValueError("unknown payload format")
            rec = GenerationRecord.from_dict(payload["record"])
            event = AuditEvent.from_dict(payload["event"]) if payload.get("event") else None
            nonce = str(payload["material"])
            public = _files(payload.get("files") or {})
            link = payload.get("chain")
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
            raise self._unreadable(where) from None
        if rec.version != version:
            raise BackendUnavailable(f"vault at {self.addr}: {where} records version "
                                     f"{rec.version}")
        self._note(version, rec, event, nonce, link if isinstance(link, dict) else None)
        with self._lock:
            self._public[version] = public
            while len(self._public) > CACHE_SIZE:
                self._public.popitem(last=False)
        return rec

    def _read_first_layout(self, version: int) -> StoredGeneration:
        where = f"{self._data(self._material)} version {version}"
        try:
            resp = self._read(self._material, version)
        except NotFound:
            raise NotFound(f"no version {version}") from None
        try:
            payload = resp["data"]["data"]
            if payload.get("pkisvc") != 1:
                raise ValueError("unknown payload format")
            record = GenerationRecord.from_dict(payload["record"])
            files = _files(payload["files"])
            event = AuditEvent.from_dict(payload["event"]) if payload.get("event") else None
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
            raise self._unreadable(where) from None
        if record.version != version:
            raise BackendUnavailable(f"vault at {self.addr}: {where} records version "
                                     f"{record.version}")
        self._note(version, record, event, None)
        gen = StoredGeneration(record, files)
        self._remember(gen)
        return gen

    def read(self, version: int | None = None) -> StoredGeneration:
        if version is None:
            latest = self.latest()
            if latest is None:
                raise NotFound("the store is empty: run `pkisvc init`")
            version = latest
        if not isinstance(version, int) or isinstance(version, bool) or version < 1:
            raise NotFound(f"no version {version}")
        gen = self._cached(version)
        if gen is not None:
            return gen
        record = self._record(version, first_layout=False)
        if record is None:
            return self._read_first_layout(version)
        nonce = self._nonces[version]
        assert nonce is not None
        with self._lock:
            public = self._public.pop(version, None)
        if public is None:  # the record was read long ago: read its files again
            with self._lock:
                self._records.pop(version, None)
            record = self._record(version, first_layout=False) or record
            with self._lock:
                public = self._public.pop(version, {})
        path = self._material_path(version, nonce)
        try:
            resp = self._read(path)
        except NotFound:
            raise BackendUnavailable(f"vault at {self.addr}: {self._data(path)}, named by "
                                     f"version {version}'s record, is missing") from None
        try:
            files = {**public, **_files(resp["data"]["data"]["files"])}
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
            raise self._unreadable(self._data(path)) from None
        gen = StoredGeneration(record, dict(sorted(files.items())))
        self._remember(gen)
        return gen

    def write(self, gen: StoredGeneration, *, expected: int | None,
              event: AuditEvent | None = None) -> int:
        with self._lock:
            self._writing += 1  # head's mover waits for it (see _HeadMover)
        try:
            return self._write_version(gen, expected, event)
        finally:
            with self._lock:
                self._writing -= 1

    def _write_version(self, gen: StoredGeneration, expected: int | None,
                       event: AuditEvent | None) -> int:
        version = checked_version(gen, expected, RESERVED)
        if self._head_seen is None:
            # Before `head` exists, a first-layout store's versions have no records for the
            # cas=0 create to meet: check the writer built on its latest.
            top = self.latest()
            if top != expected:
                raise VersionConflict(f"the store is at version {top}, the writer built on "
                                      f"{expected}")
        else:
            if self._first_layout_top is None:
                self._first_layout_top = self._first_layout_latest()
            if version <= self._first_layout_top:
                raise VersionConflict(f"version {version} exists (first layout)")
        stored_record = gen.record.to_dict()
        stored_event = event.to_dict() if event is not None else None
        prev = self._link(expected) if expected else None
        key, unchained = self.chain_key.for_write(chained=prev is not None,
                                                  unchained=expected or 0)
        link = chain.link_version(key, stored_record, stored_event,
                                  chain.file_digests(gen.files),
                                  prev["mac"] if prev else None, unchained)
        nonce = secrets.token_hex(8)
        material = self._material_path(version, nonce)
        self._check_writes(version, nonce)
        keys = {n: b for n, b in gen.files.items() if not n.endswith(PUBLIC)}
        public = {n: b for n, b in gen.files.items() if n.endswith(PUBLIC)}
        self._write(material, {"pkisvc": FORMAT, "files": _encoded(keys)}, cas=0)
        record = {"pkisvc": FORMAT, "record": stored_record, "event": stored_event,
                  "material": nonce, "files": _encoded(public), "chain": link}
        try:
            self._write(self._record_path(version), record, cas=0)  # the commit point
        except PermissionDenied:
            self._may_delete = None  # the policy changed: check again next time
            raise
        except VersionConflict:
            self._raced = True
            self._forget(material)
            # head may be behind (a writer killed after its commit, or about to move it)
            self._heal(expected or 0, logging.INFO)
            raise VersionConflict(f"{self._data(self._record_path(version))} exists: another "
                                  "writer was first") from None
        except AnswerLost as lost:
            if not self._committed(version, nonce, lost):
                raise
        self._note(version, gen.record, event, nonce, link)
        self._remember(gen)
        if self.head_after_answer:
            self._head_mover().move(version, nonce)  # after the answer: not waited for
        else:
            self._after_commit(version, nonce)
        if self.witness is not None:  # after the store: a crash here leaves it behind
            self.witness.saw_version(key, version, link, self._stored_mac)
        return version

    def _stored_mac(self, version: int) -> str | None:
        """Version's link MAC as stored now (no cache), for the witness."""
        try:
            resp = self._read(self._record_path(version))
        except NotFound:
            return None
        mac = ((resp.get("data", {}).get("data") or {}).get("chain") or {}).get("mac")
        return str(mac) if mac is not None else None

    def _check_writes(self, version: int, nonce: str) -> None:
        """Before this process's first version write: check that the token may do every step
        of one (a commit whose `head` cannot move would be a version no reader is shown), and
        learn whether it may delete material no record names."""
        if self._may_delete is not None:
            return
        cleanup = self._meta(self._material_path(version, nonce))
        held = self._require("a version", {
            self._data(self._material_path(version, nonce)): ("create",),
            self._data(self._record_path(version)): ("create", "read"),
            self._data(self._head_path): ("create", "read", "update")}, also=(cleanup,))
        self._may_delete = held is not None and _has(held, cleanup, "delete")

    def _check_audited(self, kind: str, path: str) -> None:
        """Before this process's first change of `kind` (a secret written, then its event
        appended by the store): check that the token may do both, so a refusal writes nothing."""
        if kind in self._checked:
            return
        day = datetime.now(UTC).strftime("%Y%m%d")
        self._require(kind, {self._data(path): ("create", "read", "update"),
                             self._data(f"{self._events_dir}/{day}/probe"): ("create",),
                             self._meta(self._events_dir): ("list",)})  # the chain's tail
        self._checked.add(kind)

    def _require(self, what: str, need: Mapping[str, tuple[str, ...]],
                 also: tuple[str, ...] = ()) -> dict[str, list[str]] | None:
        """Ask Vault (capabilities-self) what the token may do on the paths `what` writes;
        PermissionDenied naming the first capability missing.  Return every path's
        capabilities, or None when Vault will not tell (a token without the default policy:
        the writes then find out one by one)."""
        where = "sys/capabilities-self"
        try:
            resp = self.vault.call(where, lambda: self.vault.post(
                f"/v1/{where}", {"paths": [*need, *also]}))
        except PermissionDenied:
            log.info("cannot check the token's capabilities for %s (%s refused)", what, where)
            return None
        held: dict[str, list[str]] = self.vault.dig(resp, where, "data")
        for path, caps in need.items():
            for cap in caps:
                if not _has(held, path, cap):
                    raise PermissionDenied(f"permission denied on {path}: the token's policy "
                                           f"lacks {cap!r}")
        return held

    def _exists(self, path: str) -> bool:
        try:
            self._read(path)
        except NotFound:
            return False
        return True

    def _link(self, version: int) -> dict[str, Any] | None:
        """A version's chain link (None: written before the chain, or no such version)."""
        self._record(version)
        with self._lock:
            return self._links.get(version)

    def _committed(self, version: int, nonce: str, lost: AnswerLost) -> bool:
        """After a lost answer: whether our record is the one committed (False: none is)."""
        log.warning("%s; reading the record back", lost.message)
        try:
            resp = self._read(self._record_path(version))
        except NotFound:
            return False
        except BackendUnavailable:
            raise lost from None
        if self.vault.dig(resp, self._data(self._record_path(version)),
                          "data", "data").get("material") != nonce:
            self._raced = True
            self._forget(self._material_path(version, nonce))
            raise VersionConflict(f"{self._data(self._record_path(version))} exists: "
                                  "another writer was first") from None
        return True

    def _after_commit(self, version: int, nonce: str) -> None:
        """Move head; delete material of this version that no record names.  The version is
        committed whatever happens here: a failure is logged (a later writer heals head)."""
        try:
            self._advance_head(version)
            if not self._may_delete or not self._raced:
                # Leftovers come from races (a loser deletes its own material; one killed
                # first cannot): listed after a race seen here, not on every commit.  The
                # shipped policy deletes nothing: its leftovers stay, unread.
                return
            self._raced = False
            keep = {"record", f"material-{nonce}"}
            for key in self._list(f"{self._versions}/{version}"):
                if key not in keep and key.startswith("material-"):
                    self._forget(f"{self._versions}/{version}/{key}")
        except (BackendUnavailable, VersionConflict) as e:
            log.error("version %d is committed; moving %s or clearing leftovers after it "
                      "failed: %s", version, self._data(self._head_path), e.message)

    def _head_mover(self) -> _HeadMover:
        """This process's mover (made again in a forked child: threads do not survive fork)."""
        mover = self._mover
        if mover is None or mover.pid != os.getpid():
            with self._lock:
                mover = self._mover
                if mover is None or mover.pid != os.getpid():
                    mover = self._mover = _HeadMover(self)
        return mover

    def _moving(self) -> int:
        """The newest version this process committed (0: none): at least the latest, whether
        or not head was moved to it yet."""
        mover = self._mover
        return mover.wanted if mover is not None and mover.pid == os.getpid() else 0

    def settle_head(self, timeout: float | None = None) -> bool:
        """Wait until this process's moves of head are made (or failed, logged); tell whether
        none is left.  For `close()`, and for tests that read head from Vault directly."""
        mover = self._mover
        return mover is None or mover.pid != os.getpid() or mover.wait(timeout)

    def _forget(self, path: str) -> None:
        """Delete material no record names (best effort: it is invisible anyway)."""
        if not self._may_delete:
            return
        try:
            kv = self.vault.kv
            self.vault.call(self._meta(path), lambda: kv.delete_metadata_and_all_versions(
                path, mount_point=self.mount))
        except (BackendUnavailable, NotFound) as e:
            log.info("could not delete uncommitted %s: %s", self._meta(path), e.message)

    def versions(self) -> list[GenerationRecord]:
        out = []
        for v in range(1, (self.latest() or 0) + 1):
            rec = self._record(v)
            if rec is not None:  # a first-layout version deleted by hand
                out.append(rec)
        return out

    # --- audit -------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> None:
        entries = _EventSecrets(self)
        tail = entries.tail()
        # The latest version this process knows (no read when it has seen one).
        after = (max(self._head_seen[0], self._moving()) if self._head_seen is not None
                 else self.latest())
        key, _ = self.chain_key.for_write(chained=tail is not None, unchained=after or 0)
        entry = periods.append(entries, key, event, after)
        if self.witness is not None:
            self.witness.saw_entry(key, entry, entries.entry)
        self._remember_event(f"{entry['period']}/{entry['seq']:09d}",
                             (appended_order(event, after, entry["period"], entry["seq"]),
                              event))

    def audit(self, since: datetime | None = None, limit: int = 100) -> list[AuditEvent]:
        latest = self.latest() or 0
        return merged_events(self._change_events(latest), self._appended(since), since, limit)

    def _change_events(self, latest: int) -> Iterator[AuditEvent]:
        """The change events kept in the versions, newest first (each read once)."""
        for v in range(latest, 0, -1):
            if self._record(v) is not None:
                event = self._changes.get(v)
                if event is not None:
                    yield event

    def _periods(self) -> list[str]:
        return sorted(d.rstrip("/") for d in self._list(self._events_dir) if d.endswith("/"))

    def _entry_names(self, period: str) -> list[str]:
        return sorted(k for k in self._list(f"{self._events_dir}/{period}")
                      if not k.endswith("/"))

    def _appended(self, since: datetime | None) -> Iterator[tuple[Order, AuditEvent]]:
        """The appended events, newest first, down to since's period: the chained ones,
        then those from before the chain."""
        floor = chain.period_of(since) if since is not None else ""
        for period in reversed(self._periods()):
            if period < floor:
                return  # a period holds no event of a later day than its own
            for name in reversed(self._entry_names(period)):
                found = self._chained_event(period, name)
                if found is not None:
                    yield found
        yield from self._unchained(floor)

    def _chained_event(self, period: str, name: str) -> tuple[Order, AuditEvent] | None:
        key = f"{period}/{name}"
        with self._lock:
            cached = self._events.get(key)
        if cached is not None:
            return cached
        entry = self._stored_entry(f"{self._events_dir}/{key}")
        if entry is None or entry.get("kind") != "event":
            return None
        try:
            event = AuditEvent.from_dict(entry["event"])
            found = (appended_order(event, entry.get("v"), period, int(entry["seq"])), event)
        except (KeyError, TypeError, ValueError):
            log.warning("skipping unreadable audit event %s", key)
            return None
        self._remember_event(key, found)
        return found

    def _stored_entry(self, path: str) -> dict[str, Any] | None:
        try:
            resp = self._read(path)
        except NotFound:
            return None
        entry = resp.get("data", {}).get("data", {}).get("entry")
        return entry if isinstance(entry, dict) else None

    def _unchained(self, floor: str) -> Iterator[tuple[Order, AuditEvent]]:
        """The appended events written before the chain, newest first."""
        days = sorted((d.rstrip("/") for d in self._list(self._audit_dir) if d.endswith("/")),
                      reverse=True)
        for day in days:
            if day < floor:
                return
            keys = sorted((k for k in self._list(f"{self._audit_dir}/{day}")
                           if not k.endswith("/")), reverse=True)
            for k in keys:
                event = self._event(f"{day}/{k}")
                if event is not None:
                    yield appended_order(event, None), event

    def chain_versions(self) -> list[chain.StoredVersion]:
        top = self.latest() or 0
        while self._stored_version(top + 1).record is not None:  # committed past head
            top += 1
        return [self._stored_version(v) for v in range(1, top + 1)]

    def _stored_version(self, v: int) -> chain.StoredVersion:
        """Version v as stored, read afresh (the record and, if this token may, material)."""
        path = self._record_path(v)
        try:
            resp = self._read(path)
        except NotFound:
            try:
                old = self._read(self._material, v)  # the first layout
                return chain.StoredVersion(v, old["data"]["data"]["record"],
                                           old["data"]["data"].get("event"))
            except (NotFound, PermissionDenied, KeyError, TypeError):
                return chain.StoredVersion(v, None, problems=(
                    "its record is missing (deleted, destroyed or never committed)",))
        data = resp.get("data", {})
        payload, kv = data.get("data") or {}, data.get("metadata", {}).get("version")
        problems = []
        if kv != 1:
            problems.append(f"its record was rewritten (KV version {kv} of "
                            f"{self._data(path)}; pkisvc writes each record once)")
        digests: dict[str, str] | None = None
        nonce = payload.get("material")
        try:
            material = self._read(self._material_path(v, str(nonce)))
            # Format 3 keeps the certificates in the record, the keys in material.
            digests = chain.file_digests({**_files(payload.get("files") or {}),
                                          **_files(material["data"]["data"]["files"])})
            if material["data"]["metadata"].get("version") != 1:
                problems.append("its material was rewritten")
        except PermissionDenied:
            digests = None
        except NotFound:
            problems.append("its material is missing (deleted or destroyed)")
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
            problems.append("its material is unreadable")
        return chain.StoredVersion(v, payload.get("record"), payload.get("event"),
                                   payload.get("chain"), digests, tuple(problems))

    def chain_periods(self) -> list[chain.StoredPeriod]:
        out = []
        for period in self._periods():
            names = sorted(self._entry_names(period),
                           key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n))
            out.append(chain.StoredPeriod(period, [
                (n, self._stored_entry(f"{self._events_dir}/{period}/{n}")) for n in names]))
        return out

    def prune_periods(self, before: str) -> list[str]:
        gone = [p for p in self._periods()[:-1] if p < before]
        for period in gone:
            for name in self._entry_names(period):
                self._delete(f"{self._events_dir}/{period}/{name}")
        return gone

    def _delete(self, path: str) -> None:
        kv = self.vault.kv
        self.vault.call(self._meta(path), lambda: kv.delete_metadata_and_all_versions(
            path, mount_point=self.mount))

    def _event(self, key: str) -> AuditEvent | None:
        """An event from before the chain (under audit/), read once."""
        with self._lock:
            cached = self._events.get(f"audit/{key}")
        if cached is not None:
            return cached[1]
        try:
            resp = self._read(f"{self._audit_dir}/{key}")
            event = AuditEvent.from_dict(resp["data"]["data"]["event"])
        except NotFound:
            return None
        except (KeyError, TypeError, ValueError):
            log.warning("skipping unreadable audit event %s", key)
            return None
        self._remember_event(f"audit/{key}", (appended_order(event, None), event))
        return event

    def _remember_event(self, key: str, event: tuple[Order, AuditEvent]) -> None:
        with self._lock:
            self._events[key] = event
            while len(self._events) > EVENT_CACHE_SIZE:
                self._events.popitem(last=False)

    # --- health ------------------------------------------------------------------------

    def ping(self) -> None:
        self.latest()

    # --- the operator pages' sessions --------------------------------------------------
    # One secret holds them all, changed under cas like the tokens: ending a session needs no
    # `delete` capability, and KV keeps only the mount's few old versions of the list.

    def _update_sessions(self, change: Callable[[list[SessionRecord]],
                                                list[SessionRecord] | None]) -> bool:
        return self._update_list(self._sessions_path, "sessions", SessionRecord.from_dict,
                                 change)

    def sessions(self) -> list[SessionRecord]:
        return self._load_list(self._sessions_path, "sessions", SessionRecord.from_dict)[1]

    def session(self, sha256: str) -> SessionRecord | None:
        checked_digest(sha256)
        return next((s for s in self.sessions() if s.sha256 == sha256), None)

    def add_session(self, session: SessionRecord) -> None:
        checked_digest(session.sha256)

        def add(held: list[SessionRecord]) -> list[SessionRecord]:
            if any(s.sha256 == session.sha256 for s in held):
                raise Conflict("that session exists")
            return [*held, session]
        self._update_sessions(add)

    def touch_session(self, sha256: str, seen: datetime) -> bool:
        checked_digest(sha256)

        def touch(held: list[SessionRecord]) -> list[SessionRecord] | None:
            if not any(s.sha256 == sha256 for s in held):
                return None  # ended meanwhile: never bring it back
            return [dataclasses.replace(s, seen=seen) if s.sha256 == sha256 else s
                    for s in held]
        return self._update_sessions(touch)

    def end_sessions(self, sha256s: Collection[str]) -> None:
        gone = {checked_digest(h) for h in sha256s}

        def remove(held: list[SessionRecord]) -> list[SessionRecord] | None:
            kept = [s for s in held if s.sha256 not in gone]
            return kept if len(kept) != len(held) else None
        self._update_sessions(remove)

    # --- tokens ------------------------------------------------------------------------

    def _load_list(self, path: str, field: str, parse: Callable[[Any], T]
                   ) -> tuple[int, list[T]]:
        """Return (KV version, items) of a secret holding one list; (0, []) when there is none.
        """
        try:
            resp = self._read(path)
        except NotFound:
            return 0, []
        try:
            version = int(resp["data"]["metadata"]["version"])
            items = [parse(t) for t in resp["data"]["data"][field]]
        except (KeyError, TypeError, ValueError):
            raise BackendUnavailable(f"vault at {self.addr}: "
                                     f"{self._data(path)} is unreadable") from None
        return version, items

    def _update_list(self, path: str, field: str, parse: Callable[[Any], T],
                     change: Callable[[list[T]], list[T] | None]) -> bool:
        """Apply change to the list under cas (None: nothing to write); tell if it wrote."""
        for _ in range(UPDATE_ATTEMPTS):
            version, items = self._load_list(path, field, parse)
            new = change(items)
            if new is None:
                return False
            try:
                self._write(path, {field: [t.to_dict() for t in new]}, cas=version)
            except VersionConflict:
                continue  # another process changed the list: apply the change to theirs
            return True
        raise VersionConflict(f"{self._data(path)}: too many concurrent writers")

    def _load_tokens(self) -> tuple[int, list[TokenRecord]]:
        return self._load_list(self._tokens_path, "tokens", TokenRecord.from_dict)

    def _update_tokens(self, change: Callable[[list[TokenRecord]], list[TokenRecord]]) -> None:
        self._check_audited("tokens", self._tokens_path)  # each change is audited
        self._update_list(self._tokens_path, "tokens", TokenRecord.from_dict, change)

    def tokens(self) -> list[TokenRecord]:
        return self._load_tokens()[1]

    def put_token(self, token: TokenRecord) -> None:
        def add(tokens: list[TokenRecord]) -> list[TokenRecord]:
            if any(t.name == token.name for t in tokens):
                raise Conflict(f"a token named {token.name!r} exists")
            return [*tokens, token]
        self._update_tokens(add)

    def revoke_token(self, name: str) -> None:
        def remove(tokens: list[TokenRecord]) -> list[TokenRecord]:
            kept = [t for t in tokens if t.name != name]
            if len(kept) == len(tokens):
                raise NotFound(f"no token named {name!r}")
            return kept
        self._update_tokens(remove)

    # --- minions' delivery states ----------------------------------------------------------
    # Kept in MINION_SHARDS secrets, each minion in the one its id hashes to: the minions
    # page reads a few dozen secrets, not one per minion, and a state change still writes one
    # small secret (under cas: two minions of one shard changing at once cost a retry).

    def _shard(self, minion: str) -> str:
        digest = hashlib.sha256(checked_minion(minion).encode()).digest()
        return self._shard_path(int.from_bytes(digest[:4], "big") % MINION_SHARDS)

    def _shard_path(self, n: int) -> str:
        return f"{self._minions_dir}/shards/{n:02d}"

    def _read_shard(self, path: str) -> tuple[int, dict[str, MinionState]]:
        """Return (KV version, states) of one shard; (0, {}) when there is none.  A shard
        read (or written) before at the same KV version or a later one is not parsed again."""
        try:
            resp = self._read(path)
        except NotFound:
            return 0, {}
        try:
            version = int(resp["data"]["metadata"]["version"])
            with self._lock:
                cached = self._shards.get(path)
            if cached is not None and cached[0] >= version:  # as read, or written since
                return cached
            states = {m: MinionState.from_dict(d)
                      for m, d in resp["data"]["data"]["states"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise BackendUnavailable(f"vault at {self.addr}: {self._data(path)} is not a "
                                     "table of minion states") from None
        with self._lock:
            cached = self._shards.get(path)
            if cached is not None and cached[0] >= version:  # written meanwhile: newer
                return cached
            self._shards[path] = (version, states)
        return version, states

    def minion(self, minion: str) -> MinionState | None:
        return self._read_shard(self._shard(minion))[1].get(minion)

    def put_minion(self, state: MinionState, *, expected: MinionState | None) -> None:
        path = self._shard(state.minion)
        self._check_audited("minions", path)
        for _ in range(UPDATE_ATTEMPTS):
            version, states = self._read_shard(path)
            if states.get(state.minion) != expected:
                raise VersionConflict(f"minion {state.minion}: its state changed meanwhile")
            new = {**states, state.minion: state}
            try:
                kv = self._write(path, {"states": {m: s.to_dict() for m, s in new.items()}},
                                 cas=version)
            except VersionConflict:
                continue  # another minion of this shard changed: apply ours to theirs
            with self._lock:
                self._shards[path] = (kv, new)
            self._move_stamp()
            return
        raise VersionConflict(f"{self._data(path)}: too many concurrent writers")

    def forget_minion(self, minion: str) -> None:
        """Take the minion out of its shard (under cas): the service policy deletes nothing,
        and KV keeps the shard's earlier versions for an auditor."""
        path = self._shard(checked_minion(minion))
        for _ in range(UPDATE_ATTEMPTS):
            version, states = self._read_shard(path)
            if minion not in states:
                raise NotFound(f"no state of minion {minion}")
            rest = {m: st for m, st in states.items() if m != minion}
            try:
                kv = self._write(path, {"states": {m: st.to_dict() for m, st in rest.items()}},
                                 cas=version)
            except VersionConflict:
                continue  # another minion of this shard changed: take ours out of theirs
            with self._lock:
                self._shards[path] = (kv, rest)
            self._move_stamp()
            return
        raise VersionConflict(f"{self._data(path)}: too many concurrent writers")

    def _stamp(self) -> int:
        """The stamp's KV version (0: none yet)."""
        try:
            resp = self._read(self._stamp_path)
        except NotFound:
            return 0
        return int(self.vault.dig(resp, self._data(self._stamp_path), "data", "metadata",
                                  "version"))

    def _move_stamp(self) -> None:
        """Move the stamp after a shard write, so listings elsewhere read the shards again.

        Without cas, so concurrent writers never conflict; where the mount requires cas, a
        conflict on a version read after our shard write means another writer moved it after
        our write, which is as good.  A failure is logged, not raised (the state is written):
        listings then see it within MINION_FULL_EVERY."""
        try:
            try:
                self._stamp_seen = self._write(self._stamp_path, {"moved": True}, cas=None)
                return
            except VersionConflict:
                pass  # the mount requires cas
            for _ in range(2):
                try:
                    self._stamp_seen = self._write(self._stamp_path, {"moved": True},
                                                   cas=self._stamp_seen)
                    return
                except VersionConflict:
                    self._stamp_seen = self._stamp()  # read after our shard write: once more
        except BackendUnavailable as e:
            log.warning("minion states written, %s not moved: %s", self._stamp_path, e.message)

    def _read_shards(self, pool: ThreadPoolExecutor, stamp: int, started: float) -> None:
        list(pool.map(self._read_shard, [self._shard_path(n) for n in range(MINION_SHARDS)]))
        with self._lock:
            self._full_read = (stamp, started)

    def minions(self) -> list[MinionState]:
        """Every state, by minion id: the shards are read only when the stamp moved (or
        MINION_FULL_EVERY passed); the same list object while no shard changed."""
        now = time.monotonic()
        stamp = self._stamp()  # read before the shards: a move after it is seen next time
        with self._lock:
            full = self._full_read
            if self._readers is None:  # kept: each thread keeps its connection alive
                self._readers = ThreadPoolExecutor(max_workers=MINION_READERS,
                                                   thread_name_prefix="pkisvc-minions")
            pool = self._readers
        if full is None or full[0] != stamp:
            self._read_shards(pool, stamp, now)
        elif now - full[1] >= MINION_FULL_EVERY:  # for writers that never moved the stamp:
            with self._lock:  # read behind, this listing is as fresh as the stamp says
                self._full_read = (stamp, now)
            pool.submit(self._read_shards, pool, stamp, now)
        with self._lock:  # what was read, and this process's own writes since
            shards = [self._shards.get(self._shard_path(n), (0, {})) for n in range(MINION_SHARDS)]
            seen = tuple(version for version, _ in shards)
            if self._listed is not None and self._listed[0] == seen:
                return self._listed[1]
        merged: dict[str, MinionState] = {}
        for _, states in shards:
            merged.update(states)
        listed = [merged[m] for m in sorted(merged)]
        with self._lock:
            self._listed = (seen, listed)
        return listed

    def close(self) -> None:
        """Move head to what this process committed, then revoke the token this backend
        logged in for (a CLI run's AppRole login)."""
        if not self.settle_head(CLOSE_PATIENCE):
            log.warning("%s not moved before closing: the next writer or process moves it",
                        self._data(self._head_path))
        self.vault.close()

    def identity(self) -> str | None:
        where = "auth/token/lookup-self"
        try:
            resp = self.vault.call(where, lambda: self.vault.get(f"/v1/{where}"))
        except PermissionDenied:
            return None  # a policy without the default one: we cannot tell
        name = self.vault.dig(resp, where, "data").get("display_name")
        return str(name) if name else None


class _HeadMover:
    """Moves `head` after commits, in a daemon thread of its own: in order, and only to the
    newest version asked for.  move(version, nonce) returns at once.  The thread waits until
    this process's commits pause (HEAD_SETTLE with none asked for nor under way), at most
    HEAD_MAX_DELAY after the first version it has not moved head to, so a burst of changes
    moves head once or so rather than once each (a head write queued in Vault's storage
    behind the next change's writes slowed that change); then it runs the backend's
    `_after_commit` (which logs its failures).  It ends when idle for MOVER_IDLE seconds (the
    next move starts another)."""

    def __init__(self, backend: VaultBackend) -> None:
        self.pid = os.getpid()
        self.wanted = 0  # the newest version asked for
        self._backend = backend
        self._cv = threading.Condition(threading.Lock())
        self._next: tuple[int, str] | None = None
        self._since = self._asked = 0.0  # when the first / the last unmoved one was asked for
        self._hurry = False  # wait(): move now
        self._busy = False
        self._thread: threading.Thread | None = None

    def move(self, version: int, nonce: str) -> None:
        with self._cv:
            if version <= self.wanted:
                return  # a later version's move is queued or made already
            self._asked = time.monotonic()
            if self._next is None:
                self._since = self._asked
            self.wanted, self._next = version, (version, nonce)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pkisvc-head",
                                                daemon=True)
                self._thread.start()
            self._cv.notify_all()

    def _run(self) -> None:
        while True:
            with self._cv:
                if not self._cv.wait_for(lambda: self._next is not None, MOVER_IDLE):
                    self._thread = None
                    return
                self._settle()
                assert self._next is not None
                version, nonce = self._next
                self._next, self._busy = None, True
            try:
                self._backend._after_commit(version, nonce)
            except Exception:  # never let the thread die: the next commit moves head on
                log.exception("moving head to version %d failed", version)
            finally:
                with self._cv:
                    self._busy = False
                    self._cv.notify_all()

    def _settle(self) -> None:
        """Wait (holding the condition's lock, which waiting lets go) until commits pause."""
        while not self._hurry:
            now = time.monotonic()
            cap = self._since + HEAD_MAX_DELAY
            quiet = self._asked + HEAD_SETTLE
            if now >= cap or (now >= quiet and not self._backend._writing):
                return
            self._cv.wait(min(cap, quiet if quiet > now else now + HEAD_SETTLE / 5) - now)

    def wait(self, timeout: float | None = None) -> bool:
        with self._cv:
            self._hurry = True
            self._cv.notify_all()
            try:
                return self._cv.wait_for(lambda: self._next is None and not self._busy,
                                         timeout)
            finally:
                self._hurry = False


def _has(held: Mapping[str, Any], path: str, cap: str) -> bool:
    caps = held.get(path) or ()
    return "root" in caps or cap in caps


def _encoded(files: Mapping[str, bytes]) -> dict[str, str]:
    return {n: base64.b64encode(b).decode("ascii") for n, b in files.items()}


class _EventSecrets:
    """`periods.Entries` over events/<day>/<seq> secrets, each created with cas=0."""

    def __init__(self, backend: VaultBackend) -> None:
        self.b = backend

    def _path(self, period: str, seq: int) -> str:
        return f"{self.b._events_dir}/{period}/{seq:09d}"

    def tail(self) -> Mapping[str, Any] | None:
        if self.b._tail is not None:
            return self.b._tail
        # A day's name, nothing else: a stray secret under events/ is the walk's to name.
        periods_ = [p for p in self.b._periods() if len(p) == 8 and p.isdigit()]
        if not periods_:
            return None
        names = [n for n in self.b._entry_names(periods_[-1]) if n.isdigit()]
        if not names:
            return None
        return self.b._stored_entry(f"{self.b._events_dir}/{periods_[-1]}/"
                                    f"{max(names, key=int)}")

    def entry(self, period: str, seq: int) -> Mapping[str, Any] | None:
        return self.b._stored_entry(self._path(period, seq))

    def create(self, period: str, seq: int, entry: Mapping[str, Any]) -> bool:
        path = self._path(period, seq)
        try:
            self.b._write(path, {"entry": dict(entry)}, cas=0)
        except VersionConflict:
            self.b._tail = None
            return False
        self.b._tail = entry
        return True


def _files(encoded: Mapping[str, str]) -> dict[str, bytes]:
    return {str(n): base64.b64decode(b, validate=True) for n, b in encoded.items()}
