"""The audit chain: HMAC links over versions and appended events, and the walk that checks it.

Every version's record carries a link: an HMAC, keyed with the chain key (a file on the
service host that the storage policy never sees), over the record, its change event and the
sha256 of each stored file as they are stored, and over the previous version's link.
Appended events (key reads, tokens, refused logins, exports) are chained per period (a UTC
day): a period opens with a checkpoint naming the tail of the one before it and, when the
next period starts, ends with a `close` naming it.  Retention drops whole old periods; the
checkpoint of the oldest kept period still says what came before, so a pruned range can be
told from a purged one.

Pure, but for the key file (`ChainKey`): entries in, a `Report` out.  Backends build links
with `link_version` and entries with `open_entry`/`event_entry`/`close_entry`; `verify` names
the first break.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

from pkisvc.errors import ConfigError, InvalidRequest

KEY_BYTES = 32
PERIOD_FORMAT = "%Y%m%d"  # one period per UTC day; names sort as time does


def period_of(t: datetime) -> str:
    """The period (UTC day, `YYYYMMDD`) an event of time t opens at the earliest."""
    return t.strftime(PERIOD_FORMAT)


def canonical(obj: Any) -> bytes:
    """The bytes a MAC is taken over: sorted-key compact JSON, UTF-8.

    Raises: InvalidRequest for a string that cannot be stored as sent (a lone surrogate:
    OpenBao would keep U+FFFD instead, and the digest of what is read back would differ).
    """
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequest(f"text holding U+{ord(text[e.start]):04X} cannot be stored "
                             "(lone surrogates are refused)") from None


def file_digests(files: Mapping[str, bytes]) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


class ChainKey:
    """The chain key: 32 random bytes in a 0600 file, made when the chain starts.

    The file is JSON: `{"key": "<hex>", "unchained": N}` — N is how many versions the store
    held when the key was made (they predate the chain).  Every replica of one store needs the
    same file.  `path=None` keeps a key in memory only (tests and tools that never verify).
    """

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._loaded: tuple[bytes, int] | None = None
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ChainKey({str(self.path)!r})"

    def exists(self) -> bool:
        return self._loaded is not None or (self.path is not None and self.path.exists())

    def load(self) -> tuple[bytes, int]:
        """Return (key, unchained versions).

        Raises: ConfigError when the file is missing or is not a chain key.
        """
        with self._lock:
            if self._loaded is None:
                if self.path is None:
                    raise ConfigError("no chain key (chain_key_file) is configured")
                self._loaded = self._read()
            return self._loaded

    def _read(self) -> tuple[bytes, int]:
        assert self.path is not None
        try:
            doc = json.loads(self.path.read_bytes())
            key = bytes.fromhex(doc["key"])
            unchained = int(doc.get("unchained", 0))
        except FileNotFoundError:
            raise ConfigError(f"chain key file {self.path} is missing (every replica of "
                              "a store needs the same one)") from None
        except OSError as e:
            raise ConfigError(f"chain key file {self.path}: {e.strerror}") from None
        except (ValueError, KeyError, TypeError):
            raise ConfigError(f"chain key file {self.path} is not a pkisvc chain key") from None
        if len(key) != KEY_BYTES or unchained < 0:
            raise ConfigError(f"chain key file {self.path} is not a pkisvc chain key")
        return key, unchained

    def create(self, unchained: int) -> tuple[bytes, int]:
        """Make the key (0600) if no file exists; return the key in force (another process
        may have made it a moment before)."""
        with self._lock:
            if self._loaded is not None:
                return self._loaded
            key = secrets.token_bytes(KEY_BYTES)
            if self.path is None:
                self._loaded = (key, unchained)
                return self._loaded
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            body = json.dumps({"key": key.hex(), "unchained": unchained}).encode() + b"\n"
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                self._loaded = self._read()
                return self._loaded
            try:
                os.write(fd, body)
                os.fsync(fd)
            finally:
                os.close(fd)
            self._loaded = (key, unchained)
            return self._loaded

    def for_write(self, *, chained: bool, unchained: int) -> tuple[bytes, int]:
        """(key, unchained versions) to link a new entry with.  Made here when the store
        holds no chained entry yet (a new store, or one written before the chain); refused
        when it does — a replica without the others' key would fork the chain.

        Raises: ConfigError.
        """
        if self.path is not None and (self.exists() or chained):
            return self.load()
        return self.create(unchained)


def _mac(key: bytes, kind: str, body: Any) -> str:
    return hmac.new(key, kind.encode() + b"\x00" + canonical(body), hashlib.sha256).hexdigest()


# --- versions ----------------------------------------------------------------------------

def link_version(key: bytes, record: Mapping[str, Any], event: Mapping[str, Any] | None,
                 files: Mapping[str, str], prev: str | None, unchained: int
                 ) -> dict[str, Any]:
    """The link a version's record carries: the files' digests, the previous link's MAC, and
    the MAC over all of it with the record and event (as they are stored)."""
    link: dict[str, Any] = {"prev": prev, "files": dict(files), "unchained": unchained}
    link["mac"] = _mac(key, "version", {"record": record, "event": event, **link})
    return link


@dataclass(frozen=True)
class StoredVersion:
    """One version as a backend keeps it, for the walk.  `files` are the digests of the
    material as read back (None: not readable with this token); `problems` are what the
    backend saw itself (a record rewritten, material missing)."""

    version: int
    record: Mapping[str, Any] | None  # None: no record under this number
    event: Mapping[str, Any] | None = None
    link: Mapping[str, Any] | None = None
    files: Mapping[str, str] | None = None
    problems: tuple[str, ...] = ()


# --- appended events, per period ------------------------------------------------------------

def _entry(key: bytes, period: str, seq: int, body: dict[str, Any]) -> dict[str, Any]:
    entry = {"period": period, "seq": seq, **body}
    entry["mac"] = _mac(key, "entry", entry)
    return entry


def open_entry(key: bytes, period: str, after: Mapping[str, Any] | None) -> dict[str, Any]:
    """Entry 0 of a period: the checkpoint naming the previous period's last entry
    (`{"period", "seq", "mac"}`), or None for the first period.  Deterministic: two writers
    opening one period write the same entry."""
    return _entry(key, period, 0, {"kind": "open",
                                   "after": dict(after) if after is not None else None})


def event_entry(key: bytes, period: str, seq: int, event: Mapping[str, Any], prev: str,
                after_version: int | None) -> dict[str, Any]:
    """An appended event; `v` is the latest version its writer knew (orders it against
    change events of the same second)."""
    return _entry(key, period, seq, {"kind": "event", "event": dict(event),
                                     "v": after_version, "prev": prev})


def close_entry(key: bytes, period: str, seq: int, prev: str, next_period: str
                ) -> dict[str, Any]:
    """The last entry of a period: no event lands in it after this; `next` opens next."""
    return _entry(key, period, seq, {"kind": "close", "next": next_period, "prev": prev})


def tail_of(entry: Mapping[str, Any]) -> dict[str, Any]:
    return {"period": entry["period"], "seq": entry["seq"], "mac": entry["mac"]}


@dataclass(frozen=True)
class StoredPeriod:
    """One period's entries as stored: (name, entry or None when unreadable), in order."""

    period: str
    entries: Sequence[tuple[str, Mapping[str, Any] | None]]


