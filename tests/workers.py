"""Child processes for the concurrency and crash tests: `python -m tests.workers ...`."""
from __future__ import annotations

import sys

from pkisvc.backends.files import FilesBackend
from pkisvc.settings import Settings
from pkisvc.store import CertStore


def main() -> None:
    cmd, data_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    settings = Settings.load(env={}, overrides={"data_dir": data_dir, "key_type": "ecdsa-p256"})
    store = CertStore(FilesBackend(data_dir), settings)
    ops = [lambda: store.rotate_ca(actor=cmd),
           lambda: store.rotate_leaf("server", actor=cmd),
           lambda: store.rotate_leaf("kubecfg", actor=cmd)]
    for i in range(count):
        record = ops[i % len(ops)]()
        # Acknowledge only after the write returned: the crash test checks these survive.
        print(record.version, flush=True)


if __name__ == "__main__":
    main()
