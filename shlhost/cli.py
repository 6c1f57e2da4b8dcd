"""The ``shlhost`` command: serve, init, db upgrade, and link create/list/show/revoke/qr."""

from __future__ import annotations

import json
import os
import re
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from datetime import UTC, datetime
from pathlib import Path

import click
from flask import Flask, current_app
from flask.cli import FlaskGroup, with_appcontext

from shlhost import Runtime, accounts, create_app, qr
from shlhost.config import ConfigError, write_instance_config
from shlhost.errors import BadRequest, ShlhostError
from shlhost.phr import exporter, importer, sharing
from shlhost.phr.formats import prepare_upload
from shlhost.shl.links import LinkOptions, LinkService, parse_exp
from shlhost.storage import migrate
from shlhost.storage.models import Link


def _factory() -> Flask:
    return create_app()


@click.group(cls=FlaskGroup, create_app=_factory, add_version_option=False)
def cli() -> None:
    """shlhost: host and share SMART Health Links."""


def instance_path() -> str:
    explicit = os.environ.get("SHLHOST_INSTANCE_PATH")
    return os.path.abspath(explicit) if explicit else Flask("shlhost").instance_path


def _runtime() -> Runtime:
    rt: Runtime = current_app.extensions["shlhost"]
    return rt


@contextmanager
def _service() -> Iterator[LinkService]:
    rt = _runtime()
    session = rt.sessions()
    try:
        yield LinkService(session, rt.blobs, rt.links)
    finally:
        session.close()


def _fail(exc: ShlhostError) -> None:
    click.echo(f"error: {exc.message}", err=True)
    sys.exit(2)


@cli.command(with_appcontext=False)
def init() -> None:
    """Write instance/config.py with fresh random secrets (once; never overwrites)."""
    written = write_instance_config(instance_path())
    if written:
        click.echo(f"wrote {written} (mode 0600): keep it secret, back it up with the database")
    else:
        click.echo("instance/config.py already exists; left as it is")


@cli.command(with_appcontext=False)
@click.option("--host", default=lambda: os.environ.get("SHLHOST_HOST", "127.0.0.1"), show_default="127.0.0.1")
@click.option("--port", default=lambda: int(os.environ.get("SHLHOST_PORT", "5000")), show_default="5000",
              type=int)
@click.option("--workers", type=int, default=None, help="gunicorn worker processes (default: from gunicorn.conf)")
@click.option("--dev", is_flag=True, help="Flask's development server instead of gunicorn")
@click.option("--no-migrate", is_flag=True,
              help="one of several servers: write no secrets, migrate nothing ('shlhost db upgrade' is a "
                   "deploy step), refuse a database that is not at this release's revision")
def serve(host: str, port: int, workers: int | None, dev: bool, no_migrate: bool) -> None:
    """Run the service: fresh secrets on first run, database migrations, then gunicorn."""
    if "SHLHOST_SECRET_KEY" not in os.environ and not no_migrate:
        written = write_instance_config(instance_path())
        if written:
            click.echo(f"first run: wrote fresh secrets to {written}")
    app = create_app()
    engine = app.extensions["shlhost"].engine
    if no_migrate:
        at, head = migrate.current(engine), migrate.head()
        if at != head:
            click.echo(f"error: the database is at revision {at or '(empty)'}, this release needs {head}: "
                       "run 'shlhost db upgrade' first", err=True)
            sys.exit(2)
        click.echo(f"shlhost on http://{host}:{port}/ (database at {head})")
    else:
        migrate.upgrade(engine)
        click.echo(f"shlhost on http://{host}:{port}/ (database migrated)")
    if dev:
        app.run(host=host, port=port)
        return
    conf = Path(__file__).with_name("gunicorn_conf.py")
    args = ["gunicorn", "-c", str(conf), "-b", f"{host}:{port}"]
    if workers:
        args += ["-w", str(workers)]
    os.execvp(sys.executable, [sys.executable, "-m", *args, "shlhost.wsgi:app"])  # noqa: S606


@cli.group()
def db() -> None:
    """Database schema."""


