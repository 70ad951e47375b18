"""Records of generations and audit events, and the names the rest of pkisvc shares."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

# Item -> (cert file, key file) as hosts name them (the seed's names).  The CA key is kept by
# the service as `ca.key` and is never a host file.
ITEMS = ("ca", "server", "kubecfg")
LEAVES = ("server", "kubecfg")
CERT_FILES = {"ca": "ca.crt", "server": "server.cert", "kubecfg": "kubecfg.crt"}
KEY_FILES = {"ca": "ca.key", "server": "server.key", "kubecfg": "kubecfg.key"}
TRUST_FILE = "trust.crt"  # the bundle hosts install as ca.crt
# Key-only items (a key pair, no certificate), kept as `<name>.key` and `<name>.pub`.  None yet
# (the service-account key comes next); certificate changes carry them over unchanged.
KEY_PAIRS: tuple[str, ...] = ()
HOST_FILES = ("ca.crt", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key")
DEFAULT_ROLES = {"master": HOST_FILES, "node": ("ca.crt",)}

KEY_TYPES = ("rsa-2048", "rsa-3072", "rsa-4096", "ecdsa-p256", "ecdsa-p384")
OPERATIONS = (
    "init", "rotate-ca", "rotate-server", "rotate-kubecfg", "rollback", "import", "renew",
    "ca-stage-trust", "ca-stage-switch", "ca-stage-finish", "ca-stage-abort",
)
SCOPES = ("read", "secrets", "audit", "admin")

# A Salt minion id as the pillar endpoint accepts it; matched with fullmatch (a `$` would let a
# trailing newline through).
MINION_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,252}")

# Names a backend may store: plain file names, nothing path-like.
_FILE_NAME = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")


def valid_file_name(name: str) -> bool:
    """Tell whether name is a plain stored-file name (no '/', '..', NUL)."""
    return bool(_FILE_NAME.match(name)) and ".." not in name


@dataclass(frozen=True)
class ItemRecord:
    """What a generation records of one certificate."""

    fingerprint: str
    serial: str
    subject: str
    issuer: str
    sans: tuple[str, ...]
    not_before: str
    not_after: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "fingerprint": self.fingerprint, "serial": self.serial, "subject": self.subject,
            "issuer": self.issuer, "sans": list(self.sans),
            "not_before": self.not_before, "not_after": self.not_after,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ItemRecord:
        return cls(
            fingerprint=d["fingerprint"], serial=d["serial"], subject=d["subject"],
            issuer=d["issuer"], sans=tuple(d.get("sans", ())),
            not_before=d["not_before"], not_after=d["not_after"],
        )


@dataclass(frozen=True)
class GenerationRecord:
    """The facts of one generation; also what `versions` lists."""

    version: int
    parent: int | None
    created_at: str
    actor: str
    operation: str
    reason: str
    key_type: str
    items: Mapping[str, ItemRecord]
    trust: tuple[str, ...]
    source_version: int | None = None  # the version a rollback copied
    rotation: Mapping[str, Any] | None = None  # staged CA rotation state, if one is open
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "version": self.version, "parent": self.parent, "created_at": self.created_at,
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
            version=int(d["version"]), parent=d.get("parent"), created_at=d["created_at"],
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

    time: str
    actor: str
    action: str
    version: int | None = None
    items: tuple[str, ...] = ()
    reason: str = ""
    remote_addr: str | None = None
    minion: str | None = None
    role: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "time": self.time, "actor": self.actor, "action": self.action,
            "version": self.version, "items": list(self.items), "reason": self.reason,
            "remote_addr": self.remote_addr, "minion": self.minion, "role": self.role,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> AuditEvent:
        return cls(
            time=d["time"], actor=d["actor"], action=d["action"], version=d.get("version"),
            items=tuple(d.get("items", ())), reason=d.get("reason", ""),
            remote_addr=d.get("remote_addr"), minion=d.get("minion"), role=d.get("role"),
        )


@dataclass(frozen=True)
class TokenRecord:
    """An API token made by `pkisvc token create`, kept only as its sha256."""

    name: str
    sha256: str
    scopes: tuple[str, ...]
    created_at: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "sha256": self.sha256, "scopes": list(self.scopes),
                "created_at": self.created_at}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TokenRecord:
        return cls(name=d["name"], sha256=d["sha256"], scopes=tuple(d["scopes"]),
                   created_at=d.get("created_at", ""))


@dataclass(frozen=True)
class MinionState:
    """What one minion holds: its role, the version, when it got it, when it last asked.

    Times are RFC 3339 (UTC, seconds).  `received` is when the minion first had this version
    (or this role); `asked` is its latest pillar request as stored (at most one touch interval
    old while it keeps asking).
    """

    minion: str
    role: str | None
    version: int
    received: str
    asked: str

    def to_dict(self) -> dict[str, Any]:
        return {"minion": self.minion, "role": self.role, "version": self.version,
                "received": self.received, "asked": self.asked}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> MinionState:
        return cls(minion=str(d["minion"]), role=d.get("role"), version=int(d["version"]),
                   received=str(d["received"]), asked=str(d["asked"]))
