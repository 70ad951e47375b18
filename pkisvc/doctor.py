"""Host-side checks: the seed's "Troubleshooting and debugging" section as a command.

`run` reads the files the formula lays down (DESIGN §5) under a root directory and compares
them with each other, with the clock it is given, and optionally with what the store says the
host should hold.  It never prints key material: messages name files, fingerprints and dates.
The paths are those `kubernetes.cert.configured` recorded in ROOT/etc/kubernetes-cert/
lookup.json (a pillar `lookup` override included); the formula's defaults where there is none.
"""
from __future__ import annotations

import base64
import binascii
import json
import os
import subprocess
import urllib.error
import urllib.request
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from pkisvc import pki
from pkisvc.errors import InvalidMaterial, InvalidRequest
from pkisvc.model import GenerationRecord, format_time

PASS, WARN, FAIL = "PASS", "WARN", "FAIL"

SRV = "/srv/kubernetes"
CA = f"{SRV}/ca.crt"
LOCAL_CA = "/usr/local/share/ca-certificates/kubernetes-ca.crt"
SYMLINK = "/etc/ssl/certs/kubernetes.pem"
BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
KUBELET_CA = "/var/lib/kubelet/ca.crt"
LEAVES = {"server": (f"{SRV}/server.cert", f"{SRV}/server.key",
                     ExtendedKeyUsageOID.SERVER_AUTH),
          "kubecfg": (f"{SRV}/kubecfg.crt", f"{SRV}/kubecfg.key",
                      ExtendedKeyUsageOID.CLIENT_AUTH)}
ROLES = ("master", "node")
LOOKUP_FILE = "/etc/kubernetes-cert/lookup.json"  # written by kubernetes.cert.lookup

APPLY = "salt-call state.apply kubernetes.cert.configured"
REFRESH = f"salt-call saltutil.refresh_pillar && {APPLY}"
UPDATE_CA = f"update-ca-certificates (or: {APPLY})"


@dataclass(frozen=True)
class Check:
    """One finding: which check, on which host path, its status, what was seen, the fix."""

    check: str
    path: str
    status: str
    message: str
    fix: str = ""

    def to_dict(self) -> dict[str, str]:
        return {"check": self.check, "path": self.path, "status": self.status,
                "message": self.message, "fix": self.fix}


@dataclass(frozen=True)
class Expected:
    """What the store says a host should hold: its latest version, and every fingerprint it
    ever recorded with the newest version that holds it."""

    version: int
    trust: tuple[str, ...]
    items: Mapping[str, str]
    known: Mapping[str, int] = field(default_factory=dict)
    source: str = "the store"


def expected_from(records: Iterable[GenerationRecord]) -> Expected | None:
    """Build Expected from generation records (any order); None for an empty store."""
    recs = sorted(records, key=lambda r: r.version, reverse=True)
    if not recs:
        return None
    known: dict[str, int] = {}
    for r in recs:
        for fp in (*r.trust, *(i.fingerprint for i in r.items.values())):
            known.setdefault(fp, r.version)
    latest = recs[0]
    return Expected(latest.version, tuple(latest.trust),
                    {k: v.fingerprint for k, v in latest.items.items()}, known)


def expected_from_ca(body: Mapping[str, Any], url: str) -> Expected:
    """Build Expected from the service's `GET /v1/ca` answer: the trust bundle only.

    Raises: InvalidMaterial when the answer is not a version and a bundle.
    """
    try:
        version = int(body["version"])
        trust = tuple(body.get("trust") or _fps(pki.load_certs(str(body["pem"]).encode(),
                                                                f"{url}/v1/ca")))
    except (KeyError, TypeError, ValueError):
        raise InvalidMaterial(f"{url}/v1/ca: not a pkisvc answer") from None
    return Expected(version, trust, {}, source=f"the service at {url}")


