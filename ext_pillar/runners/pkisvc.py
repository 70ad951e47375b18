"""Salt runner: ask pkisvc for a CA rotation from the master (``salt-run pkisvc.rotate``).

``kubernetes.cert.orch.rotate`` calls it; operators can too::

    salt-run pkisvc.rotate mode=immediate reason='yearly'
    salt-run pkisvc.rotate mode=staged          # phase 1: trust old + new
    salt-run pkisvc.rotate step=continue        # phase 2: leaves from the new CA
    salt-run pkisvc.rotate step=finish          # phase 3: trust only the new CA
    salt-run pkisvc.renew                       # leaves inside renew_before, if any
    salt-run pkisvc.sa_rotate mode=staged       # service-account key, phase 1: publish it
    salt-run pkisvc.sa_rotate step=continue     # phase 2: the new key signs
    salt-run pkisvc.sa_rotate step=finish       # phase 3 (after sa.overlap; force=True)
    salt-run pkisvc.sa_status
    salt-run pkisvc.status
    salt-run pkisvc.targets masters='^k8s-master-[0-9]+$' states='[kubernetes.running]'
    salt-run pkisvc.report minions=k8s-master-1,k8s-node-1   # what they installed ([Q])

The service's URL (and ``ca_cert``) come from the master's ``pkisvc`` ext_pillar config unless
given; the token must have the ``admin`` scope and is read from ``token_file`` (default:
the master option ``pkisvc_admin_token_file``, else ``/etc/salt/pkisvc-admin.token``).  A
refused or failed request raises, so the orchestration stops there.

``report`` posts what minions installed (``kubernetes.cert.view``'s sha256 of each file) with
a token of the ``report`` scope (master option ``pkisvc_report_token_file``, default
``/etc/salt/pkisvc-report.token``); ``rotate``/``sa_rotate`` steps take ``wait=SECONDS`` to
wait for pkisvc's gate (every host on the current phase).

``targets`` is the orchestration's check before anything changes: the targets come from the
accepted minion keys (not from ``manage.up``, which silently leaves out a master that is
down), every one must answer, and every named state must exist on every target.
"""
from __future__ import annotations

import http.client
import json
import re
import ssl
import time
import urllib.parse
from typing import Any, Callable

__virtualname__ = "pkisvc"
DEFAULT_TOKEN_FILE = "/etc/salt/pkisvc-admin.token"  # noqa: S105 - a path, not a secret
DEFAULT_REPORT_TOKEN_FILE = "/etc/salt/pkisvc-report.token"  # noqa: S105 - a path
VIEW_SLS = "kubernetes.cert.view"
STEPS = ("continue", "finish", "abort")
GATE_POLL = 3.0  # seconds between two tries of a step that waits for hosts
DEFAULT_MASTERS = r"^k8s-master-[0-9]+$"
DEFAULT_NODES = r"^k8s-node-[0-9]+$"

__opts__: dict[str, Any] = {}
__context__: dict[str, Any] = {}


class RotationError(Exception):
    """pkisvc refused or failed; the message is the service's own (never the token)."""

    def __init__(self, message: str, code: str = "") -> None:
        super().__init__(message)
        self.code = code


def _waiting(call: Callable[[], dict[str, Any]], wait: float) -> dict[str, Any]:
    """call, again every few seconds while pkisvc answers `hosts_behind` (hosts have not
    installed the current phase: their reports arrive asynchronously), for up to wait
    seconds; then the last refusal, which names them."""
    deadline = time.monotonic() + float(wait)
    while True:
        try:
            return call()
        except RotationError as e:
            if e.code != "hosts_behind" or time.monotonic() + GATE_POLL > deadline:
                raise
        time.sleep(GATE_POLL)


def __virtual__() -> str:
    return __virtualname__


def rotate(mode: str = "immediate", step: str | None = None, reason: str = "",
           url: str | None = None, token_file: str | None = None, ca_cert: str | None = None,
           timeout: float = 120, wait: float = 0, force: bool = False) -> dict[str, Any]:
    """Start a rotation (mode immediate or staged) or take a staged one's next step.

    continue and finish wait up to wait seconds for every host to have installed the
    current phase (pkisvc's gate); force takes the step all the same (audited as forced).
    A step refused for hosts that are behind is an answer, not a crash: ``{"Error":
    message}`` naming them, and exit code 1.
    """
    if step is not None:
        if step not in STEPS:
            raise RotationError(f"step must be one of {', '.join(STEPS)}")
        path = f"/v1/ca/rotate/{step}"
        body: dict[str, Any] = {"reason": reason, **({"force": True} if force else {})}
        try:
            return _waiting(lambda: _call("POST", path, body, url, token_file, ca_cert,
                                          timeout), wait)
        except RotationError as e:
            if e.code != "hosts_behind":
                raise
            __context__["retcode"] = 1
            return {"Error": str(e)}
    elif mode in ("immediate", "staged"):
        path, body = "/v1/ca/rotate", {"mode": mode, "reason": reason}
    else:
        raise RotationError("mode must be immediate or staged")
    return _call("POST", path, body, url, token_file, ca_cert, timeout)


