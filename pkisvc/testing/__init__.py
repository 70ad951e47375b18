"""Test suites shipped with pkisvc, for backends written outside it (needs pytest).

A backend package subclasses `BackendContract` in one of its test modules and overrides the
`backend` fixture with one that returns a fresh, empty backend::

    import pytest
    from pkisvc.testing import BackendContract

    class TestMyBackend(BackendContract):
        @pytest.fixture
        def backend(self, tmp_path):
            return MyBackend(tmp_path)
"""
import pytest

# Plain `assert`s in the suite report their values like the tests' own.
pytest.register_assert_rewrite("pkisvc.testing.backend")

from pkisvc.testing.backend import BackendContract, fake_generation, fake_session  # noqa: E402

__all__ = ["BackendContract", "fake_generation", "fake_session"]