# --- the walk ------------------------------------------------------------------------------

@dataclass
class Report:
    """What `verify` found: `breaks` in chain order (the first is the first break)."""

    versions: int = 0
    events: int = 0
    periods: int = 0
    breaks: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.breaks

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "first_break": self.breaks[0] if self.breaks else None,
                "breaks": self.breaks, "notes": self.notes, "versions": self.versions,
                "events": self.events, "periods": self.periods}


def verify(key: bytes, unchained: int, versions: Sequence[StoredVersion],
           periods: Sequence[StoredPeriod], *, prunable_before: str | None) -> Report:
    """Walk both chains; every break found, in order.

    unchained: how many versions predate the chain (from the key file).  prunable_before:
    periods before this one may be gone by retention (`audit.keep`); a gap after it is a
    purged range.
    """
    report = Report()
    _walk_versions(key, unchained, versions, report)
    _walk_periods(key, periods, prunable_before, report)
    return report


def _walk_versions(key: bytes, unchained: int, versions: Sequence[StoredVersion],
                   report: Report) -> None:
    prev: str | None = None
    expected = 1
    for v in versions:
        report.versions += 1
        where = f"version {v.version}"
        if v.version != expected:
            report.breaks.append(f"versions {expected}..{v.version - 1} are missing "
                                 "(deleted or purged)")
            prev = None
        expected = v.version + 1
        for problem in v.problems:
            report.breaks.append(f"{where}: {problem}")
        if v.record is None:
            prev = None
            continue
        if v.link is None:
            if v.version > unchained:
                report.breaks.append(f"{where}: carries no chain link (written around "
                                     "pkisvc, or its link was removed)")
            prev = None
            continue
        link = dict(v.link)
        body = {"record": v.record, "event": v.event, "prev": link.get("prev"),
                "files": link.get("files"), "unchained": link.get("unchained")}
        if not hmac.compare_digest(str(link.get("mac", "")), _mac(key, "version", body)):
            report.breaks.append(f"{where}: record, event or link altered, or written around "
                                 "pkisvc (its MAC does not match the chain key)")
        elif link.get("unchained") != unchained:
            report.breaks.append(f"{where}: the store's chain started at another version "
                                 f"(the key file says {unchained} unchained)")
        elif link.get("prev") != prev and (v.version > unchained + 1 or link.get("prev")):
            report.breaks.append(f"{where}: does not follow version {v.version - 1} "
                                 "(inserted, or the one before was replaced)")
        if v.files is not None and link.get("files") != dict(v.files):
            report.breaks.append(f"{where}: its stored files differ from those it was "
                                 "committed with")
        prev = link.get("mac")
    if unchained:
        report.notes.append(f"versions 1..{unchained} predate the chain (not covered)")
    if versions and all(v.files is None for v in versions if v.record is not None):
        report.notes.append("material not checked (this token cannot read it)")


