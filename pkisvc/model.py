"""Records of generations and audit events, and the names the rest of pkisvc shares."""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Mapping

from pkisvc.errors import InvalidRequest

# Item -> (cert file, key file) as hosts name them (the seed's names).  The CA key is kept by
# the service as `ca.key` and is never a host file.
ITEMS = ("ca", "server", "kubecfg")
LEAVES = ("server", "kubecfg")
CERT_FILES = {"ca": "ca.crt", "server": "server.cert", "kubecfg": "kubecfg.crt"}
KEY_FILES = {"ca": "ca.key", "server": "server.key", "kubecfg": "kubecfg.key"}
TRUST_FILE = "trust.crt"  # the bundle hosts install as ca.crt
# Key-only items (a key pair, no certificate), kept as `<name>.key` (the signing key) and
# `<name>.pub` (every public key verifiers must accept, one PEM block each); certificate changes
# and rollbacks carry them over unchanged.  `sa`: the service-account token keys ([M]).
KEY_PAIRS: tuple[str, ...] = ("sa",)
SA_FILES = ("sa.key", "sa.pub")
HOST_FILES = ("ca.crt", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key", *SA_FILES)
DEFAULT_ROLES = {"master": HOST_FILES, "node": ("ca.crt",)}

KEY_TYPES = ("rsa-2048", "rsa-3072", "rsa-4096", "ecdsa-p256", "ecdsa-p384")
OPERATIONS = (
    "init", "rotate-ca", "rotate-server", "rotate-kubecfg", "rollback", "import", "renew",
    "ca-stage-trust", "ca-stage-switch", "ca-stage-finish", "ca-stage-abort",
    "sa-rotate", "sa-stage-publish", "sa-stage-switch", "sa-stage-finish", "sa-stage-abort",
)
SCOPES = ("read", "secrets", "audit", "admin", "report")

# A Salt minion id as the pillar endpoint accepts it; matched with fullmatch (a `$` would let a
# trailing newline through).
MINION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,252}")

# Limits on text that is stored (docs/decisions.md, "Text that enters the store").
REASON_MAX = 1024
ACTOR_MAX = 256
SANS_MAX = 100  # extra SANs of the server certificate, from a request or the settings
# Explicit bidi embeddings, overrides and isolates: they reorder how the rest of a line is
# shown (CVE-2021-42574), so a reason could make a table row read otherwise than it is.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# C0, DEL, C1 (Cc), lone surrogates (Cs: no UTF-8 for them), line and paragraph separators.
_REFUSED_CATEGORIES = frozenset({"Cc", "Cs", "Zl", "Zp"})


def _refused(c: str) -> bool:
    return c in _BIDI_CONTROLS or unicodedata.category(c) in _REFUSED_CATEGORIES


def check_text(what: str, value: str, limit: int) -> str:
    """Return value if it may be stored: printable Unicode, at most limit characters.

    Raises: InvalidRequest naming what and the first character refused (never the text).
    """
    if len(value) > limit:
        raise InvalidRequest(f"{what} is longer than {limit} characters")
    if not value.isprintable():  # isprintable() is True for none of the refused characters
        for i, c in enumerate(value):
            if _refused(c):
                raise InvalidRequest(f"{what} holds U+{ord(c):04X} at position {i} (control "
                                     "characters, lone surrogates and bidi overrides are "
                                     "refused)")
    return value


def visible(text: str) -> str:
    """Return text as a terminal or a page may show it: what check_text refuses is escaped.

    For records an older version stored: `\\n`, `\\x1b`, `\\ud800`, `\\u202e`.
    """
    if text.isprintable():
        return text
    return "".join(c.encode("unicode_escape").decode("ascii") if _refused(c) else c
                   for c in text)


# Names a backend may store: plain file names, nothing path-like.
_FILE_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def valid_file_name(name: str) -> bool:
    """Tell whether name is a plain stored-file name (no '/', '..', NUL, trailing newline)."""
    return bool(_FILE_NAME.fullmatch(name)) and ".." not in name


# Times: timezone-aware datetimes inside pkisvc; RFC 3339 text (UTC, whole seconds, `Z`) only
# where they leave or enter it (records' to_dict/from_dict, query parameters, tables, reports).

def parse_time(text: str) -> datetime:
    """Read an RFC 3339 time (`Z` or an offset); ValueError if it is not one or has no zone."""
    t = datetime.fromisoformat(text)
    if t.tzinfo is None:
        raise ValueError(f"time {text!r} needs a time zone (e.g. Z)")
    return instant(t)


