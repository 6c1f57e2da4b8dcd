"""Rate limits behind a load balancer and on Redis, in one process (the two-server test with
a shared Redis is in tests/live/test_scaleout.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from flask import Flask

from tests.conftest import free_port, make_app, require
from tests.functional.conftest import Api

BALANCER = {"REMOTE_ADDR": "10.0.0.2"}


@pytest.fixture
def limited(base_config: dict[str, Any]) -> Iterator[Any]:
    apps: list[Flask] = []

    def build(**overrides: Any) -> Flask:
        app = make_app(base_config, RATELIMIT_MANIFEST="2 per minute", **overrides)
        apps.append(app)
        return app

    yield build
    for app in apps:
        app.extensions["shlhost"].engine.dispose()


def _manifest(app: Flask, link_id: str, client_ip: str) -> int:
    """A manifest request arriving from the balancer on behalf of ``client_ip``."""
    r = app.test_client().post(
        f"/shl/{link_id}",
        json={"recipient": "r"},
        environ_base=BALANCER,
        headers={"X-Forwarded-For": client_ip},
    )
    return r.status_code


def test_behind_a_balancer_each_client_has_its_own_budget(limited: Any) -> None:
    app = limited(TRUSTED_PROXIES=1)
    link = Api(app.test_client()).create()["id"]
    assert [_manifest(app, link, "203.0.113.7") for _ in range(3)] == [200, 200, 429]
    assert _manifest(app, link, "198.51.100.9") == 200  # another client, same balancer


def test_without_trusted_proxies_the_balancer_is_the_client(limited: Any) -> None:
    app = limited()
    link = Api(app.test_client()).create()["id"]
    assert [_manifest(app, link, "203.0.113.7") for _ in range(2)] == [200, 200]
    # X-Forwarded-For is not believed: everybody behind the balancer shares one budget,
    # and a client cannot buy itself a new budget by inventing the header.
    assert _manifest(app, link, "198.51.100.9") == 429


def test_only_the_balancers_own_entry_is_believed(limited: Any) -> None:
    """With one trusted proxy the rightmost X-Forwarded-For entry (the one the balancer
    appended) counts; whatever the client put before it does not."""
    app = limited(TRUSTED_PROXIES=1)
    link = Api(app.test_client()).create()["id"]
    client = app.test_client()
    codes = [
        client.post(
            f"/shl/{link}",
            json={"recipient": "r"},
            environ_base=BALANCER,
            headers={"X-Forwarded-For": f"192.0.2.{i}, 203.0.113.7"},
        ).status_code
        for i in range(3)
    ]
    assert codes == [200, 200, 429]


def test_the_request_log_shows_the_client_not_the_balancer(limited: Any) -> None:
    import io
    import json

    from shlhost.logs import JsonFormatter

    app = limited(TRUSTED_PROXIES=1, LOG_FORMAT="json")
    (handler,) = [h for h in app.logger.handlers if isinstance(h.formatter, JsonFormatter)]
    stream = io.StringIO()
    handler.setStream(stream)  # type: ignore[attr-defined]
    app.test_client().get(
        "/healthz", environ_base=BALANCER, headers={"X-Forwarded-For": "203.0.113.7"}
    )
    line = json.loads(stream.getvalue().splitlines()[-1])
    assert line["remote_addr"] == "203.0.113.7"


def test_redis_limits_are_enforced(limited: Any) -> None:
    """Two apps (two workers, two servers) share one budget kept in Redis.

    flask-limiter's one ``Limiter`` serves every app of a process and keeps the key prefix
    of the first app it saw, so in this process the keys are found by link id; the live
    test checks the prefix with one app per worker."""
    import redis

    client = redis.Redis.from_url("redis://127.0.0.1:6379", socket_connect_timeout=2)
    try:
        client.ping()
    except redis.RedisError:
        require(False, "Redis is not answering at 127.0.0.1:6379")
    link = ""
    try:
        first = limited(RATELIMIT_STORAGE_URI="redis://127.0.0.1:6379")
        second = limited(RATELIMIT_STORAGE_URI="redis://127.0.0.1:6379")
        link = Api(first.test_client()).create()["id"]
        assert [_manifest(app, link, "10.0.0.2") for app in (first, second, first)] == [
            200,
            200,
            429,
        ]
        assert list(client.scan_iter(match=f"*{link}*"))
    finally:
        for key in client.scan_iter(match=f"*{link}*") if link else []:
            client.delete(key)
        client.close()


def test_redis_down_falls_back_to_memory_limits(limited: Any) -> None:
    """The data plane keeps answering (no 500) and still limits, per process."""
    app = limited(RATELIMIT_STORAGE_URI=f"redis://127.0.0.1:{free_port()}")
    link = Api(app.test_client()).create()["id"]
    assert [_manifest(app, link, "10.0.0.2") for _ in range(3)] == [200, 200, 429]
