"""Load and checks shared by the race, crash and leader-loss tests.

A storm is many concurrent changes through the API (and the CLI); what it must leave behind
is checked against the backend afterwards: a gapless history, every generation whole, one
audit event per change, and every acknowledged (201) version present with the reason its
request carried.
"""
from __future__ import annotations

import collections
import random
import sys
import threading
from dataclasses import dataclass, field
from typing import Any

import requests

from pkisvc import pki
from pkisvc.changes import parse_files
from pkisvc.model import OPERATIONS
from tests.conftest import clean_env, free_port, start

KEY_MARKERS = ("PRIVATE KEY",)


@dataclass
class Ledger:
    """What the clients saw: acknowledged versions, statuses, bodies (for the hygiene scan)."""

    acked: dict[int, tuple[str, str]] = field(default_factory=dict)  # version -> (op, reason)
    statuses: collections.Counter[int] = field(default_factory=collections.Counter)
    pillar_200: int = 0
    delivered: set[tuple[str, int, str]] = field(default_factory=set)  # (minion, version, role)
    texts: list[str] = field(default_factory=list)  # bodies that must hold no key
    duplicate_acks: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def ack(self, version: int, operation: str, reason: str) -> None:
        with self.lock:
            if version in self.acked:
                self.duplicate_acks.append(version)
            self.acked[version] = (operation, reason)


def serve(data_dir: Any, workers: int, **env: str) -> tuple[Any, str]:
    """`pkisvc serve` on the files backend (unless env says otherwise); (process, url)."""
    port = free_port()
    e = clean_env(PKISVC_DATA_DIR=str(data_dir), PKISVC_KEY_TYPE="ecdsa-p256", **env)
    p = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--workers", str(workers)], e, port)
    return p, f"http://127.0.0.1:{port}"


CHANGES = {  # name -> (method, path, operation it records)
    "rotate-ca": ("POST", "/v1/ca/rotate", "rotate-ca"),
    "rotate-server": ("POST", "/v1/certs/server/rotate", "rotate-server"),
    "rotate-kubecfg": ("POST", "/v1/certs/kubecfg/rotate", "rotate-kubecfg"),
    "stage": ("POST", "/v1/ca/rotate", "ca-stage-trust"),
    "continue": ("POST", "/v1/ca/rotate/continue", "ca-stage-switch"),
    "finish": ("POST", "/v1/ca/rotate/finish", "ca-stage-finish"),
    "abort": ("POST", "/v1/ca/rotate/abort", "ca-stage-abort"),
    "rollback": ("POST", "/v1/rollback", "rollback"),
}


def change(url: str, headers: dict[str, str], name: str, reason: str, ledger: Ledger,
           rng: random.Random, timeout: float = 60) -> int:
    """Ask for one change; record a 201 in the ledger; return the status."""
    method, path, operation = CHANGES[name]
    body: dict[str, Any] = {"reason": reason}
    if name == "stage":
        body["mode"] = "staged"
    if name == "rollback":
        top = max(ledger.acked, default=1)
        body["version"] = rng.randint(1, top)
    r = requests.request(method, url + path, json=body, headers=headers, timeout=timeout)
    with ledger.lock:
        ledger.statuses[r.status_code] += 1
        ledger.texts.append(r.text)
    if r.status_code == 201:
        doc = r.json()
        assert doc["operation"] == operation and doc["reason"] == reason, doc
        ledger.ack(doc["version"], operation, reason)
    return r.status_code


def read(url: str, headers: dict[str, str], name: str, ledger: Ledger, minion: str) -> int:
    """One read: a certificate, the versions, or a pillar delivery (master or node)."""
    path = {"cert": "/v1/certs/server", "versions": "/v1/versions",
            "pillar-master": f"/v1/pillar/{minion}?role=master",
            "pillar-node": f"/v1/pillar/{minion}?role=node"}[name]
    r = requests.get(url + path, headers=headers, timeout=60)
    with ledger.lock:
        ledger.statuses[r.status_code] += 1
        if name.startswith("pillar") and r.status_code == 200:
            ledger.pillar_200 += 1
            doc = r.json()
            ledger.delivered.add((minion, doc["version"], doc["role"]))
        if name != "pillar-master" or r.status_code >= 400:  # a master's 200 carries keys
            ledger.texts.append(r.text)
    return r.status_code


def check_history(backend: Any, acked: dict[int, tuple[str, str]]) -> list[Any]:
    """Assert a gapless, whole history holding every acknowledged version; return records."""
    records = backend.versions()
    latest = backend.latest()
    assert [r.version for r in records] == list(range(1, (latest or 0) + 1)), \
        [r.version for r in records]
    for r in records:
        gen = backend.read(r.version)
        pki.check_set(parse_files(gen.files))  # whole: parses, keys match, leaves verify
        assert gen.record == r
        assert r.parent == (r.version - 1 or None)
    by_version = {r.version: r for r in records}
    for version, (operation, reason) in acked.items():
        assert version in by_version, f"acknowledged version {version} is missing"
        assert (by_version[version].operation, by_version[version].reason) == \
            (operation, reason)
    return records


def change_events(backend: Any) -> collections.Counter[int]:
    """How many audit events each version's change has (deliveries are not changes)."""
    counts: collections.Counter[int] = collections.Counter()
    for e in backend.audit(limit=10**6):
        if e.action in OPERATIONS:
            counts[e.version] += 1
    return counts


def assert_no_secrets(texts: list[str], *tokens: str) -> None:
    for text in texts:
        for marker in KEY_MARKERS:
            assert marker not in text, text[:300]
        for token in tokens:
            assert token not in text, "a token leaked"