def report(minions: str | list[str] | None = None, after: str | None = None,
           sls: str = VIEW_SLS, url: str | None = None, token_file: str | None = None,
           ca_cert: str | None = None, timeout: float = 60) -> dict[str, Any]:
    """Report what minions have installed to pkisvc (POST /v1/hosts/<minion>/report).

    Runs ``kubernetes.cert.view`` on minions (a list of ids, or a comma-separated string)
    and posts, for each minion that returned, the sha256 of every certificate file on its
    disk.  The minion id is the one Salt's job return carries (authenticated by the master),
    never one the host's output names; pkisvc refuses a report whose host names another id.
    after: the state run this report follows (e.g. ``kubernetes.cert.configured``).
    The token needs the ``report`` scope: ``token_file``, default the master option
    ``pkisvc_report_token_file``, else ``/etc/salt/pkisvc-report.token``.
    Returns ``{"reported": {minion: state}, "failed": {minion: why}}``; a report that could not
    be made is an answer, not a crash (the gates name the host).
    """
    import salt.client  # only on a Salt master: imported when called

    ids = [m.strip() for m in (minions.split(",") if isinstance(minions, str)
                               else minions or []) if m.strip()]
    if not ids:
        raise RotationError("report: name the minions (minions=a,b or a list)")
    token_file = (token_file or __opts__.get("pkisvc_report_token_file")
                  or DEFAULT_REPORT_TOKEN_FILE)
    client = salt.client.get_local_client(mopts=__opts__)
    # Queued behind a state run in progress on the minion (the reactor's report follows the
    # run that triggered it), rather than refused as "already running".
    returns = client.cmd(ids, "state.sls", [sls], tgt_type="list", timeout=timeout,
                         kwarg={"queue": True}) or {}
    out: dict[str, Any] = {"reported": {}, "failed": {}}
    for minion in ids:
        body = _installed(returns.get(minion), after or sls)
        if isinstance(body, str):
            out["failed"][minion] = body
            continue
        try:
            host = _call("POST", f"/v1/hosts/{urllib.parse.quote(minion, safe='')}/report",
                         body, url, token_file, ca_cert, timeout)
        except RotationError as e:
            out["failed"][minion] = str(e)
            continue
        out["reported"][minion] = host.get("state")
    return out


def _installed(ret: Any, state: str) -> dict[str, Any] | str:
    """The report body from one minion's view run, or why there is none."""
    if ret is None:
        return "did not answer"
    if not isinstance(ret, dict):
        return "; ".join(str(e) for e in ret) if isinstance(ret, list) else str(ret)
    view = next((v for k, v in ret.items() if "_|-kubernetes-cert-view_|-" in k), None)
    if not isinstance(view, dict) or not view.get("result"):
        return f"{VIEW_SLS} failed: {view.get('comment') if isinstance(view, dict) else ret}"
    import yaml  # Salt's own dependency

    try:
        shown = yaml.safe_load(view["comment"])
        files = {name: (f.get("sha256") if f.get("installed") else None)
                 for name, f in shown["files"].items() if "." in name}
        return {"minion": str(shown["minion"]), "state": state, "result": True,
                "files": files}
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        return f"{VIEW_SLS}: unreadable output ({e.__class__.__name__})"


def renew(dry_run: bool = False, url: str | None = None, token_file: str | None = None,
          ca_cert: str | None = None, timeout: float = 120) -> dict[str, Any]:
    """Renew the leaves inside renew_before (POST /v1/renew); nothing when nothing is due."""
    return _call("POST", "/v1/renew", {"dry_run": bool(dry_run)}, url, token_file, ca_cert,
                 timeout)


def sa_rotate(mode: str = "staged", step: str | None = None, reason: str = "",
              force: bool = False, url: str | None = None, token_file: str | None = None,
              ca_cert: str | None = None, timeout: float = 120,
              wait: float = 0) -> dict[str, Any]:
    """Rotate the service-account key (mode staged or immediate) or take a staged rotation's
    next step; finish before `sa.overlap` has passed is refused unless force (audited).

    A refusal is an answer, not a crash: ``{"Error": message}`` and exit code 1, which fails
    the orchestration's state (and stops the run) without a traceback.
    """
    if step is not None:
        if step not in STEPS:
            raise RotationError(f"step must be one of {', '.join(STEPS)}")
        body: dict[str, Any] = {"reason": reason}
        if force:
            body["force"] = True
        path = f"/v1/sa/rotate/{step}"
    elif mode in ("immediate", "staged"):
        path, body = "/v1/sa/rotate", {"mode": mode, "reason": reason}
    else:
        raise RotationError("mode must be staged or immediate")
    try:
        return _waiting(lambda: _call("POST", path, body, url, token_file, ca_cert, timeout),
                        wait if step in ("continue", "finish") else 0)
    except RotationError as e:
        __context__["retcode"] = 1
        return {"Error": str(e)}


def sa_status(url: str | None = None, token_file: str | None = None,
              ca_cert: str | None = None, timeout: float = 30) -> dict[str, Any]:
    """The service-account key and its open rotation, if any (GET /v1/sa/rotation)."""
    return _call("GET", "/v1/sa/rotation", None, url, token_file, ca_cert, timeout)


