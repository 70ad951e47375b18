"""A staged CA rotation keeps a real etcd talking to clients one phase behind or ahead; an
immediate rotation does not.  Hosts roll out one at a time, so at every moment some hold the
previous phase's files and some the current one's."""
from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path
from typing import Callable

from pkisvc.store import CertStore
from tests.conftest import wait_for
from tests.peers import Etcd, make_store, write_host_files


def etcdctl(e: Etcd, host: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """etcdctl as a host holding the files in `host` (its own ca.crt, its kubecfg pair)."""
    return subprocess.run(
        ["etcdctl", "--endpoints", e.url, "--dial-timeout", "2s", "--command-timeout", "5s",
         "--cacert", str(host / "ca.crt"), "--cert", str(host / "kubecfg.crt"),
         "--key", str(host / "kubecfg.key"), *args],
        capture_output=True, text=True, env={"PATH": os.environ["PATH"], "ETCDCTL_API": "3"},
        timeout=30)


def talks(e: Etcd, host: Path, value: str) -> None:
    r = etcdctl(e, host, "put", "/registry/phase", value)
    assert r.returncode == 0 and r.stdout.strip() == "OK", (host.name, r.stderr)
    r = etcdctl(e, host, "get", "/registry/phase", "--print-value-only")
    assert r.returncode == 0 and r.stdout.strip() == value, (host.name, r.stderr)


def neighbours_talk(store: CertStore, hosts: dict[int, Path], server: Path, work: Path,
                    tolerated: Callable[[int, str], bool] = lambda cur, words: False) -> None:
    """For each phase after the first: etcd at it, a client one phase behind and one at it
    talk, and etcd refuses no connection (but those tolerated(phase, etcd's words))."""
    phases = sorted(hosts)
    for prev, cur in itertools.pairwise(phases):
        # The etcd host is at `cur` (restarted: etcd reads its trusted CA file only at start);
        # one client is still at `prev`, one is at `cur` too.
        write_host_files(store, server, version=cur)
        e = Etcd(server, work / f"etcd-{cur}")
        e.workdir.mkdir()
        e.start()
        try:
            talks(e, hosts[prev], f"from v{prev}")
            talks(e, hosts[cur], f"from v{cur}")
            assert [w for w in e.rejections() if not tolerated(cur, w)] == []
        finally:
            e.stop()


def test_every_phase_talks_to_its_neighbours_and_an_immediate_rotation_does_not(tmp_path):
    store, _ = make_store(tmp_path / "store", "ecdsa-p256")
    hosts = {1: write_host_files(store, tmp_path / "v1")}
    store.start_rotation(actor="test")
    hosts[2] = write_host_files(store, tmp_path / "v2")
    store.continue_rotation(actor="test")
    hosts[3] = write_host_files(store, tmp_path / "v3")
    store.finish_rotation(actor="test")
    hosts[4] = write_host_files(store, tmp_path / "v4")
    assert [r.operation for r in store.versions()][:3] == [
        "ca-stage-finish", "ca-stage-switch", "ca-stage-trust"]

    server = tmp_path / "etcd-host"
    neighbours_talk(store, hosts, server, tmp_path)

    # The contrast: the seed's immediate rotation.  A client still at v4 is shut out.
    store.rotate_ca(actor="test", reason="immediate")
    hosts[5] = write_host_files(store, tmp_path / "v5")
    write_host_files(store, server)
    e = Etcd(server, tmp_path / "etcd-5")
    e.workdir.mkdir()
    e.start()
    try:
        talks(e, hosts[5], "from v5")
        # The v4 host no longer trusts the server: it hangs up during the handshake ...
        r = etcdctl(e, hosts[4], "get", "/registry/phase")
        assert r.returncode != 0
        words = wait_for(e.rejections, timeout=15, what="etcd to see the v4 client give up")
        assert any("bad certificate" in w for w in words), words
        # ... and even trusting the new CA, its own client pair is refused by the server.
        before = len(e.rejections())
        r = e.curl(hosts[4] / "kubecfg.crt", hosts[4] / "kubecfg.key")
        assert r.returncode != 0
        words = wait_for(lambda: e.rejections()[before:], timeout=15,
                         what="etcd to refuse the v4 client pair")
        assert any("certificate signed by unknown authority" in w for w in words), words
    finally:
        e.stop()
