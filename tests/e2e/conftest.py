"""Browser fixtures: playwright (Python) driving Debian's Chromium at /usr/bin/chromium.

No browser is ever downloaded: playwright's own builds are not used. Without Chromium or
playwright the tests skip, saying why; in CI (CI=true) they fail instead.

``tab`` is a fresh browser context (own storage) and page that records every request,
console error, page error and dialog, so tests can assert that nothing left the live
server and that no script injected by a record ran.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from tests.conftest import ROOT, LiveServer, require

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOTS = ROOT / "docs" / "screenshots"
TIMEOUT_MS = 15_000


@pytest.fixture(scope="session")
def playwright_api() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        require(False, "playwright is not installed: pip install -e '.[test]'")
        raise  # unreachable: require() skips or fails
    with sync_playwright() as api:
        yield api


def launch(playwright_api: Any, extra_args: list[str] | None = None) -> Any:
    require(
        CHROMIUM.exists(),
        f"{CHROMIUM} is missing: apt-get install -y chromium (never a browser download)",
    )
    return playwright_api.chromium.launch(
        executable_path=str(CHROMIUM), args=CHROMIUM_ARGS + (extra_args or [])
    )


@pytest.fixture(scope="session")
def browser(playwright_api: Any) -> Iterator[Any]:
    instance = launch(playwright_api)
    yield instance
    instance.close()


@dataclass
class Tab:
    page: Any
    requests: list[Any] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    page_errors: list[str] = field(default_factory=list)
    dialogs: list[str] = field(default_factory=list)

    def open(self, url: str) -> None:
        self.page.goto(url, wait_until="domcontentloaded")

    def submit(self, *, passcode: str | None = None, recipient: str | None = None) -> None:
        """Fill the access form the viewer shows for a link, then press Enter in it."""
        page = self.page
        page.locator("#access-form").wait_for(state="visible", timeout=TIMEOUT_MS)
        if recipient is not None:
            page.fill("#recipient", recipient)
        if passcode is not None:
            page.fill("#passcode", passcode)
            page.press("#passcode", "Enter")
        else:
            page.click("#open-button")

    def message(self) -> str:
        box = self.page.locator("#message")
        box.wait_for(state="visible", timeout=TIMEOUT_MS)
        return str(box.inner_text())

    def wait_record(self) -> Any:
        record = self.page.locator("#record")
        record.wait_for(state="visible", timeout=TIMEOUT_MS)
        return record

    def screenshot(self, name: str, *, full_page: bool = True) -> None:
        """Only with SHLHOST_SCREENSHOTS=1, so that ordinary runs never rewrite docs/."""
        if os.environ.get("SHLHOST_SCREENSHOTS") == "1":
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            self.page.screenshot(path=str(SCREENSHOTS / name), full_page=full_page)


def new_tab(browser: Any, **context_options: Any) -> tuple[Any, Tab]:
    context = browser.new_context(**context_options)
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    tab = Tab(page)
    page.on("request", lambda req: tab.requests.append(req))
    page.on(
        "console", lambda msg: tab.console_errors.append(msg.text) if msg.type == "error" else None
    )
    page.on("pageerror", lambda exc: tab.page_errors.append(str(exc)))

    def on_dialog(dialog: Any) -> None:
        tab.dialogs.append(dialog.message)
        dialog.dismiss()

    page.on("dialog", on_dialog)
    return context, tab


@pytest.fixture
def tab(browser: Any) -> Iterator[Tab]:
    context, t = new_tab(browser, viewport={"width": 1100, "height": 900})
    yield t
    context.close()


# ---------------------------------------------------------------- records and links


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def bundle(*resources: dict[str, Any]) -> dict[str, Any]:
    return {
        "resourceType": "Bundle",
        "type": "collection",
        "entry": [
            {"fullUrl": f"urn:uuid:{r['resourceType'].lower()}-{i}", "resource": r}
            for i, r in enumerate(resources)
        ],
    }


def patient(name: str = "Ada Lovelace", **extra: Any) -> dict[str, Any]:
    given, family = name.split(" ", 1)
    return {
        "resourceType": "Patient",
        "id": "p1",
        "name": [{"use": "official", "family": family, "given": [given]}],
        "birthDate": "1815-12-10",
        "gender": "female",
        "identifier": [{"type": {"text": "MRN"}, "value": "MRN-0042"}],
        **extra,
    }


def medication(text: str, ident: str) -> dict[str, Any]:
    return {
        "resourceType": "MedicationStatement",
        "id": ident,
        "status": "active",
        "subject": {"reference": "Patient/p1"},
        "medicationCodeableConcept": {"text": text},
        "dosage": [{"text": "1 tablet daily"}],
        "effectiveDateTime": "2024-03-01",
    }


def sample_record(name: str = "Ada Lovelace") -> dict[str, Any]:
    """The issue's record: a Patient, two medications, an allergy, a problem, a result."""
    return bundle(
        patient(name),
        medication("Metformin 500 mg tablet", "m1"),
        medication("Lisinopril 10 mg tablet", "m2"),
        {
            "resourceType": "AllergyIntolerance",
            "id": "a1",
            "patient": {"reference": "Patient/p1"},
            "code": {"text": "Penicillin"},
            "criticality": "high",
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "reaction": [{"manifestation": [{"text": "Hives"}], "severity": "moderate"}],
        },
        {
            "resourceType": "Condition",
            "id": "c1",
            "subject": {"reference": "Patient/p1"},
            "code": {
                "coding": [
                    {
                        "system": "http://snomed.info/sct",
                        "code": "44054006",
                        "display": "Type 2 diabetes mellitus",
                    }
                ]
            },
            "clinicalStatus": {"coding": [{"code": "active"}]},
            "onsetDateTime": "2019-05-02",
        },
        {
            "resourceType": "Observation",
            "id": "o1",
            "status": "final",
            "subject": {"reference": "Patient/p1"},
            "code": {
                "coding": [
                    {"system": "http://loinc.org", "code": "4548-4", "display": "Hemoglobin A1c"}
                ]
            },
            "valueQuantity": {"value": 7.2, "unit": "%"},
            "effectiveDateTime": "2024-02-20T09:30:00Z",
            "referenceRange": [{"high": {"value": 5.7, "unit": "%"}}],
        },
    )


