"""Pure certificate work: keys, the three profiles, PEM, parsing and set checks.

No I/O and no clock: the caller passes `now` (timezone-aware) and gets objects back.
"""
from __future__ import annotations

import hashlib
import ipaddress
import re
import warnings
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from typing import Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkisvc.errors import InvalidMaterial, InvalidRequest
from pkisvc.memo import Memo
from pkisvc.model import KEY_TYPES, ItemRecord

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
PublicKey = rsa.RSAPublicKey | ec.EllipticCurvePublicKey
BACKDATE = timedelta(minutes=5)
_CURVES: dict[str, ec.EllipticCurve] = {"ecdsa-p256": ec.SECP256R1(), "ecdsa-p384": ec.SECP384R1()}


def generate_key(key_type: str) -> PrivateKey:
    """Make a new private key of one of KEY_TYPES."""
    if key_type not in KEY_TYPES:
        raise InvalidRequest(f"key type {key_type!r} is not one of {', '.join(KEY_TYPES)}")
    if key_type.startswith("rsa-"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    return ec.generate_private_key(_CURVES[key_type])


def key_type_of(key: PrivateKey) -> str:
    """Name the key type of key, e.g. `rsa-2048` or `ecdsa-p256`."""
    if isinstance(key, rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    return {"secp256r1": "ecdsa-p256", "secp384r1": "ecdsa-p384"}.get(key.curve.name,
                                                                      f"ecdsa-{key.curve.name}")


@dataclass(frozen=True)
class Profile:
    """What one certificate is for and what it says."""

    kind: Literal["ca", "server", "client"]
    common_name: str
    days: int
    organization: str | None = None
    sans: tuple[str, ...] = ()
    subject: x509.Name | None = None  # kept whole from the certificate a re-issue replaces


def reissue_profile(profile: Profile, cert: x509.Certificate,
                    sans: tuple[str, ...] | None = None) -> Profile:
    """profile (kind, days) carrying cert's subject and SANs (or sans): what a re-issue keeps."""
    cn = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return replace(profile, common_name=str(cn[0].value) if cn else "", organization=None,
                   subject=cert.subject, sans=names_of(cert) if sans is None else sans)


def server_sans(extra: tuple[str, ...] | list[str], service_cidr: str,
                cluster_domain: str) -> tuple[str, ...]:
    """List the API server's SANs: the in-cluster names, the service IP, then `extra`."""
    first_ip = str(next(ipaddress.ip_network(service_cidr).hosts()))
    names = ["kubernetes", "kubernetes.default", "kubernetes.default.svc",
             f"kubernetes.default.svc.{cluster_domain}", first_ip, *extra]
    seen: dict[str, None] = {}
    for n in names:
        seen.setdefault(n, None)
    return tuple(seen)


def _general_names(sans: tuple[str, ...]) -> list[x509.GeneralName]:
    out: list[x509.GeneralName] = []
    for s in sans:
        try:
            out.append(x509.IPAddress(ipaddress.ip_address(s)))
        except ValueError:
            out.append(x509.DNSName(s))
    return out


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _name(profile: Profile) -> x509.Name:
    if profile.subject is not None:
        return profile.subject
    attrs = []
    if profile.organization:
        attrs.append(x509.NameAttribute(NameOID.ORGANIZATION_NAME, profile.organization))
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, profile.common_name))
    return x509.Name(attrs)


def subject_of(profile: Profile) -> str:
    """The subject a certificate of profile gets (RFC 4514, as records keep it)."""
    return _name(profile).rfc4514_string()


def make_ca(profile: Profile, key: PrivateKey, *, now: datetime) -> x509.Certificate:
    """Make a self-signed CA certificate for key."""
    name = _name(profile)
    pub = key.public_key()
    b = (x509.CertificateBuilder()
         .subject_name(name).issuer_name(name).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - BACKDATE).not_valid_after(now + timedelta(days=profile.days))
         .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(
             digital_signature=True, content_commitment=False, key_encipherment=False,
             data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
             encipher_only=False, decipher_only=False), critical=True)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False))
    return b.sign(key, _hash_for(key))


