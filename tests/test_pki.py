"""The three profiles for every key type, and the checks that keep a set whole."""
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pkisvc import pki
from pkisvc.errors import InvalidMaterial, InvalidRequest
from pkisvc.model import KEY_TYPES

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
SANS = pki.server_sans(("k8s-master-1", "192.0.2.10"), "10.0.0.0/24", "cluster.local")


def make_set(key_type="ecdsa-p256", now=NOW):
    ca_key, s_key, k_key = (pki.generate_key(key_type) for _ in range(3))
    ca = pki.make_ca(pki.Profile("ca", "kubernetes-ca", 3650), ca_key, now=now)
    server = pki.issue(pki.Profile("server", "kube-apiserver", 365, sans=SANS), ca, ca_key, s_key,
                       now=now)
    kubecfg = pki.issue(pki.Profile("client", "kubecfg", 365, organization="system:masters"),
                        ca, ca_key, k_key, now=now)
    return pki.CertSet(ca, ca_key, server, s_key, kubecfg, k_key, (ca,))


def ext(cert, cls):
    return cert.extensions.get_extension_for_class(cls)


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_profiles_for_every_key_type(key_type):
    s = make_set(key_type)
    pki.check_set(s)
    # Round-trip through PEM, as hosts receive it.
    ca = pki.load_cert(pki.cert_pem(s.ca), "ca.crt")
    server = pki.load_cert(pki.cert_pem(s.server), "server.cert")
    kubecfg = pki.load_cert(pki.cert_pem(s.kubecfg), "kubecfg.crt")
    for key in (s.ca_key, s.server_key, s.kubecfg_key):
        assert pki.key_type_of(pki.load_key(pki.key_pem(key), "k")) == key_type

    bc = ext(ca, x509.BasicConstraints)
    assert bc.critical and bc.value.ca
    ku = ext(ca, x509.KeyUsage)
    assert ku.critical and ku.value.key_cert_sign and ku.value.crl_sign
    assert ku.value.digital_signature
    ca_ski = ext(ca, x509.SubjectKeyIdentifier).value
    assert ca.subject == ca.issuer
    assert ca.not_valid_after_utc - ca.not_valid_before_utc == timedelta(days=3650, minutes=5)

    assert not ext(server, x509.BasicConstraints).value.ca
    assert set(ext(server, x509.ExtendedKeyUsage).value) == {
        ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ext(server, x509.AuthorityKeyIdentifier).value.key_identifier == ca_ski.digest
    assert set(pki.sans_of(server)) == {
        "kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local", "10.0.0.1", "k8s-master-1", "192.0.2.10"}
    assert server.not_valid_before_utc == NOW - timedelta(minutes=5)
    assert server.not_valid_after_utc == NOW + timedelta(days=365)

    assert list(ext(kubecfg, x509.ExtendedKeyUsage).value) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert kubecfg.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "kubecfg"
    assert kubecfg.subject.get_attributes_for_oid(
        NameOID.ORGANIZATION_NAME)[0].value == "system:masters"
    assert not pki.sans_of(kubecfg)

    for c in (ca, server, kubecfg):
        assert 0 < c.serial_number < 2**159
    assert server.serial_number != kubecfg.serial_number


def test_facts_are_in_the_api_formats():
    s = make_set()
    rec = pki.describe(s.server)
    assert len(rec.fingerprint) == 64 and rec.fingerprint == rec.fingerprint.lower()
    assert rec.serial == format(s.server.serial_number, "x")
    assert rec.to_dict()["not_before"] == "2026-11-29T11:55:00Z"
    assert rec.issuer == "CN=kubernetes-ca"


def test_leaf_never_outlives_its_ca():
    ca_key = pki.generate_key("ecdsa-p256")
    ca = pki.make_ca(pki.Profile("ca", "short-ca", 10), ca_key, now=NOW)
    leaf = pki.issue(pki.Profile("client", "kubecfg", 365), ca, ca_key,
                     pki.generate_key("ecdsa-p256"), now=NOW)
    assert leaf.not_valid_after_utc == ca.not_valid_after_utc


def test_no_sanless_serving_certificate_is_made():
    s = make_set()
    with pytest.raises(InvalidRequest, match="SAN"):
        pki.issue(pki.Profile("server", "kube-apiserver", 365), s.ca, s.ca_key,
                  pki.generate_key("ecdsa-p256"), now=NOW)


def test_unknown_key_type_is_refused():
    with pytest.raises(InvalidRequest, match="dsa"):
        pki.generate_key("dsa-1024")


def raw_cert(subject_cn, issuer, issuer_key, key, *, ca=False, key_cert_sign=None, eku=None,
             sans=None):
    """Build a certificate with exactly the extensions given (to make broken ones)."""
    b = (x509.CertificateBuilder()
         .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject_cn)]))
         .issuer_name(issuer).public_key(key.public_key())
         .serial_number(x509.random_serial_number())
         .not_valid_before(NOW - timedelta(minutes=5)).not_valid_after(NOW + timedelta(days=30))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if key_cert_sign is not None:
        b = b.add_extension(x509.KeyUsage(True, False, False, False, False, key_cert_sign,
                                          key_cert_sign, False, False), critical=True)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(n) for n in sans]), False)
    return b.sign(issuer_key, hashes.SHA256())


def replace(s, **kw):
    d = {f: getattr(s, f) for f in ("ca", "ca_key", "server", "server_key", "kubecfg",
                                    "kubecfg_key", "trust")}
    d.update(kw)
    return pki.CertSet(**d)


