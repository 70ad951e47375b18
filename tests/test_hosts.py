"""Host reports ([Q]), service side: the report endpoint and its scope, the fleet view, drift,
the gates on staged rotations and `--force`, forgetting and expiring hosts, metrics.

The Salt side (a real master reporting for real minions) is tests/test_hosts_salt.py."""
from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from pkisvc.app import create_app
from pkisvc.store import CertStore
from tests.conftest import make_settings, run_cli

MASTER_FILES = ("ca.crt", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key", "sa.key",
                "sa.pub")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    def __call__(self) -> datetime:
        return self.now


class Fleet:
    """The app, a Salt master's tokens (secrets to fetch pillar, report to report back)."""

    def __init__(self, tmp_path: Any, **settings: Any) -> None:
        self.settings = make_settings(tmp_path / "data", **settings)
        self.app = create_app(self.settings)
        self.store: CertStore = self.app.extensions["pkisvc"]
        self.clock = Clock()
        self.store._clock = self.clock
        self.client = self.app.test_client()
        self.secrets = self.bearer(self.store.create_token("pillar", ["secrets"], actor="t"))
        self.reporter = self.bearer(self.store.create_token("salt-master", ["report"],
                                                            actor="t"))
        self.admin = self.bearer(self.store.create_token("ops", ["admin"], actor="t"))

    @staticmethod
    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    def pillar(self, minion: str, role: str) -> dict[str, str]:
        r = self.client.get(f"/v1/pillar/{minion}?role={role}", headers=self.secrets)
        assert r.status_code == 200, r.text
        return dict(r.get_json()["files"])

    def apply(self, minion: str, role: str, **edits: str | None) -> dict[str, Any]:
        """The minion fetches its pillar, installs it (with edits), and the master reports."""
        files: dict[str, str | None] = dict(self.pillar(minion, role))
        files.update(edits)
        return self.report(minion, {n: sha(v) if v is not None else None
                                    for n, v in files.items()})

    def report(self, minion: str, files: dict[str, str | None], claimed: str | None = None,
               headers: dict[str, str] | None = None, status: int = 200) -> dict[str, Any]:
        r = self.client.post(f"/v1/hosts/{minion}/report",
                             headers=self.reporter if headers is None else headers,
                             json={"minion": claimed or minion, "files": files,
                                   "state": "kubernetes.cert.configured", "result": True})
        assert r.status_code == status, r.text
        return dict(r.get_json())

    def hosts(self) -> dict[str, dict[str, Any]]:
        r = self.client.get("/v1/hosts", headers=self.admin)
        assert r.status_code == 200, r.text
        return {h["minion"]: h for h in r.get_json()["hosts"]}

    def step(self, step: str, status: int = 201, **body: Any) -> dict[str, Any]:
        r = self.client.post(f"/v1/ca/rotate/{step}", headers=self.admin, json=body)
        assert r.status_code == status, r.text
        return dict(r.get_json())


