"""Real Go peers that judge our certificates: etcd, etcdctl, kubectl — and a stand-in API server.

Everything listens on loopback with free ports; processes are stopped by their PID.
"""
from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from pkisvc.store import CertStore
from tests.conftest import free_port, wait_for

HOST_FILES = ("ca.crt", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key")


def write_host_files(store: CertStore, dest: Path, version: int | None = None) -> Path:
    """Write a generation's host files (ca.crt = the trust bundle) to dest, keys 0600."""
    dest.mkdir(parents=True, exist_ok=True)
    gen = store.read(version)
    for name, data in store.host_files(gen, HOST_FILES).items():
        p = dest / name
        p.write_bytes(data)
        if name.endswith(".key"):
            p.chmod(0o600)
    return dest


# --- kubectl ---------------------------------------------------------------------------

def find_kubectl() -> str | None:
    """A fixed kubectl build: $KUBECTL, else the newest `kubectl.1.NN` beside a version
    dispatcher, else the binary itself (Debian's kubernetes-client)."""
    if os.environ.get("KUBECTL"):
        return os.environ["KUBECTL"]
    found = shutil.which("kubectl")
    if not found:
        return None
    real = Path(found).resolve()

    def minor(p: Path) -> int:
        tail = p.name.rsplit(".", 1)[1]
        return int(tail) if tail.isdigit() else -1
    pinned = sorted(real.parent.glob("kubectl.1.*"), key=minor)
    return str(pinned[-1]) if pinned else str(real)


@dataclass(frozen=True)
class Kubectl:
    """A kubectl binary and what it can do: `auth whoami` came in 1.27/1.28; Go refuses
    negative serials from 1.23 on (Debian's kubernetes-client is 1.20 on Go 1.19)."""

    path: str
    minor: int
    go: tuple[int, int]

    @classmethod
    def probe(cls, path: str) -> Kubectl:
        r = subprocess.run([path, "version", "--client", "-o", "json"], capture_output=True,
                           text=True, timeout=30, env={"PATH": os.environ.get("PATH", "")})
        assert r.returncode == 0, r.stderr
        v = json.loads(r.stdout)["clientVersion"]
        go = re.match(r"go(\d+)\.(\d+)", v.get("goVersion", "go0.0"))
        return cls(path, int(re.sub(r"\D", "", v["minor"]) or 0),
                   (int(go.group(1)), int(go.group(2))) if go else (0, 0))

    @property
    def has_whoami(self) -> bool:
        return self.minor >= 28

    def whoami(self, kubeconfig: Path) -> subprocess.CompletedProcess[str]:
        """Ask the server who we are: `auth whoami -o json`, or the same SelfSubjectReview
        POST through `create --raw` on a kubectl too old for whoami."""
        if self.has_whoami:
            return run_kubectl(self.path, kubeconfig, "auth", "whoami", "-o", "json")
        review = kubeconfig.with_suffix(".review.json")
        review.write_text(json.dumps({"apiVersion": "authentication.k8s.io/v1",
                                      "kind": "SelfSubjectReview"}))
        return run_kubectl(self.path, kubeconfig, "create", "--raw",
                           "/apis/authentication.k8s.io/v1/selfsubjectreviews",
                           "-f", str(review))


def run_kubectl(kubectl: str, kubeconfig: Path, *args: str,
                timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(kubeconfig.parent),
           "KUBECONFIG": str(kubeconfig)}
    return subprocess.run([kubectl, "--request-timeout=10s", *args], capture_output=True,
                          text=True, env=env, timeout=timeout)


# --- a stand-in kube-apiserver -----------------------------------------------------------

def _names(cert: dict[str, Any], key: str) -> list[str]:
    return [v for rdn in cert.get("subject", ()) for k, v in rdn if k == key]


class _Handler(BaseHTTPRequestHandler):
    server: _TLSServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        self.server.requests.append(f"{self.command} {self.path}")

    def _json(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or ""):  # kubectl create --raw
            body = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                chunk = self.rfile.read(size + 2)[:size] if size else b""
                if not size:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return body
                body += chunk
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def do_GET(self) -> None:
        path = self.path.split("?")[0]
        if path == "/version":
            self._json(200, {"major": "1", "minor": "33", "gitVersion": "v1.33.1",
                             "platform": "linux/amd64"})
        elif path == "/api/v1/namespaces/kube-system/secrets":
            self._json(200, {"kind": "SecretList", "apiVersion": "v1", "metadata": {},
                             "items": [{"metadata": {"name": n, "namespace": "kube-system"},
                                        "type": "kubernetes.io/service-account-token",
                                        "data": {k: base64.b64encode(v).decode()
                                                 for k, v in data.items()}}
                                       for n, data in self.server.secrets.items()]})
        else:
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404})

    def do_POST(self) -> None:
        self._read_body()
        m = re.fullmatch(r"/apis/authentication\.k8s\.io/(v1|v1beta1|v1alpha1)/"
                         r"selfsubjectreviews(\?.*)?", self.path)
        if not m:
            self._json(404, {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                             "reason": "NotFound", "code": 404})
            return
        peer = self.connection.getpeercert() or {}  # type: ignore[attr-defined]
        user = (_names(peer, "commonName") or [""])[0]
        groups = [*_names(peer, "organizationName"), "system:authenticated"]
        self._json(201, {"kind": "SelfSubjectReview",
                         "apiVersion": f"authentication.k8s.io/{m.group(1)}",
                         "metadata": {"creationTimestamp": None},
                         "status": {"userInfo": {"username": user, "groups": groups}}})


