"""The Vault / OpenBao backend: one KV v2 secret per cluster, one KV version per generation.

    <mount>/data/<prefix>/<cluster>/material            KV version N = pkisvc version N
    <mount>/data/<prefix>/<cluster>/audit/<day>/<key>   one secret per audit event
    <mount>/data/<prefix>/<cluster>/tokens              the hashed API tokens, one list
    <mount>/data/<prefix>/<cluster>/minions/<id>        one minion's delivery state
    <mount>/data/<prefix>/<cluster>/sessions            the operator pages' sessions, one list

A generation is written as one KV version with `cas=<the version it builds on>`, so Vault
itself refuses a stale writer and every replica stays gapless.  The version payload holds the
whole generation: `{"pkisvc": 1, "record": {...}, "files": {name: base64}}` (per-version facts
cannot live in `custom_metadata`, which is per secret).  Before the first write the secret's
`max_versions` is set explicitly (KV v2 keeps 10 and purges older ones silently otherwise) and
`cas_required` is switched on.

Versions never change once written, so they are cached in memory; `latest()` always asks
Vault, through the `subkeys` endpoint (the version number without the payload).

Every Vault call goes through `vault_client.VaultClient.call()`: the nodes of `vault.addr`
with fail-over, the token kept alive, every failure as `NotFound`, `VersionConflict`,
`BackendUnavailable` or `PermissionDenied` (messages name paths, never tokens or payloads).
hvac builds the requests; `vault_http` carries them on one kept-alive connection per thread.
"""
from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import secrets
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Collection, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

from pkisvc.backends.base import checked_digest, checked_minion, checked_version
from pkisvc.backends.vault_client import VaultClient
from pkisvc.errors import (
    BackendUnavailable,
    Conflict,
    NotFound,
    PermissionDenied,
    VersionConflict,
)
from pkisvc.model import (
    MINION_ID,
    AuditEvent,
    GenerationRecord,
    MinionState,
    SessionRecord,
    StoredGeneration,
    TokenRecord,
)
from pkisvc.settings import Settings

log = logging.getLogger(__name__)


class _Listed(Protocol):
    def to_dict(self) -> dict[str, Any]: ...


T = TypeVar("T", bound=_Listed)  # a record kept in a list secret (tokens, sessions)

FORMAT = 1
RESERVED = "record.json"  # the files backend's record; refused here too, so backends agree
CACHE_SIZE = 64  # whole generations kept in memory; records are kept for every version
EVENT_CACHE_SIZE = 4096  # audit events read back (they never change either)
UPDATE_ATTEMPTS = 10  # read-modify-write of the tokens list under cas
MINION_READERS = 8  # concurrent reads when every minion's state is asked for


