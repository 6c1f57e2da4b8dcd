"""Crash safety: SIGKILL the gunicorn master and its workers in the middle of a large $import
and of a multi-MB upload, start a new server on the same database and blob store, and check
the store: an import is there whole or not at all, what was committed before is intact, no
link is half written, and ``shlhost gc`` (BLOB_GRACE_SECONDS=0) sweeps any orphaned blob."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import requests
from sqlalchemy import select

from shlhost.cli import cli
from shlhost.storage.models import Link, LinkFile
from tests.conftest import LiveServer, make_app
from tests.functional.conftest import new_account

pytestmark = [pytest.mark.live, pytest.mark.slow]

OBSERVATIONS = 12_000  # about 4 MB of NDJSON


def _children(pid: int) -> list[int]:
    found: list[int] = []
    task_dir = Path(f"/proc/{pid}/task")
    for task in task_dir.iterdir() if task_dir.exists() else []:
        try:
            found += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def kill_server(server: LiveServer) -> None:
    """SIGKILL the master and every worker at once: nothing gets to clean up."""
    pids = [server.proc.pid, *_children(server.proc.pid)]
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    server.proc.wait(10)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(
        Path(f"/proc/{p}").exists() and _alive(p) for p in pids[1:]
    ):
        time.sleep(0.05)
    server.stop()


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _in_background(fn: Any) -> threading.Thread:
    def run() -> None:
        with contextlib.suppress(requests.RequestException):  # the server died under it
            fn()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@pytest.fixture
def config(base_config: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    return {
        **base_config,
        "BLOB_PATH": str(blobs),
        "BLOB_GRACE_SECONDS": 0,
        "MAX_CONTENT_LENGTH": 32 * 1024 * 1024,
    }


def _token(config: dict[str, Any]) -> str:
    app = make_app(config)
    try:
        return new_account(app.test_cli_runner())[1]
    finally:
        app.extensions["shlhost"].engine.dispose()


def _total(server: LiveServer, token: str, rtype: str) -> int:
    r = requests.get(
        f"{server.url}/fhir/{rtype}?_count=0",
        headers={"Authorization": f"Bearer {token}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    total: int = r.json()["total"]
    return total


def _big_ndjson(tag: str) -> bytes:
    lines = [
        json.dumps(
            {
                "resourceType": "Observation",
                "id": f"{tag}-{i}",
                "status": "final",
                "code": {"text": f"{tag} measurement {i} " + "x" * 200},
                "subject": {"reference": "Patient/crash-p0"},
                "valueQuantity": {"value": i, "unit": "mg"},
            }
        )
        for i in range(OBSERVATIONS)
    ]
    return ("\n".join(lines) + "\n").encode()


@pytest.mark.parametrize("fraction", [0.2, 0.5, 0.85])
def test_import_killed_mid_request_is_all_or_nothing(
    config: dict[str, Any], fraction: float
) -> None:
    token = _token(config)
    auth = {"Authorization": f"Bearer {token}"}
    server = LiveServer(config, workers=1, threads=2)
    try:
        earlier = b"".join(
            json.dumps(
                {"resourceType": "Patient", "id": f"crash-p{i}", "name": [{"family": f"P{i}"}]}
            ).encode()
            + b"\n"
            for i in range(5)
        )
        r = requests.post(
            f"{server.url}/fhir/Bundle/$import",
            data=earlier,
            timeout=60,
            headers={**auth, "Content-Type": "application/x-ndjson"},
        )
        assert r.status_code == 200, r.text

        # How long a whole import takes here: the kill lands at a fraction of that.
        calibration = _big_ndjson("calibration")
        t0 = time.monotonic()
        r = requests.post(
            f"{server.url}/fhir/Bundle/$import",
            data=calibration,
            timeout=300,
            headers={**auth, "Content-Type": "application/x-ndjson"},
        )
        assert r.status_code == 200, r.text
        delay = (time.monotonic() - t0) * fraction

        body = _big_ndjson("crash")
        assert len(body) > 3_000_000
        started = time.monotonic()
        thread = _in_background(
            lambda: requests.post(
                f"{server.url}/fhir/Bundle/$import",
                data=body,
                timeout=120,
                headers={**auth, "Content-Type": "application/x-ndjson"},
            )
        )
        time.sleep(delay)
        finished_first = not thread.is_alive()
        kill_server(server)
        thread.join(30)
        elapsed = time.monotonic() - started
    finally:
        server.stop()

    again = LiveServer(config, workers=1, threads=2)
    try:
        assert _total(again, token, "Patient") == 5, "data committed before the crash was lost"
        observations = _total(again, token, "Observation") - OBSERVATIONS  # less the calibration
        assert observations in (0, OBSERVATIONS), (
            f"half an import: {observations} of {OBSERVATIONS}"
        )
        if finished_first:
            assert observations == OBSERVATIONS
        # The server works normally after the crash: the same import completes now.
        r = requests.post(
            f"{again.url}/fhir/Bundle/$import",
            data=body,
            timeout=300,
            headers={**auth, "Content-Type": "application/x-ndjson"},
        )
        assert r.status_code == 200, r.text
        assert _total(again, token, "Observation") == 2 * OBSERVATIONS
    finally:
        again.stop()
    assert elapsed < 60


def _check_links_and_gc(config: dict[str, Any], link_ids_before: set[str]) -> None:
    """No link without its files' blobs; after gc, no blob that no row references."""
    app = make_app(config)
    rt = app.extensions["shlhost"]
    try:
        with rt.sessions() as session:
            links = session.scalars(select(Link)).all()
            for link in links:
                if link.id in link_ids_before or link.revoked_at is not None:
                    continue
                files = session.scalars(select(LinkFile).where(LinkFile.link_id == link.id)).all()
                assert files, f"link {link.id} has no files: half written"
                for f in files:
                    assert f.blob_key is not None
                    assert rt.blobs.get(f.blob_key), f"link {link.id} lost a blob"
        result = app.test_cli_runner().invoke(cli, ["gc"])
        assert result.exit_code == 0, result.output
        with rt.sessions() as session:
            referenced = set(
                session.scalars(select(LinkFile.blob_key).where(LinkFile.blob_key.is_not(None)))
            )
        in_store = {key for key, _when in rt.blobs.list("links/")}
        assert in_store <= referenced, (
            f"orphaned blobs after gc: {sorted(in_store - referenced)[:5]}"
        )
    finally:
        rt.engine.dispose()


