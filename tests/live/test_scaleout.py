"""Scale-out, for real: TWO gunicorn servers (three workers each) on the session's database
(SQLite, or PostgreSQL in the second run), sharing nothing else but Redis for the rate
limits and the database for blobs, as N machines behind a load balancer would. Parallel
requests go to both at once; every counter the protocol depends on must stay exact.
Then: metrics add up across workers, and a JSON-logging server writes only JSON."""

from __future__ import annotations

import json
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import LiveServer, require
from tests.helpers import minimal_bundle

pytestmark = pytest.mark.live

REDIS_URL = "redis://127.0.0.1:6379"
MANIFEST_LIMIT = 25


def _redis() -> Any:
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        require(False, f"Redis is not answering at {REDIS_URL}")
    return client


@pytest.fixture(scope="module")
def redis_prefix() -> Iterator[str]:
    """A key prefix for this run only; its keys are deleted afterwards."""
    client = _redis()
    prefix = f"shlhost-test-{uuid.uuid4().hex[:12]}"
    yield prefix
    for key in client.scan_iter(match=f"*{prefix}*"):
        client.delete(key)
    client.close()


@pytest.fixture(scope="module")
def pair(base_config: dict[str, Any], redis_prefix: str) -> Iterator[tuple[LiveServer, LiveServer]]:
    config = {
        **base_config,
        "BLOB_BACKEND": "database",
        "RATELIMIT_STORAGE_URI": REDIS_URL,
        "RATELIMIT_KEY_PREFIX": redis_prefix,
        "RATELIMIT_MANIFEST": f"{MANIFEST_LIMIT} per hour",
    }
    with ThreadPoolExecutor(2) as pool:  # start both at once: each takes seconds
        # Server B logs JSON (what production does by default), server A text.
        starting = [
            pool.submit(LiveServer, {**config, "LOG_FORMAT": fmt}, workers=3, threads=4)
            for fmt in ("text", "json")
        ]
    servers = [f.result() for f in starting if f.exception() is None]
    try:
        if len(servers) != 2:
            raise next(f.exception() for f in starting if f.exception() is not None)  # type: ignore[misc]
        yield servers[0], servers[1]
    finally:
        for server in servers:  # stop both at once
            server.proc.terminate()
        for server in servers:
            server.stop()


def _create(server: LiveServer, **options: Any) -> dict[str, Any]:
    body = {
        "files": [{"contentType": "application/fhir+json", "content": minimal_bundle()}],
        **options,
    }
    r = requests.post(server.url + "/api/links", json=body, timeout=30)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def _on(server: LiveServer, created: dict[str, Any]) -> str:
    """The link's manifest url on ``server`` (both servers serve every link)."""
    return f"{server.url}/shl/{created['id']}"


def _race(n: int, fn: Callable[[int], Any]) -> list[Any]:
    barrier = threading.Barrier(n)

    def go(i: int) -> Any:
        barrier.wait(timeout=30)
        return fn(i)

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(go, range(n)))


def test_passcode_budget_is_exact_across_two_servers(pair: tuple[LiveServer, LiveServer]) -> None:
    created = _create(pair[0], passcode="correct horse")

    def guess(i: int) -> tuple[int, Any]:
        r = requests.post(
            _on(pair[i % 2], created),
            json={"recipient": f"attacker {i}", "passcode": f"x{i}"},
            timeout=60,
        )
        return r.status_code, r.json()

    results = _race(10, guess)
    assert Counter(code for code, _ in results) == {401: 5, 404: 5}, results
    assert sorted(body["remainingAttempts"] for code, body in results if code == 401) == [
        0,
        1,
        2,
        3,
        4,
    ]
    for server in pair:  # spent on both: even the right passcode finds a dead link
        r = requests.post(
            _on(server, created), json={"recipient": "o", "passcode": "correct horse"}, timeout=30
        )
        assert r.status_code == 404


def test_single_use_is_exact_across_two_servers(pair: tuple[LiveServer, LiveServer]) -> None:
    created = _create(pair[1], max_uses=1)

    def fetch(i: int) -> int:
        return requests.post(
            _on(pair[i % 2], created), json={"recipient": f"r{i}"}, timeout=60
        ).status_code

    assert Counter(_race(20, fetch)) == {200: 1, 404: 19}