@db.command("upgrade")
@with_appcontext
def db_upgrade() -> None:
    """Apply every migration not yet applied (a deploy step; never done by the app itself)."""
    engine = _runtime().engine
    migrate.upgrade(engine)
    click.echo(f"database at revision {migrate.current(engine)}")


@db.command("current")
@with_appcontext
def db_current() -> None:
    click.echo(migrate.current(_runtime().engine) or "(empty)")


@cli.group()
def link() -> None:
    """Create, list, show, revoke links and draw their QR codes (operator commands)."""


def _now() -> datetime:
    return datetime.now(UTC)


@link.command("create")
@click.argument("files", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--label", help="at most 80 characters")
@click.option("--passcode", help="the recipient must type it (flag P)")
@click.option("--passcode-stdin", is_flag=True, help="read the passcode from standard input")
@click.option("--exp", help="expiry: epoch seconds or ISO 8601")
@click.option("--flags", default="", help="L and/or U")
@click.option("--max-uses", type=int, help="1 = single use")
@click.option("--sphr-password", help="password of an encrypted .sphr")
@with_appcontext
def link_create(files: tuple[str, ...], label: str | None, passcode: str | None, passcode_stdin: bool,
                exp: str | None, flags: str, max_uses: int | None, sphr_password: str | None) -> None:
    """Make a link from FILES; print its details as JSON (with the management token)."""
    if passcode_stdin:
        passcode = sys.stdin.readline().rstrip("\n")
    limit = int(current_app.config["MAX_CONTENT_LENGTH"])
    try:
        with ExitStack() as stack:
            streams = [stack.enter_context(Path(f).open("rb")) for f in files]
            prepared = [prepare_upload(Path(f).name, stream, password=sphr_password, max_size=limit)
                        for f, stream in zip(files, streams, strict=True)]
            options = LinkOptions(label=label, passcode=passcode, exp=parse_exp(exp, _now()),
                                  flags=flags, max_uses=max_uses)
            with _service() as service:
                created = service.create(prepared, options, now=_now())
                out = service.describe(created.link, _now())
    except ShlhostError as exc:
        _fail(exc)
    out["management_token"] = created.management_token
    click.echo(json.dumps(out, indent=2))


@link.command("list")
@with_appcontext
def link_list() -> None:
    """Every link on this instance: id, status, flag, uses, label."""
    with _service() as service:
        now = _now()
        for item in service.list_links(None):
            uses = f"{item.uses}/{item.max_uses}" if item.max_uses else str(item.uses)
            click.echo(f"{item.id}  {item.status(now):8}  {item.flag or '-':3}  uses {uses:7}  {item.label or ''}")


LINK_ID = re.compile(r"[A-Za-z0-9_-]{43}")


class TakesLinkId(click.Command):
    """A link id is base64url, so one in 64 starts with '-': never read one as an option.
    Such an id is moved behind a ``--`` (unless the caller wrote one)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if "--" not in args:
            ids = [a for a in args if a.startswith("-") and LINK_ID.fullmatch(a)]
            if ids:
                args = [a for a in args if a not in ids] + ["--", *ids]
        return super().parse_args(ctx, args)


def _find(service: LinkService, link_id: str) -> Link:
    found = service.session.get(Link, link_id)
    if found is None:
        click.echo(f"error: no link {link_id}", err=True)
        sys.exit(2)
    return found


@link.command("show", cls=TakesLinkId)
@click.argument("link_id")
@with_appcontext
def link_show(link_id: str) -> None:
    """A link's settings, status and files as JSON (no management token)."""
    with _service() as service:
        click.echo(json.dumps(service.describe(_find(service, link_id), _now()), indent=2))


@link.command("revoke", cls=TakesLinkId)
@click.argument("link_id")
@with_appcontext
def link_revoke(link_id: str) -> None:
    """Revoke: the ciphertext and key are purged; the tombstone and the log stay."""
    with _service() as service:
        service.revoke(_find(service, link_id), now=_now())
    click.echo(f"revoked {link_id}")


@link.command("qr", cls=TakesLinkId)
@click.argument("link_id")
@click.option("-o", "--output", type=click.Path(dir_okay=False), required=True,
              help="file to write; .svg gives SVG, anything else PNG")
@click.option("--viewer", is_flag=True, help="encode the viewer-prefixed link instead of the bare shlink:/")
@with_appcontext
def link_qr(link_id: str, output: str, viewer: bool) -> None:
    """Draw a link's QR code (error correction M)."""
    with _service() as service:
        text = service.shlink(_find(service, link_id), viewer=viewer)
    if text is None:
        click.echo("error: the server does not hold this link's key (pre-encrypted or revoked)", err=True)
        sys.exit(2)
    data = qr.svg(text) if output.lower().endswith(".svg") else qr.png(text)
    Path(output).write_bytes(data)
    click.echo(f"wrote {output}")


@cli.group()
def user() -> None:
    """Accounts."""


def _read_password(prompt: str) -> str:
    if sys.stdin.isatty():
        return str(click.prompt(prompt, hide_input=True, confirmation_prompt=True))
    return sys.stdin.readline().rstrip("\n")


@user.command("create")
@click.argument("email")
@with_appcontext
def user_create(email: str) -> None:
    """Create an account; the password comes from a prompt, or from standard input when it is not a terminal."""
    password = _read_password("Password")
    rt = _runtime()
    with rt.sessions() as session:
        try:
            account = accounts.create_account(session, rt.hasher, email, password, now=_now())
        except ShlhostError as exc:
            _fail(exc)
        click.echo(f"created account {account.email}")


@cli.group()
def token() -> None:
    """API tokens for programs."""


@token.command("create")
@click.argument("email")
@click.option("--label", help="what the token is for")
@with_appcontext
def token_create(email: str, label: str | None) -> None:
    """Print a new API token for EMAIL's account, alone, on standard output."""
    with _runtime().sessions() as session:
        account = accounts.find_account(session, email)
        if account is None:
            click.echo(f"error: no account {email}", err=True)
            sys.exit(2)
        click.echo(accounts.create_token(session, account, label=label, now=_now()))


@cli.group()
def phr() -> None:
    """Personal health records: import (and export)."""


@phr.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False))
@click.option("--account", "email", required=True, help="the account (email) that owns the record")
@click.option("--source", help="where the data comes from (default: the file name)")
@click.option("--strategy", type=click.Choice(["merge", "replace"]), default="merge", show_default=True)
@click.option("--validate", "validate_only", is_flag=True, help="check everything, write nothing")
@click.option("--strict", is_flag=True, help="full R4 validation; any error refuses the whole file")
@click.option("--sphr-password", help="password of an encrypted .sphr")
@with_appcontext
def phr_import(file: str, email: str, source: str | None, strategy: str, validate_only: bool, strict: bool,
               sphr_password: str | None) -> None:
    """Import FILE (.phr/NDJSON, a Bundle, or a .sphr) like POST /fhir/Bundle/$import."""
    path = Path(file)
    rt = _runtime()
    with rt.sessions() as session, path.open("rb") as body:
        account = accounts.find_account(session, email)
        if account is None:
            click.echo(f"error: no account {email}", err=True)
            sys.exit(2)
        head = body.read(4096)
        body.seek(0)
        suffix = path.suffix.lower()
        fmt = "ndjson" if suffix in (".phr", ".ndjson", ".jsonl") else "sphr" if suffix in (".sphr", ".zip") else \
            importer.detect_format(None, head)
        options = importer.ImportOptions(source=source or path.name, strategy=strategy, validate_only=validate_only,
                                         strict=strict, format=fmt)
        items = (importer.ndjson_items(body) if fmt == "ndjson" else importer.bundle_items(body) if fmt == "bundle"
                 else importer.sphr_items(body, sphr_password, int(current_app.config["MAX_CONTENT_LENGTH"]) * 20))
        try:
            result = importer.Importer(session, account.id, options, now=_now()).run(items)
        except ShlhostError as exc:
            _fail(exc)
        if result.committed:
            sharing.refresh_links(LinkService(session, rt.blobs, rt.links), rt.sessions, account.id, now=_now())
    for issue in result.issues:
        if issue["severity"] in ("error", "warning"):
            click.echo(f"{issue['severity']}: {issue['diagnostics']}", err=True)
    counts = ", ".join(f"{k} {v}" for k, v in result.counts.items())
    prefix = "validated only, nothing written: " if validate_only else ""
    click.echo(f"{prefix}{counts}" + (f" ({result.provenance})" if result.provenance else ""))


