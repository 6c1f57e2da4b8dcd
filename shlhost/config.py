"""Configuration: built-in defaults, then ``instance/config.py``, then ``SHLHOST_*`` variables.

Everything that varies between deployments is a key here. ``validate_config`` runs at
start-up and refuses a configuration that would be unsafe or break the protocol.
"""

from __future__ import annotations

import base64
import os
import secrets
from pathlib import Path
from typing import Any

# Built-in secrets exist so that development and the test suite run with no set-up.
# ``validate_config`` refuses them anywhere else.
DEFAULT_SECRET_KEY = "dev-secret-key-not-for-production"
DEFAULT_KEY_ENCRYPTION_KEY = base64.urlsafe_b64encode(b"dev-kek-not-for-production-32by!").decode()

SAFE_ENVS = ("development", "testing")
# Settings read from the environment as they are, never parsed as JSON.
STRING_KEYS = ("SECRET_KEY", "KEY_ENCRYPTION_KEY", "DATABASE_URL", "PUBLIC_URL", "BLOB_PATH", "ENV",
               "BLOB_BACKEND", "S3_BUCKET", "S3_ENDPOINT_URL", "S3_REGION", "S3_PREFIX",
               "RATELIMIT_STORAGE_URI", "RATELIMIT_KEY_PREFIX", "LOG_FORMAT")


class ConfigError(RuntimeError):
    """The configuration cannot be used; the message says what to change."""


def defaults(instance_path: str) -> dict[str, Any]:
    return {
        # "production" (default), "development" or "testing".
        "ENV": "production",
        "SECRET_KEY": DEFAULT_SECRET_KEY,
        # 32 bytes, base64url: wraps every link key the server holds (see docs/security.md).
        "KEY_ENCRYPTION_KEY": DEFAULT_KEY_ENCRYPTION_KEY,
        "DATABASE_URL": "sqlite:///" + os.path.join(instance_path, "shlhost.db"),
        # Blob store: "local" (files under BLOB_PATH), "database" (the blobs table) or "s3".
        "BLOB_BACKEND": "local",
        "BLOB_PATH": os.path.join(instance_path, "blobs"),
        # BLOB_BACKEND = "s3": the bucket, an optional key prefix, and for S3-compatible
        # services other than AWS the endpoint. Credentials: boto3's usual chain (AWS_*
        # environment variables, ~/.aws, an instance role).
        "S3_BUCKET": "",
        "S3_PREFIX": "",
        "S3_ENDPOINT_URL": None,
        "S3_REGION": None,
        # shlhost gc: ciphertext of links expired or revoked longer ago than this is purged.
        "RETENTION_DAYS": 30,
        # Small blobs (the files manifests embed) kept in memory by each process, bytes; 0: none.
        # Blobs are never rewritten in place, so the cache cannot go stale.
        "BLOB_CACHE_BYTES": 32 * 1024 * 1024,
        # shlhost gc: an unreferenced blob younger than this may be an upload in flight.
        "BLOB_GRACE_SECONDS": 3600,
        # "json" (one object per line) or "text"; None: json in production, text otherwise.
        "LOG_FORMAT": None,
        # Prometheus text at /metrics.
        "METRICS_ENABLED": True,
        # The scheme and host that go into links; the link url must stay within 128 chars.
        "PUBLIC_URL": "http://127.0.0.1:5000",
        # Lifetime of a file location ticket, seconds (the spec allows at most one hour).
        "TICKET_LIFETIME": 300,
        # Lifetime budget of wrong passcodes per link.
        "PASSCODE_ATTEMPTS": 5,
        # Largest request body accepted, bytes.
        "MAX_CONTENT_LENGTH": 256 * 1024 * 1024,
        # Largest JWE embedded in a manifest, bytes, whatever embeddedLengthMax a client asks:
        # a larger file always goes by location (streamed), so no answer holds it in memory.
        "EMBED_MAX_BYTES": 4 * 1024 * 1024,
        # "default" (argon2-cffi's RFC 9106 low-memory profile) or "cheapest" (tests only).
        "ARGON2_PROFILE": "default",
        # flask-limiter storage: "memory://" or "redis://127.0.0.1:6379".
        "RATELIMIT_STORAGE_URI": "memory://",
        "RATELIMIT_MANIFEST": "60 per minute",
        "RATELIMIT_ENABLED": True,
        # Prefix of flask-limiter's keys in a shared store (several deployments, one Redis).
        "RATELIMIT_KEY_PREFIX": "shlhost",
        # Redis down: limit in each process's memory meanwhile rather than answer 500 (the
        # passcode budget and uses live in the database and stay exact either way).
        "RATELIMIT_IN_MEMORY_FALLBACK_ENABLED": True,
        # How many proxies (load balancers) in front of the app append to X-Forwarded-For.
        # 0: the client is the TCP peer. Behind one load balancer: 1, so that rate limits and
        # logs see the real client rather than the balancer (werkzeug's ProxyFix).
        "TRUSTED_PROXIES": 0,
        # Largest record a JWE may inflate to when it carries zip:DEF, bytes.
        "MAX_INFLATED_SIZE": 512 * 1024 * 1024,
        # shlhost pull / POST /api/pull: never ask one remote link again sooner than this,
        # seconds (``--force`` on the command ignores it).
        "PULL_MIN_INTERVAL": 60,
        # Who a pull says is asking (the manifest's ``recipient``).
        "PULL_RECIPIENT": "shlhost",
        # POST /api/pull fetches what users name: only from public addresses unless true.
        "PULL_ALLOW_PRIVATE": False,
    }


