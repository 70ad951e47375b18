"""The WSGI application: `gunicorn 'pkisvc.app:create_app()'`."""
from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from flask import Flask, Response, current_app, g, request

from pkisvc import api, auth, errors, metrics, ui
from pkisvc.answers import Bodies
from pkisvc.backends import Backend, load_backend
from pkisvc.errors import Conflict, PayloadTooLarge
from pkisvc.fastpath import FastReads
from pkisvc.settings import Settings
from pkisvc.store import CertStore

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> Flask:
    """Create the pkisvc WSGI application."""
    settings = settings or Settings.load()
    store = CertStore(backend or load_backend(settings), settings)
    if settings.auto_init:
        bootstrap(store)
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["pkisvc"] = store
    app.extensions["pkisvc.bodies"] = bodies = Bodies(store)
    app.register_blueprint(api.bp)
    app.register_blueprint(ui.bp)
    app.add_url_rule("/metrics", "metrics", metrics_view)
    app.before_request(_start_timer)
    app.before_request(_limit_chunked_body)
    app.after_request(_count)
    errors.register(app)
    app.wsgi_app = FastReads(app.wsgi_app, store, bodies)  # type: ignore[method-assign]
    return app


def bootstrap(store: CertStore) -> Path | None:
    """Initialise an empty store; make `<data_dir>/admin.token` if it is missing.

    Safe when several workers start at once: one of them wins each step.
    """
    if store.ensure_initialised(actor="pkisvc:first-start"):
        log.info("initialised an empty store: version 1")
    path = store.settings.data_dir / "admin.token"
    if path.exists():
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    held = store.tokens()
    admins = sorted(t.name for t in held if "admin" in t.scopes)
    if admins:
        # A replica joining a shared store (Vault), or a data_dir whose admin.token was
        # removed: the store has its admin token already; another would only add a secret.
        if not path.exists():  # (it does when another worker wrote it meanwhile)
            log.warning("the store has an admin token already (%s): none made for %s; copy "
                        "admin.token from where it was made, or run `pkisvc token create "
                        "NAME --scope admin --scope secrets`", ", ".join(admins), path)
        return None
    names = {t.name for t in held}
    name = next(n for n in ("admin", *(f"admin-{i}" for i in range(2, 10**6))) if n not in names)
    try:
        token = store.create_token(name, ["admin", "secrets"], actor="pkisvc:first-start")
    except Conflict:
        return None  # another worker made it a moment ago
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        store.revoke_token(name, actor="pkisvc:first-start")
        return None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    log.warning("admin token %r written to %s", name, path)
    return path


def metrics_view() -> Response:
    store: CertStore = current_app.extensions["pkisvc"]
    if store.settings.metrics_scope:
        auth.check(store.settings.metrics_scope)
    return Response(metrics.render(store), mimetype="text/plain; version=0.0.4")


def _start_timer() -> None:
    g.started = time.perf_counter()


def _limit_chunked_body() -> None:
    # Werkzeug refuses a Content-Length over the limit, but cuts a chunked body at it silently
    # (the views would see a truncated body).  The read is cached for the views and forms.
    if request.content_length is None and request.method not in ("GET", "HEAD", "OPTIONS"):
        if len(request.get_data(cache=True)) >= MAX_BODY:
            raise PayloadTooLarge(MAX_BODY)


def _count(response: Response) -> Response:
    # Labels from fixed sets only (see metrics.METHODS): the rule, never the path.
    rule = request.url_rule
    endpoint = rule.rule if rule is not None else metrics.UNKNOWN_ENDPOINT
    status = str(response.status_code)
    metrics.REQUESTS.labels(metrics.method_label(request.method), endpoint, status).inc()
    if response.status_code in (401, 403):
        metrics.AUTH_REFUSED.labels(endpoint, status).inc()
        auth.REFUSALS.note(status, endpoint, request.remote_addr)
    if "started" in g:
        metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - g.started)
    return response
