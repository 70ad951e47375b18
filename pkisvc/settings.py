"""Settings: defaults < YAML file < PKISVC_* environment variables, validated, frozen."""
from __future__ import annotations

import ipaddress
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from pkisvc.errors import ConfigError
from pkisvc.model import DEFAULT_ROLES, HOST_FILES, KEY_TYPES, SANS_MAX, SCOPES

log = logging.getLogger(__name__)

ENV_PREFIX = "PKISVC_"
_warned: set[str] = set()


@dataclass(frozen=True)
class CASettings:
    common_name: str
    days: int


@dataclass(frozen=True)
class ServerSettings:
    common_name: str
    sans: tuple[str, ...]
    days: int


@dataclass(frozen=True)
class KubecfgSettings:
    common_name: str
    organization: str
    days: int


@dataclass(frozen=True)
class VaultSettings:
    addr: str
    token: str | None
    token_file: str | None
    role_id: str | None
    secret_id: str | None
    secret_id_file: str | None
    mount: str
    prefix: str
    ca_cert: str | None
    timeout: float
    max_versions: int
    version_ttl: float = 0.5  # seconds a replica may serve a version without asking Vault
    stale_for: int = 3600  # seconds answers held in memory outlive a Vault outage


@dataclass(frozen=True)
class DeliverySettings:
    touch_interval: int  # seconds: how stale a minion's stored "last asked" may grow


@dataclass(frozen=True)
class AuditSettings:
    keep: int  # seconds appended events are kept (whole periods; 0: for ever)
    verify_interval: int  # seconds between checks of the audit chain (0: at start only)


@dataclass(frozen=True)
class HostsSettings:
    silent_after: int  # seconds without a report after which a host is flagged silent ([Q])
    expire_after: int  # seconds without any sign of it after which gates leave a host out


@dataclass(frozen=True)
class TLSSettings:
    cert: str | None
    key: str | None


@dataclass(frozen=True)
class UISettings:
    session_ttl: int  # seconds a login to the operator pages lasts at most
    session_idle: int  # seconds unused after which it ends (0: no idle limit)


@dataclass(frozen=True)
class TokenSpec:
    name: str
    sha256: str
    scopes: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    """Every setting pkisvc reads; build with `Settings.load()`."""

    cluster: str
    backend: str
    data_dir: Path
    bind: str
    workers: int
    key_type: str
    ca: CASettings
    server: ServerSettings
    kubecfg: KubecfgSettings
    service_cidr: ipaddress.IPv4Network | ipaddress.IPv6Network
    cluster_domain: str
    renew_before: int
    ca_warn_before: int
    roles: Mapping[str, tuple[str, ...]]
    tokens: tuple[TokenSpec, ...]
    tls: TLSSettings
    vault: VaultSettings
    metrics_scope: str | None
    auto_init: bool
    access_log: bool
    log_level: str
    delivery: DeliverySettings = DeliverySettings(touch_interval=600)
    source: str | None = None
    sa_overlap: int = 7 * 86400  # seconds phase 3 of a service-account rotation waits
    ui: UISettings = UISettings(session_ttl=8 * 3600, session_idle=3600)
    audit: AuditSettings = AuditSettings(keep=365 * 86400, verify_interval=3600)
    chain_key_file: Path | None = None  # None: <data_dir>/chain.key
    chain_witness_file: Path | None = None  # None: <data_dir>/chain.head
    hosts: HostsSettings = HostsSettings(silent_after=86400, expire_after=30 * 86400)

    @property
    def chain_key_path(self) -> Path:
        """The chain key's file (`chain_key_file`, else `<data_dir>/chain.key`)."""
        return self.chain_key_file or self.data_dir / "chain.key"

    @property
    def chain_witness_path(self) -> Path:
        """This host's chain witness (`chain_witness_file`, else `<data_dir>/chain.head`)."""
        return self.chain_witness_file or self.data_dir / "chain.head"

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None,
             env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> Settings:
        """Load settings from defaults, the YAML file, then the environment.

        Raises: ConfigError naming the offending key.
        """
        env = os.environ if env is None else env
        path = path or env.get("PKISVC_CONFIG") or None
        raw: dict[str, Any] = {k: f.default for k, f in _SCHEMA.items()}
        if env.get("VAULT_ADDR"):
            raw["vault.addr"] = env["VAULT_ADDR"]
        if env.get("VAULT_TOKEN"):
            raw["vault.token"] = env["VAULT_TOKEN"]
        if path:
            raw.update(_read_file(Path(path)))
        raw.update(_read_env(env))
        if overrides:
            for key, value in overrides.items():
                if key not in _SCHEMA:
                    raise ConfigError(f"unknown setting '{key}'")
                raw[key] = value
        values = {k: _SCHEMA[k].parse(k, v) for k, v in raw.items()}
        return _build(values, str(path) if path else None)


