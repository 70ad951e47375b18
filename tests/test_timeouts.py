"""pytest-timeout as configured in setup.cfg: a hung test fails, the run goes on."""
import subprocess
import sys
import time

from tests.conftest import PEER_START_ALLOWANCE, REPO, clean_env

HUNG = '''
import threading
import pytest

@pytest.fixture
def stuck():
    threading.Event().wait()  # a peer that never answers

def test_hangs():
    threading.Event().wait()

def test_hangs_in_setup(stuck):
    pass

def test_after_the_hangs():
    pass
'''


def test_a_hung_test_fails_and_the_run_goes_on(tmp_path):
    (tmp_path / "test_hung.py").write_text(HUNG)
    started = time.monotonic()
    # The project's own configuration, with the limit cut short for this test.
    r = subprocess.run([sys.executable, "-m", "pytest", "-c", str(REPO / "setup.cfg"),
                        "--rootdir", str(tmp_path), "-p", "no:cacheprovider", "--timeout", "2",
                        "-rA", str(tmp_path / "test_hung.py")],
                       cwd=tmp_path, env=clean_env(), capture_output=True, text=True, timeout=120)
    out = r.stdout + r.stderr
    assert r.returncode == 1, out
    assert "FAILED test_hung.py::test_hangs - Failed: Timeout" in out
    assert "ERROR test_hung.py::test_hangs_in_setup - Failed: Timeout" in out
    assert "PASSED test_hung.py::test_after_the_hangs" in out
    assert time.monotonic() - started < 60


DUMP = '''
def pytest_collection_finish(session):
    for item in session.items:
        mark = item.get_closest_marker("timeout")
        print("LIMIT", item.nodeid, mark.args[0] if mark else "-")
'''


def test_the_limit_is_raised_where_peers_start(tmp_path, pytestconfig):
    assert pytestconfig.getini("timeout") == "120"
    (tmp_path / "timeout_dump.py").write_text(DUMP)
    r = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q",
                        "-p", "no:cacheprovider", "-p", "timeout_dump", "tests/test_salt.py",
                        "tests/test_backend_contract.py", "tests/test_pki.py"],
                       cwd=REPO, env=clean_env(PYTHONPATH=str(tmp_path)), capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    limits = dict(line.split()[1:] for line in r.stdout.splitlines() if line.startswith("LIMIT"))
    raised = str(120 + PEER_START_ALLOWANCE + 0.0)
    # OpenBao (session), and a Salt master with minions (module): not the Salt test that
    # starts its own service inside the test.
    peers = [n for n in limits if "Vault" in n or n.startswith(
        "tests/test_salt.py::test_each_minion_receives_only_its_roles_files")]
    assert len(peers) > 10
    assert {n: limits[n] for n in peers if limits[n] != raised} == {}
    alone = [n for n in limits if n.startswith(("tests/test_pki.py::",
                                                "tests/test_backend_contract.py::TestFiles"))]
    assert len(alone) > 10
    assert all(limits[n] == "-" for n in alone), limits
