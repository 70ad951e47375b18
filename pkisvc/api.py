"""The /v1 HTTP API: thin views; errors travel as exceptions to one handler."""
from __future__ import annotations

import json
from typing import Any, Callable

from flask import Blueprint, Response, current_app, g, request

from pkisvc import answers, changes
from pkisvc.answers import Answer, Ask, Bodies, item_name
from pkisvc.auth import requires
from pkisvc.errors import BackendUnavailable, Conflict, InvalidRequest, NotFound
from pkisvc.model import KEY_TYPES, TRUST_FILE, parse_time
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
    return {"status": "ok", "backend": "ok", "version": version}, 200


@bp.get("/ca")
def ca() -> dict[str, Any]:
    gen = store().read()
    return {"version": gen.version, "pem": gen.files[TRUST_FILE].decode(),
            "trust": list(gen.record.trust), "ca": gen.record.items["ca"].to_dict()}


@bp.get("/ca.pem")
def ca_pem() -> Response:
    gen = store().read()
    return Response(gen.files[TRUST_FILE], mimetype="application/x-pem-file",
                    headers={"ETag": f'"{gen.version}"'})


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
    steps = {"continue": store().continue_rotation, "finish": store().finish_rotation,
             "abort": store().abort_rotation}
    if step not in steps:
        raise NotFound(f"no step {step[:32]!r} (steps: continue, finish, abort)")
    data = body(reason=str)
    return created(steps[step](actor=g.actor, reason=data.get("reason", ""),
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
    if data.get("force") and step != "finish":
        raise InvalidRequest("only finish takes 'force'")
    return created(store().sa_step(step, actor=g.actor, reason=data.get("reason", ""),
                                   force=bool(data.get("force")),
                                   remote_addr=request.remote_addr))


@bp.get("/sa/rotation")
@requires("read")
def sa_rotation() -> dict[str, Any]:
    return store().sa_rotation()


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

