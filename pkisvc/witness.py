"""The witness: the newest of the audit chain this host saw, kept outside the store.

The chain (`pkisvc.chain`) proves that each stored entry was made with the chain key and
follows the one before it; it cannot tell that the newest entries were removed (the latest
versions with `head` moved back, the last events of the current period): what is left is a
whole, shorter chain.  The witness is a small file on the service host (`chain_witness_file`,
default `<data_dir>/chain.head`, 0600) naming the highest version this host saw and its link,
and the newest event entry (period, number, link), MAC'ed with the chain key.

It is written after the store (a process killed in between leaves it behind, which is fine),
in one write of one sector under a lock file shared by the host's processes, and only ever
raised: by this host's own commits and appends when they follow what it names, and by a
check that held.  A check compares: a store ending before what the witness
names, or holding another link there, is a break.  A witness is never a reason to refuse a
write.  Each host (each data_dir) keeps its own; one that is behind is simply raised.
"""
from __future__ import annotations

import dataclasses
import fcntl
import hmac
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

from pkisvc.chain import StoredPeriod, StoredVersion, _mac
from pkisvc.errors import PkiError

log = logging.getLogger(__name__)

SIZE = 512  # bytes of the witness file: one sector, written whole


class Damaged(Exception):
    """The witness file is there but is not one this chain key made."""


class Lost(Damaged):
    """No witness of this store: the file is not JSON at all (what a power cut can leave of a
    write never fsynced, see `Witness._write`), or it is another store's (a `migrate` on this
    host, one data_dir for two backends).  Taken as a first run, not as a forgery."""


@dataclass(frozen=True)
class Head:
    """The newest of each chain a host saw: a version and its link's MAC, an event entry
    (period, number) and its MAC.  None where it saw none."""

    version: int | None = None
    version_mac: str | None = None
    period: str | None = None
    seq: int | None = None
    entry_mac: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def ahead_in_versions(self, version: int) -> bool:
        return self.version is None or version > self.version

    def ahead_in_events(self, period: str, seq: int) -> bool:
        return self.period is None or (period, seq) > (self.period, self.seq or 0)


def tips(versions: Sequence[StoredVersion], periods: Sequence[StoredPeriod]) -> Head:
    """The newest linked version and the newest entry of a store as read for a check."""
    head = Head()
    linked = [v for v in versions if v.record is not None and v.link]
    if linked:
        last = linked[-1]
        head = dataclasses.replace(head, version=last.version,
                                   version_mac=str((last.link or {}).get("mac")))
    for p in reversed(periods):
        numbered = [(int(n), e) for n, e in p.entries if n.isdigit() and e is not None]
        if numbered:
            seq, entry = numbered[-1]
            return dataclasses.replace(head, period=p.period, seq=seq,
                                       entry_mac=str(entry.get("mac")))
    return head


def compare(head: Head, versions: Sequence[StoredVersion], periods: Sequence[StoredPeriod],
            *, prunable_before: str | None, where: str) -> list[str]:
    """The breaks between what this host saw (head) and the store as read after it."""
    breaks = []
    if head.version is not None:
        stored = {v.version: v for v in versions if v.record is not None}
        top = max(stored, default=0)
        if head.version > top:
            breaks.append(f"newest versions removed: store ends at {top}, this host saw "
                          f"{head.version} ({where})")
        elif head.version in stored and \
                (stored[head.version].link or {}).get("mac") != head.version_mac:
            breaks.append(f"version {head.version} is not the one this host saw (removed "
                          f"and written again; {where})")
    if head.period is not None:
        breaks.extend(_compare_events(head, periods, prunable_before, where))
    return breaks


def _compare_events(head: Head, periods: Sequence[StoredPeriod], prunable_before: str | None,
                    where: str) -> Iterator[str]:
    period = next((p for p in periods if p.period == head.period and p.entries), None)
    if period is None:
        if prunable_before is None or str(head.period) >= prunable_before:
            yield (f"newest events removed: no events of {head.period} are stored, this host "
                   f"saw entry {head.seq} ({where})")
        return  # else pruned by audit.keep
    numbered = {int(n): e for n, e in period.entries if n.isdigit()}
    if head.seq not in numbered:
        yield (f"newest events removed: events of {head.period} end at entry "
               f"{max(numbered)}, this host saw entry {head.seq} ({where})")
    elif (numbered[head.seq] or {}).get("mac") != head.entry_mac:
        yield (f"events of {head.period}, entry {head.seq} is not the one this host saw "
               f"(removed and written again; {where})")


