"""The WSGI application: `gunicorn 'pkisvc.app:create_app()'`."""
from __future__ import annotations

import logging

from flask import Flask

from pkisvc import api, errors
from pkisvc.backends import Backend, load_backend
from pkisvc.settings import Settings
from pkisvc.store import CertStore

log = logging.getLogger(__name__)

MAX_BODY = 64 * 1024


def create_app(settings: Settings | None = None, backend: Backend | None = None) -> Flask:
    """Create the pkisvc WSGI application."""
    settings = settings or Settings.load()
    store = CertStore(backend or load_backend(settings), settings)
    if settings.auto_init and store.ensure_initialised(actor="pkisvc:first-start"):
        log.info("initialised an empty store (version 1)")
    app = Flask(__name__)
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY
    app.json.sort_keys = False  # type: ignore[attr-defined]
    app.extensions["pkisvc"] = store
    app.register_blueprint(api.bp)
    errors.register(app)
    return app
