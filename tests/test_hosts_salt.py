"""Host reports ([Q]) through a real salt-master with three minions on loopback: the master
reports what `kubernetes.cert.configured` installed (minions hold no pkisvc token), drift on
a node, and the staged rotation's gate waiting for a master that was down."""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.conftest import wait_for
from tests.salt_fixtures import Cluster, Service

MINIONS = ("k8s-master-1", "k8s-master-2", "k8s-node-1")
ROLE_FILES = {"master": ("ca.crt", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key",
                         "sa.key", "sa.pub"), "node": ("ca.crt",)}


@pytest.fixture(scope="module")
def cluster():
    # Short root: Salt's IPC socket paths must stay under 108 bytes.
    base = Path(tempfile.mkdtemp(prefix="k8s-hosts-", dir="/tmp"))
    # A host that lies: its view names another minion (what a minion setting its own `id`
    # grain would make kubernetes.cert.view say).
    states = base / "states" / "k8stest"
    states.mkdir(parents=True)
    (states / "liar.sls").write_text(
        "kubernetes-cert-view:\n  test.show_notification:\n"
        "    - text: '{minion: k8s-master-1, files: {ca.crt: {installed: false}}}'\n")
    service = Service(base / "svc").start()
    world = Cluster(base, service, {m: {} for m in MINIONS}, file_roots=[base / "states"],
                    reactor=True)
    try:
        yield world.start()
    finally:
        world.stop()
        service.stop()
        shutil.rmtree(base, ignore_errors=True)


def orchestrate(cluster: Cluster, **orch: Any) -> tuple[bool, str]:
    conf = {"answer_timeout": 5, "gate_wait": 5,
            "runner": {"token_file": str(cluster.service.data / "admin.token")}, **orch}
    r = cluster.run("state.orchestrate", "kubernetes.cert.orch.rotate",
                    "pillar=" + json.dumps({"kubernetes": {"cert": {"orch": conf}}}))
    return r.returncode == 0, r.stdout + r.stderr[-3000:]


def report(cluster: Cluster, *minions: str) -> dict[str, Any]:
    r = cluster.run("pkisvc.report", "minions=" + ",".join(minions))
    assert r.returncode == 0, r.stdout + r.stderr[-3000:]
    return dict(json.loads(r.stdout))


def hosts(cluster: Cluster) -> dict[str, dict[str, Any]]:
    r = requests.get(f"{cluster.service.url}/v1/hosts", headers=cluster.service.admin(),
                     timeout=30)
    assert r.status_code == 200, r.text
    return {h["minion"]: h for h in r.json()["hosts"]}


def on_disk(cluster: Cluster, minion: str, role: str) -> dict[str, str]:
    d = cluster.hosts / minion / "srv/kubernetes"
    return {n: hashlib.sha256((d / n).read_bytes()).hexdigest() for n in ROLE_FILES[role]}


def step(cluster: Cluster, name: str) -> requests.Response:
    return requests.post(f"{cluster.service.url}/v1/ca/rotate/{name}", json={},
                         headers=cluster.service.admin(), timeout=60)


def test_after_configured_each_host_shows_what_is_on_its_disk(cluster):
    ok, out = orchestrate(cluster)
    assert ok, out
    current = requests.get(f"{cluster.service.url}/v1/ca", timeout=10).json()["version"]
    found = hosts(cluster)
    assert sorted(found) == list(MINIONS)
    for minion, host in found.items():
        role = "master" if "master" in minion else "node"
        assert host["role"] == role and host["state"] == "current", host
        assert host["installed"]["version"] == host["delivered"]["version"] == current
        assert host["installed"]["state"] == "kubernetes.cert.configured"
        assert {n: f["sha256"] for n, f in host["files"].items()} == on_disk(cluster, minion,
                                                                             role)


def test_a_hand_run_configured_reports_through_the_reactor(cluster):
    """No `pkisvc.report` by anyone: the formula's reactor reports after a state.apply made
    by hand, and after a highstate-style `state.apply` of kubernetes.cert."""
    r = requests.post(f"{cluster.service.url}/v1/certs/kubecfg/rotate", json={},
                      headers=cluster.service.admin(), timeout=60)
    assert r.status_code == 201, r.text
    version = r.json()["version"]
    for minion, sls in (("k8s-master-1", "kubernetes.cert.configured"),
                        ("k8s-master-2", "kubernetes.cert")):
        cluster.salt(minion, "saltutil.refresh_pillar", "wait=True")
        states = cluster.apply(minion, sls)
        assert all(s["result"] for s in states.values()), states
    wait_for(lambda: all(hosts(cluster)[m]["installed"]["version"] == version
                         for m in ("k8s-master-1", "k8s-master-2")), 120,
             "the reactor's reports of both masters")
    for minion in ("k8s-master-1", "k8s-master-2"):
        host = hosts(cluster)[minion]
        assert host["state"] == "current" and host["drift"] == [], host
        assert {n: f["sha256"] for n, f in host["files"].items()} == on_disk(cluster, minion,
                                                                             "master")