def test_a_location_from_one_server_is_served_by_the_other(
    pair: tuple[LiveServer, LiveServer],
) -> None:
    """Tickets (the shared SECRET_KEY) and ciphertext (the shared blob store) work anywhere."""
    a, b = pair
    created = _create(a)
    embedded = requests.post(
        _on(b, created), json={"recipient": "r", "embeddedLengthMax": 10**6}, timeout=30
    ).json()["files"][0]["embedded"]
    location = requests.post(_on(b, created), json={"recipient": "r"}, timeout=30).json()["files"][
        0
    ]["location"]
    assert location.startswith(b.url)
    r = requests.get(location.replace(b.url, a.url), timeout=30)
    assert r.status_code == 200 and r.text == embedded


def test_rate_limit_is_shared_through_redis(
    pair: tuple[LiveServer, LiveServer], redis_prefix: str
) -> None:
    """One budget per client and link, whichever server and worker answers: with per-process
    memory the six workers would allow up to six times as many."""
    created = _create(pair[0])

    def fetch(i: int) -> requests.Response:
        return requests.post(_on(pair[i % 2], created), json={"recipient": f"r{i}"}, timeout=60)

    answers = _race(MANIFEST_LIMIT + 10, fetch)
    codes = Counter(r.status_code for r in answers)
    assert codes == {200: MANIFEST_LIMIT, 429: 10}, codes
    limited = [r for r in answers if r.status_code == 429]
    assert all(int(r.headers["Retry-After"]) > 0 for r in limited)
    assert {r.url.split("/shl/")[0] for r in limited} == {
        pair[0].url,
        pair[1].url,
    }  # both servers refused
    keys = [k.decode() for k in _redis().scan_iter(match=f"*{redis_prefix}*")]
    assert any(created["id"] in k for k in keys), keys


def _metric_samples(server: LiveServer) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = requests.get(server.url + "/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_metrics_add_up_across_workers(pair: tuple[LiveServer, LiveServer]) -> None:
    a, b = pair
    healthz = (
        "shlhost_http_requests_total",
        (("method", "GET"), ("route", "/healthz"), ("status", "200")),
    )

    def outcomes(server: LiveServer) -> dict[str, float]:
        found = _metric_samples(server)
        return {
            o: found.get(("shlhost_manifest_requests_total", (("outcome", o),)), 0.0)
            for o in ("ok", "wrong_passcode", "dead")
        }

    before = _metric_samples(a).get(healthz, 0.0)
    before_outcomes = [outcomes(a), outcomes(b)]
    assert set(_race(30, lambda i: requests.get(a.url + "/healthz", timeout=30).status_code)) == {
        200
    }

    locked = _create(a, passcode="pw")
    for i in range(7):  # five wrong guesses spend the budget, two more find a dead link
        requests.post(
            _on(pair[i % 2], locked), json={"recipient": "r", "passcode": "no"}, timeout=30
        )
    fine = _create(b)
    for i in range(3):
        requests.post(_on(pair[i % 2], fine), json={"recipient": "r"}, timeout=30)

    # 30 requests spread over three worker processes, counted as one total by any worker.
    assert _metric_samples(a).get(healthz, 0.0) - before == 30
    after_outcomes = [outcomes(a), outcomes(b)]
    delta = {
        o: sum(
            after[o] - prior[o]
            for after, prior in zip(after_outcomes, before_outcomes, strict=True)
        )
        for o in ("ok", "wrong_passcode", "dead")
    }
    assert delta == {"ok": 3, "wrong_passcode": 5, "dead": 2}


def test_the_json_server_wrote_only_json_lines(pair: tuple[LiveServer, LiveServer]) -> None:
    """Server B (LOG_FORMAT json) has by now answered every test above: its whole output,
    gunicorn's own lines included, is one JSON object per line, and carries no secret."""
    b = pair[1]
    created = _create(b, passcode="sesame")
    requests.post(_on(b, created), json={"recipient": "r", "passcode": "sesame"}, timeout=30)
    output = b.output()
    records = [json.loads(line) for line in output.splitlines() if line.strip()]
    assert any(r["logger"] == "gunicorn.error" for r in records)
    requests_ = [r for r in records if "route" in r]
    assert {(r["method"], r["route"], r["status"]) for r in requests_} >= {
        ("POST", "/shl/<link_id>", 200),
        ("POST", "/shl/<link_id>", 401),
        ("POST", "/shl/<link_id>", 404),
        ("POST", "/shl/<link_id>", 429),
        ("POST", "/api/links", 201),
        ("GET", "/metrics", 200),
    }
    assert all({"time", "level", "request_id", "duration"} <= set(r) for r in requests_)
    for secret in ("sesame", "correct horse", created["id"], created["management_token"]):
        assert secret not in output
    assert "shlink:/" not in output
