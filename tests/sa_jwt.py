"""Service-account tokens for the tests: signed here, judged by go-jose (tests/sa_verifier).

The signer is ours (a JWS is a few lines over `cryptography`); the verifier is not: a small Go
program on go-jose, the library kube-apiserver verifies tokens with, built at test time.
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
from pathlib import Path

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

SOURCE = Path(__file__).parent / "sa_verifier" / "main.go"
GOPATH = "/usr/share/gocode"  # Debian's golang-gopkg-square-go-jose.v2-dev


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def sign(key_pem: bytes, subject: str = "system:serviceaccount:kube-system:canal") -> str:
    """A service-account JWT signed with key_pem: RS256 for RSA, ES256/ES384 for ECDSA."""
    key = serialization.load_pem_private_key(key_pem, password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        alg = "RS256"
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        alg = {"secp256r1": "ES256", "secp384r1": "ES384"}[key.curve.name]
    header = {"alg": alg, "typ": "JWT"}
    claims = {"iss": "kubernetes/serviceaccount", "sub": subject,
              "kubernetes.io/serviceaccount/namespace": "kube-system"}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    else:
        digest = hashes.SHA256() if alg == "ES256" else hashes.SHA384()
        r, s = decode_dss_signature(key.sign(signing_input.encode(), ec.ECDSA(digest)))
        size = (key.curve.key_size + 7) // 8
        sig = r.to_bytes(size, "big") + s.to_bytes(size, "big")
    return f"{signing_input}.{_b64(sig)}"


def build(dest: Path) -> Path:
    """Build the verifier offline (GOPATH mode, Debian's go-jose) into dest; return its path."""
    go = shutil.which("go")
    assert go, "go is missing: .ci/system-deps.sh installs golang-go"
    out = dest / "sa_verifier"
    env = {**os.environ, "GO111MODULE": "off", "GOPATH": GOPATH, "GOFLAGS": "",
           "GOCACHE": str(dest / "gocache"), "CGO_ENABLED": "0"}
    p = subprocess.run([go, "build", "-o", str(out), str(SOURCE)], env=env,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    return out


class Verifier:
    """go-jose's answer for tokens against a `--service-account-key-file` bundle."""

    def __init__(self, binary: Path, workdir: Path) -> None:
        self.binary, self.workdir = binary, workdir

    def judge(self, sa_pub: bytes, tokens: list[str]) -> list[bool]:
        """For each token, whether a key of sa_pub verifies it."""
        path = self.workdir / "sa.pub"
        path.write_bytes(sa_pub)
        p = subprocess.run([str(self.binary), str(path)], input="\n".join(tokens) + "\n",
                           capture_output=True, text=True, timeout=60)
        assert p.returncode == 0, p.stderr
        lines = p.stdout.splitlines()
        assert len(lines) == len(tokens), p.stdout
        assert all(x == "ok" or x.startswith("fail: ") for x in lines), p.stdout
        return [x == "ok" for x in lines]

    def verifies(self, sa_pub: bytes, token: str) -> bool:
        return self.judge(sa_pub, [token])[0]
