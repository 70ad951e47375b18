"""One error tree for pkisvc; the HTTP status lives on the class."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from flask import Flask


class PkiError(Exception):
    """Root of every error pkisvc raises on purpose."""

    status = 500
    code = "pki_error"

    def __init__(self, message: str = "", **details: Any) -> None:
        super().__init__(message or self.code)
        self.message = message or self.code
        self.details = details

    def to_json(self) -> dict[str, Any]:
        """Return the JSON body of this error."""
        return {"error": self.code, "message": self.message, **self.details}


class ConfigError(PkiError):
    status, code = 500, "config_error"


class InvalidRequest(PkiError):
    status, code = 400, "invalid_request"


class InvalidMaterial(InvalidRequest):
    """A certificate set that is not whole: it is never written."""

    status, code = 422, "invalid_material"


class Unauthorized(PkiError):
    status, code = 401, "unauthorized"


class Forbidden(PkiError):
    status, code = 403, "forbidden"


class NotFound(PkiError):
    status, code = 404, "not_found"


class Conflict(PkiError):
    status, code = 409, "conflict"


class VersionConflict(Conflict):
    status, code = 409, "version_conflict"


class AlreadyInitialised(Conflict):
    status, code = 409, "already_initialised"


class HostsBehind(Conflict):
    """A rotation step refused while hosts have not installed the current phase ([Q]);
    `hosts` in the body names them (`force` overrides, audited)."""

    status, code = 409, "hosts_behind"


class PayloadTooLarge(PkiError):
    status, code = 413, "payload_too_large"

    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the limit of {limit} bytes", limit=limit)


class BackendUnavailable(PkiError):
    status, code = 503, "backend_unavailable"


class AnswerLost(BackendUnavailable):
    """The request may have reached the backend, but its answer did not come back: a write
    may have happened (the store reads back before it answers)."""


class PermissionDenied(BackendUnavailable):
    """The backend refused us: a policy problem, not an outage."""

    status, code = 503, "backend_permission_denied"


def register(app: Flask) -> None:
    """Answer every error, ours or Werkzeug's, as `{"error", "message"}` JSON."""
    from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

    @app.errorhandler(PkiError)
    def _pki(e: PkiError) -> tuple[dict[str, Any], int]:
        return e.to_json(), e.status

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(e: RequestEntityTooLarge) -> tuple[dict[str, Any], int]:
        return _pki(PayloadTooLarge(app.config["MAX_CONTENT_LENGTH"]))

    @app.errorhandler(HTTPException)
    def _http(e: HTTPException) -> tuple[dict[str, Any], int]:
        code = (e.name or "error").lower().replace(" ", "_")
        return {"error": code, "message": e.description or e.name}, e.code or 500

    @app.errorhandler(Exception)
    def _unexpected(e: Exception) -> tuple[dict[str, Any], int]:
        app.logger.exception("unexpected error")  # the traceback goes to the log, not the client
        return {"error": "internal_error", "message": "internal error; see the service log"}, 500
