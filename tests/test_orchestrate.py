"""kubernetes.cert.orch.rotate on a salt-master with three minions (two masters, one node):
the seed's order, one master at a time, a failing master stops the run, a staged rotation
rolls out after each of its phases, and a target that is down or lacks a restart state stops
the run before anything is rotated."""
from __future__ import annotations

import hashlib
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import run_cli
from tests.easyrsa import LAYOUT, make_cluster, seed_files
from tests.peers import HOST_FILES
from tests.salt_fixtures import Cluster, Service

MINIONS = ("k8s-master-1", "k8s-master-2", "k8s-node-1")


@pytest.fixture(scope="module")
def world():
    # Short root: Salt's IPC socket paths must stay under 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="k8s-orch-", dir="/tmp"))
    log = base / "rollout.log"
    log.touch()
    marker = base / "fail"
    states = base / "states" / "k8stest"
    states.mkdir(parents=True)
    # The restart state the orchestration applies after kubernetes.cert.configured: it logs
    # which minion restarted and the ca.crt it found installed (so the order is visible).
    (states / "restart.sls").write_text(
        "{%- set prefix = salt['pillar.get']('kubernetes:cert:lookup:prefix', '') %}\n"
        "k8stest-restart:\n"
        "  cmd.run:\n"
        f"    - name: test ! -e {marker}-{{{{ grains.id }}}} && echo \"{{{{ grains.id }}}} "
        f"restart $(sha256sum < {{{{ prefix }}}}/srv/kubernetes/ca.crt | cut -c1-16)\" "
        f">> {log}\n")
    # A restart state that, on master 1 only, stops master 2's salt-minion: a minion that
    # stops answering in the middle of a run.
    # Its whole process group at once (the test writes its id: it runs in its own session);
    # through Python, since the minion's /bin/sh may be dash, whose kill takes no process group.
    (states / "stop_peer.sls").write_text(
        "{%- if grains.id == 'k8s-master-1' %}\n"
        f"k8stest-stop-peer:\n  cmd.run:\n    - name: {sys.executable} -c 'import os, signal; "
        f"os.killpg(int(open(\"{base}/peer.pgid\").read()), signal.SIGKILL)'\n"
        "{%- else %}\nk8stest-stop-peer:\n  test.nop\n{%- endif %}\n")
    service = Service(base / "svc").start()
    cluster = Cluster(base, service, {m: {} for m in MINIONS}, file_roots=[base / "states"])
    try:
        yield cluster.start(), log, marker
    finally:
        cluster.stop()
        service.stop()
        shutil.rmtree(base, ignore_errors=True)


def orchestrate(cluster: Cluster, log: Path, **orch: Any) -> tuple[bool, list[str]]:
    """Run the orchestration (default targets); return whether it succeeded and the log lines
    it added."""
    ok, lines, _ = orchestrate_out(cluster, log, **orch)
    return ok, lines


def orchestrate_out(cluster: Cluster, log: Path, **orch: Any) -> tuple[bool, list[str], str]:
    """The same, and what salt-run printed."""
    before = len(log.read_text().splitlines())
    conf = {"restart_states": ["k8stest.restart"], "answer_timeout": 5,
            "post_commands": [f"echo post kube-system secrets >> {log}",
                              f"echo post canal pods >> {log}"],
            "runner": {"token_file": str(cluster.service.data / "admin.token")}, **orch}
    r = cluster.run("state.orchestrate", "kubernetes.cert.orch.rotate",
                    "pillar=" + json.dumps({"kubernetes": {"cert": {"orch": conf}}}))
    ok = r.returncode == 0
    if not ok:
        assert "Traceback" not in r.stdout + r.stderr, r.stderr[-3000:]
    return ok, log.read_text().splitlines()[before:], r.stdout


def trust_hash(cluster: Cluster) -> str:
    pem = requests.get(f"{cluster.service.url}/v1/ca", timeout=10).json()["pem"].encode()
    return hashlib.sha256(pem).hexdigest()[:16]


def rollout(trust: str, minions: tuple[str, ...] = MINIONS) -> list[str]:
    return [f"{m} restart {trust}" for m in minions]


def operations(cluster: Cluster) -> list[str]:
    r = requests.get(f"{cluster.service.url}/v1/versions", headers=cluster.service.admin(),
                     timeout=10)
    return [v["operation"] for v in r.json()["versions"]]


def test_immediate_rotation_in_the_seeds_order(world):
    cluster, log, _ = world
    ok, lines = orchestrate(cluster, log, rotate="immediate", reason="yearly")
    assert ok, lines
    assert operations(cluster)[0] == "rotate-ca"
    assert lines == [*rollout(trust_hash(cluster)), "post kube-system secrets",
                     "post canal pods"]


