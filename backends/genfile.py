"""A generation as the files backend stores it: one file (`<version>.gen`, what it writes),
or the directory an older pkisvc wrote (read only).

    {"format": "pkisvc-generation/1", "record": {...}, "event": {...} | null,
     "chain": {...} | null, "files": [["ca.crt", 1184], ["ca.key", 227], ...]}\\n
    <the files' bytes, one after another, in the order "files" lists them>

The first line is one JSON object (ASCII only, so the first newline ends it): the record, the
change's audit event and the version's chain link as JSON, then each file's name and length.
The files follow as raw bytes, nothing between them.  A file whose lengths do not add up to
its size, or whose index is not such an object, is `Unreadable` (never partly read).

    000042/{record.json, event.json, chain.json, ca.crt, ...}

An older store's generation: the same parts, one file each (`read_directory`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping

from pkisvc.model import valid_file_name

FORMAT = "pkisvc-generation/1"
SUFFIX = ".gen"
RECORD = "record.json"  # a directory's parts that are not the generation's files
EVENT = "event.json"
CHAIN = "chain.json"
HEAD = 16384  # bytes to read first when only the index is wanted (it is 2-4 KB)


class Unreadable(ValueError):
    """Not a whole generation file (torn, garbled, or of another format)."""


@dataclass(frozen=True)
class Packed:
    """What one generation file holds: the record, event and chain link as JSON values, and
    the files (name -> bytes)."""

    record: Mapping[str, Any]
    event: Mapping[str, Any] | None
    link: Mapping[str, Any] | None
    files: Mapping[str, bytes]


def encode(packed: Packed) -> bytes:
    """The bytes of a generation file holding packed."""
    index = {"format": FORMAT, "record": packed.record, "event": packed.event,
             "chain": packed.link, "files": [[n, len(d)] for n, d in packed.files.items()]}
    head = json.dumps(index, separators=(",", ":")).encode()
    return b"".join([head, b"\n", *packed.files.values()])


def read_index(f: BinaryIO) -> bytes:
    """The start of an open generation file, up to and including its index line."""
    data = f.read(HEAD)
    while b"\n" not in data:
        more = f.read(4 * HEAD)
        if not more:
            break
        data += more
    return data


def decode(data: bytes, *, files: bool = True) -> Packed:
    """Read a generation file's bytes; with files=False only its index (data may then be any
    start of the file that holds the first line; `files` comes back empty).

    Raises: Unreadable.
    """
    end = data.find(b"\n")
    try:
        index = json.loads(data[:end]) if end >= 0 else None
    except ValueError:
        index = None
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise Unreadable(f"not a {FORMAT} file")
    record, event, link, listed = (index.get(k) for k in ("record", "event", "chain", "files"))
    if not isinstance(record, dict) or not isinstance(event, dict | None) \
            or not isinstance(link, dict | None) or not isinstance(listed, list):
        raise Unreadable("its index is damaged")
    if not files:
        return Packed(record, event, link, {})
    held: dict[str, bytes] = {}
    at = end + 1
    for entry in listed:
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)
                and valid_file_name(entry[0]) and entry[0] not in held
                and type(entry[1]) is int and entry[1] >= 0):
            raise Unreadable("its index is damaged")
        name, size = entry
        held[name] = data[at:at + size]
        at += size
    if at > len(data):
        raise Unreadable(f"torn: its index lists {at - end - 1} bytes of files, "
                         f"{len(data) - end - 1} are there")
    if at < len(data):
        raise Unreadable(f"{len(data) - at} bytes follow the files its index lists")
    return Packed(record, event, link, held)


def read_directory(d: Path, *, files: bool = True) -> Packed:
    """Read the generation an older pkisvc wrote as directory d (files=False: only record,
    event and link).  A part that is not a JSON object becomes `{"unreadable": name}`, so the
    version's MAC fails and `pkisvc verify` names it.

    Raises: FileNotFoundError (no directory, or no record.json in it).
    """
    names = [e.name for e in os.scandir(d)] if files else []
    meta: dict[str, Any] = {}
    for name in (RECORD, EVENT, CHAIN):
        try:
            raw = (d / name).read_bytes()
        except FileNotFoundError:
            if name == RECORD:
                raise  # no record, no version
            continue
        try:
            meta[name] = json.loads(raw)
        except ValueError:
            meta[name] = None
        if not isinstance(meta[name], dict):
            meta[name] = {"unreadable": name}
    held = {n: (d / n).read_bytes() for n in names
            if n not in (RECORD, EVENT, CHAIN) and valid_file_name(n)}
    return Packed(meta[RECORD], meta.get(EVENT), meta.get(CHAIN), held)
