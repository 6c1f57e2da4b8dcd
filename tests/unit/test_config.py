"""Configuration: defaults < instance/config.py < SHLHOST_* variables < create_app(test_config).

``validate_config`` refuses built-in secrets outside development and testing, and values
that would break the protocol.
"""

from __future__ import annotations

import os
import runpy
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask

from shlhost import create_app
from shlhost.config import (
    DEFAULT_KEY_ENCRYPTION_KEY,
    DEFAULT_SECRET_KEY,
    ConfigError,
    decode_kek,
    defaults,
    validate_config,
    write_instance_config,
)
from tests.conftest import TEST_KEK


@pytest.fixture
def instance(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty instance folder of our own, and no SHLHOST_* variables from the caller's shell."""
    for name in list(os.environ):
        if name.startswith("SHLHOST_"):
            monkeypatch.delenv(name)
    path = tmp_path / "instance"
    path.mkdir()
    monkeypatch.setenv("SHLHOST_INSTANCE_PATH", str(path))
    return path


@pytest.fixture
def db_url(tmp_path: Path) -> str:
    return "sqlite:///" + str(tmp_path / "shlhost.db")


@pytest.fixture
def build(db_url: str) -> Iterator[Any]:
    """create_app with a throw-away SQLite file; every engine made is disposed afterwards."""
    apps: list[Flask] = []

    def _build(**config: Any) -> Flask:
        app = create_app({"DATABASE_URL": db_url, **config})
        apps.append(app)
        return app

    yield _build
    for app in apps:
        app.extensions["shlhost"].engine.dispose()


def config_with(tmp_path: Path, **overrides: Any) -> dict[str, Any]:
    cfg = defaults(str(tmp_path))
    cfg.update({"SECRET_KEY": "a-real-secret", "KEY_ENCRYPTION_KEY": TEST_KEK})
    cfg.update(overrides)
    return cfg


# --- built-in secrets ------------------------------------------------------------------------


def test_production_with_default_secret_key_is_refused(instance: Path, build: Any) -> None:
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        build(ENV="production")


def test_production_is_the_default_env(instance: Path, build: Any) -> None:
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        build()


def test_production_with_default_kek_is_refused(instance: Path, build: Any) -> None:
    with pytest.raises(ConfigError, match="KEY_ENCRYPTION_KEY"):
        build(ENV="production", SECRET_KEY="a-real-secret")


def test_production_with_own_secrets_starts(instance: Path, build: Any) -> None:
    app = build(ENV="production", SECRET_KEY="a-real-secret", KEY_ENCRYPTION_KEY=TEST_KEK)
    assert app.config["ENV"] == "production"
    assert app.extensions["shlhost"].links.kek == decode_kek(TEST_KEK)


@pytest.mark.parametrize("env", ["testing", "development"])
def test_safe_envs_accept_the_built_in_secrets(instance: Path, build: Any, env: str) -> None:
    app = build(ENV=env)
    assert app.config["SECRET_KEY"] == DEFAULT_SECRET_KEY
    assert app.config["KEY_ENCRYPTION_KEY"] == DEFAULT_KEY_ENCRYPTION_KEY
    assert len(app.extensions["shlhost"].links.kek) == 32


@pytest.mark.parametrize("env", ["prod", "Production", "", "staging", "test"])
def test_bad_env_is_refused(instance: Path, build: Any, env: str) -> None:
    with pytest.raises(ConfigError, match="ENV"):
        build(ENV=env, SECRET_KEY="a-real-secret", KEY_ENCRYPTION_KEY=TEST_KEK)


def test_validate_config_directly(tmp_path: Path) -> None:
    validate_config(config_with(tmp_path))
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        validate_config(config_with(tmp_path, SECRET_KEY=DEFAULT_SECRET_KEY))
    with pytest.raises(ConfigError, match="KEY_ENCRYPTION_KEY"):
        validate_config(config_with(tmp_path, KEY_ENCRYPTION_KEY=DEFAULT_KEY_ENCRYPTION_KEY))
    validate_config(config_with(tmp_path, ENV="testing", SECRET_KEY=DEFAULT_SECRET_KEY,
                                KEY_ENCRYPTION_KEY=DEFAULT_KEY_ENCRYPTION_KEY))


@pytest.mark.parametrize("kek", ["c2hvcnQ", "dGVzdC1rZWstMzItYnl0ZXMtLS0tLS0tLS0tLS0tLS0tLS0tLQ"])
def test_kek_must_be_32_bytes(tmp_path: Path, kek: str) -> None:
    with pytest.raises(ConfigError, match="KEY_ENCRYPTION_KEY"):
        validate_config(config_with(tmp_path, KEY_ENCRYPTION_KEY=kek))


# --- protocol limits ---------------------------------------------------------------------


def test_public_url_at_the_128_character_limit(instance: Path, build: Any) -> None:
    public = "https://" + "a" * (128 - 48 - 8)  # url = PUBLIC_URL + "/shl/" + 43 characters
    app = build(ENV="testing", PUBLIC_URL=public + "/")
    links = app.extensions["shlhost"].links
    assert links.public_url == public
    assert len(links.link_url("A" * 43)) == 128


def test_public_url_making_the_link_url_too_long_is_refused(instance: Path, build: Any, tmp_path: Path) -> None:
    public = "https://" + "a" * (128 - 48 - 8 + 1)
    with pytest.raises(ConfigError, match="PUBLIC_URL"):
        build(ENV="testing", PUBLIC_URL=public)
    with pytest.raises(ConfigError, match="PUBLIC_URL"):
        validate_config(config_with(tmp_path, PUBLIC_URL=public + "/"))


@pytest.mark.parametrize("public", ["example.org", "ftp://example.org", "//example.org"])
def test_public_url_needs_http_scheme(tmp_path: Path, public: str) -> None:
    with pytest.raises(ConfigError, match="PUBLIC_URL"):
        validate_config(config_with(tmp_path, PUBLIC_URL=public))


@pytest.mark.parametrize("lifetime", [3601, 0, -1, 86400])
def test_ticket_lifetime_out_of_range_is_refused(instance: Path, build: Any, lifetime: int) -> None:
    with pytest.raises(ConfigError, match="TICKET_LIFETIME"):
        build(ENV="testing", TICKET_LIFETIME=lifetime)


@pytest.mark.parametrize("lifetime", [1, 300, 3600])
def test_ticket_lifetime_in_range(instance: Path, build: Any, lifetime: int) -> None:
    app = build(ENV="testing", TICKET_LIFETIME=lifetime)
    assert app.extensions["shlhost"].links.ticket_lifetime == lifetime


@pytest.mark.parametrize(
    ("key", "value"),
    [("PASSCODE_ATTEMPTS", 0), ("BLOB_BACKEND", "ftp"), ("ARGON2_PROFILE", "weak")],
)
def test_other_invalid_values_are_refused(tmp_path: Path, key: str, value: Any) -> None:
    with pytest.raises(ConfigError, match=key):
        validate_config(config_with(tmp_path, **{key: value}))


# --- precedence ----------------------------------------------------------------------------


def test_environment_overrides_instance_file_which_overrides_defaults(
    instance: Path, build: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    (instance / "config.py").write_text(
        "TICKET_LIFETIME = 600\n"
        "PASSCODE_ATTEMPTS = 7\n"
        "PUBLIC_URL = 'https://file.example'\n"
        "RATELIMIT_MANIFEST = '5 per minute'\n"
    )
    monkeypatch.setenv("SHLHOST_TICKET_LIFETIME", "900")
    monkeypatch.setenv("SHLHOST_PUBLIC_URL", "https://env.example")
    app = build(ENV="testing")
    base = defaults(str(instance))

    assert app.config["TICKET_LIFETIME"] == 900  # env beats file, parsed as a number
    assert app.config["PUBLIC_URL"] == "https://env.example"  # env beats file
    assert app.config["PASSCODE_ATTEMPTS"] == 7  # file beats default
    assert app.config["RATELIMIT_MANIFEST"] == "5 per minute"  # file beats default
    assert app.config["MAX_CONTENT_LENGTH"] == base["MAX_CONTENT_LENGTH"]  # default
    assert app.config["BLOB_PATH"] == str(instance / "blobs")  # default, under the instance

    links = app.extensions["shlhost"].links
    assert links.ticket_lifetime == 900
    assert links.passcode_attempts == 7
    assert links.link_url("x") == "https://env.example/shl/x"


def test_instance_file_alone_overrides_defaults(instance: Path, build: Any) -> None:
    (instance / "config.py").write_text("TICKET_LIFETIME = 600\n")
    assert build(ENV="testing").config["TICKET_LIFETIME"] == 600


def test_defaults_without_file_or_environment(instance: Path, build: Any) -> None:
    app = build(ENV="testing")
    assert app.config["TICKET_LIFETIME"] == 300
    assert app.config["PASSCODE_ATTEMPTS"] == 5
    assert app.config["PUBLIC_URL"] == "http://127.0.0.1:5000"


def test_test_config_overrides_environment(instance: Path, build: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    (instance / "config.py").write_text("TICKET_LIFETIME = 600\n")
    monkeypatch.setenv("SHLHOST_TICKET_LIFETIME", "900")
    assert build(ENV="testing", TICKET_LIFETIME=60).config["TICKET_LIFETIME"] == 60


def test_secrets_from_environment_satisfy_production(
    instance: Path, build: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHLHOST_SECRET_KEY", "env-secret-key-for-this-test")
    monkeypatch.setenv("SHLHOST_KEY_ENCRYPTION_KEY", TEST_KEK)
    app = build()
    assert app.config["ENV"] == "production"
    assert app.config["SECRET_KEY"] == "env-secret-key-for-this-test"


def test_env_set_by_environment_variable(instance: Path, build: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHLHOST_ENV", "production")
    (instance / "config.py").write_text("ENV = 'testing'\n")
    with pytest.raises(ConfigError, match="SECRET_KEY"):
        build()


# --- shlhost init ------------------------------------------------------------------------------


def test_write_instance_config(tmp_path: Path) -> None:
    folder = tmp_path / "new" / "instance"
    path = write_instance_config(str(folder))
    assert path == folder / "config.py"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600

    values = runpy.run_path(str(path))
    secret, kek = values["SECRET_KEY"], values["KEY_ENCRYPTION_KEY"]
    assert isinstance(secret, str) and len(secret) >= 43 and secret != DEFAULT_SECRET_KEY
    assert kek != DEFAULT_KEY_ENCRYPTION_KEY
    assert len(decode_kek(kek)) == 32


def test_write_instance_config_makes_fresh_secrets(tmp_path: Path) -> None:
    a = runpy.run_path(str(write_instance_config(str(tmp_path / "a"))))
    b = runpy.run_path(str(write_instance_config(str(tmp_path / "b"))))
    assert a["SECRET_KEY"] != b["SECRET_KEY"]
    assert a["KEY_ENCRYPTION_KEY"] != b["KEY_ENCRYPTION_KEY"]


def test_write_instance_config_never_overwrites(tmp_path: Path) -> None:
    first = write_instance_config(str(tmp_path))
    assert first is not None
    before = first.read_bytes()
    assert write_instance_config(str(tmp_path)) is None
    assert first.read_bytes() == before

    other = tmp_path / "hand"
    other.mkdir()
    (other / "config.py").write_text("SECRET_KEY = 'mine'\n")
    assert write_instance_config(str(other)) is None
    assert (other / "config.py").read_text() == "SECRET_KEY = 'mine'\n"


def test_written_instance_config_satisfies_production(instance: Path, build: Any) -> None:
    assert write_instance_config(str(instance)) is not None
    app = build()
    assert app.config["ENV"] == "production"
    assert app.config["SECRET_KEY"] != DEFAULT_SECRET_KEY
    assert app.config["KEY_ENCRYPTION_KEY"] != DEFAULT_KEY_ENCRYPTION_KEY


def test_all_digit_secret_key_from_environment_is_a_string_or_a_config_error(
    instance: Path, build: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SHLHOST_SECRET_KEY", "123456789012345678901234567890")
    monkeypatch.setenv("SHLHOST_KEY_ENCRYPTION_KEY", TEST_KEK)
    try:
        app = build()
    except ConfigError:
        return
    assert app.config["SECRET_KEY"] == "123456789012345678901234567890"
