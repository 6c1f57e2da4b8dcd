"""End to end through the HTTP API with ``BLOB_BACKEND`` = ``s3`` (a real S3 API server) and
``database``: create, resolve (embedded and location), change an L link's files, revoke, and
check where the ciphertext really is. Then ``/readyz`` for each backend, up and down."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from flask import Flask
from sqlalchemy import select

from shlhost.storage.blobs import DatabaseBlobStore, S3BlobStore
from shlhost.storage.models import Blob
from tests.conftest import S3Server, free_port, make_app
from tests.functional.conftest import Api
from tests.helpers import independent_decrypt, minimal_bundle


class Backend:
    """The app under test and a way to see, beside shlhost, which blob keys exist."""

    def __init__(self, name: str, app: Flask, s3: S3Server | None = None) -> None:
        self.name, self.app, self.s3 = name, app, s3
        blobs = app.extensions["shlhost"].blobs
        self.store = getattr(blobs, "inner", blobs)  # the backend behind the memory cache

    def keys(self, link_id: str) -> set[str]:
        prefix = f"links/{link_id}/"
        if isinstance(self.store, S3BlobStore):
            assert self.s3 is not None
            raw = self.s3.client().list_objects_v2(
                Bucket=self.store.bucket, Prefix="shlhost/" + prefix
            )
            return {obj["Key"].removeprefix("shlhost/") for obj in raw.get("Contents", [])}
        assert isinstance(self.store, DatabaseBlobStore)
        with self.store.engine.connect() as conn:
            return set(conn.scalars(select(Blob.key).where(Blob.key.startswith(prefix))))


@pytest.fixture(params=["s3", "database"])
def backend(request: pytest.FixtureRequest, base_config: dict[str, Any]) -> Iterator[Backend]:
    if request.param == "s3":
        app = make_app(base_config, **request.getfixturevalue("s3_config"))
        found = Backend("s3", app, request.getfixturevalue("s3_server"))
    else:
        found = Backend("database", make_app(base_config, BLOB_BACKEND="database"))
    yield found
    found.app.extensions["shlhost"].engine.dispose()


@pytest.fixture
def api_b(backend: Backend) -> Api:
    return Api(backend.app.test_client())


def _decrypt(api: Api, created: dict[str, Any], jwe: str) -> dict[str, Any]:
    _header, plain = independent_decrypt(jwe, api.key(created))
    body: dict[str, Any] = json.loads(plain)
    return body


def test_create_and_resolve(backend: Backend, api_b: Api, blob_root: Path) -> None:
    created = api_b.create(minimal_bundle("Ada Lovelace"), passcode="4711", label="backend test")
    link_id = created["id"]
    keys = backend.keys(link_id)
    assert len(keys) == 1, keys
    # Nothing went to the local folder: the ciphertext lives only in the configured backend.
    assert not (blob_root / "links" / link_id).exists()
    jwe_in_store = backend.store.get(next(iter(keys))).decode()

    assert api_b.manifest(created, passcode="0000").status_code == 401
    r = api_b.manifest(created, passcode="4711", embeddedLengthMax=10**6)
    assert r.status_code == 200, r.get_json()
    embedded = r.get_json()["files"][0]["embedded"]
    assert embedded == jwe_in_store
    assert (
        _decrypt(api_b, created, embedded)["entry"][0]["resource"]["name"][0]["family"]
        == "Lovelace"
    )

    r = api_b.manifest(created, passcode="4711")
    location = r.get_json()["files"][0]["location"]
    fetched = api_b.client.get(api_b.path(location))
    assert fetched.status_code == 200 and fetched.mimetype == "application/jose"
    assert fetched.get_data(as_text=True) == jwe_in_store

    assert (
        api_b.client.delete(f"/api/links/{link_id}", headers=api_b.auth(created)).status_code == 204
    )
    assert backend.keys(link_id) == set()
    assert api_b.manifest(created, passcode="4711").status_code == 404
    assert api_b.client.get(api_b.path(location)).status_code == 404


def test_u_link(backend: Backend, api_b: Api) -> None:
    created = api_b.create(flags="U")
    r = api_b.client.get(f"/shl/{created['id']}?recipient=Dr%20U")
    assert r.status_code == 200
    assert _decrypt(api_b, created, r.get_data(as_text=True))["resourceType"] == "Bundle"


def test_l_link_files_change_in_the_backend(backend: Backend, api_b: Api) -> None:
    created = api_b.create(minimal_bundle("Ada One"), flags="L")
    link_id, auth = created["id"], api_b.auth(created)
    first = backend.keys(link_id)

    body = {
        "files": [{"contentType": "application/fhir+json", "content": minimal_bundle("Ada Two")}]
    }
    r = api_b.client.post(f"/api/links/{link_id}/files", json=body, headers=auth)
    assert r.status_code == 201, r.get_json()
    files = r.get_json()["files"]
    assert len(files) == 2
    second = backend.keys(link_id)
    assert len(second) == 2 and first < second

    body = {
        "files": [{"contentType": "application/fhir+json", "content": minimal_bundle("Ada Three")}]
    }
    r = api_b.client.put(f"/api/links/{link_id}/files/{files[0]['id']}", json=body, headers=auth)
    assert r.status_code == 200, r.get_json()
    third = backend.keys(link_id)
    assert len(third) == 2 and not (first & third)  # the replaced ciphertext is gone

    r = api_b.manifest(created, embeddedLengthMax=10**6)
    names = [
        _decrypt(api_b, created, f["embedded"])["entry"][0]["resource"]["name"][0]["given"][0]
        + " "
        + _decrypt(api_b, created, f["embedded"])["entry"][0]["resource"]["name"][0]["family"]
        for f in r.get_json()["files"]
    ]
    assert names == ["Ada Three", "Ada Two"]

    r = api_b.client.delete(f"/api/links/{link_id}/files/{files[1]['id']}", headers=auth)
    assert r.status_code == 204
    assert len(backend.keys(link_id)) == 1


# --- /readyz ----------------------------------------------------------------------------------


def test_readyz_with_each_backend(backend: Backend) -> None:
    r = backend.app.test_client().get("/readyz")
    assert r.status_code == 200 and r.get_json() == {"status": "ready"}


def _readyz(app: Flask) -> Any:
    try:
        return app.test_client().get("/readyz")
    finally:
        app.extensions["shlhost"].engine.dispose()


def test_readyz_503_when_s3_is_unreachable(
    base_config: dict[str, Any], s3_config: dict[str, Any]
) -> None:
    app = make_app(
        base_config, **{**s3_config, "S3_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    )
    r = _readyz(app)
    assert r.status_code == 503
    assert set(r.get_json()["problems"]) == {"blobs"}


def test_readyz_503_when_the_bucket_is_missing(
    base_config: dict[str, Any], s3_config: dict[str, Any]
) -> None:
    r = _readyz(make_app(base_config, **{**s3_config, "S3_BUCKET": "no-such-bucket"}))
    assert r.status_code == 503
    assert set(r.get_json()["problems"]) == {"blobs"}


def test_readyz_503_when_the_database_is_unreachable(base_config: dict[str, Any]) -> None:
    r = _readyz(
        make_app(base_config, DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/none")
    )
    assert r.status_code == 503
    assert set(r.get_json()["problems"]) == {"database"}


def test_readyz_503_for_database_blobs_when_the_database_is_unreachable(
    base_config: dict[str, Any],
) -> None:
    r = _readyz(
        make_app(
            base_config,
            BLOB_BACKEND="database",
            DATABASE_URL=f"postgresql://nobody@127.0.0.1:{free_port()}/none",
        )
    )
    assert r.status_code == 503
    assert set(r.get_json()["problems"]) == {"database", "blobs"}


def test_readyz_503_when_the_blobs_table_is_missing(
    base_config: dict[str, Any], tmp_path: Path
) -> None:
    """A database that was never migrated: reachable, but the blob store cannot work."""
    r = _readyz(
        make_app(
            base_config,
            BLOB_BACKEND="database",
            DATABASE_URL="sqlite:///" + str(tmp_path / "unmigrated.db"),
        )
    )
    assert r.status_code == 503
    assert set(r.get_json()["problems"]) == {"blobs"}


def test_create_with_an_api_token(backend: Backend, api_b: Api) -> None:
    """The token lookup reads the database before the upload writes its blob: on SQLite
    the database blob store must not wait on the request's own read transaction."""
    import os
    from datetime import UTC, datetime

    from shlhost import accounts

    rt = backend.app.extensions["shlhost"]
    with rt.sessions() as session:
        email = f"blob-{os.urandom(4).hex()}@example.org"
        account = accounts.create_account(
            session, rt.hasher, email, "a long password", now=datetime.now(UTC)
        )
        token = accounts.create_token(session, account, now=datetime.now(UTC))
    body = {"files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}]}
    r = api_b.client.post("/api/links", json=body, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.get_json()
    assert len(backend.keys(r.get_json()["id"])) == 1
