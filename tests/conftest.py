"""Shared fixtures: settings on a temp data dir, one backend per kind, a store, helpers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import pytest
import requests

from pkisvc.backends.files import FilesBackend
from pkisvc.settings import Settings
from pkisvc.store import CertStore

REPO = Path(__file__).resolve().parent.parent


# pytest-timeout counts fixture setup in the test that first asks for a fixture, so whichever
# test first needs a shared peer (OpenBao, a Salt master and minions, etcd, a served pkisvc)
# pays for starting it.  Every test that uses a session- or module-scoped fixture, or OpenBao
# (the `vault` mark: `backend` asks for it at run time), gets this much on top of the limit.
PEER_START_ALLOWANCE = 180


def peer_start_allowance(item: pytest.Item) -> int:
    """Return the seconds item may spend starting shared peers, on top of the limit."""
    if item.get_closest_marker("vault"):
        return PEER_START_ALLOWANCE
    defs = getattr(getattr(item, "_fixtureinfo", None), "name2fixturedefs", {})
    wide = any(d[-1].scope in ("session", "package", "module")
               and d[-1].func.__module__.startswith("tests.") for d in defs.values() if d)
    return PEER_START_ALLOWANCE if wide else 0


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    option = config.getoption("timeout", None)
    limit = float(config.getini("timeout") if option is None else option or 0)
    for item in items:
        extra = peer_start_allowance(item)
        if limit and extra and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(limit + extra))


def chain_checked(client: Any) -> None:
    """Wait for a new service's chain check at start: a thread that reads data_dir and raises
    the witness there (a test that pulls data_dir away must not race it)."""
    wait_for(lambda: client.get("/v1/health").get_json()["audit_chain"]["ok"] is not None, 60,
             "the chain check at start")


def make_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings isolated from the environment; EC keys unless a test asks otherwise."""
    values = {"data_dir": str(data_dir), "key_type": "ecdsa-p256", **overrides}
    return Settings.load(env={}, overrides=values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path / "data")


@pytest.fixture(params=["files", pytest.param("vault", marks=pytest.mark.vault)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "files":
        return FilesBackend(tmp_path / "data")
    if request.param == "vault":
        return vault_backend(request.getfixturevalue("openbao"))
    raise AssertionError(request.param)


@pytest.fixture
def store(backend: Any, settings: Settings) -> CertStore:
    return CertStore(backend, settings)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll check() until it returns something truthy, or fail after timeout."""
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
    raise AssertionError(f"timed out waiting for {what}: {last!r}")


def run_cli(*args: str, env: dict[str, str] | None = None,
            input: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed `pkisvc` as a user would, in a clean environment."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("PKISVC_")}
    return subprocess.run([sys.executable, "-m", "pkisvc.cli", *args], capture_output=True,
                          text=True, env={**base, **(env or {})}, input=input, timeout=120)


def openssl(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, cwd=cwd,
                          check=False, timeout=60)


def start(cmd, env, port, *, scheme="http", verify=True, log_path=None):
    """Start a server process in its own group; return it once /v1/health answers.  Its
    output goes to log_path when given (kept for a failure's diagnosis), else nowhere."""
    log = open(log_path, "w+b") if log_path is not None else tempfile.TemporaryFile()
    p = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                         stdout=subprocess.DEVNULL, stderr=log)

    def up():
        if p.poll() is not None:
            log.seek(0)
            pytest.fail(f"{cmd[:3]} exited: {log.read().decode()[-2000:]}")
        return requests.get(f"{scheme}://127.0.0.1:{port}/v1/health", timeout=2,
                            verify=verify).status_code == 200
    try:
        wait_for(up, 120, "the service to answer")
    except BaseException:
        stop(p)
        raise
    return p


def serve(data: Path, workers: int = 2, **env: str) -> tuple[subprocess.Popen[bytes], str]:
    """`pkisvc serve` on a free loopback port over data (EC keys); return (process, url)."""
    port = free_port()
    p = start([sys.executable, "-m", "pkisvc.cli", "serve", "--bind", f"127.0.0.1:{port}",
               "--workers", str(workers)],
              clean_env(PKISVC_DATA_DIR=str(data), PKISVC_KEY_TYPE="ecdsa-p256", **env), port)
    return p, f"http://127.0.0.1:{port}"


def stop(p):
    """Stop the server by its PID (its own process group), and wait for it."""
    if p.poll() is None:
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def clean_env(**extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PKISVC_")}
    env.update(extra)
    return env

# --- OpenBao (tests/openbao.py) -------------------------------------------------------------

@pytest.fixture(scope="session")
def openbao(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """One OpenBao dev server for the session; tests keep apart by cluster name."""
    from tests.openbao import OpenBao
    server = OpenBao(tmp_path_factory.mktemp("openbao"))
    yield server
    server.stop()


def vault_backend(openbao: Any, **overrides: Any) -> Any:
    """A VaultBackend on the shared server, under a cluster name no other test uses."""
    from pkisvc.backends.vault import VaultBackend
    s = Settings.load(env={}, overrides=openbao.settings_overrides(**overrides))
    return VaultBackend.from_settings(s)


@pytest.fixture(params=["files", pytest.param("vault", marks=pytest.mark.vault)])
def service_store(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """(environment for `pkisvc serve` and the CLI, settings overrides for a store process,
    a factory of a backend to check afterwards) over files or the shared OpenBao."""
    if request.param == "files":
        return {}, {}, lambda: FilesBackend(tmp_path / "data")
    from pkisvc.backends.vault import VaultBackend
    openbao = request.getfixturevalue("openbao")
    over = openbao.settings_overrides()
    from pkisvc.chain import ChainKey
    env = {"PKISVC_BACKEND": "vault", "PKISVC_CLUSTER": over["cluster"],
           "PKISVC_VAULT__ADDR": openbao.addr, "PKISVC_VAULT__TOKEN": over["vault.token"],
           "PKISVC_CHAIN_KEY_FILE": over["chain_key_file"]}  # one key for every replica
    from pkisvc.witness import Witness
    return env, over, lambda: VaultBackend(openbao.addr, cluster=over["cluster"],
                                           token=over["vault.token"],
                                           chain_key=ChainKey(over["chain_key_file"]),
                                           witness=Witness(tmp_path / "data" / "chain.head"))
