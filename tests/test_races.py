"""Races: gunicorn with 4 workers and the CLI changing one store at once (issue 9, item 1)."""
import collections
import random
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.conftest import clean_env, run_cli, stop
from tests.storm import (
    CHANGES,
    Ledger,
    assert_no_secrets,
    change,
    change_events,
    check_history,
    read,
    serve,
)

HTTP_OPS = 186
CLI_OPS = 14
CLI_COMMANDS = [("rotate", "server"), ("rotate", "kubecfg"), ("rotate", "ca"),
                ("rollback", "ROLLBACK"), ("rotate", "ca", "--staged"), ("rotation", "continue"),
                ("rotation", "finish")]
CLI_OPERATION = {"rotate server": "rotate-server", "rotate kubecfg": "rotate-kubecfg",
                 "rotate ca": "rotate-ca", "rollback": "rollback",
                 "rotate ca --staged": "ca-stage-trust", "rotation continue": "ca-stage-switch",
                 "rotation finish": "ca-stage-finish"}


def run_cli_storm(data, extra_env, ledger, rng, outputs):
    env = clean_env(PKISVC_DATA_DIR=str(data), PKISVC_KEY_TYPE="ecdsa-p256", **extra_env)
    for i in range(CLI_OPS):
        cmd = list(CLI_COMMANDS[i % len(CLI_COMMANDS)])
        reason = f"cli-{i}"
        if cmd[-1] == "ROLLBACK":
            cmd[-1] = str(rng.randint(1, max(ledger.acked, default=1)))
            op = "rollback"
        else:
            op = CLI_OPERATION[" ".join(cmd)]
        r = run_cli(*cmd, "--reason", reason, env=env)
        outputs.append(r.stdout + r.stderr)
        # Exit 0 with the version, or 1 with one line (a staged rotation is open, ...).
        assert r.returncode in (0, 1), r.stderr
        assert "Traceback" not in r.stderr
        if r.returncode == 0:
            m = re.fullmatch(r"version (\d+): (\S+)\n", r.stdout)
            assert m and m.group(2) == op, r.stdout
            ledger.ack(int(m.group(1)), op, reason)
            with ledger.lock:
                ledger.statuses[201] += 1
        else:
            assert re.fullmatch(r"error: [^\n]+\n", r.stderr), r.stderr
            with ledger.lock:
                ledger.statuses[409] += 1


@pytest.mark.slow
def test_api_and_cli_at_once_leave_a_gapless_audited_history(tmp_path, service_store):
    extra_env, _, make_backend = service_store
    data = tmp_path / "data"
    p, url = serve(data, 4, **extra_env)
    started = time.monotonic()
    token = (data / "admin.token").read_text().strip()
    h = {"Authorization": f"Bearer {token}"}
    ledger = Ledger()
    rng = random.Random(9)
    # Staged steps are out of order most of the time (409); ordinary rotations dominate.
    weights = {"rotate-ca": 4, "rotate-server": 5, "rotate-kubecfg": 5, "rollback": 3,
               "stage": 1, "continue": 2, "finish": 2, "abort": 1, "cert": 2, "versions": 2,
               "pillar-master": 3, "pillar-node": 3}
    plan = rng.choices(list(weights), weights=list(weights.values()), k=HTTP_OPS)

    def one(i_name):
        i, name = i_name
        if name in CHANGES:
            return change(url, h, name, f"http-{i}", ledger, random.Random(i))
        return read(url, h, name, ledger, f"k8s-node-{i % 7}")

    cli_out: list[str] = []
    cli_failed: list[BaseException] = []

    def cli_storm() -> None:  # a failure in the thread fails the test, not only a warning
        try:
            run_cli_storm(data, extra_env, ledger, rng, cli_out)
        except BaseException as e:
            cli_failed.append(e)
    try:
        cli = threading.Thread(target=cli_storm)
        cli.start()
        with ThreadPoolExecutor(max_workers=8) as pool:
            statuses = list(pool.map(one, enumerate(plan)))
        cli.join(timeout=300)
        assert not cli.is_alive()
    finally:
        stop(p)
    if cli_failed:
        raise cli_failed[0]
    elapsed = time.monotonic() - started
    assert set(statuses) <= {200, 201, 409}, (
        ledger.statuses, [t[:300] for t in ledger.texts if t.startswith("{\"error")][:6])
    assert not ledger.duplicate_acks
    # Refusals are about a staged rotation's order, never a writer that gave up.
    assert not any("gave up" in t for t in ledger.texts + cli_out)
    backend = make_backend()
    records = check_history(backend, ledger.acked)
    # Every change made since version 1 was acknowledged to someone, and audited once.
    assert set(ledger.acked) == set(range(2, len(records) + 1))
    events = change_events(backend)
    assert events == {v: 1 for v in range(1, len(records) + 1)}, events
    pillars = [e for e in backend.audit(limit=10**6) if e.action == "pillar"]
    # A pillar event per change of what a minion holds (issue 17): every delivery the clients
    # saw is there, and no more events than deliveries.
    assert {(e.minion, e.version, e.role) for e in pillars} == ledger.delivered
    assert len(pillars) <= ledger.pillar_200
    assert_no_secrets(ledger.texts + cli_out, token)
    kinds = collections.Counter(op for op, _ in ledger.acked.values())
    print(f"\nraces ({backend.name}): {HTTP_OPS + CLI_OPS} operations, {len(records) - 1} "
          f"changes {dict(kinds)}, statuses {dict(ledger.statuses)}, {elapsed:.1f}s")
