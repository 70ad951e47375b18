"""Side-by-side benchmarks: pkisvc against OpenBao and the raw crypto limit.

`make bench` runs this.  Every figure is the median of RUNS runs, pkisvc and its peer
interleaved in the same minutes, and each ratio compares figures of the same run.  Writes
bench/results/latest.json (every figure, the machine, the versions), latest.md and latest.png.
"""
from __future__ import annotations

import hashlib
import http.client
import json
import os
import platform
import re
import secrets
import socket
import statistics
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hosts
import listing
import pillar
from servers import BIN, REPO, OpenBao, Pkisvc, cleanup, workdir
from servers import http as call

RUNS = int(os.environ.get("BENCH_RUNS", "5"))
WRK_SECONDS = int(os.environ.get("BENCH_WRK_SECONDS", "3"))
RESULTS = REPO / "bench" / "results"
HOSTS = int(os.environ.get("BENCH_HOSTS", "5000"))  # host reports ([Q]): acceptance 5


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


# --- load generation -------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(url: str, header: str, conns: int, seconds: int = WRK_SECONDS) -> dict[str, float]:
    """One wrk run: requests/s, p50 and p99 in ms, non-2xx answers."""
    out = subprocess.run(["wrk", f"-t{min(conns, 2)}", f"-c{conns}", f"-d{seconds}s",
                          "--latency", "-H", header, url],
                         capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m, out
        return float(m.group(1)) * _UNITS[m.group(2)]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    total = re.search(r"(\d+) requests in", out)
    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99"),
            "non_2xx": int(bad.group(1)) if bad else 0,
            "requests": int(total.group(1)) if total else 0}


def summarise(runs: list[dict[str, float]]) -> dict[str, float]:
    return {k: median([r[k] for r in runs]) for k in runs[0]}


def paired(ours: list[float], peer: list[float], peer_key: str, n: int) -> dict[str, Any]:
    """Medians of both sides, and the median of the per-run ratios (same minutes, same load)."""
    ratios = [a / b for a, b in zip(ours, peer, strict=True)]
    return {"pkisvc_ms": median(ours), peer_key: median(peer),
            "ratio": round(median(ratios), 3), "ratios_per_run": [round(r, 3) for r in ratios],
            "per_run": n}


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    """Latency in ms of n sequential calls."""
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1000)
    return out


class Client:
    """One keep-alive HTTP connection: the same client for pkisvc and OpenBao."""

    def __init__(self, base: str, headers: dict[str, str]) -> None:
        host, port = base.removeprefix("http://").split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=120)
        self.conn.connect()
        # http.client sends the headers and the body in two writes: without TCP_NODELAY the
        # body waits for the headers' ACK (Nagle), the same added delay on both sides.
        assert self.conn.sock is not None
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.headers = {"Content-Type": "application/json", **headers}

    def post(self, path: str, body: Any = None, expect: int = 200) -> Any:
        self.conn.request("POST", path, body=json.dumps(body or {}), headers=self.headers)
        r = self.conn.getresponse()
        data = r.read()
        if r.status != expect:
            raise RuntimeError(f"POST {path}: {r.status} {data[:300]!r}")
        return json.loads(data)


# --- 1. read ---------------------------------------------------------------------------

def settings_token(name: str, *scopes: str) -> tuple[str, str]:
    """A token for pkisvc's `tokens` setting: (the token, the setting's JSON)."""
    token = secrets.token_urlsafe(32)
    spec = [{"name": name, "sha256": hashlib.sha256(token.encode()).hexdigest(),
             "scopes": list(scopes)}]
    return token, json.dumps(spec)


