"""``shlhost serve --no-migrate``: how each of several servers starts once migrations are a
deploy step. gunicorn itself is not started here (``os.execvp`` is replaced)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from shlhost.cli import cli
from shlhost.storage import migrate
from shlhost.storage.db import make_engine
from tests.conftest import TEST_KEK


@pytest.fixture
def deployment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A database at revision 0001, secrets in the environment, and a fake exec."""
    url = "sqlite:///" + str(tmp_path / "shared.db")
    engine = make_engine(url)
    migrate.upgrade(engine, "0001")
    engine.dispose()
    for name in list(os.environ):
        if name.startswith("SHLHOST_") and name != "SHLHOST_INSTANCE_PATH":
            monkeypatch.delenv(name)
    monkeypatch.setenv("SHLHOST_INSTANCE_PATH", str(tmp_path / "instance"))
    monkeypatch.setenv("SHLHOST_DATABASE_URL", url)
    monkeypatch.setenv("SHLHOST_BLOB_PATH", str(tmp_path / "blobs"))
    monkeypatch.setenv("SHLHOST_KEY_ENCRYPTION_KEY", TEST_KEK)
    execs: list[list[str]] = []
    monkeypatch.setattr(os, "execvp", lambda _file, args: execs.append(list(args)))
    return {"url": url, "execs": execs, "instance": tmp_path / "instance"}


def _revision(url: str) -> str | None:
    engine = make_engine(url)
    try:
        return migrate.current(engine)
    finally:
        engine.dispose()


def test_no_migrate_refuses_a_database_behind_the_release(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHLHOST_SECRET_KEY", "shared-secret-of-all-servers")
    result = CliRunner().invoke(cli, ["serve", "--no-migrate"])
    assert result.exit_code == 2, result.output
    assert "run 'shlhost db upgrade' first" in result.output and "0001" in result.output
    assert deployment["execs"] == []  # gunicorn never started
    assert _revision(deployment["url"]) == "0001"  # and nothing was migrated


def test_no_migrate_starts_gunicorn_on_a_current_database(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHLHOST_SECRET_KEY", "shared-secret-of-all-servers")
    engine = make_engine(deployment["url"])
    migrate.upgrade(engine)  # the deploy step, done once
    engine.dispose()
    result = CliRunner().invoke(cli, ["serve", "--no-migrate", "--port", "5999", "--workers", "3"])
    assert result.exit_code == 0, result.output
    (args,) = deployment["execs"]
    assert args[1:4] == ["-m", "gunicorn", "-c"] and args[4].endswith("gunicorn_conf.py")
    assert (
        "127.0.0.1:5999" in args
        and "shlhost.wsgi:app" in args
        and args[args.index("-w") + 1] == "3"
    )


def test_no_migrate_never_writes_secrets_of_its_own(deployment: dict[str, Any]) -> None:
    """A server that made up its own secrets would sign tickets and wrap keys no other
    server can check: without SHLHOST_SECRET_KEY, production refuses to start."""
    engine = make_engine(deployment["url"])
    migrate.upgrade(engine)
    engine.dispose()
    result = CliRunner().invoke(cli, ["serve", "--no-migrate"])
    assert result.exit_code != 0
    assert "SECRET_KEY" in str(result.exception) + result.output
    assert not (deployment["instance"] / "config.py").exists()
    assert deployment["execs"] == []


def test_serve_without_the_flag_still_migrates(
    deployment: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHLHOST_SECRET_KEY", "shared-secret-of-all-servers")
    result = CliRunner().invoke(cli, ["serve"])
    assert result.exit_code == 0, result.output
    assert _revision(deployment["url"]) == migrate.head()
    assert len(deployment["execs"]) == 1
