"""Delivery state per minion (issue 17): a pillar answer writes only when what a minion holds
changes, and "last asked" at most once per `delivery.touch_interval`."""
from __future__ import annotations

import json
import os
import re
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import hvac
import pytest

from pkisvc.app import create_app
from pkisvc.store import CertStore

MINIONS = [f"k8s-master-{i}" if i < 3 else f"k8s-node-{i}" for i in range(100)]


def role(minion: str) -> str:
    return "master" if "master" in minion else "node"


def footprint(backend: Any, data_dir: Path) -> dict[str, int]:
    """What the backend holds, as sizes: every file in the data dir, or every KV secret under
    the cluster's prefix with its current version (a write moves either)."""
    if backend.name == "files":
        return {str(p.relative_to(data_dir)): p.stat().st_size
                for p in data_dir.rglob("*") if p.is_file()}
    from tests.openbao import ROOT_TOKEN  # the service's own policy reads no metadata
    kv = hvac.Client(url=backend.addr, token=ROOT_TOKEN).secrets.kv.v2
    out: dict[str, int] = {}
    todo = [backend.base]
    while todo:
        path = todo.pop()
        for key in kv.list_secrets(path, mount_point=backend.mount)["data"]["keys"]:
            if key.endswith("/"):
                todo.append(f"{path}/{key.rstrip('/')}")
            else:
                meta = kv.read_secret_metadata(f"{path}/{key}", mount_point=backend.mount)
                out[f"{path}/{key}"] = meta["data"]["current_version"]
    return out


class Fleet:
    """The real app (fast path included) and a Salt master refreshing 100 minions; the
    service's clock is `clock[0]`, moved by the test."""

    def __init__(self, backend: Any, settings: Any) -> None:
        self.backend, self.settings = backend, settings
        self.app = create_app(settings, backend=backend)
        self.store: CertStore = self.app.extensions["pkisvc"]
        self.clock = [datetime(2026, 12, 1, 12, 0, tzinfo=UTC)]
        self.store._clock = lambda: self.clock[0]
        token = self.store.create_token("salt", ["secrets", "admin"], actor="test")
        self.h = {"Authorization": f"Bearer {token}"}
        self.client = self.app.test_client()
        self.flask = 0

        def seen() -> None:
            self.flask += 1
        self.app.before_request(seen)

    def refresh(self, etag: str | None = None, minutes: int = 0) -> set[int]:
        """Every minion asks once; half of them with the master's cached ETag."""
        self.clock[0] += timedelta(minutes=minutes)
        statuses = set()
        for i, m in enumerate(MINIONS):
            h = {**self.h, "If-None-Match": etag} if etag and i % 2 else self.h
            r = self.client.get(f"/v1/pillar/{m}?role={role(m)}", headers=h)
            statuses.add(r.status_code)
        return statuses

    def pillar_events(self) -> list[dict[str, Any]]:
        r = self.client.get("/v1/audit?limit=10000", headers=self.h)
        assert r.status_code == 200
        return [e for e in r.get_json()["events"] if e["action"] == "pillar"]

    def page(self, query: str = "") -> str:
        r = self.client.get(f"/ui/minions{query}", headers=self.h)
        assert r.status_code == 200
        return r.text