def test_staged_rotation_rolls_out_after_each_phase(world):
    cluster, log, _ = world
    before = trust_hash(cluster)
    ok, lines = orchestrate(cluster, log, rotate="staged", post_commands=[])
    assert ok, lines
    assert operations(cluster)[:3] == ["ca-stage-finish", "ca-stage-switch", "ca-stage-trust"]
    both, new_only = lines[0].split()[-1], lines[-1].split()[-1]
    assert len({before, both, new_only}) == 3  # old -> old+new (phases 1, 2) -> new
    # Phase 2 re-issues the leaves: the node holds only ca.crt, unchanged, so it is not
    # restarted then.
    assert lines == rollout(both) + rollout(both, MINIONS[:2]) + rollout(new_only)
    assert new_only == trust_hash(cluster)


def test_a_failing_master_stops_the_run(world):
    cluster, log, marker = world
    second = cluster.hosts / "k8s-master-2" / "srv/kubernetes/ca.crt"
    untouched = second.read_bytes()
    Path(f"{marker}-k8s-master-1").touch()
    try:
        ok, lines = orchestrate(cluster, log, rotate="immediate")
    finally:
        Path(f"{marker}-k8s-master-1").unlink()
    assert not ok
    assert lines == []  # master 1 failed its restart: nothing after it ran
    assert second.read_bytes() == untouched  # master 2 still holds the previous version
    # The rotation itself happened; running again (rotate: none) finishes the rollout, with
    # restarts forced, since master 1's files are already in place.
    ok, lines = orchestrate(cluster, log, rotate="none", restart="always", post_commands=[])
    assert ok and lines == rollout(trust_hash(cluster))


def test_nothing_changed_nothing_restarted(world):
    """What an hourly schedule (rotate: renew) does when nothing is due: no restart anywhere."""
    cluster, log, _ = world
    versions = len(operations(cluster))
    ok, lines = orchestrate(cluster, log, rotate="renew", post_commands=[])
    assert ok and lines == []
    assert len(operations(cluster)) == versions


def test_a_bad_rotate_value_fails_before_anything(world):
    cluster, log, _ = world
    versions = len(operations(cluster))
    ok, lines = orchestrate(cluster, log, rotate="sideways")
    assert not ok and lines == []
    assert len(operations(cluster)) == versions


def failed_comments(out: str) -> list[str]:
    """The comments of the orchestration's failed states."""
    (states,) = json.loads(out)["data"].values()
    return [v["comment"] for v in states.values()
            if isinstance(v, dict) and v.get("result") is False]


def latest(cluster: Cluster) -> tuple[int, str]:
    certs = cluster.service.fingerprints()
    return certs["version"], certs["items"]["ca"]["fingerprint"]


def test_a_master_that_is_down_stops_the_run_before_anything_is_rotated(world):
    cluster, log, _ = world
    before, hosts = latest(cluster), snapshot_hosts(cluster)
    cluster.minion("k8s-master-2").stop()
    try:
        ok, lines, out = orchestrate_out(cluster, log, rotate="immediate")
    finally:
        cluster.restart_minion("k8s-master-2")
    assert not ok and lines == []
    (comment,) = failed_comments(out)
    assert comment.startswith("nothing rotated: did not answer: k8s-master-2 ("), comment
    assert latest(cluster) == before
    assert snapshot_hosts(cluster) == hosts


def test_a_missing_restart_state_stops_the_run_before_anything_is_rotated(world):
    cluster, log, _ = world
    before, hosts = latest(cluster), snapshot_hosts(cluster)
    ok, lines, out = orchestrate_out(cluster, log, rotate="immediate",
                                     restart_states=["k8stest.restart", "kubernetes.running"])
    assert not ok and lines == []
    (comment,) = failed_comments(out)
    assert comment.startswith("nothing rotated: k8s-master-1: "), comment
    for minion in MINIONS:
        assert f"{minion}: No matching sls found for 'kubernetes.running'" in comment
    assert latest(cluster) == before
    assert snapshot_hosts(cluster) == hosts


def test_targets_come_from_accepted_keys(world):
    """A listed id without an accepted key is named; a pattern is matched on the whole id."""
    cluster, log, _ = world
    before = latest(cluster)
    ok, lines, out = orchestrate_out(cluster, log, rotate="immediate",
                                     masters=["k8s-master-1", "k8s-master-9"])
    assert not ok and lines == []
    assert failed_comments(out) == ["nothing rotated: masters: no accepted key for k8s-master-9"]
    ok, lines, out = orchestrate_out(cluster, log, rotate="immediate", masters="k8s-master")
    assert not ok and lines == []
    assert failed_comments(out) == [
        "nothing rotated: masters: no accepted minion key matches 'k8s-master'"]
    assert latest(cluster) == before


