"""The /v1 HTTP API: thin views; errors travel as exceptions to one handler."""
from __future__ import annotations

from typing import Any

from flask import Blueprint, Response, current_app

from pkisvc.errors import BackendUnavailable
from pkisvc.model import TRUST_FILE
from pkisvc.store import CertStore

bp = Blueprint("v1", __name__, url_prefix="/v1")


def store() -> CertStore:
    s: CertStore = current_app.extensions["pkisvc"]
    return s


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
