"""The `pkisvc` command line: the same store as the service, used directly."""
from __future__ import annotations

import dataclasses
import getpass
import json
import logging
import os
import socket
import sys
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import yaml

from pkisvc import __version__, changes, doctor, kubeconfig
from pkisvc.backends import Backend, load_backend
from pkisvc.backup import write as write_backup
from pkisvc.errors import InvalidRequest, PkiError
from pkisvc.imports import read_import_dir, read_import_pillar
from pkisvc.migrate import migrate as copy_store
from pkisvc.model import (
    HOST_FILES,
    ITEMS,
    KEY_TYPES,
    LEAVES,
    SA_FILES,
    SCOPES,
    TRUST_FILE,
    format_time,
    parse_time,
    visible,
)
from pkisvc.settings import Settings
from pkisvc.store import CertStore, utcnow

log = logging.getLogger(__name__)

OUTPUT = click.option("-o", "--output", "fmt", type=click.Choice(["table", "json", "yaml"]),
                      default="table", show_default=True, help="Output format.")


@dataclass
class Context:
    config: str | None
    given_actor: str | None = None
    _settings: Settings | None = None
    _store: CertStore | None = None
    _actor: str | None = None
    _opened: list[Backend] = dataclasses.field(default_factory=list)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.load(self.config)
        return self._settings

    @property
    def store(self) -> CertStore:
        if self._store is None:
            self._store = CertStore(self.backend(), self.settings)
        return self._store

    def backend(self, kind: str | None = None, settings: Settings | None = None) -> Backend:
        """A backend of these settings (of `kind`), closed when the command ends."""
        backend = load_backend(settings or self.settings, kind)
        self._opened.append(backend)
        return backend

    def close(self) -> None:
        """Let go of the backends: the Vault tokens this run logged in for are revoked."""
        for backend in self._opened:
            close = getattr(backend, "close", None)  # an optional Backend method
            if close is not None:
                close()
        self._opened.clear()


    @property
    def actor(self) -> str:
        """Who the events of this command name: `--actor` (or PKISVC_ACTOR), else the Vault
        token's display name (`vault:<name>`), else the Unix user (`cli:<user>`)."""
        if self._actor is None:
            who = self.store.backend.identity() if self.given_actor is None else None
            self._actor = self.given_actor or (f"vault:{who}" if who else unix_actor())
        return self._actor


def unix_actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


