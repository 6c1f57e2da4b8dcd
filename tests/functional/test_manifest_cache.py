"""The manifest serves links without passcode from what the process read before
(shlhost.shl.links.LiveLinkCache), checked by version in the use's own UPDATE. Whatever
changes, the next manifest must answer what a fresh read would: new content, paused,
revoked, expired, and the access log must show each request once, with the same words.
Two apps on one database stand for two gunicorn workers (or servers): a change made
through one must show in the other's next manifest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from flask import Flask

from tests.conftest import make_app
from tests.functional.conftest import Api
from tests.helpers import independent_decrypt, minimal_bundle


@pytest.fixture
def other_api(base_config: dict[str, Any]) -> Iterator[Api]:
    """A second app, as a second worker process: its own cache, the same database."""
    second: Flask = make_app(base_config)
    yield Api(second.test_client())
    second.extensions["shlhost"].engine.dispose()


def patient_name(api: Api, created: dict[str, Any]) -> str:
    r = api.manifest(created, embeddedLengthMax=1_000_000)
    assert r.status_code == 200, r.get_json()
    (entry,) = r.get_json()["files"]
    _header, plain = independent_decrypt(entry["embedded"], api.key(created))
    name: str = json.loads(plain)["entry"][0]["resource"]["name"][0]["given"][0]
    return name


def log(api: Api, created: dict[str, Any]) -> list[tuple[str, str]]:
    r = api.client.get(f"/api/links/{created['id']}/accesses", headers=api.auth(created))
    assert r.status_code == 200
    return [(a["action"], a["outcome"]) for a in reversed(r.get_json()["accesses"])]


def replace_content(api: Api, created: dict[str, Any], name: str) -> None:
    file_id = api.get(created).get_json()["files"][0]["id"]
    r = api.client.put(
        f"/api/links/{created['id']}/files/{file_id}",
        json={"files": [{"contentType": "application/fhir+json", "content": minimal_bundle(name)}]},
        headers=api.auth(created),
    )
    assert r.status_code == 200, r.get_json()


def test_new_content_is_served_at_once_by_every_process(api: Api, other_api: Api) -> None:
    created = api.create(minimal_bundle("Ada Lovelace"), flags="L")
    assert patient_name(api, created) == "Ada"
    assert patient_name(other_api, created) == "Ada"
    replace_content(other_api, created, "Grace Hopper")
    assert patient_name(api, created) == "Grace"  # api's process read "Ada" before
    replace_content(api, created, "Hedy Lamarr")
    assert patient_name(other_api, created) == "Hedy"
    assert patient_name(api, created) == "Hedy"
    assert log(api, created) == [("manifest", "ok")] * 5
    assert api.get(created).get_json()["uses"] == 5


@pytest.mark.parametrize("change", ["pause", "revoke"])
def test_a_link_stopped_elsewhere_is_dead_here_and_logged_as_such(
    api: Api, other_api: Api, change: str
) -> None:
    created = api.create()
    assert api.manifest(created).status_code == 200
    if change == "pause":
        assert other_api.patch(created, active=False).status_code == 200
    else:
        r = other_api.client.delete(f"/api/links/{created['id']}", headers=other_api.auth(created))
        assert r.status_code in (200, 204)
    assert api.manifest(created).status_code == 404
    word = {"pause": "paused", "revoke": "revoked"}[change]
    assert log(other_api, created) == [("manifest", "ok"), ("manifest", word)]
    if change == "pause":
        assert other_api.patch(created, active=True).status_code == 200
        assert api.manifest(created).status_code == 200


def test_a_changed_label_costs_one_fresh_read_and_is_logged_once(api: Api) -> None:
    created = api.create()
    assert api.manifest(created).status_code == 200
    assert api.patch(created, label="renamed").status_code == 200
    assert api.manifest(created).status_code == 200
    assert api.manifest(created).status_code == 200
    assert log(api, created) == [("manifest", "ok")] * 3


def test_an_expired_link_is_dead_even_from_the_cache(app: Flask, api: Api) -> None:
    created = api.create(exp=int((datetime.now(UTC) + timedelta(hours=1)).timestamp()))
    assert api.manifest(created).status_code == 200  # now cached
    from shlhost.api.common import links
    from shlhost.errors import DeadLink

    later = datetime.now(UTC) + timedelta(hours=2)
    with app.test_request_context(), pytest.raises(DeadLink):
        links().manifest(
            created["id"], recipient="late", passcode=None, embedded_max=None, now=later
        )
    assert log(api, created) == [("manifest", "ok"), ("manifest", "expired")]


def test_limited_and_passcode_links_are_never_served_from_the_cache(api: Api) -> None:
    single = api.create(max_uses=1)
    assert api.manifest(single).status_code == 200
    assert api.manifest(single).status_code == 404
    assert log(api, single) == [("manifest", "ok"), ("manifest", "used_up")]
    guarded = api.create(passcode="s3cret!")
    assert api.manifest(guarded, passcode="s3cret!").status_code == 200
    assert api.manifest(guarded, passcode="wrong").status_code == 401
    assert api.manifest(guarded, passcode="s3cret!").status_code == 200
