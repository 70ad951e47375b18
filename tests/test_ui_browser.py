"""The operator pages in a real browser: Debian's headless Chromium, driven by selenium.

A real `pkisvc serve` on a free loopback port; deliveries and rotations go through the API as
the Salt master and an operator make them; the test reads what a person sees.  Screenshots
land in the test's temporary directory (printed at the end).
"""
import os
import shutil
import signal

import pytest
import requests
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.select import Select
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import run_cli, serve, stop

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
GREEN = "rgb(46, 125, 50)"


def need_chromium() -> None:
    """Fail (never skip) without the browser: `make test` installs it."""
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
    if missing:
        pytest.fail(f"no {' or '.join(missing)}: run `bash .ci/system-deps.sh` as root "
                    "(Debian's chromium and chromium-driver)")


@pytest.fixture
def service(tmp_path):
    """`pkisvc serve` on a free loopback port; yields (base url, admin token, a token with
    read and audit made by `pkisvc token create`)."""
    data = tmp_path / "pkisvc-data"
    p, url = serve(data, workers=1)
    made = run_cli("token", "create", "oncall", "--scope", "read", "--scope", "audit",
                   env={"PKISVC_DATA_DIR": str(data)})
    assert made.returncode == 0, made.stderr
    yield url, (data / "admin.token").read_text().strip(), made.stdout.strip()
    stop(p)


@pytest.fixture
def browser(tmp_path):
    """Headless Chromium through chromedriver; both stopped by PID afterwards."""
    need_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--disable-quic", "--no-first-run", "--disable-extensions",
                "--disable-default-apps", "--force-device-scale-factor=1",
                "--window-size=1280,900", f"--user-data-dir={tmp_path / 'chromium'}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=CHROMEDRIVER, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=opts)
    driver.set_page_load_timeout(60)
    pid = service.process.pid
    try:
        yield driver
    finally:
        try:
            driver.quit()  # closes Chromium, then stops chromedriver
        finally:
            if service.process.poll() is None:
                os.kill(pid, signal.SIGKILL)
                service.process.wait(timeout=30)


# [lines of text in the label of the field with id arguments[0], whether the field is below them]
LABEL_LINES = """
const field = document.getElementById(arguments[0]);
const label = field.closest('label');
const walker = document.createTreeWalker(label, NodeFilter.SHOW_TEXT);
const range = document.createRange();
const tops = [];
let bottom = 0;
for (let n = walker.nextNode(); n; n = walker.nextNode()) {
  if (!n.textContent.trim()) continue;
  range.selectNodeContents(n);
  for (const r of range.getClientRects()) {
    if (r.width > 0) { tops.push(r.top); bottom = Math.max(bottom, r.bottom); }
  }
}
tops.sort((a, b) => a - b);
const half = parseFloat(getComputedStyle(label).fontSize) / 2;
let lines = tops.length ? 1 : 0;
for (let i = 1; i < tops.length; i++) if (tops[i] - tops[i - 1] > half) lines++;
return [lines, field.getBoundingClientRect().top >= bottom - 1];
"""


def wait(driver):
    return WebDriverWait(driver, 30)


class Visit:
    """Open pages, keep screenshots, and check every page a person is shown."""

    def __init__(self, driver, url, shots, secrets):
        self.driver, self.url, self.shots, self.secrets = driver, url, shots, secrets

    def open(self, path):
        self.driver.get(self.url + path)
        self.check()

    def check(self):
        html = self.driver.page_source
        assert "PRIVATE KEY" not in html
        assert not any(s in html for s in self.secrets)
        assert "Traceback" not in html

    def shot(self, name):
        path = self.shots / f"{name}.png"
        self.driver.save_screenshot(str(path))
        return path

    def text(self, css):
        return self.driver.find_element(By.CSS_SELECTOR, css).text

    def minion_rows(self):
        rows = self.driver.find_elements(By.CSS_SELECTOR, "#minions tr[data-minion]")
        return {r.get_attribute("data-minion"): "behind" in (r.get_attribute("class") or "")
                for r in rows}


