"""Property-based requests generated from our own OpenAPI document against the live app."""
import shutil
import tempfile
from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pkisvc.app import create_app
from tests.conftest import make_settings

# schemathesis builds its tests at import time, so the app is made here, on a temp dir the
# module fixture below removes.
_DIR = Path(tempfile.mkdtemp(prefix="pkisvc-st-"))
APP = create_app(make_settings(_DIR / "data"))
TOKEN = APP.extensions["pkisvc"].create_token("fuzz", ["admin", "secrets"], actor="test")
schema = schemathesis.openapi.from_wsgi("/v1/openapi.json", APP)


@pytest.fixture(scope="module", autouse=True)
def _cleanup():
    yield
    shutil.rmtree(_DIR, ignore_errors=True)


@schema.parametrize()
@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_5xx_and_responses_match_the_schema(case):
    store = APP.extensions["pkisvc"]
    before = store.latest(), len(store.audit(limit=10**6))
    response = case.call(headers={"Authorization": f"Bearer {TOKEN}"})
    if response.status_code >= 400:  # a rejected request wrote nothing
        assert (store.latest(), len(store.audit(limit=10**6))) == before
    assert TOKEN not in response.text
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance,
                                             status_code_conformance,
                                             content_type_conformance])
    assert "Traceback" not in response.text
