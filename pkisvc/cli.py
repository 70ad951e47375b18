"""The `pkisvc` command line: the same store as the service, used directly."""
from __future__ import annotations

import getpass
import io
import json
import logging
import os
import sys
import tarfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import click
import yaml

from pkisvc import __version__
from pkisvc.backends import load_backend
from pkisvc.errors import InvalidRequest, PkiError
from pkisvc.model import KEY_TYPES, TRUST_FILE
from pkisvc.settings import Settings
from pkisvc.store import CertStore, read_import_dir, read_import_pillar

log = logging.getLogger(__name__)

OUTPUT = click.option("-o", "--output", "fmt", type=click.Choice(["table", "json", "yaml"]),
                      default="table", show_default=True, help="Output format.")


@dataclass
class Context:
    config: str | None
    _settings: Settings | None = None
    _store: CertStore | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.load(self.config)
        return self._settings

    @property
    def store(self) -> CertStore:
        if self._store is None:
            self._store = CertStore(load_backend(self.settings), self.settings)
        return self._store


def actor() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = str(os.getuid())
    return f"cli:{user}"


class Group(click.Group):
    """Show expected errors as one line and exit 1."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PkiError as e:
            click.echo(f"error: {e.message}", err=True)
            sys.exit(1)


pass_ctx = click.make_pass_decorator(Context)


@click.group(cls=Group)
@click.option("--config", "-c", type=click.Path(dir_okay=False), envvar="PKISVC_CONFIG",
              help="Settings YAML (default: $PKISVC_CONFIG).")
@click.option("-v", "--verbose", is_flag=True, help="Log what happens.")
@click.version_option(__version__, prog_name="pkisvc")
@click.pass_context
def main(ctx: click.Context, config: str | None, verbose: bool) -> None:
    """Versioned certificates for Salt-managed Kubernetes clusters."""
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    ctx.obj = Context(config)


# --- output ---------------------------------------------------------------------------

def emit(fmt: str, data: Any, table: Callable[[], Sequence[Sequence[Any]]]) -> None:
    """Print data as JSON or YAML, or the rows `table()` returns (first row = header)."""
    if fmt == "json":
        click.echo(json.dumps(data, indent=2))
    elif fmt == "yaml":
        click.echo(yaml.safe_dump(data, sort_keys=False), nl=False)
    else:
        rows = [[str(c) for c in r] for r in table()]
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


def kubeadm_time(rfc3339: str) -> str:
    t = datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).astimezone(UTC)
    return t.strftime("%b %d, %Y %H:%M UTC")


def done(record: Any) -> None:
    click.echo(f"version {record.version}: {record.operation}")


# --- commands -------------------------------------------------------------------------

@main.command()
@click.option("--bind", help="HOST:PORT (default: the `bind` setting).")
@click.option("--workers", type=click.IntRange(1, 64), help="gunicorn workers.")
@pass_ctx
def serve(c: Context, bind: str | None, workers: int | None) -> None:
    """Run the HTTP service under gunicorn."""
    env = dict(os.environ)
    if c.config:
        env["PKISVC_CONFIG"] = str(Path(c.config).absolute())
    if bind:
        env["PKISVC_BIND"] = bind
    if workers:
        env["PKISVC_WORKERS"] = str(workers)
    settings = Settings.load(env.get("PKISVC_CONFIG"), env=env)  # fail here, in one line
    if settings.auto_init and CertStore(load_backend(settings), settings).ensure_initialised(
            actor=actor()):
        click.echo("initialised an empty store: version 1", err=True)
    click.echo(f"pkisvc serving on {settings.bind} ({settings.backend} backend)", err=True)
    argv = [sys.executable, "-m", "gunicorn", "-c", "python:pkisvc.gunicorn_conf",
            "pkisvc.app:create_app()"]
    os.execve(sys.executable, argv, env)  # noqa: S606 - become gunicorn, same PID


@main.command()
@click.option("--key-type", type=click.Choice(KEY_TYPES), help="Default: the `key_type` setting.")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def init(c: Context, key_type: str | None, reason: str) -> None:
    """Make the first generation: CA, server and kubecfg."""
    done(c.store.init(actor=actor(), reason=reason, key_type=key_type))


@main.group()
def rotate() -> None:
    """Make a new generation with new certificates."""


@rotate.command("ca")
@click.option("--key-type", type=click.Choice(KEY_TYPES), help="Default: the `key_type` setting.")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotate_ca(c: Context, key_type: str | None, reason: str) -> None:
    """New CA and new leaves, in one generation."""
    done(c.store.rotate_ca(actor=actor(), reason=reason, key_type=key_type))


@rotate.command("server")
@click.option("--san", "sans", multiple=True, help="Extra SAN (repeat); default: `server.sans`.")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotate_server(c: Context, sans: tuple[str, ...], reason: str) -> None:
    """New API-server pair from the current CA."""
    done(c.store.rotate_leaf("server", actor=actor(), reason=reason,
                             sans=list(sans) if sans else None))


@rotate.command("kubecfg")
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rotate_kubecfg(c: Context, reason: str) -> None:
    """New kubecfg (super-user) pair from the current CA."""
    done(c.store.rotate_leaf("kubecfg", actor=actor(), reason=reason))


@main.command()
@click.argument("item", type=click.Choice(["ca", "server", "kubecfg", "trust"]))
@click.option("--version", "version", type=click.IntRange(min=1), help="Default: the latest.")
@click.option("--pem", is_flag=True, help="Print the PEM (alone, in table format).")
@OUTPUT
@pass_ctx
def show(c: Context, item: str, version: int | None, pem: bool, fmt: str) -> None:
    """Show one certificate (`trust` = the bundle hosts install as ca.crt)."""
    if item == "trust":
        gen = c.store.read(version)
        text = gen.files[TRUST_FILE].decode()
        data: dict[str, Any] = {"item": "trust", "version": gen.version,
                                "trust": list(gen.record.trust)}
    else:
        v, rec, raw = c.store.item(item, version)
        text = raw.decode()
        data = {"item": item, "version": v, **rec.to_dict()}
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
        ["VERSION", "OPERATION", "CREATED", "ACTOR", "CA", "REASON"],
        *([r.version, r.operation, r.created_at, r.actor, r.items["ca"].fingerprint[:16],
           r.reason] for r in recs)])


@main.command()
@click.argument("version", type=click.IntRange(min=1))
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def rollback(c: Context, version: int, reason: str) -> None:
    """Make a new generation that copies VERSION."""
    done(c.store.rollback(version, actor=actor(), reason=reason))


@main.command()
@click.option("--since", type=click.DateTime(["%Y-%m-%dT%H:%M:%SZ", "%Y-%m-%d"]),
              help="Only events from this UTC time on.")
@click.option("--limit", type=click.IntRange(1, 100000), default=100, show_default=True)
@OUTPUT
@pass_ctx
def audit(c: Context, since: datetime | None, limit: int, fmt: str) -> None:
    """Show audit events, newest first."""
    events = c.store.audit(since=since.replace(tzinfo=UTC) if since else None,
                           limit=limit)
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
    emit(fmt, rows, lambda: [
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
@click.option("--reason", default="", help="Why (recorded).")
@pass_ctx
def import_(c: Context, from_dir: str | None, from_pillar: str | None, key: str | None,
            reason: str) -> None:
    """Store an existing set of certificates as a new generation."""
    if bool(from_dir) == bool(from_pillar):
        raise click.UsageError("give exactly one of --from-dir and --from-pillar")
    if from_pillar and not key:
        raise click.UsageError("--from-pillar needs --key (e.g. kubernetes:certs)")
    files = read_import_dir(from_dir) if from_dir else read_import_pillar(from_pillar or "",
                                                                         key or "")
    source = from_dir or f"{from_pillar}#{key}"
    done(c.store.import_files(files, actor=actor(), reason=reason or f"imported from {source}"))


@main.command("export-pillar")
@click.option("--key", default="kubernetes:certs", show_default=True,
              help="Where to nest the files.")
@click.option("--version", "version", type=click.IntRange(min=1), help="Default: the latest.")
@pass_ctx
def export_pillar(c: Context, key: str, version: int | None) -> None:
    """Print a legacy static pillar (the pasted way), private keys included, no CA key."""
    gen = c.store.read(version)
    node: Any = {k: v.decode() for k, v in c.store.host_files(
        gen, ["ca.crt", "server.cert", "server.key", "kubecfg.crt", "kubecfg.key"]).items()}
    for part in reversed(key.split(":")):
        node = {part: node}
    click.echo(yaml.safe_dump(node, sort_keys=False, default_style=None), nl=False)


@main.command()
@click.option("--to", "dest", required=True, type=click.Path(dir_okay=False),
              help="The .tar.gz to write (0600); it holds the CA key.")
@pass_ctx
def backup(c: Context, dest: str) -> None:
    """Write every generation (CA keys included), the audit trail and tokens to a tarball."""
    store = c.store
    out = Path(dest)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    count = 0
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh, tarfile.open(fileobj=fh, mode="w:gz") as tar:
            def add(name: str, data: bytes) -> None:
                info = tarfile.TarInfo(name)
                info.size, info.mode = len(data), 0o600
                tar.addfile(info, io.BytesIO(data))
            for rec in reversed(store.versions()):
                gen = store.read(rec.version)
                base = f"pkisvc-backup/generations/{rec.version:06d}"
                add(f"{base}/record.json", json.dumps(rec.to_dict(), indent=1).encode())
                for name, data in sorted(gen.files.items()):
                    add(f"{base}/{name}", data)
                count += 1
            events = store.audit(limit=10**9)
            add("pkisvc-backup/audit.jsonl", "".join(
                json.dumps(e.to_dict()) + "\n" for e in reversed(events)).encode())
            add("pkisvc-backup/tokens.json", json.dumps(
                [t.to_dict() for t in store.tokens()], indent=1).encode())
        os.replace(tmp, out)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise InvalidRequest(f"{dest}: {e.strerror}") from None
    click.echo(f"backup of {count} versions written to {out}")


@main.command("migrate")
@click.option("--to", "dest", required=True, type=click.Choice(["vault"]),
              help="The backend to copy into (configured by the same settings' vault.*).")
@pass_ctx
def migrate(c: Context, dest: str) -> None:
    """Copy the files store (every version, audit trail, tokens) into an empty backend."""
    from pkisvc.migrate import migrate as copy_store

    copied = copy_store(load_backend(c.settings, "files"), load_backend(c.settings, dest))
    click.echo(f"migrated {copied.versions} versions, {copied.events} audit events and "
               f"{copied.tokens} tokens to {dest}; set `backend: {dest}` to use it")


if __name__ == "__main__":
    main()
