"""The Backend contract every secrets backend fulfils.

A backend keeps bytes and records; it knows nothing of certificates.  Every method turns its
own failures into pkisvc errors at its border: `NotFound`, `VersionConflict`,
`BackendUnavailable` — nothing foreign escapes.  `pkisvc.testing.BackendContract` is the
suite a backend must pass.
"""
from __future__ import annotations

import heapq
import itertools
import re
from collections.abc import Iterable, Iterator
from datetime import datetime
from typing import Collection, Protocol, runtime_checkable

from pkisvc.chain import ChainKey, StoredPeriod, StoredVersion
from pkisvc.errors import InvalidRequest
from pkisvc.model import (
    MINION_ID,
    AuditEvent,
    GenerationRecord,
    MinionState,
    SessionRecord,
    StoredGeneration,
    TokenRecord,
    valid_file_name,
)


@runtime_checkable
class Backend(Protocol):
    """A versioned store of generations, an audit trail and hashed API tokens."""

    name: str
    chain_key: ChainKey  # links what the backend writes (pkisvc.chain)

    def latest(self) -> int | None:
        """Return the newest version, or None for an empty store.

        Raises: BackendUnavailable.
        """

    def read(self, version: int | None = None) -> StoredGeneration:
        """Return one whole generation (the latest when version is None).

        Raises: NotFound (no such version, or an empty store), BackendUnavailable.
        """

    def write(self, gen: StoredGeneration, *, expected: int | None,
              event: AuditEvent | None = None) -> int:
        """Store gen as version `expected + 1` (1 when expected is None) and return it.

        Atomic: readers see all of it or nothing.  gen.record.version must equal that number.
        `event` is the change's audit event: it is committed with the generation (one commit
        point, never one without the other) and listed by `audit()` from then on.
        Raises: VersionConflict when the latest version is not `expected`;
        BackendUnavailable.
        """

    def versions(self) -> list[GenerationRecord]:
        """Return every generation's record, oldest first.

        Raises: BackendUnavailable.
        """

    def append_audit(self, event: AuditEvent) -> None:
        """Append one audit event durably (events that are not changes: those go with
        their generation, through `write(..., event=)`).

        Raises: BackendUnavailable.
        """

    def audit(self, since: datetime | None = None, limit: int = 100) -> list[AuditEvent]:
        """Return up to limit events at or after since, newest first: the change events
        committed with generations and the appended ones, merged by time.

        Raises: BackendUnavailable.
        """

    def chain_versions(self) -> list[StoredVersion]:
        """Return every version as stored, read afresh (no cache), oldest first, for
        `pkisvc verify`: record, event and chain link as read back, the digests of its files
        (None when this token cannot read them), what the backend saw wrong itself.  A
        missing number has `record=None`.

        Raises: BackendUnavailable.
        """

    def chain_periods(self) -> list[StoredPeriod]:
        """Return every period of appended events as stored, read afresh, oldest first,
        each entry under the name it is stored by (its number).

        Raises: BackendUnavailable.
        """

    def prune_periods(self, before: str) -> list[str]:
        """Remove the appended events of whole periods older than `before` (never the
        newest period); return the periods removed, oldest first.

        Raises: PermissionDenied, BackendUnavailable.
        """

    def ping(self) -> None:
        """Check the backend can be read and written.

        Raises: BackendUnavailable.
        """

    def sessions(self) -> list[SessionRecord]:
        """Return the operator pages' sessions, oldest first (in the order they were added;
        a touch keeps the place), ended ones included until they are removed.

        Raises: BackendUnavailable.
        """

    def session(self, sha256: str) -> SessionRecord | None:
        """Return the session kept under sha256, or None.

        Raises: InvalidRequest (not 64 hex digits); BackendUnavailable.
        """

    def add_session(self, session: SessionRecord) -> None:
        """Keep a new session under session.sha256.

        Raises: Conflict when that hash is taken; InvalidRequest; BackendUnavailable.
        """

    def touch_session(self, sha256: str, seen: datetime) -> bool:
        """Record the session's last use; False when it is gone (never brings it back).

        Raises: InvalidRequest; BackendUnavailable.
        """

    def end_sessions(self, sha256s: Collection[str]) -> None:
        """Remove these sessions at once (those already gone are no error).

        Raises: InvalidRequest; BackendUnavailable.
        """

    def tokens(self) -> list[TokenRecord]:
        """Return the API tokens made by `pkisvc token create`.

        Raises: BackendUnavailable.
        """

    def put_token(self, token: TokenRecord) -> None:
        """Add a token.

        Raises: Conflict when the name is taken; BackendUnavailable.
        """

    def revoke_token(self, name: str) -> None:
        """Remove a token.

        Raises: NotFound; BackendUnavailable.
        """

    def minion(self, minion: str) -> MinionState | None:
        """Return one minion's delivery state, or None when it never received a pillar.

        Raises: InvalidRequest (not a minion id); BackendUnavailable.
        """

    def put_minion(self, state: MinionState, *, expected: MinionState | None) -> None:
        """Replace a minion's delivery state, if it is still `expected` (None: no state yet).

        Durable on return; one small write whatever the number of minions.
        Raises: VersionConflict when the stored state is not `expected`; InvalidRequest (not a
        minion id); BackendUnavailable.
        """

    def minions(self) -> list[MinionState]:
        """Return every minion's delivery state, by minion id.

        Raises: BackendUnavailable.
        """

    def forget_minion(self, minion: str) -> None:
        """Remove a minion's state (its deliveries and host reports) for good.

        Raises: NotFound when there is none; InvalidRequest (not a minion id);
        BackendUnavailable.
        """

    def identity(self) -> str | None:
        """Return the name the backend knows its caller by (Vault: the token's display
        name), or None when it knows none.

        Raises: BackendUnavailable.
        """


