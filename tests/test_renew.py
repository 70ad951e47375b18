"""Renewal before expiry: idempotent, audited, never the CA, and the alert rules that watch it."""
import json
import re

import yaml
from click.testing import CliRunner
from prometheus_client.parser import text_string_to_metric_families

from pkisvc.app import create_app
from pkisvc.backends.files import FilesBackend
from pkisvc.cli import main
from tests.conftest import REPO, make_settings


def config(tmp_path, name, **extra):
    doc = {"data_dir": str(tmp_path / "data"), "key_type": "ecdsa-p256", **extra}
    f = tmp_path / f"{name}.yaml"
    f.write_text(yaml.safe_dump(doc))
    return f


def cli(cfg, *args):
    r = CliRunner().invoke(main, ["--config", str(cfg), *args])
    return r.exit_code, r.stdout, r.stderr


def short_lived(tmp_path):
    """A store whose leaves were issued for one day; settings that renew 2 days ahead."""
    first = config(tmp_path, "first", server={"days": 1}, kubecfg={"days": 1})
    assert cli(first, "init")[0] == 0
    return config(tmp_path, "renewing", renew_before="2d")


def test_renew_once_then_nothing(tmp_path):
    cfg = short_lived(tmp_path)
    before = FilesBackend(tmp_path / "data").read(1).record
    code, out, err = cli(cfg, "renew")
    assert code == 0, err
    assert "renewed: server" in out and "renewed: kubecfg" in out
    assert out.strip().endswith("version 2: renew")
    rec = FilesBackend(tmp_path / "data").read(2).record
    assert rec.operation == "renew" and "server expires" in rec.reason
    assert rec.items["ca"] == before.items["ca"]
    for item in ("server", "kubecfg"):
        assert rec.items[item].fingerprint != before.items[item].fingerprint
    code, out, _ = cli(cfg, "renew")
    assert code == 0 and out.startswith("nothing due")
    assert FilesBackend(tmp_path / "data").latest() == 2


def test_dry_run_writes_nothing(tmp_path):
    cfg = short_lived(tmp_path)
    code, out, _ = cli(cfg, "renew", "--dry-run", "-o", "json")
    assert code == 0
    assert [d["item"] for d in json.loads(out)["due"]] == ["server", "kubecfg"]
    assert FilesBackend(tmp_path / "data").latest() == 1


def test_api_renews_like_the_cli_and_is_audited(tmp_path):
    short_lived(tmp_path)
    settings = make_settings(tmp_path / "data", renew_before="2d")
    app = create_app(settings)
    token = app.extensions["pkisvc"].create_token("cron", ["admin"], actor="t")
    c = app.test_client()
    h = {"Authorization": f"Bearer {token}"}
    r = c.post("/v1/renew", json={"dry_run": True}, headers=h)
    assert r.status_code == 200 and r.get_json()["renewed"] is False
    assert [d["item"] for d in r.get_json()["due"]] == ["server", "kubecfg"]
    r = c.post("/v1/renew", headers=h)
    assert r.status_code == 201 and r.get_json()["operation"] == "renew"
    r = c.post("/v1/renew", headers=h)
    assert r.status_code == 200 and r.get_json() == {
        "version": 2, "due": [], "ca_warning": None, "renewed": False}
    events = app.extensions["pkisvc"].audit()
    assert [(e.action, e.actor, e.items) for e in events if e.action == "renew"] == [
        ("renew", "cron", ("server", "kubecfg"))]
    assert c.post("/v1/renew", json={"dry_run": "yes"}, headers=h).status_code == 400


def test_ca_inside_warning_is_reported_not_rotated(tmp_path):
    cfg = config(tmp_path, "c", ca={"days": 100})
    cli(cfg, "init")
    code, out, err = cli(cfg, "renew")
    assert code == 0
    assert re.search(r"^warning: the CA expires .* staged CA rotation", err, re.M)
    assert out.startswith("nothing due")
    assert FilesBackend(tmp_path / "data").latest() == 1


def test_settings_that_would_renew_forever_are_refused(tmp_path):
    cfg = config(tmp_path, "c", renew_before="400d")
    cli(cfg, "init")
    r = CliRunner().invoke(main, ["--config", str(cfg), "renew"])
    assert r.exit_code == 1 and "'server.days'" in r.stderr


def test_renewal_timestamp_metric(tmp_path):
    settings = make_settings(tmp_path / "data", renew_before="10d")
    app = create_app(settings)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    got = {(s.name, s.labels.get("item")): s.value
           for f in text_string_to_metric_families(text) for s in f.samples}
    for item, ahead in (("server", 10 * 86400), ("kubecfg", 10 * 86400), ("ca", 180 * 86400)):
        assert got[("pkisvc_certificate_renewal_timestamp_seconds", item)] == got[
            ("pkisvc_certificate_expiration_timestamp_seconds", item)] - ahead


def test_alert_rules_name_only_metrics_pkisvc_exports(tmp_path):
    settings = make_settings(tmp_path / "data")
    app = create_app(settings)
    app.extensions["pkisvc"].start_rotation(actor="t")  # so the rotation phase is exported too
    app.extensions["pkisvc"].check_chain()  # and the chain's (exported once checked)
    text = app.test_client().get("/metrics").get_data(as_text=True)
    exported = {f.name for f in text_string_to_metric_families(text)}
    exported |= {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    rules = yaml.safe_load((REPO / "docs" / "prometheus" / "pkisvc-alerts.yaml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"]]
    assert {a["alert"] for a in alerts} >= {"PkisvcLeafRenewalOverdue", "PkisvcCAWithinWarning",
                                            "PkisvcBackendDown"}
    for a in alerts:
        names = set(re.findall(r"\b(pkisvc_[a-z_]+)", a["expr"]))
        assert names <= exported, (a["alert"], names - exported)
        assert names or 'job="pkisvc"' in a["expr"]
        assert a["annotations"]["summary"]


def test_alert_rules_pass_promtool():
    import shutil
    import subprocess
    promtool = shutil.which("promtool")
    assert promtool, "promtool is installed by .ci/system-deps.sh (Debian's prometheus)"
    r = subprocess.run([promtool, "check", "rules",
                        str(REPO / "docs" / "prometheus" / "pkisvc-alerts.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 10 rules found" in r.stdout


def test_the_salt_schedule_example_runs_the_renewing_orchestration():
    doc = yaml.safe_load((REPO / "docs" / "salt" / "pkisvc-renew.conf").read_text())
    job = doc["schedule"]["pkisvc-renew"]
    assert job["function"] == "state.orchestrate"
    sls = job["args"][0]
    assert (REPO / "formula" / (sls.replace(".", "/") + ".sls")).is_file()
    assert job["kwargs"]["pillar"]["kubernetes"]["cert"]["orch"]["rotate"] == "renew"
    defaults = yaml.safe_load((REPO / "formula/kubernetes/cert/orch/defaults.yaml").read_text())
    assert set(job["kwargs"]["pillar"]["kubernetes"]["cert"]["orch"]) <= set(defaults["orch"])