def create_link(
    server: LiveServer, content: dict[str, Any] | None = None, **options: Any
) -> dict[str, Any]:
    files = [{"contentType": "application/fhir+json", "content": content or sample_record()}]
    r = requests.post(server.url + "/api/links", json={"files": files, **options}, timeout=30)
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def create_encrypted_link(
    server: LiveServer, jwe: str, content_type: str, **options: Any
) -> dict[str, Any]:
    """Upload a JWE the test encrypted itself: the server never sees the key."""
    r = requests.post(
        server.url + "/api/links",
        json={"files": [{"contentType": content_type, "jwe": jwe}], **options},
        timeout=30,
    )
    assert r.status_code == 201, r.text
    created: dict[str, Any] = r.json()
    return created


def encrypt_jwe(plaintext: bytes, key: bytes, content_type: str, *, deflate: bool = False) -> str:
    """A compact JWE made without shlhost's code (dir, A256GCM, optional zip DEF)."""
    header: dict[str, str] = {"alg": "dir", "enc": "A256GCM", "cty": content_type}
    if deflate:
        header["zip"] = "DEF"
        packer = zlib.compressobj(9, zlib.DEFLATED, -15)
        plaintext = packer.compress(plaintext) + packer.flush()
    protected = b64url(json.dumps(header, separators=(",", ":")).encode())
    iv = secrets.token_bytes(12)
    sealed = AESGCM(key).encrypt(iv, plaintext, protected.encode("ascii"))
    return ".".join((protected, "", b64url(iv), b64url(sealed[:-16]), b64url(sealed[-16:])))


def shlink(
    url: str, key: bytes | str, *, flag: str = "", label: str | None = None, **extra: Any
) -> str:
    data: dict[str, Any] = {"url": url, "key": key if isinstance(key, str) else b64url(key)}
    if flag:
        data["flag"] = flag
    if label:
        data["label"] = label
    data.update(extra)
    return "shlink:/" + b64url(json.dumps(data, separators=(",", ":")).encode())


def viewer_url(server: LiveServer, link: str) -> str:
    return f"{server.url}/view#{link}"
