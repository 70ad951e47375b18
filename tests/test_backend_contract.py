"""The contract every backend passes (`pkisvc.testing`), run for both built-in backends, and
run from the installed package the way a third-party backend runs it."""
import subprocess
import sys
import textwrap
from datetime import timedelta
from pathlib import Path

import pytest

from pkisvc.backends.files import FilesBackend
from pkisvc.errors import (
    BackendUnavailable,
    Conflict,
    NotFound,
    PermissionDenied,
    PkiError,
    VersionConflict,
)
from pkisvc.model import AuditEvent
from pkisvc.testing import BackendContract
from pkisvc.testing.backend import NOON
from tests.conftest import clean_env, vault_backend
from tests.openbao import policy_token


class TestFilesBackend(BackendContract):
    @pytest.fixture
    def backend(self, tmp_path: Path) -> FilesBackend:
        return FilesBackend(tmp_path / "data")


@pytest.mark.vault
class TestVaultBackend(BackendContract):
    @pytest.fixture
    def backend(self, openbao):
        return vault_backend(openbao)

    def test_pruning_drops_whole_old_periods_never_the_newest(self, openbao) -> None:
        # The shipped service policy deletes nothing: retention on Vault is the admin
        # policy's (`pkisvc verify --prune`), so this one runs with it.
        cluster = openbao.settings_overrides()["cluster"]
        admin = vault_backend(openbao, cluster=cluster,
                              **{"vault.token": policy_token(openbao.client(), "admin",
                                                             cluster)})
        super().test_pruning_drops_whole_old_periods_never_the_newest(admin)

    def test_the_service_policy_may_not_prune(self, backend) -> None:
        backend.append_audit(AuditEvent(time=NOON, actor="a", action="key-read"))
        backend.append_audit(AuditEvent(time=NOON + timedelta(days=1), actor="a",
                                        action="key-read"))
        with pytest.raises(PermissionDenied):
            backend.prune_periods("99999999")
        assert len(backend.chain_periods()) == 2


def test_errors_are_pkisvc_errors():
    # Every error a backend may raise is one of ours (callers catch nothing foreign).
    for cls in (NotFound, VersionConflict, BackendUnavailable, Conflict):
        assert issubclass(cls, PkiError)


THIRD_PARTY = {
    # A backend package outside pkisvc, registered through the entry-point group.
    "thirdparty/__init__.py": """
        from pkisvc.backends.files import FilesBackend

        class ThirdPartyBackend(FilesBackend):
            name = "thirdparty"

        class ForgetfulBackend(FilesBackend):
            # Writes on top of whatever is there: a lost update the contract must catch.
            name = "forgetful"

            def write(self, gen, *, expected, event=None):
                return super().write(gen, expected=self.latest(), event=event)
    """,
    "thirdparty-1.0.dist-info/METADATA": """
        Metadata-Version: 2.1
        Name: thirdparty
        Version: 1.0
    """,
    "thirdparty-1.0.dist-info/entry_points.txt": """
        [pkisvc.backends]
        thirdparty = thirdparty:ThirdPartyBackend
        forgetful = thirdparty:ForgetfulBackend
    """,
    # Its test module: the README's example.
    "tests/test_contract.py": """
        import pytest
        from pkisvc.backends import backend_class
        from pkisvc.testing import BackendContract

        class TestThirdPartyBackend(BackendContract):
            @pytest.fixture
            def backend(self, tmp_path):
                return backend_class("thirdparty")(tmp_path)

        class TestForgetfulBackend(BackendContract):
            @pytest.fixture
            def backend(self, tmp_path):
                return backend_class("forgetful")(tmp_path)
    """,
}


def test_a_third_party_backend_runs_the_suite_from_the_installed_package(tmp_path):
    for name, text in THIRD_PARTY.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(textwrap.dedent(text).lstrip())
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "-rA", "-p", "no:cacheprovider",
         "--rootdir", str(tmp_path), "tests/test_contract.py"],
        cwd=tmp_path, env=clean_env(PYTHONPATH=str(tmp_path)), capture_output=True,
        text=True, timeout=300)
    out = r.stdout + r.stderr
    outcome: dict[str, list[str]] = {}
    for line in r.stdout.splitlines():
        state, _, test = line.partition(" tests/test_contract.py::")
        if state in ("PASSED", "FAILED", "ERROR"):
            outcome.setdefault(f"{test.split('::')[0]} {state}", []).append(test)
    # Every contract test ran (parametrized ones several times) and the good backend passed.
    ran = len(outcome.get("TestThirdPartyBackend PASSED", []))
    assert ran >= 15, out
    assert "TestThirdPartyBackend FAILED" not in outcome and not any("ERROR" in k for k in outcome)
    # The forgetful one fails exactly the tests that check for lost updates.
    assert sorted(t.split(" ")[0] for t in outcome["TestForgetfulBackend FAILED"]) == [
        "TestForgetfulBackend::test_a_change_event_is_committed_with_its_generation",
        "TestForgetfulBackend::test_stale_writer_conflicts"], out
    assert len(outcome["TestForgetfulBackend PASSED"]) == ran - 2
    assert r.returncode == 1