def test_a_master_that_stops_answering_mid_run_fails_the_run(world):
    cluster, log, _ = world
    node = snapshot_hosts(cluster, "k8s-node-1")
    second = snapshot_hosts(cluster, "k8s-master-2")
    peer = cluster.minion("k8s-master-2").proc
    assert peer is not None
    (cluster.base / "peer.pgid").write_text(f"{peer.pid}\n")
    try:
        ok, lines, out = orchestrate_out(cluster, log, rotate="immediate", post_commands=[],
                                         restart_states=["k8stest.stop_peer", "k8stest.restart"])
        assert not ok
        assert lines == rollout(trust_hash(cluster), MINIONS[:1])  # master 1 only
        assert any("k8s-master-2" in c for c in failed_comments(out)), failed_comments(out)
        assert snapshot_hosts(cluster, "k8s-master-2") == second
        assert snapshot_hosts(cluster, "k8s-node-1") == node
    finally:
        cluster.restart_minion("k8s-master-2")
    ok, lines = orchestrate(cluster, log, rotate="none", restart="always", post_commands=[])
    assert ok and lines == rollout(trust_hash(cluster))


def snapshot_hosts(cluster: Cluster, minion: str = "") -> dict[str, bytes]:
    """Every regular file's bytes under the minions' host roots."""
    return {str(p): p.read_bytes() for p in sorted((cluster.hosts / minion).rglob("*"))
            if p.is_file() and not p.is_symlink()}


def test_service_account_rotation_rolls_out_to_masters_and_cleans_up_only_when_asked(world):
    """[M]: `sa-staged` publishes then switches the key, rolled out to the masters after each
    phase (nodes hold no SA file: untouched); `sa-finish` is refused before sa.overlap, and
    forced it drops the old key; the clean-up runs only then, and only as asked."""
    cluster, log, _ = world
    assert orchestrate(cluster, log, rotate="none", post_commands=[])[0]  # every host current
    trust = trust_hash(cluster)
    sa_post = [f"echo sa post legacy secrets >> {log}"]
    ok, lines = orchestrate(cluster, log, rotate="sa-staged", post_commands=[],
                            sa_post_commands=sa_post)
    assert ok, lines
    assert operations(cluster)[:2] == ["sa-stage-switch", "sa-stage-publish"]
    assert lines == rollout(trust, MINIONS[:2]) * 2  # masters only, no clean-up
    ok, lines = orchestrate(cluster, log, rotate="sa-finish", post_commands=[],
                            sa_post_commands=sa_post)
    assert not ok and lines == []  # sa.overlap (7d) has not passed: nothing rolled out
    assert operations(cluster)[0] == "sa-stage-switch"
    ok, lines = orchestrate(cluster, log, rotate="sa-finish", sa_force=True, post_commands=[],
                            sa_post_commands=sa_post, reason="test")
    assert ok, lines
    assert operations(cluster)[0] == "sa-stage-finish"
    assert lines == [*rollout(trust, MINIONS[:2]), "sa post legacy secrets"]
    master = cluster.hosts / "k8s-master-1" / "srv/kubernetes"
    assert (master / "sa.pub").read_bytes().count(b"BEGIN PUBLIC KEY") == 1
    assert not (cluster.hosts / "k8s-node-1" / "srv/kubernetes/sa.pub").exists()


def test_an_adopted_cluster_rolls_out_with_no_change_and_no_restart(world):
    """Issue 15: import an easy-rsa cluster whose files the hosts hold already; the rollout
    changes no file (sha256 before and after) and restarts nothing."""
    cluster, log, _ = world
    made = make_cluster(cluster.base / "easyrsa")
    r = run_cli("import", "--from-dir", str(seed_files(made, cluster.base / "adopt")),
                env={"PKISVC_DATA_DIR": str(cluster.service.data)})
    assert r.returncode == 0 and r.stdout.startswith("version "), r.stderr
    original = {name: (made / where).read_bytes() for name, where in LAYOUT.items()}
    for minion in MINIONS:  # what the old procedure left on each host
        root = cluster.hosts / minion
        names = HOST_FILES if minion.startswith("k8s-master") else ("ca.crt",)
        for path, name in [*((f"srv/kubernetes/{n}", n) for n in names),
                           ("usr/local/share/ca-certificates/kubernetes-ca.crt", "ca.crt"),
                           ("var/lib/kubelet/ca.crt", "ca.crt")]:
            (root / path).parent.mkdir(parents=True, exist_ok=True)
            (root / path).write_bytes(original[name])
            (root / path).chmod(0o600 if name.endswith(".key") else 0o644)
        link = root / "etc/ssl/certs/kubernetes.pem"
        if not link.is_symlink():
            link.symlink_to("/usr/local/share/ca-certificates/kubernetes-ca.crt")
    before = {p: hashlib.sha256(b).hexdigest() for p, b in snapshot_hosts(cluster).items()}

    ok, lines, out = orchestrate_out(cluster, log, rotate="none", post_commands=[])
    assert ok and lines == [], out[-5000:]  # no restart state ran
    after = {p: hashlib.sha256(b).hexdigest() for p, b in snapshot_hosts(cluster).items()}
    assert {p: after.get(p) for p in before} == before
    # Only the formula's record of its lookup may be new (when no earlier run wrote it).
    assert {Path(p).name for p in set(after) - set(before)} <= {"lookup.json"}
