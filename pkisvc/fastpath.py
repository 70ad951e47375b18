"""The hot reads, answered without Flask.

`GET /v1/certs/<item>` and `GET /v1/pillar/<minion>?role=<role>` are what clients and the Salt
master ask for all day.  `FastReads` — a WSGI layer in front of Flask — recognises their
ordinary shape and calls the same answer as the Flask views (`pkisvc.answers`), whose bodies
are made once per version.  Anything else (another path, a query it does not expect) goes to
Flask untouched.  When the answer is a refusal or a failure, the fast path hands the exception
to Flask once, in the environ (`answers.LEARNED`): the view raises it again, without a second
token check or backend read, and Flask's error handlers make the JSON.
"""
from __future__ import annotations

import re
import time
from http import HTTPStatus
from typing import Any, Callable, Iterable

from pkisvc import answers, metrics
from pkisvc.answers import Answer, Ask, Bodies
from pkisvc.model import ITEMS, MINION_ID
from pkisvc.store import CertStore

_ROLE = re.compile(r"role=([A-Za-z0-9][A-Za-z0-9_.-]{0,62})")
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
CERTS, PILLAR = "/v1/certs/<item>", "/v1/pillar/<minion_id>"  # the Flask rules they stand for
_STATUS = {s: f"{s} {HTTPStatus(s).phrase.upper()}" for s in (200, 304)}  # as Werkzeug says it


class FastReads:
    """WSGI layer that answers the ordinary hot reads itself and passes the rest to Flask."""

    def __init__(self, app: WSGIApp, store: CertStore, bodies: Bodies) -> None:
        self.app = app
        self.store = store
        self.bodies = bodies
        # Bound once: looking a labelled child up costs as much as the rest of a request.
        self._count = {(e, s): metrics.REQUESTS.labels("GET", e, str(s))
                       for e in (CERTS, PILLAR) for s in _STATUS}
        self._time = {e: metrics.LATENCY.labels(e) for e in (CERTS, PILLAR)}

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        started = time.perf_counter()
        route = self._route(environ)
        if route is None:
            return self.app(environ, start_response)
        endpoint, read = route
        try:
            answer = read()
        except Exception as e:  # refused or failed: Flask answers it, from what we learned
            environ[answers.LEARNED] = e
            return self.app(environ, start_response)
        headers = list(answer.headers)
        if answer.status != 304:  # a 304 has no body, nor its length (as Werkzeug sends it)
            headers.append(("Content-Length", str(len(answer.body))))
        start_response(_STATUS[answer.status], headers)
        self._count[endpoint, answer.status].inc()
        self._time[endpoint].observe(time.perf_counter() - started)
        return [answer.body]

    def _route(self, environ: dict[str, Any]) -> tuple[str, Callable[[], Answer]] | None:
        """Return (Flask rule, the answer to call) for a hot read in its ordinary shape."""
        if environ.get("REQUEST_METHOD") != "GET":
            return None
        path: str = environ.get("PATH_INFO", "")
        query: str = environ.get("QUERY_STRING", "")
        if path.startswith("/v1/certs/") and not query and path[10:] in ITEMS:
            item = path[10:]
            return CERTS, lambda: answers.cert(self.store, self.bodies, _ask(environ, {}), item)
        if path.startswith("/v1/pillar/"):
            m = _ROLE.fullmatch(query)
            minion = path[11:]
            if m and MINION_ID.fullmatch(minion):
                ask = _ask(environ, {"role": m.group(1)})
                return PILLAR, lambda: answers.pillar(self.store, self.bodies, ask, minion)
        return None


def _ask(environ: dict[str, Any], args: dict[str, str]) -> Ask:
    return Ask(authorization=environ.get("HTTP_AUTHORIZATION"), args=args,
               if_none_match=environ.get("HTTP_IF_NONE_MATCH"),
               remote_addr=environ.get("REMOTE_ADDR"))