@dataclass(frozen=True)
class _Field:
    default: Any
    parse: Callable[[str, Any], Any]
    text: bool = False  # from the environment, take the text as it is (no YAML typing)


def _fail(key: str, why: str) -> ConfigError:
    return ConfigError(f"setting '{key}': {why}")


def _str(key: str, v: Any) -> str:
    if not isinstance(v, (str, int, float)) or isinstance(v, bool) or str(v) == "":
        raise _fail(key, "must be a non-empty string")
    return str(v)


def _opt_str(key: str, v: Any) -> str | None:
    return None if v is None or v == "" else _str(key, v)


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,62}")


def _name(key: str, v: Any) -> str:
    s = _str(key, v)
    if not _NAME.fullmatch(s) or ".." in s:
        raise _fail(key, f"{s!r} is not a plain name (letters, digits, '.', '_', '-')")
    return s


def _int(lo: int, hi: int) -> Callable[[str, Any], int]:
    def parse(key: str, v: Any) -> int:
        if isinstance(v, bool) or not isinstance(v, (int, str)):
            raise _fail(key, "must be an integer")
        try:
            n = int(v)
        except ValueError:
            raise _fail(key, f"{v!r} is not an integer") from None
        if not lo <= n <= hi:
            raise _fail(key, f"{n} is outside {lo}..{hi}")
        return n
    return parse


def _positive_float(key: str, v: Any) -> float:
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise _fail(key, f"{v!r} is not a number") from None
    if not 0 < f <= 3600:
        raise _fail(key, "must be between 0 and 3600 seconds")
    return f


def _ttl(key: str, v: Any) -> float:
    """Seconds, fractions allowed (`0.5`, `500ms`, `2s`); 0 is allowed."""
    text = str(v).strip() if not isinstance(v, bool) else ""
    scale = 0.001 if text.endswith("ms") else 1.0
    try:
        f = float(text.removesuffix("ms").removesuffix("s")) * scale
    except ValueError:
        raise _fail(key, f"{v!r} is not a number of seconds (0.5, 500ms, 2s)") from None
    if not 0 <= f <= 60:
        raise _fail(key, "must be between 0 and 60 seconds")
    return f


def _bool(key: str, v: Any) -> bool:
    if isinstance(v, bool):
        return v
    if isinstance(v, str) and v.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
        return v.lower() in ("1", "true", "yes", "on")
    raise _fail(key, f"{v!r} is not true or false")


_DURATION = re.compile(r"([0-9]+)([dhms]?)")


def parse_duration(key: str, v: Any) -> int:
    """Parse `<n>d`, `<n>h`, `<n>m`, `<n>s` or plain seconds into seconds."""
    m = _DURATION.fullmatch(str(v)) if not isinstance(v, bool) else None
    if not m:
        raise _fail(key, f"{v!r} is not a duration like 30d, 12h, 90m or 3600")
    return int(m.group(1)) * {"d": 86400, "h": 3600, "m": 60, "s": 1, "": 1}[m.group(2)]


def _duration(lo: int, hi: int) -> Callable[[str, Any], int]:
    def parse(key: str, v: Any) -> int:
        seconds = parse_duration(key, v)
        if not lo <= seconds <= hi:
            raise _fail(key, f"{seconds}s is outside {lo}s..{hi}s")
        return seconds
    return parse