def _walk_periods(key: bytes, periods: Sequence[StoredPeriod], prunable_before: str | None,
                  report: Report) -> None:
    tail: dict[str, Any] | None = None  # the previous period's last entry
    closed_to: str | None = None  # what that period's close named as next
    for i, p in enumerate(periods):
        report.periods += 1
        where = f"events of {p.period}"
        prev: str | None = None
        last: Mapping[str, Any] | None = None
        for n, (name, entry) in enumerate(p.entries):
            at = f"{where}, entry {name}"
            if entry is None:
                report.breaks.append(f"{at}: unreadable")
                prev = None
                continue
            body = {k: v for k, v in entry.items() if k != "mac"}
            if not hmac.compare_digest(str(entry.get("mac", "")), _mac(key, "entry", body)):
                report.breaks.append(f"{at}: altered or inserted (its MAC does not match "
                                     "the chain key)")
                prev, last = None, None
                continue
            if entry.get("period") != p.period or not _numbered(name, entry.get("seq")):
                report.breaks.append(f"{at}: moved here from {entry.get('period')} entry "
                                     f"{entry.get('seq')}")
            elif entry.get("seq") != n:
                report.breaks.append(f"{at}: entries before it are missing")
            kind = entry.get("kind")
            if n == 0:
                if kind != "open":
                    report.breaks.append(f"{at}: the period's checkpoint is missing")
                else:
                    _check_opening(entry, p.period, tail, closed_to, i == 0, prunable_before,
                                   report)
            elif kind == "open" or entry.get("prev") != prev:
                report.breaks.append(f"{at}: does not follow the entry before it (one was "
                                     "removed or inserted)")
            if last is not None and last.get("kind") == "close":
                report.breaks.append(f"{at}: written after its period was closed")
            if kind == "event":
                report.events += 1
            prev, last = entry.get("mac"), entry
        is_last = i == len(periods) - 1
        if last is not None and last.get("kind") != "close" and not is_last:
            report.breaks.append(f"{where}: its last entries are missing (the period was "
                                 "never closed before the next one opened)")
        tail = tail_of(last) if last is not None and "mac" in last else None
        closed_to = str(last.get("next")) if last is not None and last.get("kind") == "close" \
            else None


def _numbered(name: str, seq: Any) -> bool:
    """Whether an entry stored under name (its number, maybe zero-padded) says that number."""
    return name.isdigit() and isinstance(seq, int) and int(name) == seq


def _check_opening(entry: Mapping[str, Any], period: str, tail: Mapping[str, Any] | None,
                   closed_to: str | None, first: bool, prunable_before: str | None,
                   report: Report) -> None:
    at = f"events of {period}"
    after = entry.get("after")
    if first:
        if after is None:
            return
        gone = str(after.get("period"))
        if prunable_before is not None and gone < prunable_before:
            report.notes.append(f"events up to {gone} were pruned (audit.keep)")
        else:
            report.breaks.append(f"{at}: the events before it (up to {gone}) are gone, "
                                 "within audit.keep (a purged range)")
        return
    if after is None or tail is None or dict(after) != dict(tail):
        named = after.get("period") if isinstance(after, Mapping) else None
        report.breaks.append(f"{at}: does not follow the period before it (it names "
                             f"{named}; a period was removed, cut short or inserted)")
    elif closed_to is not None and closed_to != period:
        report.breaks.append(f"{at}: the period before it was closed for {closed_to}")