def load(app_config: dict[str, Any], instance_path: str, overrides: dict[str, Any] | None) -> None:
    """Fill ``app_config`` (a Flask config) in the documented order."""
    app_config.update(defaults(instance_path))
    cfg_file = Path(instance_path) / "config.py"
    if cfg_file.is_file():
        app_config.from_pyfile(str(cfg_file))  # type: ignore[attr-defined]
    app_config.from_prefixed_env("SHLHOST")  # type: ignore[attr-defined]
    # from_prefixed_env parses values as JSON: an all-digit secret would become a number.
    for key in STRING_KEYS:
        raw = os.environ.get(f"SHLHOST_{key}")
        if raw is not None:
            app_config[key] = raw
    if overrides:
        app_config.update(overrides)


def validate_config(config: dict[str, Any]) -> None:
    env = config["ENV"]
    if env not in ("production", *SAFE_ENVS):
        raise ConfigError(f"ENV must be production, development or testing, not {env!r}")
    if env not in SAFE_ENVS:
        if config["SECRET_KEY"] == DEFAULT_SECRET_KEY:
            raise ConfigError(
                "SECRET_KEY is the built-in development secret. Set SHLHOST_SECRET_KEY or run "
                "'shlhost init' to write fresh secrets into instance/config.py."
            )
        if config["KEY_ENCRYPTION_KEY"] == DEFAULT_KEY_ENCRYPTION_KEY:
            raise ConfigError(
                "KEY_ENCRYPTION_KEY is the built-in development key. Set "
                "SHLHOST_KEY_ENCRYPTION_KEY or run 'shlhost init'."
            )
    for key in ("SECRET_KEY", "KEY_ENCRYPTION_KEY"):
        if not isinstance(config[key], str) or not config[key]:
            raise ConfigError(f"{key} must be a non-empty string")
    kek = decode_kek(config["KEY_ENCRYPTION_KEY"])
    if len(kek) != 32:
        raise ConfigError("KEY_ENCRYPTION_KEY must be 32 bytes, base64url-encoded")
    public = str(config["PUBLIC_URL"]).rstrip("/")
    if not public.startswith(("http://", "https://")):
        raise ConfigError("PUBLIC_URL must start with http:// or https://")
    # url = PUBLIC_URL + "/shl/" + 43-character id; the spec caps it at 128 characters.
    if len(public) + 5 + 43 > 128:
        raise ConfigError("PUBLIC_URL is too long: link urls must stay within 128 characters")
    lifetime = int(config["TICKET_LIFETIME"])
    if not 1 <= lifetime <= 3600:
        raise ConfigError("TICKET_LIFETIME must be between 1 and 3600 seconds")
    if int(config["PASSCODE_ATTEMPTS"]) < 1:
        raise ConfigError("PASSCODE_ATTEMPTS must be at least 1")
    if config["BLOB_BACKEND"] not in ("local", "database", "s3"):
        raise ConfigError("BLOB_BACKEND must be local, database or s3")
    if config["BLOB_BACKEND"] == "s3" and not config.get("S3_BUCKET"):
        raise ConfigError("S3_BUCKET must be set when BLOB_BACKEND is s3")
    if int(config.get("RETENTION_DAYS", 30)) < 0:
        raise ConfigError("RETENTION_DAYS must be zero or more")
    if int(config.get("BLOB_GRACE_SECONDS", 3600)) < 0:
        raise ConfigError("BLOB_GRACE_SECONDS must be zero or more")
    if int(config.get("TRUSTED_PROXIES", 0)) < 0:
        raise ConfigError("TRUSTED_PROXIES must be zero or more")
    if config.get("LOG_FORMAT") not in (None, "", "json", "text"):
        raise ConfigError("LOG_FORMAT must be json or text")
    if config["ARGON2_PROFILE"] not in ("default", "cheapest"):
        raise ConfigError("ARGON2_PROFILE must be default or cheapest")


def decode_kek(value: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
    except (ValueError, TypeError) as exc:
        raise ConfigError("KEY_ENCRYPTION_KEY is not valid base64url") from exc


def write_instance_config(instance_path: str) -> Path | None:
    """Write ``instance/config.py`` with fresh secrets unless it exists. Returns the path written."""
    path = Path(instance_path) / "config.py"
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    kek = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("=")
    body = (
        "# Written by 'shlhost init'. Keep this file secret and back it up with the database.\n"
        f"SECRET_KEY = {secrets.token_urlsafe(48)!r}\n"
        f"KEY_ENCRYPTION_KEY = {kek!r}\n"
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
    return path
