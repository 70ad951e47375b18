"""Crashes: SIGKILL gunicorn (master and workers) and a CLI writer mid-storm (issue 9, item 2)."""
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests

from pkisvc.store import CertStore
from tests.conftest import REPO, clean_env, make_settings, wait_for
from tests.stored import stored
from tests.storm import Ledger, change, change_events, check_history, serve

ROUNDS = 20
VAULT_ROUNDS = ROUNDS  # every version's event is committed with it: the same kills on both
KINDS = ("rotate-ca", "rotate-server", "rotate-kubecfg", "rollback")


def children(pid):
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def storm(url, headers, ledger, rnd, stop_event, seen):
    rng = random.Random(rnd)
    i = 0
    while not stop_event.is_set():
        i += 1
        try:
            change(url, headers, rng.choice(KINDS), f"r{rnd}-{threading.get_ident()}-{i}",
                   ledger, rng, timeout=10)
        except requests.RequestException:
            seen["lost"] += 1  # the kill cut this request off: no answer, no acknowledgement
            return


def cli_writer(data, count, overrides):
    """`python -m tests.workers`: rotations through the store directly, acks on stdout."""
    env = clean_env()
    return subprocess.Popen([sys.executable, "-m", "tests.workers", "cli", str(data),
                             str(count), json.dumps(overrides)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)


@pytest.mark.slow
def test_sigkill_mid_storm_never_loses_or_tears_a_generation(tmp_path, service_store):
    extra_env, overrides, make_backend = service_store
    files = not extra_env
    rounds = ROUNDS if files else VAULT_ROUNDS
    data = tmp_path / "data"
    ledger = Ledger()
    seen = {"lost": 0, "debris": 0, "ahead": 0}
    rng = random.Random(20)
    started = time.monotonic()
    for rnd in range(rounds):
        p, url = serve(data, 2, **extra_env)
        h = {"Authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}
        cli = cli_writer(data, 1000, overrides)
        stop_event = threading.Event()
        threads = [threading.Thread(target=storm, args=(url, h, ledger, rnd * 10 + t,
                                                        stop_event, seen))
                   for t in range(6)]
        before = len(ledger.acked)
        for t in threads:
            t.start()
        wait_for(lambda b=before: len(ledger.acked) > b, 60, "a first acknowledged change")
        time.sleep(rng.uniform(0.05, 0.6))  # the fault lands at a random point of the storm
        workers = children(p.pid)
        if rnd % 3 == 0:  # workers first, then the master; otherwise all at once
            for w in workers:
                os.kill(w, signal.SIGKILL)
            os.kill(p.pid, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):  # workers respawned meanwhile
                os.killpg(p.pid, signal.SIGKILL)
        else:
            os.killpg(p.pid, signal.SIGKILL)
        os.kill(cli.pid, signal.SIGKILL)
        stop_event.set()
        p.wait(timeout=30)
        out, _ = cli.communicate(timeout=30)
        for line in out.split():  # what the CLI printed had been written and audited
            ledger.ack(int(line), "", "")
        for t in threads:
            t.join(timeout=60)
        for w in workers:  # a worker that outlived its master dies of its own watchdog
            wait_for(lambda w=w: not Path(f"/proc/{w}").exists()
                     or "Z" in Path(f"/proc/{w}/stat").read_text().rsplit(")", 1)[1][:3],
                     60, f"worker {w} to go")
        backend = make_backend()
        if files:
            debris = list((data / "tmp").iterdir()) if (data / "tmp").exists() else []
            seen["debris"] += len(debris)
            # The store opens and recovers; no debris is read as a generation, nothing torn.
            names = sorted(d.name for d in (data / "generations").iterdir())
            current = int((data / "current").read_text())
            seen["ahead"] += sum(1 for n in names if int(n.removesuffix(".gen")) > current)
        latest = backend.latest()
        if files:
            assert [f"{v:06d}.gen" for v in range(1, latest + 1)] == names  # one file each
            assert all(stored(data, v).record["version"] == v for v in range(1, latest + 1))
            assert not list((data / "tmp").iterdir())  # recovery removed the staging debris
        acked_full = {v: a for v, a in ledger.acked.items() if a[0]}
        check_history(backend, acked_full)
        assert set(ledger.acked) <= set(range(1, latest + 1))
        events = change_events(backend)
        # Every version present has exactly one change event, acknowledged or not (issue 17).
        assert [v for v in range(1, latest + 1) if events[v] != 1] == [], events
        assert set(events) == set(range(1, latest + 1))
        # Kills leave the audit chain whole: nothing committed half, nothing linked twice.
        # The witness the killed processes kept (written after the store) is at most behind.
        report = CertStore(backend, make_settings(data, **overrides)).verify()
        assert report.ok, report.breaks
        assert not any("witness" in n for n in report.notes), report.notes
    print(f"\ncrashes ({backend.name}): {rounds} kills, {len(ledger.acked)} acknowledged of "
          f"{latest} versions, "
          f"{seen['lost']} requests cut off, {seen['debris']} staging leftovers, "
          f"{seen['ahead']} generations ahead of current, {time.monotonic() - started:.1f}s")
