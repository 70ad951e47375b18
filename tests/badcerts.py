"""Certificate sets with exactly one of the mistakes Go refuses (FIELD-NOTES' Go table).

Each mistake is built from a good generation's files without our checks, so the same files can
be fed to `pki`/`CertStore` (which must refuse them) and to a real Go peer (which must too).
"""
from __future__ import annotations

import ipaddress
import subprocess
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkisvc import pki
from pkisvc.store import CertStore

SERVER_AUTH, CLIENT_AUTH = ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH


@dataclass(frozen=True)
class Mistake:
    """One broken set: files (the seed's names, ca.key included), what our checks say, what
    Go says, and which Go peer judges it (`client` = kubectl checks the server, `server` = etcd
    checks the client)."""

    name: str
    files: dict[str, bytes]
    ours: str
    go: str
    judge: str


def build(cn: str, issuer: x509.Name | None, issuer_key: pki.PrivateKey, key: pki.PrivateKey,
          *, ca: bool = False, key_cert_sign: bool | None = None,
          eku: list[x509.ObjectIdentifier] | None = None, sans: tuple[str, ...] = (),
          org: str | None = None, now: datetime | None = None) -> x509.Certificate:
    """A certificate with exactly the extensions given (issuer None = self-signed)."""
    now = now or datetime.now(UTC)
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org)] if org else []
    subject = x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    b = (x509.CertificateBuilder()
         .subject_name(subject).issuer_name(issuer or subject).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if key_cert_sign is not None:
        b = b.add_extension(x509.KeyUsage(True, False, not ca and _is_rsa(key), False, False,
                                          key_cert_sign, key_cert_sign, False, False),
                            critical=True)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address(n)) if _is_ip(n) else x509.DNSName(n)
             for n in sans]), critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def _is_rsa(key: pki.PrivateKey) -> bool:
    from cryptography.hazmat.primitives.asymmetric import rsa
    return isinstance(key, rsa.RSAPrivateKey)


def _negative_serial_server(files: dict[str, bytes], sans: tuple[str, ...],
                            work: Path) -> bytes:
    """Sign server.key's CSR with openssl and serial -5 (cryptography refuses to)."""
    work.mkdir(parents=True, exist_ok=True)
    for n in ("ca.crt", "ca.key", "server.key"):
        (work / n).write_bytes(files[n])
    alt = ",".join(f"IP:{s}" if _is_ip(s) else f"DNS:{s}" for s in sans)
    (work / "ext.cnf").write_text(
        f"basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n"
        f"extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={alt}\n")

    def ossl(*args: str) -> None:
        r = subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=work,
                           timeout=60)
        assert r.returncode == 0, r.stderr

    ossl("req", "-new", "-key", "server.key", "-subj", "/CN=kube-apiserver", "-out", "s.csr")
    ossl("x509", "-req", "-in", "s.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-set_serial",
         "-5", "-days", "1", "-extfile", "ext.cnf", "-out", "server.cert")
    return (work / "server.cert").read_bytes()


def set_files(store: CertStore) -> dict[str, bytes]:
    """The latest generation as an import would carry it: the seed's names plus ca.key, with
    ca.crt = the signing CA."""
    gen = store.read()
    return {**store.host_files(gen, ("server.cert", "server.key", "kubecfg.crt",
                                     "kubecfg.key")),
            "ca.crt": gen.files["ca.crt"], "ca.key": gen.files["ca.key"]}


def mistakes(files: dict[str, bytes], work: Path) -> list[Mistake]:
    """Every mistake of the Go table, each applied to a copy of a good generation's files
    (host names plus ca.key; ca.crt must hold just the signing CA)."""
    ca = pki.load_cert(files["ca.crt"], "ca.crt")
    ca_key = pki.load_key(files["ca.key"], "ca.key")
    server = pki.load_cert(files["server.cert"], "server.cert")
    server_key = pki.load_key(files["server.key"], "server.key")
    kubecfg_key = pki.load_key(files["kubecfg.key"], "kubecfg.key")
    sans = pki.sans_of(server)
    pem = pki.cert_pem
    out = [
        Mistake("serving cert without SANs", {**files, "server.cert": pem(build(
            "kube-apiserver", ca.subject, ca_key, server_key, key_cert_sign=False,
            eku=[SERVER_AUTH, CLIENT_AUTH]))},
            ours="^server.cert: no subjectAltName",
            go="x509: certificate relies on legacy Common Name field, use SANs instead",
            judge="client"),
        Mistake("negative serial", {**files, "server.cert": _negative_serial_server(
            files, sans, work / "negative-serial")},
            ours="^server.cert: serial number must be positive",
            go="x509: negative serial number", judge="client"),
        Mistake("serving cert without serverAuth", {**files, "server.cert": pem(build(
            "kube-apiserver", ca.subject, ca_key, server_key, key_cert_sign=False,
            eku=[CLIENT_AUTH], sans=sans))},
            ours="^server.cert: extended key usage serverAuth missing",
            go="x509: certificate specifies an incompatible key usage", judge="client"),
        Mistake("client cert without clientAuth", {**files, "kubecfg.crt": pem(build(
            "kubecfg", ca.subject, ca_key, kubecfg_key, key_cert_sign=False,
            eku=[SERVER_AUTH], org="system:masters"))},
            ours="^kubecfg.crt: extended key usage clientAuth missing",
            go="x509: certificate specifies an incompatible key usage", judge="server"),
    ]
    for what, ca_flag, kcs, ours in (
            ("root without CA:TRUE", False, True, "^ca.crt: not a CA certificate"),
            ("root without keyCertSign", True, False,
             "^ca.crt: CA certificate lacks keyUsage keyCertSign")):
        bad_ca = build("kubernetes-ca", None, ca_key, ca_key, ca=ca_flag, key_cert_sign=kcs)
        out.append(Mistake(what, {
            **files, "ca.crt": pem(bad_ca),
            "server.cert": pem(build("kube-apiserver", bad_ca.subject, ca_key, server_key,
                                     key_cert_sign=False, eku=[SERVER_AUTH, CLIENT_AUTH],
                                     sans=sans)),
            "kubecfg.crt": pem(build("kubecfg", bad_ca.subject, ca_key, kubecfg_key,
                                     key_cert_sign=False, eku=[CLIENT_AUTH],
                                     org="system:masters"))},
            ours=ours, go="x509: certificate signed by unknown authority", judge="client"))
    return out