def _key_type(key: str, v: Any) -> str:
    s = _str(key, v)
    if s not in KEY_TYPES:
        raise _fail(key, f"{s!r} is not one of {', '.join(KEY_TYPES)}")
    return s


def _cidr(key: str, v: Any) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(_str(key, v), strict=True)
    except ValueError as e:
        raise _fail(key, f"{v!r} is not a network in CIDR form ({e})") from None


_DNS_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def is_dns_name(s: str) -> bool:
    """Tell whether s is a DNS name a certificate may carry."""
    return 0 < len(s) <= 253 and all(_DNS_LABEL.fullmatch(p) for p in s.rstrip(".").split("."))


def parse_san(key: str, v: Any) -> str:
    """Normalise one SAN (IP or DNS name).

    Raises: ConfigError naming key.
    """
    s = _str(key, v).strip()
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        pass
    if not is_dns_name(s):
        raise _fail(key, f"{s!r} is neither an IP address nor a DNS name")
    return s.lower()


def parse_sans(key: str, v: Any) -> tuple[str, ...]:
    """Normalise a list of extra SANs, at most SANS_MAX of them.

    Raises: ConfigError naming key.
    """
    sans: tuple[str, ...] = _list(parse_san)(key, v)
    if len(sans) > SANS_MAX:
        raise _fail(key, f"holds {len(sans)} SANs; at most {SANS_MAX} are allowed")
    return sans


def _list(item: Callable[[str, Any], Any]) -> Callable[[str, Any], tuple[Any, ...]]:
    def parse(key: str, v: Any) -> tuple[Any, ...]:
        if isinstance(v, str):
            v = yaml.safe_load(v) if v.strip() else []
        if v is None:
            return ()
        if not isinstance(v, (list, tuple)):
            raise _fail(key, "must be a list")
        return tuple(item(key, x) for x in v)
    return parse


def _domain(key: str, v: Any) -> str:
    s = _str(key, v)
    if not is_dns_name(s):
        raise _fail(key, f"{s!r} is not a DNS domain")
    return s.lower()


def _bind(key: str, v: Any) -> str:
    s = _str(key, v)
    host, sep, port = s.rpartition(":")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 < int(port) < 65536:
        raise _fail(key, f"{s!r} is not HOST:PORT")
    return s


def _roles(key: str, v: Any) -> dict[str, tuple[str, ...]]:
    if isinstance(v, str):
        v = yaml.safe_load(v)
    if not isinstance(v, Mapping) or not v:
        raise _fail(key, "must map role names to lists of file names")
    out: dict[str, tuple[str, ...]] = {}
    for role, files in v.items():
        _name(f"{key}.{role}", role)
        if not isinstance(files, (list, tuple)):
            raise _fail(f"{key}.{role}", "must be a list of file names")
        for f in files:
            if f not in HOST_FILES:
                raise _fail(f"{key}.{role}", f"{f!r} is not one of {', '.join(HOST_FILES)}")
        out[str(role)] = tuple(files)
    return out


def _tokens(key: str, v: Any) -> tuple[TokenSpec, ...]:
    if isinstance(v, str):
        v = yaml.safe_load(v)
    if v is None:
        return ()
    if not isinstance(v, list):
        raise _fail(key, "must be a list of {name, sha256, scopes}")
    out = []
    for i, t in enumerate(v):
        where = f"{key}[{i}]"
        if not isinstance(t, Mapping) or set(t) - {"name", "sha256", "scopes"}:
            raise _fail(where, "must have exactly name, sha256 and scopes")
        name = _name(f"{where}.name", t.get("name"))
        digest = str(t.get("sha256", "")).lower()
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise _fail(f"{where}.sha256", "must be 64 hex digits (sha256 of the token)")
        scopes = t.get("scopes")
        if not isinstance(scopes, list) or not scopes or not set(scopes) <= set(SCOPES):
            raise _fail(f"{where}.scopes", f"must be a list drawn from {', '.join(SCOPES)}")
        out.append(TokenSpec(name, digest, tuple(scopes)))
    return tuple(out)