def start_vault_pkisvc(root: Path, files: Pkisvc, bao: OpenBao) -> tuple[Pkisvc, str, str]:
    """pkisvc on the vault backend (the same OpenBao), holding the files store's material.

    `pkisvc migrate --to vault` copies every version and token, so both pkisvc sides serve
    the same bytes as the OpenBao side.  Returns the service, a read token from its settings
    (no backend read) and one kept in the backend (a read of the tokens list per request).
    """
    kept = files.token("bench-read-kept", "read")  # migrated with the store
    token, spec = settings_token("bench-read", "read")
    vault_env = {"PKISVC_VAULT__ADDR": bao.addr, "PKISVC_VAULT__TOKEN": bao.token,
                 "PKISVC_VAULT__MOUNT": "secret"}
    subprocess.run([str(BIN / "pkisvc"), "migrate", "--to", "vault"], check=True,
                   capture_output=True, env={**files.env(), **vault_env})
    svc = Pkisvc(root / "vault", {**files.env_extra, **vault_env, "PKISVC_BACKEND": "vault",
                                  "PKISVC_TOKENS": spec}).start()
    return svc, token, kept


def bench_read(files: Pkisvc, bao: OpenBao, extra: dict[str, tuple[Pkisvc, str]]
               ) -> dict[str, Any]:
    token = files.token("bench-read", "read")
    status, body = call("GET", f"{files.url}/v1/certs/server",
                        headers={"Authorization": f"Bearer {token}"})
    assert status == 200, body
    bao.call("POST", "secret/data/bench/server", {"data": body})  # the same material
    sides = {"pkisvc_files": (f"{files.url}/v1/certs/server", f"Authorization: Bearer {token}"),
             "openbao_kv": (f"{bao.addr}/v1/secret/data/bench/server",
                            f"X-Vault-Token: {bao.token}")}
    for name, (svc, t) in extra.items():
        status, theirs = call("GET", f"{svc.url}/v1/certs/server",
                              headers={"Authorization": f"Bearer {t}"})
        assert status == 200 and theirs == body, (status, theirs)
        sides[name] = (f"{svc.url}/v1/certs/server", f"Authorization: Bearer {t}")
    result: dict[str, Any] = {"requests": {k: 0 for k in sides}}
    for conns in (1, 8):
        runs: dict[str, list[dict[str, float]]] = {k: [] for k in sides}
        ratios: dict[str, list[float]] = {k: [] for k in sides if k != "openbao_kv"}
        for _ in range(RUNS):
            for name, (url, header) in sides.items():  # interleaved: same minutes, same noise
                runs[name].append(wrk(url, header, conns))
                result["requests"][name] += int(runs[name][-1]["requests"])
            for name in ratios:  # each ratio from one run: pkisvc and OpenBao side by side
                ratios[name].append(runs[name][-1]["rps"] / runs["openbao_kv"][-1]["rps"])
        for name in sides:
            result.setdefault(name, {})[f"c{conns}"] = summarise(runs[name])
        result.setdefault("ratios", {})
        for name, rs in ratios.items():
            result["ratios"][f"{name}_c{conns}"] = round(median(rs), 3)
            result.setdefault("ratios_per_run", {})[f"{name}_c{conns}"] = [
                round(r, 3) for r in rs]
    result["body_bytes"] = len(json.dumps(body))
    result["token"] = token  # for the memory top-up; dropped before results are written
    return result


# --- 3. rotate, 4. CA rotation -----------------------------------------------------------

def bench_rotate(root: Path, bao: OpenBao) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for kt, mount, n in (("ecdsa-p256", "pki-ec", 40), ("rsa-2048", "pki-rsa", 10)):
        svc = Pkisvc(root / f"rotate-{kt}", {"PKISVC_KEY_TYPE": kt,
                                             "PKISVC_SERVER__SANS": '["k8s-master-1"]'}).start()
        try:
            client = Client(svc.url, {"Authorization": f"Bearer {svc.token('b', 'admin')}"})
            peer = Client(bao.addr, {"X-Vault-Token": bao.token})
            issue = {"common_name": "kube-apiserver", "ttl": "8760h",
                     "alt_names": "kubernetes,kubernetes.default,kubernetes.default.svc,"
                                  "kubernetes.default.svc.cluster.local,k8s-master-1",
                     "ip_sans": "10.0.0.1"}
            ours, theirs = [], []
            for _ in range(RUNS):
                ours.append(median(timed(lambda c=client: c.post(
                    "/v1/certs/server/rotate", expect=201), n)))
                theirs.append(median(timed(lambda p=peer, m=mount, b=issue: p.post(
                    f"/v1/{m}/issue/leaf", b), n)))
            result[kt] = paired(ours, theirs, "openbao_pki_issue_ms", n)
        finally:
            svc.stop()
    return result