@dataclass(frozen=True)
class Report:
    """Every check of one run, in a stable order."""

    root: str
    role: str
    now: datetime
    store_version: int | None
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        return all(c.status != FAIL for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        counts = {s.lower(): sum(c.status == s for c in self.checks) for s in (PASS, WARN, FAIL)}
        return {"root": self.root, "role": self.role, "now": format_time(self.now),
                "store_version": self.store_version, "ok": self.ok, "summary": counts,
                "checks": [c.to_dict() for c in self.checks]}


def _short(fp: str) -> str:
    return fp[:16]


def _fps(certs: Iterable[x509.Certificate]) -> list[str]:
    return [pki.fingerprint(c) for c in certs]


def _describe_fps(fps: Iterable[str]) -> str:
    return ", ".join(_short(f) for f in fps) or "none"


class _Host:
    """Reads host paths under root; every failure becomes a Check, never an exception."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, host_path: str) -> Path:
        return self.root / host_path.lstrip("/")

    def read(self, host_path: str) -> tuple[bytes | None, str]:
        try:
            return self.path(host_path).read_bytes(), ""
        except FileNotFoundError:
            return None, "missing"
        except OSError as e:
            return None, f"cannot read: {e.strerror}"

    def resolve_link(self, host_path: str) -> tuple[str | None, str]:
        """Follow a symlink chain the way the host would, staying under root.

        Returns (host path it ends at, "") or (None, why).
        """
        cur = host_path
        for _ in range(40):
            p = self.path(cur)
            if not p.is_symlink():
                return (cur, "") if p.exists() else (None, f"dangling: {cur} does not exist")
            target = os.readlink(p)
            cur = os.path.normpath(target if target.startswith("/")
                                   else os.path.join(os.path.dirname(cur), target))
        return None, "symlink loop"


def _parse_certs(data: bytes, name: str) -> tuple[list[x509.Certificate], str]:
    try:
        return pki.load_certs(data, name), ""
    except InvalidMaterial as e:
        return [], e.message


def _bundle_fps(data: bytes) -> set[str]:
    """Fingerprints of every parseable certificate in a system bundle (odd ones skipped)."""
    out = set()
    begin, end = b"-----BEGIN CERTIFICATE-----", b"-----END CERTIFICATE-----"
    for chunk in data.split(begin)[1:]:
        body = chunk.split(end, 1)[0]
        with warnings.catch_warnings():
            # A system bundle may hold old roots with a non-positive serial: not ours to judge.
            warnings.simplefilter("ignore")
            try:
                out.add(pki.fingerprint(x509.load_pem_x509_certificate(begin + body + end)))
            except ValueError:
                continue
    return out


@dataclass(frozen=True)
class Layout:
    """Where the formula puts things on a host (host paths, without any root or prefix)."""

    cert_dir: str = SRV
    ca_file: str = "ca.crt"
    local_ca: str = LOCAL_CA
    link: str = SYMLINK
    bundle: str = BUNDLE
    kubelet_ca: str = KUBELET_CA

    @property
    def ca(self) -> str:
        return f"{self.cert_dir}/{self.ca_file}"

    @property
    def leaves(self) -> dict[str, tuple[str, str, x509.ObjectIdentifier]]:
        """item -> (certificate path, key path, the extended key usage it must have)."""
        return {item: (f"{self.cert_dir}/{Path(c).name}", f"{self.cert_dir}/{Path(k).name}", u)
                for item, (c, k, u) in LEAVES.items()}

    @property
    def link_fix(self) -> str:
        return f"ln -sfn {self.local_ca} {self.link} (or: {APPLY})"


# lookup.json key -> Layout field
_LOOKUP_KEYS = {"cert_dir": "cert_dir", "ca_file": "ca_file", "ca_local": "local_ca",
                "ca_link": "link", "ca_store": "bundle", "kubelet_ca": "kubelet_ca"}


def read_layout(host: _Host) -> tuple[Layout, list[Check]]:
    """The paths the formula recorded under root (LOOKUP_FILE), else its defaults.

    Returns the layout and the check on the record (none when there is no record: a host
    configured by an older formula).
    """
    data, why = host.read(LOOKUP_FILE)
    if data is None:
        if why == "missing":
            return Layout(), []
        return Layout(), [Check("lookup", LOOKUP_FILE, FAIL, f"{why}; default paths used",
                                APPLY)]
    try:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError
        fields: dict[str, str] = {}
        for key, attr in _LOOKUP_KEYS.items():
            if key not in doc:
                continue
            value = doc[key]
            want = "a file name" if key == "ca_file" else "an absolute path"
            ok = isinstance(value, str) and value and (
                "/" not in value if key == "ca_file" else value.startswith("/"))
            if not ok:
                raise ValueError(f"{key} is not {want}")
            fields[attr] = value.rstrip("/") if key == "cert_dir" else value
    except ValueError as e:
        why = str(e) or "not a JSON object"
        return Layout(), [Check("lookup", LOOKUP_FILE, FAIL, f"{why}; default paths used",
                                APPLY)]
    layout = Layout(**fields)
    return layout, [Check("lookup", LOOKUP_FILE, PASS, f"paths as configured: CA {layout.ca}, "
                          f"link {layout.link}, bundle {layout.bundle}")]


def run(root: str | os.PathLike[str], *, now: datetime, role: str = "master",
        expected: Expected | None = None, store_error: str | None = None,
        secrets: Mapping[str, bytes] | None = None, secrets_error: str | None = None,
        warn_within: timedelta = timedelta(days=30), layout: Layout | None = None) -> Report:
    """Check a host's installed certificates under root at time now.

    expected: the store's view (see expected_from); store_error: why it could not be had.
    secrets: the `ca.crt` of each kube-system secret that has one (name -> PEM), to compare
    with the CA; secrets_error: why they could not be read.  layout: the paths to check
    (default: what the formula recorded under root, see read_layout).
    """
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}")
    host = _Host(Path(root))
    checks: list[Check] = []
    if layout is None:
        layout, found = read_layout(host)
        checks += found
    lay = layout
    trust, found = _check_ca(host, lay)
    checks += found
    ref = set(_fps(trust))
    checks += _check_copies(host, lay, ref)
    checks.append(_check_link(host, lay, ref))
    checks.append(_check_bundle(host, lay, ref))
    leaves: dict[str, x509.Certificate] = {}
    if role == "node":
        checks += _check_not_held(host, lay)
    else:
        for item, (cert_path, key_path, usage) in lay.leaves.items():
            cert = _check_leaf(host, checks.append, cert_path, key_path, usage, trust, lay)
            if cert is not None:
                leaves[item] = cert
    # Validity at `now`, CA first.
    checks += [_expiry(lay.ca, c, now, warn_within, None) for c in trust]
    checks += [_expiry(lay.leaves[i][0], c, now, warn_within, i) for i, c in leaves.items()]
    if expected is not None:
        checks.append(_version(expected, ref, {i: pki.fingerprint(c)
                                               for i, c in leaves.items()}, role, lay))
    elif store_error:
        checks.append(Check("version", lay.cert_dir, WARN, f"not compared: {store_error}",
                            "run with the service's settings (pkisvc --config FILE doctor) "
                            "or --url"))
    # The CA copies in the cluster (the seed's "System Secrets Not Updating").
    if secrets is not None:
        checks += _secrets(secrets, ref, lay)
    elif secrets_error:
        checks.append(Check("secret", "kube-system", WARN, f"not compared: {secrets_error}",
                            "check kubectl's access (--kubeconfig)"))
    return Report(str(root), role, now, expected.version if expected else None, tuple(checks))


def _check_ca(host: _Host, lay: Layout) -> tuple[list[x509.Certificate], list[Check]]:
    """The primary CA copy: the reference every other copy is compared with."""
    data, why = host.read(lay.ca)
    if data is None:
        return [], [Check("present", lay.ca, FAIL, why, APPLY)]
    trust, why = _parse_certs(data, lay.ca)
    for c in trust:
        try:
            pki.check_ca(c, lay.ca)
        except InvalidMaterial as e:
            trust, why = [], e.message
            break
    if not trust:
        return [], [Check("ca", lay.ca, FAIL, why, APPLY)]
    return trust, [Check("ca", lay.ca, PASS, f"{len(trust)} CA certificate(s): "
                         f"{_describe_fps(_fps(trust))}")]


def _check_copies(host: _Host, lay: Layout, ref: set[str]) -> list[Check]:
    """Copies of the CA that must be the same certificates: the kubelet's, the local store's."""
    out = []
    for path, fix in ((lay.kubelet_ca, f"{APPLY}, then systemctl restart kubelet"),
                      (lay.local_ca, APPLY)):
        data, why = host.read(path)
        certs, why = _parse_certs(data, path) if data is not None else ([], why)
        if not certs:
            out.append(Check("same-ca", path, FAIL, why, fix))
        elif not ref:
            out.append(Check("same-ca", path, WARN, f"holds {_describe_fps(_fps(certs))}; "
                             f"nothing to compare with ({lay.ca} unusable)", APPLY))
        elif set(_fps(certs)) != ref:
            out.append(Check("same-ca", path, FAIL, f"stale copy: holds "
                             f"{_describe_fps(_fps(certs))}, {lay.ca} holds "
                             f"{_describe_fps(sorted(ref))}", fix))
        else:
            out.append(Check("same-ca", path, PASS, f"same CA as {lay.ca}"))
    return out


def _check_link(host: _Host, lay: Layout, ref: set[str]) -> Check:
    """The kubernetes.pem link the formula makes (update-ca-certificates never makes it)."""
    link = host.path(lay.link)
    # Where the local copy itself is missing, only the formula puts both right.
    fix = lay.link_fix if host.path(lay.local_ca).exists() else APPLY
    if not link.is_symlink() and not link.exists():
        return Check("symlink", lay.link, FAIL, "missing", fix)
    end, why = host.resolve_link(lay.link)
    if end is None:
        return Check("symlink", lay.link, FAIL, why, fix)
    data, why = host.read(end)
    certs, why = _parse_certs(data, end) if data is not None else ([], why)
    if not certs:
        return Check("symlink", lay.link, FAIL, f"-> {end}: {why}", fix)
    if ref and set(_fps(certs)) != ref:
        # Pointing at the local copy, the link is right and the copy is stale (same-ca).
        return Check("symlink", lay.link, FAIL, f"-> {end} holds {_describe_fps(_fps(certs))}"
                     f", not the CA of {lay.ca}", APPLY if end == lay.local_ca else fix)
    if not link.is_symlink():
        return Check("symlink", lay.link, WARN, f"a regular file, not a symlink to "
                     f"{lay.local_ca}", fix)
    return Check("symlink", lay.link, PASS, f"-> {end}")


def _check_bundle(host: _Host, lay: Layout, ref: set[str]) -> Check:
    """The system bundle update-ca-certificates builds from the local CA copy."""
    data, why = host.read(lay.bundle)
    if data is None:
        return Check("bundle", lay.bundle, FAIL, why, UPDATE_CA)
    if not ref:
        return Check("bundle", lay.bundle, WARN, f"nothing to look for ({lay.ca} unusable)",
                     APPLY)
    missing = sorted(ref - _bundle_fps(data))
    if missing:
        return Check("bundle", lay.bundle, FAIL, f"does not contain {_describe_fps(missing)}",
                     UPDATE_CA)
    return Check("bundle", lay.bundle, PASS, "contains the CA")


def _check_not_held(host: _Host, lay: Layout) -> list[Check]:
    """A node holds only the CA: any leaf file there is a leftover."""
    out = []
    for cert_path, key_path, _ in lay.leaves.values():
        held = [p for p in (cert_path, key_path) if host.path(p).exists()]
        if held:
            out.append(Check("not-held", held[0], WARN,
                             f"a node should not hold {', '.join(held)}", APPLY))
    return out


def _secrets(secrets: Mapping[str, bytes], ref: set[str], lay: Layout) -> list[Check]:
    if not secrets:
        return [Check("secret", "kube-system", PASS, "no secret holds a ca.crt")]
    out = []
    for name, pem in sorted(secrets.items()):
        where = f"kube-system/secret/{name}"
        certs, why = _parse_certs(pem, f"{where} ca.crt")
        fix = (f"kubectl -n kube-system delete secret {name} (it is re-created with the new "
               "CA), then delete the pods that mount it")
        if not certs:
            out.append(Check("secret", where, FAIL, why, fix))
        elif not ref:
            out.append(Check("secret", where, WARN, f"holds {_describe_fps(_fps(certs))}; "
                             f"nothing to compare with ({lay.ca} unusable)", APPLY))
        elif set(_fps(certs)) != ref:
            out.append(Check("secret", where, FAIL, f"stale ca.crt: holds "
                             f"{_describe_fps(_fps(certs))}, {lay.ca} holds "
                             f"{_describe_fps(sorted(ref))}", fix))
        else:
            out.append(Check("secret", where, PASS, f"ca.crt is the CA of {lay.ca}"))
    return out


def _check_leaf(host: _Host, add: Callable[[Check], None], cert_path: str, key_path: str,
                usage: x509.ObjectIdentifier, trust: list[x509.Certificate], lay: Layout
                ) -> x509.Certificate | None:
    data, why = host.read(cert_path)
    if data is None:
        add(Check("present", cert_path, FAIL, why, APPLY))
        return None
    try:
        cert = pki.load_cert(data, cert_path)
    except InvalidMaterial as e:
        add(Check("leaf", cert_path, FAIL, e.message, APPLY))
        return None
    label = "serverAuth" if usage == ExtendedKeyUsageOID.SERVER_AUTH else "clientAuth"
    if trust and pki.issuer_among(cert, trust) is None:
        add(Check("leaf", cert_path, FAIL, f"not issued by the CA in {lay.ca} (issuer "
                  f"{cert.issuer.rfc4514_string()})", REFRESH))
    elif not pki.has_usage(cert, usage):
        add(Check("leaf", cert_path, FAIL, f"extended key usage {label} missing", APPLY))
    elif usage == ExtendedKeyUsageOID.SERVER_AUTH and not pki.sans_of(cert):
        add(Check("leaf", cert_path, FAIL, "no subjectAltName (Go refuses CN-only serving "
                  "certificates)", APPLY))
    else:
        add(Check("leaf", cert_path, PASS, f"{cert.subject.rfc4514_string()}, serial "
                  f"{cert.serial_number:x}, fingerprint {_short(pki.fingerprint(cert))}"))
    key_data, why = host.read(key_path)
    if key_data is None:
        add(Check("key", key_path, FAIL, why, APPLY))
        return cert
    try:
        key = pki.load_key(key_data, key_path)
    except InvalidMaterial as e:
        add(Check("key", key_path, FAIL, e.message, APPLY))
        return cert
    if pki.key_matches(key, cert):
        add(Check("key", key_path, PASS, f"matches {cert_path}"))
    else:
        add(Check("key", key_path, FAIL, f"does not match {cert_path}", APPLY))
    mode = host.path(key_path).stat().st_mode & 0o777
    if mode & 0o077:
        add(Check("key-mode", key_path, FAIL, f"mode {mode:04o}: readable beyond its owner",
                  f"chmod 0600 {key_path} (or: {APPLY})"))
    else:
        add(Check("key-mode", key_path, PASS, f"mode {mode:04o}"))
    return cert


def _expiry(path: str, cert: x509.Certificate, now: datetime, within: timedelta,
            item: str | None) -> Check:
    """Validity at now; item: the leaf's name (server, kubecfg), None for the CA."""
    not_after, not_before = cert.not_valid_after_utc, cert.not_valid_before_utc
    is_ca = item is None
    fix = ("pkisvc rotate ca (staged: POST /v1/ca/rotate {\"mode\": \"staged\"}), then "
           f"{REFRESH}") if is_ca else f"pkisvc rotate {item}, then {REFRESH}"
    what = f"{_short(pki.fingerprint(cert))} " if is_ca else ""
    if now >= not_after:
        return Check("expiry", path, FAIL, f"{what}expired at {format_time(not_after)}", fix)
    if now < not_before:
        return Check("expiry", path, FAIL, f"{what}not valid before "
                     f"{format_time(not_before)} (clock skew?)", "check the host's clock")
    left = not_after - now
    if left <= within:
        return Check("expiry", path, WARN, f"{what}expires at {format_time(not_after)} "
                     f"({left.days} days left)", fix)
    return Check("expiry", path, PASS, f"{what}valid until {format_time(not_after)} "
                 f"({left.days} days left)")


def _version(exp: Expected, ca: set[str], leaves: Mapping[str, str], role: str,
             lay: Layout) -> Check:
    want = {"ca.crt": set(exp.trust)}
    have: dict[str, set[str]] = {"ca.crt": ca}
    if role == "master" and exp.items:
        for item, (cert_path, _, _) in lay.leaves.items():
            name = Path(cert_path).name
            want[name] = {exp.items[item]}
            have[name] = {leaves[item]} if item in leaves else set()
    stale = [n for n in want if have[n] != want[n]]
    src, where = exp.source, lay.cert_dir
    if not stale:
        return Check("version", where, PASS, f"matches version {exp.version} ({src})")
    seen = {exp.known[fp] for n in stale for fp in have[n] if fp in exp.known}
    if seen:
        return Check("version", where, FAIL, f"{', '.join(stale)} from version {max(seen)}; "
                     f"latest is {exp.version} ({src})", REFRESH)
    if not exp.known:  # only the current trust bundle is known (the service's /v1/ca)
        return Check("version", where, FAIL, f"{', '.join(stale)} is not the trust bundle of "
                     f"version {exp.version} ({src})", REFRESH)
    return Check("version", where, FAIL, f"{', '.join(stale)} not from {src} (latest version "
                 f"{exp.version})", REFRESH)


def kube_system_ca_secrets(kubectl: str, kubeconfig: str | None) -> dict[str, bytes]:
    """Return the ca.crt of every kube-system secret that has one (name -> PEM).

    Raises: InvalidRequest with kubectl's first line of complaint.
    """
    argv = [kubectl, *(["--kubeconfig", kubeconfig] if kubeconfig else []),
            "--request-timeout=10s", "get", "--raw", "/api/v1/namespaces/kube-system/secrets"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise InvalidRequest(f"{kubectl}: {e}") from None
    if r.returncode != 0:
        why = (r.stderr.strip().splitlines() or [f"exit {r.returncode}"])[0]
        raise InvalidRequest(f"kubectl: {why}")
    try:
        items = json.loads(r.stdout)["items"]
        return {i["metadata"]["name"]: base64.b64decode(i["data"]["ca.crt"])
                for i in items if "ca.crt" in (i.get("data") or {})}
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidRequest("kubectl: not a SecretList") from None


def fetch_json(url: str, timeout: float = 5) -> Any:
    """GET url and parse its JSON body.

    Raises: InvalidRequest with one line saying what went wrong.
    """
    if not url.startswith(("http://", "https://")):
        raise InvalidRequest(f"{url}: not an http(s) URL")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:  # noqa: S310 - scheme checked
            return json.loads(r.read(1 << 20))
    except urllib.error.HTTPError as e:
        raise InvalidRequest(f"{url}: HTTP {e.code}") from None
    except (urllib.error.URLError, OSError) as e:
        raise InvalidRequest(f"{url}: {getattr(e, 'reason', e)}") from None
    except ValueError:
        raise InvalidRequest(f"{url}: not JSON") from None
