"""The OpenAPI 3 description of the HTTP API (served at /v1/openapi.json)."""
from __future__ import annotations

from typing import Any

from pkisvc import __version__
from pkisvc.model import ITEMS, KEY_TYPES, OPERATIONS, SCOPES


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict[str, Any]:
    words = {400: "Bad request", 401: "No or unknown token", 403: "Token lacks the scope",
             404: "Not found", 405: "Method not allowed", 409: "Conflict",
             413: "Body over 64 KiB", 422: "The set is not whole",
             500: "Settings that cannot work (e.g. leaves shorter than renew_before)",
             503: "Backend unavailable"}
    return {str(c): _json(_ref("Error"), words[c]) for c in codes}


# Served from memory while the backend cannot be reached (vault.stale_for): how old it is.
_STALE_HEADER = {"PKISVC-Stale": {
    "description": "Present only when the answer was served from memory while the backend "
                   "could not be reached: seconds since it was last read from the backend",
    "schema": {"type": "integer", "minimum": 0}}}


def _stale(response: dict[str, Any]) -> dict[str, Any]:
    """A response that may be served stale during a backend outage (pkisvc.freshness)."""
    return {**response, "headers": _STALE_HEADER}


def _op(summary: str, scope: str | None, responses: dict[str, Any], *,
        params: list[dict[str, Any]] | None = None, body: dict[str, Any] | None = None,
        op_id: str) -> dict[str, Any]:
    op: dict[str, Any] = {"summary": summary, "operationId": op_id, "responses": responses}
    if scope:
        op["security"] = [{"bearer": []}]
        op["x-scope"] = scope
    else:
        op["security"] = []
    if params:
        op["parameters"] = params
    if body:
        op["requestBody"] = {"required": False,
                             "content": {"application/json": {"schema": body}}}
    return op


_VERSION_Q = {"name": "version", "in": "query", "required": False,
              "schema": {"type": "integer", "minimum": 1}}
_ITEM_P = {"name": "item", "in": "path", "required": True,
           "schema": {"type": "string", "enum": list(ITEMS)}}
_STR = {"type": "string"}
_MINION_P = {"name": "minion", "in": "path", "required": True,
             "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.@-]*$"}}
_NSTR = {"type": ["string", "null"]}
_NINT = {"type": ["integer", "null"]}
# The audit chain as last checked (null before the first check ends); a break keeps it 200.
_AUDIT_CHAIN = {"type": "object", "required": ["ok", "checked_at", "first_break"],
                "properties": {"ok": {"type": ["boolean", "null"]}, "checked_at": _NSTR,
                               "first_break": _NSTR}}

_SCHEMAS: dict[str, Any] = {
    "Host": {"type": "object",
             "required": ["minion", "role", "state", "delivered", "installed", "files", "drift"],
             "properties": {"minion": _STR, "role": _NSTR,
                            "state": {"enum": ["current", "behind", "drifted", "silent",
                                               "unreported", "expired"]},
                            "current": {"type": "integer"},
                            "delivered": {"type": "object"},
                            "installed": {"type": ["object", "null"]},
                            "files": {"type": "object"}, "drift": {"type": "array"},
                            "last_seen": _STR}},
    "Error": {"type": "object", "required": ["error", "message"],
              "properties": {"error": _STR, "message": _STR}},
    "ItemSummary": {
        "type": "object",
        "required": ["fingerprint", "serial", "subject", "issuer", "sans", "not_before",
                     "not_after"],
        "properties": {"fingerprint": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
                       "serial": {"type": "string", "pattern": "^[0-9a-f]+$"},
                       "subject": _STR, "issuer": _STR,
                       "sans": {"type": "array", "items": _STR},
                       "not_before": {"type": "string", "format": "date-time"},
                       "not_after": {"type": "string", "format": "date-time"}}},
    "Generation": {
        "type": "object",
        "required": ["version", "operation", "created_at", "actor", "reason", "items", "trust"],
        "properties": {
            "version": {"type": "integer", "minimum": 1}, "parent": _NINT,
            "operation": {"type": "string", "enum": list(OPERATIONS)},
            "created_at": {"type": "string", "format": "date-time"},
            "actor": _STR, "reason": _STR, "key_type": _STR,
            "items": {"type": "object", "additionalProperties": _ref("ItemSummary")},
            "trust": {"type": "array", "items": _STR},
            "source_version": _NINT, "rotation": {"type": ["object", "null"]},
            "sans_added": {"type": "array", "items": _STR},
            "sans_removed": {"type": "array", "items": _STR},
            "warnings": {"type": "array", "items": _STR}}},
    "Cert": {"allOf": [_ref("ItemSummary"), {
        "type": "object", "required": ["item", "version", "pem"],
        "properties": {"item": {"type": "string", "enum": list(ITEMS)},
                       "version": {"type": "integer"}, "pem": _STR}}]},
    "Key": {"type": "object", "required": ["item", "version", "pem"],
            "properties": {"item": _STR, "version": {"type": "integer"}, "pem": _STR}},
    "Pillar": {"type": "object", "required": ["version", "role", "files", "fingerprints"],
               "properties": {"version": {"type": "integer"}, "role": _STR,
                              "files": {"type": "object", "additionalProperties": _STR},
                              "fingerprints": {"type": "object",
                                               "additionalProperties": _STR},
                              "trust": {"type": "array", "items": _STR}}},
    "AuditEvent": {"type": "object", "required": ["time", "actor", "action"],
                   "properties": {"time": _STR, "actor": _STR, "action": _STR,
                                  "version": _NINT, "items": {"type": "array", "items": _STR},
                                  "reason": _STR, "remote_addr": _NSTR, "minion": _NSTR,
                                  "role": _NSTR}},
}

