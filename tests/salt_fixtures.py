"""Real Salt around a real pkisvc: masterless salt-call, and a master with minions on loopback.

Everything runs under temp roots: Salt's own `root_dir`s, and a host root per minion that
the formula writes into through `kubernetes:cert:lookup:prefix`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psutil
import pytest
import requests
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.conftest import REPO, clean_env, free_port, start, stop, wait_for

BIN = Path(sys.executable).parent
FORMULA = REPO / "formula"
ROLES = {"master": ["k8s-master*"], "node": ["k8s-node*"]}
SEED_PATHS = ("srv/kubernetes/ca.crt", "srv/kubernetes/server.cert", "srv/kubernetes/server.key",
              "srv/kubernetes/kubecfg.crt", "srv/kubernetes/kubecfg.key",
              "usr/local/share/ca-certificates/kubernetes-ca.crt")


class Service:
    """A `pkisvc serve` (gunicorn) on a free port, with an admin and a `secrets` token."""

    def __init__(self, base: Path) -> None:
        self.base = base
        self.data = base / "pkisvc-data"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.token_file = base / "salt-master.token"
        self.report_token_file = base / "salt-master-report.token"  # the master's reports ([Q])
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = base / "pkisvc.log"  # the service's output (gunicorn's log)

    def state(self) -> str:
        """Whether the service runs, and its log's tail: for a failing assertion's message."""
        alive = self.proc is not None and self.proc.poll() is None
        tail = self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""
        return f"service {'running' if alive else 'not running'}; its log ends:\n{tail}"

    def start(self) -> Service:
        env = clean_env(PKISVC_DATA_DIR=str(self.data), PKISVC_KEY_TYPE="ecdsa-p256")
        self.base.mkdir(parents=True, exist_ok=True)
        self.proc = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind",
                           f"127.0.0.1:{self.port}", "--workers", "2"], env, self.port,
                          log_path=self.log)
        for name, scope, path in (("salt-master", "secrets", self.token_file),
                                  ("salt-master-reports", "report", self.report_token_file)):
            if not path.exists():
                token = subprocess.run(
                    [sys.executable, "-m", "pkisvc.cli", "token", "create", name,
                     "--scope", scope], capture_output=True, text=True, check=True,
                    env=clean_env(PKISVC_DATA_DIR=str(self.data))).stdout
                path.write_text(token)
                path.chmod(0o600)
        return self

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None

    def admin(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {(self.data / 'admin.token').read_text().strip()}"}

    def rotate_ca(self) -> int:
        r = requests.post(f"{self.url}/v1/ca/rotate", json={"reason": "test"},
                          headers=self.admin(), timeout=30)
        assert r.status_code == 201, r.text
        return int(r.json()["version"])

    def fingerprints(self) -> dict[str, Any]:
        r = requests.get(f"{self.url}/v1/certs", headers=self.admin(), timeout=10)
        assert r.status_code == 200, r.text
        return dict(r.json())

    def ext_pillar(self, **extra: Any) -> list[dict[str, Any]]:
        conf = {"url": self.url, "token_file": str(self.token_file), "roles": ROLES,
                "timeout": 5, **extra}
        return [{"pkisvc": conf}]


def host_root(base: Path) -> Path:
    """A host's filesystem root as a Debian host has it: a CA store with one system CA.

    update-ca-certificates treats an empty ca-certificates.conf as `--fresh` and rewrites the
    bundle only when some CA is left, so an empty store would not behave like a host's.
    """
    if (base / "etc/ca-certificates.conf").exists():
        return base
    (base / "etc/ssl/certs").mkdir(parents=True, exist_ok=True)
    (base / "etc/ca-certificates/update.d").mkdir(parents=True, exist_ok=True)
    system = base / "usr/share/ca-certificates/test"
    system.mkdir(parents=True)
    (system / "system-root.crt").write_bytes(SYSTEM_CA)
    (base / "etc/ca-certificates.conf").write_text("test/system-root.crt\n")
    return base


def _system_ca() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "a system root")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


SYSTEM_CA = _system_ca()


def lookup_pillar(hosts: Path, minion_jinja: str = "{{ grains.id }}") -> str:
    """A static pillar SLS: the formula's lookup under hosts/<minion id>, plus other data.

    Only the prefix: the formula itself keeps update-ca-certificates inside it.
    """
    root = f"{hosts}/{minion_jinja}"
    return yaml.safe_dump({
        "kubernetes": {"cluster_name": "test-cluster",
                       "cert": {"lookup": {"prefix": root}}},
        "unrelated": {"formula": "data"},
    })


def write_pillar_roots(base: Path, hosts: Path) -> Path:
    roots = base / "pillar"
    roots.mkdir(parents=True, exist_ok=True)
    (roots / "top.sls").write_text("base:\n  '*':\n    - lookup\n")
    (roots / "lookup.sls").write_text(lookup_pillar(hosts))
    return roots


def salt_env() -> dict[str, str]:
    env = clean_env(PATH=f"{BIN}:{os.environ.get('PATH', '')}")
    env["PYTHONWARNINGS"] = "ignore::DeprecationWarning"
    env["SHELL"] = "/bin/sh"  # as under systemd: cmd.run states use /bin/sh, whatever ours is
    return env


class Masterless:
    """`salt-call --local` with the ext_pillar configured; one config dir per minion id."""

    def __init__(self, base: Path, service: Service, *, module_dirs: list[str] | None = None,
                 env: dict[str, str] | None = None) -> None:
        self.base, self.service = base, service
        self.hosts = base / "hosts"
        self.pillar_roots = write_pillar_roots(base, self.hosts)
        self.module_dirs = module_dirs or []
        self.env = env or salt_env()

    def config_dir(self, minion_id: str) -> Path:
        d = self.base / "salt" / minion_id
        if not (d / "minion").exists():
            d.mkdir(parents=True)
            host_root(self.hosts / minion_id)
            conf: dict[str, Any] = {
                "id": minion_id, "root_dir": str(d / "root"), "file_client": "local",
                "file_roots": {"base": [str(FORMULA)]},
                "pillar_roots": {"base": [str(self.pillar_roots)]},
                "ext_pillar": self.service.ext_pillar(), "log_level_logfile": "info",
            }
            if self.module_dirs:
                conf["module_dirs"] = self.module_dirs
            (d / "minion").write_text(yaml.safe_dump(conf))
        return d

    def root(self, minion_id: str) -> Path:
        self.config_dir(minion_id)
        return self.hosts / minion_id

    def run(self, minion_id: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(BIN / "salt-call"), "--local", "-c",
                               str(self.config_dir(minion_id)), "--out", "json", *args],
                              capture_output=True, text=True, env=self.env, timeout=120)

    def call(self, minion_id: str, *args: str) -> Any:
        r = self.run(minion_id, *args)
        try:
            out = json.loads(r.stdout)["local"]
        except (ValueError, KeyError):
            raise AssertionError(f"salt-call {args}: rc={r.returncode}\n{r.stdout}\n"
                                 f"{r.stderr[-3000:]}") from None
        return out

    def pillar(self, minion_id: str) -> dict[str, Any]:
        return dict(self.call(minion_id, "pillar.items", "unmask=True"))

    def apply(self, minion_id: str, sls: str) -> dict[str, dict[str, Any]]:
        return by_id(self.call(minion_id, "state.apply", sls))


def by_id(ret: Any) -> dict[str, dict[str, Any]]:
    """State results keyed by state id (`file_|-ID_|-name_|-managed` -> ID)."""
    assert isinstance(ret, dict), ret
    return {k.split("_|-")[1]: v for k, v in ret.items()}


def changed(states: dict[str, dict[str, Any]]) -> set[str]:
    return {k for k, v in states.items() if v["changes"]}


def view_report(states: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (state,) = states.values()
    assert state["result"] is True, state
    return dict(yaml.safe_load(state["comment"]))


# --- master and minions on loopback ---------------------------------------------------------

class Daemon:
    """A Salt daemon in its own process group; stopped through its pidfile's PID."""

    def __init__(self, kind: str, conf_dir: Path, root: Path) -> None:
        self.kind, self.conf_dir, self.root = kind, conf_dir, root
        self.pidfile = root / "var/run" / f"salt-{kind}.pid"
        self.log = root / "var/log/salt" / kind
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Daemon:
        self.proc = subprocess.Popen([str(BIN / f"salt-{self.kind}"), "-c", str(self.conf_dir),
                                      "-l", "quiet"], env=salt_env(), start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        def up() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                pytest.fail(f"salt-{self.kind} exited: {self.log_tail()}")
            return self.pidfile.exists() and self.pidfile.read_text().strip().isdigit()
        wait_for(up, 60, f"salt-{self.kind} pidfile")
        return self

    def log_tail(self) -> str:
        return self.log.read_text()[-3000:] if self.log.exists() else "(no log)"

    def processes(self) -> list[psutil.Process]:
        """The daemon (its pidfile's PID, and the PID we started) and all its children."""
        pids: set[int] = set()
        if self.pidfile.exists() and self.pidfile.read_text().strip().isdigit():
            pids.add(int(self.pidfile.read_text()))
        if self.proc is not None:
            pids.add(self.proc.pid)
        procs: list[psutil.Process] = []
        for pid in pids:
            try:
                p = psutil.Process(pid)
                procs += [p, *p.children(recursive=True)]
            except psutil.NoSuchProcess:
                pass
        return procs

    def stop(self) -> None:
        terminate(self.processes())
        if self.proc is not None:
            self.proc.wait(timeout=10)


def terminate(procs: list[psutil.Process]) -> None:
    """SIGTERM every process, wait for all of them at once, SIGKILL what is left."""
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=20)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=10)


