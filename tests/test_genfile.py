"""The files backend's generation file (`pkisvc.backends.genfile`): what goes in comes out,
byte for byte, and nothing but a whole file is read."""
import io
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pkisvc.backends.genfile import (
    FORMAT,
    Packed,
    Unreadable,
    decode,
    encode,
    read_directory,
    read_index,
)

RECORD = {"version": 2, "parent": 1, "reason": "\ud800 line1\nFAKE\x1b \u202e", "items": {}}
EVENT = {"time": "2026-12-07T07:00:00Z", "actor": "ops", "action": "rotate-ca", "version": 2}
LINK = {"prev": "a" * 64, "files": {}, "unchained": 0, "mac": "b" * 64}
FILES = {"ca.crt": b"-----BEGIN CERTIFICATE-----\n...\n", "empty": b"",
         "sa.key": bytes(range(256)) + b"\n\r\x00"}


def test_what_is_packed_comes_back_byte_for_byte():
    packed = Packed(RECORD, EVENT, LINK, FILES)
    assert decode(encode(packed)) == packed
    assert list(decode(encode(packed)).files) == list(FILES)  # in the order written
    assert decode(encode(Packed(RECORD, None, None, {}))) == Packed(RECORD, None, None, {})


def test_the_index_is_one_ascii_json_line_then_the_raw_bytes():
    data = encode(Packed(RECORD, EVENT, LINK, FILES))
    head, _, rest = data.partition(b"\n")
    index = json.loads(head)
    assert head.isascii()  # a newline in any text is escaped: the first newline ends it
    assert index["format"] == FORMAT and index["record"] == RECORD
    assert index["files"] == [["ca.crt", len(FILES["ca.crt"])], ["empty", 0], ["sa.key", 259]]
    assert rest == b"".join(FILES.values())


names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,20}", fullmatch=True).filter(
    lambda n: ".." not in n)


@given(st.dictionaries(names, st.binary(max_size=300), max_size=8))
def test_any_files_round_trip(files):
    assert decode(encode(Packed(RECORD, EVENT, LINK, files))).files == files


@pytest.mark.parametrize("cut", [1, 10, 100, 259])
def test_a_torn_file_is_unreadable_never_short(cut):
    data = encode(Packed(RECORD, EVENT, LINK, FILES))
    with pytest.raises(Unreadable, match=f"torn: its index lists 291 bytes of files, "
                                         f"{291 - cut} are there"):
        decode(data[:-cut])


@pytest.mark.parametrize("data, why", [
    (b"", "not a pkisvc-generation/1 file"),
    (b'{"format": "pkisvc-generation/1", "record": {}', "not a pkisvc-generation/1 file"),
    (b'{"format": "pkisvc-generation/2", "record": {}, "files": []}\n', "not a pkisvc-gen"),
    (b'[1, 2]\n', "not a pkisvc-generation/1 file"),
    (b'{"format": "pkisvc-generation/1", "record": null, "files": []}\n', "index is damaged"),
    (b'{"format": "pkisvc-generation/1", "record": {}, "files": [["../x", 0]]}\n', "damaged"),
    (b'{"format": "pkisvc-generation/1", "record": {}, "files": [["a", 0], ["a", 0]]}\n',
     "index is damaged"),
    (b'{"format": "pkisvc-generation/1", "record": {}, "files": [["a", -1]]}\nx', "damaged"),
    (b'{"format": "pkisvc-generation/1", "record": {}, "files": [["a", 1.0]]}\nx', "damaged"),
    (b'{"format": "pkisvc-generation/1", "record": {}, "files": [["a", 1]]}\nxy',
     "1 bytes follow the files its index lists"),
])
def test_anything_else_is_unreadable(data, why):
    with pytest.raises(Unreadable, match=why):
        decode(data)


@pytest.mark.parametrize("reason", ["short", "x" * 100_000])  # an index past the first read
def test_the_index_alone_is_read_from_the_start_of_the_file(reason):
    packed = Packed({**RECORD, "reason": reason}, EVENT, LINK, FILES)
    data = encode(packed)
    head = read_index(io.BytesIO(data))
    assert b"\n" in head and data.startswith(head)
    assert decode(head, files=False) == Packed(packed.record, EVENT, LINK, {})


def test_an_older_stores_directory_reads_as_the_same_parts(tmp_path):
    d = tmp_path / "000002"
    d.mkdir()
    for name, data in {**FILES, "record.json": json.dumps(RECORD, indent=1).encode(),
                       "event.json": json.dumps(EVENT).encode(),
                       "chain.json": json.dumps(LINK).encode(), "not..a-file": b"x"}.items():
        (d / name).write_bytes(data)
    assert read_directory(d) == Packed(RECORD, EVENT, LINK, FILES)
    assert read_directory(d, files=False) == Packed(RECORD, EVENT, LINK, {})
    (d / "event.json").write_text('{"actor": "ops"')  # an editor's slip: its MAC then fails
    (d / "chain.json").unlink()  # a version from before the chain
    assert read_directory(d) == Packed(RECORD, {"unreadable": "event.json"}, None, FILES)
    (d / "record.json").unlink()
    with pytest.raises(FileNotFoundError):
        read_directory(d)