def _scope(key: str, v: Any) -> str | None:
    s = _opt_str(key, v)
    if s is not None and s not in SCOPES:
        raise _fail(key, f"{s!r} is not one of {', '.join(SCOPES)}")
    return s


def _log_level(key: str, v: Any) -> str:
    s = _str(key, v).lower()
    if s not in ("debug", "info", "warning", "error"):
        raise _fail(key, f"{s!r} is not debug, info, warning or error")
    return s


_SCHEMA: dict[str, _Field] = {
    "cluster": _Field("default", _name, text=True),
    "backend": _Field("files", _name, text=True),
    "data_dir": _Field("./pkisvc-data", _str, text=True),
    "bind": _Field("127.0.0.1:8800", _bind, text=True),
    "workers": _Field(2, _int(1, 64)),
    "key_type": _Field("rsa-2048", _key_type, text=True),
    "ca.common_name": _Field("kubernetes-ca", _str, text=True),
    "ca.days": _Field(3650, _int(1, 36500)),
    "server.common_name": _Field("kube-apiserver", _str, text=True),
    "server.sans": _Field([], parse_sans),
    "server.days": _Field(365, _int(1, 36500)),
    "kubecfg.common_name": _Field("kubecfg", _str, text=True),
    "kubecfg.organization": _Field("system:masters", _str, text=True),
    "kubecfg.days": _Field(365, _int(1, 36500)),
    "service_cidr": _Field("10.0.0.0/24", _cidr, text=True),
    "cluster_domain": _Field("cluster.local", _domain, text=True),
    "renew_before": _Field("30d", parse_duration, text=True),
    "ca_warn_before": _Field("180d", parse_duration, text=True),
    "roles": _Field({k: list(v) for k, v in DEFAULT_ROLES.items()}, _roles),
    "tokens": _Field([], _tokens),
    "tls.cert": _Field(None, _opt_str, text=True),
    "tls.key": _Field(None, _opt_str, text=True),
    "vault.addr": _Field("http://127.0.0.1:8200", _str, text=True),
    "vault.token": _Field(None, _opt_str, text=True),
    "vault.token_file": _Field(None, _opt_str, text=True),
    "vault.role_id": _Field(None, _opt_str, text=True),
    "vault.secret_id": _Field(None, _opt_str, text=True),
    "vault.secret_id_file": _Field(None, _opt_str, text=True),
    "vault.mount": _Field("secret", _name, text=True),
    "vault.prefix": _Field("pkisvc", _name, text=True),
    "vault.ca_cert": _Field(None, _opt_str, text=True),
    "vault.timeout": _Field(5, _positive_float),
    "vault.max_versions": _Field(1000, _int(1, 1_000_000)),
    "vault.version_ttl": _Field("500ms", _ttl, text=True),
    "vault.stale_for": _Field("1h", _duration(0, 30 * 86400), text=True),
    "metrics_scope": _Field(None, _scope, text=True),
    "auto_init": _Field(True, _bool),
    "access_log": _Field(False, _bool),
    "ui.session_ttl": _Field("8h", _duration(60, 30 * 86400), text=True),
    "ui.session_idle": _Field("1h", _duration(0, 30 * 86400), text=True),
    "log_level": _Field("info", _log_level, text=True),
    "sa.overlap": _Field("7d", parse_duration, text=True),
    "delivery.touch_interval": _Field("10m", parse_duration, text=True),
    "audit.keep": _Field("365d", _duration(0, 100 * 366 * 86400), text=True),
    "audit.verify_interval": _Field("1h", _duration(0, 366 * 86400), text=True),
    "chain_key_file": _Field(None, _opt_str, text=True),
    "chain_witness_file": _Field(None, _opt_str, text=True),
    "hosts.silent_after": _Field("1d", _duration(60, 365 * 86400), text=True),
    "hosts.expire_after": _Field("30d", _duration(3600, 3650 * 86400), text=True),
}
_SECTIONS = {k.split(".")[0] for k in _SCHEMA if "." in k}


