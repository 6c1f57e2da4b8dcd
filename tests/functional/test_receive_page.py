"""The page for pharmacies and other systems: paste a link, save what it carries."""

from __future__ import annotations

import requests

from tests.conftest import make_app
from tests.functional.test_patient_pages import sign_up, token
from tests.helpers import minimal_bundle


def _shared_link(live_server, **options) -> dict:
    body = {"files": [{"contentType": "application/fhir+json", "content": minimal_bundle("Rita Receive")}],
            **options}
    r = requests.post(live_server.url + "/api/links", json=body, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def test_paste_a_link_and_save_it_to_the_record(base_config, live_server):
    app = make_app(base_config, PULL_ALLOW_PRIVATE=True)
    client = app.test_client()
    sign_up(client)
    shared = _shared_link(live_server, passcode="4321")

    wrong = client.post("/patient/receive/", data={"csrf_token": token(client, "/patient/receive/"),
                                                   "link": shared["viewer_url"], "passcode": "0000"})
    assert wrong.status_code == 400 and b"attempts left" in wrong.data

    r = client.post("/patient/receive/", data={"csrf_token": token(client, "/patient/receive/"),
                                               "link": shared["viewer_url"], "passcode": "4321"})
    assert r.status_code == 303 and r.headers["Location"].endswith("/patient/import")
    summary = client.get("/patient/import")
    assert b'id="count-created">2<' in summary.data  # the Patient and the MedicationStatement
    record = client.get("/patient/").get_data(as_text=True)
    assert "Receive" in record and "Metformin" in record

    # Provenance names the link's url (never its key).
    with app.extensions["shlhost"].sessions() as session:
        from sqlalchemy import select

        from shlhost.storage.models import ResourceRow

        sources = set(session.scalars(select(ResourceRow.source).where(ResourceRow.resource_id == "m1")))
    assert shared["url"] in sources
    assert not any("shlink:/" in (s or "") for s in sources)
    app.extensions["shlhost"].engine.dispose()


def test_bad_links_and_csrf(base_config):
    app = make_app(base_config)
    client = app.test_client()
    sign_up(client)
    r = client.post("/patient/receive/", data={"csrf_token": token(client, "/patient/receive/"),
                                               "link": "https://example.org/not-a-link"})
    assert r.status_code == 400 and b"not a SMART Health Link" in r.data
    r = client.post("/patient/receive/", data={"link": "shlink:/whatever"})
    assert r.status_code == 400 and b"expired or did not come from this site" in r.data
    anonymous = app.test_client().get("/patient/receive/")
    assert anonymous.status_code in (302, 303)
    app.extensions["shlhost"].engine.dispose()