def grown(backend: Any, before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    """What changed between two footprints: files by bytes added, secrets by versions added
    (a new one counts from 0)."""
    return {k: after[k] - before.get(k, 0) for k in after if after[k] != before.get(k)}


def test_unchanged_refreshes_write_nothing_and_a_rotation_moves_each_minion_once(
        backend, settings):
    fleet = Fleet(backend, settings)
    assert fleet.refresh() == {200}  # each minion's first delivery: its state, one event
    assert len(fleet.pillar_events()) == 100
    before = footprint(backend, settings.data_dir)
    flask_before = fleet.flask

    for _ in range(10):  # 1,000 pillar requests, no version change, within a touch interval
        assert fleet.refresh('"1"') == {200, 304}
    assert fleet.flask == flask_before  # the WSGI fast path answered every one
    assert footprint(backend, settings.data_dir) == before  # not a byte, not a secret
    assert len(fleet.pillar_events()) == 100

    # 1,000 more, three minutes apart: 30 minutes, so each minion's "last asked" is stored
    # twice (at 12 and 24 minutes) and nothing else is written.
    for _ in range(10):
        assert fleet.refresh('"1"', minutes=3) == {200, 304}
    touched = grown(backend, before, footprint(backend, settings.data_dir))
    if backend.name == "files":  # two state lines per minion, appended
        line = len((settings.data_dir / "minions.jsonl").read_bytes().splitlines()[-1]) + 1
        assert set(touched) == {"minions.jsonl"}
        assert abs(touched["minions.jsonl"] - 200 * line) < 200 * 8
    else:  # two versions per minion, spread over the state shards; no new secret
        assert set(touched) <= {k for k in before if "/minions/shards/" in k}
        assert sum(touched.values()) == 200
    assert len(fleet.pillar_events()) == 100
    before = footprint(backend, settings.data_dir)

    assert "<strong>0</strong> behind" in fleet.page()
    r = fleet.client.post("/v1/ca/rotate", headers=fleet.h)
    assert r.status_code == 201
    page = fleet.page()
    assert "100 minions" in page and "<strong>100</strong> behind" in page
    assert len(re.findall(r'data-minion="[^"]+" class="behind changed"', page)) == 100

    for _ in range(3):  # the rotation reaches every minion on the first refresh
        assert fleet.refresh('"1"', minutes=1) == {200}
    moved = [e for e in fleet.pillar_events() if e["version"] == 2]
    assert sorted(e["minion"] for e in moved) == sorted(MINIONS)  # once each
    assert all(e["role"] == role(e["minion"]) and e["actor"] == "salt" for e in moved)
    after = grown(backend, before, footprint(backend, settings.data_dir))
    if backend.name == "files":  # one appended state line per minion, nothing else
        assert {k for k in after if not k.startswith(("generations/", "events/"))} <= {
            "minions.jsonl", "current"}
    else:  # one new version of the shards per minion; no new state secret
        shards = {k: n for k, n in after.items() if "/minions/" in k}
        assert set(shards) <= {k for k in before if "/minions/shards/" in k}
        assert sum(shards.values()) == 100
    page = fleet.page()
    assert "<strong>0</strong> behind" in page
    rows = re.findall(r'<tr data-minion="([^"]+)" >\s*<td>[^<]*</td><td>[^<]*</td><td>(\d+)</td>',
                      page)
    assert sorted(rows) == sorted((m, "2") for m in MINIONS)


def test_last_asked_is_stored_at_most_once_per_touch_interval(backend, settings):
    clock = [datetime(2026, 12, 1, 12, 0, tzinfo=UTC)]
    worker_a = CertStore(backend, settings, clock=lambda: clock[0])
    worker_b = CertStore(backend, settings, clock=lambda: clock[0])

    def ask(worker: CertStore, version: int, role: str = "node", minutes: int = 0) -> None:
        clock[0] += timedelta(minutes=minutes)
        worker.record_pillar(actor="salt", minion="k8s-node-1", role=role, version=version,
                             items=("ca.crt",))

    def held() -> tuple[Any, ...]:
        s = backend.minion("k8s-node-1")
        return s.version, s.role, f"{s.received:%H:%M}", f"{s.asked:%H:%M}"

    ask(worker_a, 1)
    ask(worker_b, 1, minutes=1)  # B reads the state once, finds it fresh, writes nothing
    assert held() == (1, "node", "12:00", "12:00")
    ask(worker_a, 1, minutes=8)
    assert held() == (1, "node", "12:00", "12:00")  # 9 minutes: not yet
    ask(worker_b, 1, minutes=2)
    assert held() == (1, "node", "12:00", "12:11")  # past 10 minutes: touched
    ask(worker_a, 1, minutes=1)  # A's view is stale; the stored touch is fresh
    assert held() == (1, "node", "12:00", "12:11")
    ask(worker_a, 2, minutes=1)  # a new version: state and one event
    ask(worker_b, 2, minutes=1)  # B's view says 1: a conflict, a read, no second event
    assert held() == (2, "node", "12:13", "12:13")
    ask(worker_b, 2, role="master", minutes=1)  # a new role is a change too
    assert held() == (2, "master", "12:15", "12:15")
    events = [(e.version, e.role) for e in backend.audit() if e.action == "pillar"]
    assert events == [(2, "master"), (2, "node"), (1, "node")]


@pytest.mark.parametrize("interval, seconds", [("10m", 600), ("90s", 90), ("1h", 3600)])
def test_touch_interval_setting(tmp_path, interval, seconds):
    from tests.conftest import make_settings
    s = make_settings(tmp_path, **{"delivery.touch_interval": interval})
    assert s.delivery.touch_interval == seconds
    assert make_settings(tmp_path).delivery.touch_interval == 600


def test_minions_page_lists_every_minion_in_pages(backend, settings):
    """5,000 minions on files; on Vault 400 (spread over its state shards, written 8 at a
    time: the page reads the shards, however many minions each holds)."""
    from concurrent.futures import ThreadPoolExecutor

    from pkisvc.model import MinionState
    from pkisvc.ui import MINIONS_PAGE
    count = 5000 if backend.name == "files" else 400
    fleet = Fleet(backend, settings)
    fleet.store.rotate_leaf("server", actor="test")  # version 2; nodes on 1 hold the same files
    old = datetime(2020, 1, 1, tzinfo=UTC)  # however old: no window of events hides a minion
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: backend.put_minion(
            MinionState(f"k8s-node-{i:04d}", "node", 1 + i % 2, old, old), expected=None),
            range(count)))
    page = fleet.page()
    assert f"{count} minions" in page and f"<strong>{count // 2}</strong> behind" in page
    assert "<strong>0</strong> of them" in page
    assert f"page 1 of {count // MINIONS_PAGE}" in page
    seen: set[str] = set()
    for n in range(1, count // MINIONS_PAGE + 1):
        seen |= set(re.findall(r'<tr data-minion="([^"]+)"', fleet.page(f"?page={n}")))
    assert len(seen) == count


def delivered(events: list[Any]) -> list[tuple[str, int, str]]:
    return [(e.minion, e.version, e.role) for e in events if e.action == "pillar"]


@pytest.mark.parametrize("kind", ["files", pytest.param("vault", marks=pytest.mark.vault)])
def test_a_kill_between_a_minions_event_and_its_state_never_hides_the_change(
        tmp_path, request, kind):
    """SIGKILL a process moving 20 minions from version to version, 10 times: every state a
    minion is left in has its event, each change is listed once, and the next process goes
    on from there."""
    import random
    import signal
    import subprocess
    import sys

    from pkisvc.backends import load_backend
    from tests.conftest import REPO, clean_env, make_settings
    from tests.workers import PILLAR_MINIONS
    overrides = (request.getfixturevalue("openbao").settings_overrides() if kind == "vault"
                 else {"backend": "files"})
    data = tmp_path / "data"
    backend = load_backend(make_settings(data, **overrides))
    rng = random.Random(17)
    start = 1
    for _ in range(10):
        child = subprocess.Popen(
            [sys.executable, "-m", "tests.workers", "pillar", str(data), str(start),
             json.dumps(overrides)], cwd=REPO, env=clean_env(), stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
        assert child.stdout is not None
        child.stdout.readline()  # a first round is done: it is in the middle of the next
        time.sleep(rng.uniform(0, 0.05))  # not synchronisation: where the kill falls
        os.killpg(child.pid, signal.SIGKILL)
        child.wait()
        child.stdout.close()
        states = backend.minions()
        assert len(states) == PILLAR_MINIONS
        events = delivered(backend.audit(limit=10**6))
        for s in states:  # every state a minion is in has its event
            assert (s.minion, s.version, s.role) in events, s
        assert len(events) == len(set(events))  # and each change is listed once
        start = max(s.version for s in states) + 1
    assert start > 10


def test_a_state_write_failing_after_its_event_shows_the_change_once(settings):
    """Files: the state file cannot be written (its lock is a directory now); the answer is a
    503, the change is in /v1/audit already, and once the disk is back it is there once."""
    from pkisvc.backends.files import FilesBackend
    backend = FilesBackend(settings.data_dir)
    fleet = Fleet(backend, settings)
    assert fleet.refresh() == {200}
    fleet.store.rotate_leaf("server", actor="test")
    lock = settings.data_dir / ".minions.lock"
    lock.unlink()
    lock.mkdir()
    r = fleet.client.get("/v1/pillar/k8s-node-7?role=node", headers=fleet.h)
    assert r.status_code == 503
    assert [e["version"] for e in fleet.pillar_events() if e["minion"] == "k8s-node-7"] == [2, 1]
    assert backend.minion("k8s-node-7").version == 1
    lock.rmdir()
    assert fleet.client.get("/v1/pillar/k8s-node-7?role=node", headers=fleet.h).status_code == 200
    assert backend.minion("k8s-node-7").version == 2
    assert [e["version"] for e in fleet.pillar_events() if e["minion"] == "k8s-node-7"] == [2, 1]
    assert len(delivered(backend.audit(limit=1000))) == 101


def test_an_answer_that_loses_its_state_write_to_another_is_one_event(backend, settings):
    """Two answers for one minion at once (as a master, as a node): the one whose state write
    meets the other's retries on the state it finds, without a second event for its one
    delivery (the race test's "no more events than deliveries")."""
    import dataclasses
    fleet = Fleet(backend, settings)
    minion = "k8s-master-0"
    assert fleet.client.get(f"/v1/pillar/{minion}?role=master", headers=fleet.h).status_code \
        == 200
    fleet.store.rotate_leaf("server", actor="test")
    put = backend.put_minion
    raced: list[Any] = []

    def put_after_another(new: Any, *, expected: Any) -> None:
        if not raced:  # the other answer (as a node, version 2) writes first
            raced.append(dataclasses.replace(expected, role="node", version=2))
            put(raced[0], expected=expected)
        put(new, expected=expected)
    backend.put_minion = put_after_another
    try:
        r = fleet.client.get(f"/v1/pillar/{minion}?role=master", headers=fleet.h)
    finally:
        backend.put_minion = put
    assert r.status_code == 200 and raced
    assert (backend.minion(minion).role, backend.minion(minion).version) == ("master", 2)
    mine = [(e["role"], e["version"]) for e in fleet.pillar_events() if e["minion"] == minion]
    assert mine == [("master", 2), ("master", 1)]