def test_mismatched_key_is_refused_naming_the_file():
    s = make_set()
    with pytest.raises(InvalidMaterial, match="^server.key: does not match server.cert"):
        pki.check_set(replace(s, server_key=s.kubecfg_key))
    with pytest.raises(InvalidMaterial, match="^ca.key"):
        pki.check_set(replace(s, ca_key=s.server_key))


def test_leaf_from_another_ca_is_refused():
    s, other = make_set(), make_set()
    with pytest.raises(InvalidMaterial, match="^kubecfg.crt: not issued by"):
        pki.check_set(replace(s, kubecfg=other.kubecfg, kubecfg_key=other.kubecfg_key))


def test_root_without_ca_true_or_keycertsign_is_refused():
    s = make_set()
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not-a-ca")])
    for bad, why in ((raw_cert("not-a-ca", name, key, key, ca=False, key_cert_sign=True),
                      "CA:TRUE"),
                     (raw_cert("not-a-ca", name, key, key, ca=True, key_cert_sign=False),
                      "keyCertSign")):
        with pytest.raises(InvalidMaterial, match=f"^ca.crt: .*{why}"):
            pki.check_set(replace(s, ca=bad, ca_key=key, trust=(bad,)))


def test_server_without_sans_or_server_auth_is_refused():
    s = make_set()
    key = s.server_key
    no_san = raw_cert("kube-apiserver", s.ca.subject, s.ca_key, key,
                      eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(InvalidMaterial, match="^server.cert: no subjectAltName"):
        pki.check_set(replace(s, server=no_san))
    no_usage = raw_cert("kube-apiserver", s.ca.subject, s.ca_key, key,
                        eku=[ExtendedKeyUsageOID.CLIENT_AUTH], sans=["kubernetes"])
    with pytest.raises(InvalidMaterial, match="^server.cert: extended key usage serverAuth"):
        pki.check_set(replace(s, server=no_usage))


def test_kubecfg_without_client_auth_is_refused():
    s = make_set()
    bad = raw_cert("kubecfg", s.ca.subject, s.ca_key, s.kubecfg_key,
                   eku=[ExtendedKeyUsageOID.SERVER_AUTH])
    with pytest.raises(InvalidMaterial, match="^kubecfg.crt: extended key usage clientAuth"):
        pki.check_set(replace(s, kubecfg=bad))


def test_trust_must_hold_the_signing_ca():
    s, other = make_set(), make_set()
    with pytest.raises(InvalidMaterial, match="trust bundle"):
        pki.check_set(replace(s, trust=(other.ca,)))


def test_negative_serial_is_refused(tmp_path):
    from tests.conftest import openssl
    key, crt = tmp_path / "k.pem", tmp_path / "c.pem"
    r = openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                "-nodes", "-keyout", str(key), "-out", str(crt), "-subj", "/CN=neg",
                "-set_serial", "-5", "-days", "1")
    assert r.returncode == 0, r.stderr
    with pytest.raises(InvalidMaterial, match="serial"):
        pki.load_certs(crt.read_bytes(), "ca.crt")


def test_weak_and_foreign_keys_are_refused():
    from cryptography.hazmat.primitives.asymmetric import ed25519
    weak = rsa.generate_private_key(65537, 1024)
    with pytest.raises(InvalidMaterial, match="too small"):
        pki.load_key(pki.key_pem(weak), "server.key")
    with pytest.raises(InvalidMaterial, match="^server.key: only RSA"):
        pki.load_key(pki.key_pem(ed25519.Ed25519PrivateKey.generate()), "server.key")
    with pytest.raises(InvalidMaterial, match="^server.key: not an unencrypted PEM") as e:
        # A PEM frame around garbage (spelt in two parts: no key-looking block in the tree).
        pki.load_key(b"-----BEGIN " + b"PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
                     "server.key")
    assert "AAAA" not in str(e.value)


def test_garbage_certificates_are_refused_naming_the_file():
    with pytest.raises(InvalidMaterial, match="^server.cert: no PEM certificate"):
        pki.load_cert(b"hello", "server.cert")
    with pytest.raises(InvalidMaterial, match="^server.cert: not a valid PEM"):
        pki.load_cert(b"-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
                      "server.cert")


def test_every_go_table_mistake_is_refused_before_anything_is_written(tmp_path):
    """FIELD-NOTES' Go table, fed through load + check_set as an import: nothing is written."""
    from tests import badcerts
    from tests.peers import make_store

    store, _ = make_store(tmp_path, "ecdsa-p256")
    files = badcerts.set_files(store)
    table = badcerts.mistakes(files, tmp_path / "work")
    assert {m.name for m in table} == {
        "serving cert without SANs", "negative serial", "serving cert without serverAuth",
        "client cert without clientAuth", "root without CA:TRUE", "root without keyCertSign"}
    generations = sorted(p.name for p in (tmp_path / "data" / "generations").iterdir())
    audit = store.audit(limit=1000)
    store.import_files(files, actor="test")  # the unbroken set goes in: the mistake is all
    for m in table:
        with pytest.raises(InvalidMaterial, match=m.ours):
            store.import_files(m.files, actor="test")
    assert store.latest() == 2
    assert sorted(p.name for p in (tmp_path / "data" / "generations").iterdir()) == [
        *generations, "000002.gen"]
    assert len(store.audit(limit=1000)) == len(audit) + 1