def issue(profile: Profile, ca: x509.Certificate, ca_key: PrivateKey, key: PrivateKey, *,
          now: datetime) -> x509.Certificate:
    """Issue a server or client certificate for key, signed by ca."""
    if profile.kind == "server" and not profile.sans:
        raise InvalidRequest("a serving certificate needs at least one SAN")
    pub = key.public_key()
    not_after = min(now + timedelta(days=profile.days), ca.not_valid_after_utc)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
              if profile.kind == "server" else [ExtendedKeyUsageOID.CLIENT_AUTH])
    b = (x509.CertificateBuilder()
         .subject_name(_name(profile)).issuer_name(ca.subject).public_key(pub)
         .serial_number(x509.random_serial_number())
         .not_valid_before(now - BACKDATE).not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
         .add_extension(x509.KeyUsage(
             digital_signature=True, content_commitment=False,
             key_encipherment=isinstance(key, rsa.RSAPrivateKey), data_encipherment=False,
             key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False,
             decipher_only=False), critical=True)
         .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
         .add_extension(x509.SubjectKeyIdentifier.from_public_key(pub), critical=False)
         .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                        critical=False))
    if profile.sans:
        b = b.add_extension(x509.SubjectAlternativeName(_general_names(profile.sans)),
                            critical=False)
    return b.sign(ca_key, _hash_for(ca_key))


# --- PEM -------------------------------------------------------------------------------

