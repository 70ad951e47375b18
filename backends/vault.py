"""The Vault / OpenBao backend: one KV v2 secret per cluster, one KV version per generation.

    <mount>/data/<prefix>/<cluster>/material            KV version N = pkisvc version N
    <mount>/data/<prefix>/<cluster>/audit/<day>/<key>   one secret per audit event
    <mount>/data/<prefix>/<cluster>/tokens              the hashed API tokens, one list
    <mount>/data/<prefix>/<cluster>/minions/<id>        one minion's delivery state

A generation is written as one KV version with `cas=<the version it builds on>`, so Vault
itself refuses a stale writer and every replica stays gapless.  The version payload holds the
whole generation: `{"pkisvc": 1, "record": {...}, "files": {name: base64}}` (per-version facts
cannot live in `custom_metadata`, which is per secret).  Before the first write the secret's
`max_versions` is set explicitly (KV v2 keeps 10 and purges older ones silently otherwise) and
`cas_required` is switched on.

`vault.addr` may name several nodes of one cluster, comma-separated: a call that cannot
connect to one (refused, connect timeout, sealed) moves to the next and stays there.  Nothing
is retried where the request may have reached a node, so a write is never made twice.

Versions never change once written, so they are cached in memory; `latest()` always asks
Vault, through the `subkeys` endpoint (the version number without the payload).  Every
hvac/requests failure becomes `NotFound`, `VersionConflict`, `BackendUnavailable` or
`PermissionDenied` here; messages name paths, never tokens or payloads.
"""
from __future__ import annotations

import base64
import binascii
import http.client
import json
import logging
import os
import secrets
import ssl
import threading
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

import hvac
import hvac.exceptions
import hvac.utils
import requests
import urllib3.exceptions

from pkisvc.backends.base import checked_minion, checked_version
from pkisvc.errors import (
    BackendUnavailable,
    ConfigError,
    Conflict,
    InvalidRequest,
    NotFound,
    PermissionDenied,
    PkiError,
    VersionConflict,
)
from pkisvc.model import (
    MINION_ID,
    AuditEvent,
    GenerationRecord,
    MinionState,
    StoredGeneration,
    TokenRecord,
)
from pkisvc.settings import Settings

log = logging.getLogger(__name__)

