"""Child processes for the concurrency and crash tests: `python -m tests.workers ...`."""
from __future__ import annotations

import json
import sys

from pkisvc.backends import load_backend
from pkisvc.settings import Settings
from pkisvc.store import CertStore

PILLAR_MINIONS = 20


def main() -> None:
    cmd, data_dir, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    extra = json.loads(sys.argv[4]) if len(sys.argv) > 4 else {}  # e.g. a vault backend
    settings = Settings.load(env={}, overrides={"data_dir": data_dir, "key_type": "ecdsa-p256",
                                                **extra})
    store = CertStore(load_backend(settings), settings)
    if cmd == "pillar":  # `count` is the version to start at: every minion moves, round by round
        for version in range(count, count + 10**6):
            for m in range(PILLAR_MINIONS):
                store.record_pillar(actor="salt", minion=f"k8s-node-{m}", role="node",
                                    version=version, items=("ca.crt",))
            print(version, flush=True)
        return
    ops = [lambda: store.rotate_ca(actor=cmd),
           lambda: store.rotate_leaf("server", actor=cmd),
           lambda: store.rotate_leaf("kubecfg", actor=cmd)]
    for i in range(count):
        record = ops[i % len(ops)]()
        # Acknowledge only after the write returned: the crash test checks these survive.
        print(record.version, flush=True)


if __name__ == "__main__":
    main()