def actor_name(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is not None and not (0 < len(value) <= 128 and value.isprintable()
                                  and value.strip() == value):
        raise click.BadParameter("must be 1 to 128 printable characters, no outer spaces")
    return value


class Group(click.Group):
    """Show expected errors as one line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PkiError as e:
            click.echo(f"error: {visible(e.message)}", err=True)
            sys.exit(1)


pass_ctx = click.make_pass_decorator(Context)


@click.group(cls=Group)
@click.option("--config", "-c", type=click.Path(dir_okay=False), envvar="PKISVC_CONFIG",
              help="Settings YAML (default: $PKISVC_CONFIG).")
@click.option("--actor", envvar="PKISVC_ACTOR", callback=actor_name,
              help="Who you are, as audit events name you (default: $PKISVC_ACTOR, else the "
                   "Vault token's display name, else cli:<unix user>).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens.")
@click.version_option(__version__, prog_name="pkisvc")
@click.pass_context
def main(ctx: click.Context, config: str | None, actor: str | None, verbose: bool) -> None:
    """Versioned certificates for Salt-managed Kubernetes clusters."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(config, actor)
    ctx.call_on_close(ctx.obj.close)


# --- output ---------------------------------------------------------------------------

def emit(fmt: str, data: Any, table: Callable[[], Sequence[Sequence[Any]]]) -> None:
    """Print data as JSON or YAML, or the rows `table()` returns (first row = header).

    JSON and YAML escape what a terminal must not receive; a table escapes it with `visible`
    (a stored `\\n` or ESC would forge rows or drive the terminal).
    """
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    elif fmt == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    else:
        rows = [[format_time(c) if isinstance(c, datetime) else visible(str(c)) for c in r]
                for r in table()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        for r in rows:
            click.echo("   ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def short_duration(seconds: int) -> str:
    """kubeadm's residual time: 59s, 59m, 47h, 729d, 10y; `<invalid>` once expired."""
    if seconds <= 0:
        return "<invalid>"
    for limit, unit, size in ((60, "s", 1), (3600, "m", 60), (48 * 3600, "h", 3600),
                              (2 * 365 * 86400, "d", 86400)):
        if seconds < limit:
            return f"{seconds // size}{unit}"
    return f"{seconds // (365 * 86400)}y"


def kubeadm_time(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%b %d, %Y %H:%M UTC")


def done(record: Any, store: CertStore | None = None) -> None:
    """Print the version a change wrote, the SANs it changed, and (on stderr) its warnings."""
    click.echo(f"version {record.version}: {record.operation}")
    for field, words in (("sans_added", "added"), ("sans_removed", "removed")):
        if record.extra.get(field):
            click.echo(f"server SANs {words}: {', '.join(record.extra[field])}")
    if store is not None:
        warn(store.warnings(record))


def warn(lines: list[str]) -> None:
    for line in lines:
        click.echo(f"warning: {line}", err=True)


# --- commands -------------------------------------------------------------------------

@main.command()
@click.option("--bind", help="HOST:PORT (default: the `bind` setting).")
@click.option("--workers", type=click.IntRange(1, 64), help="gunicorn workers.")
@click.option("--self-tls", is_flag=True,
              help="Serve HTTPS with a certificate for the bind address issued from the "
                   "store's CA into <data_dir>/tls/ (clients trust <data_dir>/tls/ca.crt).")
@pass_ctx
def serve(c: Context, bind: str | None, workers: int | None, self_tls: bool) -> None:
    """Run the HTTP service under gunicorn."""
    env = dict(os.environ)
    if c.config:
        env["PKISVC_CONFIG"] = str(Path(c.config).absolute())
    if bind:
        env["PKISVC_BIND"] = bind
    if workers:
        env["PKISVC_WORKERS"] = str(workers)
    settings = Settings.load(env.get("PKISVC_CONFIG"), env=env)  # fail here, in one line
    if self_tls and settings.tls.cert:
        raise click.UsageError("--self-tls and the tls.cert/tls.key settings exclude each other")
    if settings.auto_init:
        from pkisvc.app import bootstrap

        bootstrap(CertStore(c.backend(settings=settings), settings))
        token_file = settings.data_dir / "admin.token"
        if token_file.exists():
            click.echo(f"admin token: {token_file}", err=True)
    if self_tls:
        cert, key = self_signed_tls(CertStore(c.backend(settings=settings), settings), settings,
                                    c.actor)
        env["PKISVC_TLS__CERT"], env["PKISVC_TLS__KEY"] = str(cert), str(key)
        click.echo(f"serving HTTPS with {cert} (trust {cert.parent / 'ca.crt'})", err=True)
    click.echo(f"pkisvc serving on {settings.bind} ({settings.backend} backend)", err=True)
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:pkisvc.gunicorn_conf",
            "pkisvc.app:create_app()"]
    c.close()  # the workers log in for themselves
    os.execve(sys.executable, argv, env)  # noqa: S606 - become gunicorn, same PID


def serving_hosts(bind: str) -> tuple[str, ...]:
    """The names a client may use for the bind address (a wildcard: this host's names)."""
    host = bind.rsplit(":", 1)[0].strip("[]")
    if host in ("0.0.0.0", "::", ""):  # noqa: S104 - naming what the operator bound
        return ("127.0.0.1", "::1", "localhost", socket.gethostname())
    return (host,)


def self_signed_tls(store: CertStore, settings: Settings, actor: str) -> tuple[Path, Path]:
    """Write <data_dir>/tls/{tls.crt,tls.key,ca.crt} (0600) for `serve --self-tls`."""
    cert, key, trust = store.issue_serving_cert(serving_hosts(settings.bind), actor=actor)
    out = settings.data_dir / "tls"
    out.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(out, 0o700)
    for name, data in (("tls.key", key), ("tls.crt", cert), ("ca.crt", trust)):
        tmp = out / f".{name}.{os.getpid()}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)  # a leftover of an earlier start may have another mode
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, out / name)
    return out / "tls.crt", out / "tls.key"


@main.command()
@click.option("--key-type", type=click.Choice(KEY_TYPES), help="Default: the `key_type` setting.")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def init(c: Context, key_type: str | None, reason: str) -> None:
    """Make the first generation: CA, server and kubecfg."""
    done(c.store.init(actor=c.actor, reason=reason, key_type=key_type))


@main.group()
def rotate() -> None:
    """Make a new generation with new certificates."""


@rotate.command("ca")
@click.option("--key-type", type=click.Choice(KEY_TYPES), help="Default: the `key_type` setting.")
@click.option("--staged", is_flag=True,
              help="Phase 1 of a rotation without downtime: trust the new CA beside the old.")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotate_ca(c: Context, key_type: str | None, staged: bool, reason: str) -> None:
    """New CA and new leaves, in one generation (or --staged, in three)."""
    change = c.store.start_rotation if staged else c.store.rotate_ca
    done(change(actor=c.actor, reason=reason, key_type=key_type), c.store)


def field_rows(state: dict[str, Any]) -> list[list[Any]]:
    """A state mapping as a FIELD/VALUE table (lists joined, None blank)."""
    return [["FIELD", "VALUE"], *([k, ", ".join(v) if isinstance(v, list) else
                                   "" if v is None else v] for k, v in state.items())]


@main.group()
def rotation() -> None:
    """Drive a staged CA rotation: status, continue, finish, abort."""


@rotation.command("status")
@OUTPUT
@pass_ctx
def rotation_status(c: Context, fmt: str) -> None:
    """Show the open staged rotation, if any."""
    state = c.store.rotation()
    emit(fmt, state, lambda: field_rows(state))


@rotation.command("continue")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotation_continue(c: Context, reason: str) -> None:
    """Phase 2: server and kubecfg from the new CA (hosts must trust both CAs by now)."""
    done(c.store.continue_rotation(actor=c.actor, reason=reason), c.store)


@rotation.command("finish")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotation_finish(c: Context, reason: str) -> None:
    """Phase 3: trust only the new CA."""
    done(c.store.finish_rotation(actor=c.actor, reason=reason), c.store)


@rotation.command("abort")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotation_abort(c: Context, reason: str) -> None:
    """Drop the new CA (phase 1 only; later, use rollback)."""
    done(c.store.abort_rotation(actor=c.actor, reason=reason))


@rotate.command("sa")
@click.option("--key-type", type=click.Choice(KEY_TYPES), help="Default: the `key_type` setting.")
@click.option("--staged", is_flag=True,
              help="Phase 1 of a rotation that breaks no token: publish the new key in sa.pub "
                   "beside the old (then `sa-rotation continue`, `sa-rotation finish`).")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotate_sa(c: Context, key_type: str | None, staged: bool, reason: str) -> None:
    """New service-account key: --staged, or at once (a compromised key: every token signed
    by the old key stops verifying)."""
    record = c.store.sa_step("start" if staged else "immediate", actor=c.actor, reason=reason,
                             key_type=key_type)
    if not staged:
        click.echo(f"warning: {changes.SA_IMMEDIATE_WARNING}", err=True)
    done(record)


@main.group("sa-rotation")
def sa_rotation() -> None:
    """Drive a staged service-account key rotation: status, continue, finish, abort."""


@sa_rotation.command("status")
@OUTPUT
@pass_ctx
def sa_rotation_status(c: Context, fmt: str) -> None:
    """Show the service-account key and its open rotation, if any."""
    state = c.store.sa_rotation()
    emit(fmt, state, lambda: field_rows(state))


@sa_rotation.command("continue")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def sa_rotation_continue(c: Context, reason: str) -> None:
    """Phase 2: the new key signs (masters must hold the new sa.pub by now)."""
    done(c.store.sa_step("continue", actor=c.actor, reason=reason))


@sa_rotation.command("finish")
@click.option("--force", is_flag=True, help="Before `sa.overlap` has passed (audited).")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def sa_rotation_finish(c: Context, force: bool, reason: str) -> None:
    """Phase 3: sa.pub holds the new key alone (after `sa.overlap`)."""
    done(c.store.sa_step("finish", actor=c.actor, reason=reason, force=force))


@sa_rotation.command("abort")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def sa_rotation_abort(c: Context, reason: str) -> None:
    """Unpublish the new key (phase 1 only)."""
    done(c.store.sa_step("abort", actor=c.actor, reason=reason))


@rotate.command("server")
@click.option("--san", "add", multiple=True, metavar="NAME",
              help="Add this SAN to the current certificate's (repeat for several).")
@click.option("--remove-san", "remove", multiple=True, metavar="NAME",
              help="Remove this SAN from the current certificate's (repeat for several).")
@click.option("--sans", "whole", multiple=True, metavar="A,B,...",
              help="Replace the whole list of SANs with these (comma-separated, or repeat).")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotate_server(c: Context, add: tuple[str, ...], remove: tuple[str, ...],
                  whole: tuple[str, ...], reason: str) -> None:
    """New API-server pair from the current CA, with the current certificate's subject and
    SANs (the `server.sans` setting is what `init` used); --san, --remove-san and --sans
    change the SANs."""
    if whole and (add or remove):
        raise click.UsageError("--sans replaces the whole list: not with --san/--remove-san")
    names = [n.strip() for w in whole for n in w.split(",") if n.strip()]
    if whole and not names:
        raise click.UsageError("--sans needs at least one name")
    done(c.store.rotate_leaf("server", actor=c.actor, reason=reason, add_sans=add,
                             remove_sans=remove, sans=names or None), c.store)


@rotate.command("kubecfg")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotate_kubecfg(c: Context, reason: str) -> None:
    """New kubecfg (super-user) pair from the current CA, with the current one's subject."""
    done(c.store.rotate_leaf("kubecfg", actor=c.actor, reason=reason), c.store)


@main.command()
@click.argument("item", type=click.Choice([*ITEMS, "trust", "sa"]))
@click.option("--version", "version", type=click.IntRange(min=1), help="Default: the latest.")
@click.option("--pem", is_flag=True, help="Print the PEM (alone, in table format).")
@OUTPUT
@pass_ctx
def show(c: Context, item: str, version: int | None, pem: bool, fmt: str) -> None:
    """Show one certificate (`trust` = the bundle hosts install as ca.crt; `sa` = the
    service-account key by fingerprint, `--pem` its sa.pub)."""
    if item == "sa":
        gen = c.store.read(version)
        text = gen.files.get("sa.pub", b"").decode()
        data: dict[str, Any] = {"item": "sa", **changes.sa_state(gen.record)}
    elif item == "trust":
        gen = c.store.read(version)
        text = gen.files[TRUST_FILE].decode()
        data = {"item": "trust", "version": gen.version, "trust": list(gen.record.trust)}
    else:
        v, rec, raw = c.store.item(item, version)
        text = raw.decode()
        data = {"item": item, "version": v, **rec.to_dict()}
    if item in LEAVES and version is None and fmt == "table":
        warn(changes.settings_drift(c.store.read().record, c.settings))
    if pem and fmt == "table":
        click.echo(text, nl=False)
        return
    if pem:
        data["pem"] = text
    emit(fmt, data, lambda: [["FIELD", "VALUE"], *([k, ", ".join(v) if isinstance(v, list)
                                                    else v] for k, v in data.items())])


@main.command()
@OUTPUT
@pass_ctx
def versions(c: Context, fmt: str) -> None:
    """List every generation, newest first."""
    recs = c.store.versions()
    emit(fmt, [r.to_dict() for r in recs], lambda: [
        ["VERSION", "OPERATION", "CREATED", "ACTOR", "CA", "SA", "REASON"],
        *([r.version, r.operation, r.created_at, r.actor, r.items["ca"].fingerprint[:16],
           (changes.sa_state(r)["fingerprint"] or "-")[:16], r.reason] for r in recs)])


@main.command()
@click.argument("version", type=click.IntRange(min=1))
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rollback(c: Context, version: int, reason: str) -> None:
    """Make a new generation that copies VERSION."""
    done(c.store.rollback(version, actor=c.actor, reason=reason), c.store)


class _Time(click.ParamType):
    """An RFC 3339 time (`2026-11-29T12:00:00Z`), or a date meaning its midnight UTC."""

    name = "time"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> datetime:
        if isinstance(value, datetime):
            return value
        try:
            return parse_time(value if "T" in value else f"{value}T00:00:00Z")
        except ValueError:
            self.fail(f"{value!r} is not a time like 2026-11-29T12:00:00Z or a date like "
                      "2026-11-29", param, ctx)


@main.command()
@click.option("--since", type=_Time(), help="Only events from this time on.")
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
@OUTPUT
@pass_ctx
def audit(c: Context, since: datetime | None, limit: int, fmt: str) -> None:
    """Show audit events, newest first."""
    events = c.store.audit(since=since, limit=limit)
    emit(fmt, [e.to_dict() for e in events], lambda: [
        ["TIME", "ACTOR", "ACTION", "VERSION", "ITEMS", "MINION", "REASON"],
        *([e.time, e.actor, e.action, e.version or "", ",".join(e.items), e.minion or "",
           e.reason] for e in events)])


@main.command("check-expiration")
@OUTPUT
@pass_ctx
def check_expiration(c: Context, fmt: str) -> None:
    """Show when each certificate expires (kubeadm's columns)."""
    rows = c.store.expiration()
    for r in rows:
        r["residual_time"] = short_duration(r["residual_seconds"])
    emit(fmt, [{**r, "expires": format_time(r["expires"])} for r in rows], lambda: [
        ["CERTIFICATE", "EXPIRES", "RESIDUAL TIME", "CERTIFICATE AUTHORITY"],
        *([r["file"], kubeadm_time(r["expires"]), r["residual_time"],
           r["certificate_authority"]] for r in rows)])


@main.command("import")
@click.option("--from-dir", "from_dir", type=click.Path(file_okay=False),
              help="Directory with ca.crt, [ca.key,] server.cert, server.key, kubecfg.crt, "
                   "kubecfg.key.")
@click.option("--from-pillar", "from_pillar", type=click.Path(dir_okay=False),
              help="A pillar YAML file where the certificates were pasted.")
@click.option("--key", "key", help="Where in --from-pillar, e.g. kubernetes:certs.")
@click.option("--sa-from-server-key", is_flag=True,
              help="server.key is the cluster's service-account key too (kube-up's flags): "
                   "adopt it, so tokens already issued keep verifying.")
@click.option("--sa-key", type=click.Path(dir_okay=False),
              help="The cluster's service-account key (kubeadm's sa.key); default: "
                   "sa.key in --from-dir if there is one.")
@click.option("--sa-pub", type=click.Path(dir_okay=False),
              help="Its verification bundle (kubeadm's sa.pub); default: sa.pub beside it.")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def import_(c: Context, from_dir: str | None, from_pillar: str | None, key: str | None,
            sa_from_server_key: bool, sa_key: str | None, sa_pub: str | None,
            reason: str) -> None:
    """Store an existing set of certificates as a new generation."""
    if bool(from_dir) == bool(from_pillar):
        raise click.UsageError("give exactly one of --from-dir and --from-pillar")
    if from_pillar and not key:
        raise click.UsageError("--from-pillar needs --key (e.g. kubernetes:certs)")
    files = read_import_dir(from_dir) if from_dir else read_import_pillar(from_pillar or "",
                                                                         key or "")
    source = from_dir or f"{from_pillar}#{key}"
    sa_files = read_sa_files(from_dir, sa_key, sa_pub)
    if sa_from_server_key and sa_files and not sa_key:
        sa_files = {}  # the flag names the key to adopt; a sa.key beside it is not asked for
    done(c.store.import_files(files, actor=c.actor, reason=reason or f"imported from {source}",
                              sa_from_server_key=sa_from_server_key, sa_files=sa_files),
         c.store)


def read_sa_files(from_dir: str | None, sa_key: str | None, sa_pub: str | None
                  ) -> dict[str, bytes]:
    """The service-account files an import adopts: named ones, or kubeadm's in from_dir."""
    base = Path(from_dir) if from_dir else None
    key_path = Path(sa_key) if sa_key else (base / "sa.key" if base else None)
    pub_path = (Path(sa_pub) if sa_pub else
                key_path.with_name("sa.pub") if key_path and sa_key else
                base / "sa.pub" if base else None)
    out: dict[str, bytes] = {}
    for name, path, named in (("sa.key", key_path, sa_key), ("sa.pub", pub_path, sa_pub)):
        if path is None or not (named or path.is_file()):
            continue
        try:
            out[name] = path.read_bytes()
        except OSError as e:
            raise InvalidRequest(f"{path}: {e.strerror}") from None
    return out


@main.command("export-pillar")
@click.option("--key", default="kubernetes:certs", show_default=True,
              help="Where to nest the files.")
@click.option("--version", "version", type=click.IntRange(min=1), help="Default: the latest.")
@pass_ctx
def export_pillar(c: Context, key: str, version: int | None) -> None:
    """Print a legacy static pillar (the pasted way), private keys included, no CA key."""
    gen = c.store.read(version)
    # Audited before a key is printed: no event, no export.
    c.store.record_delivery(actor=c.actor, action="export-pillar", version=gen.version,
                            items=LEAVES, reason=f"static pillar under {key}")
    # the seed's static pillar: certificates only (sa.key/sa.pub reach masters from pkisvc)
    seed = tuple(n for n in HOST_FILES if n not in SA_FILES)
    node: Any = {k: v.decode() for k, v in c.store.host_files(gen, seed).items()}
    for part in reversed(key.split(":")):
        node = {part: node}
    click.echo(yaml.safe_dump(node, sort_keys=False, default_style=None), nl=False)


@main.command()
@click.option("--to", "dest", required=True, type=click.Path(dir_okay=False),
              help="The .tar.gz to write (0600); it holds the CA key.")
@pass_ctx
def backup(c: Context, dest: str) -> None:
    """Write every generation (CA keys included), the audit trail and tokens to a tarball."""
    # Audited before any key is read: no event, no export (the tarball holds the event too).
    c.store.record_delivery(actor=c.actor, action="backup", version=c.store.latest(),
                            items=ITEMS, reason=f"every version to {Path(dest).absolute()}")
    count = write_backup(c.store, Path(dest))
    click.echo(f"backup of {count} versions written to {Path(dest)}")


@main.command()
@click.option("--dry-run", is_flag=True, help="Only list what is due.")
@OUTPUT
@pass_ctx
def renew(c: Context, dry_run: bool, fmt: str) -> None:
    """Re-issue the leaves inside `renew_before`; do nothing when nothing is due."""
    report, record = c.store.renew(actor=c.actor, dry_run=dry_run)
    if report["ca_warning"]:
        click.echo(f"warning: {report['ca_warning']}", err=True)
    blocked = report.get("blocked")
    impossible = blocked if report["due"] else None
    if fmt != "table":
        emit(fmt, {**report, "renewed": record.version if record else None}, lambda: [])
    elif not report["due"]:
        click.echo(f"nothing due (version {report['version']}, renew_before "
                   f"{c.settings.renew_before // 86400}d)")
    else:
        for d in report["due"]:
            click.echo(f"{'due' if dry_run else 'renewed'}: {d['item']} "
                       f"(expires {d['not_after']}, {short_duration(d['residual_seconds'])} left)")
        if record is not None:
            done(record, c.store)
    if impossible:
        click.echo(f"error: renewal is impossible: {impossible}", err=True)
        sys.exit(1)
    if blocked:
        click.echo(f"warning: nothing is due, but renewal would be impossible: {blocked}",
                   err=True)


@main.group()
def token() -> None:
    """API tokens kept (hashed) by the backend."""


@token.command("create")
@click.argument("name")
@click.option("--scope", "scopes", multiple=True, required=True,
              type=click.Choice(SCOPES),
              help="Repeat for several; admin implies read and audit, not secrets.")
@pass_ctx
def token_create(c: Context, name: str, scopes: tuple[str, ...]) -> None:
    """Make a token and print it, alone, this once (only its hash is kept)."""
    click.echo(c.store.create_token(name, list(scopes), actor=c.actor))


@token.command("list")
@OUTPUT
@pass_ctx
def token_list(c: Context, fmt: str) -> None:
    """List tokens (names and scopes; never the tokens)."""
    rows = [{"name": t.name, "scopes": list(t.scopes), "created_at": "",
             "source": "settings"} for t in c.settings.tokens]
    rows += [{"name": t.name, "scopes": list(t.scopes),
              "created_at": format_time(t.created_at) if t.created_at else "",
              "source": "backend"} for t in c.store.tokens()]
    emit(fmt, rows, lambda: [["NAME", "SCOPES", "CREATED", "SOURCE"], *(
        [r["name"], ",".join(r["scopes"]), r["created_at"], r["source"]] for r in rows)])


@token.command("revoke")
@click.argument("name")
@pass_ctx
def token_revoke(c: Context, name: str) -> None:
    """Revoke a token at once, for every worker and replica."""
    c.store.revoke_token(name, actor=c.actor)
    click.echo(f"token {name} revoked")


@main.command("kubeconfig")
@click.option("--server", required=True, help="The API server URL, e.g. https://k8s-master-1:6443.")
@click.option("--version", "version", type=click.IntRange(min=1), help="Default: the latest.")
@click.option("--tls-server-name", help="Name to verify the server as (e.g. "
              "kubernetes.default.svc) when the URL's host is not in its SANs.")
@pass_ctx
def kubeconfig_(c: Context, server: str, version: int | None, tls_server_name: str | None
                ) -> None:
    """Print a kubeconfig for the kubecfg user (trust bundle and client pair embedded)."""
    store = c.store
    gen = store.read(version)
    files = store.host_files(gen, ["ca.crt", "kubecfg.crt", "kubecfg.key"])
    doc = kubeconfig.build(server=server, trust_pem=files["ca.crt"],
                           cert_pem=files["kubecfg.crt"], key_pem=files["kubecfg.key"],
                           cluster=c.settings.cluster, user=c.settings.kubecfg.common_name,
                           tls_server_name=tls_server_name)
    store.record_delivery(actor=c.actor, action="kubeconfig", version=gen.version,
                          items=("kubecfg",))
    click.echo(yaml.safe_dump(doc, sort_keys=False), nl=False)



@main.command("doctor")
@click.option("--root", default="/", show_default=True, type=click.Path(file_okay=False),
              help="Where the host's / is (a chroot, an image, a test tree).")
@click.option("--role", type=click.Choice(["master", "node"]), default="master",
              show_default=True, help="What the host should hold.")
@click.option("--warn-within", type=click.IntRange(0, 36500), default=30, show_default=True,
              help="WARN on certificates expiring within this many days.")
@click.option("--store/--no-store", "use_store", default=True, show_default=True,
              help="Compare with the store's latest version (skipped when it is empty).")
@click.option("--url", help="Compare the CA with the service's current trust bundle and "
              "version (GET URL/v1/ca) instead of the store.")
@click.option("--kubectl", "use_kubectl", is_flag=True,
              help="Also compare the ca.crt in kube-system secrets with the CA.")
@click.option("--kubeconfig", type=click.Path(dir_okay=False),
              help="The kubeconfig --kubectl uses (default: kubectl's own).")
@click.option("--kubectl-path", default="kubectl", envvar="KUBECTL", show_default=True,
              help="The kubectl binary --kubectl runs.")
@click.option("-o", "--output", "fmt", type=click.Choice(["table", "json"]), default="table",
              show_default=True, help="Output format.")
@pass_ctx
def doctor_(c: Context, root: str, role: str, warn_within: int, use_store: bool,
            url: str | None, use_kubectl: bool, kubeconfig: str | None, kubectl_path: str,
            fmt: str) -> None:
    """Check the certificates installed on this host; exit 1 when a check FAILs."""
    expected, store_error, now, drift = None, None, utcnow(), []
    if url:
        try:
            expected = doctor.expected_from_ca(doctor.fetch_json(f"{url.rstrip('/')}/v1/ca"), url)
        except PkiError as e:
            store_error = f"the service: {e.message}"
    elif use_store:
        try:
            now = c.store.now()
            history = c.store.versions()
            expected = doctor.expected_from(history)
            drift = changes.settings_drift(history[0], c.settings) if history else []
        except PkiError as e:
            store_error = f"the store: {e.message}"
    secrets, secrets_error = None, None
    if use_kubectl:
        try:
            secrets = doctor.kube_system_ca_secrets(kubectl_path, kubeconfig)
        except PkiError as e:
            secrets_error = e.message
    report = doctor.run(root, now=now, role=role, expected=expected, store_error=store_error,
                        secrets=secrets, secrets_error=secrets_error,
                        warn_within=timedelta(days=warn_within))
    # The store's leaves against the settings: nothing on the host to fix, said once here.
    report = replace(report, checks=(*report.checks, *(
        doctor.Check("settings", "pkisvc settings", doctor.WARN, line) for line in drift)))
    if fmt == "json":
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        rows = [["STATUS", "CHECK", "PATH", "MESSAGE"],
                *([ch.status, ch.check, ch.path, ch.message] for ch in report.checks)]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        for r in rows:
            click.echo("   ".join([*(x.ljust(w) for x, w in zip(r[:3], widths, strict=True)),
                                   r[3]]).rstrip())
        fixes = [ch for ch in report.checks if ch.status != "PASS" and ch.fix]
        for ch in fixes:
            click.echo(f"fix {ch.path} ({ch.check}): {ch.fix}")
        s = report.to_dict()["summary"]
        click.echo(f"{s['pass']} passed, {s['warn']} warnings, {s['fail']} failed")
    sys.exit(0 if report.ok else 1)


@main.command("formula-path")
def formula_path() -> None:
    """Print the directory to add to the Salt master's file_roots (kubernetes.cert)."""
    from pkisvc.ext_pillar import formula_path as path

    click.echo(path())


@main.command("migrate")
@click.option("--to", "dest", required=True, type=click.Choice(["vault"]),
              help="The backend to copy into (configured by the same settings' vault.*).")
@pass_ctx
def migrate(c: Context, dest: str) -> None:
    """Copy the files store (every version, audit trail, tokens) into an empty backend."""
    source, target = c.backend("files"), c.backend(dest)
    copied = copy_store(source, target)
    # After the copy (a refused migration copied nothing): the same event in both trails.
    for store in (CertStore(source, c.settings), CertStore(target, c.settings)):
        store.record_delivery(actor=c.actor, action="migrate", version=copied.versions,
                              items=ITEMS, reason=f"every version from files to {dest}")
    click.echo(f"migrated {copied.versions} versions, {copied.events} audit events and "
               f"{copied.tokens} tokens to {dest}; set `backend: {dest}` to use it")
    if not getattr(target, "sets_stored_time", True):
        click.echo(f"each version keeps its original time in its record (what `pkisvc "
                   f"versions` shows); {dest}'s own creation time of each secret is the "
                   f"migration's: it cannot be set")


if __name__ == "__main__":
    main()
