"""A 100 MB .sphr through the HTTP API and back, with the server's peak memory.

    .venv/bin/python bench/upload.py [--mib 100] [--database-url postgresql+psycopg://...]

What it does: writes a .sphr of ``--mib`` MiB (a .phr with a patient and a DocumentReference,
and an incompressible "scan" the DocumentReference points at, stored); starts the production
server (gunicorn, shlhost's config, one worker with four threads, SQLite in a temporary
folder unless ``--database-url``); streams the file to ``POST /api/links`` as a multipart
upload; asks the manifest (no embeddedLengthMax, so a location); fetches the JWE from the
location to a file; decrypts it with shlhost's streaming code and checks the scan came back
bit for bit. Then the same bytes through the transport floor: a bare WSGI app
(bench/floor_app.py) under the same gunicorn that only spools the upload to a temporary file
and sends a file of the JWE's size back.

It prints seconds for the upload (the server reads the upload, turns the record into a
Bundle, encrypts it into the blob store) and for the fetch, beside the floor, and the
server's memory: the worker's resident size before the upload and its peak (VmHWM) after
the fetch, against the payload size. Target (issue 9): the worker's growth stays a small
fraction of the payload (streaming), reported as a ratio.
"""

from __future__ import annotations

import argparse
import filecmp
import hashlib
import http.client
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MiB = 1 << 20
MEMORY_TARGET = 0.25  # the worker may grow by at most a quarter of the payload


def _manifest_bench() -> Any:  # bench/manifest.py is a script, not a package module
    spec = importlib.util.spec_from_file_location("bench_manifest", ROOT / "bench" / "manifest.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_manifest"] = module  # its dataclasses look themselves up there
    spec.loader.exec_module(module)
    return module


def make_sphr(path: Path, mib: int) -> str:
    """Write the .sphr; return the sha256 of its scan."""
    digest = hashlib.sha256()
    lines = [
        {"resourceType": "Patient", "id": "p1", "name": [{"family": "Bench", "given": ["Ada"]}]},
        {"resourceType": "DocumentReference", "id": "scan", "subject": {"reference": "Patient/p1"},
         "content": [{"attachment": {"contentType": "application/dicom", "url": "images/scan.dcm"}}]},
    ]
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("export/record.phr", "\n".join(json.dumps(line) for line in lines) + "\n")
        with zf.open(zipfile.ZipInfo("export/images/scan.dcm"), "w", force_zip64=True) as member:
            for _ in range(mib):
                piece = os.urandom(MiB)
                digest.update(piece)
                member.write(piece)
    return digest.hexdigest()


def memory(pid: int) -> dict[str, int]:
    found = {}
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            key = line.split(":")[0]
            if key in ("VmRSS", "VmHWM"):
                found[key] = int(line.split()[1]) * 1024
    return found


def worker_pid(master: int) -> int:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = Path(f"/proc/{master}/task/{master}/children").read_text().split()
        if children:
            return int(children[0])
        time.sleep(0.1)
    raise RuntimeError("gunicorn started no worker")


def post_file(port: int, path: str, field_file: Path, filename: str) -> tuple[int, bytes, float]:
    """A multipart upload streamed from the file (never whole in this process's memory)."""
    boundary = uuid.uuid4().hex
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    length = len(head) + field_file.stat().st_size + len(tail)

    def body() -> Iterator[bytes]:
        yield head
        with field_file.open("rb") as fh:
            while piece := fh.read(1 << 20):
                yield piece
        yield tail

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    start = time.perf_counter()
    conn.request("POST", path, body=body(), headers={
        "Content-Type": f"multipart/form-data; boundary={boundary}", "Content-Length": str(length)})
    resp = conn.getresponse()
    data = resp.read()
    seconds = time.perf_counter() - start
    conn.close()
    return resp.status, data, seconds


def get_to_file(url: str, out: Path) -> float:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=600)
    start = time.perf_counter()
    conn.request("GET", parts.path + ("?" + parts.query if parts.query else ""))
    resp = conn.getresponse()
    if resp.status != 200:
        raise RuntimeError(f"GET answered {resp.status}")
    with out.open("wb") as fh:
        while piece := resp.read(1 << 20):
            fh.write(piece)
    seconds = time.perf_counter() - start
    conn.close()
    return seconds