def status(url: str | None = None, token_file: str | None = None, ca_cert: str | None = None,
           timeout: float = 30) -> dict[str, Any]:
    """The open staged rotation, if any (GET /v1/ca/rotation)."""
    return _call("GET", "/v1/ca/rotation", None, url, token_file, ca_cert, timeout)


def targets(masters: str | list[str] = DEFAULT_MASTERS, nodes: str | list[str] = DEFAULT_NODES,
            states: list[str] | None = None, timeout: float = 15) -> dict[str, Any]:
    """Resolve and check the orchestration's targets; change nothing.

    masters, nodes: a regular expression matched against the whole minion id of every
    accepted key (anchor it anyway: ``^k8s-master-[0-9]+$``), or a list of minion ids, each
    of which must have an accepted key.  states: SLS names that must exist on every target.
    Returns ``{"masters": [...], "nodes": [...], "problems": [...]}``, ids in name order; the
    run may go on only when ``problems`` is empty (each problem names its minions).
    """
    import salt.client  # only on a Salt master: imported when called
    import salt.key

    accepted = sorted(salt.key.get_key(__opts__).list_status("accepted").get("minions", []))
    problems: list[str] = []
    resolved: dict[str, list[str]] = {}
    for role, spec in (("masters", masters), ("nodes", nodes)):
        if isinstance(spec, str):
            try:
                pattern = re.compile(spec)
            except re.error as e:
                problems.append(f"{role}: {spec!r} is not a regular expression: {e}")
                resolved[role] = []
                continue
            resolved[role] = [m for m in accepted if pattern.fullmatch(m)]
        else:
            ids = [str(m) for m in spec]
            unknown = [m for m in ids if m not in accepted]
            if unknown:
                problems.append(f"{role}: no accepted key for {', '.join(unknown)}")
            resolved[role] = sorted(m for m in ids if m in accepted)
    if not resolved["masters"] and not problems:
        problems.append(f"masters: no accepted minion key matches {masters!r}")
    everyone = sorted({*resolved["masters"], *resolved["nodes"]})
    if everyone:
        client = salt.client.get_local_client(mopts=__opts__)
        answers = client.cmd(everyone, "test.ping", tgt_type="list", timeout=timeout) or {}
        silent = [m for m in everyone if answers.get(m) is not True]
        if silent:
            problems.append(f"did not answer: {', '.join(silent)} (is salt-minion running "
                            "there?)")
        answering = [m for m in everyone if m not in silent]
        if states and answering:
            shown = client.cmd(answering, "state.show_sls", [",".join(states)],
                               tgt_type="list", timeout=timeout) or {}
            for m in answering:
                ret = shown.get(m)
                if ret is None:
                    problems.append(f"did not answer: {m} (state.show_sls)")
                elif not isinstance(ret, dict):
                    errors = ret if isinstance(ret, list) else [str(ret)]
                    problems.append(f"{m}: {'; '.join(str(e) for e in errors)}")
    return {**resolved, "problems": problems}


def _pillar_conf() -> dict[str, Any]:
    for entry in __opts__.get("ext_pillar") or []:
        if isinstance(entry, dict) and isinstance(entry.get("pkisvc"), dict):
            return dict(entry["pkisvc"])
    return {}


def _call(method: str, path: str, body: Any, url: str | None, token_file: str | None,
          ca_cert: str | None, timeout: float) -> dict[str, Any]:
    conf = _pillar_conf()
    url = url or conf.get("url")
    if not url:
        raise RotationError("no pkisvc url: pass url= or configure the pkisvc ext_pillar")
    ca_cert = ca_cert or conf.get("ca_cert")
    token_file = token_file or __opts__.get("pkisvc_admin_token_file") or DEFAULT_TOKEN_FILE
    try:
        with open(token_file) as f:
            token = f.read().strip()
    except OSError as e:
        raise RotationError(f"cannot read the admin token file {token_file}: "
                            f"{e.strerror}") from None
    parts = urllib.parse.urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        ctx = ssl.create_default_context(cafile=ca_cert)
        conn = http.client.HTTPSConnection(parts.hostname or "", parts.port or 443,
                                           timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection(parts.hostname or "", parts.port or 80,
                                          timeout=timeout)
    try:
        conn.request(method, parts.path.rstrip("/") + path,
                     body=json.dumps(body) if body is not None else None,
                     headers={"Authorization": f"Bearer {token}",
                              "Content-Type": "application/json"})
        resp = conn.getresponse()
        raw = resp.read()
    except OSError as e:
        raise RotationError(f"pkisvc at {url}: {e}") from None
    finally:
        conn.close()
    try:
        doc = json.loads(raw)
    except ValueError:
        raise RotationError(f"pkisvc at {url}: HTTP {resp.status}, not JSON") from None
    if resp.status >= 300:
        raise RotationError(f"pkisvc {method} {path}: HTTP {resp.status} "
                            f"{doc.get('error', '')}: {doc.get('message', '')}",
                            code=str(doc.get("error", "")))
    return dict(doc)