T = TypeVar("T")
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
        if bool(role_id) != bool(secret_id):
            raise ConfigError("setting 'vault': vault.role_id and vault.secret_id go together")
        if not (token or token_file or role_id):
            raise ConfigError("setting 'vault': the vault backend needs vault.token, "
                              "vault.token_file, or vault.role_id and vault.secret_id")
        self.addrs = tuple(a.strip().rstrip("/") for a in addr.split(",") if a.strip())
        if not self.addrs:
            raise ConfigError("setting 'vault.addr': no address")
        self.addr = self.addrs[0]  # the node in use; error messages name it
        self.mount = mount
        self.base = f"{prefix}/{cluster}"
        self.timeout = timeout
        self.max_versions = max_versions
        self._material = f"{self.base}/material"
        self._audit_dir = f"{self.base}/audit"
        self._tokens_path = f"{self.base}/tokens"
        self._minions_dir = f"{self.base}/minions"
        self._auth = _Auth(token=token, token_file=token_file, role_id=role_id,
                           secret_id=secret_id)
        session = requests.Session()
        session.trust_env = False  # only settings.py reads the environment (proxies, CA vars)
        session.verify = ca_cert or True  # hvac prefers the session's verify over its own
        # token="" keeps hvac from reading VAULT_TOKEN or ~/.vault-token behind our back.
        self._client = hvac.Client(url=self.addr, token="", verify=ca_cert or True,
                                   timeout=timeout, session=session)
        self._kv = self._client.secrets.kv.v2
        self._lock = threading.RLock()
        self._cache: OrderedDict[int, StoredGeneration] = OrderedDict()
        self._records: dict[int, GenerationRecord] = {}
        self._events: OrderedDict[str, AuditEvent] = OrderedDict()
        self._metadata_checked = False
        self._subkeys_path = f"{mount}/subkeys/{self._material}"
        self._subkeys = True  # until a policy refuses it
        self._ca_cert = ca_cert
        self._local = threading.local()  # each thread's kept-alive connection for _get

    @classmethod
    def from_settings(cls, settings: Settings) -> VaultBackend:
        v = settings.vault
        return cls(v.addr, cluster=settings.cluster, mount=v.mount, prefix=v.prefix,
                   token=v.token, token_file=v.token_file, role_id=v.role_id,
                   secret_id=v.secret_id, ca_cert=v.ca_cert, timeout=v.timeout,
                   max_versions=v.max_versions)

    def __repr__(self) -> str:
        return f"VaultBackend({self.addr!r}, {self.mount}/{self.base})"

    # --- plumbing ----------------------------------------------------------------------

    def _data(self, path: str) -> str:
        return f"{self.mount}/data/{path}"

    def _meta(self, path: str) -> str:
        return f"{self.mount}/metadata/{path}"

    def _call(self, where: str, fn: Callable[[], T]) -> T:
        """Run one hvac call on a reachable node; translate whatever it raises.

        `where` is the Vault path the call touches: it is what error messages name.
        """
        for attempt in range(len(self.addrs)):
            failed = self.addr
            try:
                return self._call_once(where, fn)
            except _Unreached:
                if attempt == len(self.addrs) - 1:
                    raise
                self._fail_over(failed)
        raise AssertionError("unreachable")

    def _fail_over(self, failed: str) -> None:
        """Move to the node after `failed` (unless another thread moved already)."""
        with self._lock:
            if self.addr == failed:
                self.addr = self.addrs[(self.addrs.index(failed) + 1) % len(self.addrs)]
                self._client.url = self.addr
                log.warning("vault at %s cannot be reached; using %s", failed, self.addr)

    def _call_once(self, where: str, fn: Callable[[], T]) -> T:
        """Run one hvac call as the current identity; translate whatever it raises."""
        for attempt in (1, 2):
            with self._lock:
                self._login(force=attempt == 2)
            try:
                return fn()
            except hvac.exceptions.Forbidden:
                # A token that expired or was revoked looks like a policy refusal: when we can
                # get a new token (AppRole, a token file an agent rewrites), try once more.
                if attempt == 1 and self._token_is_stale():
                    log.info("vault refused %s; authenticating again", where)
                    continue
                raise PermissionDenied(f"permission denied on {where}") from None
            except (hvac.exceptions.VaultError, OSError, ValueError) as e:
                raise self._translate(e, where) from None
        raise AssertionError("unreachable")

    def _token_is_stale(self) -> bool:
        """Tell whether a refusal may be our token's fault, so a new token could help."""
        if self._auth.kind == "token_file":
            return True  # re-reading the file costs nothing
        if self._auth.kind != "approle":
            return False
        try:  # a live token was refused by policy: logging in again would change nothing
            self._client.auth.token.lookup_self()
        except (hvac.exceptions.VaultError, OSError, ValueError):
            return True
        return False

    def _translate(self, e: Exception, where: str) -> PkiError:
        if _never_reached(e):
            return _Unreached(f"vault at {self.addr}: cannot connect ({where}): "
                              f"{_root_cause(e)}")
        if isinstance(e, hvac.exceptions.VaultDown):  # sealed: it served nothing
            return _Unreached(f"vault at {self.addr}: {where}: sealed")
        if isinstance(e, hvac.exceptions.InvalidPath):
            return NotFound(f"nothing at {where}")
        if isinstance(e, (hvac.exceptions.Forbidden, hvac.exceptions.Unauthorized)):
            return PermissionDenied(f"permission denied on {where}")
        if isinstance(e, hvac.exceptions.VaultError):
            errors = e.errors if isinstance(e.errors, list) else [e.errors or ""]
            reason = "; ".join(str(x) for x in errors if x)[:200] or type(e).__name__
            if isinstance(e, hvac.exceptions.InvalidRequest) and "check-and-set" in reason:
                return VersionConflict(f"{where}: {reason}")
            return BackendUnavailable(f"vault at {self.addr}: {where}: {reason}")
        if isinstance(e, requests.Timeout):
            return BackendUnavailable(
                f"vault at {self.addr}: no answer within {self.timeout:g}s ({where})")
        if isinstance(e, requests.ConnectionError):
            return BackendUnavailable(f"vault at {self.addr}: cannot connect ({where}): "
                                      f"{_root_cause(e)}")
        if isinstance(e, requests.RequestException):
            return BackendUnavailable(f"vault at {self.addr}: {where}: {_root_cause(e)}")
        if isinstance(e, OSError):
            return BackendUnavailable(f"vault at {self.addr}: {where}: {e.strerror or e}")
        return BackendUnavailable(f"vault at {self.addr}: {where}: unreadable answer")

    def _login(self, *, force: bool) -> None:
        """Make sure the client holds a live token (read, renewed, or freshly logged in)."""
        try:
            token = self._auth.token_for(self._client, force=force)
        except hvac.exceptions.Forbidden:
            raise PermissionDenied(f"permission denied on {self._auth.where}") from None
        except hvac.exceptions.InvalidRequest:
            # AppRole answers 400 to a wrong role_id or secret_id.
            raise PermissionDenied(f"permission denied on {self._auth.where}: "
                                   "login refused") from None
        except (hvac.exceptions.VaultError, OSError, ValueError) as e:
            raise self._translate(e, self._auth.where) from None
        except (KeyError, TypeError):
            raise BackendUnavailable(f"vault at {self.addr}: {self._auth.where}: "
                                     "unexpected answer") from None
        self._client.token = token

    def _get(self, url: str) -> dict[str, Any]:
        """GET url on this thread's kept-alive connection (every read; writes go through hvac).

        requests (under hvac) costs about as much per call as OpenBao's whole answer, and the
        hot reads make one or two reads each (the version check; the tokens list for a token
        kept in the backend).  Failures are raised as hvac and requests raise them, so
        `_call` treats them like any other call's.
        """
        for attempt in (1, 2):
            held = getattr(self._local, "conn", None)
            # A connection is never used by another process (a fork) or thread, nor after a
            # fail-over to another node.
            key = (os.getpid(), self.addr)
            conn = held[1] if held is not None and held[0] == key else None
            reused = conn is not None
            if conn is None:
                conn = self._connect()
                try:
                    conn.connect()
                except OSError as e:
                    conn.close()
                    # Nothing was sent: as urllib3 says it, so `_call` may fail over.
                    raise requests.ConnectionError(urllib3.exceptions.ConnectTimeoutError(
                        None, f"{self.addr}: {e.strerror or e}")) from e
                self._local.conn = (key, conn)
            try:
                conn.request("GET", url, headers={"X-Vault-Token": self._client.token})
                resp = conn.getresponse()
                body = resp.read()
            except TimeoutError as e:
                conn.close()
                self._local.conn = None
                raise requests.Timeout(str(e)) from e
            except (http.client.HTTPException, OSError) as e:
                conn.close()
                self._local.conn = None
                if reused and attempt == 1:
                    continue  # OpenBao closed a connection that sat idle
                raise requests.ConnectionError(str(e)) from e
            if resp.will_close:
                conn.close()
                self._local.conn = None
            if 300 <= resp.status < 400:
                # A standby that redirects to the active node: let requests follow it.
                redirected: dict[str, Any] = self._client.adapter.get(url)
                return redirected
            try:
                doc = json.loads(body) if body else {}
            except ValueError:
                doc = {}
            if resp.status >= 400:
                errors = doc.get("errors") if isinstance(doc, dict) else None
                hvac.utils.raise_for_error("get", url, resp.status, errors=errors,
                                           text=body.decode(errors="replace"))
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            return doc
        raise AssertionError("unreachable")

    def _connect(self) -> http.client.HTTPConnection:
        parts = urllib.parse.urlsplit(self.addr)
        if parts.scheme == "https":
            context = ssl.create_default_context(cafile=self._ca_cert)
            return http.client.HTTPSConnection(parts.hostname or "", parts.port,
                                               timeout=self.timeout, context=context)
        return http.client.HTTPConnection(parts.hostname or "", parts.port,
                                          timeout=self.timeout)

    def _dig(self, resp: Any, where: str, *keys: str) -> Any:
        """Return resp[k1][k2]...; an answer of another shape is BackendUnavailable."""
        try:
            for k in keys:
                resp = resp[k]
        except (KeyError, TypeError, IndexError):
            raise BackendUnavailable(f"vault at {self.addr}: {where}: unexpected answer") \
                from None
        return resp

    def _read(self, path: str, version: int | None = None) -> dict[str, Any]:
        # What hvac's read_secret_version(raise_on_deleted_version=True) does, on _get's
        # connection: a deleted or destroyed version is a 404 too (InvalidPath).
        url = f"/v1/{self.mount}/data/{urllib.parse.quote(path)}"
        if version is not None:
            url += f"?version={int(version)}"
        return self._call(self._data(path), lambda: self._get(url))

    def _write(self, path: str, data: Mapping[str, Any], cas: int) -> int:
        resp = self._call(self._data(path), lambda: self._kv.create_or_update_secret(
            path, secret=dict(data), cas=cas, mount_point=self.mount))
        return int(self._dig(resp, self._data(path), "data", "version"))

    def _list(self, path: str) -> list[str]:
        try:
            resp = self._call(self._meta(path), lambda: self._kv.list_secrets(
                path, mount_point=self.mount))
        except NotFound:
            return []
        return [str(k) for k in self._dig(resp, self._meta(path), "data", "keys")]

    def _metadata(self) -> dict[str, Any] | None:
        try:
            resp = self._call(self._meta(self._material), lambda: self._kv.read_secret_metadata(
                self._material, mount_point=self.mount))
        except NotFound:
            return None
        data: dict[str, Any] = self._dig(resp, self._meta(self._material), "data")
        return data

    def _ensure_metadata(self, *, first: bool) -> None:
        """Set max_versions and cas_required on the material secret where they differ."""
        if self._metadata_checked and not first:
            return
        meta = self._metadata()
        if (meta is None or meta.get("max_versions") != self.max_versions
                or not meta.get("cas_required")):
            self._call(self._meta(self._material), lambda: self._kv.update_metadata(
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
            resp = self._call(where, lambda: self._get(
                f"/v1/{urllib.parse.quote(where)}?depth=1"))
        except NotFound:
            return self._latest_from_metadata()
        return int(self._dig(resp, where, "data", "metadata", "version"))

    def _latest_by_data(self) -> int | None:
        # One read of the latest data version: unlike the metadata (which lists every version)
        # its size does not grow with the history, and it fills the cache when another
        # replica wrote that version.
        try:
            resp = self._read(self._material)
        except NotFound:
            return self._latest_from_metadata()
        version = int(self._dig(resp, self._data(self._material), "data", "metadata", "version"))
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
        when = _event_time(event)
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
                if event is None or (since is not None and _event_time(event) < since):
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

    # --- tokens ------------------------------------------------------------------------

    def _load_tokens(self) -> tuple[int, list[TokenRecord]]:
        try:
            resp = self._read(self._tokens_path)
        except NotFound:
            return 0, []
        try:
            version = int(resp["data"]["metadata"]["version"])
            tokens = [TokenRecord.from_dict(t) for t in resp["data"]["data"]["tokens"]]
        except (KeyError, TypeError, ValueError):
            raise BackendUnavailable(f"vault at {self.addr}: "
                                     f"{self._data(self._tokens_path)} is unreadable") from None
        return version, tokens

    def _update_tokens(self, change: Callable[[list[TokenRecord]], list[TokenRecord]]) -> None:
        for _ in range(UPDATE_ATTEMPTS):
            version, tokens = self._load_tokens()
            new = change(tokens)
            try:
                self._write(self._tokens_path, {"tokens": [t.to_dict() for t in new]},
                            cas=version)
            except VersionConflict:
                continue  # another process changed the list: apply the change to theirs
            return
        raise VersionConflict(f"{self._data(self._tokens_path)}: too many concurrent writers")

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
            resp = self._call(where, lambda: self._client.auth.token.lookup_self())
        except PermissionDenied:
            return None  # a policy without the default one: we cannot tell
        name = self._dig(resp, where, "data").get("display_name")
        return str(name) if name else None


class _Auth:
    """Where the client's token comes from (a setting, a file, an AppRole login), kept alive.

    Whatever its source, a token with a TTL is renewed once a third of it is left (when it is
    renewable); an AppRole token that cannot be renewed any more (max TTL) is replaced by a new
    login.  A static token's TTL is learnt once through lookup-self.
    """

    def __init__(self, *, token: str | None, token_file: str | None, role_id: str | None,
                 secret_id: str | None) -> None:
        # AppRole wins over a token file, which wins over a plain token (VAULT_TOKEN may
        # linger in an operator's shell while the config names a better source).
        self.kind = "approle" if role_id else "token_file" if token_file else "token"
        self._static = token or ""
        self._token_file = token_file
        self._role_id = role_id
        self._secret_id = secret_id
        self._file_mtime: int | None = None
        self._current = ""  # the token in use
        self._lease = 0.0  # its TTL when we got it; 0 = it does not expire
        self._expires: float | None = None  # monotonic time it expires
        self._renewable = False
        self.where = {"approle": "auth/approle/login", "token_file": token_file or "",
                      "token": "auth/token/lookup-self"}[self.kind]

    def token_for(self, client: Any, *, force: bool) -> str:
        now = time.monotonic()
        if self.kind == "approle":
            expired = self._expires is not None and now >= self._expires
            if force or not self._current or expired:
                self._login(client, now)
            elif self._due(now) and not self._renew(client, now):
                self._login(client, now)
            return self._current
        token = self._from_file(force=force) if self.kind == "token_file" else self._static
        if token != self._current:
            client.token = token
            self._inspect(client, now)
            self._current = token
        elif self._due(now):
            self._renew(client, now)  # if it fails the token still works until it expires
        return token

    def _due(self, now: float) -> bool:
        return (self._renewable and self._expires is not None
                and now >= self._expires - self._lease / 3)

    def _renew(self, client: Any, now: float) -> bool:
        if self._expires is not None and now >= self._expires:
            return False
        try:
            auth = client.auth.token.renew_self()["auth"]
        except hvac.exceptions.VaultError:
            self._renewable = False  # do not ask again on every call
            return False
        lease = float(auth.get("lease_duration") or 0)
        if lease <= self._lease / 3:  # the max TTL is near: renewing buys nothing
            self._renewable = False
            return False
        self._set(lease, bool(auth.get("renewable")), now)
        log.debug("renewed the vault token for %ss", int(lease))
        return True

    def _inspect(self, client: Any, now: float) -> None:
        try:
            data = client.auth.token.lookup_self()["data"]
        except hvac.exceptions.VaultError:
            self._lease = 0.0  # lookup-self refused (no default policy): we cannot tell
            self._set(0, False, now)
            return
        self._lease = float(data.get("ttl") or 0)
        self._set(self._lease, bool(data.get("renewable")), now)

    def _login(self, client: Any, now: float) -> None:
        auth = client.auth.approle.login(role_id=self._role_id, secret_id=self._secret_id,
                                         use_token=False)["auth"]
        self._current = str(auth["client_token"])
        client.token = self._current
        self._lease = float(auth.get("lease_duration") or 0)
        self._set(self._lease, bool(auth.get("renewable")), now)
        log.info("logged in to vault with AppRole (token valid %ss)", int(self._lease))

    def _set(self, lease: float, renewable: bool, now: float) -> None:
        self._expires = now + lease if lease > 0 else None
        self._renewable = renewable

    def _from_file(self, *, force: bool) -> str:
        assert self._token_file is not None
        # An agent (vault agent, a sidecar) may rewrite the file: re-read it when it changed.
        mtime = os.stat(self._token_file).st_mtime_ns
        if force or mtime != self._file_mtime or not self._current:
            with open(self._token_file) as fh:
                token = fh.read().strip()
            self._file_mtime = mtime
            return token
        return self._current


class _Unreached(BackendUnavailable):
    """The node did not serve the request (not connected, or sealed): another node may."""


def _never_reached(e: BaseException) -> bool:
    """Tell whether a requests error happened before the request could reach the server."""
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        # NewConnectionError (refused, no route, DNS) is a ConnectTimeoutError in urllib3 2.
        if isinstance(x, urllib3.exceptions.ConnectTimeoutError):
            return True
        todo += [n for n in (x.__cause__, x.__context__, getattr(x, "reason", None), *x.args)
                 if isinstance(n, BaseException)]
    return False


def _event_time(event: AuditEvent) -> datetime:
    try:
        t = datetime.fromisoformat(event.time.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidRequest(f"audit event time {event.time!r} is not RFC 3339") from None
    return (t if t.tzinfo else t.replace(tzinfo=UTC)).astimezone(UTC)


def _root_cause(e: BaseException) -> str:
    """The innermost reason of a requests error, without its URL-laden wrappers."""
    seen = e
    while True:
        inner = seen.__cause__ or seen.__context__ or (seen.args[0] if seen.args else None)
        if not isinstance(inner, BaseException) or inner is seen:
            break
        seen = inner
    text = str(seen)
    if "]" in text and "[Errno" in text:
        text = text[text.index("[Errno"):]
    return text.rstrip("')\"")[:200] or type(seen).__name__