_REASON = {"type": "string", "maxLength": 1024}


def document() -> dict[str, Any]:
    """Return the OpenAPI document."""
    gen201 = {"201": _json(_ref("Generation"), "The new generation")}
    paths: dict[str, Any] = {
        "/v1/health": {"get": _op("Service and backend health", None, {
            "200": _json({"type": "object", "required": ["status", "backend", "version"],
                          "properties": {"status": {"enum": ["ok"]}, "backend": {"enum": ["ok"]},
                                         "version": _NINT,
                                         "audit_chain": _AUDIT_CHAIN}}, "Healthy"),
            "503": _json({"type": "object", "required": ["status", "backend"],
                          "properties": {"status": {"enum": ["degraded"]},
                                         "backend": {"enum": ["down"]}}}, "Backend down")},
            op_id="health")},
        "/v1/ca": {"get": _op("The trust bundle (hosts' ca.crt) and the signing CA", None, {
            "200": _stale(_json({"type": "object", "required": ["version", "pem"],
                                 "properties": {"version": {"type": "integer"}, "pem": _STR,
                                                "trust": {"type": "array", "items": _STR},
                                                "ca": _ref("ItemSummary")}},
                                "The trust bundle")),
            **_errors(404, 503)}, op_id="getCa")},
        "/v1/ca.pem": {"get": _op("The trust bundle as PEM", None, {
            "200": _stale({"description": "PEM", "content": {"application/x-pem-file": {
                "schema": _STR}}}), **_errors(404, 503)}, op_id="getCaPem")},
        "/v1/init": {"post": _op("Make version 1", "admin", {**gen201, **_errors(
            400, 401, 403, 409, 413, 503)}, body={
            "type": "object", "additionalProperties": False,
            "properties": {"reason": _REASON, "key_type": {"enum": list(KEY_TYPES)}}},
            op_id="init")},
        "/v1/ca/rotate": {"post": _op("New CA and leaves in one generation", "admin", {
            **gen201, **_errors(400, 401, 403, 404, 409, 413, 503)}, body={
            "type": "object", "additionalProperties": False,
            "properties": {"reason": _REASON, "mode": {"enum": ["immediate", "staged"]},
                           "key_type": {"enum": list(KEY_TYPES)}}}, op_id="rotateCa")},
        "/v1/ca/rotate/{step}": {"post": _op(
            "Next phase of a staged rotation: continue (leaves from the new CA), finish "
            "(trust only the new CA) or abort (phase 1 only); continue and finish are refused "
            "(409 hosts_behind, naming them) while hosts have not installed the current phase, "
            "unless force (audited)", "admin", {
                **gen201, **_errors(400, 401, 403, 404, 409, 413, 503)},
            params=[{"name": "step", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": ["continue", "finish", "abort"]}}],
            body={"type": "object", "additionalProperties": False,
                  "properties": {"reason": _REASON, "force": {"type": "boolean"}}},
            op_id="rotationStep")},
        "/v1/ca/rotation": {"get": _op("The open staged rotation, if any", "read", {
            "200": _json({"type": "object", "required": ["open", "phase", "version", "next"],
                          "properties": {"open": {"type": "boolean"}, "phase": _NINT,
                                         "version": {"type": "integer"},
                                         "old_ca": _NSTR, "new_ca": _NSTR,
                                         "next": {"enum": ["continue", "finish", None]},
                                         "abortable": {"type": "boolean"}}}, "Status"),
            **_errors(401, 403, 404, 503)}, op_id="getRotation")},
        "/v1/sa/rotate": {"post": _op(
            "Rotate the service-account key: staged (phase 1: publish the next key in sa.pub) "
            "or immediate (tokens signed by the old key stop verifying)", "admin", {
                **gen201, **_errors(400, 401, 403, 404, 409, 413, 503)}, body={
            "type": "object", "additionalProperties": False,
            "properties": {"reason": _REASON, "mode": {"enum": ["staged", "immediate"]},
                           "key_type": {"enum": list(KEY_TYPES)}}}, op_id="rotateSa")},
        "/v1/sa/rotate/{step}": {"post": _op(
            "Next phase of the service-account rotation: continue (the next key signs), "
            "finish (drop the old key; refused before sa.overlap unless force) or abort "
            "(phase 1 only)", "admin", {
                **gen201, **_errors(400, 401, 403, 404, 409, 413, 503)},
            params=[{"name": "step", "in": "path", "required": True,
                     "schema": {"type": "string", "enum": ["continue", "finish", "abort"]}}],
            body={"type": "object", "additionalProperties": False,
                  "properties": {"reason": _REASON, "force": {"type": "boolean"}}},
            op_id="saRotationStep")},
        "/v1/sa/rotation": {"get": _op(
            "The service-account key and its open rotation, if any", "read", {
                "200": _json({"type": "object", "required": ["open", "phase", "version", "next"],
                              "properties": {
                                  "open": {"type": "boolean"}, "phase": _NINT,
                                  "version": {"type": "integer"},
                                  "present": {"type": "boolean"},
                                  "fingerprint": _NSTR, "key_type": _NSTR,
                                  "published": {"type": "array", "items": _STR},
                                  "old": _NSTR, "new": _NSTR, "switched_at": _NSTR,
                                  "next": {"enum": ["continue", "finish", None]},
                                  "abortable": {"type": "boolean"},
                                  "overlap_seconds": {"type": "integer"},
                                  "overlap_left_seconds": _NINT}}, "Status"),
                **_errors(401, 403, 404, 503)}, op_id="getSaRotation")},
        "/v1/renew": {"post": _op("Renew the leaves inside renew_before (never the CA)",
                                  "admin", {
            "201": _json({"allOf": [_ref("Generation"), {"type": "object", "properties": {
                "due": {"type": "array"}, "ca_warning": _NSTR,
                "renewed": {"const": True}}}]}, "Renewed: the new generation"),
            "200": _json({"type": "object", "required": ["due", "renewed", "version"],
                          "properties": {"version": {"type": "integer"},
                                         "due": {"type": "array"}, "ca_warning": _NSTR,
                                         "blocked": _NSTR, "renewed": {"const": False}}},
                         "Nothing due, or a dry run: what is due (409: due, but renewal "
                         "is impossible, and why)"),
            **_errors(400, 401, 403, 404, 409, 413, 500, 503)},
            body={"type": "object", "additionalProperties": False,
                  "properties": {"dry_run": {"type": "boolean"}}}, op_id="renew")},
        "/v1/certs": {"get": _op("The current generation's items", "read", {
            "200": _json({"type": "object", "required": ["version", "items"],
                          "properties": {"version": {"type": "integer"},
                                         "trust": {"type": "array", "items": _STR},
                                         "items": {"type": "object",
                                                   "additionalProperties": _ref("ItemSummary")}}},
                         "Items"), **_errors(400, 401, 403, 404, 503)},
            params=[_VERSION_Q], op_id="listCerts")},
        "/v1/certs/{item}": {"get": _op("One certificate", "read", {
            "200": _stale(_json(_ref("Cert"), "The certificate")),
            **_errors(400, 401, 403, 404, 503)},
            params=[_ITEM_P, _VERSION_Q], op_id="getCert")},
        "/v1/certs/{item}/key": {"get": _op("A leaf's private key (audited)", "secrets", {
            "200": _json(_ref("Key"), "The key"), **_errors(400, 401, 403, 404, 503)},
            params=[_ITEM_P, _VERSION_Q], op_id="getKey")},
        "/v1/certs/{item}/rotate": {"post": _op("Re-issue server or kubecfg", "admin", {
            **gen201, **_errors(400, 401, 403, 404, 409, 413, 503)}, params=[_ITEM_P], body={
            "type": "object", "additionalProperties": False,
            "properties": {"reason": _REASON, "add_sans": {"type": "array", "items": _STR},
                           "remove_sans": {"type": "array", "items": _STR},
                           "sans": {"type": "array", "items": _STR}}},
            op_id="rotateLeaf")},
        "/v1/versions": {"get": _op("Every generation, newest first", "read", {
            "200": _json({"type": "object", "required": ["versions"], "properties": {
                "versions": {"type": "array", "items": _ref("Generation")}}}, "History"),
            **_errors(401, 403, 503)}, op_id="listVersions")},
        "/v1/versions/{version}": {"get": _op("One generation's record", "read", {
            "200": _json(_ref("Generation"), "The record"), **_errors(401, 403, 404, 503)},
            params=[{"name": "version", "in": "path", "required": True,
                     "schema": {"type": "integer", "minimum": 1}}], op_id="getVersion")},
        "/v1/rollback": {"post": _op("A new generation copying an old one", "admin", {
            **gen201, **_errors(400, 401, 403, 404, 409, 413, 503)}, body={
            "type": "object", "additionalProperties": False, "required": ["version"],
            "properties": {"version": {"type": "integer", "minimum": 1},
                           "reason": _REASON}}, op_id="rollback")},
        "/v1/pillar/{minion_id}": {"get": _op("A role's files for a minion (audited)", "secrets", {
            "200": _json(_ref("Pillar"), "The files"),
            "304": _stale({"description": "Unchanged since the ETag given"}),
            **_errors(400, 401, 403, 404, 503)},
            params=[{"name": "minion_id", "in": "path", "required": True,
                     "schema": {"type": "string", "pattern": "^[A-Za-z0-9][A-Za-z0-9_.@-]*$"}},
                    {"name": "role", "in": "query", "required": True, "schema": _STR},
                    {"name": "If-None-Match", "in": "header", "required": False,
                     "schema": _STR}], op_id="getPillar")},
        "/v1/hosts": {"get": _op(
            "Every known minion: delivered and installed versions, per-file drift, state",
            "read", {"200": _json({"type": "object", "required": ["hosts", "counts"],
                                   "properties": {"hosts": {"type": "array",
                                                            "items": _ref("Host")},
                                                  "counts": {"type": "object"},
                                                  "total": {"type": "integer"},
                                                  "next": _NSTR}},
                                  "A page of hosts, in minion-id order"),
                     **_errors(400, 401, 403, 503)},
            params=[{"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 5000}},
                    {"name": "after", "in": "query", "required": False, "schema": _STR},
                    {"name": "state", "in": "query", "required": False,
                     "schema": {"enum": ["current", "behind", "drifted", "silent",
                                         "unreported", "expired"]}}],
            op_id="getHosts")},
        "/v1/hosts/{minion}": {"delete": _op(
            "Forget a decommissioned host (audited)", "admin", {
                "204": {"description": "Forgotten"}, **_errors(400, 401, 403, 404, 503)},
            params=[_MINION_P], op_id="forgetHost")},
        "/v1/hosts/{minion}/report": {"post": _op(
            "What a minion has installed, from the Salt master (the path names Salt's "
            "authenticated minion id; a body naming another is refused)", "report", {
                "200": _json(_ref("Host"), "The host as it now stands"),
                **_errors(400, 401, 403, 409, 413, 503)},
            params=[_MINION_P], body={
                "type": "object", "additionalProperties": False, "required": ["minion", "files"],
                "properties": {"minion": _STR, "state": _STR, "result": {"type": "boolean"},
                               "files": {"type": "object", "additionalProperties": {
                                   "type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"}}}},
            op_id="reportHost")},
        "/v1/audit": {"get": _op("Audit events, newest first", "audit", {
            "200": _json({"type": "object", "required": ["events"], "properties": {
                "events": {"type": "array", "items": _ref("AuditEvent")}}}, "Events"),
            **_errors(400, 401, 403, 503)},
            params=[{"name": "since", "in": "query", "required": False,
                     "schema": {"type": "string", "format": "date-time"}},
                    {"name": "limit", "in": "query", "required": False,
                     "schema": {"type": "integer", "minimum": 1, "maximum": 10000}}],
            op_id="listAudit")},
        "/v1/openapi.json": {"get": _op("This document", None, {
            "200": _json({"type": "object"}, "OpenAPI 3")}, op_id="openapi")},
        "/metrics": {"get": _op("Prometheus metrics", None, {
            "200": {"description": "Text exposition",
                    "content": {"text/plain": {"schema": _STR}}},
            **_errors(401, 403)}, op_id="metrics")},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "pkisvc", "version": __version__,
                 "description": "Versioned certificates for Salt-managed Kubernetes clusters. "
                                f"Scopes: {', '.join(SCOPES)} (admin implies read and audit)."},
        "paths": paths,
        "components": {"schemas": _SCHEMAS,
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }
