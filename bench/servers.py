"""Servers the benchmarks run side by side: OpenBao on raft storage, pkisvc under gunicorn.

Each listens on a free loopback port, runs in its own process group and is stopped by PID.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as e:
            last = e
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}: {last!r}")


def http(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None,
         timeout: float = 30) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,  # noqa: S310 - loopback
                                 headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:  # noqa: S310 - loopback only
            raw = r.read()
            return r.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, raw.decode(errors="replace")


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def spawn(argv: list[str], log: Path, env: dict[str, str] | None = None,
          cwd: Path | None = None) -> Process:
    fh = open(log, "wb")
    proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                            start_new_session=True)
    return Process(proc, log)


@dataclass
class OpenBao:
    """OpenBao with integrated raft storage (persistent, like pkisvc's files), unsealed."""

    root: Path
    port: int = field(default_factory=free_port)
    token: str = ""
    process: Process | None = None

    @property
    def addr(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> OpenBao:
        cluster = free_port()
        (self.root / "raft").mkdir(parents=True, exist_ok=True)
        cfg = self.root / "openbao.hcl"
        cfg.write_text(f'''
storage "raft" {{
  path    = "{self.root / 'raft'}"
  node_id = "bench"
}}
listener "tcp" {{
  address         = "127.0.0.1:{self.port}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable     = true
}}
api_addr      = "http://127.0.0.1:{self.port}"
cluster_addr  = "http://127.0.0.1:{cluster}"
disable_mlock = true
log_level     = "warn"
''')
        self.process = spawn([str(BIN / "bao"), "server", "-config", str(cfg)],
                             self.root / "openbao.log")
        wait_for(lambda: http("GET", f"{self.addr}/v1/sys/health")[0] in (501, 503, 200), 60,
                 "OpenBao to listen")
        status, init = http("PUT", f"{self.addr}/v1/sys/init",
                            {"secret_shares": 1, "secret_threshold": 1})
        assert status == 200, init
        self.token = init["root_token"]
        http("PUT", f"{self.addr}/v1/sys/unseal", {"key": init["keys_base64"][0]})
        wait_for(lambda: http("GET", f"{self.addr}/v1/sys/health")[0] == 200, 60,
                 "OpenBao to become active")
        self.call("POST", "sys/mounts/secret", {"type": "kv", "options": {"version": "2"}})
        for name, key_type, bits in (("pki-ec", "ec", 256), ("pki-rsa", "rsa", 2048)):
            self.call("POST", f"sys/mounts/{name}", {"type": "pki",
                                                     "config": {"max_lease_ttl": "87600h"}})
            self.call("POST", f"{name}/root/generate/internal", {
                "common_name": f"bench-{key_type}-ca", "key_type": key_type, "key_bits": bits,
                "ttl": "87600h"})
            self.call("POST", f"{name}/roles/leaf", {
                "allow_any_name": True, "key_type": key_type, "key_bits": bits,
                "max_ttl": "8760h", "no_store": False, "server_flag": True,
                "client_flag": True})
        return self

    def call(self, method: str, path: str, body: Any = None) -> Any:
        status, doc = http(method, f"{self.addr}/v1/{path}", body,
                           {"X-Vault-Token": self.token})
        if status >= 300:
            raise RuntimeError(f"OpenBao {method} {path}: {status} {doc}")
        return doc

    def version(self) -> str:
        out = subprocess.run([str(BIN / "bao"), "version"], capture_output=True, text=True)
        return out.stdout.strip()

    def stop(self) -> None:
        if self.process:
            self.process.stop()


@dataclass
class Pkisvc:
    """`pkisvc serve` (gunicorn) on its own data dir."""

    root: Path
    env_extra: dict[str, str]
    workers: int = 2
    port: int = field(default_factory=free_port)
    process: Process | None = None
    bin: Path = BIN  # the venv whose pkisvc runs (bench/compare.py runs two)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PKISVC_", "VAULT_"))}
        env.update(PKISVC_DATA_DIR=str(self.root / "data"), **self.env_extra)
        return env

    def start(self) -> Pkisvc:
        self.root.mkdir(parents=True, exist_ok=True)
        self.process = spawn([str(self.bin / "pkisvc"), "serve", "--bind", f"127.0.0.1:{self.port}",
                              "--workers", str(self.workers)], self.root / "pkisvc.log",
                             env=self.env(), cwd=self.root)  # gunicorn imports from its cwd
        wait_for(lambda: http("GET", f"{self.url}/v1/health")[0] == 200, 120, "pkisvc")
        return self

    def token(self, name: str, *scopes: str) -> str:
        argv = [str(self.bin / "pkisvc"), "token", "create", name]
        for s in scopes:
            argv += ["--scope", s]
        return subprocess.run(argv, capture_output=True, text=True, env=self.env(),
                              check=True).stdout.strip()

    def worker_rss_mb(self) -> list[float]:
        """Resident memory of each gunicorn worker (children of the master)."""
        assert self.process is not None
        master = self.process.proc.pid
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        out = []
        for pid in children:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    out.append(int(line.split()[1]) / 1024)
        return out

    def stop(self) -> None:
        if self.process:
            self.process.stop()


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="pkisvc-bench-"))


def cleanup(path: Path) -> None:
    shutil.rmtree(path, ignore_errors=True)
