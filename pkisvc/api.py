"""The /v1 HTTP API: thin views; errors travel as exceptions to one handler."""
from __future__ import annotations

import json
from typing import Any, Callable

from flask import Blueprint, Response, current_app, g, request

from pkisvc import answers, changes
from pkisvc import hosts as hostjudge
from pkisvc.answers import Answer, Ask, Bodies, item_name
from pkisvc.auth import requires
from pkisvc.errors import BackendUnavailable, Conflict, InvalidRequest, NotFound
from pkisvc.model import KEY_TYPES, TRUST_FILE, StoredGeneration, format_time, parse_time
from pkisvc.store import CertStore

bp = Blueprint("v1", __name__, url_prefix="/v1")


def store() -> CertStore:
    s: CertStore = current_app.extensions["pkisvc"]
    return s


def bodies() -> Bodies:
    b: Bodies = current_app.extensions["pkisvc.bodies"]
    return b


# --- request parsing ----------------------------------------------------------------------

def body(**fields: type | tuple[type, ...]) -> dict[str, Any]:
    """Parse the JSON object body, allowing only `fields` with their types."""
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise InvalidRequest("the body is not valid JSON") from None
    except RecursionError:  # nested deeper than the parser's stack
        raise InvalidRequest("the body is nested too deeply") from None
    if not isinstance(data, dict):
        raise InvalidRequest("the body must be a JSON object")
    for key, value in data.items():
        if key not in fields:
            raise InvalidRequest(f"unknown field {key[:64]!r} (allowed: {', '.join(fields)})")
        kind = fields[key]
        if value is not None and (not isinstance(value, kind) or (isinstance(value, bool)
                                  and kind is not bool)):
            raise InvalidRequest(f"field {key!r} has the wrong type")
    return {k: v for k, v in data.items() if v is not None}


def query_int(name: str, lo: int, hi: int) -> int | None:
    return answers.query_int(request.args, name, lo, hi)


def key_type(data: dict[str, Any]) -> str | None:
    kt = data.get("key_type")
    if kt is not None and kt not in KEY_TYPES:
        raise InvalidRequest(f"key_type must be one of {', '.join(KEY_TYPES)}")
    return kt


def created(record: Any) -> tuple[dict[str, Any], int]:
    """A change's answer: its summary, and what the operator should know of it."""
    return {**record.summary(), "warnings": store().warnings(record)}, 201


def names(data: dict[str, Any], field: str) -> list[str] | None:
    value = data.get(field)
    if value is not None and not all(isinstance(s, str) for s in value):
        raise InvalidRequest(f"field {field!r} must be a list of strings")
    return value


# --- open endpoints ------------------------------------------------------------------------

@bp.get("/health")
def health() -> tuple[dict[str, Any], int]:
    try:
        store().ping()
        version = store().latest()
    except BackendUnavailable:
        return {"status": "degraded", "backend": "down", "version": None}, 503
    # The audit chain as last checked (at start, then every audit.verify_interval): a break
    # is shown, never a 503 — one bad write must not take every replica out of service.
    return {"status": "ok", "backend": "ok", "version": version,
            "audit_chain": chain_summary(store().chain_status)}, 200


def chain_summary(status: dict[str, Any] | None) -> dict[str, Any]:
    """The audit chain's last check as health shows it."""
    if status is None:
        return {"ok": None, "checked_at": None, "first_break": None}
    return {"ok": status["ok"], "checked_at": format_time(status["checked_at"]),
            "first_break": status["first_break"]}


def trust() -> tuple[StoredGeneration, tuple[tuple[str, str], ...]]:
    """The latest generation as served, and the stale marker when Vault is away."""
    seen = store().latest_seen()
    return store().read(seen.value), answers.stale_header(seen.stale)


@bp.get("/ca")
def ca() -> tuple[dict[str, Any], int, list[tuple[str, str]]]:
    gen, stale = trust()
    return {"version": gen.version, "pem": gen.files[TRUST_FILE].decode(),
            "trust": list(gen.record.trust), "ca": gen.record.items["ca"].to_dict()}, 200, [
        *stale]


@bp.get("/ca.pem")
def ca_pem() -> Response:
    gen, stale = trust()
    return Response(gen.files[TRUST_FILE], mimetype="application/x-pem-file",
                    headers=[("ETag", f'"{gen.version}"'), *stale])


# --- changes -------------------------------------------------------------------------------

