"""Pillar benchmarks: the ext_pillar module's own cost, a whole Salt compile, a burst.

(a) `module`: the `pkisvc` ext_pillar called in-process for 1,000 minion ids against the real
    service; the time on the wire (request sent to answer read, the client's view of the
    service) is taken out to leave the module's own cost.
(b) `compile`: `salt.pillar.Pillar(opts, grains, id, "base").compile_pillar()` per minion id,
    with the `pkisvc` ext_pillar against the same material pasted into static pillar SLS files
    (the seed's way); both sides alternate minion by minion.
(c) `burst`: N minion ids asked through the module by 8 threads at once (a master's worker
    threads), the module's process state dropped first (cold cache, no connections).
"""
from __future__ import annotations

import itertools
import statistics
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable

import yaml
from servers import Pkisvc

ROLES = {"master": ["k8s-master*"], "node": ["k8s-node*"]}
STATE = "_pkisvc_ext_pillar_state"  # the module's process state (see ext_pillar/pkisvc.py)


def minion_ids(n: int) -> list[str]:
    """n minion ids: one master in fifty, the rest nodes."""
    return [f"k8s-master-{i:05d}" if i % 50 == 0 else f"k8s-node-{i:05d}" for i in range(n)]


def pct(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


def module() -> Any:
    from pkisvc.ext_pillar import pkisvc as ext
    return ext


class Wire:
    """Time each HTTP exchange of the module (send to body read): the service as seen by it."""

    def __init__(self) -> None:
        self.times: list[float] = []
        ext = module()
        self._orig: Callable[..., Any] = ext.Client.request
        wire = self

        def request(client: Any, path: str, headers: dict[str, str]) -> tuple[int, bytes]:
            t = time.perf_counter()
            try:
                return wire._orig(client, path, headers)  # type: ignore[no-any-return]
            finally:
                wire.times.append((time.perf_counter() - t) * 1000)
        ext.Client.request = request

    def close(self) -> None:
        module().Client.request = self._orig


def reset_module_state() -> None:
    """Forget the module's cached answers and connections, as a freshly started master."""
    sys.modules.pop(STATE, None)


# --- (a) the module's own cost ---------------------------------------------------------------

def bench_module(svc: Pkisvc, token_file: Path, runs: int, n: int = 1000) -> dict[str, Any]:
    ext = module()
    ids = minion_ids(n)
    opts = {"url": svc.url, "token_file": str(token_file), "roles": ROLES}
    per_run: list[dict[str, float]] = []
    wire = Wire()
    try:
        ext.ext_pillar(ids[0], {}, **opts)  # warm: one answer per role cached, a connection
        ext.ext_pillar(ids[1], {}, **opts)
        for _ in range(runs):
            total, own, on_wire = [], [], []
            for mid in ids:
                wire.times.clear()
                t = time.perf_counter()
                out = ext.ext_pillar(mid, {}, **opts)
                elapsed = (time.perf_counter() - t) * 1000
                assert "files" in out["kubernetes"]["cert"], out
                w = sum(wire.times)
                total.append(elapsed)
                on_wire.append(w)
                own.append(elapsed - w)
            per_run.append({"p50_ms": pct(own, 50), "p99_ms": pct(own, 99),
                            "call_p50_ms": pct(total, 50), "call_p99_ms": pct(total, 99),
                            "service_p50_ms": pct(on_wire, 50),
                            "service_p99_ms": pct(on_wire, 99),
                            "service_share": sum(on_wire) / sum(total)})
    finally:
        wire.close()
    out = {k: round(statistics.median(r[k] for r in per_run), 4) for k in per_run[0]}
    out.update(minion_ids=n, target="p99 ≤ 1 ms")
    return out


# --- (b) a whole pillar compile --------------------------------------------------------------

def write_configs(root: Path, svc: Pkisvc, token_file: Path) -> dict[str, Path]:
    """Two minion configs: the ext_pillar, and the same material pasted into pillar SLS."""
    from servers import http
    headers = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
    common = {"kubernetes": {"cluster_name": "bench"}, "unrelated": {"formula": "data"}}
    paths: dict[str, Path] = {}
    for side in ("module", "static"):
        d = root / "salt" / side
        roots = d / "pillar"
        roots.mkdir(parents=True)
        top: dict[str, list[str]] = {"*": ["common"]}
        (roots / "common.sls").write_text(yaml.safe_dump(common))
        conf: dict[str, Any] = {"id": "bench", "root_dir": str(d / "root"),
                                "file_client": "local", "pillar_roots": {"base": [str(roots)]},
                                "log_level_logfile": "quiet"}
        if side == "module":
            conf["ext_pillar"] = [{"pkisvc": {"url": svc.url, "token_file": str(token_file),
                                              "roles": ROLES}}]
        else:
            for role, globs in ROLES.items():
                status, doc = http("GET", f"{svc.url}/v1/pillar/paste?role={role}",
                                   headers=headers)
                assert status == 200, doc
                cert = {k: doc[k] for k in ("version", "role", "files", "fingerprints",
                                            "trust")}
                (roots / f"cert_{role}.sls").write_text(
                    yaml.safe_dump({"kubernetes": {"cert": cert}}))
                for g in globs:
                    top[g] = ["common", f"cert_{role}"]
        (roots / "top.sls").write_text(yaml.safe_dump({"base": top}))
        (d / "minion").write_text(yaml.safe_dump(conf))
        paths[side] = d / "minion"
    return paths


def bench_compile(root: Path, svc: Pkisvc, token_file: Path, runs: int,
                  n: int = 500) -> dict[str, Any]:
    import compileall

    import salt.config
    import salt.pillar

    # Salt's loader executes the module file at every compile.  Installed by pip, it has its
    # bytecode beside it, as Salt's own modules do; an editable checkout under
    # PYTHONDONTWRITEBYTECODE has none, and compiling the source costs ~3 ms a compile here.
    compileall.compile_dir(str(Path(module().__file__).parent), quiet=1)
    paths = write_configs(root, svc, token_file)
    opts = {side: salt.config.minion_config(str(p)) for side, p in paths.items()}

    def compile_one(side: str, mid: str) -> dict[str, Any]:
        grains = {"id": mid, "os": "Debian", "os_family": "Debian"}
        pillar: dict[str, Any] = salt.pillar.Pillar(opts[side], grains, mid,
                                                    "base").compile_pillar()
        return pillar

    # Both sides give the same certificate pillar (checked once per role), else no comparison.
    for mid in ("k8s-master-00000", "k8s-node-00001"):
        a, b = compile_one("module", mid), compile_one("static", mid)
        assert a["kubernetes"]["cert"]["files"] == b["kubernetes"]["cert"]["files"], mid
        assert "_errors" not in a and "_errors" not in b, (a.get("_errors"), b.get("_errors"))
    ids = minion_ids(n)
    per_run = max(1, n // runs)  # n minion ids in all, split over the runs
    mod_runs, static_runs, ratios = [], [], []
    for r in range(runs):
        times: dict[str, list[float]] = {"module": [], "static": []}
        for i, mid in enumerate(ids[r * per_run:(r + 1) * per_run]):
            order = ("module", "static") if i % 2 == 0 else ("static", "module")
            for side in order:
                t = time.perf_counter()
                compile_one(side, mid)
                times[side].append((time.perf_counter() - t) * 1000)
        m, s = statistics.median(times["module"]), statistics.median(times["static"])
        mod_runs.append(m)
        static_runs.append(s)
        ratios.append(m / s)
    return {"module_ms": round(statistics.median(mod_runs), 3),
            "static_ms": round(statistics.median(static_runs), 3),
            "ratio": round(statistics.median(ratios), 3),
            "ratios_per_run": [round(r, 3) for r in ratios], "minion_ids": per_run * runs,
            "per_run": per_run, "target": "≤ 1.0"}


# --- (c) a burst of minions ------------------------------------------------------------------

def complete(pillar: dict[str, Any]) -> bool:
    """Whether a minion got a whole set (no error, files present)."""
    cert = pillar.get("kubernetes", {}).get("cert", {})
    return "error" not in cert and bool(cert.get("files"))


def bench_burst(svc: Pkisvc, token_file: Path, runs: int,
                sizes: tuple[int, ...] = (100, 1000, 5000), threads: int = 8) -> dict[str, Any]:
    ext = module()
    opts = {"url": svc.url, "token_file": str(token_file), "roles": ROLES}
    results: dict[int, list[dict[str, float]]] = {n: [] for n in sizes}
    wire = Wire()
    try:
        for _ in range(runs):
            for n in sizes:  # interleaved: every size in every run
                ids = minion_ids(n)
                reset_module_state()
                wire.times = []
                t = time.perf_counter()
                with ThreadPoolExecutor(threads) as pool:
                    whole = list(pool.map(lambda mid: complete(ext.ext_pillar(mid, {}, **opts)),
                                          ids))
                total = time.perf_counter() - t
                errors = whole.count(False)
                results[n].append({"errors": errors, "total_s": total,
                                   "per_minion_ms": total * 1000 / n,
                                   "service_p50_ms": pct(wire.times, 50),
                                   "service_p99_ms": pct(wire.times, 99)})
    finally:
        wire.close()
    out: dict[str, Any] = {"threads": threads}
    for n in sizes:
        rs = results[n]
        out[str(n)] = {"errors": int(sum(r["errors"] for r in rs)),
                       **{k: round(statistics.median(r[k] for r in rs), 4)
                          for k in ("total_s", "per_minion_ms", "service_p50_ms",
                                    "service_p99_ms")}}
    # Linear growth: the cost per minion stays flat as the burst grows.
    for a, b in itertools.pairwise(sizes):
        out[f"growth_{a}_to_{b}"] = round(
            out[str(b)]["per_minion_ms"] / out[str(a)]["per_minion_ms"], 3)
    out["target"] = "0 errors, service p99 ≤ 20 ms, per-minion cost flat (linear)"
    return out