def format_time(t: datetime) -> str:
    """Write t as RFC 3339 in UTC to the second, e.g. `2026-11-29T12:00:00Z`."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def instant(t: datetime) -> datetime:
    """t in UTC to the second, the precision records keep (so a record survives its text)."""
    if t.tzinfo is None:
        raise ValueError(f"time {t!r} has no time zone")
    return t.astimezone(UTC).replace(microsecond=0)


def _instants(record: Any, *names: str) -> None:
    """Make a frozen record's time fields UTC to the second (called from __post_init__)."""
    for name in names:
        t = getattr(record, name)
        if t is not None:
            object.__setattr__(record, name, instant(t))


@dataclass(frozen=True)
class ItemRecord:
    """What a generation records of one certificate."""

    fingerprint: str
    serial: str
    subject: str
    issuer: str
    sans: tuple[str, ...]
    not_before: datetime
    not_after: datetime

    def __post_init__(self) -> None:
        _instants(self, "not_before", "not_after")

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint, "serial": self.serial, "subject": self.subject,
            "issuer": self.issuer, "sans": list(self.sans),
            "not_before": format_time(self.not_before), "not_after": format_time(self.not_after),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ItemRecord:
        return cls(
            fingerprint=d["fingerprint"], serial=d["serial"], subject=d["subject"],
            issuer=d["issuer"], sans=tuple(d.get("sans", ())),
            not_before=parse_time(d["not_before"]), not_after=parse_time(d["not_after"]),
        )


@dataclass(frozen=True)
class GenerationRecord:
    """The facts of one generation; also what `versions` lists."""

    version: int
    parent: int | None
    created_at: datetime
    actor: str
    operation: str
    reason: str
    key_type: str
    items: Mapping[str, ItemRecord]
    trust: tuple[str, ...]
    source_version: int | None = None  # the version a rollback copied
    rotation: Mapping[str, Any] | None = None  # staged CA rotation state, if one is open
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _instants(self, "created_at")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version, "parent": self.parent,
            "created_at": format_time(self.created_at),
            "actor": self.actor, "operation": self.operation, "reason": self.reason,
            "key_type": self.key_type,
            "items": {k: v.to_dict() for k, v in self.items.items()},
            "trust": list(self.trust), "source_version": self.source_version,
            "rotation": dict(self.rotation) if self.rotation is not None else None,
        }
        d.update(self.extra)
        return d

    summary = to_dict

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> GenerationRecord:
        known = {"version", "parent", "created_at", "actor", "operation", "reason", "key_type",
                 "items", "trust", "source_version", "rotation"}
        return cls(
            version=int(d["version"]), parent=d.get("parent"),
            created_at=parse_time(d["created_at"]),
            actor=d["actor"], operation=d["operation"], reason=d.get("reason", ""),
            key_type=d.get("key_type", ""),
            items={k: ItemRecord.from_dict(v) for k, v in d["items"].items()},
            trust=tuple(d.get("trust", ())), source_version=d.get("source_version"),
            rotation=d.get("rotation"),
            extra={k: v for k, v in d.items() if k not in known},
        )


@dataclass(frozen=True)
class StoredGeneration:
    """One immutable generation: its record and its files (name -> bytes)."""

    record: GenerationRecord
    files: Mapping[str, bytes]

    @property
    def version(self) -> int:
        return self.record.version


@dataclass(frozen=True)
class AuditEvent:
    """Who did what, when, to which version (and for which minion); never key material."""

    time: datetime
    actor: str
    action: str
    version: int | None = None
    items: tuple[str, ...] = ()
    reason: str = ""
    remote_addr: str | None = None
    minion: str | None = None
    role: str | None = None
    # The same for every attempt at one change (a minion's delivery state): an event written
    # twice, by a retry after a crash or an outage, is listed once.  None: every event counts.
    id: str | None = None

    def __post_init__(self) -> None:
        _instants(self, "time")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "time": format_time(self.time), "actor": self.actor, "action": self.action,
            "version": self.version, "items": list(self.items), "reason": self.reason,
            "remote_addr": self.remote_addr, "minion": self.minion, "role": self.role,
        }
        if self.id is not None:
            d["id"] = self.id
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditEvent:
        return cls(
            time=parse_time(d["time"]), actor=d["actor"], action=d["action"],
            version=d.get("version"),
            items=tuple(d.get("items", ())), reason=d.get("reason", ""),
            remote_addr=d.get("remote_addr"), minion=d.get("minion"), role=d.get("role"),
            id=d.get("id"),
        )


