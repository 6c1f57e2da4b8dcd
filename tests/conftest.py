"""Shared fixtures: ``app``, ``client``, ``runner`` and a real ``live_server``.

The database comes from ``SHLHOST_TEST_DATABASE_URL`` (PostgreSQL in CI's second run) or
is a fresh SQLite file. On PostgreSQL each test session gets its own schema, migrated with
the real Alembic migrations once. Tests make their own links (ids are random), so they
never see each other's data and need no cleanup between them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from flask import Flask
from flask.testing import FlaskClient, FlaskCliRunner
from sqlalchemy import create_engine, text

from shlhost import create_app
from shlhost.storage import migrate
from shlhost.storage.db import make_engine, normalise_url

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
FIXTURES = SHARED / "fixtures" / "phr-ig"
DATA = Path(__file__).with_name("data")
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

TEST_KEK = "dGVzdC1rZWstMzItYnl0ZXMtLS0tLS0tLS0tLS0tLS0"  # 32 bytes, base64url


def require(condition: bool, reason: str) -> None:
    """Skip with a reason on a laptop; fail in CI, where everything must be present."""
    if not condition:
        if IN_CI:
            pytest.fail(f"required in CI: {reason}")
        pytest.skip(reason)


def fixture_path(name: str) -> Path:
    path = FIXTURES / name
    require(path.is_file(), f"the PHR IG fixtures are not at {FIXTURES} (../shared is absent)")
    return path


def _pg_reachable(url: str) -> bool:
    try:
        engine = create_engine(normalise_url(url))
        with engine.connect():
            pass
        engine.dispose()
        return True
    except Exception:  # noqa: BLE001 - any failure means "not reachable"
        return False


def _with_search_path(url: str, schema: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}options=-csearch_path%3D{schema}"


@contextmanager
def _migrated_schema(base: str) -> Iterator[str]:
    """A fresh PostgreSQL schema, migrated, as a URL whose search_path points at it; dropped after."""
    schema = f"shlhost_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    try:
        url = _with_search_path(base, schema)
        engine = make_engine(url)
        migrate.upgrade(engine)
        engine.dispose()
        yield url
    finally:
        with admin.begin() as conn:
            conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
        admin.dispose()


@pytest.fixture(scope="session")
def database_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    base = os.environ.get("SHLHOST_TEST_DATABASE_URL")
    if not base:
        url = "sqlite:///" + str(tmp_path_factory.mktemp("db") / "shlhost.db")
        migrate.upgrade(make_engine(url))
        yield url
        return
    base = normalise_url(base)
    if not _pg_reachable(base):
        if IN_CI:
            raise RuntimeError(f"CI: the test database {base} is not reachable")
        pytest.skip(f"SHLHOST_TEST_DATABASE_URL is set but {base} is not reachable")
    with _migrated_schema(base) as url:
        yield url


@pytest.fixture(scope="session")
def second_database_url(database_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Another empty, migrated database on the same backend: a second shlhost instance."""
    if database_url.startswith("sqlite"):
        url = "sqlite:///" + str(tmp_path_factory.mktemp("db2") / "shlhost.db")
        migrate.upgrade(make_engine(url))
        yield url
        return
    with _migrated_schema(normalise_url(os.environ["SHLHOST_TEST_DATABASE_URL"])) as url:
        yield url


@pytest.fixture(scope="session")
def blob_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("blobs")


