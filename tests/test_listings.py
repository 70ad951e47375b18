"""The listings of minions and hosts (the minions page, `GET /v1/hosts`, `pkisvc hosts`, the
metrics) are served from what a process holds, made again only when something changed:
another process's write still shows within the bound (at once on the files backend, within
`vault.version_ttl` on Vault), and this process's own write at once."""
from __future__ import annotations

import json
import re
import time
from datetime import timedelta

from pkisvc.app import create_app
from pkisvc.backends import load_backend
from pkisvc.store import CertStore
from tests.conftest import make_settings, run_cli, wait_for

SLACK = 15.0  # added to the bound for polling: a shared 2-core machine under load
TTL = 0.5


def listed(client, headers) -> dict[str, set[str]]:
    """The minions each listing of one process names."""
    hosts = client.get("/v1/hosts", headers=headers)
    page = client.get("/ui/minions", headers=headers)
    metrics = client.get("/metrics")
    assert hosts.status_code == page.status_code == metrics.status_code == 200
    counted = sum(float(n) for n in re.findall(r'^pkisvc_hosts\{[^}]*\} (\S+)$',
                                                metrics.text, re.M))
    api = {h["minion"] for h in hosts.get_json()["hosts"]}
    return {"api": api, "page": set(re.findall(r'data-minion="([^"]+)"', page.text)),
            "metrics": api if counted == len(api) else {f"{counted} counted"}}


def same_everywhere(client, headers, minions: set[str]) -> bool:
    return all(seen == minions for seen in listed(client, headers).values())


def test_another_process_s_write_shows_in_every_listing_within_the_bound(service_store,
                                                                          tmp_path):
    env, over, _ = service_store
    vault = bool(over)
    settings = make_settings(tmp_path / "data", **over,
                             **({"vault.version_ttl": f"{int(TTL * 1000)}ms"} if vault else {}))
    app = create_app(settings)
    store: CertStore = app.extensions["pkisvc"]
    client = app.test_client()
    headers = {"Authorization": f"Bearer {store.create_token('ops', ['read', 'audit'], actor='t')}"}
    other = CertStore(load_backend(settings), settings)  # another process: its own caches
    assert same_everywhere(client, headers, set())

    def deliver(to: CertStore, minion: str) -> float:
        to.record_pillar(actor="salt", minion=minion, role="node", version=1, items=("ca.crt",))
        return time.monotonic()

    def shown_by(written: float, minions: set[str]) -> None:
        """Shown at once on files; on Vault by every listing asked `TTL` after the write."""
        if vault:
            wait_for(lambda: same_everywhere(client, headers, minions),
                     written + TTL + SLACK - time.monotonic(), f"{minions} listed")
            time.sleep(max(0.0, written + TTL - time.monotonic()))  # the bound, not a sync
        assert same_everywhere(client, headers, minions)

    shown_by(deliver(other, "k8s-node-1"), {"k8s-node-1"})
    # This process's own write: at once, on either backend.
    deliver(store, "k8s-node-2")
    assert same_everywhere(client, headers, {"k8s-node-1", "k8s-node-2"})
    # Another process's change to a minion already listed, and a real second process.
    other.report_host("k8s-node-1", claimed="k8s-node-1", state="kubernetes.cert.configured",
                      result=True, files={"ca.crt": None}, actor="salt-master")
    written = time.monotonic()
    if vault:
        wait_for(lambda: client.get("/v1/hosts", headers=headers).get_json()["counts"]
                 ["drifted"] == 1, written + TTL + SLACK - time.monotonic(), "the report")
        time.sleep(max(0.0, written + TTL - time.monotonic()))
    assert client.get("/v1/hosts", headers=headers).get_json()["counts"]["drifted"] == 1
    forgot = run_cli("hosts", "forget", "k8s-node-1",
                     env={**env, "PKISVC_DATA_DIR": str(tmp_path / "data")})
    assert forgot.returncode == 0, forgot.stderr
    shown_by(time.monotonic(), {"k8s-node-2"})
    assert set(store._host_facts) == {"k8s-node-2"}  # the forgotten host is not kept either
    cli = run_cli("hosts", "-o", "json", env={**env, "PKISVC_DATA_DIR": str(tmp_path / "data")})
    assert cli.returncode == 0, cli.stderr
    assert [h["minion"] for h in json.loads(cli.stdout)] == ["k8s-node-2"]


def test_a_host_turns_silent_by_the_clock_alone(tmp_path):
    """Nothing is written, yet the listing held moves a host to `silent` once its time comes."""
    settings = make_settings(tmp_path / "data", **{"hosts.silent_after": "60s"})
    store = create_app(settings).extensions["pkisvc"]
    now = [store.now()]
    store._clock = lambda: now[0]
    store.record_pillar(actor="salt", minion="k8s-node-1", role="node", version=1,
                        items=("ca.crt",))
    store.report_host("k8s-node-1", claimed="k8s-node-1", state="kubernetes.cert.configured",
                      result=True, files={}, actor="salt-master")
    first = store.fleet()
    assert store.fleet() is first  # nothing changed: the same listing
    now[0] += timedelta(seconds=60)
    assert store.fleet() is first  # silent only *after* silent_after
    now[0] += timedelta(seconds=1)
    assert store.fleet().counts["silent"] == 1


def test_a_shard_written_without_moving_the_stamp_shows_within_the_full_read_bound(
        openbao, tmp_path, monkeypatch):
    """A writer killed between its shard write and the stamp (or a pkisvc from before the
    stamp): listings elsewhere read every shard at least every MINION_FULL_EVERY."""
    from pkisvc.backends import vault
    monkeypatch.setattr(vault, "MINION_FULL_EVERY", 1.0)
    settings = make_settings(tmp_path / "data", **openbao.settings_overrides(),
                             **{"vault.version_ttl": f"{int(TTL * 1000)}ms"})
    store = create_app(settings).extensions["pkisvc"]
    other = CertStore(load_backend(settings), settings)
    assert store.hosts() == []
    monkeypatch.setattr(other.backend, "_move_stamp", lambda: None)
    other.record_pillar(actor="salt", minion="k8s-node-1", role="node", version=1,
                        items=("ca.crt",))
    wait_for(lambda: [h["minion"] for h in store.hosts()] == ["k8s-node-1"],
             1.0 + TTL + SLACK, "the state written without the stamp")
