"""shlhost.client against real HTTP: a scripted local server (every answer the protocol
allows, and some it does not) and the live shlhost server; ``shlhost fetch`` and ``pull``."""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import requests
from click.testing import CliRunner
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from shlhost import client as shl
from shlhost.cli import cli
from shlhost.crypto import jwe
from shlhost.crypto.b64 import b64url_decode, b64url_encode
from shlhost.shl.payload import Payload, encode
from tests.conftest import SHARED
from tests.functional.conftest import new_account
from tests.helpers import minimal_bundle

SPEC_KEY = "rxTgYlOaKJPFtcEd0qcceN8wEU4p94SqAwIWQe6uX7Q"
SPEC_JWE = SHARED / "fixtures" / "shl-spec-example.jwe"

Answer = tuple[int, dict[str, str], bytes]


class Scripted:
    """A tiny HTTP server on loopback: ``routes`` maps "METHOD /path" to a function of the
    request (query, body) that returns (status, headers, body). Every request is logged."""

    def __init__(self) -> None:
        self.routes: dict[str, Callable[[str, bytes], Answer]] = {}
        self.log: list[tuple[str, str, bytes, dict[str, str]]] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def _serve(self) -> None:
                path, _, query = self.path.partition("?")
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.log.append((self.command, self.path, body, dict(self.headers)))
                route = outer.routes.get(f"{self.command} {path}")
                status, headers, data = (
                    route(query, body) if route else (404, {}, b'{"error":"not_found"}')
                )
                self.send_response(status)
                for k, v in headers.items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _serve

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def calls(self, what: str) -> int:
        method, path = what.split(" ", 1)
        return sum(1 for m, p, _b, _h in self.log if m == method and p.partition("?")[0] == path)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def remote() -> Iterator[Scripted]:
    server = Scripted()
    yield server
    server.stop()


def ok_json(data: Any) -> Answer:
    return 200, {"Content-Type": "application/json"}, json.dumps(data).encode()


def ok_jose(token: str) -> Answer:
    return 200, {"Content-Type": "application/jose"}, token.encode()


def link_to(url: str, key: str = SPEC_KEY, **kw: Any) -> str:
    return encode(Payload(url=url, key=key, **kw))


class Offline(requests.adapters.BaseAdapter):
    """No network: what a client sees for an issuer it cannot reach."""

    def send(self, request: Any, **_kw: Any) -> Any:
        raise requests.ConnectionError("offline")

    def close(self) -> None:
        pass


def offline_client(**kw: Any) -> shl.ShlClient:
    session = requests.Session()
    session.mount("https://", Offline())
    return shl.ShlClient(recipient="Dr Test", session=session, **kw)


def spec_jwe() -> str:
    if not SPEC_JWE.is_file():
        pytest.skip("../shared/fixtures is absent")
    return SPEC_JWE.read_text().strip()


# -- the spec's example and the known-answer JWE ------------------------------------------


def test_spec_example_through_a_manifest_with_a_location(remote):
    token = spec_jwe()
    remote.routes["POST /m"] = lambda q, b: ok_json(
        {
            "status": "finalized",
            "files": [{"contentType": shl.SHC, "location": f"{remote.url}/f?ticket=1"}],
        }
    )
    remote.routes["GET /f"] = lambda q, b: ok_jose(token)
    resolved = offline_client().resolve(f"https://viewer.example/#{link_to(remote.url + '/m')}")
    [f] = resolved.files
    assert f.content_type == shl.SHC and f.origin == "location"
    [card] = f.cards
    assert card.issuer == "https://spec.smarthealth.cards/examples/issuer"
    assert card.verification == "unverified"  # the issuer's JWKS cannot be had offline
    types = [r["resourceType"] for r in resolved.resources()]
    assert types == ["Patient", "Immunization", "Immunization", "Immunization"]
    patient = resolved.resources()[0]
    assert all(
        r["patient"]["reference"] == f"Patient/{patient['id']}" for r in resolved.resources()[1:]
    )
    # The manifest request the protocol asks for, with a User-Agent.
    method, _path, body, headers = remote.log[0]
    assert method == "POST" and json.loads(body) == {"recipient": "Dr Test"}
    assert headers["User-Agent"].startswith("shlhost-client/")


