"""Vault leader loss: a 3-node OpenBao Raft cluster loses its leader mid-storm (issue 9, item 3)."""
import collections
import random
import threading
import time

import pytest
import requests

from pkisvc.backends.vault import VaultBackend
from pkisvc.errors import BackendUnavailable
from tests.conftest import stop, wait_for
from tests.openbao import RaftCluster
from tests.storm import Ledger, change, change_events, check_history, serve

pytestmark = pytest.mark.vault


@pytest.fixture
def raft(tmp_path):
    cluster = RaftCluster(tmp_path / "raft")
    yield cluster
    cluster.stop()


@pytest.mark.slow
def test_rotations_survive_the_loss_of_the_raft_leader(raft, tmp_path):
    leader = raft.leader()
    # The leader first: pkisvc is talking to the node that dies.
    order = [raft.addrs[leader], *(a for i, a in enumerate(raft.addrs) if i != leader)]
    data = tmp_path / "data"
    token = raft.service_token("leader-loss")
    p, url = serve(data, 2, PKISVC_BACKEND="vault", PKISVC_CLUSTER="leader-loss",
                   PKISVC_VAULT__ADDR=",".join(order), PKISVC_VAULT__TOKEN=token,
                   PKISVC_VAULT__TIMEOUT="3")
    h = {"Authorization": f"Bearer {(data / 'admin.token').read_text().strip()}"}
    ledger = Ledger()
    answers: list[tuple[float, int]] = []
    done = threading.Event()

    def stream(n):
        rng = random.Random(n)
        i = 0
        while not done.is_set():
            i += 1
            kind = rng.choice(("rotate-server", "rotate-kubecfg", "rotate-server", "rotate-ca"))
            try:
                status = change(url, h, kind, f"s{n}-{i}", ledger, rng, timeout=30)
            except requests.RequestException:
                status = 0  # no answer at all
            answers.append((time.monotonic(), status))

    threads = [threading.Thread(target=stream, args=(n,)) for n in range(4)]
    try:
        for t in threads:
            t.start()
        wait_for(lambda: len(ledger.acked) >= 10, 120, "ten rotations before the fault")
        killed_at = time.monotonic()
        raft.stop_node(leader)  # SIGKILL by PID: no step-down, the others must elect
        acked_before = len(ledger.acked)
        wait_for(lambda: sum(1 for t, s in answers if t > killed_at and s == 201) >= 15, 180,
                 "fifteen rotations after the fault")
    finally:
        done.set()
        for t in threads:
            t.join(timeout=60)
        stop(p)
    statuses = collections.Counter(s for _, s in answers)
    assert set(statuses) <= {201, 503}, statuses
    failures = [t for t, s in answers if s != 201]
    window = (max(failures) - killed_at) if failures else 0.0
    assert window < 30, f"503s for {window:.1f}s after the leader died"
    last = max(t for t, _ in answers)
    assert all(s == 201 for t, s in answers if t > killed_at + window), "no recovery"
    assert last > killed_at + window
    survivors = ",".join(a for i, a in enumerate(raft.addrs) if i != leader)
    backend = VaultBackend(survivors, cluster="leader-loss", token=token)
    records = check_history(backend, ledger.acked)
    reasons = collections.Counter(r.reason for r in records)
    assert max(reasons.values()) == 1, "a request made two versions"
    events = change_events(backend)
    assert {v: events[v] for v in ledger.acked if events[v] != 1} == {}
    assert max(events.values()) == 1
    # The old leader comes back as a follower, catches up, and serves the same history.
    raft.restart_node(leader)
    rejoined = VaultBackend(raft.addrs[leader], cluster="leader-loss", token=token)
    wait_for(lambda: rejoined.latest() == len(records), 60, "the old leader to catch up")
    assert [r.version for r in rejoined.versions()] == [r.version for r in records]
    unacked = len(records) - 1 - len(ledger.acked)
    print(f"\nleader loss: {len(answers)} rotations ({acked_before} acked before the kill), "
          f"statuses {dict(statuses)}, 503 window {window:.1f}s, {len(records)} versions, "
          f"{unacked} written but unacknowledged, "
          f"{sum(1 for v in range(1, len(records) + 1) if events[v] == 0)} unaudited")


def test_a_node_that_refuses_connections_is_skipped(openbao):
    from pkisvc.settings import Settings
    from pkisvc.store import CertStore
    from tests.conftest import free_port

    dead = f"http://127.0.0.1:{free_port()}"
    over = openbao.settings_overrides(**{"vault.addr": f"{dead}, {openbao.addr}"})
    settings = Settings.load(env={}, overrides={**over, "key_type": "ecdsa-p256"})
    backend = VaultBackend.from_settings(settings)
    assert CertStore(backend, settings).init(actor="test").version == 1
    assert backend.addr == openbao.addr  # and it stays there
    alone = VaultBackend(dead, cluster="nowhere", token=over["vault.token"])
    with pytest.raises(BackendUnavailable, match="cannot connect"):
        alone.latest()