def test_upload_killed_mid_way_leaves_no_half_link_and_gc_sweeps_orphans(
    config: dict[str, Any],
) -> None:
    app = make_app(config)
    rt = app.extensions["shlhost"]
    with rt.sessions() as session:
        before = set(session.scalars(select(Link.id)))
    rt.engine.dispose()
    entries = [
        {
            "resource": {
                "resourceType": "Observation",
                "id": f"o{i}",
                "status": "final",
                "code": {"text": os.urandom(60).hex()},
            }
        }
        for i in range(20_000)
    ]
    big = json.dumps({"resourceType": "Bundle", "type": "collection", "entry": entries}).encode()
    assert len(big) > 4_000_000

    committed: list[str] = []
    for fraction in (0.15, 0.5, 0.8, 0.95):
        server = LiveServer(config, workers=1, threads=2)
        try:
            # One upload that completes (it must survive the crash) and says how long one takes.
            t0 = time.monotonic()
            r = requests.post(
                f"{server.url}/api/links", files={"file": ("big.json", big)}, timeout=120
            )
            assert r.status_code == 201, r.text
            delay = (time.monotonic() - t0) * fraction
            committed.append(r.json()["id"])
            url = f"{server.url}/api/links"
            thread = _in_background(
                lambda url=url: requests.post(
                    url,
                    files={"file": ("big.json", big)},
                    data={"label": "crash"},
                    timeout=120,
                )
            )
            time.sleep(delay)
            kill_server(server)
            thread.join(30)
        finally:
            server.stop()

    again = LiveServer(config, workers=1, threads=2)
    try:
        for link_id in committed:
            r = requests.post(
                f"{again.url}/shl/{link_id}", json={"recipient": "after the crash"}, timeout=30
            )
            assert r.status_code == 200, r.text
    finally:
        again.stop()
    _check_links_and_gc(config, before)