@dataclass(frozen=True)
class SessionRecord:
    """An operator pages' session, kept under the sha256 of its id (only the browser holds it).

    It names the token it was opened with (`token_sha256`, which must still exist for the
    session to work) and that token's scopes; times are timezone-aware UTC.
    """

    sha256: str
    name: str
    token_sha256: str
    scopes: tuple[str, ...]
    created: datetime
    expires: datetime
    seen: datetime  # last use, as recorded (at most a minute or so behind)

    def __post_init__(self) -> None:
        _instants(self, "created", "expires", "seen")

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "name": self.name, "token_sha256": self.token_sha256,
                "scopes": list(self.scopes), "created": format_time(self.created),
                "expires": format_time(self.expires), "seen": format_time(self.seen)}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SessionRecord:
        return cls(sha256=d["sha256"], name=d["name"], token_sha256=d["token_sha256"],
                   scopes=tuple(d["scopes"]), created=parse_time(d["created"]),
                   expires=parse_time(d["expires"]), seen=parse_time(d["seen"]))


@dataclass(frozen=True)
class TokenRecord:
    """An API token made by `pkisvc token create`, kept only as its sha256."""

    name: str
    sha256: str
    scopes: tuple[str, ...]
    created_at: datetime | None  # None: a record written without one (shown as "")

    def __post_init__(self) -> None:
        _instants(self, "created_at")

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "scopes": list(self.scopes),
                "created_at": format_time(self.created_at) if self.created_at else ""}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenRecord:
        return cls(name=d["name"], sha256=d["sha256"], scopes=tuple(d["scopes"]),
                   created_at=parse_time(d["created_at"]) if d.get("created_at") else None)


@dataclass(frozen=True)
class InstalledFile:
    """One host file as a minion last reported it: its sha256 on disk (None: missing) and the
    newest version whose file has exactly those bytes (None: none pkisvc knows)."""

    sha256: str | None
    version: int | None

    def to_dict(self) -> dict[str, Any]:
        return {"sha256": self.sha256, "version": self.version}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> InstalledFile:
        v = d.get("version")
        return cls(sha256=d.get("sha256"), version=int(v) if v is not None else None)


@dataclass(frozen=True)
class Installed:
    """What a minion last reported of its disk ([Q]), through the Salt master.

    `version`: the newest version whose role files all equal what is on disk (None: none
    does); `state`, `result`: the state run that reported and whether it succeeded;
    `reporter`: the token that posted it (the master's).
    """

    reported: datetime
    state: str
    result: bool
    files: Mapping[str, InstalledFile]
    version: int | None
    reporter: str

    def __post_init__(self) -> None:
        _instants(self, "reported")

    def to_dict(self) -> dict[str, Any]:
        return {"reported": format_time(self.reported), "state": self.state,
                "result": self.result, "version": self.version, "reporter": self.reporter,
                "files": {n: f.to_dict() for n, f in sorted(self.files.items())}}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Installed:
        v = d.get("version")
        return cls(reported=parse_time(str(d["reported"])), state=str(d.get("state", "")),
                   result=bool(d.get("result")), version=int(v) if v is not None else None,
                   reporter=str(d.get("reporter", "")),
                   files={str(n): InstalledFile.from_dict(f)
                          for n, f in (d.get("files") or {}).items()})


@dataclass(frozen=True)
class MinionState:
    """What one minion holds: its role, the version, when it got it, when it last asked.

    Times are timezone-aware datetimes (UTC, whole seconds; RFC 3339 only in `to_dict` and
    `from_dict`).  `received` is when the minion first had this version (or this role);
    `asked` is its latest pillar request as stored (at most one touch interval old while it
    keeps asking).
    """

    minion: str
    role: str | None
    version: int
    received: datetime
    asked: datetime
    installed: Installed | None = None  # its last report of what is on disk ([Q])

    def __post_init__(self) -> None:
        _instants(self, "received", "asked")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "minion": self.minion, "role": self.role, "version": self.version,
            "received": format_time(self.received), "asked": format_time(self.asked)}
        if self.installed is not None:
            d["installed"] = self.installed.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MinionState:
        installed = d.get("installed")
        return cls(minion=str(d["minion"]), role=d.get("role"), version=int(d["version"]),
                   received=parse_time(str(d["received"])), asked=parse_time(str(d["asked"])),
                   installed=Installed.from_dict(installed) if installed else None)
