"""Operator pages under /ui: overview, history, minions, audit (read-only, server-rendered).

Access is the API's: a bearer token with `read` (the minions and audit pages also need
`audit`).  A browser hands the token over once, through the login form, and gets a session
(`pkisvc.sessions`): a random id in an HttpOnly, SameSite=Strict cookie limited to /ui/, kept
by the backend only as a hash, so every worker and replica knows it.  The cookie never holds
the token, and a token holding `secrets` cannot log in.  Every request looks the session and
its token up again: logging out, expiry, or revoking the token ends it at once.  A script may
still send `Authorization: Bearer`.  Pages carry no script, and their only style is one inline
sheet allowed by its hash in the Content-Security-Policy.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import hmac
import logging
import secrets
import threading
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, TypeVar, cast
from urllib.parse import urlsplit

from flask import Blueprint, Response, current_app, g, redirect, render_template, request, url_for
from markupsafe import Markup
from werkzeug.exceptions import HTTPException

from pkisvc import changes
from pkisvc.auth import Principal, authenticate, effective_scopes
from pkisvc.errors import PkiError, Unauthorized
from pkisvc.model import (
    CERT_FILES,
    ITEMS,
    KEY_FILES,
    OPERATIONS,
    GenerationRecord,
    ItemRecord,
    MinionState,
    format_time,
    visible,
)
from pkisvc.store import CertStore, Fleet
from pkisvc.tokens import hash_token

log = logging.getLogger(__name__)

bp = Blueprint("ui", __name__, url_prefix="/ui")
bp.add_app_template_filter(format_time, "rfc3339")  # pages show times as the API writes them

SESSION_COOKIE = "pkisvc_ui"
CSRF_COOKIE = "pkisvc_ui_csrf"
HISTORY_PAGE = 25
MINIONS_PAGE = 100
AUDIT_PAGE = 100
# The audit page looks at this many of the newest audit events, no more, so it stays cheap
# however long the trail grows (docs/decisions.md).
AUDIT_WINDOW = 20_000
WARN_DAYS, CRITICAL_DAYS = 30, 7
DELIVERY_ACTIONS = ("pillar", "key", "kubeconfig")
TOKEN_ACTIONS = ("token-create", "token-revoke")
PAGE_FILTERS = ("kind", "minion", "behind")  # the query arguments a pager link carries on

_CSS = (Path(__file__).parent / "templates" / "ui.css").read_text()
_STYLE = Markup(_CSS)  # noqa: S704 -- our own sheet, shipped in the package, not user input
_CSS_HASH = base64.b64encode(hashlib.sha256(_CSS.encode()).digest()).decode()
CSP = ("default-src 'none'; "
       f"style-src 'sha256-{_CSS_HASH}'; "
       "img-src 'none'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")

F = TypeVar("F", bound=Callable[..., Any])


def store() -> CertStore:
    s: CertStore = current_app.extensions["pkisvc"]
    return s


# --- access ----------------------------------------------------------------------------------

class _LoginNeeded(Exception):
    """No credentials, or a cookie whose session ended: send the browser to log in."""

    def __init__(self, *, expired: bool = False) -> None:
        super().__init__("log in")
        self.expired = expired


class _NotAllowed(Exception):
    """A token that works but lacks a scope (403)."""


def _principal() -> Principal:
    header = request.headers.get("Authorization")
    if header is not None:
        return authenticate(store(), header)  # Unauthorized -> 401 page (a script asked)
    session_id = request.cookies.get(SESSION_COOKIE)
    if not session_id:
        raise _LoginNeeded()
    session = store().session(session_id)
    if session is None:
        raise _LoginNeeded(expired=True)
    return Principal(session.name, effective_scopes(session.scopes))


def page(*scopes: str) -> Callable[[F], F]:
    """Let the page render only for a token holding every one of scopes; sets g.principal."""
    def wrap(view: F) -> F:
        @functools.wraps(view)
        def inner(*args: Any, **kwargs: Any) -> Any:
            principal = _principal()
            missing = [s for s in scopes if s not in principal.scopes]
            if missing:
                raise _NotAllowed(f"token {principal.name!r} lacks the "
                                  f"{' and '.join(repr(m) for m in missing)} scope")
            g.principal = principal
            g.actor = principal.name
            return view(*args, **kwargs)
        return cast(F, inner)
    return wrap


def _safe_next(target: str | None) -> str:
    """Return target if it is one of our own pages, else the overview (no open redirect).

    Control characters are refused too: a CR or LF cannot go into a Location header.
    """
    if (target and target.startswith("/ui/") and "//" not in target and "\\" not in target
            and target.isprintable()):
        parts = urlsplit(target)
        if not parts.scheme and not parts.netloc:
            return target
    return url_for("ui.overview")


def _csrf_ok() -> bool:
    """Tell whether a form POST is our own: same origin, and the double-submitted value."""
    origin = request.headers.get("Origin")
    if origin is not None and origin != request.host_url.rstrip("/"):
        return False
    if request.headers.get("Sec-Fetch-Site", "same-origin") not in ("same-origin", "none"):
        return False
    cookie = request.cookies.get(CSRF_COOKIE, "")
    field = request.form.get("csrf", "")
    return bool(cookie) and hmac.compare_digest(cookie.encode(), field.encode())


def _cookie_args() -> dict[str, Any]:
    return {"httponly": True, "samesite": "Strict", "secure": request.is_secure, "path": "/ui/"}


def _forget_session(resp: Response, *, paths: tuple[str, ...] = ("/ui/", "/ui")) -> None:
    """Delete the session cookie, and the cookie on /ui in which releases before sessions
    kept the raw token."""
    for path in paths:
        resp.delete_cookie(SESSION_COOKIE, **{**_cookie_args(), "path": path})


# --- what the pages show (pure functions of records and events) ------------------------------

@dataclass(frozen=True)
class Lifetime:
    """One certificate's remaining lifetime against its whole validity."""

    item: str
    file: str
    record: ItemRecord
    days_left: float
    days_total: float

    @property
    def fraction(self) -> float:
        if self.days_total <= 0:
            return 0.0
        return min(1.0, max(0.0, self.days_left / self.days_total))

    @property
    def state(self) -> str:
        if self.days_left < CRITICAL_DAYS:
            return "critical"
        return "warn" if self.days_left < WARN_DAYS else "ok"

    @property
    def words(self) -> str:
        if self.days_left < 0:
            return f"expired {int(-self.days_left)} days ago"
        if self.days_left < 2:
            return f"{self.days_left * 24:.0f} hours left"
        return f"{int(self.days_left)} of {round(self.days_total)} days left"


