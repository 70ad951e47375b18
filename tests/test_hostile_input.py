"""Hostile input: generated settings, imports and request bodies (issue 9, item 4).

Whatever comes in, the answer is an expected error (one line, a 4xx) or success — never a
5xx, a traceback or a foreign exception — and a rejected change writes nothing.
"""
import json
import string

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pkisvc import pki
from pkisvc.app import create_app
from pkisvc.backends.files import FilesBackend
from pkisvc.changes import parse_files
from pkisvc.errors import ConfigError, PkiError
from pkisvc.imports import IMPORT_FILES, read_import_dir, read_import_pillar
from pkisvc.settings import _SCHEMA, Settings
from pkisvc.store import CertStore
from tests.conftest import make_settings

pytestmark = pytest.mark.slow
FUZZ = settings(max_examples=150, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

scalars = st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats() | st.text(
    max_size=40)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=12), c, max_size=4), max_leaves=12)
# Values that look like what the keys expect, so the parsers are reached past the type check.
plausible = st.sampled_from(["", "0", "-1", "30d", "1h", "10.0.0.0/8", "::/0", "10.0.0.1/24",
                             "a..b", "-x", "x" * 300, "rsa-1024", "ecdsa-p256", "127.0.0.1:0",
                             "[]", "{}", "read", "admin", "\x00", "ü", "1e400", "nan",
                             "http://[::1", "../etc", "*.example.org"])
setting_values = json_values | plausible | st.lists(plausible, max_size=3)
keys = st.sampled_from(sorted(_SCHEMA)) | st.text(max_size=12)


def nest(flat):
    doc = {}
    for key, value in flat.items():
        head, _, tail = key.partition(".")
        if tail and isinstance(doc.get(head, {}), dict):
            doc.setdefault(head, {})[tail] = value
        else:
            doc[key] = value
    return doc


def expected_error(call):
    """Run call(); a PkiError of 4xx (or ConfigError) is fine, anything else is a bug."""
    try:
        return call()
    except ConfigError as e:
        assert "\n" not in e.message
    except PkiError as e:
        assert 400 <= e.status < 500, (type(e), e.message)
        assert "\n" not in e.message and "Traceback" not in e.message
    return None


@FUZZ
@given(flat=st.dictionaries(keys, setting_values, max_size=6),
       env=st.dictionaries(keys.map(lambda k: "PKISVC_" + k.upper().replace(".", "__")),
                           st.text(max_size=30) | plausible, max_size=4),
       raw=st.booleans(), text=st.text(max_size=200))
def test_settings_fail_in_one_line_or_load(tmp_path_factory, flat, env, raw, text):
    path = tmp_path_factory.mktemp("cfg") / "pkisvc.yaml"
    if raw:
        path.write_text(text)
    else:
        path.write_text(yaml.safe_dump(nest(flat), allow_unicode=True))
    env = {k: v for k, v in env.items() if "\x00" not in k + v}
    loaded = expected_error(lambda: Settings.load(path, env=env))
    assert loaded is None or isinstance(loaded, Settings)


@pytest.fixture(scope="module")
def material(tmp_path_factory):
    """A valid set of import files, and a second one from another CA."""
    sets = []
    for n in ("a", "b"):
        root = tmp_path_factory.mktemp(n)
        s = CertStore(FilesBackend(root), make_settings(root))
        s.init(actor="test")
        gen = s.read()
        sets.append({n: gen.files["trust.crt" if n == "ca.crt" else n] for n in IMPORT_FILES})
    return sets


def mutated(base, other, data):
    """A set of import files with a few hostile changes."""
    files = dict(base)
    for _ in range(data.draw(st.integers(1, 3))):
        name = data.draw(st.sampled_from(IMPORT_FILES))
        kind = data.draw(st.sampled_from(["drop", "swap", "foreign", "truncate", "flip",
                                          "garbage", "concat", "empty"]))
        if kind == "drop":
            files.pop(name, None)
        elif kind == "swap":
            files[name] = base[data.draw(st.sampled_from(IMPORT_FILES))]
        elif kind == "foreign":
            files[name] = other[name]
        elif kind == "truncate" and name in files:
            files[name] = files[name][:data.draw(st.integers(0, len(files[name])))]
        elif kind == "flip" and name in files and files[name]:
            i = data.draw(st.integers(0, len(files[name]) - 1))
            b = bytearray(files[name])
            b[i] ^= data.draw(st.integers(1, 255))
            files[name] = bytes(b)
        elif kind == "garbage":
            files[name] = data.draw(st.binary(max_size=300))
        elif kind == "concat":
            files[name] = base[name] + other[name]
        else:
            files[name] = b""
    return files


def unchanged(store):
    return store.latest(), len(store.audit(limit=10**6))