def raw_set(key_type: str) -> None:
    """Three keys, a CA and two leaves with cryptography alone: the floor for a CA rotation."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    def key() -> Any:
        if key_type == "rsa-2048":
            return rsa.generate_private_key(65537, 2048)
        return ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca_key, s_key, k_key = key(), key(), key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "kubernetes-ca")])
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now).not_valid_after(now + timedelta(days=3650))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    for cn, k in (("kube-apiserver", s_key), ("kubecfg", k_key)):
        leaf = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
                .issuer_name(name).public_key(k.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now).not_valid_after(now + timedelta(days=365))
                .sign(ca_key, hashes.SHA256()))
        leaf.public_bytes(serialization.Encoding.PEM)
        k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                        serialization.NoEncryption())
    ca.public_bytes(serialization.Encoding.PEM)


def durable_write(directory: Path, data: bytes) -> None:
    """One small file made durable: written, fsynced, renamed into place, directory fsynced."""
    tmp, final = directory / "floor.tmp", directory / "floor"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, final)
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def bench_ca_rotation(root: Path) -> dict[str, Any]:
    """pkisvc's CA rotation against its floor, each part timed in the same minutes: the raw
    `cryptography` work (three keys, a CA, two leaves), one durable small-file write (the size
    of a generation's files) and an empty request's round trip on the same HTTP stack (the
    same route, refused for want of a token before any work)."""
    result: dict[str, Any] = {}
    for kt, n in (("rsa-2048", 8), ("ecdsa-p256", 40)):
        svc = Pkisvc(root / f"ca-{kt}", {"PKISVC_KEY_TYPE": kt}).start()
        scratch = root / f"floor-{kt}"
        scratch.mkdir()
        try:
            auth = {"Authorization": f"Bearer {svc.token('b', 'admin')}"}
            ours, floor, parts = [], [], []
            for _ in range(RUNS):
                # Fresh connections, each just before its use: the service closes one left
                # idle for 10 s.
                client = Client(svc.url, auth)
                ours.append(median(timed(lambda c=client: c.post("/v1/ca/rotate", expect=201),
                                         n)))
                raw = median(timed(lambda k=kt: raw_set(k), n))
                write = median(timed(lambda d=scratch: durable_write(d, b"x" * 12_000), n))
                empty = Client(svc.url, {})
                trip = median(timed(lambda c=empty: c.post("/v1/ca/rotate", expect=401), n))
                floor.append(raw + write + trip)
                parts.append({"raw_crypto_ms": raw, "durable_write_ms": write,
                              "empty_request_ms": trip})
            result[kt] = {**paired(ours, floor, "floor_ms", n),
                          **{k: median([p[k] for p in parts]) for k in parts[0]}}
        finally:
            svc.stop()
    return result


# --- the run -----------------------------------------------------------------------------

def machine() -> dict[str, Any]:
    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    from importlib.metadata import version

    from pkisvc import __version__
    wrk_v = subprocess.run(["wrk", "-v"], capture_output=True, text=True)
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(),
            "kernel": platform.release(), "pkisvc": __version__,
            "cryptography": version("cryptography"), "flask": version("flask"),
            "gunicorn": version("gunicorn"), "salt": version("salt"), "hvac": version("hvac"),
            "wrk": (wrk_v.stdout + wrk_v.stderr).split("\n")[0].strip()}


MEMORY_AFTER = 10_000  # requests


def memory(services: dict[str, tuple[Pkisvc, str]], served: dict[str, int]) -> dict[str, Any]:
    """RSS of every gunicorn worker of each service, after at least MEMORY_AFTER requests."""
    out: dict[str, Any] = {}
    for name, (svc, token) in services.items():
        while served[name] < MEMORY_AFTER:  # top up a service the benchmarks asked less
            served[name] += int(wrk(f"{svc.url}/v1/certs/server",
                                    f"Authorization: Bearer {token}", 8)["requests"])
        rss = [round(x, 1) for x in svc.worker_rss_mb()]
        out[name] = {"requests_served": served[name], "worker_rss_mb": rss}
    out["max_worker_rss_mb"] = max(x for v in out.values() for x in v["worker_rss_mb"])
    out["min_requests_served"] = min(v["requests_served"] for v in out.values()
                                     if isinstance(v, dict))
    return out


def load_average() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def main() -> None:
    root = workdir()
    started = time.monotonic()
    doc: dict[str, Any] = {"date": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
                           "runs": RUNS, "wrk_seconds": WRK_SECONDS, "machine": machine(),
                           "load_average_before": load_average()}
    bao = OpenBao(root / "openbao").start()
    doc["machine"]["openbao"] = bao.version()
    files = Pkisvc(root / "files", {"PKISVC_KEY_TYPE": "rsa-2048"}).start()
    vault: Pkisvc | None = None
    try:
        vault, vault_token, kept_token = start_vault_pkisvc(root, files, bao)
        print("read ...", flush=True)
        doc["read"] = bench_read(files, bao, {"pkisvc_vault": (vault, vault_token),
                                              "pkisvc_vault_kept_token": (vault, kept_token)})
        print("pillar ...", flush=True)
        token_file = root / "salt-master.token"
        token_file.write_text(files.token("salt-master", "secrets"))
        doc["pillar"] = {"module": pillar.bench_module(files, token_file, RUNS)}
        doc["pillar"]["compile"] = pillar.bench_compile(root, files, token_file, RUNS)
        doc["pillar"]["burst"] = pillar.bench_burst(files, token_file, RUNS)
        served = {"pkisvc_files": doc["read"]["requests"]["pkisvc_files"]
                  + doc["pillar"]["module"]["minion_ids"] * RUNS
                  + RUNS * sum(int(n) for n in doc["pillar"]["burst"] if n.isdigit()),
                  "pkisvc_vault": doc["read"]["requests"]["pkisvc_vault"]
                  + doc["read"]["requests"]["pkisvc_vault_kept_token"]}
        doc["memory"] = memory({"pkisvc_files": (files, doc["read"]["token"]),
                                "pkisvc_vault": (vault, vault_token)}, served)
        print("rotate ...", flush=True)
        doc["rotate"] = bench_rotate(root, bao)
        print("CA rotation ...", flush=True)
        doc["ca_rotation"] = bench_ca_rotation(root)
        print("host reports ...", flush=True)
        fleet = Pkisvc(root / "hosts", {"PKISVC_KEY_TYPE": "ecdsa-p256"}).start()
        try:
            doc["hosts"] = hosts.bench_hosts(fleet, HOSTS)
        finally:
            fleet.stop()
        print("listings (minions page, versions) ...", flush=True)
        doc["listing"] = listing.bench_listing(root, bao)
    finally:
        if vault is not None:
            vault.stop()
        files.stop()
        bao.stop()
        cleanup(root)
    doc["read"].pop("token", None)
    doc["load_average_after"] = load_average()
    doc["seconds"] = round(time.monotonic() - started, 1)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    from report import update_readme, write_markdown, write_png
    write_markdown(doc, RESULTS / "latest.md")
    write_png(doc, RESULTS / "latest.png")
    update_readme(doc, REPO / "README.md")
    print((RESULTS / "latest.md").read_text())


if __name__ == "__main__":
    main()