def lifetimes(record: GenerationRecord, now: datetime) -> list[Lifetime]:
    """Each certificate of a generation with what is left of it at now."""
    out = []
    for item in ITEMS:
        rec = record.items[item]
        start, end = rec.not_before, rec.not_after
        out.append(Lifetime(item, CERT_FILES[item], rec, (end - now).total_seconds() / 86400,
                            (end - start).total_seconds() / 86400))
    return out


@dataclass(frozen=True)
class Minion:
    """A minion's delivery state, against the current version."""

    minion: str
    role: str | None
    version: int
    time: datetime  # when it first held this version
    asked: datetime  # its last pillar request, as stored (within delivery.touch_interval)
    behind: int  # versions behind the current one (0 = current)
    changed: bool  # the files it holds differ from what its pillar holds now


_FILE_ITEM = {**{f: i for i, f in CERT_FILES.items()}, **{f: i for i, f in KEY_FILES.items()}}


def _held(record: GenerationRecord | None, files: Iterable[str]) -> tuple[Any, ...] | None:
    """What a set of host files is, in fingerprints: the bundle for ca.crt, the leaf for the rest.

    A key changes exactly when its certificate does, so the certificate stands for both.
    """
    if record is None:
        return None
    return tuple(record.trust if f == "ca.crt" else record.items[_FILE_ITEM[f]].fingerprint
                 if f in _FILE_ITEM else f for f in sorted(files))