@cli.command("gc")
@click.option("--dry-run", is_flag=True, help="say what would be purged and deleted; change nothing")
@with_appcontext
def gc_command(dry_run: bool) -> None:
    """Purge the ciphertext of links expired or revoked more than RETENTION_DAYS ago (the
    tombstone and the access log stay), and delete orphaned blobs older than
    BLOB_GRACE_SECONDS. Idempotent: run it from cron on one machine."""
    from shlhost import gc

    rt = _runtime()
    settings = gc.GcSettings.from_config(current_app.config)
    with rt.sessions() as session:
        report = gc.run(session, rt.blobs, settings, now=_now(), dry_run=dry_run)
    for line in report.lines():
        click.echo(line)
    if report.errors:
        sys.exit(1)


@phr.command("export")
@click.option("--account", "email", required=True, help="the account (email) that owns the record")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="file to write (default: standard output)")
@click.option("--format", "fmt", type=click.Choice(exporter.FORMATS), default="phr", show_default=True)
@click.option("--patient", help="Patient/<id>")
@click.option("--start", help="a year, year-month or date")
@click.option("--end", help="a year, year-month or date (inclusive of its whole period)")
@click.option("--type", "types", help="comma-separated resource types")
@click.option("--since", help="only what changed since this instant")
@click.option("--password", help="the .sphr password (or --password-stdin)")
@click.option("--password-stdin", is_flag=True, help="read the .sphr password from standard input")
@with_appcontext
def phr_export(email: str, output: str | None, fmt: str, patient: str | None, start: str | None, end: str | None,
               types: str | None, since: str | None, password: str | None, password_stdin: bool) -> None:
    """Export a record like GET /fhir/Bundle/$phr-export."""
    if password_stdin:
        password = sys.stdin.readline().rstrip("\n")
    rt = _runtime()
    with rt.sessions() as session:
        account = accounts.find_account(session, email)
        if account is None:
            click.echo(f"error: no account {email}", err=True)
            sys.exit(2)
        account_id = account.id
    try:
        selection = exporter.Selection.parse(patient=patient, types=types, start=start, end=end, since=since)
        export = exporter.Exporter(rt.sessions, account_id, selection)
        name = exporter.safe_filename(selection.patient or "record")
        if fmt == "sphr" and not output:
            raise BadRequest("a .sphr is binary: give -o FILE", code="output_required")
        sink = open(output, "wb") if output else sys.stdout.buffer  # noqa: SIM115 - closed below
        try:
            if fmt == "sphr":
                export.sphr(sink, password or "", name)
            else:
                for chunk in export.bundle() if fmt == "bundle" else export.ndjson(cover=fmt == "phr"):
                    sink.write(chunk)
        finally:
            if output:
                sink.close()
    except ShlhostError as exc:
        if output and Path(output).exists():
            Path(output).unlink()
        _fail(exc)
    if output:
        click.echo(f"wrote {output}: {export.stats.resources} resources", err=True)


