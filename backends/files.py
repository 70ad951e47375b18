"""The default backend: a versioned tree on local disk, one file per generation.

    <data_dir>/generations/000001.gen   a whole generation in one file (`genfile`): record,
                                the change's event, the version's chain link, every file's
                                bytes; immutable, 0600 (dirs 0700)
    <data_dir>/generations/000001/  a generation as older pkisvc wrote it: {record.json,
                                event.json, chain.json, ca.crt, ...}; read, never written
    <data_dir>/current          the latest version, replaced atomically
    <data_dir>/events/<day>.jsonl  appended events (not changes), one chain entry a line
                                (`pkisvc.chain`), appended with fsync under .events.lock
    <data_dir>/audit.jsonl      appended events of stores older than the chain (read only)
    <data_dir>/tokens.json      hashed API tokens
    <data_dir>/minions.jsonl    minions' delivery states: one JSON line per change, the last
                                line of a minion wins; compacted (rewritten whole, renamed)
                                once it holds more than twice as many lines as minions;
                                `{"minion": id, "forgotten": true}` removes one
    <data_dir>/sessions.json    the operator pages' sessions, kept under their ids' hashes
    <data_dir>/tmp/             staging; whatever is left here after a crash is debris

A generation is one durable small-file write: written in tmp/, fsynced, hard-linked into
generations/ (a name that exists is never replaced: `VersionConflict`), generations/ fsynced,
all while the writer holds an exclusive `flock` on <data_dir>/.lock, so readers see a whole
generation or none.  A crash after that link but before `current` moved leaves a whole
generation ahead of `current`; the next writer (or a new process) rolls `current` forward to
it.  A change's audit event is inside its generation's file: one write commits version and
event together.  A store may hold both forms (older versions as directories); a version
stored as both is refused (`BackendUnavailable`) and named by `pkisvc verify`.

A minion's delivery state is one appended, fsynced line written under an exclusive `flock` on
<data_dir>/.minions.lock (so a state is replaced only if it is still the one the writer read,
and a compaction never drops a line).  Readers keep what they read and read only the lines
appended since; a line torn by a crash is skipped.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import re
import secrets
import shutil
import threading
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Collection, Iterator, TypeVar

from pkisvc import chain
from pkisvc.backends import genfile, periods
from pkisvc.backends.base import (
    Order,
    appended_order,
    checked_digest,
    checked_minion,
    checked_version,
    merged_events,
)
from pkisvc.backends.genfile import CHAIN, EVENT, RECORD
from pkisvc.errors import (
    BackendUnavailable,
    Conflict,
    InvalidRequest,
    NotFound,
    VersionConflict,
)
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

_PERIOD_FILE = re.compile(r"([0-9]{8})\.jsonl")
_GEN_NAME = re.compile(r"([0-9]{6,})(" + re.escape(genfile.SUFFIX) + ")?")  # file | older dir
FORGOTTEN = "forgotten"  # a minions.jsonl line that removes a minion (`hosts forget`)
COMPACT_SLACK = 1000  # minion-state lines beyond twice the minions before a compaction
T = TypeVar("T")


class FilesBackend:
    """Generations as directories under one data dir."""

    name = "files"

    def __init__(self, root: str | os.PathLike[str],
                 chain_key: chain.ChainKey | None = None, witness: Witness | None = None
                 ) -> None:
        self.root = Path(root)
        self.chain_key = chain_key or chain.ChainKey(self.root / "chain.key")
        # This host's witness of the chain's newest (pkisvc.witness); with the default key,
        # the default file beside it.
        self.witness = witness or (Witness(self.root / "chain.head") if chain_key is None
                                   else None)
        if self.witness is not None:
            self.witness.store = "files"
        self._events_dir = self.root / "events"
        self._links: dict[int, dict[str, Any] | None] = {}
        self._gens = self.root / "generations"
        self._tmp = self.root / "tmp"
        self._current = self.root / "current"
        self._audit = self.root / "audit.jsonl"
        self._tokens = self.root / "tokens.json"
        self._cache: dict[int, StoredGeneration] = {}
        self._records: dict[int, GenerationRecord] = {}
        self._events: dict[int, AuditEvent | None] = {}  # None: a generation without event.json
        self._recovered = False
        self._sessions = self.root / "sessions.json"
        self._lists: dict[Path, tuple[tuple[int, int, int], list[Any]]] = {}
        self._current_cache: tuple[tuple[int, int], int] | None = None
        self._minions = self.root / "minions.jsonl"
        self._table = _MinionTable()
        self._table_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> FilesBackend:
        return cls(settings.data_dir, chain.ChainKey(settings.chain_key_path),
                   Witness(settings.chain_witness_path))

    def __repr__(self) -> str:
        return f"FilesBackend({str(self.root)!r})"

    # --- plumbing ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _io(self, what: str) -> Iterator[None]:
        """Turn OS errors into BackendUnavailable, naming the data dir, not the content."""
        try:
            yield
        except OSError as e:
            raise BackendUnavailable(
                f"files backend at {self.root}: cannot {what}: {e.strerror or e}") from None
        except _Damaged as e:
            raise BackendUnavailable(f"files backend at {self.root}: cannot {what}: {e} "
                                     "(`pkisvc verify` checks the store)") from None

    def _ensure_dirs(self) -> None:
        for d in (self.root, self._gens, self._tmp):
            if not d.is_dir():
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the cross-process writer lock (and recover from a crash once)."""
        self._ensure_dirs()
        fd = os.open(self.root / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self._recover()
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the flock

    def _recover(self) -> None:
        """Clear staging debris; roll `current` forward to a whole generation a crash left."""
        for entry in os.scandir(self._tmp):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)  # an older pkisvc's staging
            else:
                os.unlink(entry.path)
        for entry in os.scandir(self.root):
            if entry.name.startswith((".current.", ".ping.")):
                os.unlink(entry.path)
        try:
            current = self._read_current()
        except ValueError:
            current = None
        if current is None:  # none yet, or torn by a crash: the newest stored decides
            newest = max(self._stored_versions(), default=None)
        else:  # only the versions right after it can be ahead (every writer recovers first)
            newest = current
            while self._stored(newest + 1):
                newest += 1
        if newest is not None and newest != current:
            self._set_current(newest)
        self._recovered = True

    def _stored_versions(self) -> list[int]:
        """The version numbers in generations/ (files and directories), ascending."""
        try:
            entries = list(os.scandir(self._gens))
        except FileNotFoundError:
            return []
        found = set()
        for entry in entries:
            m = _GEN_NAME.fullmatch(entry.name)
            if m is None or entry.name != self._gen_name(int(m[1]), bool(m[2])):
                continue  # debris, or a name pkisvc never writes
            if entry.is_file() if m[2] else entry.is_dir():
                found.add(int(m[1]))
        return sorted(found)

    def _read_current(self) -> int | None:
        # Asked on every request; `current` is only ever replaced (new inode), so a stat
        # tells whether the number read last time still holds.
        try:
            st = os.stat(self._current)
        except FileNotFoundError:
            return None
        stamp = (st.st_ino, st.st_mtime_ns)
        cached = self._current_cache
        if cached is not None and cached[0] == stamp:
            return cached[1]
        with open(self._current, "rb") as f:
            version = int(f.read().strip())
        self._current_cache = (stamp, version)
        return version

    def _set_current(self, version: int) -> None:
        # Not fsynced: the generation's file is what is durable.  After a crash `current`
        # may lag, or be unreadable; recovery puts it on the newest whole generation.
        tmp = self.root / f".current.{os.getpid()}.{secrets.token_hex(4)}"
        _write_file(tmp, f"{version}\n".encode(), sync=False)
        os.replace(tmp, self._current)

    def _gen_name(self, version: int, as_file: bool = True) -> str:
        return f"{version:06d}{genfile.SUFFIX if as_file else ''}"

    def _gen_file(self, version: int) -> Path:
        return self._gens / self._gen_name(version)

    def _gen_dir(self, version: int) -> Path:
        """Where an older pkisvc kept version `version` (a directory of files)."""
        return self._gens / self._gen_name(version, as_file=False)

    def _stored(self, version: int) -> bool:
        return os.path.isfile(self._gen_file(version)) or os.path.isdir(self._gen_dir(version))

    def _twice(self, version: int) -> str | None:
        """What is wrong when version is stored both as a file and as a directory."""
        if os.path.isfile(self._gen_file(version)) and os.path.isdir(self._gen_dir(version)):
            return (f"stored twice, as {self._gen_name(version)} and as the directory "
                    f"{self._gen_name(version, as_file=False)}/ (written around pkisvc)")
        return None

    def _load(self, version: int, *, files: bool = True, twice: bool = False
              ) -> genfile.Packed:
        """Version as stored now (no cache): its file, or the directory an older pkisvc
        wrote (there, files=False reads only record, event and link).

        Raises: FileNotFoundError (no such version); _Damaged (unreadable; stored twice,
        unless `twice` allows it).
        """
        path = self._gen_file(version)
        try:
            with open(path, "rb") as f:
                data = f.read() if files else genfile.read_index(f)
        except FileNotFoundError:
            return genfile.read_directory(self._gen_dir(version), files=files)
        why = None if twice else self._twice(version)
        if why is not None:
            raise _Damaged(version, why)
        try:
            return genfile.decode(data, files=files)
        except genfile.Unreadable as e:
            raise _Damaged(version, f"its file {path.name} is unreadable ({e})") from None

    # --- generations -------------------------------------------------------------------

    def latest(self) -> int | None:
        with self._io("read the current version"):
            if not self._recovered and self._tmp.exists():
                with self._locked():
                    pass
            try:
                return self._read_current()
            except ValueError:
                # A crash left `current` torn; the newest whole generation decides.
                with self._locked():
                    return self._read_current()

    def read(self, version: int | None = None) -> StoredGeneration:
        v = self.latest() if version is None else version
        if v is None:
            raise NotFound("the store is empty: run `pkisvc init`")
        if not isinstance(v, int) or v < 1:
            raise NotFound(f"no version {v}")
        if v in self._cache:
            return self._cache[v]
        if version is not None and v > (self.latest() or 0):
            raise NotFound(f"no version {v}")
        with self._io(f"read version {v}"):
            try:
                packed = self._load(v)
            except FileNotFoundError:
                raise NotFound(f"no version {v}") from None
        gen = StoredGeneration(self._remember(v, packed), packed.files)
        self._cache[v] = gen
        return gen

    def _remember(self, v: int, packed: genfile.Packed) -> GenerationRecord:
        """Keep what one read of version v gave: its record, link and event (one read serves
        `read`, `versions` and `audit` alike)."""
        record = self._records[v] = GenerationRecord.from_dict(packed.record)
        self._links.setdefault(v, dict(packed.link) if packed.link is not None else None)
        if v not in self._events:
            with contextlib.suppress(KeyError, TypeError, ValueError):  # `audit` says why
                self._events[v] = (AuditEvent.from_dict(packed.event)
                                   if packed.event is not None else None)
        return record

    def write(self, gen: StoredGeneration, *, expected: int | None,
              event: AuditEvent | None = None) -> int:
        version = checked_version(gen, expected, RECORD)
        for reserved in (EVENT, CHAIN):  # kept out: an older pkisvc's directory layout
            if reserved in gen.files:
                raise InvalidRequest(f"not a storable file name: {reserved!r}")
        with self._io(f"write version {version}"), self._locked():
            current = self._read_current()
            if current != expected:
                raise VersionConflict(
                    f"the store is at version {current}, the writer built on {expected}")
            record = gen.record.to_dict()
            stored_event = event.to_dict() if event is not None else None
            prev = self._link(expected) if expected else None
            key, unchained = self.chain_key.for_write(chained=prev is not None,
                                                      unchained=expected or 0)
            link = chain.link_version(key, record, stored_event, chain.file_digests(gen.files),
                                      prev["mac"] if prev else None, unchained)
            data = genfile.encode(genfile.Packed(record, stored_event, link, gen.files))
            # One durable small-file write: the file's fsync, then its name's (the link and
            # generations/ in one fsync).  A link never replaces a name, as a rename would.
            tmp = self._tmp / f"{self._gen_name(version)}.{os.getpid()}.{secrets.token_hex(4)}"
            _write_file(tmp, data)
            try:
                os.link(tmp, self._gen_file(version))
            except FileExistsError:
                raise VersionConflict(f"version {version} already exists") from None
            finally:
                os.unlink(tmp)
            _fsync_dir(self._gens)
            self._set_current(version)
        self._cache[version] = gen
        self._records[version] = gen.record
        self._events[version] = event
        self._links[version] = link
        if self.witness is not None:  # after the store: a crash here leaves it behind
            self.witness.saw_version(key, version, link, self._stored_mac)
        return version

    def _stored_mac(self, version: int) -> str | None:
        """Version's link MAC as stored now (no cache), for the witness."""
        try:
            mac = (self._load(version, files=False).link or {}).get("mac")
        except (OSError, _Damaged):
            return None
        return str(mac) if mac is not None else None

    def _link(self, version: int) -> dict[str, Any] | None:
        """A version's chain link (None: written before the chain)."""
        if version not in self._links:
            try:
                self._remember(version, self._load(version, files=False))
            except FileNotFoundError:
                self._links[version] = None
        return self._links[version]

    def chain_versions(self) -> list[chain.StoredVersion]:
        out = []
        with self._io("read versions"):
            for v in self._stored_versions():
                out.append(self._stored_version(v))
        return out

    def _stored_version(self, v: int) -> chain.StoredVersion:
        twice = self._twice(v)
        problems = (twice,) if twice is not None else ()
        try:
            packed = self._load(v, twice=True)
        except FileNotFoundError:
            return chain.StoredVersion(v, None, problems=problems)
        except _Damaged as e:
            return chain.StoredVersion(v, None, problems=(*problems, e.why))
        return chain.StoredVersion(v, packed.record, packed.event, packed.link,
                                   chain.file_digests(packed.files), problems)

    def versions(self) -> list[GenerationRecord]:
        latest = self.latest()
        if latest is not None and len(self._records) >= latest:
            known = [self._records[v] for v in range(1, latest + 1) if v in self._records]
            if len(known) == latest:  # every record read before: no directory listing
                return known
        out = []
        with self._io("list versions"):
            for v in self._stored_versions():
                if latest is None or v > latest:
                    break
                rec = self._records.get(v)
                if rec is None:
                    rec = self._remember(v, self._load(v, files=False))
                out.append(rec)
        return out

    # --- audit -------------------------------------------------------------------------

    def append_audit(self, event: AuditEvent) -> None:
        with self._io("append to the audit log"), self._events_locked():
            entries = _PeriodFiles(self._events_dir)
            tail = entries.tail()
            after = self.latest()
            key, _ = self.chain_key.for_write(chained=tail is not None, unchained=after or 0)
            entry = periods.append(entries, key, event, after)
        if self.witness is not None:
            self.witness.saw_entry(key, entry, entries.entry)

    @contextlib.contextmanager
    def _events_locked(self) -> Iterator[None]:
        self._ensure_dirs()
        self._events_dir.mkdir(mode=0o700, exist_ok=True)
        with self._flocked(".events.lock"):
            yield

    def audit(self, since: datetime | None = None, limit: int = 100) -> list[AuditEvent]:
        with self._io("read the audit log"):
            latest = self.latest() or 0
            return merged_events(self._change_events(latest), self._appended(since), since,
                                 limit)

    def _appended(self, since: datetime | None) -> Iterator[tuple[Order, AuditEvent]]:
        """Appended events, newest first: the chained periods, then the log from before."""
        floor = chain.period_of(since) if since is not None else ""
        for period in reversed(_period_names(self._events_dir)):
            if period < floor:
                return  # a period holds no event of a later day than its own
            lines = (self._events_dir / f"{period}.jsonl").read_bytes().splitlines()
            for raw in reversed(lines):
                entry = _parsed(raw)
                if entry is not None and entry.get("kind") == "event":
                    try:
                        e = AuditEvent.from_dict(entry["event"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    yield appended_order(e, entry.get("v"), period, entry["seq"]), e
        try:
            lines = self._audit.read_bytes().splitlines()
        except FileNotFoundError:
            return
        for e in _appended(lines):
            yield appended_order(e, None), e

    def chain_periods(self) -> list[chain.StoredPeriod]:
        with self._io("read the audit log"):
            out = []
            for period in _period_names(self._events_dir):
                lines = (self._events_dir / f"{period}.jsonl").read_bytes().splitlines()
                entries = [e for e in map(_parsed, lines) if e is not None]
                out.append(chain.StoredPeriod(period, [(str(i), e)
                                                       for i, e in enumerate(entries)]))
            return out

    def prune_periods(self, before: str) -> list[str]:
        with self._io("prune the audit log"), self._events_locked():
            gone = [p for p in _period_names(self._events_dir)[:-1] if p < before]
            for p in gone:
                os.unlink(self._events_dir / f"{p}.jsonl")
            if gone:
                _fsync_dir(self._events_dir)
            return gone

    def _change_events(self, latest: int) -> Iterator[AuditEvent]:
        """The change events of generations, newest first (read once each, then cached)."""
        for v in range(latest, 0, -1):
            if v in self._events:
                event = self._events[v]
            else:
                try:
                    stored = self._load(v, files=False).event
                except FileNotFoundError:
                    stored = None
                # None: written before change events were (its event is in audit.jsonl)
                event = AuditEvent.from_dict(stored) if stored is not None else None
                self._events[v] = event
            if event is not None:
                yield event

    # --- health ------------------------------------------------------------------------

    def ping(self) -> None:
        with self._io("reach the data dir"):
            self._ensure_dirs()
            probe = self.root / f".ping.{os.getpid()}.{secrets.token_hex(4)}"
            _write_file(probe, b"", sync=False)
            with contextlib.suppress(FileNotFoundError):  # a recovering writer may beat us
                os.unlink(probe)
            self._read_current()

    # --- the operator pages' sessions --------------------------------------------------

    def sessions(self) -> list[SessionRecord]:
        with self._io("read sessions"):
            return self._load_list(self._sessions, SessionRecord.from_dict)

    def session(self, sha256: str) -> SessionRecord | None:
        checked_digest(sha256)
        return next((s for s in self.sessions() if s.sha256 == sha256), None)

    def add_session(self, session: SessionRecord) -> None:
        checked_digest(session.sha256)
        with self._io("write sessions"), self._locked():
            held = self._load_list(self._sessions, SessionRecord.from_dict)
            if any(s.sha256 == session.sha256 for s in held):
                raise Conflict("that session exists")
            # Not fsynced: a session lost in a crash only means logging in again.
            self._save_list(self._sessions, [*held, session], sync=False)

    def touch_session(self, sha256: str, seen: datetime) -> bool:
        checked_digest(sha256)
        with self._io("write sessions"), self._locked():
            held = self._load_list(self._sessions, SessionRecord.from_dict)
            if not any(s.sha256 == sha256 for s in held):
                return False
            self._save_list(self._sessions, [dataclasses.replace(s, seen=seen)
                                             if s.sha256 == sha256 else s for s in held],
                            sync=False)
            return True

    def end_sessions(self, sha256s: Collection[str]) -> None:
        gone = {checked_digest(h) for h in sha256s}
        with self._io("write sessions"), self._locked():
            held = self._load_list(self._sessions, SessionRecord.from_dict)
            kept = [s for s in held if s.sha256 not in gone]
            if len(kept) != len(held):
                self._save_list(self._sessions, kept)  # durable: an ended session stays ended

    # --- tokens ------------------------------------------------------------------------

    def _load_list(self, path: Path, parse: Callable[[Any], T]) -> list[T]:
        # Asked on every request: re-read only when the file was replaced.
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return []
        stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        cached = self._lists.get(path)
        if cached is None or cached[0] != stamp:
            data: list[dict[str, Any]] = json.loads(path.read_bytes())
            cached = self._lists[path] = (stamp, [parse(t) for t in data])
        return list(cached[1])

    def _save_list(self, path: Path, items: list[Any], *, sync: bool = True) -> None:
        """Replace the file at path with items (their to_dict()s); call with the lock held."""
        tmp = self._tmp / f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}"
        _write_file(tmp, json.dumps([t.to_dict() for t in items], indent=1).encode(), sync=sync)
        os.replace(tmp, path)
        if sync:
            _fsync_dir(self.root)

    def _load_tokens(self) -> list[TokenRecord]:
        return self._load_list(self._tokens, TokenRecord.from_dict)

    def _save_tokens(self, tokens: list[TokenRecord]) -> None:
        self._save_list(self._tokens, tokens)

    def tokens(self) -> list[TokenRecord]:
        with self._io("read tokens"):
            return self._load_tokens()

    def put_token(self, token: TokenRecord) -> None:
        with self._io("write tokens"), self._locked():
            tokens = self._load_tokens()
            if any(t.name == token.name for t in tokens):
                raise Conflict(f"a token named {token.name!r} exists")
            self._save_tokens([*tokens, token])

    def revoke_token(self, name: str) -> None:
        with self._io("write tokens"), self._locked():
            tokens = self._load_tokens()
            kept = [t for t in tokens if t.name != name]
            if len(kept) == len(tokens):
                raise NotFound(f"no token named {name!r}")
            self._save_tokens(kept)

    # --- minions' delivery states ----------------------------------------------------------

    @contextlib.contextmanager
    def _minions_locked(self) -> Iterator[None]:
        with self._flocked(".minions.lock"):
            yield

    @contextlib.contextmanager
    def _flocked(self, name: str) -> Iterator[None]:
        """Hold the exclusive lock file `name` under the data dir."""
        self._ensure_dirs()
        fd = os.open(self.root / name, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _read_minions(self) -> dict[str, MinionState]:
        """Bring the table up to date with the file: only the lines appended since last time."""
        with self._table_lock:
            t = self._table
            try:
                fd = os.open(self._minions, os.O_RDONLY)
            except FileNotFoundError:
                self._table = _MinionTable()
                return self._table.states
            try:
                st = os.fstat(fd)
                if st.st_ino != t.inode or st.st_size < t.offset:  # compacted: read it whole
                    t = self._table = _MinionTable(inode=st.st_ino)
                if st.st_size > t.offset:
                    data = os.pread(fd, st.st_size - t.offset, t.offset)
                    end = data.rfind(b"\n") + 1  # a line still being written: next time
                    for raw in data[:end].splitlines():
                        t.lines += 1
                        try:
                            d = json.loads(raw)
                            if d.get(FORGOTTEN):
                                t.states.pop(str(d["minion"]), None)
                                continue
                            state = MinionState.from_dict(d)
                        except (ValueError, KeyError, TypeError, AttributeError):
                            continue  # a line torn by a crash mid-append
                        t.states[state.minion] = state
                    t.offset += end
            finally:
                os.close(fd)
            return t.states

    def minion(self, minion: str) -> MinionState | None:
        checked_minion(minion)
        with self._io("read minion states"):
            return self._read_minions().get(minion)

    def minions(self) -> list[MinionState]:
        """By minion id; the same list object while the file is unchanged (cheap to compare)."""
        with self._io("read minion states"):
            self._read_minions()
            with self._table_lock:
                t = self._table
                if t.listed is None or t.listed[0] != t.offset:
                    t.listed = (t.offset, [t.states[m] for m in sorted(t.states)])
                return t.listed[1]

    def put_minion(self, state: MinionState, *, expected: MinionState | None) -> None:
        checked_minion(state.minion)
        line = (json.dumps(state.to_dict(), separators=(",", ":")) + "\n").encode()
        with self._io("write a minion state"), self._minions_locked():
            held = self._read_minions().get(state.minion)
            if held != expected:
                raise VersionConflict(f"minion {state.minion}: its state changed meanwhile")
            new = not self._minions.exists()
            _append_line(self._minions, line)
            if new:
                _fsync_dir(self.root)
            states = self._read_minions()
            if self._table.lines > 2 * len(states) + COMPACT_SLACK:
                self._compact_minions(states)

    def forget_minion(self, minion: str) -> None:
        checked_minion(minion)
        line = (json.dumps({"minion": minion, FORGOTTEN: True}) + "\n").encode()
        with self._io("write a minion state"), self._minions_locked():
            if minion not in self._read_minions():
                raise NotFound(f"no state of minion {minion}")
            _append_line(self._minions, line)

    def _compact_minions(self, states: dict[str, MinionState]) -> None:
        """Rewrite the state file with one line per minion (under the minions lock)."""
        for entry in os.scandir(self.root):
            if entry.name.startswith(".minions-table."):  # a compaction a crash cut short
                os.unlink(entry.path)
        with self._table_lock:
            data = b"".join((json.dumps(states[m].to_dict(), separators=(",", ":")) + "\n"
                             ).encode() for m in sorted(states))
        tmp = self.root / f".minions-table.{os.getpid()}.{secrets.token_hex(4)}"
        _write_file(tmp, data)
        os.replace(tmp, self._minions)
        _fsync_dir(self.root)

    def identity(self) -> str | None:
        return None


class _Damaged(Exception):
    """A stored version that cannot be read as one (see `why`)."""

    def __init__(self, version: int, why: str) -> None:
        super().__init__(f"version {version}: {why}")
        self.why = why


class _PeriodFiles:
    """`periods.Entries` over events/<day>.jsonl; used with .events.lock held, so every
    create lands (no other writer can take the number)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def tail(self) -> dict[str, Any] | None:
        names = _period_names(self.root)
        return _last_entry(self.root / f"{names[-1]}.jsonl") if names else None

    def entry(self, period: str, seq: int) -> dict[str, Any] | None:
        try:
            lines = (self.root / f"{period}.jsonl").read_bytes().splitlines()
        except FileNotFoundError:
            return None
        entries = [e for e in map(_parsed, lines) if e is not None]
        return entries[seq] if seq < len(entries) else None

    def create(self, period: str, seq: int, entry: Any) -> bool:
        path = self.root / f"{period}.jsonl"
        new = not path.exists()
        _append_line(path, (json.dumps(entry, separators=(",", ":"), ensure_ascii=False)
                            + "\n").encode())
        if new:
            _fsync_dir(self.root)
        return True


def _period_names(root: Path) -> list[str]:
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    return sorted(m.group(1) for m in map(_PERIOD_FILE.fullmatch, names) if m)


def _parsed(raw: bytes) -> dict[str, Any] | None:
    try:
        entry = json.loads(raw)
    except ValueError:
        return None  # a line torn by a crash mid-append
    return entry if isinstance(entry, dict) else None


def _last_entry(path: Path, span: int = 65536) -> dict[str, Any] | None:
    """The last whole entry of a period file (reads only its end)."""
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        while True:
            start = max(0, size - span)
            f.seek(start)
            lines = f.read(size - start).splitlines()
            if start > 0:
                lines = lines[1:]  # maybe cut
            for raw in reversed(lines):
                entry = _parsed(raw)
                if entry is not None:
                    return entry
            if start == 0:
                return None
            span *= 4


class _MinionTable:
    """What a process has read of minions.jsonl: which file, how far, and the states."""

    def __init__(self, inode: int | None = None) -> None:
        self.inode = inode
        self.offset = 0
        self.lines = 0
        self.states: dict[str, MinionState] = {}
        self.listed: tuple[int, list[MinionState]] | None = None  # (offset, by minion id)


def _append_line(path: Path, line: bytes) -> None:
    """Append one line durably (fsync); a line a crash left torn is closed first."""
    # One write() on an O_APPEND descriptor: concurrent writers never interleave.
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = b"\n" + line  # close a line torn by a crash; it is skipped on read
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_file(path: Path, data: bytes, *, sync: bool = True) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _appended(lines: list[bytes]) -> Iterator[AuditEvent]:
    for raw in reversed(lines):
        try:
            yield AuditEvent.from_dict(json.loads(raw))
        except (ValueError, KeyError, TypeError):
            continue  # a line torn by a crash mid-append