def test_known_answer_jwe_through_a_u_link(remote):
    token = spec_jwe()
    remote.routes["GET /u"] = lambda q, b: (
        ok_jose(token) if "recipient=Dr+Test" in q else (400, {}, b"{}")
    )
    resolved = offline_client().resolve(link_to(remote.url + "/u", flag="U"))
    [f] = resolved.files
    assert f.origin == "direct" and len(f.cards) == 1
    header, plaintext = jwe.decrypt(token, b64url_decode(SPEC_KEY))
    assert len(plaintext) == 846 and header["cty"] == shl.SHC
    assert remote.calls("POST /u") == 0


def test_spec_example_from_the_live_server_embedded_and_by_location(live_server, tmp_path):
    token = spec_jwe()
    r = requests.post(
        live_server.url + "/api/links",
        json={"files": [{"contentType": shl.SHC, "jwe": token}]},
        timeout=10,
    )
    assert r.status_code == 201
    link = link_to(r.json()["url"])
    for embedded in (None, 10**6):
        resolved = offline_client().resolve(link, embedded_length_max=embedded)
        assert [f.origin for f in resolved.files] == [
            "location" if embedded is None else "embedded"
        ]
        assert resolved.status == "finalized" and len(resolved.resources()) == 4
    # And through the command, as NDJSON.
    out = tmp_path / "spec.ndjson"
    result = CliRunner().invoke(cli, ["fetch", link, "-o", str(out), "--format", "ndjson"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["resourceType"] for x in lines] == [
        "Patient",
        "Immunization",
        "Immunization",
        "Immunization",
    ]


# -- files of every shape -------------------------------------------------------------------


def test_zip_def_fhir_and_api_access_files(remote):
    key = os.urandom(32)
    bundle = minimal_bundle()
    deflated = jwe.encrypt(json.dumps(bundle).encode(), key, shl.FHIR_JSON, deflate=True)
    access = jwe.encrypt(
        json.dumps({"aud": "https://fhir.example/r4", "access_token": "x"}).encode(),
        key,
        shl.API_ACCESS,
    )
    remote.routes["POST /m"] = lambda q, b: ok_json(
        {
            "status": "can-change",
            "files": [
                {
                    "contentType": shl.FHIR_JSON,
                    "embedded": deflated,
                    "lastUpdated": "2026-01-01T00:00:00Z",
                },
                {"contentType": shl.API_ACCESS, "location": f"{remote.url}/a"},
            ],
        }
    )
    remote.routes["GET /a"] = lambda q, b: ok_jose(access)
    resolved = offline_client().resolve(link_to(remote.url + "/m", b64url_encode(key), flag="L"))
    assert (
        json.loads(b"".join(resolved.ndjson().splitlines(keepends=True)[:1]))["resourceType"]
        == bundle["entry"][0]["resource"]["resourceType"]
    )
    assert resolved.bundle()["type"] == "collection"
    assert len(resolved.bundle()["entry"]) == len(bundle["entry"])
    assert resolved.api_access == [{"aud": "https://fhir.example/r4", "access_token": "x"}]
    assert not any("fhir.example" in p for _m, p, _b, _h in remote.log)  # reported, never followed
    # A second look that already knows file 0's lastUpdated does not fetch it again.
    again = offline_client().resolve(
        link_to(remote.url + "/m", b64url_encode(key), flag="L"),
        known_updates={"0": "2026-01-01T00:00:00Z"},
    )
    assert again.files[0].skipped and not again.files[1].skipped


def _es256_card(iss: str, private: ec.EllipticCurvePrivateKey, kid: str) -> str:
    header = b64url_encode(json.dumps({"alg": "ES256", "zip": "DEF", "kid": kid}).encode())
    body = {
        "iss": iss,
        "nbf": 1700000000,
        "vc": {
            "type": ["https://smarthealth.cards#health-card"],
            "credentialSubject": {
                "fhirVersion": "4.0.1",
                "fhirBundle": {
                    "resourceType": "Bundle",
                    "type": "collection",
                    "entry": [
                        {
                            "fullUrl": "resource:0",
                            "resource": {"resourceType": "Patient", "name": [{"family": "X"}]},
                        }
                    ],
                },
            },
        },
    }
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    payload = b64url_encode(packer.compress(json.dumps(body).encode()) + packer.flush())
    der = private.sign(f"{header}.{payload}".encode(), ec.ECDSA(hashes.SHA256()))
    r, s = decode_dss_signature(der)
    return f"{header}.{payload}.{b64url_encode(r.to_bytes(32, 'big') + s.to_bytes(32, 'big'))}"


def test_health_card_signature_verified_with_the_issuers_jwks(remote):
    private = ec.generate_private_key(ec.SECP256R1())
    numbers = private.public_key().public_numbers()
    jwk = {
        "kty": "EC",
        "crv": "P-256",
        "kid": "k1",
        "use": "sig",
        "alg": "ES256",
        "x": b64url_encode(numbers.x.to_bytes(32, "big")),
        "y": b64url_encode(numbers.y.to_bytes(32, "big")),
    }
    remote.routes["GET /issuer/.well-known/jwks.json"] = lambda q, b: ok_json({"keys": [jwk]})
    good = _es256_card(remote.url + "/issuer", private, "k1")
    forged = _es256_card(remote.url + "/issuer", ec.generate_private_key(ec.SECP256R1()), "k1")
    key = os.urandom(32)
    shc = jwe.encrypt(json.dumps({"verifiableCredential": [good, forged]}).encode(), key, shl.SHC)
    remote.routes["GET /u"] = lambda q, b: ok_jose(shc)
    resolved = shl.ShlClient().resolve(link_to(remote.url + "/u", b64url_encode(key), flag="U"))
    assert [c.verification for c in resolved.files[0].cards] == ["verified", "invalid"]
    assert remote.calls("GET /issuer/.well-known/jwks.json") == 1  # cached per issuer


# -- errors that name what happened ---------------------------------------------------------


def test_wrong_passcode_dead_link_and_passcode_needed_on_the_live_server(live_server):
    r = requests.post(
        live_server.url + "/api/links",
        json={
            "files": [{"contentType": shl.FHIR_JSON, "content": minimal_bundle()}],
            "passcode": "right",
        },
        timeout=10,
    )
    link = r.json()["shlink"]
    client = shl.ShlClient(recipient="Dr Test")
    with pytest.raises(shl.WrongPasscode) as wrong:
        client.resolve(link, "wrong")
    assert wrong.value.remaining_attempts == 4 and "4 attempts left" in wrong.value.message
    with pytest.raises(shl.PasscodeRequired):
        client.resolve(link)
    assert len(client.resolve(link, "right").resources()) == len(minimal_bundle()["entry"])
    payload = json.loads(b64url_decode(link.split("shlink:/")[1]))
    with pytest.raises(shl.DeadLink):
        client.resolve(link_to(payload["url"] + "x", payload["key"]))


def test_not_a_link_expired_and_wrong_key(remote):
    client = offline_client()
    for bad in ("https://example.org/", "shlink:/notbase64!", "xshlink:/e30"):
        with pytest.raises(shl.NotALink):
            client.resolve(bad)
    with pytest.raises(shl.LinkExpired):
        client.resolve(link_to(remote.url + "/m", exp=int(time.time()) - 10))
    assert remote.log == []  # an expired link is not even asked
    token = spec_jwe()
    remote.routes["GET /u"] = lambda q, b: ok_jose(token)
    with pytest.raises(shl.DecryptionFailed):
        client.resolve(link_to(remote.url + "/u", b64url_encode(os.urandom(32)), flag="U"))


def test_429_retry_after_is_honoured_and_bounded(remote):
    token = spec_jwe()
    answers = iter([(429, {"Retry-After": "2"}, b""), (429, {"Retry-After": "1"}, b"")])
    remote.routes["GET /u"] = lambda q, b: next(answers, None) or ok_jose(token)
    slept: list[float] = []
    resolved = offline_client(sleep=slept.append).resolve(link_to(remote.url + "/u", flag="U"))
    assert slept == [2.0, 1.0] and len(resolved.files[0].cards) == 1
    remote.routes["GET /u"] = lambda q, b: (429, {"Retry-After": "1"}, b"")
    slept.clear()
    with pytest.raises(shl.RateLimited) as limited:
        offline_client(sleep=slept.append, max_retries=2).resolve(
            link_to(remote.url + "/u", flag="U")
        )
    assert slept == [1.0, 1.0] and limited.value.retry_after == 1.0
    remote.routes["GET /u"] = lambda q, b: (429, {"Retry-After": "3600"}, b"")
    with pytest.raises(shl.RateLimited):  # longer than the client will wait: no sleeping
        offline_client(sleep=pytest.fail).resolve(link_to(remote.url + "/u", flag="U"))


def test_a_location_that_expired_between_manifest_and_fetch_asks_the_manifest_again(remote):
    token = spec_jwe()
    tickets = iter(["old", "new"])
    remote.routes["POST /m"] = lambda q, b: ok_json(
        {
            "status": "finalized",
            "files": [{"contentType": shl.SHC, "location": f"{remote.url}/f?t={next(tickets)}"}],
        }
    )
    remote.routes["GET /f"] = lambda q, b: ok_jose(token) if q == "t=new" else (404, {}, b"")
    resolved = offline_client().resolve(link_to(remote.url + "/m"))
    assert len(resolved.resources()) == 4
    assert remote.calls("POST /m") == 2 and remote.calls("GET /f") == 2
    # Once only: a location that is still dead after a fresh manifest is a dead link.
    remote.routes["GET /f"] = lambda q, b: (404, {}, b"")
    tickets = iter(["a", "b", "c"])
    with pytest.raises(shl.DeadLink):
        offline_client().resolve(link_to(remote.url + "/m"))


def test_fetch_command_with_a_passcode_from_standard_input(live_server, tmp_path):
    r = requests.post(
        live_server.url + "/api/links",
        json={
            "files": [{"contentType": shl.FHIR_JSON, "content": minimal_bundle()}],
            "passcode": "s3cret",
        },
        timeout=10,
    )
    link = r.json()["shlink"]
    out = tmp_path / "record.json"
    result = CliRunner().invoke(
        cli, ["fetch", link, "--passcode-stdin", "-o", str(out)], input="s3cret\n"
    )
    assert result.exit_code == 0, result.output
    bundle = json.loads(out.read_text())
    assert bundle["type"] == "collection"
    assert [e["resource"]["id"] for e in bundle["entry"]] == [
        e["resource"]["id"] for e in minimal_bundle()["entry"]
    ]
    wrong = CliRunner().invoke(cli, ["fetch", link, "--passcode", "guess"])
    assert (
        wrong.exit_code == 2 and wrong.output.strip() == "error: wrong passcode (4 attempts left)"
    )


def test_fetch_command_errors_are_one_line_and_exit_2(remote):
    runner = CliRunner()
    for args, words in (
        (["fetch", "not a link"], "not a SMART Health Link"),
        (["fetch", link_to(remote.url + "/gone")], "dead link"),
    ):
        result = runner.invoke(cli, args)
        assert result.exit_code == 2
        assert words in result.output and len(result.output.strip().splitlines()) == 1


# -- pull: the command and the remotes table ----------------------------------------------


def test_pull_command_clones_remembers_and_respects_the_interval(live_server, runner):
    email, _token = new_account(runner)
    r = requests.post(
        live_server.url + "/api/links",
        json={"files": [{"contentType": shl.FHIR_JSON, "content": minimal_bundle()}], "flags": "L"},
        timeout=10,
    )
    link = r.json()["shlink"]
    n = len(minimal_bundle()["entry"])
    time.sleep(
        1.1
    )  # lastUpdated has one-second resolution: let it settle (see Resolved.settled_updates)
    first = runner.invoke(cli, ["pull", link, "--account", email])
    assert first.exit_code == 0, first.output
    assert f"created {n}," in first.output
    again = runner.invoke(cli, ["pull", "--account", email])  # every remote, too soon
    assert again.exit_code == 0 and "skipped: pulled less than 60 s ago" in again.output
    forced = runner.invoke(cli, ["pull", "--account", email, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "unchanged skipped 1" in forced.output and "created" not in forced.output
    from shlhost.storage.models import Remote

    rt = runner.app.extensions["shlhost"]
    with rt.sessions() as session:
        remotes = session.query(Remote).filter(Remote.url == r.json()["url"]).all()
    assert len(remotes) == 1 and remotes[0].flag == "L"
    key = json.loads(b64url_decode(link.split("shlink:/")[1]))["key"]
    assert b64url_decode(key) not in remotes[0].wrapped_key  # wrapped, never stored in the clear
    assert json.loads(remotes[0].last_file_updates)["0"]


def test_pull_api_needs_a_token_and_refuses_private_addresses(client, fhir):
    assert client.post("/api/pull", json={"link": "x"}).status_code == 401
    r = client.post("/api/pull", json={"link": "not a link"}, headers=fhir.headers)
    assert r.status_code == 400 and r.get_json()["error"] == "not_a_link"
    r = client.post(
        "/api/pull", json={"link": link_to("http://127.0.0.1:9/m")}, headers=fhir.headers
    )
    assert r.status_code == 502 and r.get_json()["error"] == "refused_address"
    assert (
        shl.public_only("http://10.1.2.3/x") is False
        and shl.public_only("file:///etc/passwd") is False
    )


def test_pull_api_imports_and_keeps_its_interval(base_config, live_server):
    from tests.conftest import make_app
    from tests.functional.conftest import counts

    app = make_app(base_config, PULL_ALLOW_PRIVATE=True)
    email, token = new_account(app.test_cli_runner())
    headers = {"Authorization": f"Bearer {token}"}
    r = requests.post(
        live_server.url + "/api/links",
        json={
            "files": [{"contentType": shl.FHIR_JSON, "content": minimal_bundle()}],
            "passcode": "pw",
        },
        timeout=10,
    )
    link = r.json()["shlink"]
    web = app.test_client()
    wrong = web.post("/api/pull", json={"link": link, "passcode": "nope"}, headers=headers)
    assert wrong.status_code == 502 and wrong.get_json()["error"] == "wrong_passcode"
    assert wrong.get_json()["remainingAttempts"] == 4
    first = web.post("/api/pull", json={"link": link, "passcode": "pw"}, headers=headers)
    assert first.status_code == 200, first.get_json()
    assert counts(first.get_json())["created"] == len(minimal_bundle()["entry"])
    again = web.post("/api/pull", json={"link": link, "passcode": "pw"}, headers=headers)
    assert again.status_code == 429 and int(again.headers["Retry-After"]) > 0
    app.extensions["shlhost"].engine.dispose()


def test_pull_imports_the_resources_of_a_health_card(live_server, runner):
    token = spec_jwe()
    email, api_token = new_account(runner)
    r = requests.post(
        live_server.url + "/api/links",
        json={"files": [{"contentType": shl.SHC, "jwe": token}]},
        timeout=10,
    )
    link = link_to(r.json()["url"])
    result = runner.invoke(cli, ["pull", link, "--account", email])
    assert result.exit_code == 0, result.output
    assert "created 4," in result.output and "health cards: " in result.output
    web = runner.app.test_client()
    found = web.get(
        "/fhir/Immunization", headers={"Authorization": f"Bearer {api_token}"}
    ).get_json()
    assert found["total"] == 3
    assert {e["resource"]["meta"]["source"] for e in found["entry"]} == {r.json()["url"]}
    again = runner.invoke(cli, ["pull", link, "--account", email, "--force"])
    assert again.exit_code == 0, again.output
    # Nothing new: no new versions (the file is either skipped or found unchanged).
    assert "created 0, updated 0" in again.output or "nothing changed" in again.output