@pytest.fixture(scope="session")
def base_config(database_url: str, blob_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return {
        "ENV": "testing",
        "SECRET_KEY": "test-secret-key",
        "KEY_ENCRYPTION_KEY": TEST_KEK,
        "DATABASE_URL": database_url,
        "BLOB_PATH": str(blob_root),
        "PUBLIC_URL": "http://localhost",
        "ARGON2_PROFILE": "cheapest",
        "MAX_CONTENT_LENGTH": 8 * 1024 * 1024,
        "RATELIMIT_MANIFEST": "1000 per minute",
    }


@pytest.fixture(autouse=True)
def _isolated_instance(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Never read or write the developer's own instance/ folder from a test."""
    monkeypatch.setenv("SHLHOST_INSTANCE_PATH", str(tmp_path_factory.getbasetemp() / "instance"))


def make_app(base_config: dict[str, Any], **overrides: Any) -> Flask:
    return create_app({**base_config, **overrides})


@pytest.fixture
def app(base_config: dict[str, Any]) -> Iterator[Flask]:
    application = make_app(base_config)
    yield application
    application.extensions["shlhost"].engine.dispose()


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture
def runner(app: Flask) -> FlaskCliRunner:
    return app.test_cli_runner()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LiveServer:
    """A real gunicorn process (several workers, several threads each) on a free port.

    ``config`` becomes ``SHLHOST_*`` variables (``PUBLIC_URL`` is the server's own url unless
    ``public_url`` says otherwise); ``env`` adds other variables (AWS credentials,
    ``PROMETHEUS_MULTIPROC_DIR``). Several servers may share one database: that is how the
    scale-out tests run. Usable as a context manager.
    """

    def __init__(self, config: dict[str, Any], workers: int = 2, threads: int = 8,
                 env: dict[str, str] | None = None, public_url: str | None = None) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, **(env or {})}
        for key, value in {**config, "PUBLIC_URL": public_url or self.url}.items():
            if value is not None:
                env[f"SHLHOST_{key}"] = str(value)
        self.log = open(Path(config["BLOB_PATH"]).parent / f"gunicorn-{self.port}.log", "w+")  # noqa: SIM115
        conf = ROOT / "shlhost" / "gunicorn_conf.py"
        self.proc = subprocess.Popen(  # noqa: S603 - fixed arguments
            [sys.executable, "-m", "gunicorn", "-c", str(conf), "-b", f"127.0.0.1:{self.port}",
             "-w", str(workers), "--threads", str(threads), "shlhost.wsgi:app"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, cwd=ROOT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                output = self.output()
                self.log.close()
                raise RuntimeError(f"gunicorn exited early:\n{output}")
            try:
                # Ready once every worker has loaded the app (gunicorn_conf.py says so).
                if (
                    requests.get(self.url + "/readyz", timeout=1).status_code == 200
                    # read through a file of its own: output() moves the offset gunicorn
                    # writes at
                    and Path(self.log.name).read_text().count("Worker ready (pid:") >= workers
                ):
                    return
            except requests.RequestException:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"gunicorn did not become ready:\n{self.output()}")

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if not self.log.closed:
            self.log.close()

    def __enter__(self) -> LiveServer:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


@pytest.fixture(scope="session")
def live_server(base_config: dict[str, Any]) -> Iterator[LiveServer]:
    server = LiveServer(base_config)
    yield server
    server.stop()


# --- a real S3 API server (moto's server mode) -------------------------------------------

S3_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "shlhost-test",
    "AWS_SECRET_ACCESS_KEY": "shlhost-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Never read a developer's own ~/.aws in a test.
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
}


class S3Server:
    """``python -m moto.server`` on a free loopback port: a separate process speaking the
    S3 REST API, so boto3 goes through real HTTP exactly as it would against AWS."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.log = open(log_dir / f"moto-{self.port}.log", "w+")  # noqa: SIM115
        self.proc = subprocess.Popen(  # noqa: S603 - fixed arguments
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            env={**os.environ, **S3_CREDENTIALS}, stdout=self.log, stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            try:
                requests.get(self.endpoint + "/", timeout=1)
                return
            except requests.RequestException:
                time.sleep(0.1)
        self.stop()
        self.log.seek(0)
        raise RuntimeError(f"moto server did not start:\n{self.log.read()}")

    def client(self) -> Any:
        import boto3

        return boto3.session.Session(
            aws_access_key_id=S3_CREDENTIALS["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=S3_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
            region_name=S3_CREDENTIALS["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint)

    def new_bucket(self) -> str:
        name = f"shlhost-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """The S3 server, and the AWS_* variables that point boto3 at its fake credentials."""
    pytest.importorskip("moto.server", reason="install the test extra: pip install -e '.[test]'")
    server = S3Server(tmp_path_factory.mktemp("moto"))
    with pytest.MonkeyPatch.context() as mp:
        for name, value in S3_CREDENTIALS.items():
            mp.setenv(name, value)
        yield server
    server.stop()


@pytest.fixture
def s3_config(s3_server: S3Server) -> dict[str, Any]:
    """Configuration keys for BLOB_BACKEND = "s3" on a fresh bucket of the test server."""
    return {"BLOB_BACKEND": "s3", "S3_BUCKET": s3_server.new_bucket(), "S3_ENDPOINT_URL": s3_server.endpoint,
            "S3_REGION": "us-east-1", "S3_PREFIX": "shlhost/"}

