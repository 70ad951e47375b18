"""Time the listings that grow with the fleet and the history: the minions page and
`GET /v1/hosts` at 5,000 minions and `/v1/versions` at 1,000 versions, on the files and the
vault backend.

A files store gets VERSIONS versions (ECDSA leaf rotations) and MINIONS minions' delivery
states (written through `Backend.put_minion`, as pillar answers write them); `pkisvc migrate
--to vault` copies the versions into OpenBao (raft), where the same states are written again.
Each side is then served by `pkisvc serve` and asked REQUESTS times per path, sequentially over
one keep-alive connection, after a warm-up (the caches a running service holds).  Run alone:
`.venv/bin/python bench/listing.py` (prints the figures); `make bench` calls `bench_listing`.
"""
from __future__ import annotations

import http.client
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import BIN, OpenBao, Pkisvc, cleanup, workdir

from pkisvc.backends.base import Backend
from pkisvc.backends.files import FilesBackend
from pkisvc.backends.vault import VaultBackend
from pkisvc.model import MinionState, parse_time
from pkisvc.settings import Settings
from pkisvc.store import CertStore

VERSIONS = 1000
MINIONS = 5000
REQUESTS = 200
PATHS = ("/ui/minions", "/ui/minions?page=13", "/ui/minions?behind=1", "/v1/versions",
         "/v1/hosts")
ENV = {"PKISVC_KEY_TYPE": "ecdsa-p256"}


def states(versions: int, minions: int) -> list[MinionState]:
    """A fleet: masters and nodes, a fifth of them some versions behind, some long ago."""
    out = []
    for m in range(minions):
        role = "master" if m < 5 else "node"
        version = versions - (m % 5 == 1) * (1 + m % 7)
        t = parse_time(f"202{5 + m % 2}-11-29T{m // 3600 % 24:02d}:{m // 60 % 60:02d}:"
                       f"{m % 60:02d}Z")
        out.append(MinionState(f"k8s-{role}-{m:05d}", role, version, t, t))
    return out


def put_states(backend: Backend, fleet: list[MinionState]) -> float:
    """Write every state as a pillar answer would (8 writers); return the seconds it took."""
    t = time.perf_counter()
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda s: backend.put_minion(s, expected=None), fleet))
    return time.perf_counter() - t


def build(root: Path, versions: int) -> Pkisvc:
    svc = Pkisvc(root / "files", ENV)
    settings = Settings.load(env={}, overrides={"data_dir": str(root / "files" / "data"),
                                                "key_type": "ecdsa-p256"})
    store = CertStore(FilesBackend(settings.data_dir), settings)
    store.init(actor="bench")
    for i in range(2, versions + 1):
        store.rotate_leaf("server" if i % 2 else "kubecfg", actor="bench", reason=f"b{i}")
    return svc


def timed(svc: Pkisvc, token: str, paths: tuple[str, ...], n: int) -> dict[str, Any]:
    conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=120)
    h = {"Authorization": f"Bearer {token}"}

    def get(path: str) -> tuple[float, int]:
        t = time.perf_counter()
        conn.request("GET", path, headers=h)
        r = conn.getresponse()
        body = r.read()
        ms = (time.perf_counter() - t) * 1000
        if r.status != 200 or b"PRIVATE KEY" in body:
            raise RuntimeError(f"GET {path}: {r.status} {body[:200]!r}")
        return ms, len(body)

    out: dict[str, Any] = {}
    for p in paths:  # warm every worker (sync workers: one per request, in turn)
        for _ in range(8):
            get(p)
    for p in paths:
        ms, size = [], 0
        for _ in range(n):
            t, size = get(p)
            ms.append(t)
        ms.sort()
        out[p] = {"p50_ms": round(statistics.median(ms), 2),
                  "p99_ms": round(ms[max(0, int(len(ms) * 0.99) - 1)], 2),
                  "max_ms": round(ms[-1], 2), "bytes": size, "requests": n}
    conn.close()
    return out


def bench_listing(root: Path, bao: OpenBao, versions: int = VERSIONS, minions: int = MINIONS,
                  requests: int = REQUESTS) -> dict[str, Any]:
    """Both backends, the same store: {"files": {path: figures}, "vault": ..., sizes}."""
    fleet = states(versions, minions)
    files = build(root / "listing", versions)
    result: dict[str, Any] = {"versions": versions, "minions": minions}
    result["files_state_writes_s"] = round(
        put_states(FilesBackend(root / "listing" / "files" / "data"), fleet), 2)
    vault_env = {"PKISVC_VAULT__ADDR": bao.addr, "PKISVC_VAULT__TOKEN": bao.token,
                 "PKISVC_VAULT__MOUNT": "secret", "PKISVC_CLUSTER": "listing",
                 # the chain key `migrate` wrote the versions with: every replica needs it
                 "PKISVC_CHAIN_KEY_FILE": str(root / "listing" / "files" / "data" / "chain.key")}
    subprocess.run([str(BIN / "pkisvc"), "migrate", "--to", "vault"], check=True,
                   capture_output=True, env={**files.env(), **vault_env})
    vault_backend = VaultBackend(bao.addr, cluster="listing", token=bao.token)
    result["vault_state_writes_s"] = round(put_states(vault_backend, fleet), 2)
    token = files.token("bench-listing", "read", "audit")
    vault = Pkisvc(root / "listing" / "vault", {**ENV, **vault_env, "PKISVC_BACKEND": "vault"})
    vault_token = vault.token("bench-listing", "read", "audit")
    for name, svc, t in (("files", files, token), ("vault", vault, vault_token)):
        svc.start()
        try:
            result[name] = timed(svc, t, PATHS, requests)
        finally:
            svc.stop()
    return result


def main() -> None:
    root = workdir()
    bao = OpenBao(root / "openbao").start()
    try:
        print(json.dumps(bench_listing(root, bao), indent=1))
    finally:
        bao.stop()
        cleanup(root)


if __name__ == "__main__":
    main()
