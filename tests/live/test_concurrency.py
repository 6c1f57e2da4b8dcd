"""Atomicity the spec demands, raced with real threads against a real gunicorn process
(2 workers x 8 threads) on the session's database (SQLite, or PostgreSQL in CI's second run)."""

from __future__ import annotations

import threading
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from tests.helpers import minimal_bundle

pytestmark = pytest.mark.live


def _create(server, **options):
    body = {"files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}], **options}
    r = requests.post(server.url + "/api/links", json=body, timeout=30)
    assert r.status_code == 201, r.text
    return r.json()


def _race(n, fn):
    """Run fn n times at once: every thread waits at a barrier, then fires."""
    barrier = threading.Barrier(n)

    def go(i):
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(go, range(n)))


def test_parallel_wrong_passcodes_spend_the_budget_exactly(live_server):
    created = _create(live_server, passcode="correct horse")
    url = created["url"]

    def guess(i):
        r = requests.post(url, json={"recipient": f"attacker {i}", "passcode": f"wrong {i}"}, timeout=60)
        return r.status_code, r.json()

    results = _race(10, guess)
    codes = Counter(code for code, _ in results)
    assert codes == {401: 5, 404: 5}, results
    remaining = sorted(body["remainingAttempts"] for code, body in results if code == 401)
    assert remaining == [0, 1, 2, 3, 4]
    # The budget is spent: even the right passcode finds a dead link.
    r = requests.post(url, json={"recipient": "owner", "passcode": "correct horse"}, timeout=30)
    assert r.status_code == 404


def test_parallel_requests_on_a_single_use_link_give_exactly_one_manifest(live_server):
    created = _create(live_server, max_uses=1)

    def fetch(i):
        return requests.post(created["url"], json={"recipient": f"r{i}"}, timeout=60).status_code

    codes = Counter(_race(20, fetch))
    assert codes == {200: 1, 404: 19}, codes


def test_parallel_requests_on_an_n_use_link(live_server):
    created = _create(live_server, max_uses=3, passcode="pw")

    def fetch(i):
        return requests.post(created["url"], json={"recipient": f"r{i}", "passcode": "pw"}, timeout=60).status_code

    codes = Counter(_race(12, fetch))
    assert codes == {200: 3, 404: 9}, codes
    info = requests.get(created["url"].replace("/shl/", "/api/links/"), timeout=30,
                        headers={"Authorization": f"Bearer {created['management_token']}"}).json()
    assert info["uses"] == 3 and info["status"] == "used_up"
    assert info["attempts_left"] == 5  # right passcodes spend nothing


def test_live_server_answers_cors_and_location_files(live_server):
    created = _create(live_server)
    r = requests.post(created["url"], json={"recipient": "viewer"}, headers={"Origin": "https://elsewhere"}, timeout=30)
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"
    location = r.json()["files"][0]["location"]
    assert location.startswith(live_server.url + "/shl/")
    f = requests.get(location, timeout=30)
    assert f.status_code == 200 and f.headers["Content-Type"].startswith("application/jose")
    assert f.text.count(".") == 4