def minion_table(states: Iterable[MinionState], current: GenerationRecord,
                 records: Mapping[int, GenerationRecord],
                 roles: Mapping[str, tuple[str, ...]]) -> list[Minion]:
    """Each minion's delivery state against current; stale ones first.

    records maps versions to their records: a minion behind the current version whose files
    (its role's) are the same now is behind but not `changed`; a role no longer configured
    counts as changed.
    """
    return [_row(r) for r in _ranked(states, current, records, roles)]


_Ranked = tuple[bool, bool, str, int, bool, MinionState]  # sort key, then behind, changed


def _ranked(states: Iterable[MinionState], current: GenerationRecord,
            records: Mapping[int, GenerationRecord],
            roles: Mapping[str, tuple[str, ...]]) -> list[_Ranked]:
    """minion_table's order, in plain tuples: a page makes rows of its own slice only."""
    out = []
    verdicts: dict[tuple[int, str | None], bool] = {}  # (version, role) -> changed: few of them
    top = current.version
    for s in states:  # 5,000 minions on every page view: kept lean
        held = (s.version, s.role)
        changed = verdicts.get(held)
        if changed is None:
            files = roles.get(s.role or "")
            then = _held(records.get(s.version), files or ())
            changed = verdicts[held] = s.version < top and (
                files is None or then is None or then != _held(current, files))
        behind = top - s.version if s.version < top else 0
        out.append((not changed, not behind, s.minion, behind, changed, s))
    out.sort()  # minion ids are unique: the comparison never goes past them
    return out


def _row(r: _Ranked) -> Minion:
    s = r[5]
    return Minion(s.minion, s.role, s.version, s.received, s.asked, r[3], r[4])


def _page_number() -> int:
    text = request.args.get("page", "1")
    return int(text) if text.isdigit() and 0 < int(text) < 10**6 else 1