def run_shlhost(mb: Any, args: argparse.Namespace, work: Path, sphr: Path) -> dict[str, Any]:
    from shlhost.crypto import jwe
    from shlhost.crypto.b64 import b64url_decode

    database = mb.Database(args.database_url, work)
    database.create()
    server = mb.Server(database.url, work, workers=1, threads=4)
    server.env["SHLHOST_MAX_CONTENT_LENGTH"] = str(4 * args.mib * MiB)
    try:
        server.start()
        worker = worker_pid(server.pid)
        before = memory(worker)
        status, body, upload_s = post_file(server.port, "/api/links", sphr, "record.sphr")
        if status != 201:
            raise RuntimeError(f"upload answered {status}: {body[:300]!r}")
        created = json.loads(body)
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
        conn.request("POST", f"/shl/{created['id']}", body=json.dumps({"recipient": "bench"}),
                     headers={"Content-Type": "application/json"})
        manifest = json.loads(conn.getresponse().read())
        conn.close()
        token = work / "fetched.jwe"
        fetch_s = get_to_file(manifest["files"][0]["location"], token)
        after = memory(worker)
        key = b64url_decode(json.loads(b64url_decode(created["shlink"].split("shlink:/", 1)[1]))["key"])
        plain = work / "bundle.json"
        with token.open("rb") as src, plain.open("wb") as dst:
            jwe.decrypt_stream(src, dst, key)
        return {"database": database.label, "upload_s": upload_s, "fetch_s": fetch_s,
                "jwe_bytes": token.stat().st_size, "bundle": plain, "before": before, "after": after}
    finally:
        server.stop()
        database.drop()


def run_floor(mb: Any, work: Path, sphr: Path, jwe_file: Path) -> dict[str, float]:
    server = mb.Server("sqlite://", work, workers=1, threads=4)
    server.cmd = [arg if arg != "shlhost.wsgi:app" else "floor_app:app" for arg in server.cmd]
    server.cmd[3:3] = ["--pythonpath", str(ROOT / "bench")]
    server.env["FLOOR_FILE"] = str(jwe_file)
    server.log_path = work / "floor.log"
    try:
        _start_floor(server)
        status, _body, upload_s = post_file(server.port, "/", sphr, "record.sphr")
        if status != 200:
            raise RuntimeError(f"the floor app answered {status}")
        fetch_s = get_to_file(f"http://127.0.0.1:{server.port}/", work / "floor-copy")
        if not filecmp.cmp(work / "floor-copy", jwe_file, shallow=False):
            raise RuntimeError("the floor app sent something else")
        return {"upload_s": upload_s, "fetch_s": fetch_s}
    finally:
        server.stop()


def _start_floor(server: Any) -> None:
    log = open(server.log_path, "wb")  # noqa: SIM115 - closed by server.stop()
    server._log = log
    server.proc = subprocess.Popen(server.cmd, env=server.env, cwd=ROOT, stdout=log,  # noqa: S603
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=1)
            conn.request("POST", "/", body=b"")
            conn.getresponse().read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("the floor app did not start")


def check_scan(bundle: Path, expected: str) -> None:
    import base64

    with bundle.open("rb") as fh:
        doc = json.load(fh)
    data = doc["entry"][1]["resource"]["content"][0]["attachment"]["data"]
    if hashlib.sha256(base64.b64decode(data)).hexdigest() != expected:
        raise RuntimeError("the scan did not come back bit for bit")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=100, help="size of the scan in the .sphr, MiB")
    parser.add_argument("--database-url", help="a PostgreSQL url (default: SQLite in a temporary folder)")
    args = parser.parse_args()
    mb = _manifest_bench()
    with tempfile.TemporaryDirectory(prefix="shlhost-bench-upload-") as tmp:
        work = Path(tmp)
        sphr = work / "record.sphr"
        expected = make_sphr(sphr, args.mib)
        shl = run_shlhost(mb, args, work, sphr)
        floor = run_floor(mb, work, sphr, work / "fetched.jwe")
        check_scan(shl["bundle"], expected)
        payload = sphr.stat().st_size
        growth = shl["after"]["VmHWM"] - shl["before"]["VmRSS"]
        ratio = growth / payload
        print(f"bench/upload.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, commit {mb.git_commit()}, "
              f"{platform.python_version()}, {os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, "
              f"{shl['database']}, local blob store")
        print(f"upload: a {payload / MiB:.1f} MiB .sphr; the link's JWE: {shl['jwe_bytes'] / MiB:.1f} MiB")
        print()
        print("| step | shlhost s | floor s | ratio |")
        print("|:---|---:|---:|---:|")
        for step, label in (("upload_s", "upload (POST /api/links -> 201)"),
                            ("fetch_s", "fetch (GET location)")):
            print(f"| {label} | {shl[step]:.2f} | {floor[step]:.2f} | {shl[step] / floor[step]:.1f} |")
        print()
        print("| server worker | MiB |")
        print("|:---|---:|")
        print(f"| resident before the upload | {shl['before']['VmRSS'] / MiB:.0f} |")
        print(f"| peak (VmHWM) after the fetch | {shl['after']['VmHWM'] / MiB:.0f} |")
        print(f"| growth | {growth / MiB:.0f} |")
        print(f"| growth / payload | {ratio:.2f} |")
        met = ratio <= MEMORY_TARGET
        print(f"target: the worker grows by at most {MEMORY_TARGET:.2f}x the payload: "
              f"{'met' if met else 'NOT met'}; the scan came back bit for bit")
        return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
