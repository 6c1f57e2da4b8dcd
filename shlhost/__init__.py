"""shlhost: a SMART Health Links host with a versioned FHIR record store.

``create_app`` is the one place where configuration, storage and blueprints are wired.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from argon2 import PasswordHasher
from flask import Flask
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from shlhost import config as config_mod
from shlhost.crypto.passcodes import hasher
from shlhost.shl.links import LinkSettings, LiveLinkCache
from shlhost.shl.tickets import derive_secret
from shlhost.shl.uses import UseRecorder
from shlhost.storage.blobs import BlobStore, make_blob_store
from shlhost.storage.db import make_engine, make_sessionmaker

__version__ = "0.1.0"


@dataclass
class Runtime:
    """What request handlers and commands need, built once per process."""

    engine: Engine
    sessions: sessionmaker[Session]
    blobs: BlobStore
    links: LinkSettings
    hasher: PasswordHasher
    uses: UseRecorder
    link_cache: LiveLinkCache


def create_app(test_config: dict[str, Any] | None = None) -> Flask:
    instance_path = os.environ.get("SHLHOST_INSTANCE_PATH")
    app = Flask(
        __name__,
        instance_path=os.path.abspath(instance_path) if instance_path else None,
        template_folder="../templates",
        static_folder="../static",
    )
    config_mod.load(app.config, app.instance_path, test_config)
    config_mod.validate_config(app.config)
    app.config["PUBLIC_URL"] = str(app.config["PUBLIC_URL"]).rstrip("/")
    proxies = int(app.config.get("TRUSTED_PROXIES", 0))
    if proxies:
        from werkzeug.middleware.proxy_fix import ProxyFix

        # The client address (rate limits, logs) and scheme as the load balancer saw them.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=proxies, x_proto=proxies)  # type: ignore[method-assign]

    engine = make_engine(app.config["DATABASE_URL"])
    ph = hasher(app.config["ARGON2_PROFILE"])
    app.extensions["shlhost"] = Runtime(
        engine=engine,
        sessions=make_sessionmaker(engine),
        blobs=make_blob_store(app.config, engine),
        links=LinkSettings(
            kek=config_mod.decode_kek(app.config["KEY_ENCRYPTION_KEY"]),
            ticket_secret=derive_secret(app.config["SECRET_KEY"]),
            public_url=app.config["PUBLIC_URL"],
            ticket_lifetime=int(app.config["TICKET_LIFETIME"]),
            passcode_attempts=int(app.config["PASSCODE_ATTEMPTS"]),
            hasher=ph,
            embed_max=int(app.config["EMBED_MAX_BYTES"]),
        ),
        hasher=ph,
        uses=UseRecorder(engine),
        link_cache=LiveLinkCache(),
    )

    from shlhost import logs, metrics
    from shlhost.api import common, dataplane, errors, fhir, management, openapi, pull
    from shlhost.web import pages, patient, receive, security, viewer

    logs.init_app(app)
    metrics.init_app(app)
    common.init_app(app)
    errors.init_app(app)
    dataplane.init_app(app)
    management.init_app(app)
    fhir.init_app(app)
    pull.init_app(app)
    openapi.init_app(app)
    pages.init_app(app)
    viewer.init_app(app)
    patient.init_app(app)
    receive.init_app(app)
    security.init_app(app)
    return app
