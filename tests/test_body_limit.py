"""The 64 KiB request body limit under gunicorn: one JSON 413, whether the body is sent with a
Content-Length or chunked, and nothing written."""
import pytest
import requests

from pkisvc.app import MAX_BODY
from tests.conftest import serve, stop

OVER = b'{"reason": "' + b"x" * (65 * 1024) + b'"}'


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    data = tmp_path_factory.mktemp("limit") / "data"
    p, url = serve(data, workers=1)
    token = (data / "admin.token").read_text().strip()
    yield url, {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    stop(p)


def latest(url, headers):
    r = requests.get(f"{url}/v1/versions", headers=headers, timeout=30)
    assert r.status_code == 200, r.text
    return max(v["version"] for v in r.json()["versions"])


def chunks(body, size=16 * 1024):
    # A generator makes requests send `Transfer-Encoding: chunked`, no Content-Length.
    return (body[i:i + size] for i in range(0, len(body), size))


@pytest.mark.parametrize("send", ["content-length", "chunked"])
def test_a_body_over_64_kib_is_a_json_413_and_changes_nothing(service, send):
    url, headers = service
    before = latest(url, headers)
    r = requests.post(f"{url}/v1/ca/rotate", headers=headers, timeout=60,
                      data=OVER if send == "content-length" else chunks(OVER))
    assert r.status_code == 413
    assert r.headers["Content-Type"] == "application/json"
    assert r.json() == {"error": "payload_too_large", "limit": MAX_BODY,
                        "message": f"the request body is over the limit of {MAX_BODY} bytes"}
    assert latest(url, headers) == before


def test_a_chunked_body_under_the_limit_reaches_the_view_whole(service):
    url, headers = service
    body = b'{"reason": "chunked ' + b"y" * 100 + b'"}' + b" " * (40 * 1024)
    r = requests.post(f"{url}/v1/ca/rotate", headers=headers, data=chunks(body), timeout=60)
    assert r.status_code == 201, r.text
    assert r.json()["reason"] == "chunked " + "y" * 100