def test_a_hand_edited_ca_is_drift_within_one_report_and_configured_clears_it(cluster):
    ca = cluster.hosts / "k8s-node-1" / "srv/kubernetes/ca.crt"
    ca.write_text(ca.read_text() + "# a hand edit\n")
    assert report(cluster, "k8s-node-1") == {"reported": {"k8s-node-1": "drifted"},
                                             "failed": {}}
    (drift,) = hosts(cluster)["k8s-node-1"]["drift"]
    assert drift["file"] == "ca.crt" and drift["status"] == "modified"
    assert drift["sha256"] == hashlib.sha256(ca.read_bytes()).hexdigest()
    states = cluster.apply("k8s-node-1", "kubernetes.cert.configured")
    assert all(s["result"] for s in states.values()), states
    assert report(cluster, "k8s-node-1")["reported"] == {"k8s-node-1": "current"}
    assert hosts(cluster)["k8s-node-1"]["drift"] == []


def test_continue_waits_for_a_master_that_was_down(cluster):
    r = requests.post(f"{cluster.service.url}/v1/ca/rotate", json={"mode": "staged"},
                      headers=cluster.service.admin(), timeout=60)
    assert r.status_code == 201, r.text
    phase1 = r.json()["version"]
    cluster.minion("k8s-master-2").stop()
    try:
        up = ["k8s-master-1", "k8s-node-1"]
        for m in up:
            cluster.salt(m, "saltutil.refresh_pillar", "wait=True")
        applied = {m: cluster.apply(m, "kubernetes.cert.configured") for m in up}
        assert all(all(s["result"] for s in states.values()) for states in applied.values())
        assert report(cluster, *up)["failed"] == {}
        refused = step(cluster, "continue")
        assert refused.status_code == 409, refused.text
        assert [h["minion"] for h in refused.json()["hosts"]] == ["k8s-master-2"]
        assert f"has not installed version {phase1}" in refused.json()["message"]
        # The orchestration waits on the same gate, then fails naming the host.
        ok, out = orchestrate(cluster, rotate="continue", masters=["k8s-master-1"],
                              nodes=["k8s-node-1"])
        assert not ok and "hosts_behind" in out and "Traceback" not in out
        assert "k8s-master-2 (master) has not installed version" in out
    finally:
        cluster.restart_minion("k8s-master-2")
    cluster.salt("k8s-master-2", "saltutil.refresh_pillar", "wait=True")
    states = cluster.apply("k8s-master-2", "kubernetes.cert.configured")
    assert all(s["result"] for s in states.values()), states
    assert report(cluster, "k8s-master-2")["reported"] == {"k8s-master-2": "current"}
    # Now the orchestration's continue goes through, rolls phase 2 out and reports it.
    ok, out = orchestrate(cluster, rotate="continue")
    assert ok, out
    assert {h["state"] for h in hosts(cluster).values()} == {"current"}
    assert step(cluster, "finish").status_code == 201


def test_a_host_claiming_another_minions_id_is_refused(cluster):
    before = hosts(cluster)["k8s-master-1"]
    r = cluster.run("pkisvc.report", "minions=k8s-node-1", "sls=k8stest.liar")
    out = json.loads(r.stdout)
    assert out["reported"] == {}
    assert "403" in out["failed"]["k8s-node-1"]
    assert "reports only for itself" in out["failed"]["k8s-node-1"]
    assert hosts(cluster)["k8s-master-1"] == before


def test_the_orchestrations_force_goes_past_a_host_that_never_reported(cluster):
    """Pillar `force: true` is the CLI's --force for the orchestration's CA steps: the step
    goes through at once and the version and its event say forced, naming the host."""
    ghost = "k8s-master-9"  # delivered its pillar once (so known, a master), never reported
    r = requests.get(f"{cluster.service.url}/v1/pillar/{ghost}?role=master", timeout=30, headers={
        "Authorization": f"Bearer {cluster.service.token_file.read_text().strip()}"})
    assert r.status_code == 200, r.text
    r = requests.post(f"{cluster.service.url}/v1/ca/rotate", json={"mode": "staged"},
                      headers=cluster.service.admin(), timeout=60)
    assert r.status_code == 201, r.text
    try:
        ok, out = orchestrate(cluster)  # phase 1 rolled out and reported: only the ghost lags
        assert ok, out
        refused = step(cluster, "continue")
        assert refused.status_code == 409, refused.text
        assert [h["minion"] for h in refused.json()["hosts"]] == [ghost]
        assert f"{ghost} (master) never reported" in refused.json()["message"]
        ok, out = orchestrate(cluster, rotate="continue", force=True, reason="ghost")
        assert ok, out
        latest = requests.get(f"{cluster.service.url}/v1/versions", timeout=30,
                              headers=cluster.service.admin()).json()["versions"][0]
        assert latest["operation"] == "ca-stage-switch"
        assert latest["reason"] == ("forced past 1 host(s) not on the current phase "
                                    f"({ghost}): ghost"), latest
        events = requests.get(f"{cluster.service.url}/v1/audit", timeout=30,
                              headers=cluster.service.admin()).json()["events"]
        (switch,) = [e for e in events if e.get("version") == latest["version"]
                     and e["action"] == "ca-stage-switch"]
        assert switch["reason"] == latest["reason"]
    finally:
        assert requests.delete(f"{cluster.service.url}/v1/hosts/{ghost}", timeout=30,
                               headers=cluster.service.admin()).status_code == 204
    assert step(cluster, "finish").status_code == 201  # every host left has phase 2