@FUZZ
@given(data=st.data())
def test_hostile_pem_directories_are_refused_without_a_write(material, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("st")
    store = CertStore(FilesBackend(root / "data"), make_settings(root / "data"))
    store.init(actor="test")
    files = mutated(material[0], material[1], data)
    src = root / "import"
    src.mkdir()
    for name, content in files.items():
        (src / name).write_bytes(content)
    before = unchanged(store)
    record = expected_error(lambda: store.import_files(read_import_dir(src), actor="test"))
    if record is None:
        assert unchanged(store) == before
    else:  # whatever was accepted is a whole set
        pki.check_set(parse_files(
            store.read().files))


pillar_keys = st.sampled_from([*IMPORT_FILES, *(n.replace(".", "_") for n in IMPORT_FILES)]) \
    | st.text(max_size=10)


@FUZZ
@given(data=st.data(), key=st.sampled_from(["kubernetes:cert", "a", "a:b:c", ":", ""]),
       shape=st.sampled_from(["pem", "json", "text"]))
def test_hostile_pasted_pillars_are_refused_without_a_write(material, tmp_path_factory, data,
                                                            key, shape):
    root = tmp_path_factory.mktemp("pp")
    store = CertStore(FilesBackend(root / "data"), make_settings(root / "data"))
    store.init(actor="test")
    path = root / "pillar.sls"
    if shape == "text":
        path.write_text(data.draw(st.text(alphabet=string.printable + "ü:-[]{}", max_size=300)))
    else:
        if shape == "pem":
            files = mutated(material[0], material[1], data)
            leaf = {n: v.decode("utf-8", "replace") for n, v in files.items()}
        else:
            leaf = data.draw(st.dictionaries(pillar_keys, json_values, max_size=6))
        doc = leaf
        for part in reversed(key.split(":")):
            doc = {part: doc}
        path.write_text(yaml.safe_dump(doc, allow_unicode=True))
    before = unchanged(store)
    expected_error(lambda: store.import_files(read_import_pillar(path, key), actor="test"))
    after = unchanged(store)
    assert after == before or after[0] == before[0] + 1


CHANGE_PATHS = ["/v1/ca/rotate", "/v1/certs/server/rotate", "/v1/certs/kubecfg/rotate",
                "/v1/certs/ca/rotate", "/v1/rollback", "/v1/ca/rotate/continue",
                "/v1/ca/rotate/finish", "/v1/ca/rotate/abort", "/v1/renew", "/v1/init",
                "/v1/certs/../rotate", "/v1/certs/%00/rotate"]
body_fields = st.sampled_from(["reason", "mode", "key_type", "sans", "version", "dry_run"]) \
    | st.text(max_size=8)
bodies = (st.dictionaries(body_fields, json_values | plausible, max_size=4).map(json.dumps)
          | json_values.map(json.dumps) | st.text(max_size=100)
          | st.binary(max_size=100))


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    app = create_app(make_settings(tmp_path_factory.mktemp("api") / "data"))
    token = app.extensions["pkisvc"].create_token("fuzz", ["admin", "secrets"], actor="test")
    return app, token


@FUZZ
@given(path=st.sampled_from(CHANGE_PATHS), body=bodies,
       ctype=st.sampled_from(["application/json", "text/plain", None]))
def test_hostile_request_bodies_get_4xx_and_write_nothing(client, path, body, ctype):
    app, token = client
    store = app.extensions["pkisvc"]
    before = unchanged(store)
    headers = {"Authorization": f"Bearer {token}"}
    if ctype:
        headers["Content-Type"] = ctype
    r = app.test_client().post(path, data=body, headers=headers)
    assert r.status_code < 500, r.get_data(as_text=True)
    text = r.get_data(as_text=True)
    assert "Traceback" not in text and "PRIVATE KEY" not in text and token not in text
    if r.status_code >= 400:
        assert unchanged(store) == before
        assert set(r.get_json()) == {"error", "message"}
    elif r.status_code == 201:
        assert store.latest() == before[0] + 1


segments = st.sampled_from(["certs", "server", "kubecfg", "ca", "key", "pillar", "versions",
                            "audit", "ca.pem", "rotation", "..", "%2e%2e", "%00", "1", "0",
                            "-1", "k8s-node-1", "ü", "a" * 300, ""]) | st.text(
    st.characters(codec="utf-8", exclude_characters="?#"), max_size=8)  # "?#" end a path
queries = st.lists(st.tuples(st.sampled_from(["role", "version", "since", "limit", "x"])
                             | st.text(max_size=5),
                             st.sampled_from(["master", "node", "1", "0", "99999999999",
                                              "2020-01-01T00:00:00Z", "", "-1"])
                             | st.text(max_size=10)), max_size=3)


@FUZZ
@given(parts=st.lists(segments, min_size=1, max_size=4), query=queries,
       auth=st.sampled_from(["good", "none", "bad", "junk"]),
       etag=st.sampled_from([None, '"1"', '"2"', "*", "garbage"]))
def test_hostile_reads_get_no_5xx_and_no_key_to_the_wrong_reader(client, parts, query, auth,
                                                                  etag):
    app, token = client
    store = app.extensions["pkisvc"]
    before = unchanged(store)
    headers = {"Authorization": {"good": f"Bearer {token}", "bad": "Bearer pks_nope",
                                 "junk": "Basic \x00\xff"}.get(auth, "")}
    if etag:
        headers["If-None-Match"] = etag
    r = app.test_client().get("/v1/" + "/".join(parts), query_string=query, headers=headers)
    text = r.get_data(as_text=True)
    assert r.status_code < 500, text
    assert "Traceback" not in text and token not in text
    if auth != "good":
        assert "PRIVATE KEY" not in text
    if r.status_code >= 400:
        assert set(r.get_json()) == {"error", "message"}
    # Only key material leaving the service is audited: a pillar answer or a key.
    deliveries = 1 if r.status_code == 200 and (parts[0] == "pillar" or (
        parts[0] == "certs" and parts[-1] == "key")) else 0
    assert unchanged(store)[0] == before[0]  # a read never makes a version
    assert unchanged(store)[1] - before[1] <= deliveries
