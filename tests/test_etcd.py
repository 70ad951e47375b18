"""Debian's etcd (Go) judges our material: it serves server.cert/server.key with client-cert
auth against ca.crt, and etcdctl/curl come in with kubecfg pairs."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pkisvc.model import KEY_TYPES
from tests import badcerts
from tests.conftest import wait_for
from tests.peers import Etcd, make_store, write_host_files


@pytest.fixture
def etcd(tmp_path):
    """Start etcd on a directory of host files; every member is stopped by PID at the end."""
    started: list[Etcd] = []

    def start(certs: Path) -> Etcd:
        e = Etcd(certs, tmp_path / f"etcd{len(started)}")
        e.workdir.mkdir()
        started.append(e)
        e.start()
        return e
    yield start
    for e in started:
        e.stop()


def put_get(e: Etcd, cert: str, key: str, k: str, v: str) -> None:
    r = e.etcdctl(cert, key, "put", k, v)
    assert r.returncode == 0 and r.stdout.strip() == "OK", r.stderr
    r = e.etcdctl(cert, key, "get", k, "--print-value-only")
    assert r.returncode == 0 and r.stdout.strip() == v, r.stderr


def refused(e: Etcd, cert: str | Path, key: str | Path, why: str) -> None:
    """The pair does not get in, and etcd's log says why in Go's words."""
    before = len(e.rejections())
    r = e.curl(cert, key)
    assert r.returncode != 0 and '"health"' not in r.stdout, r.stdout
    words = wait_for(lambda: e.rejections()[before:], timeout=10, what="etcd's rejection")
    assert any(why in w for w in words), words


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_etcd_takes_kubecfg_refuses_foreign_and_pre_rotation_pairs(tmp_path, etcd, key_type):
    store, _ = make_store(tmp_path / "ours", key_type)
    other, _ = make_store(tmp_path / "other", "ecdsa-p256")
    certs = write_host_files(store, tmp_path / "srv")
    foreign = write_host_files(other, tmp_path / "foreign")
    e = etcd(certs)
    put_get(e, "kubecfg.crt", "kubecfg.key", "/registry/k", f"v1-{key_type}")
    refused(e, foreign / "kubecfg.crt", foreign / "kubecfg.key",
            "x509: certificate signed by unknown authority")

    old = tmp_path / "old"
    old.mkdir()
    for n in ("kubecfg.crt", "kubecfg.key"):
        shutil.copy2(certs / n, old / n)
    store.rotate_ca(actor="test", reason="compromised")
    write_host_files(store, certs)  # as the formula lays down the new version
    e.restart()  # etcd reads --trusted-ca-file only at start
    refused(e, old / "kubecfg.crt", old / "kubecfg.key",
            "x509: certificate signed by unknown authority")
    r = e.etcdctl("kubecfg.crt", "kubecfg.key", "get", "/registry/k", "--print-value-only")
    assert r.returncode == 0 and r.stdout.strip() == f"v1-{key_type}", r.stderr
    put_get(e, "kubecfg.crt", "kubecfg.key", "/registry/k", "v2")


def test_etcdctl_with_a_foreign_pair_only_times_out(tmp_path, etcd):
    store, _ = make_store(tmp_path / "ours", "ecdsa-p256")
    other, _ = make_store(tmp_path / "other", "ecdsa-p256")
    certs = write_host_files(store, tmp_path / "srv")
    foreign = write_host_files(other, tmp_path / "foreign")
    e = etcd(certs)
    r = e.etcdctl(foreign / "kubecfg.crt", foreign / "kubecfg.key", "get", "k", timeout="1s")
    assert r.returncode != 0
    assert "context deadline exceeded" in r.stderr  # the reason is only in etcd's log:
    words = wait_for(e.rejections, timeout=10, what="etcd's rejection")
    assert any("signed by unknown authority" in w for w in words), words


def test_etcd_refuses_a_client_cert_without_client_auth(tmp_path, etcd):
    store, _ = make_store(tmp_path, "ecdsa-p256")
    certs = write_host_files(store, tmp_path / "srv")
    files = badcerts.set_files(store)
    m = next(m for m in badcerts.mistakes(files, tmp_path / "work")
             if m.name == "client cert without clientAuth")
    (certs / "noclientauth.crt").write_bytes(m.files["kubecfg.crt"])
    e = etcd(certs)
    refused(e, "noclientauth.crt", "kubecfg.key", m.go)