@bp.post("/init")
@requires("admin")
def init() -> tuple[dict[str, Any], int]:
    data = body(reason=str, key_type=str)
    return created(store().init(actor=g.actor, reason=data.get("reason", ""),
                                key_type=key_type(data), remote_addr=request.remote_addr))


def rotation_mode(data: dict[str, Any]) -> str:
    """A rotation body's `mode`: immediate (the default) or staged."""
    mode = data.get("mode", "immediate")
    if mode not in ("immediate", "staged"):
        raise InvalidRequest("mode must be 'immediate' or 'staged'")
    return str(mode)


@bp.post("/ca/rotate")
@requires("admin")
def rotate_ca() -> tuple[dict[str, Any], int]:
    data = body(reason=str, mode=str, key_type=str)
    mode = rotation_mode(data)
    change = store().start_rotation if mode == "staged" else store().rotate_ca
    return created(change(actor=g.actor, reason=data.get("reason", ""), key_type=key_type(data),
                          remote_addr=request.remote_addr))


@bp.post("/ca/rotate/<step>")
@requires("admin")
def rotation_step(step: str) -> tuple[dict[str, Any], int]:
    if step not in ("continue", "finish", "abort"):
        raise NotFound(f"no step {step[:32]!r} (steps: continue, finish, abort)")
    data = body(reason=str, force=bool)
    reason, force = data.get("reason", ""), bool(data.get("force"))
    if step == "abort":
        if force:
            raise InvalidRequest("abort takes no 'force'")
        return created(store().abort_rotation(actor=g.actor, reason=reason,
                                              remote_addr=request.remote_addr))
    change = store().continue_rotation if step == "continue" else store().finish_rotation
    return created(change(actor=g.actor, reason=reason, force=force,
                          remote_addr=request.remote_addr))


@bp.get("/ca/rotation")
@requires("read")
def rotation() -> dict[str, Any]:
    return store().rotation()


# The service-account key's rotation ([M]): its own phases, independent of the CA's.

@bp.post("/sa/rotate")
@requires("admin")
def rotate_sa() -> tuple[dict[str, Any], int]:
    data = body(reason=str, mode=str, key_type=str)
    mode = rotation_mode(data)
    answer, status = created(store().sa_step(
        "start" if mode == "staged" else "immediate", actor=g.actor,
        reason=data.get("reason", ""), key_type=key_type(data), remote_addr=request.remote_addr))
    if mode == "immediate":
        answer["warning"] = changes.SA_IMMEDIATE_WARNING
    return answer, status


@bp.post("/sa/rotate/<step>")
@requires("admin")
def sa_rotation_step(step: str) -> tuple[dict[str, Any], int]:
    if step not in ("continue", "finish", "abort"):
        raise NotFound(f"no step {step[:32]!r} (steps: continue, finish, abort)")
    data = body(reason=str, force=bool)
    if data.get("force") and step == "abort":
        raise InvalidRequest("abort takes no 'force'")
    return created(store().sa_step(step, actor=g.actor, reason=data.get("reason", ""),
                                   force=bool(data.get("force")),
                                   remote_addr=request.remote_addr))


@bp.get("/sa/rotation")
@requires("read")
def sa_rotation() -> dict[str, Any]:
    return store().sa_rotation()


# What each host has installed ([Q]): reported by the Salt master, never by a minion.

HOSTS_PAGE = 100  # hosts per answer unless ?limit= says otherwise (at most HOSTS_MAX)
HOSTS_MAX = 5000


@bp.get("/hosts")
@requires("read")
def hosts() -> dict[str, Any]:
    """A page of hosts in minion-id order (after the id `after`, only `state` if given), the
    counts by state of all of them, and `next`: the `after` of the next page (None: last)."""
    limit = query_int("limit", 1, HOSTS_MAX) or HOSTS_PAGE
    after = request.args.get("after", "")
    only = request.args.get("state")
    if only is not None and only not in hostjudge.STATES:
        raise InvalidRequest(f"state must be one of {', '.join(hostjudge.STATES)}")
    page, counts, more = store().host_page(after=after, only=only, limit=limit)
    return {"hosts": page, "counts": counts, "total": sum(counts.values()), "next": more}


@bp.post("/hosts/<minion>/report")
@requires("report")
def host_report(minion: str) -> dict[str, Any]:
    data = body(minion=str, state=str, result=bool, files=dict)
    for field in ("minion", "files"):
        if field not in data:
            raise InvalidRequest(f"field {field!r} is required")
    return store().report_host(minion, claimed=data["minion"], state=data.get("state", ""),
                               result=bool(data.get("result")), files=data["files"],
                               actor=g.actor, remote_addr=request.remote_addr)


