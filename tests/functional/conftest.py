"""Helpers for tests that drive the app through its HTTP interface (Flask's test client)."""

from __future__ import annotations

import io
import uuid
from typing import Any
from urllib.parse import urlsplit

import pytest
from flask.testing import FlaskClient
from werkzeug.datastructures import FileStorage, MultiDict
from werkzeug.test import encode_multipart

from tests.helpers import decode_link, minimal_bundle


class Api:
    """Thin wrapper: create links and call the data plane like a client would."""

    def __init__(self, client: FlaskClient) -> None:
        self.client = client

    def create(self, content: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
        body = {"files": [{"contentType": "application/fhir+json", "content": content or minimal_bundle()}], **options}
        r = self.client.post("/api/links", json=body)
        assert r.status_code == 201, r.get_json()
        data: dict[str, Any] = r.get_json()
        return data

    @staticmethod
    def path(url: str) -> str:
        parts = urlsplit(url)
        return parts.path + (f"?{parts.query}" if parts.query else "")

    def manifest(self, created: dict[str, Any], **body: Any) -> Any:
        body.setdefault("recipient", "Dr Test")
        return self.client.post(f"/shl/{created['id']}", json=body)

    def upload(self, files: list[tuple[str, bytes]], path: str = "/api/links", method: str = "post",
               headers: dict[str, str] | None = None, **form: str) -> Any:
        """A multipart upload, encoded in memory (werkzeug's test client would spool big
        bodies to a temporary file it never closes)."""
        fields: list[tuple[str, Any]] = [
            ("file", FileStorage(io.BytesIO(data), filename=name)) for name, data in files
        ]
        fields += list(form.items())
        boundary, body = encode_multipart(MultiDict(fields))
        return getattr(self.client, method)(
            path, data=body, content_type=f"multipart/form-data; boundary={boundary}", headers=headers or {}
        )

    def auth(self, created: dict[str, Any]) -> dict[str, str]:
        return {"Authorization": f"Bearer {created['management_token']}"}

    def get(self, created: dict[str, Any]) -> Any:
        return self.client.get(f"/api/links/{created['id']}", headers=self.auth(created))

    def patch(self, created: dict[str, Any], **changes: Any) -> Any:
        return self.client.patch(f"/api/links/{created['id']}", json=changes, headers=self.auth(created))

    def key(self, created: dict[str, Any]) -> str:
        key: str = decode_link(created["shlink"])["key"]
        return key


@pytest.fixture
def api(client: FlaskClient) -> Api:
    return Api(client)


class Fhir:
    """An account with an API token, talking to /fhir like a program would."""

    def __init__(self, client: FlaskClient, token: str, email: str) -> None:
        self.client = client
        self.token = token
        self.email = email
        self.headers = {"Authorization": f"Bearer {token}"}

    def get(self, path: str, **kw: Any) -> Any:
        return self.client.get(f"/fhir/{path}", headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def put(self, path: str, body: Any, **kw: Any) -> Any:
        return self.client.put(f"/fhir/{path}", json=body, headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def post(self, path: str, **kw: Any) -> Any:
        return self.client.post(f"/fhir/{path}", headers={**self.headers, **kw.pop("headers", {})}, **kw)

    def import_(self, data: bytes, content_type: str = "application/x-ndjson", **params: str) -> Any:
        query = "&".join(f"{k}={v}" for k, v in params.items())
        return self.post(f"Bundle/$import?{query}", data=data, content_type=content_type)


def counts(outcome: dict[str, Any]) -> dict[str, int]:
    """The counts extension of an $import OperationOutcome."""
    [ext] = outcome["extension"]
    return {e["url"]: e["valueInteger"] for e in ext["extension"]}


def new_account(runner: Any, email: str | None = None) -> tuple[str, str]:
    """Create an account and an API token through the shlhost command, as an operator would."""
    from shlhost.cli import cli

    email = email or f"user-{uuid.uuid4().hex[:10]}@example.org"
    result = runner.invoke(cli, ["user", "create", email], input="correct horse battery\n")
    assert result.exit_code == 0, result.output
    result = runner.invoke(cli, ["token", "create", email])
    assert result.exit_code == 0, result.output
    return email, result.output.strip()


@pytest.fixture
def fhir(client: FlaskClient, runner: Any) -> Fhir:
    email, token = new_account(runner)
    return Fhir(client, token, email)


@pytest.fixture
def other(client: FlaskClient, runner: Any) -> Fhir:
    email, token = new_account(runner)
    return Fhir(client, token, email)
