"""A cluster made the old way: Debian's easy-rsa, as kube-up's make-ca-cert.sh did (FIELD-NOTES)."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

EASYRSA = Path("/usr/share/easy-rsa/easyrsa")  # Debian's easy-rsa: not on PATH
SERVER = "k8s-master-1"
# Seven SANs, as make-ca-cert.sh gave them: the in-cluster names, the master, the service IP,
# and the address etcd and the tests reach it at.
SANS = ("kubernetes", "kubernetes.default", "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local", SERVER, "10.0.0.1", "127.0.0.1")
# Where easy-rsa keeps each file, by the name pkisvc imports it as.
LAYOUT = {"ca.crt": "ca.crt", "ca.key": "private/ca.key",
          "server.cert": f"issued/{SERVER}.crt", "server.key": f"private/{SERVER}.key",
          "kubecfg.crt": "issued/kubecfg.crt", "kubecfg.key": "private/kubecfg.key"}


def easyrsa(pki: Path, *args: str, **env: str) -> None:
    if not EASYRSA.exists():
        pytest.fail(f"no {EASYRSA}: run `bash .ci/system-deps.sh` as root (Debian easy-rsa)")
    r = subprocess.run([str(EASYRSA), "--batch", f"--pki-dir={pki}", *args],
                       capture_output=True, text=True, timeout=120, cwd=pki.parent,
                       env={"PATH": os.environ["PATH"], "EASYRSA_BATCH": "1", **env})
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-2000:])


def make_cluster(root: Path, sans: tuple[str, ...] = SANS) -> Path:
    """Make a CA, a server pair with sans and a kubecfg pair under root/pki; return it."""
    root.mkdir(parents=True, exist_ok=True)
    pki = root / "pki"
    easyrsa(pki, "init-pki")
    easyrsa(pki, "build-ca", "nopass", EASYRSA_REQ_CN="kubernetes-ca")
    alt = ",".join(("IP:" if s[0].isdigit() else "DNS:") + s for s in sans)
    easyrsa(pki, f"--subject-alt-name={alt}", "build-server-full", SERVER, "nopass")
    easyrsa(pki, "build-client-full", "kubecfg", "nopass")
    return pki


def seed_files(pki: Path, dest: Path, *, ca_key: bool = True) -> Path:
    """Copy easy-rsa's files to dest under the seed's names (as the README says); return dest."""
    dest.mkdir(parents=True, exist_ok=True)
    for name, where in LAYOUT.items():
        if name != "ca.key" or ca_key:
            shutil.copyfile(pki / where, dest / name)
    return dest