class VaultBackend:
    """Generations as versions of one KV v2 secret in Vault or OpenBao."""

    name = "vault"

    def __init__(self, addr: str, *, cluster: str, mount: str = "secret",
                 prefix: str = "pkisvc", token: str | None = None,
                 token_file: str | None = None, role_id: str | None = None,
                 secret_id: str | None = None, ca_cert: str | None = None,
                 timeout: float = 5.0, max_versions: int = 1000) -> None:
        self.vault = VaultClient(addr, token=token, token_file=token_file, role_id=role_id,
                                 secret_id=secret_id, ca_cert=ca_cert, timeout=timeout)
        self.mount = mount
        self.base = f"{prefix}/{cluster}"
        self.max_versions = max_versions
        self._material = f"{self.base}/material"
        self._audit_dir = f"{self.base}/audit"
        self._tokens_path = f"{self.base}/tokens"
        self._minions_dir = f"{self.base}/minions"
        self._sessions_path = f"{self.base}/sessions"
        self._lock = threading.RLock()
        self._cache: OrderedDict[int, StoredGeneration] = OrderedDict()
        self._records: dict[int, GenerationRecord] = {}
        self._events: OrderedDict[str, AuditEvent] = OrderedDict()
        self._metadata_checked = False
        self._subkeys_path = f"{mount}/subkeys/{self._material}"
        self._subkeys = True  # until a policy refuses it

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultBackend:
        v = settings.vault
        return cls(v.addr, cluster=settings.cluster, mount=v.mount, prefix=v.prefix,
                   token=v.token, token_file=v.token_file, role_id=v.role_id,
                   secret_id=v.secret_id, ca_cert=v.ca_cert, timeout=v.timeout,
                   max_versions=v.max_versions)

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

    def _write(self, path: str, data: Mapping[str, Any], cas: int) -> int:
        resp = self.vault.call(self._data(path), lambda: self.vault.kv.create_or_update_secret(
            path, secret=dict(data), cas=cas, mount_point=self.mount))
        return int(self.vault.dig(resp, self._data(path), "data", "version"))

    def _list(self, path: str) -> list[str]:
        try:
            resp = self.vault.call(self._meta(path), lambda: self.vault.kv.list_secrets(
                path, mount_point=self.mount))
        except NotFound:
            return []
        return [str(k) for k in self.vault.dig(resp, self._meta(path), "data", "keys")]

    def _metadata(self) -> dict[str, Any] | None:
        try:
            resp = self.vault.call(self._meta(self._material),
                                   lambda: self.vault.kv.read_secret_metadata(
                                       self._material, mount_point=self.mount))
        except NotFound:
            return None
        data: dict[str, Any] = self.vault.dig(resp, self._meta(self._material), "data")
        return data

    def _ensure_metadata(self, *, first: bool) -> None:
        """Set max_versions and cas_required on the material secret where they differ."""
        if self._metadata_checked and not first:
            return
        meta = self._metadata()
        if (meta is None or meta.get("max_versions") != self.max_versions
                or not meta.get("cas_required")):
            self.vault.call(self._meta(self._material), lambda: self.vault.kv.update_metadata(
                self._material, max_versions=self.max_versions, cas_required=True,
                mount_point=self.mount))
            log.info("set max_versions=%d on %s", self.max_versions,
                     self._meta(self._material))
        self._metadata_checked = True

    def _remember(self, gen: StoredGeneration) -> None:
        with self._lock:
            self._cache[gen.version] = gen
            self._cache.move_to_end(gen.version)
            while len(self._cache) > CACHE_SIZE:
                self._cache.popitem(last=False)
            self._records[gen.version] = gen.record

    def _cached(self, version: int) -> StoredGeneration | None:
        with self._lock:
            gen = self._cache.get(version)
            if gen is not None:
                self._cache.move_to_end(version)
            return gen

    def _decode(self, resp: Mapping[str, Any], version: int) -> StoredGeneration:
        where = f"{self._data(self._material)} version {version}"
        try:
            payload = resp["data"]["data"]
            if payload.get("pkisvc") != FORMAT:
                raise ValueError("unknown payload format")
            record = GenerationRecord.from_dict(payload["record"])
            files = {str(n): base64.b64decode(b, validate=True)
                     for n, b in payload["files"].items()}
        except (KeyError, TypeError, ValueError, AttributeError, binascii.Error):
            raise BackendUnavailable(f"vault at {self.addr}: {where} is not a pkisvc "
                                     "generation") from None
        if record.version != version:
            raise BackendUnavailable(f"vault at {self.addr}: {where} records version "
                                     f"{record.version}")
        return StoredGeneration(record, files)

    # --- generations -------------------------------------------------------------------

    def latest(self) -> int | None:
        # Asked on every hot read, never cached (another replica may have written since).
        # KV v2's subkeys endpoint gives the latest version's number without its payload
        # (the whole generation, base64): the answer is a few hundred bytes whatever the
        # history, and the generation itself is read once per version into the cache.
        # A policy without `read` on <mount>/subkeys/ falls back to reading the data.
        if self._subkeys:
            try:
                return self._latest_by_subkeys()
            except PermissionDenied:
                version = self._latest_by_data()  # raises too when the token is the problem
                log.info("no read permission on %s; reading the latest data version instead "
                         "(grant it to make each check cheaper)", self._subkeys_path)
                self._subkeys = False
                return version
        return self._latest_by_data()

    def _latest_by_subkeys(self) -> int | None:
        where = self._subkeys_path
        try:
            resp = self.vault.call(where, lambda: self.vault.get(
                f"/v1/{urllib.parse.quote(where)}?depth=1"))
        except NotFound:
            return self._latest_from_metadata()
        return int(self.vault.dig(resp, where, "data", "metadata", "version"))

    def _latest_by_data(self) -> int | None:
        # One read of the latest data version: unlike the metadata (which lists every version)
        # its size does not grow with the history, and it fills the cache when another
        # replica wrote that version.
        try:
            resp = self._read(self._material)
        except NotFound:
            return self._latest_from_metadata()
        version = int(self.vault.dig(resp, self._data(self._material),
                                     "data", "metadata", "version"))
        if self._cached(version) is None:
            self._remember(self._decode(resp, version))
        return version

    def _latest_from_metadata(self) -> int | None:
        meta = self._metadata()  # no secret yet, or its latest version was deleted
        return (int(meta["current_version"]) or None) if meta else None

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
        try:
            resp = self._read(self._material, version)
        except NotFound:
            raise NotFound(f"no version {version}") from None
        gen = self._decode(resp, version)
        self._remember(gen)
        return gen

    def write(self, gen: StoredGeneration, *, expected: int | None) -> int:
        version = checked_version(gen, expected, RESERVED)
        payload = {
            "pkisvc": FORMAT,
            "record": gen.record.to_dict(),
            "files": {n: base64.b64encode(b).decode("ascii") for n, b in gen.files.items()},
        }
        self._ensure_metadata(first=expected is None)
        try:
            written = self._write(self._material, payload, cas=expected or 0)
        except VersionConflict:
            raise VersionConflict(
                f"{self._data(self._material)} moved past version {expected or 0}: "
                "another writer was first") from None
        if written != version:  # cas makes this impossible; never report a wrong number
            raise BackendUnavailable(f"vault at {self.addr}: wrote KV version {written} for "
                                     f"pkisvc version {version}")
        self._remember(gen)
        return version

    def versions(self) -> list[GenerationRecord]:
        meta = self._metadata()
        if meta is None:
            return []
        live = sorted(int(v) for v, info in (meta.get("versions") or {}).items()
                      if not info.get("destroyed") and not info.get("deletion_time"))
        out = []
        for v in live:
            rec = self._records.get(v)
            if rec is None:
                try:
                    rec = self.read(v).record
                except NotFound:
                    continue  # deleted between the metadata read and this one
            out.append(rec)
        return out

    # --- audit -------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> None:
        when = event.time
        day = when.strftime("%Y%m%d")
        # Key order is time order: the event's second, then a nanosecond tie-breaker for
        # events within one second, then randomness so two writers never collide.
        for _ in range(3):
            key = (f"{day}/{when.strftime('%H%M%S')}-{time.time_ns():020d}-"
                   f"{secrets.token_hex(4)}")
            try:
                self._write(f"{self._audit_dir}/{key}", {"event": event.to_dict()}, cas=0)
            except VersionConflict:
                continue
            self._remember_event(key, event)
            return
        raise BackendUnavailable(f"vault at {self.addr}: cannot find a free audit key")

    def audit(self, since: datetime | None = None, limit: int = 100) -> list[AuditEvent]:
        if since is not None and since.tzinfo is None:
            since = since.replace(tzinfo=UTC)
        floor = since.astimezone(UTC).strftime("%Y%m%d%H%M%S") if since else ""
        out: list[AuditEvent] = []
        days = sorted((d.rstrip("/") for d in self._list(self._audit_dir) if d.endswith("/")),
                      reverse=True)
        for day in days:
            if len(out) >= limit or day < floor[:8]:
                break
            keys = sorted((k for k in self._list(f"{self._audit_dir}/{day}")
                           if not k.endswith("/")), reverse=True)
            for k in keys:
                if len(out) >= limit or day + k[:6] < floor[:14]:
                    return out
                event = self._event(f"{day}/{k}")
                if event is None or (since is not None and event.time < since):
                    continue
                out.append(event)
        return out

    def _event(self, key: str) -> AuditEvent | None:
        cached = self._events.get(key)
        if cached is not None:
            return cached
        try:
            resp = self._read(f"{self._audit_dir}/{key}")
            event = AuditEvent.from_dict(resp["data"]["data"]["event"])
        except NotFound:
            return None
        except (KeyError, TypeError, ValueError):
            log.warning("skipping unreadable audit event %s", key)
            return None
        self._remember_event(key, event)
        return event

    def _remember_event(self, key: str, event: AuditEvent) -> None:
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

    def _read_minion(self, minion: str) -> tuple[int, MinionState | None]:
        """Return (KV version, state) of one minion's secret; (0, None) when there is none."""
        path = f"{self._minions_dir}/{checked_minion(minion)}"
        try:
            resp = self._read(path)
        except NotFound:
            return 0, None
        try:
            return (int(resp["data"]["metadata"]["version"]),
                    MinionState.from_dict(resp["data"]["data"]["state"]))
        except (KeyError, TypeError, ValueError):
            raise BackendUnavailable(f"vault at {self.addr}: {self._data(path)} is not a "
                                     "minion state") from None

    def minion(self, minion: str) -> MinionState | None:
        return self._read_minion(minion)[1]

    def put_minion(self, state: MinionState, *, expected: MinionState | None) -> None:
        version, held = self._read_minion(state.minion)
        if held != expected:
            raise VersionConflict(f"minion {state.minion}: its state changed meanwhile")
        self._write(f"{self._minions_dir}/{state.minion}", {"state": state.to_dict()},
                    cas=version)

    def minions(self) -> list[MinionState]:
        names = sorted(k for k in self._list(self._minions_dir) if MINION_ID.fullmatch(k))
        if not names:
            return []
        with ThreadPoolExecutor(max_workers=MINION_READERS,
                                thread_name_prefix="pkisvc-minions") as pool:
            states = list(pool.map(lambda m: self._read_minion(m)[1], names))
        return [s for s in states if s is not None]

    def identity(self) -> str | None:
        where = "auth/token/lookup-self"
        try:
            resp = self.vault.call(where, lambda: self.vault.get(f"/v1/{where}"))
        except PermissionDenied:
            return None  # a policy without the default one: we cannot tell
        name = self.vault.dig(resp, where, "data").get("display_name")
        return str(name) if name else None