# -- SMART Health Links from elsewhere: fetch and pull ------------------------------------------


def _passcode(passcode: str | None, passcode_stdin: bool) -> str | None:
    if passcode_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return passcode


def _client_fail(exc: Exception) -> None:
    click.echo(f"error: {getattr(exc, 'message', str(exc))}", err=True)
    sys.exit(2)


@cli.command("fetch", with_appcontext=False)
@click.argument("link")
@click.option("--passcode", help="the link's passcode (flag P)")
@click.option("--passcode-stdin", is_flag=True, help="read the passcode from standard input")
@click.option("--recipient", default="shlhost fetch", show_default=True, help="who is asking (the manifest's recipient)")
@click.option("-o", "--output", type=click.Path(dir_okay=False), help="file to write (default: standard output)")
@click.option("--format", "fmt", type=click.Choice(["bundle", "ndjson"]), default="bundle", show_default=True)
def fetch(link: str, passcode: str | None, passcode_stdin: bool, recipient: str, output: str | None,
          fmt: str) -> None:
    """Resolve LINK (any SMART Health Link, bare or behind a viewer URL) and write what it
    carries: one collection Bundle of every file, or NDJSON."""
    from shlhost.client import ShlClient, ShlError

    try:
        with ShlClient(recipient=recipient).resolve(link, _passcode(passcode, passcode_stdin)) as resolved:
            # Each file is parsed here (one that is not JSON fails with the others' errors).
            data = resolved.ndjson() if fmt == "ndjson" else json.dumps(resolved.bundle(), indent=1).encode() + b"\n"
            count = len(resolved.resources())
    except ShlError as exc:
        _client_fail(exc)
    if output:
        Path(output).write_bytes(data)
    else:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    for f in resolved.files:
        click.echo(f"file {f.index}: {f.content_type} ({f.origin})", err=True)
        for card in f.cards:
            click.echo(f"  health card from {card.issuer}: {card.verification}", err=True)
        if f.content_type == "application/smart-api-access":
            click.echo("  SMART API access: reported, not followed", err=True)
    if output:
        click.echo(f"wrote {output}: {count} resources", err=True)


