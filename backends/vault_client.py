"""pkisvc's session with one Vault or OpenBao cluster: its nodes, its token, its errors.

`VaultClient` holds an hvac client over `vault_http` (one kept-alive connection per thread),
and runs every call of the backend through `call()`, which

* moves to the next node of `vault.addr` when the current one did not serve the request
  (not connected, or sealed) and stays there; nothing is sent again where the request may
  have reached a node, so a write is never made twice;
* keeps the token alive (`_Auth`: a setting, a file an agent rewrites, an AppRole login),
  and authenticates once more when a refusal may be the token's fault;
* turns whatever hvac or the transport raise into `NotFound`, `VersionConflict`,
  `BackendUnavailable` or `PermissionDenied`, naming the Vault path, never a token.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

import hvac
import hvac.exceptions

from pkisvc.backends.vault_http import Adapter, NoAnswer, NotSent, TransportError
from pkisvc.errors import (
    AnswerLost,
    BackendUnavailable,
    ConfigError,
    NotFound,
    PermissionDenied,
    PkiError,
    VersionConflict,
)

log = logging.getLogger(__name__)

T = TypeVar("T")
# What an hvac call over vault_http may raise (OSError: a token file that cannot be read).
FAILURES = (hvac.exceptions.VaultError, TransportError, OSError, ValueError)


class VaultClient:
    """One identity on the nodes of one Vault cluster; every call translated."""

    def __init__(self, addr: str, *, token: str | None, token_file: str | None,
                 role_id: str | None, secret_id: str | None, ca_cert: str | None,
                 timeout: float, secret_id_file: str | None = None) -> None:
        if secret_id and secret_id_file:
            raise ConfigError("setting 'vault': vault.secret_id and vault.secret_id_file "
                              "exclude each other")
        if bool(role_id) != bool(secret_id or secret_id_file):
            raise ConfigError("setting 'vault': vault.role_id and vault.secret_id (or "
                              "vault.secret_id_file) go together")
        if not (token or token_file or role_id):
            raise ConfigError("setting 'vault': the vault backend needs vault.token, "
                              "vault.token_file, or vault.role_id and vault.secret_id")
        self.addrs = tuple(a.strip().rstrip("/") for a in addr.split(",") if a.strip())
        if not self.addrs:
            raise ConfigError("setting 'vault.addr': no address")
        self.addr = self.addrs[0]  # the node in use; error messages name it
        self._auth = _Auth(token=token, token_file=token_file, role_id=role_id,
                           secret_id=secret_id, secret_id_file=secret_id_file)
        # token="" and verify keep hvac from reading VAULT_TOKEN, ~/.vault-token or the CA
        # variables behind our back (only settings.py reads the environment).
        self._client = hvac.Client(url=self.addr, token="", verify=ca_cert or True,
                                   timeout=timeout, adapter=Adapter)
        self.kv = self._client.secrets.kv.v2
        self._lock = threading.RLock()
        self._closed = False  # let go of its token: no new login (a stopping process)

    def get(self, url: str) -> dict[str, Any]:
        """GET /v1/... through hvac's adapter (for the hot reads: no per-call URL building)."""
        doc: dict[str, Any] = self._client.adapter.get(url)
        return doc

    def post(self, url: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST /v1/... with a JSON body through hvac's adapter."""
        doc: dict[str, Any] = self._client.adapter.post(url, json=body)
        return doc

    def close(self) -> None:
        """Revoke the token this client logged in for (AppRole), so a short-lived process
        (a CLI run) leaves no live token behind; a token it was given is left alone."""
        with self._lock:  # no call logs in again meanwhile, nor after (background threads)
            self._closed = True
            token = self._auth.logged_in()
            if token:
                try:
                    self._client.adapter.post("/v1/auth/token/revoke-self")
                except FAILURES as e:  # it expires with its TTL anyway
                    log.info("could not revoke the vault token: %s",
                             self._translate(e, "auth/token/revoke-self").message)
                self._auth.forget()
            self._client.adapter.close()

    def dig(self, resp: Any, where: str, *keys: str) -> Any:
        """Return resp[k1][k2]...; an answer of another shape is BackendUnavailable."""
        try:
            for k in keys:
                resp = resp[k]
        except (KeyError, TypeError, IndexError):
            raise BackendUnavailable(f"vault at {self.addr}: {where}: unexpected answer") \
                from None
        return resp

    def call(self, where: str, fn: Callable[[], T]) -> T:
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
            except FAILURES as e:
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
        except FAILURES:
            return True
        return False

    def _translate(self, e: Exception, where: str) -> PkiError:
        if isinstance(e, NotSent):
            return _Unreached(f"vault at {self.addr}: cannot connect ({where}): {e}")
        if isinstance(e, NoAnswer):
            return AnswerLost(f"vault at {self.addr}: {e} ({where})")
        if isinstance(e, TransportError):
            return AnswerLost(f"vault at {self.addr}: {where}: {e}")
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
        if isinstance(e, OSError):
            return BackendUnavailable(f"vault at {self.addr}: {where}: {e.strerror or e}")
        return BackendUnavailable(f"vault at {self.addr}: {where}: unreadable answer")

    def _login(self, *, force: bool) -> None:
        """Make sure the client holds a live token (read, renewed, or freshly logged in)."""
        if self._closed:
            raise BackendUnavailable(f"vault at {self.addr}: this process has let go of its "
                                     "token (it is stopping)")
        try:
            token = self._auth.token_for(self._client, force=force)
        except hvac.exceptions.Forbidden:
            raise PermissionDenied(f"permission denied on {self._auth.where}") from None
        except hvac.exceptions.InvalidRequest:
            # AppRole answers 400 to a wrong role_id or secret_id.
            raise PermissionDenied(f"permission denied on {self._auth.where}: "
                                   "login refused") from None
        except FAILURES as e:
            raise self._translate(e, self._auth.where) from None
        except (KeyError, TypeError):
            raise BackendUnavailable(f"vault at {self.addr}: {self._auth.where}: "
                                     "unexpected answer") from None
        self._client.token = token


class _Auth:
    """Where the client's token comes from (a setting, a file, an AppRole login), kept alive.

    Whatever its source, a token with a TTL is renewed once a third of it is left (when it is
    renewable); an AppRole token that cannot be renewed any more (max TTL) is replaced by a new
    login.  A static token's TTL is learnt once through lookup-self.
    """

    def __init__(self, *, token: str | None, token_file: str | None, role_id: str | None,
                 secret_id: str | None, secret_id_file: str | None) -> None:
        # AppRole wins over a token file, which wins over a plain token (VAULT_TOKEN may
        # linger in an operator's shell while the config names a better source).
        self.kind = "approle" if role_id else "token_file" if token_file else "token"
        self._static = token or ""
        self._token_file = token_file
        self._role_id = role_id
        self._secret_id = secret_id
        self._secret_id_file = secret_id_file
        self._file_mtime: int | None = None
        self._current = ""  # the token in use
        self._lease = 0.0  # its TTL when we got it; 0 = it does not expire
        self._expires: float | None = None  # monotonic time it expires
        self._renewable = False
        self.where = {"approle": "auth/approle/login", "token_file": token_file or "",
                      "token": "auth/token/lookup-self"}[self.kind]

    def logged_in(self) -> str:
        """The token this process logged in for (AppRole), or "" (none, or one it was given)."""
        return self._current if self.kind == "approle" else ""

    def forget(self) -> None:
        self._current, self._expires = "", None

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
        secret_id = self._secret_id
        if self._secret_id_file:  # read at each login: an operator may replace the file
            with open(self._secret_id_file) as fh:
                secret_id = fh.read().strip()
        auth = client.auth.approle.login(role_id=self._role_id, secret_id=secret_id,
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
