"""Generations as the files backend keeps them on disk, for tests that look at or edit them.

A version is one file `generations/00000N.gen` (`pkisvc.backends.genfile`); stores written
before that hold directories `generations/00000N/`, which `as_directory` makes by hand.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

from pkisvc.backends import genfile


def gen_file(data_dir: Path, version: int) -> Path:
    return data_dir / "generations" / f"{version:06d}{genfile.SUFFIX}"


def stored(data_dir: Path, version: int) -> genfile.Packed:
    """What version's file holds, read from disk."""
    return genfile.decode(gen_file(data_dir, version).read_bytes())


def rewrite(data_dir: Path, version: int, *, to: int | None = None, **members: Any) -> Path:
    """Edit a stored generation in place, as an editor in data_dir would: replace `record`,
    `event`, `link` or `files` (whole), and write it as version `to` (default: itself)."""
    packed = dataclasses.replace(stored(data_dir, version), **members)
    path = gen_file(data_dir, version if to is None else to)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(genfile.encode(packed))
    return path


def unpack(data_dir: Path, version: int, dest: Path) -> Path:
    """Write version's files into dest/00000N/ (for tools that take paths) and return it."""
    out = dest / f"{version:06d}"
    out.mkdir(parents=True)
    for name, data in stored(data_dir, version).files.items():
        (out / name).write_bytes(data)
    return out


def as_directory(data_dir: Path, version: int) -> Path:
    """Turn version's file into the directory an older pkisvc wrote (record.json, event.json,
    chain.json and the files; 0700/0600), as a store from before one-file generations holds."""
    packed = stored(data_dir, version)
    d = data_dir / "generations" / f"{version:06d}"
    tmp = d.with_name(d.name + ".making")
    tmp.mkdir(mode=0o700)
    members = {**packed.files, "record.json": json.dumps(packed.record, indent=1).encode()}
    if packed.link is not None:
        members["chain.json"] = json.dumps(packed.link, separators=(",", ":")).encode()
    if packed.event is not None:
        members["event.json"] = json.dumps(packed.event, separators=(",", ":")).encode()
    for name, data in members.items():
        fd = os.open(tmp / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    gen_file(data_dir, version).unlink()
    os.rename(tmp, d)
    return d


def remove(data_dir: Path, version: int) -> None:
    """Remove a stored version, whichever form it has."""
    d = data_dir / "generations" / f"{version:06d}"
    if d.is_dir():
        shutil.rmtree(d)
    else:
        gen_file(data_dir, version).unlink()
