"""Appending to the per-period event chain, the same way on every backend.

A backend offers three primitives over its own storage (`Entries`): the last entry of the last
period, an entry by (period, number), and "create this entry unless that number is taken".
`append` then keeps the chain linear however many writers race: each entry is created at the
number after the tail it read, and a writer that finds its number taken reads that entry and
goes on after it.  A period ends with a `close` naming the next one (so no event lands in it
after the next opened) and the next opens with a checkpoint naming that close.
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

from pkisvc import chain
from pkisvc.errors import BackendUnavailable
from pkisvc.model import AuditEvent

ATTEMPTS = 200  # entries other writers may add under us before we give up

Entry = Mapping[str, Any]


class Entries(Protocol):
    def tail(self) -> Entry | None:
        """The last entry of the newest period, or None when there is none."""

    def entry(self, period: str, seq: int) -> Entry | None:
        """The entry at (period, seq), or None."""

    def create(self, period: str, seq: int, entry: Entry) -> bool:
        """Store entry at (period, seq) unless that number is taken; tell whether it did."""


def append(entries: Entries, key: bytes, event: AuditEvent, after_version: int | None
           ) -> Entry:
    """Append event at the chain's tail (in its own period, or the newest if that is later);
    return its entry.

    Raises: InvalidRequest (text that cannot be stored as sent); BackendUnavailable after
    ATTEMPTS lost races (or what the primitives raise).
    """
    chain.canonical(event.to_dict())  # text it cannot store as sent: refused, nothing written
    try:
        return _append(entries, key, event, after_version)
    except (KeyError, TypeError, ValueError):
        raise BackendUnavailable("the audit chain's last entry is not a chain entry (see "
                                 "`pkisvc verify`); event not written") from None


def _append(entries: Entries, key: bytes, event: AuditEvent, after_version: int | None
            ) -> Entry:
    day = chain.period_of(event.time)
    tail = entries.tail()
    for _ in range(ATTEMPTS):
        if tail is None:
            entry = chain.open_entry(key, day, None)
        elif tail["kind"] == "close":
            entry = chain.open_entry(key, str(tail["next"]), chain.tail_of(tail))
        elif day > tail["period"]:
            entry = chain.close_entry(key, tail["period"], tail["seq"] + 1, tail["mac"], day)
        else:
            entry = chain.event_entry(key, tail["period"], tail["seq"] + 1, event.to_dict(),
                                      tail["mac"], after_version)
        period, seq = entry["period"], entry["seq"]
        if entries.create(period, seq, entry):
            if entry["kind"] == "event":
                return entry
            tail = entry
            continue
        taken = entries.entry(period, seq)  # another writer's: go on after it
        tail = taken if taken is not None else entries.tail()
    raise BackendUnavailable("the audit chain kept moving under this writer; event not written")