@cli.command("pull")
@click.argument("link", required=False)
@click.option("--account", "email", required=True, help="the account (email) that receives the record")
@click.option("--passcode", help="the link's passcode (flag P)")
@click.option("--passcode-stdin", is_flag=True, help="read the passcode from standard input")
@click.option("--recipient", help="who is asking (default: PULL_RECIPIENT)")
@click.option("--force", is_flag=True, help="ignore PULL_MIN_INTERVAL")
@with_appcontext
def pull_command(link: str | None, email: str, passcode: str | None, passcode_stdin: bool, recipient: str | None,
                 force: bool) -> None:
    """Import what LINK carries into the account's record and remember it; with no LINK,
    pull every link the account pulled before (only files that changed)."""
    from shlhost.client import ShlClient, ShlError
    from shlhost.phr import remotes

    rt = _runtime()
    config = current_app.config
    client = ShlClient(recipient=recipient or str(config["PULL_RECIPIENT"]))
    secret = _passcode(passcode, passcode_stdin)
    kw = {"kek": rt.links.kek, "client": client, "now": _now(), "passcode": secret,
          "min_interval": float(config["PULL_MIN_INTERVAL"]), "force": force}
    with rt.sessions() as session:
        account = accounts.find_account(session, email)
        if account is None:
            click.echo(f"error: no account {email}", err=True)
            sys.exit(2)
        try:
            if link:
                results = [remotes.pull(session, account.id, link, **kw)]  # type: ignore[arg-type]
            else:
                results = remotes.pull_all(session, account.id, **kw)  # type: ignore[arg-type]
                if not results:
                    click.echo("no remotes: pull a link first (shlhost pull LINK --account ...)", err=True)
        except (ShlError, ShlhostError) as exc:
            _client_fail(exc)
        if any(r.result and r.result.committed for r in results):
            sharing.refresh_links(LinkService(session, rt.blobs, rt.links), rt.sessions, account.id, now=_now())
    failed = False
    for r in results:
        name = r.label or r.url.split("//", 1)[-1].split("/", 1)[0]
        if r.error:
            failed = True
            click.echo(f"{name}: error: {r.error}", err=True)
            continue
        if r.note:
            click.echo(f"{name}: skipped: {r.note}")
            continue
        counts = ", ".join(f"{k} {v}" for k, v in r.counts.items()) or "nothing changed"
        cards = f"; health cards: {', '.join(r.cards)}" if r.cards else ""
        click.echo(f"{name}: {counts} (files {r.files}, unchanged skipped {r.skipped_files}){cards}")
    if failed:
        sys.exit(2)


def main() -> None:
    try:
        cli(prog_name="shlhost")
    except ConfigError as exc:
        click.echo(f"configuration error: {exc}", err=True)
        sys.exit(2)
