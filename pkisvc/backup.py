"""The backup tarball: every generation (CA keys included), the audit trail and the tokens."""
from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pkisvc.errors import InvalidRequest

if TYPE_CHECKING:
    from pkisvc.store import CertStore

ROOT = "pkisvc-backup"


def members(store: CertStore) -> Iterator[tuple[str, bytes]]:
    """Yield (name, bytes) of every file the tarball holds, oldest generation first."""
    for rec in reversed(store.versions()):
        gen = store.read(rec.version)
        base = f"{ROOT}/generations/{rec.version:06d}"
        yield f"{base}/record.json", json.dumps(rec.to_dict(), indent=1).encode()
        for name, data in sorted(gen.files.items()):
            yield f"{base}/{name}", data
    events = store.audit(limit=10**9)
    yield f"{ROOT}/audit.jsonl", "".join(
        json.dumps(e.to_dict()) + "\n" for e in reversed(events)).encode()
    yield f"{ROOT}/tokens.json", json.dumps(
        [t.to_dict() for t in store.tokens()], indent=1).encode()


def write(store: CertStore, dest: Path) -> int:
    """Write the tarball to dest (0600, whole or not at all); return how many versions it holds.

    Raises: InvalidRequest when dest cannot be written.
    """
    tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    count = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
            for name, data in members(store):
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))
                if name.endswith("/record.json"):
                    count += 1
        os.replace(tmp, dest)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InvalidRequest(f"{dest}: {e.strerror}") from None
    return count
