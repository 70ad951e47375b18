"""Time the operator pages (/ui) against a large store: one client, sequential requests.

Builds a files store with GENERATIONS generations and an audit trail in which MINIONS minions
fetched their pillar ROUNDS times (the last round only partly, so some are behind), and their
delivery states (what the minions page reads), starts
`pkisvc serve` on it and times each page over one keep-alive connection.  Not a test: run
`.venv/bin/python bench/ui.py` (options: --help).  Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import http.client
import json
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import Pkisvc, cleanup, workdir

from pkisvc.backends.files import FilesBackend
from pkisvc.model import AuditEvent, MinionState, parse_time
from pkisvc.settings import Settings
from pkisvc.store import CertStore


def build(data: Path, generations: int, minions: int, rounds: int) -> tuple[str, int]:
    """Make the store; return (a read+audit token, audit events written)."""
    settings = Settings.load(env={}, overrides={"data_dir": str(data), "key_type": "ecdsa-p256"})
    store = CertStore(FilesBackend(data), settings)
    store.init(actor="bench")
    t0 = time.perf_counter()
    for i in range(2, generations + 1):
        if i % 100 == 0:
            store.rotate_ca(actor="bench", reason=f"bench {i}")
        else:
            store.rotate_leaf("server" if i % 2 else "kubecfg", actor="bench", reason=f"b{i}")
    print(f"built {generations} generations in {time.perf_counter() - t0:.1f} s",
          file=sys.stderr)
    token = store.create_token("bench-ui", ["read", "audit"], actor="bench")
    # Pillar deliveries are written as append_audit writes them, one JSON line each, but in
    # one go: 10,000 single fsyncs would take minutes and measure nothing the pages do.
    rng = random.Random(7)
    lines = []
    for r in range(rounds):
        last = r == rounds - 1
        version = generations if last else max(1, generations - 10 * (rounds - r))
        for m in range(minions):
            if last and rng.random() < 0.2:
                continue  # a fifth of the minions miss the latest round: they are behind
            role = "master" if m < 5 else "node"
            lines.append(json.dumps(AuditEvent(
                time=parse_time(f"2026-11-29T{10 + r:02d}:{m // 60 % 60:02d}:{m % 60:02d}Z"),
                actor="salt-master", action="pillar", version=version,
                items=("ca.crt",), minion=f"k8s-{role}-{m:05d}", role=role,
                remote_addr="127.0.0.1").to_dict(), separators=(",", ":")))
    with open(data / "audit.jsonl", "a") as f:
        f.write("\n".join(lines) + "\n")
    # Each minion's delivery state, as put_minion writes it (one JSON line), the newest
    # delivery of each winning; written in one go for the same reason.
    states = {}
    for raw in lines:
        e = json.loads(raw)
        t = parse_time(e["time"])
        states[e["minion"]] = MinionState(e["minion"], e["role"], e["version"], t, t)
    with open(data / "minions.jsonl", "a") as f:
        f.write("".join(json.dumps(s.to_dict(), separators=(",", ":")) + "\n"
                        for s in states.values()))
    return token, len(store.audit(limit=10**9))


def timed(conn: http.client.HTTPConnection, path: str, token: str, n: int
          ) -> tuple[list[float], int]:
    out = []
    size = 0
    for _ in range(n):
        t = time.perf_counter()
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        body = r.read()
        out.append((time.perf_counter() - t) * 1000)
        assert r.status == 200, (path, r.status, body[:200])
        assert b"PRIVATE KEY" not in body
        size = len(body)
    return out, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--generations", type=int, default=1000)
    ap.add_argument("--minions", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=2, help="pillar deliveries per minion")
    ap.add_argument("--requests", type=int, default=100, help="per page")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    root = workdir()
    svc = Pkisvc(root, {"PKISVC_KEY_TYPE": "ecdsa-p256"}, workers=args.workers)
    token, events = build(root / "data", args.generations, args.minions, args.rounds)
    svc.start()
    try:
        conn = http.client.HTTPConnection("127.0.0.1", svc.port, timeout=60)
        pages = ["/ui/", "/ui/history", f"/ui/history?page={args.generations // 25}",
                 "/ui/minions", "/ui/minions?behind=1", "/ui/audit",
                 "/ui/audit?kind=pillar&minion=k8s-node-00042"]
        for p in pages:  # warm both workers' caches as a running service would have them
            timed(conn, p, token, 4)
        print(f"\n{args.generations} generations, {args.minions} minions, {events} audit "
              f"events, {args.workers} workers, {args.requests} sequential requests per "
              "page over one keep-alive connection\n")
        print("| page | median ms | p95 ms | p99 ms | max ms | bytes |")
        print("|---|---:|---:|---:|---:|---:|")
        for p in pages:
            ms, size = timed(conn, p, token, args.requests)
            ms.sort()
            print(f"| `{p}` | {statistics.median(ms):.1f} | {ms[int(len(ms) * 0.95) - 1]:.1f} "
                  f"| {ms[int(len(ms) * 0.99) - 1]:.1f} | {ms[-1]:.1f} | {size} |")
        conn.close()
    finally:
        svc.stop()
        cleanup(root)


if __name__ == "__main__":
    main()