def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def bundle_pem(certs: tuple[x509.Certificate, ...] | list[x509.Certificate]) -> bytes:
    return b"".join(cert_pem(c) for c in certs)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def public_key_pem(key: PrivateKey) -> bytes:
    """The public half of key (SubjectPublicKeyInfo PEM)."""
    return key.public_key().public_bytes(serialization.Encoding.PEM,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def public_pem(key: PublicKey) -> bytes:
    """A public key as SubjectPublicKeyInfo PEM."""
    return key.public_bytes(serialization.Encoding.PEM,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def key_fingerprint(key: PrivateKey | PublicKey) -> str:
    """Lowercase hex SHA-256 of the public key's SubjectPublicKeyInfo DER."""
    pub = key.public_key() if isinstance(key, (rsa.RSAPrivateKey,
                                               ec.EllipticCurvePrivateKey)) else key
    return hashlib.sha256(pub.public_bytes(serialization.Encoding.DER,
                                           serialization.PublicFormat.SubjectPublicKeyInfo)
                          ).hexdigest()


_PEM_BLOCK = re.compile(rb"-----BEGIN ([A-Z ]+)-----.+?-----END \1-----", re.DOTALL)


def load_public_keys(data: bytes, name: str) -> list[PublicKey]:
    """Parse every PEM public key in data (`PUBLIC KEY` or `RSA PUBLIC KEY` blocks).

    Raises: InvalidMaterial when there is none, or one is not an RSA (>= 2048) or ECDSA
    P-256/P-384 public key.
    """
    keys: list[PublicKey] = []
    for m in _PEM_BLOCK.finditer(data):
        if m.group(1) not in (b"PUBLIC KEY", b"RSA PUBLIC KEY"):
            raise InvalidMaterial(f"{name}: holds a {m.group(1).decode()} block, not a "
                                  "public key")
        try:
            key = serialization.load_pem_public_key(m.group(0))
        except (ValueError, TypeError, UnsupportedAlgorithm):
            raise InvalidMaterial(f"{name}: not a valid PEM public key") from None
        if isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048:
            keys.append(key)
        elif isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name in ("secp256r1",
                                                                              "secp384r1"):
            keys.append(key)
        else:
            raise InvalidMaterial(f"{name}: only RSA (>= 2048 bits) and ECDSA P-256/P-384 "
                                  "public keys")
    if not keys:
        raise InvalidMaterial(f"{name}: no PEM public key found")
    return keys


def load_certs(data: bytes, name: str) -> list[x509.Certificate]:
    """Parse every PEM certificate in data; name is the file named in errors."""
    if b"-----BEGIN CERTIFICATE-----" not in data:
        raise InvalidMaterial(f"{name}: no PEM certificate found")
    with warnings.catch_warnings():
        # cryptography warns on a non-positive serial; we refuse it below instead.
        warnings.simplefilter("ignore")
        try:
            certs = x509.load_pem_x509_certificates(data)
            # cryptography parses names, validity and extensions lazily: a broken field would
            # otherwise raise ValueError later, wherever it is first read (a record, a log).
            for c in certs:
                c.subject, c.issuer, c.not_valid_before_utc, c.not_valid_after_utc  # noqa: B018
                c.extensions  # noqa: B018
                c.public_key()
            serials = [c.serial_number for c in certs]
        except (ValueError, TypeError, x509.DuplicateExtension,
                x509.UnsupportedGeneralNameType, UnsupportedAlgorithm):
            raise InvalidMaterial(f"{name}: not a valid PEM certificate") from None
    for serial in serials:
        if serial <= 0:
            raise InvalidMaterial(f"{name}: serial number must be positive (Go refuses it)")
    return certs


def load_cert(data: bytes, name: str) -> x509.Certificate:
    """Parse exactly one PEM certificate."""
    certs = load_certs(data, name)
    if len(certs) != 1:
        raise InvalidMaterial(f"{name}: expected one certificate, found {len(certs)}")
    return certs[0]


def load_key(data: bytes, name: str, *, trusted: bool = False) -> PrivateKey:
    """Parse an unencrypted PEM private key of a supported type.

    trusted: the key comes from a generation pkisvc wrote (and checked) itself, so the slow
    RSA consistency check (about 50 ms for 2048 bits) is skipped.
    """
    try:
        key = serialization.load_pem_private_key(
            data, password=None, unsafe_skip_rsa_key_validation=trusted)
    except (ValueError, TypeError):
        # Never echo the data: it is key material.
        raise InvalidMaterial(f"{name}: not an unencrypted PEM private key") from None
    except Exception:  # cryptography raises UnsupportedAlgorithm for odd keys
        raise InvalidMaterial(f"{name}: unsupported private key") from None
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < 2048:
            raise InvalidMaterial(f"{name}: RSA key of {key.key_size} bits is too small")
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in ("secp256r1",
                                                                         "secp384r1"):
        return key
    raise InvalidMaterial(f"{name}: only RSA (>= 2048 bits) and ECDSA P-256/P-384 keys")


# --- facts -----------------------------------------------------------------------------

def fingerprint(cert: x509.Certificate) -> str:
    """Lowercase hex SHA-256 of the DER, no colons."""
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


def names_of(cert: x509.Certificate) -> tuple[str, ...]:
    """cert's DNS and IP SANs in the certificate's own order."""
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(n.value) for n in ext if isinstance(n, x509.DNSName | x509.IPAddress))


def sans_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(str(v) for v in ext.get_values_for_type(x509.DNSName)) + tuple(
        str(v) for v in ext.get_values_for_type(x509.IPAddress))


# Facts of a certificate are a function of its DER: the last few are kept, so an unchanged
# certificate (most of a change's) is neither described nor verified again.
MEMO_SIZE = 32


_described: Memo[bytes, ItemRecord] = Memo(MEMO_SIZE)
# (certificate DER, issuer DER) -> True: signed by it (a failure is never kept)
_verified: Memo[tuple[bytes, bytes], bool] = Memo(MEMO_SIZE)


def _der(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.DER)


def describe(cert: x509.Certificate) -> ItemRecord:
    """Summarise cert for a generation record."""
    der = _der(cert)
    found = _described.get(der)
    if found is not None:
        return found
    rec = _describe(cert)
    _described.put(der, rec)
    return rec


def verify_issued_by(cert: x509.Certificate, ca: x509.Certificate) -> None:
    """cert.verify_directly_issued_by(ca), once per pair of certificates (a success is a
    function of the two DERs; a failure is never kept, so it is checked every time).

    Raises: ValueError, TypeError, InvalidSignature as cryptography does.
    """
    pair = (_der(cert), _der(ca))
    if _verified.get(pair) is None:
        cert.verify_directly_issued_by(ca)
        _verified.put(pair, True)


def _describe(cert: x509.Certificate) -> ItemRecord:
    return ItemRecord(
        fingerprint=fingerprint(cert), serial=format(cert.serial_number, "x"),
        subject=cert.subject.rfc4514_string(), issuer=cert.issuer.rfc4514_string(),
        sans=sans_of(cert), not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc)


# --- whole sets ------------------------------------------------------------------------

@dataclass(frozen=True)
class CertSet:
    """The material of one generation, parsed. ca_key is None for an import without it."""

    ca: x509.Certificate
    ca_key: PrivateKey | None
    server: x509.Certificate
    server_key: PrivateKey
    kubecfg: x509.Certificate
    kubecfg_key: PrivateKey
    trust: tuple[x509.Certificate, ...]


def _spki(key_or_cert: PrivateKey | x509.Certificate) -> bytes:
    pub = key_or_cert.public_key()
    return pub.public_bytes(serialization.Encoding.DER,
                            serialization.PublicFormat.SubjectPublicKeyInfo)


def _ext(cert: x509.Certificate, cls: type) -> object | None:
    try:
        return cert.extensions.get_extension_for_class(cls).value
    except x509.ExtensionNotFound:
        return None


def _check_ca(cert: x509.Certificate, name: str) -> None:
    bc = _ext(cert, x509.BasicConstraints)
    ku = _ext(cert, x509.KeyUsage)
    if not isinstance(bc, x509.BasicConstraints) or not bc.ca:
        raise InvalidMaterial(f"{name}: not a CA certificate (basicConstraints CA:TRUE missing)")
    if not isinstance(ku, x509.KeyUsage) or not ku.key_cert_sign:
        raise InvalidMaterial(f"{name}: CA certificate lacks keyUsage keyCertSign")


def _check_leaf(cert: x509.Certificate, key: PrivateKey, ca: x509.Certificate, name: str,
                key_name: str, usage: x509.ObjectIdentifier) -> None:
    try:
        verify_issued_by(cert, ca)
    except (ValueError, TypeError, InvalidSignature):
        raise InvalidMaterial(f"{name}: not issued by the CA in ca.crt") from None
    bc = _ext(cert, x509.BasicConstraints)
    if isinstance(bc, x509.BasicConstraints) and bc.ca:
        raise InvalidMaterial(f"{name}: a leaf certificate must not be a CA")
    eku = _ext(cert, x509.ExtendedKeyUsage)
    if not isinstance(eku, x509.ExtendedKeyUsage) or usage not in eku:
        label = "serverAuth" if usage == ExtendedKeyUsageOID.SERVER_AUTH else "clientAuth"
        raise InvalidMaterial(f"{name}: extended key usage {label} missing")
    if _spki(key) != _spki(cert):
        raise InvalidMaterial(f"{key_name}: does not match {name}")


def check_set(s: CertSet) -> None:
    """Refuse a set that is not whole.

    Raises: InvalidMaterial naming the file at fault.
    """
    _check_ca(s.ca, "ca.crt")
    if s.ca_key is not None and _spki(s.ca_key) != _spki(s.ca):
        raise InvalidMaterial("ca.key: does not match ca.crt")
    _check_leaf(s.server, s.server_key, s.ca, "server.cert", "server.key",
                ExtendedKeyUsageOID.SERVER_AUTH)
    if not sans_of(s.server):
        raise InvalidMaterial("server.cert: no subjectAltName (Go refuses CN-only serving certs)")
    _check_leaf(s.kubecfg, s.kubecfg_key, s.ca, "kubecfg.crt", "kubecfg.key",
                ExtendedKeyUsageOID.CLIENT_AUTH)
    for c in s.trust:
        _check_ca(c, "trust bundle")
    if fingerprint(s.ca) not in {fingerprint(c) for c in s.trust}:
        raise InvalidMaterial("trust bundle: does not hold the signing CA of ca.crt")


# --- single certificates, as found on a host (doctor) ------------------------------------

def check_ca(cert: x509.Certificate, name: str) -> None:
    """Refuse cert as a trust anchor unless it has CA:TRUE and keyCertSign.

    Raises: InvalidMaterial naming the file.
    """
    _check_ca(cert, name)


def key_matches(key: PrivateKey, cert: x509.Certificate) -> bool:
    """Tell whether key is the private half of cert's public key."""
    return _spki(key) == _spki(cert)


def issuer_among(cert: x509.Certificate, cas: tuple[x509.Certificate, ...] | list[x509.Certificate]
                 ) -> x509.Certificate | None:
    """Return the CA in cas whose key signed cert, or None."""
    for ca in cas:
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return ca
    return None


def has_usage(cert: x509.Certificate, usage: x509.ObjectIdentifier) -> bool:
    """Tell whether cert's extended key usage allows usage."""
    eku = _ext(cert, x509.ExtendedKeyUsage)
    return isinstance(eku, x509.ExtendedKeyUsage) and usage in eku