@bp.delete("/hosts/<minion>")
@requires("admin")
def forget_host(minion: str) -> tuple[str, int]:
    store().forget_host(minion, actor=g.actor, remote_addr=request.remote_addr)
    return "", 204


@bp.post("/certs/<item>/rotate")
@requires("admin")
def rotate_leaf(item: str) -> tuple[dict[str, Any], int]:
    item_name(item)
    data = body(reason=str, add_sans=list, remove_sans=list, sans=list)
    return created(store().rotate_leaf(
        item, actor=g.actor, reason=data.get("reason", ""),
        add_sans=names(data, "add_sans") or (), remove_sans=names(data, "remove_sans") or (),
        sans=names(data, "sans"), remote_addr=request.remote_addr))


@bp.post("/rollback")
@requires("admin")
def rollback() -> tuple[dict[str, Any], int]:
    data = body(version=int, reason=str)
    if "version" not in data or data["version"] < 1:
        raise InvalidRequest("field 'version' (a positive integer) is required")
    return created(store().rollback(data["version"], actor=g.actor,
                                    reason=data.get("reason", ""),
                                    remote_addr=request.remote_addr))


@bp.post("/renew")
@requires("admin")
def renew() -> tuple[dict[str, Any], int]:
    data = body(dry_run=bool)
    report, record = store().renew(actor=g.actor, dry_run=data.get("dry_run", False),
                                   remote_addr=request.remote_addr)
    if record is None:
        if report["due"] and report.get("blocked"):
            raise Conflict(f"renewal is impossible: {report['blocked']}", due=report["due"],
                           version=report["version"])
        return {**report, "renewed": False}, 200
    return {**created(record)[0], "due": report["due"], "ca_warning": report["ca_warning"],
            "renewed": True}, 201


# --- reading -------------------------------------------------------------------------------

@bp.get("/certs")
@requires("read")
def certs() -> dict[str, Any]:
    gen = store().read(query_int("version", 1, 10**9))
    return {"version": gen.version, "trust": list(gen.record.trust),
            "items": {k: v.to_dict() for k, v in gen.record.items.items()}}


@bp.get("/certs/<item>")
def cert(item: str) -> Response:
    return hot_read(answers.cert, item)


@bp.get("/certs/<item>/key")
@requires("secrets")
def key(item: str) -> dict[str, Any]:
    item_name(item)
    version, pem = store().key(item, query_int("version", 1, 10**9))
    store().record_delivery(actor=g.actor, action="key", version=version, items=(item,),
                            remote_addr=request.remote_addr)
    return {"item": item, "version": version, "pem": pem.decode()}


@bp.get("/versions")
@requires("read")
def versions() -> Response:
    return Response(bodies().versions(), mimetype="application/json")


@bp.get("/versions/<int:version>")
@requires("read")
def version(version: int) -> dict[str, Any]:
    if version < 1:
        raise NotFound(f"no version {version}")
    return store().read(version).record.summary()


@bp.get("/pillar/<minion_id>")
def pillar(minion_id: str) -> Response:
    return hot_read(answers.pillar, minion_id)


def hot_read(read: Callable[[CertStore, Bodies, Ask, str], Answer], arg: str) -> Response:
    """Answer a hot read (`pkisvc.answers`); the token check is part of the answer.

    When the fast path already met an error on this request, raise it again rather than ask
    the backend a second time.
    """
    learned = request.environ.pop(answers.LEARNED, None)
    if isinstance(learned, Exception):
        raise learned
    answer = read(store(), bodies(), Ask(
        authorization=request.headers.get("Authorization"), args=request.args,
        if_none_match=request.headers.get("If-None-Match"), remote_addr=request.remote_addr),
        arg)
    return Response(answer.body, status=answer.status, headers=list(answer.headers))


@bp.get("/audit")
@requires("audit")
def audit() -> dict[str, Any]:
    since = request.args.get("since")
    when = None
    if since is not None:
        try:
            when = parse_time(since)
        except ValueError:
            raise InvalidRequest("query parameter 'since' must be an RFC 3339 time with a zone "
                                 "(e.g. 2026-11-29T12:00:00Z)") from None
    limit = query_int("limit", 1, 10000) or 100
    return {"events": [e.to_dict() for e in store().audit(since=when, limit=limit)]}


@bp.get("/openapi.json")
def openapi() -> dict[str, Any]:
    from pkisvc.openapi import document
    return document()