def checked_minion(minion: str) -> str:
    """Return minion when it is a minion id a backend may use as a file or secret name.

    Raises: InvalidRequest.
    """
    if not isinstance(minion, str) or not MINION_ID.fullmatch(minion):
        raise InvalidRequest(f"not a minion id: {str(minion)[:64]!r}")
    return minion


def checked_version(gen: StoredGeneration, expected: int | None, reserved: str) -> int:
    """The version a write of gen on top of `expected` makes, after the checks every backend
    owes its callers: the record says that version, and every file name is plain.

    Raises: InvalidRequest.
    """
    version = (expected or 0) + 1
    if gen.record.version != version:
        raise InvalidRequest(f"generation says version {gen.record.version}, expected {version}")
    for name in gen.files:
        if not valid_file_name(name) or name == reserved:
            raise InvalidRequest(f"not a storable file name: {name!r}")
    return version


# An appended event's place among change events: (time, the latest version its writer knew,
# 1, period, number); a change event's is (time, its version, 0, "", 0).  Within one second an
# event written after version n lists above n's change event and below n+1's.  Events from
# before the chain knew no version: taken as later than any change of their second.
Order = tuple[datetime, int, int, str, int]
UNORDERED = 2**62


def change_order(e: AuditEvent) -> Order:
    return (e.time, e.version or 0, 0, "", 0)


def appended_order(e: AuditEvent, after_version: int | None, period: str = "",
                   seq: int = 0) -> Order:
    return (e.time, UNORDERED if after_version is None else after_version, 1, period, seq)


def merged_events(changes: Iterable[AuditEvent], appended: Iterable[tuple[Order, AuditEvent]],
                  since: datetime | None, limit: int) -> list[AuditEvent]:
    """Merge two newest-first streams of events (the change events read from generations,
    newest version first, and the appended ones with their `Order`) into up to `limit`
    events at or after `since`, newest first.  Both streams are read lazily: only as far as
    the answer needs.
    """
    def bounded(events: Iterable[tuple[Order, AuditEvent]], versions: bool
                ) -> Iterator[tuple[Order, AuditEvent]]:
        for order, e in events:
            if since is not None and e.time < since:
                if versions:
                    return  # versions are made in time order: the rest is older still
                continue
            yield order, e

    def once(events: Iterable[tuple[Order, AuditEvent]]) -> Iterator[AuditEvent]:
        # An event written again under its id (a retry after a crash between an event and
        # the state it accounts for) is listed once: its newest copy, the one that stuck.
        ids: set[str] = set()
        for _, e in events:
            if e.id is not None:
                if e.id in ids:
                    continue
                ids.add(e.id)
            yield e

    merged = heapq.merge(bounded(((change_order(e), e) for e in changes), True),
                         bounded(appended, False), key=lambda p: p[0], reverse=True)
    return list(itertools.islice(once(merged), max(limit, 0)))


_DIGEST = re.compile(r"[0-9a-f]{64}")


def checked_digest(sha256: str) -> str:
    """Return sha256 if it is 64 lower-case hex digits (a session's key in a store).

    Raises: InvalidRequest.
    """
    if not isinstance(sha256, str) or not _DIGEST.fullmatch(sha256):
        raise InvalidRequest("a session is kept under 64 hex digits")
    return sha256