class Witness:
    """The witness file of one host (see the module docstring)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.store = ""  # which store it witnesses: set by the backend that writes it
        self._lock = threading.Lock()
        self._said: set[str] = set()
        # The file's bytes as this process last read (and checked) or wrote them, and what
        # they say: the same bytes read again are not parsed nor their MAC checked again.
        self._known: tuple[bytes, bytes, str, Head] | None = None  # (bytes, key, store, head)

    def __repr__(self) -> str:
        return f"Witness({str(self.path)!r})"

    def read(self, key: bytes) -> Head | None:
        """The head this host saw; None when there is no witness yet.

        Raises: Lost (not JSON, or another store's); Damaged (unreadable, not a witness, or
        its MAC does not match the key).
        """
        try:
            with self._flocked():  # never half of a write (it is rewritten in place)
                return self._read(key)
        except Damaged:
            raise
        except OSError as e:  # the lock file
            raise Damaged(f"the witness {self.path} cannot be read: {e.strerror}") from None

    def _read(self, key: bytes) -> Head | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as e:
            raise Damaged(f"the witness {self.path} cannot be read: {e.strerror}") from None
        known = self._known
        if known is not None and known[0] == raw and known[1] == key and known[2] == self.store:
            return known[3]
        try:
            doc = json.loads(raw)
        except ValueError:
            raise Lost(f"the witness {self.path} is torn (a crash during its write?)") from None
        try:
            body = {f.name: doc[f.name] for f in dataclasses.fields(Head)}
            head = Head(**body)
            store = doc["store"]
        except (KeyError, TypeError):
            raise Damaged(f"the witness {self.path} is damaged (not a pkisvc witness; remove "
                          "it to start a new one)") from None
        if not hmac.compare_digest(str(doc.get("mac", "")),
                                   _mac(key, "witness", {**body, "store": store})):
            raise Damaged(f"the witness {self.path} is forged or damaged (its MAC does not "
                          "match the chain key; remove it to start a new one)")
        if store != self.store:
            raise Lost(f"the witness {self.path} is of another store ({store})")
        self._known = (raw, key, store, head)
        return head

    def saw_version(self, key: bytes, version: int, link: Mapping[str, Any],
                    stored: Callable[[int], str | None]) -> None:
        """This process committed `version` with `link`: raise the witness to it if it follows
        what the witness names (`stored(n)`: version n's link MAC as stored, read afresh)."""
        def change(cur: Head) -> Head | None:
            if not cur.ahead_in_versions(version):
                return None
            if cur.version is not None:
                before = link.get("prev") if version == cur.version + 1 else stored(cur.version)
                if before != cur.version_mac:
                    self._kept(f"version {cur.version}")
                    return None
            return dataclasses.replace(cur, version=version, version_mac=str(link["mac"]))
        self._update(key, change)

    def saw_entry(self, key: bytes, entry: Mapping[str, Any],
                  stored: Callable[[str, int], Mapping[str, Any] | None]) -> None:
        """This process appended `entry`: raise the witness to it if it follows what the
        witness names (`stored(period, seq)`: that entry as stored, read afresh)."""
        period, seq = str(entry["period"]), int(entry["seq"])

        def change(cur: Head) -> Head | None:
            if not cur.ahead_in_events(period, seq):
                return None
            if cur.period is not None and cur.seq is not None:
                if (period, seq) == (cur.period, cur.seq + 1):
                    before = entry.get("prev")
                else:
                    before = (stored(cur.period, cur.seq) or {}).get("mac")
                if before != cur.entry_mac:
                    self._kept(f"events of {cur.period}, entry {cur.seq}")
                    return None
            return dataclasses.replace(cur, period=period, seq=seq,
                                       entry_mac=str(entry["mac"]))
        self._update(key, change)

    def raise_to(self, key: bytes, seen: Head) -> None:
        """A check held on a store whose newest are `seen`: raise the witness to them."""
        def change(cur: Head) -> Head | None:
            new = cur
            if seen.version is not None and cur.ahead_in_versions(seen.version):
                new = dataclasses.replace(new, version=seen.version,
                                          version_mac=seen.version_mac)
            if seen.period is not None and cur.ahead_in_events(seen.period, seen.seq or 0):
                new = dataclasses.replace(new, period=seen.period, seq=seen.seq,
                                          entry_mac=seen.entry_mac)
            return new
        self._update(key, change)

    def _kept(self, what: str) -> None:
        # The store no longer holds what this host saw: keep the witness (the evidence the
        # next check names) rather than follow the store.
        self._say("kept", logging.ERROR, "audit chain witness %s: the store's %s is not the one "
                  "this host saw; witness kept (see `pkisvc verify`)", self.path, what)

    def _update(self, key: bytes, change: Callable[[Head], Head | None]) -> None:
        """Read, change and replace the witness under the host's lock; never raises (a
        witness not written is one behind)."""
        try:
            with self._lock, self._flocked():
                try:
                    cur = self._read(key)
                except Lost as e:
                    self._say("torn", logging.WARNING, "%s; a new one is started", e)
                    cur = None
                except Damaged as e:
                    self._say("damaged", logging.ERROR, "%s; not updated", e)
                    return
                if cur is None:
                    self._say("new", logging.INFO, "no audit chain witness at %s yet: this "
                              "host starts one now (removals before it cannot be told)",
                              self.path)
                new = change(cur or Head())
                if new is not None and new != cur:
                    self._write(key, new)
        except (OSError, PkiError) as e:
            text = e.strerror if isinstance(e, OSError) else e.message
            self._say("unwritten", logging.WARNING, "audit chain witness %s not updated: %s",
                      self.path, text)

    def _write(self, key: bytes, head: Head) -> None:
        body = {**head.to_dict(), "store": self.store}
        data = json.dumps({**body, "mac": _mac(key, "witness", body)}).encode().ljust(
            SIZE - 1) + b"\n"
        # Rewritten in place, one sector, under the lock, not fsynced: a new file renamed over
        # it, or an fsync, would cost about 0.5 ms on every commit and appended event here.  A
        # killed process cannot tear one write(); after a power cut the witness may be behind
        # (harmless) or, rarely, torn — read as lost (`Lost`), not as forged.
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.pwrite(fd, data, 0)
            if os.fstat(fd).st_size != len(data):
                os.ftruncate(fd, len(data))
        finally:
            os.close(fd)
        self._known = (data, key, self.store, head)

    def _flocked(self) -> Any:
        return _Flock(self.path.with_name(self.path.name + ".lock"))

    def _say(self, what: str, level: int, msg: str, *args: Any) -> None:
        """Log each kind of trouble once per process (a write path must not flood)."""
        if what not in self._said:
            self._said.add(what)
            log.log(level, msg, *args)


class _Flock:
    """An exclusive flock on a lock file, shared by the host's processes."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = -1

    def __enter__(self) -> None:
        try:
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:  # its directory first (the data dir, usually there)
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        os.close(self.fd)  # closing the descriptor releases the flock