class _TLSServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.requests: list[str] = []
        self.rejected: list[str] = []
        self.secrets: dict[str, dict[str, bytes]] = {}  # kube-system secrets: name -> data
        super().__init__(("127.0.0.1", 0), _Handler)

    def finish_request(self, request: Any, client_address: Any) -> None:
        # The handshake runs in the handler thread, so one bad client cannot stall others.
        try:
            tls = self.ctx.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as e:
            self.rejected.append(str(e))
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()


@dataclass
class ApiServer:
    """Serve cert/key over TLS on loopback, requiring client certs signed by client_ca."""

    cert: Path
    key: Path
    client_ca: Path
    _srv: _TLSServer | None = field(default=None, init=False)
    _thread: threading.Thread | None = field(default=None, init=False)

    def __enter__(self) -> ApiServer:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(self.cert, self.key)
        ctx.load_verify_locations(cafile=str(self.client_ca))
        ctx.verify_mode = ssl.CERT_REQUIRED
        self._srv = _TLSServer(ctx)
        self._thread = threading.Thread(target=self._srv.serve_forever, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._srv is not None and self._thread is not None
        self._srv.shutdown()
        self._srv.server_close()
        self._thread.join(timeout=10)

    @property
    def port(self) -> int:
        assert self._srv is not None
        return int(self._srv.server_address[1])

    @property
    def requests(self) -> list[str]:
        assert self._srv is not None
        return self._srv.requests

    @property
    def secrets(self) -> dict[str, dict[str, bytes]]:
        assert self._srv is not None
        return self._srv.secrets

    @property
    def rejected(self) -> list[str]:
        assert self._srv is not None
        return self._srv.rejected


# --- etcd --------------------------------------------------------------------------------

def _need(binary: str) -> str:
    found = shutil.which(binary)
    if not found:
        pytest.fail(f"no {binary}: run `bash .ci/system-deps.sh` as root")
    return found


@dataclass
class Etcd:
    """One etcd member on loopback, TLS with client-cert auth, started from a directory
    holding ca.crt, server.cert and server.key."""

    certs: Path
    workdir: Path
    client_port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.client_port}"

    @property
    def log(self) -> Path:
        return self.workdir / f"etcd-{self.starts}.log"

    def start(self, timeout: float = 20) -> None:
        assert self.proc is None
        self.starts += 1
        self.client_port, peer = free_port(), free_port()
        c = self.certs
        argv = [_need("etcd"), "--name", "t", "--data-dir", str(self.workdir / "data"),
                "--listen-client-urls", self.url, "--advertise-client-urls", self.url,
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", f"t=http://127.0.0.1:{peer}",
                "--cert-file", str(c / "server.cert"), "--key-file", str(c / "server.key"),
                "--client-cert-auth", "--trusted-ca-file", str(c / "ca.crt"),
                "--logger", "zap", "--log-outputs", "stderr"]
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL)
        wait_for(self._healthy, timeout=timeout, what=f"etcd on {self.url}")

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"etcd exited {self.proc.returncode}: "
                                 f"{self.log.read_text()[-2000:]}")
        r = self.curl("kubecfg.crt", "kubecfg.key", "/health")
        return r.returncode == 0 and '"health":"true"' in r.stdout

    def curl(self, cert: str | Path, key: str | Path,
             path: str = "/health") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["curl", "-sS", "--max-time", "5", "--cacert", str(self.certs / "ca.crt"),
             "--cert", str(self.certs / cert), "--key", str(self.certs / key),
             f"{self.url}{path}"], capture_output=True, text=True, timeout=10)

    def etcdctl(self, cert: str | Path, key: str | Path, *args: str,
                timeout: str = "5s") -> subprocess.CompletedProcess[str]:
        env = {"PATH": os.environ.get("PATH", ""), "ETCDCTL_API": "3"}
        return subprocess.run(
            [_need("etcdctl"), "--endpoints", self.url, "--dial-timeout", "1s",
             "--command-timeout", timeout, "--cacert", str(self.certs / "ca.crt"),
             "--cert", str(self.certs / cert), "--key", str(self.certs / key), *args],
            capture_output=True, text=True, env=env, timeout=30)

    def rejections(self) -> list[str]:
        """etcd's own words for every connection it refused (from its log)."""
        out = []
        for line in self.log.read_text().splitlines():
            if "rejected connection" in line:
                try:
                    out.append(json.loads(line).get("error", line))
                except ValueError:
                    out.append(line)
        return out

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


# --- material ----------------------------------------------------------------------------

def make_store(root: Path, key_type: str, sans: tuple[str, ...] = ("127.0.0.1",),
               clock: Any = None) -> tuple[CertStore, Path]:
    """An initialised store on root/data and the config file the CLI reads for it."""
    from pkisvc.backends.files import FilesBackend
    from tests.conftest import make_settings

    root.mkdir(parents=True, exist_ok=True)
    cfg = root / "pkisvc.yaml"
    cfg.write_text(json.dumps({"data_dir": str(root / "data"), "key_type": key_type,
                               "server": {"sans": list(sans)}}))
    settings = make_settings(root / "data", key_type=key_type, **{"server.sans": list(sans)})
    store = CertStore(FilesBackend(root / "data"), settings, **({"clock": clock} if clock else {}))
    store.init(actor="test", key_type=key_type)
    return store, cfg