def sha(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


@pytest.fixture
def fleet(tmp_path):
    return Fleet(tmp_path)


def test_a_report_shows_the_installed_version_and_each_files_fingerprint(fleet):
    files = fleet.pillar("k8s-master-1", "master")
    fleet.apply("k8s-master-1", "master")
    host = fleet.hosts()["k8s-master-1"]
    assert host["state"] == "current"
    assert host["delivered"]["version"] == host["installed"]["version"] == 1
    assert {n: f["sha256"] for n, f in host["files"].items()} == {
        n: sha(pem) for n, pem in files.items()}
    assert all(f["version"] == 1 for f in host["files"].values())


def test_a_hand_edited_file_is_drift_named_with_both_fingerprints(fleet):
    fleet.apply("k8s-node-1", "node", **{"ca.crt": "edited by hand\n"})
    host = fleet.hosts()["k8s-node-1"]
    assert host["state"] == "drifted"
    (drift,) = host["drift"]
    assert drift["file"] == "ca.crt" and drift["status"] == "modified"
    assert drift["sha256"] == sha("edited by hand\n") != drift["expected"]
    fleet.apply("k8s-node-1", "node")  # `configured` puts it back
    assert fleet.hosts()["k8s-node-1"]["drift"] == []


def test_a_missing_file_is_drift(fleet):
    fleet.apply("k8s-master-1", "master", **{"server.key": None})
    host = fleet.hosts()["k8s-master-1"]
    assert host["state"] == "drifted"
    assert [(d["file"], d["status"]) for d in host["drift"]] == [("server.key", "missing")]


def test_a_report_for_another_minion_is_refused(fleet):
    fleet.pillar("k8s-node-1", "node")
    fleet.pillar("k8s-master-1", "master")
    before = fleet.hosts()
    body = fleet.report("k8s-node-1", {"ca.crt": "ab" * 32}, claimed="k8s-master-1",
                        status=403)
    assert "reports only for itself" in body["message"]
    assert fleet.hosts() == before  # nothing written


def test_only_a_report_token_may_report(fleet):
    fleet.pillar("k8s-node-1", "node")
    for headers in (fleet.admin, fleet.secrets):
        fleet.report("k8s-node-1", {"ca.crt": "ab" * 32}, headers=headers, status=403)
    fleet.report("k8s-node-1", {"ca.crt": "ab" * 32}, headers={}, status=401)
    assert fleet.hosts()["k8s-node-1"]["installed"] is None


def test_a_report_before_any_delivery_is_refused(fleet):
    body = fleet.report("k8s-node-9", {"ca.crt": "ab" * 32}, status=409)
    assert "never delivered" in body["message"]


@pytest.mark.parametrize("files", [{"../ca.crt": None}, {"ca.crt": "AB" * 32},
                                   {"ca.crt": "not hex"}, {"ca.crt": 7}])
def test_a_malformed_report_is_refused(fleet, files):
    fleet.pillar("k8s-node-1", "node")
    fleet.report("k8s-node-1", files, status=400)


def test_continue_is_refused_naming_the_hosts_behind_until_they_install(fleet):
    fleet.apply("k8s-master-1", "master")
    fleet.apply("k8s-master-2", "master")
    fleet.apply("k8s-node-1", "node")
    fleet.pillar("k8s-node-2", "node")  # delivered, never reported
    r = fleet.client.post("/v1/ca/rotate", headers=fleet.admin, json={"mode": "staged"})
    assert r.status_code == 201
    for m, role in (("k8s-master-1", "master"), ("k8s-node-1", "node")):
        fleet.apply(m, role)
    refused = fleet.step("continue", status=409)
    assert refused["error"] == "hosts_behind"
    assert [h["minion"] for h in refused["hosts"]] == ["k8s-master-2", "k8s-node-2"]
    assert "k8s-master-2 (master) has not installed version 2: ca.crt is version 1's" \
        in refused["message"]
    assert "k8s-node-2 (node) never reported" in refused["message"]
    assert "README.md, 'Host reports'" in refused["message"]
    assert fleet.store.latest() == 2  # nothing written
    fleet.apply("k8s-master-2", "master")
    fleet.apply("k8s-node-2", "node")
    fleet.step("continue")
    # Phase 2 changes only the masters' leaves: nodes already hold phase 2's ca.crt.
    assert fleet.hosts()["k8s-node-1"]["state"] == "current"
    assert [h["minion"] for h in fleet.step("finish", status=409)["hosts"]] == [
        "k8s-master-1", "k8s-master-2"]


def test_force_goes_past_the_gate_and_is_audited_as_forced(fleet):
    fleet.pillar("k8s-master-1", "master")
    fleet.client.post("/v1/ca/rotate", headers=fleet.admin, json={"mode": "staged"})
    done = fleet.step("continue", force=True, reason="master 1 is being rebuilt")
    assert done["reason"].startswith("forced past 1 host(s) not on the current phase "
                                     "(k8s-master-1): master 1 is being rebuilt")
    (event,) = [e for e in fleet.store.audit() if e.action == "ca-stage-switch"]
    assert event.reason.startswith("forced past")


def test_cli_continue_refuses_and_force_overrides(fleet):
    fleet.pillar("k8s-master-1", "master")
    fleet.client.post("/v1/ca/rotate", headers=fleet.admin, json={"mode": "staged"})
    env = {"PKISVC_DATA_DIR": str(fleet.settings.data_dir)}
    r = run_cli("rotation", "continue", env=env)
    assert r.returncode == 1
    assert "k8s-master-1 (master) never reported" in r.stderr
    r = run_cli("rotation", "continue", "--force", env=env)
    assert r.returncode == 0, r.stderr


def test_the_service_account_gate_waits_for_masters_only(fleet):
    fleet.apply("k8s-master-1", "master")
    fleet.pillar("k8s-node-1", "node")  # holds no sa file: never waited for
    r = fleet.client.post("/v1/sa/rotate", headers=fleet.admin, json={"mode": "staged"})
    assert r.status_code == 201, r.text
    r = fleet.client.post("/v1/sa/rotate/continue", headers=fleet.admin, json={})
    assert r.status_code == 409 and [h["minion"] for h in r.get_json()["hosts"]] == [
        "k8s-master-1"]
    fleet.apply("k8s-master-1", "master")
    r = fleet.client.post("/v1/sa/rotate/continue", headers=fleet.admin, json={})
    assert r.status_code == 201, r.text


def test_silent_and_expired_hosts(tmp_path):
    fleet = Fleet(tmp_path, **{"hosts.silent_after": "1h", "hosts.expire_after": "2d"})
    fleet.apply("k8s-master-1", "master")
    fleet.clock.now += timedelta(hours=2)
    assert fleet.hosts()["k8s-master-1"]["state"] == "silent"
    fleet.client.post("/v1/ca/rotate", headers=fleet.admin, json={"mode": "staged"})
    assert fleet.step("continue", status=409)["hosts"][0]["minion"] == "k8s-master-1"
    fleet.clock.now += timedelta(days=3)
    assert fleet.hosts()["k8s-master-1"]["state"] == "expired"
    fleet.step("continue")  # a host gone that long blocks nothing


def test_forget_removes_a_host_and_is_audited(fleet):
    fleet.apply("k8s-master-9", "master")
    env = {"PKISVC_DATA_DIR": str(fleet.settings.data_dir)}
    r = run_cli("hosts", "-o", "json", env=env)
    assert r.returncode == 0, r.stderr
    assert [h["minion"] for h in json.loads(r.stdout)] == ["k8s-master-9"]
    r = run_cli("--actor", "ops", "hosts", "forget", "k8s-master-9", env=env)
    assert r.returncode == 0, r.stderr
    assert fleet.hosts() == {}
    (event,) = [e for e in fleet.store.audit() if e.action == "host-forget"]
    assert (event.actor, event.minion) == ("ops", "k8s-master-9")
    r = run_cli("hosts", "forget", "k8s-master-9", env=env)
    assert r.returncode == 1 and "k8s-master-9" in r.stderr


def test_the_table_names_state_versions_and_drift(fleet):
    fleet.apply("k8s-node-1", "node", **{"ca.crt": "x\n"})
    r = run_cli("hosts", env={"PKISVC_DATA_DIR": str(fleet.settings.data_dir)})
    header, row = r.stdout.splitlines()
    assert header.split() == ["MINION", "ROLE", "STATE", "DELIVERED", "INSTALLED", "REPORTED",
                              "DRIFT"]
    assert row.split()[:4] == ["k8s-node-1", "node", "drifted", "1"]
    assert row.endswith("ca.crt modified")


def test_metrics_count_hosts_by_state(fleet):
    fleet.apply("k8s-master-1", "master")
    fleet.apply("k8s-node-1", "node", **{"ca.crt": "x\n"})
    fleet.pillar("k8s-node-2", "node")
    text = fleet.client.get("/metrics").get_data(as_text=True)
    found = {line.split('state="')[1].split('"')[0]: float(line.split()[-1])
             for line in text.splitlines() if line.startswith("pkisvc_hosts{")}
    assert found == {"current": 1, "behind": 0, "drifted": 1, "silent": 0, "unreported": 1,
                     "expired": 0}


def test_the_minions_page_shows_what_each_host_installed(fleet):
    fleet.apply("k8s-node-1", "node", **{"ca.crt": "x\n"})
    fleet.apply("k8s-master-1", "master")
    page = fleet.client.get("/ui/minions", headers=fleet.admin).get_data(as_text=True)
    node = page.split('data-minion="k8s-node-1"')[1].split("</tr>")[0]
    assert "drifted" in node and "ca.crt modified" in node
    master = page.split('data-minion="k8s-master-1"')[1].split("</tr>")[0]
    assert ">current</span> <span class=\"muted\">v1," in master


def test_hosts_come_in_pages_with_counts_of_all(fleet):
    for i in range(5):
        fleet.apply(f"k8s-node-{i}", "node", **({"ca.crt": "x\n"} if i == 3 else {}))
    r = fleet.client.get("/v1/hosts?limit=2", headers=fleet.admin).get_json()
    assert [h["minion"] for h in r["hosts"]] == ["k8s-node-0", "k8s-node-1"]
    assert r["total"] == 5 and r["counts"]["current"] == 4 and r["next"] == "k8s-node-1"
    r = fleet.client.get("/v1/hosts?limit=2&after=k8s-node-3", headers=fleet.admin).get_json()
    assert [h["minion"] for h in r["hosts"]] == ["k8s-node-4"] and r["next"] is None
    r = fleet.client.get("/v1/hosts?state=drifted", headers=fleet.admin).get_json()
    assert [h["minion"] for h in r["hosts"]] == ["k8s-node-3"]
    assert fleet.client.get("/v1/hosts?state=bad", headers=fleet.admin).status_code == 400