def _read_file(path: Path) -> dict[str, Any]:
    try:
        doc = yaml.safe_load(path.read_text())
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"config file {path}{where}: not valid YAML") from None
    if doc is None:
        return {}
    if not isinstance(doc, Mapping):
        raise ConfigError(f"config file {path}: must be a mapping of settings")
    flat: dict[str, Any] = {}
    for key, value in doc.items():
        key = str(key)
        if key in _SECTIONS:
            if not isinstance(value, Mapping):
                raise ConfigError(f"setting '{key}': must be a mapping")
            for sub, v in value.items():
                dotted = f"{key}.{sub}"
                if dotted not in _SCHEMA:
                    raise ConfigError(f"unknown setting '{one_line(dotted)}' in {path}")
                flat[dotted] = v
        elif key in _SCHEMA:
            flat[key] = value
        else:
            raise ConfigError(f"unknown setting '{one_line(key)}' in {path}")
    return flat


def one_line(text: str) -> str:
    """A name read from a file as an error may show it: one line, control characters escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


def _read_env(env: Mapping[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, text in env.items():
        if not name.startswith(ENV_PREFIX) or name in ("PKISVC_CONFIG", "PKISVC_ACTOR"):
            continue
        key = name[len(ENV_PREFIX):].lower().replace("__", ".")
        field = _SCHEMA.get(key)
        if field is None:
            if name not in _warned:
                _warned.add(name)
                log.warning("ignoring unknown environment variable %s", name)
            continue
        if field.text:
            out[key] = text
        else:
            try:
                out[key] = yaml.safe_load(text)
            except yaml.YAMLError:
                raise ConfigError(f"setting '{key}' from {name}: not valid YAML") from None
    return out


def _build(v: dict[str, Any], source: str | None) -> Settings:
    tls = TLSSettings(v["tls.cert"], v["tls.key"])
    if (tls.cert is None) != (tls.key is None):
        raise ConfigError("setting 'tls': tls.cert and tls.key go together")
    return Settings(
        cluster=v["cluster"], backend=v["backend"],
        data_dir=Path(v["data_dir"]).expanduser().absolute(),
        bind=v["bind"], workers=v["workers"], key_type=v["key_type"],
        ca=CASettings(v["ca.common_name"], v["ca.days"]),
        server=ServerSettings(v["server.common_name"], v["server.sans"], v["server.days"]),
        kubecfg=KubecfgSettings(v["kubecfg.common_name"], v["kubecfg.organization"],
                                v["kubecfg.days"]),
        service_cidr=v["service_cidr"], cluster_domain=v["cluster_domain"],
        renew_before=v["renew_before"], ca_warn_before=v["ca_warn_before"],
        roles=v["roles"], tokens=v["tokens"], tls=tls,
        vault=VaultSettings(
            addr=v["vault.addr"], token=v["vault.token"], token_file=v["vault.token_file"],
            role_id=v["vault.role_id"], secret_id=v["vault.secret_id"],
            secret_id_file=v["vault.secret_id_file"],
            mount=v["vault.mount"], prefix=v["vault.prefix"], ca_cert=v["vault.ca_cert"],
            timeout=v["vault.timeout"], max_versions=v["vault.max_versions"],
            version_ttl=v["vault.version_ttl"], stale_for=v["vault.stale_for"]),
        metrics_scope=v["metrics_scope"], auto_init=v["auto_init"],
        access_log=v["access_log"], log_level=v["log_level"],
        delivery=DeliverySettings(touch_interval=v["delivery.touch_interval"]),
        source=source, sa_overlap=v["sa.overlap"],
        ui=UISettings(session_ttl=v["ui.session_ttl"], session_idle=v["ui.session_idle"]),
        audit=AuditSettings(keep=v["audit.keep"], verify_interval=v["audit.verify_interval"]),
        chain_key_file=(Path(v["chain_key_file"]).expanduser().absolute()
                        if v["chain_key_file"] else None),
        chain_witness_file=(Path(v["chain_witness_file"]).expanduser().absolute()
                            if v["chain_witness_file"] else None),
        hosts=HostsSettings(silent_after=v["hosts.silent_after"],
                            expire_after=v["hosts.expire_after"]),
    )