class Cluster:
    """A salt-master and minions on 127.0.0.1 with their own ports and root_dirs."""

    def __init__(self, base: Path, service: Service, minions: dict[str, dict[str, Any]],
                 file_roots: list[Path] | None = None, reactor: bool = False) -> None:
        self.base, self.service = base, service
        self.reactor = reactor  # the formula's report reactor on job returns
        self.file_roots = [FORMULA, *(file_roots or [])]
        self.hosts = base / "hosts"
        self.publish_port, self.ret_port = free_port(), free_port()
        self.master_dir = base / "master"
        self.daemons: list[Daemon] = []
        self.minion_grains = minions

    def start(self) -> Cluster:
        self.master_dir.mkdir(parents=True)
        roots = write_pillar_roots(self.base, self.hosts)
        (self.master_dir / "master").write_text(yaml.safe_dump({
            "root_dir": str(self.master_dir / "root"), "interface": "127.0.0.1",
            "publish_port": self.publish_port, "ret_port": self.ret_port,
            "auto_accept": True, "file_roots": {"base": [str(r) for r in self.file_roots]},
            "pillar_roots": {"base": [str(roots)]}, "ext_pillar": self.service.ext_pillar(),
            "worker_threads": 2, "log_level_logfile": "info",
            "pkisvc_report_token_file": str(self.service.report_token_file),
            **({"reactor": [{"salt/job/*/ret/*": ["salt://kubernetes/cert/reactor/report.sls"]}]}
               if self.reactor else {}),
        }))
        self.daemons.append(Daemon("master", self.master_dir, self.master_dir / "root").start())
        for minion_id, grains in self.minion_grains.items():
            host_root(self.hosts / minion_id)
            d = self.base / "minions" / minion_id
            d.mkdir(parents=True)
            (d / "minion").write_text(yaml.safe_dump({
                "id": minion_id, "root_dir": str(d / "root"), "master": "127.0.0.1",
                "master_port": self.ret_port, "publish_port": self.publish_port,
                "grains": grains, "log_level_logfile": "info", "acceptance_wait_time": 1,
                "random_reauth_delay": 0, "auth_safemode": False,
            }))
            self.daemons.append(Daemon("minion", d, d / "root").start())
        ids = sorted(self.minion_grains)
        wait_for(lambda: sorted(self.salt("*", "test.ping", timeout=5)) == ids, 90,
                 "minions to answer test.ping")
        return self

    def minion(self, minion_id: str) -> Daemon:
        return next(d for d in self.daemons
                    if d.kind == "minion" and d.conf_dir.name == minion_id)

    def restart_minion(self, minion_id: str) -> None:
        """Start a stopped minion again and wait until it answers."""
        daemon = self.minion(minion_id)
        if daemon.proc is not None:
            daemon.proc.wait(timeout=30)
        daemon.pidfile.unlink(missing_ok=True)
        daemon.start()
        wait_for(lambda: self.salt(minion_id, "test.ping", timeout=5) == {minion_id: True}, 90,
                 f"{minion_id} to answer test.ping again")

    def stop(self) -> None:
        terminate([p for d in self.daemons for p in d.processes()])
        for d in self.daemons:
            if d.proc is not None:
                d.proc.wait(timeout=10)

    def salt(self, target: str, *args: str, timeout: int = 60) -> dict[str, Any]:
        r = subprocess.run([str(BIN / "salt"), "-c", str(self.master_dir), "--out", "json",
                            "--static", "-t", str(timeout), target, *args], capture_output=True,
                           text=True, env=salt_env(), timeout=timeout + 60)
        try:
            return dict(json.loads(r.stdout or "{}"))
        except ValueError:
            raise AssertionError(f"salt {target} {args}: rc={r.returncode}\n{r.stdout}\n"
                                 f"{r.stderr[-3000:]}") from None

    def apply(self, minion_id: str, sls: str) -> dict[str, dict[str, Any]]:
        return by_id(self.salt(minion_id, "state.apply", sls)[minion_id])

    def run(self, *args: str, timeout: int = 600) -> subprocess.CompletedProcess[str]:
        """`salt-run` on this master (e.g. state.orchestrate)."""
        return subprocess.run([str(BIN / "salt-run"), "-c", str(self.master_dir), "--out",
                               "json", *args], capture_output=True, text=True, env=salt_env(),
                              timeout=timeout)
