"""Paired comparison of two pkisvc builds: reads and rotation latencies, old against new.

    .venv/bin/python bench/compare.py --old /work/wt-old [--new .] [--rounds 5] [--only read]

Each side is `pkisvc serve` from its own tree's venv (`<tree>/.venv/bin/pkisvc`) on its own
free loopback port and data dir; the Vault-backend sides share one OpenBao (raft storage,
as `make bench`) under different KV prefixes.  Every measurement runs old and new one after
the other within each round (the order alternating between rounds), so load from anything
else on the machine hits both alike; what is printed is the median of the rounds for each
side and the median of the per-round ratios (new / old), with the load average before and
after.  Reads: wrk for BENCH_WRK_SECONDS at 1 and 8 connections (ratio of requests/s, above
1 is better).  Rotations: the median latency of n sequential POSTs (ratio of ms, below 1 is
better).  Nothing is written to bench/results: this is a tool for a change, not a figure.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import Client, settings_token, timed, wrk
from servers import REPO, OpenBao, Pkisvc, cleanup, workdir

# (name, key type, backend, path, n per round); reads are wrk runs instead.
ROTATIONS = (("rotate_server_ecdsa", "ecdsa-p256", "files", "/v1/certs/server/rotate", 40),
             ("rotate_server_rsa", "rsa-2048", "files", "/v1/certs/server/rotate", 10),
             ("ca_rotate_ecdsa", "ecdsa-p256", "files", "/v1/ca/rotate", 40),
             ("ca_rotate_rsa", "rsa-2048", "files", "/v1/ca/rotate", 8),
             ("vault_rotate_server_ecdsa", "ecdsa-p256", "vault", "/v1/certs/server/rotate", 40))


class Side:
    """One build: its services (started on demand) and tokens."""

    def __init__(self, name: str, tree: Path, root: Path, bao: OpenBao) -> None:
        self.name, self.bin, self.root, self.bao = name, tree / ".venv" / "bin", root, bao
        self.services: dict[str, tuple[Pkisvc, str]] = {}

    def service(self, key_type: str, backend: str) -> tuple[Pkisvc, str]:
        """pkisvc on backend with key_type, and an admin token (started the first time)."""
        key = f"{backend}-{key_type}"
        if key not in self.services:
            env = {"PKISVC_KEY_TYPE": key_type, "PKISVC_SERVER__SANS": '["k8s-master-1"]'}
            if backend == "vault":
                token, spec = settings_token("bench-admin", "admin")
                env |= {"PKISVC_BACKEND": "vault", "PKISVC_VAULT__ADDR": self.bao.addr,
                        "PKISVC_VAULT__TOKEN": self.bao.token, "PKISVC_VAULT__MOUNT": "secret",
                        "PKISVC_VAULT__PREFIX": f"{self.name}-{key_type}",
                        "PKISVC_TOKENS": spec}
            svc = Pkisvc(self.root / key, env, bin=self.bin).start()
            if backend == "files":
                token = svc.token("bench-admin", "admin")
            self.services[key] = (svc, token)
        return self.services[key]

    def show_logs(self) -> None:
        for key, (svc, _) in self.services.items():
            assert svc.process is not None
            print(f"--- {self.name} {key}: {svc.process.log}", file=sys.stderr)
            print(svc.process.log.read_text()[-3000:], file=sys.stderr)

    def stop(self) -> None:
        for svc, _ in self.services.values():
            svc.stop()


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def paired(sides: list[Side], rounds: int, measure: Callable[[Side], float]
           ) -> dict[str, Any]:
    """measure(side) for both sides each round, alternating who goes first."""
    got: dict[str, list[float]] = {s.name: [] for s in sides}
    for r in range(rounds):
        for side in (sides if r % 2 == 0 else sides[::-1]):
            try:
                got[side.name].append(measure(side))
            except Exception:
                side.show_logs()
                raise
    old, new = got[sides[0].name], got[sides[1].name]
    return {"old": round(median(old), 3), "new": round(median(new), 3),
            "ratio": round(median([b / a for a, b in zip(old, new, strict=True)]), 3),
            "old_runs": [round(x, 3) for x in old], "new_runs": [round(x, 3) for x in new]}


def read_rps(backend: str, conns: int) -> Callable[[Side], float]:
    def measure(side: Side) -> float:
        svc, token = side.service("rsa-2048", backend)
        got = wrk(f"{svc.url}/v1/certs/server", f"Authorization: Bearer {token}", conns)
        if got["non_2xx"]:  # wrk counts refusals as requests: such a rate means nothing
            raise RuntimeError(f"{side.name} {backend}: {got['non_2xx']} of {got['requests']} "
                               "reads were not answered 200")
        return got["rps"]
    return measure


def rotate_ms(key_type: str, backend: str, path: str, n: int) -> Callable[[Side], float]:
    def measure(side: Side) -> float:
        svc, token = side.service(key_type, backend)
        client = Client(svc.url, {"Authorization": f"Bearer {token}"})
        try:
            return median(timed(lambda: client.post(path, expect=201), n))
        finally:
            client.conn.close()
    return measure


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--old", type=Path, required=True, help="the baseline tree (with .venv)")
    ap.add_argument("--new", type=Path, default=REPO, help="the tree under test (with .venv)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", action="append", default=[],
                    help="run only measurements whose name contains this (repeatable)")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    measurements: list[tuple[str, Callable[[Side], float]]] = [
        (f"read_{b}_c{c}", read_rps(b, c)) for b in ("files", "vault") for c in (1, 8)]
    measurements += [(name, rotate_ms(kt, b, p, n)) for name, kt, b, p, n in ROTATIONS]
    chosen = [(n, m) for n, m in measurements if not args.only or any(o in n for o in args.only)]

    root = workdir()
    bao = OpenBao(root / "openbao")
    sides = [Side("old", args.old.resolve(), root / "old", bao),
             Side("new", args.new.resolve(), root / "new", bao)]
    doc: dict[str, Any] = {"old": str(args.old), "new": str(args.new), "rounds": args.rounds,
                           "load_average_before": [round(x, 2) for x in os.getloadavg()]}
    started = time.monotonic()
    try:
        if any(n.startswith("read_vault") or "vault" in n for n, _ in chosen):
            bao.start()
        for name, measure in chosen:
            load = round(os.getloadavg()[0], 2)
            doc[name] = paired(sides, args.rounds, measure) | {"load_1m": load}
            r = doc[name]
            better = "higher" if name.startswith("read") else "lower"
            print(f"{name:28} old {r['old']:>9.3f}  new {r['new']:>9.3f}  ratio {r['ratio']:.3f}"
                  f"  ({better} is better; load {load})", flush=True)
    finally:
        for side in sides:
            side.stop()
        bao.stop()
        cleanup(root)
    doc["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    doc["seconds"] = round(time.monotonic() - started, 1)
    print(f"load average before {doc['load_average_before']} after "
          f"{doc['load_average_after']}; {doc['seconds']} s")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
