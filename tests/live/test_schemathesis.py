"""Schemathesis against a real gunicorn server, driven by /api/openapi.json.

Every documented operation gets a few generated requests (bounded so CI stays fast), with a
real management token and a real API token, and half of the link-bearing requests aimed at
a real link. Checks: no 5xx, the status code is documented, the content type and the body
match the description.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from tests.conftest import LiveServer, make_app
from tests.functional.conftest import new_account
from tests.helpers import minimal_bundle

schemathesis = pytest.importorskip("schemathesis")
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = [pytest.mark.live, pytest.mark.slow]

EXAMPLES_PER_OPERATION = 8
TIME_BUDGET = 60.0
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def fuzz_server(base_config: dict[str, Any]) -> Iterator[LiveServer]:
    server = LiveServer(base_config, workers=2, threads=4)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def credentials(base_config: dict[str, Any], fuzz_server: LiveServer) -> dict[str, str]:
    """An API token of a fresh account, and a link with its management token."""
    app = make_app(base_config)
    try:
        api_token = new_account(app.test_cli_runner())[1]
    finally:
        app.extensions["shlhost"].engine.dispose()
    r = requests.post(
        f"{fuzz_server.url}/api/links",
        timeout=30,
        json={
            "files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}],
            "flags": "L",
        },
    )
    assert r.status_code == 201, r.text
    created = r.json()
    r = requests.post(
        f"{fuzz_server.url}/fhir/Bundle/$import",
        timeout=30,
        data=b'{"resourceType":"Patient","id":"fuzz-p"}\n',
        headers={"Authorization": f"Bearer {api_token}", "Content-Type": "application/x-ndjson"},
    )
    assert r.status_code == 200, r.text
    return {
        "api_token": api_token,
        "management_token": created["management_token"],
        "link_id": created["id"],
        "file_id": created["files"][0]["id"],
    }


def test_openapi_fuzz(fuzz_server: LiveServer, credentials: dict[str, str]) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.url}/api/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 25
    started = time.monotonic()
    session = requests.Session()
    failures: list[str] = []
    calls: dict[str, int] = {}

    def make_run(operation: Any, path: str, token: str) -> Any:
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(), real=st.booleans(), auth=st.booleans())
        def run(case: Any, real: bool, auth: bool) -> None:
            if time.monotonic() - started > TIME_BUDGET:
                return
            if real and case.path_parameters:
                if "link_id" in case.path_parameters:
                    case.path_parameters["link_id"] = credentials["link_id"]
                if "file_id" in case.path_parameters:
                    case.path_parameters["file_id"] = credentials["file_id"]
                if "rtype" in case.path_parameters:
                    case.path_parameters["rtype"] = "Patient"
                if "rid" in case.path_parameters:
                    case.path_parameters["rid"] = "fuzz-p"
            name = f"{operation.method.upper()} {path}"
            calls[name] = calls.get(name, 0) + 1
            headers = {"Authorization": f"Bearer {token}"} if auth else {}
            try:
                case.call_and_validate(session=session, headers=headers, checks=CHECKS, timeout=30)
            except Exception as exc:  # collect them all, then fail with a readable list
                failures.append(f"{operation.method.upper()} {path}: {exc}")
                raise

        return run

    for operation in operations:
        path = operation.path
        api_token = path.startswith(("/fhir", "/api/pull")) or (path, operation.method) == (
            "/api/links",
            "get",
        )
        token = credentials["api_token"] if api_token else credentials["management_token"]
        try:
            make_run(operation, path, token)()
        except Exception as exc:  # noqa: BLE001 - the first one per operation is recorded above
            if not any(f.startswith(f"{operation.method.upper()} {path}:") for f in failures):
                failures.append(f"{operation.method.upper()} {path}: {type(exc).__name__}: {exc}")

    assert not failures, (
        "\n\n".join(failures[:10]) + "\n\nserver log (tail):\n" + fuzz_server.output()[-3000:]
    )
    # Every operation was exercised (unless the time budget ran out first).
    if time.monotonic() - started < TIME_BUDGET:
        assert len(calls) == len(operations), sorted(calls)
    # The server stayed healthy through it.
    assert requests.get(f"{fuzz_server.url}/readyz", timeout=10).status_code == 200