def _pages(total: int, size: int) -> int:
    return max(1, -(-total // size))


def _page_url(number: int) -> str:
    """This page's URL at another page number, with its filters (PAGE_FILTERS) and no more.

    Not the whole query: `endpoint`, `_method`, `_external`... are url_for's own arguments.
    """
    args: dict[str, Any] = {k: v for k, v in request.args.items() if k in PAGE_FILTERS}
    return url_for(cast(str, request.endpoint), **args, page=number)


def _shown(value: Any) -> Any:
    """Jinja's `finalize`: text from records is shown with control characters escaped.

    Versions are immutable: what an older version stored (a lone surrogate, an ESC) must not
    break a page for ever (a lone surrogate has no UTF-8).
    """
    if isinstance(value, str) and not isinstance(value, Markup):
        return visible(value)
    return value


@bp.record_once
def _escape_text(state: Any) -> None:
    state.app.jinja_env.finalize = _shown  # set before any template is compiled


# --- pages -----------------------------------------------------------------------------------

def _render(template: str, status: int = 200, **context: Any) -> Response:
    context.setdefault("principal", g.get("principal"))
    context.setdefault("csrf", request.cookies.get(CSRF_COOKIE, ""))
    html = render_template(template, css=_STYLE, page_url=_page_url, **context)
    return Response(html, status=status, mimetype="text/html")


@bp.get("/")
@page("read")
def overview() -> Response:
    rotation = store().rotation()
    rec = store().read(rotation["version"]).record  # the version the rotation state is of
    trust = []
    for fp in rec.trust:
        detail = rec.items["ca"] if fp == rec.items["ca"].fingerprint else _ca_record(fp)
        label = "signing CA" if fp == rec.items["ca"].fingerprint else ""
        if rotation["open"]:
            label = ("new CA" if fp == rotation["new_ca"] else
                     "old CA" if fp == rotation["old_ca"] else label)
            if fp == rec.items["ca"].fingerprint:
                label += " (signing)"
        trust.append({"fingerprint": fp, "record": detail, "label": label})
    return _render("overview.html", title="Overview", gen=rec,
                   lifetimes=lifetimes(rec, store().now()), trust=trust, rotation=rotation,
                   warnings=store().warnings(rec), sa=changes.sa_state(rec))


def _ca_record(fingerprint: str) -> ItemRecord | None:
    """The record of a trusted CA that is not this generation's signer (staged rotations)."""
    for rec in store().versions():
        if rec.items["ca"].fingerprint == fingerprint:
            return rec.items["ca"]
    return None


@bp.get("/history")
@page("read")
def history() -> Response:
    records = store().versions()
    number = min(_page_number(), _pages(len(records), HISTORY_PAGE))
    rows = records[(number - 1) * HISTORY_PAGE: number * HISTORY_PAGE]
    return _render("history.html", title="History", rows=rows, page=number,
                   pages=_pages(len(records), HISTORY_PAGE), total=len(records),
                   sa={r.version: changes.sa_state(r) for r in rows})


@dataclass(frozen=True)
class _Table:
    """The minions page's order of one fleet (`CertStore.fleet`), kept while it is current,
    with each page's rows rendered once: (only behind, page number) -> HTML."""

    fleet: Fleet
    all: list[_Ranked]
    behind: list[_Ranked]
    changed: int
    rows: dict[tuple[bool, int], Markup] = field(default_factory=dict)


_table_lock = threading.Lock()


def _table() -> _Table:
    """The minions page's table of the store's fleet (kept in the app, made once per fleet)."""
    fleet = store().fleet()
    with _table_lock:  # one thread makes it; the others wait for it
        held: _Table | None = current_app.extensions.get("pkisvc.minions")
        if held is None or held.fleet is not fleet:
            current = store().read(fleet.latest or None).record
            records = {r.version: r for r in store().versions()}
            table = _ranked(fleet.states, current, records, store().settings.roles)
            held = current_app.extensions["pkisvc.minions"] = _Table(
                fleet, table, [m for m in table if m[3]], sum(1 for m in table if m[4]))
        return held


def _rows(table: _Table, only_behind: bool, number: int) -> Markup:
    """One page's rows of the table, rendered once."""
    html = table.rows.get((only_behind, number))
    if html is None:
        shown = table.behind if only_behind else table.all
        rows = shown[(number - 1) * MINIONS_PAGE: number * MINIONS_PAGE]
        fleet = table.fleet
        html = table.rows[only_behind, number] = Markup(render_template(  # noqa: S704
            "minion_rows.html", rows=[_row(m) for m in rows],  # autoescaped, as every page
            installed={m[2]: fleet.views[fleet.index(m[2])] for m in rows}))
    return html


@bp.get("/minions")
@page("read", "audit")
def minions() -> Response:
    table = _table()
    only_behind = request.args.get("behind") == "1"
    shown = table.behind if only_behind else table.all
    number = min(_page_number(), _pages(len(shown), MINIONS_PAGE))
    return _render("minions.html", title="Minions", current=table.fleet.latest,
                   total=len(table.all), behind=len(table.behind), changed=table.changed,
                   only_behind=only_behind, rows=_rows(table, only_behind, number),
                   page=number, pages=_pages(len(shown), MINIONS_PAGE),
                   touch=store().settings.delivery.touch_interval)


@bp.get("/audit")
@page("read", "audit")
def audit() -> Response:
    kind = request.args.get("kind", "")
    minion = request.args.get("minion", "").strip()[:253]
    events = store().audit(limit=AUDIT_WINDOW)
    matching = [e for e in events if (not kind or e.action == kind)
                and (not minion or (e.minion is not None and minion in e.minion))]
    number = min(_page_number(), _pages(len(matching), AUDIT_PAGE))
    kinds = sorted({*OPERATIONS, *DELIVERY_ACTIONS, *TOKEN_ACTIONS, *(e.action for e in events)})
    return _render("audit.html", title="Audit", kind=kind, minion=minion, kinds=kinds,
                   rows=matching[(number - 1) * AUDIT_PAGE: number * AUDIT_PAGE],
                   total=len(matching), page=number, pages=_pages(len(matching), AUDIT_PAGE),
                   truncated=len(events) >= AUDIT_WINDOW, window=AUDIT_WINDOW)


# --- login -----------------------------------------------------------------------------------

def _login_form(error: str = "", status: int = 200) -> Response:
    csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
    resp = _render("login.html", status, title="Log in", principal=None, csrf=csrf, error=error,
                   next=_safe_next(request.values.get("next")))
    resp.set_cookie(CSRF_COOKIE, csrf, **_cookie_args())
    return resp


@bp.get("/login")
def login_form() -> Response:
    # A fixed message, never text from the query: nothing a link can make the page say.
    expired = request.args.get("expired") == "1"
    return _login_form("your session is no longer valid; log in again" if expired else "")


@bp.post("/login")
def login() -> Response:
    if not _csrf_ok():
        return _login_form("the form was stale or came from another site; try again", 403)
    token = request.form.get("token", "").strip()
    try:
        principal = authenticate(store(), f"Bearer {token}")
    except Unauthorized:  # logged (rate-limited) and counted with every 401 by app._count
        return _login_form("unknown token", 401)
    if "read" not in principal.scopes:
        return _login_form(f"token {principal.name!r} lacks the 'read' scope", 403)
    if "secrets" in principal.scopes:
        # Nothing is written for a refused login: the session is opened below, not before.
        return _login_form(f"token {principal.name!r} holds the 'secrets' scope (it reads "
                           "private keys), so it cannot log in here; use a token with 'read' "
                           "and 'audit' only", 403)
    session_id = store().open_session(hash_token(token),
                                      replacing=request.cookies.get(SESSION_COOKIE))
    resp = cast(Response, redirect(_safe_next(request.form.get("next")), code=303))
    _forget_session(resp, paths=("/ui",))
    resp.set_cookie(SESSION_COOKIE, session_id, **_cookie_args())
    return resp


@bp.post("/logout")
def logout() -> Response:
    if not _csrf_ok():
        return _login_form("the form was stale or came from another site; try again", 403)
    session_id = request.cookies.get(SESSION_COOKIE)
    if session_id:
        store().end_session(session_id)
    resp = cast(Response, redirect(url_for("ui.login_form"), code=303))
    _forget_session(resp)
    return resp


# --- errors and headers ----------------------------------------------------------------------

@bp.errorhandler(_LoginNeeded)
def _to_login(e: _LoginNeeded) -> Response:
    target = _safe_next(request.full_path.rstrip("?"))
    url = (url_for("ui.login_form", next=target, expired="1") if e.expired
           else url_for("ui.login_form", next=target))
    resp = cast(Response, redirect(url, code=302))
    if e.expired:
        _forget_session(resp)
    return resp


@bp.errorhandler(_NotAllowed)
def _forbidden(e: _NotAllowed) -> Response:
    return _render("error.html", 403, title="Not allowed", message=str(e))


@bp.errorhandler(PkiError)
def _pki_error(e: PkiError) -> Response:
    return _render("error.html", e.status, title=e.code.replace("_", " ").capitalize(),
                   message=e.message)


@bp.errorhandler(HTTPException)
def _http_error(e: HTTPException) -> Response:
    return _render("error.html", e.code or 500, title=e.name, message=e.description or "")


@bp.errorhandler(Exception)
def _unexpected(e: Exception) -> Response:
    log.exception("operator pages: unexpected error")  # the traceback goes to the log only
    return _render("error.html", 500, title="Internal error",
                   message="internal error; see the service log")


@bp.after_request
def _headers(resp: Response) -> Response:
    resp.headers["Content-Security-Policy"] = CSP
    resp.headers["X-Content-Type-Options"] = "nosniff"
    resp.headers["X-Frame-Options"] = "DENY"
    # same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on our own
    # form posts, and the login form checks Origin.
    resp.headers["Referrer-Policy"] = "same-origin"
    resp.headers["Cache-Control"] = "no-store"
    return resp
