"""Host reports ([Q]) at fleet size: HOSTS minions fetch their pillar, then the Salt master
reports for each (POST /v1/hosts/<minion>/report, CONCURRENCY at a time); count the errors,
then time the hosts page (GET /v1/hosts, its first page and counts of all) and the minions
page (/ui/minions) with every host reported.

Not a test: `.venv/bin/python bench/hosts.py [--hosts N]`, or part of bench/run.py.
"""
from __future__ import annotations

import argparse
import hashlib
import http.client
import json
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from servers import Pkisvc, cleanup, workdir

CONCURRENCY = 8  # what a master's report runner might have in flight, bounded


class Client:
    """One keep-alive connection per thread."""

    def __init__(self, port: int) -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def call(self, method: str, path: str, token: str, body: Any = None) -> tuple[int, bytes]:
        self.conn.request(method, path, body=json.dumps(body) if body is not None else None,
                          headers={"Authorization": f"Bearer {token}",
                                   "Content-Type": "application/json"})
        r = self.conn.getresponse()
        return r.status, r.read()


def pct(ms: list[float], p: float) -> float:
    ms = sorted(ms)
    return round(ms[max(0, int(len(ms) * p) - 1)], 2)


def bench_hosts(svc: Pkisvc, n: int, requests: int = 100) -> dict[str, Any]:
    secrets, report, read = (svc.token("bench-pillar", "secrets"),
                             svc.token("bench-report", "report"),
                             svc.token("bench-read", "read", "audit"))
    ids = [f"k8s-master-{i:05d}" if i < 5 else f"k8s-node-{i:05d}" for i in range(n)]
    clients: dict[int, Client] = {}

    def client() -> Client:
        import threading
        return clients.setdefault(threading.get_ident(), Client(svc.port))

    def deliver_and_report(minion: str) -> tuple[int, int, float]:
        role = "master" if "master" in minion else "node"
        status, body = client().call("GET", f"/v1/pillar/{minion}?role={role}", secrets)
        if status != 200:
            return status, 0, 0.0
        files = {k: hashlib.sha256(v.encode()).hexdigest()
                 for k, v in json.loads(body)["files"].items()}
        t = time.perf_counter()
        status, _ = client().call("POST", f"/v1/hosts/{minion}/report", report, {
            "minion": minion, "state": "kubernetes.cert.configured", "result": True,
            "files": files})
        return 200, status, (time.perf_counter() - t) * 1000

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        results = list(pool.map(deliver_and_report, ids))
    seconds = time.perf_counter() - t0
    report_ms = [r[2] for r in results if r[1] == 200]
    out: dict[str, Any] = {
        "hosts": n, "concurrency": CONCURRENCY,
        "pillar_errors": sum(1 for r in results if r[0] != 200),
        "report_errors": sum(1 for r in results if r[1] != 200),
        "seconds_pillar_and_report": round(seconds, 1),
        "report_ms": {"median": round(statistics.median(report_ms), 2) if report_ms else None,
                      "p99": pct(report_ms, 0.99) if report_ms else None},
        "pages": {}}
    one = Client(svc.port)
    for path in ("/v1/hosts", "/v1/hosts?state=drifted", "/ui/minions"):
        for _ in range(4):  # warm both workers
            one.call("GET", path, read)
        ms = []
        size = 0
        for _ in range(requests):
            t = time.perf_counter()
            status, body = one.call("GET", path, read)
            ms.append((time.perf_counter() - t) * 1000)
            assert status == 200, (path, status, body[:200])
            size = len(body)
        out["pages"][path] = {"median": round(statistics.median(ms), 2), "p95": pct(ms, 0.95),
                              "p99": pct(ms, 0.99), "max": round(max(ms), 2), "bytes": size}
    status, body = one.call("GET", "/v1/hosts?limit=1", read)
    out["counts"] = json.loads(body)["counts"]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hosts", type=int, default=5000)
    ap.add_argument("--requests", type=int, default=100, help="per page")
    args = ap.parse_args()
    root = workdir()
    svc = Pkisvc(root, {"PKISVC_KEY_TYPE": "ecdsa-p256"}).start()
    try:
        print(json.dumps(bench_hosts(svc, args.hosts, args.requests), indent=2))
    finally:
        svc.stop()
        cleanup(root)


if __name__ == "__main__":
    main()