def test_an_operator_sees_versions_expiry_and_minions_behind(service, browser, tmp_path):
    url, token, reader = service
    shots = tmp_path / "screenshots"
    shots.mkdir()
    v = Visit(browser, url, shots, [token, reader])
    api = requests.Session()
    api.headers["Authorization"] = f"Bearer {token}"

    def pillar(minion, role):
        r = api.get(f"{url}/v1/pillar/{minion}?role={role}", timeout=30)
        assert r.status_code == 200, r.text

    for minion, role in (("k8s-master-1", "master"), ("k8s-node-1", "node"),
                         ("k8s-node-2", "node")):
        pillar(minion, role)

    # Without a token, the page sends us to the login form; a wrong token is an error.
    v.open("/ui/minions")
    assert "/ui/login" in browser.current_url
    # The token field's label reads as one sentence: its words and <code>s share one line,
    # above the field (a flex column once put every <code> on a line of its own).
    lines, below = browser.execute_script(LABEL_LINES, "token")
    v.shot("login")
    assert lines == 1, f"the token label spans {lines} lines (see {shots / 'login.png'})"
    assert below
    browser.find_element(By.ID, "token").send_keys("pks_not-a-token")
    browser.find_element(By.ID, "login").click()
    assert wait(browser).until(EC.visibility_of_element_located((By.ID, "error"))).text == \
        "unknown token"
    v.check()
    v.shot("login-error")
    # The only complaint so far is the 401 itself (reading the log empties it).
    assert [e for e in browser.get_log("browser") if "401" not in e["message"]] == []

    # The first-start admin token holds `secrets`: the form refuses it and says why.
    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    browser.find_element(By.ID, "login").click()
    wait(browser).until(EC.text_to_be_present_in_element((By.ID, "error"), "secrets"))
    assert v.text("#error").startswith("token 'admin' holds the 'secrets' scope")
    assert browser.get_cookie("pkisvc_ui") is None
    v.check()
    v.shot("login-secrets-refused")
    browser.get_log("browser")  # its 403, as above

    field = browser.find_element(By.ID, "token")
    field.clear()
    field.send_keys(reader)
    browser.find_element(By.ID, "login").click()
    wait(browser).until(EC.presence_of_element_located((By.ID, "minions")))
    # The browser holds a session id, never the token (HttpOnly: no script reads it).
    session = browser.get_cookie("pkisvc_ui")
    assert session["value"].startswith("pkui_") and session["value"] != reader
    assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/ui/"
    assert browser.current_url.endswith("/ui/minions")  # back where we were going
    v.check()
    assert v.minion_rows() == {"k8s-master-1": False, "k8s-node-1": False,
                               "k8s-node-2": False}
    assert "0 behind" in v.text("#summary")
    v.shot("minions-current")

    # Overview: the current version and three green bars (the style sheet took: CSP hash).
    v.open("/ui/")
    assert v.text("#version") == "version 1"
    bars = browser.find_elements(By.CSS_SELECTOR, "svg.bar")
    assert [b.get_attribute("data-item") for b in bars] == ["ca", "server", "kubecfg"]
    for bar in bars:
        assert bar.is_displayed() and bar.size["width"] > 300
        fill = bar.find_element(By.CSS_SELECTOR, "rect.fill")
        assert fill.value_of_css_property("fill") == GREEN
    assert "days left" in v.text("span.left[data-item=server]")

    # A rotation the minions have not fetched: every one is flagged.
    r = api.post(f"{url}/v1/ca/rotate", json={"reason": "browser test"}, timeout=60)
    assert r.status_code == 201, r.text
    v.open("/ui/minions")
    assert v.minion_rows() == {"k8s-master-1": True, "k8s-node-1": True, "k8s-node-2": True}
    assert "3 behind" in v.text("#summary")
    assert v.text("#minions tr[data-minion=k8s-node-1] .badge") == "behind by 1"
    assert "files changed" in v.text("#minions tr[data-minion=k8s-node-1]")  # a new CA
    v.shot("minions-behind")

    # One minion refreshes its pillar: its flag goes away, the others stay.
    pillar("k8s-node-1", "node")
    browser.refresh()
    v.check()
    assert v.minion_rows() == {"k8s-master-1": True, "k8s-node-1": False, "k8s-node-2": True}
    assert v.text("#minions tr[data-minion=k8s-node-1] .badge") == "current"
    v.shot("minions-one-refreshed")

    v.open("/ui/")
    assert v.text("#version") == "version 2"
    assert v.text("#operation") == "rotate-ca"
    assert len(browser.find_elements(By.CSS_SELECTOR, "svg.bar")) == 3
    assert len(browser.find_elements(By.CSS_SELECTOR, "#trust tr")) == 2  # header + one CA
    overview = v.shot("overview")

    v.open("/ui/history")
    rows = browser.find_elements(By.CSS_SELECTOR, "#history tr[data-version]")
    assert [r.get_attribute("data-version") for r in rows] == ["2", "1"]
    assert "rotate-ca" in rows[0].text and "browser test" in rows[0].text
    v.shot("history")

    # The audit page's filter, used through its form.
    v.open("/ui/audit")
    Select(browser.find_element(By.ID, "kind")).select_by_value("pillar")
    browser.find_element(By.ID, "minion").send_keys("node-1")
    browser.find_element(By.ID, "filter").click()
    wait(browser).until(EC.url_contains("kind=pillar"))
    v.check()
    events = browser.find_elements(By.CSS_SELECTOR, "#audit tr.event")
    assert len(events) == 2 and all("k8s-node-1" in e.text for e in events)
    v.shot("audit")

    # Nothing the browser refused: no CSP violation, no failed load but the favicon.
    problems = [e["message"] for e in browser.get_log("browser")
                if e["level"] in ("SEVERE", "WARNING") and "favicon.ico" not in e["message"]]
    assert problems == []

    browser.find_element(By.CSS_SELECTOR, ".who button").click()
    wait(browser).until(EC.url_contains("/ui/login"))
    assert browser.get_cookie("pkisvc_ui") is None
    v.open("/ui/")
    assert "/ui/login" in browser.current_url
    # The session id copied before logging out opens nothing, on the pages or the API.
    r = requests.get(f"{url}/ui/", cookies={"pkisvc_ui": session["value"]},
                     allow_redirects=False, timeout=30)
    assert r.status_code == 302 and "/ui/login" in r.headers["Location"]
    r = requests.get(f"{url}/v1/audit", timeout=30,
                     headers={"Authorization": f"Bearer {session['value']}"})
    assert r.status_code == 401
    print(f"\nscreenshots: {shots} (overview: {overview})")
