"""Manifest throughput: ``POST /shl/<id>`` against the trivial ``GET /healthz``, same run.

Run from the repository root::

    .venv/bin/python bench/manifest.py                       # SQLite in a temporary folder
    .venv/bin/python bench/manifest.py --database-url postgresql+psycopg://root@127.0.0.1:5432/test

What it does, in order: make a temporary instance folder; run the real migrations (on a
fresh SQLite file, or in a fresh PostgreSQL schema that is dropped afterwards); start the
production server (gunicorn with ``shlhost/gunicorn_conf.py``, its worker count unless
``--workers``) on 127.0.0.1 with the rate limiter off, and wait until every worker has
loaded the app; create one link (or ``--links N``) without passcode carrying one small FHIR
Bundle through ``POST /api/links``; check one manifest answer per link in full (200, the
file embedded, the JWE decrypts with the link's key); then load each endpoint for a fixed
time with a fixed number of keep-alive connections and print one table (with the CPU time
the gunicorn processes spent per request, from /proc), the ratio manifest/trivial against
its target, and what it ran on. The server is stopped, and the PostgreSQL schema dropped,
whatever happens (SIGTERM and Ctrl-C included).

The load generator is ``wrk`` when it is installed (``apt-get install wrk``), else a
Python client of several processes with persistent ``http.client`` connections; the output
says which. Every answer's status is counted; any answer that is not 200 is an error and is
printed.

Exit status: 0 when the ratio meets its target and there were no errors, 1 otherwise,
2 when the bench could not run.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import http.client
import json
import math
import multiprocessing
import os
import platform
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402 - after the path is set
from sqlalchemy.engine import make_url  # noqa: E402

from shlhost.crypto import jwe  # noqa: E402
from shlhost.crypto.b64 import b64url_decode  # noqa: E402
from shlhost.shl import payload as shl_payload  # noqa: E402
from shlhost.storage import migrate  # noqa: E402
from shlhost.storage.db import make_engine, normalise_url  # noqa: E402

TARGET_RATIO = 0.5
HOST = "127.0.0.1"  # the bench never sends a request anywhere else
MANIFEST_BODY = {"recipient": "bench", "embeddedLengthMax": 100000}

# A small but real collection Bundle: a patient, a condition, an observation.
BUNDLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [
        {
            "fullUrl": "urn:uuid:7f3b3e0c-0000-4000-8000-000000000001",
            "resource": {
                "resourceType": "Patient",
                "id": "bench-patient",
                "name": [{"family": "Bench", "given": ["Ada"]}],
                "gender": "female",
                "birthDate": "1980-01-01",
            },
        },
        {
            "fullUrl": "urn:uuid:7f3b3e0c-0000-4000-8000-000000000002",
            "resource": {
                "resourceType": "Condition",
                "id": "bench-condition",
                "subject": {"reference": "urn:uuid:7f3b3e0c-0000-4000-8000-000000000001"},
                "code": {"coding": [{"system": "http://snomed.info/sct", "code": "38341003",
                                     "display": "Hypertensive disorder"}]},
                "clinicalStatus": {"coding": [{
                    "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                    "code": "active"}]},
            },
        },
        {
            "fullUrl": "urn:uuid:7f3b3e0c-0000-4000-8000-000000000003",
            "resource": {
                "resourceType": "Observation",
                "id": "bench-bp",
                "status": "final",
                "subject": {"reference": "urn:uuid:7f3b3e0c-0000-4000-8000-000000000001"},
                "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6",
                                     "display": "Systolic blood pressure"}]},
                "effectiveDateTime": "2024-05-01T09:30:00Z",
                "valueQuantity": {"value": 142, "unit": "mmHg",
                                  "system": "http://unitsofmeasure.org", "code": "mm[Hg]"},
            },
        },
    ],
}


class BenchError(RuntimeError):
    """The bench could not run; the message says why."""


# ---------------------------------------------------------------------------------------
# Results


@dataclass
class Result:
    endpoint: str
    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    statuses: dict[str, int] = field(default_factory=dict)
    socket_errors: int = 0
    samples: list[str] = field(default_factory=list)
    # CPU seconds the gunicorn processes spent during the run (Linux /proc), or None.
    server_cpu_s: float | None = None
    # The load's keep-alive connections held by each worker, a second into the run.
    per_worker: list[int] = field(default_factory=list)

    @property
    def cpu_ms_per_request(self) -> float | None:
        if self.server_cpu_s is None or not self.requests:
            return None
        return self.server_cpu_s * 1000 / self.requests

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def errors(self) -> int:
        """Answers other than 200, plus requests that got no answer at all."""
        return sum(n for code, n in self.statuses.items() if code != "200") + self.socket_errors

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["seconds"] = round(self.seconds, 3)
        out["p50_ms"] = round(self.p50_ms, 3)
        out["p99_ms"] = round(self.p99_ms, 3)
        out["rps"] = round(self.rps, 1)
        out["errors"] = self.errors
        cpu = self.cpu_ms_per_request
        out["server_cpu_s"] = None if self.server_cpu_s is None else round(self.server_cpu_s, 3)
        out["server_cpu_ms_per_request"] = None if cpu is None else round(cpu, 3)
        return out


def percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted list."""
    if not sorted_values:
        return 0.0
    rank = min(len(sorted_values), max(1, math.ceil(pct / 100 * len(sorted_values))))
    return sorted_values[rank - 1]


# ---------------------------------------------------------------------------------------
# Load generator 1: wrk, with a Lua script that counts statuses and keeps a few bad answers

WRK_LUA = r"""
-- Generated by bench/manifest.py.
wrk.method = "%(method)s"
%(body)s
wrk.headers["Content-Type"] = "application/json"

-- One or more paths, taken in turn by each connection's requests.
local paths = {%(paths)s}
local counter = 0

function request()
  counter = counter + 1
  return wrk.format(nil, paths[(counter %% #paths) + 1])
end

local threads = {}

function setup(thread)
  table.insert(threads, thread)
end

function init(args)
  statuses = {}
  samples = {}
  nsamples = 0
end

function response(status, headers, body)
  local key = tostring(status)
  statuses[key] = (statuses[key] or 0) + 1
  if status ~= 200 and nsamples < 3 then
    nsamples = nsamples + 1
    local flat = (string.gsub(body or "", "%%s+", " "))
    samples[nsamples] = key .. " " .. string.sub(flat, 1, 300)
  end
end

function done(summary, latency, requests)
  local counts = {}
  local lines = {}
  for _, t in ipairs(threads) do
    for k, v in pairs(t:get("statuses")) do counts[k] = (counts[k] or 0) + v end
    for _, line in ipairs(t:get("samples")) do table.insert(lines, line) end
  end
  local parts = {}
  for k, v in pairs(counts) do table.insert(parts, string.format('"%%s":%%d', k, v)) end
  local e = summary.errors
  io.write(string.format(
    'BENCH_JSON {"requests":%%d,"duration_us":%%d,"p50_us":%%d,"p99_us":%%d,' ..
    '"socket_errors":%%d,"statuses":{%%s}}\n',
    summary.requests, summary.duration, latency:percentile(50), latency:percentile(99),
    e.connect + e.read + e.write + e.timeout, table.concat(parts, ",")))
  for _, line in ipairs(lines) do io.write("BENCH_SAMPLE " .. line .. "\n") end
end
"""


def wrk_version() -> str:
    out = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)  # noqa: S603, S607
    first = (out.stdout or out.stderr).splitlines()
    return first[0].split(" Copyright")[0].strip() if first else "wrk"


def run_wrk(port: int, method: str, paths: list[str], body: bytes | None, *, connections: int,
            threads: int, seconds: float, workdir: Path, name: str) -> Result:
    body_line = ""
    if body is not None:
        # A Lua long string: the JSON body needs no escaping inside [==[ ... ]==].
        body_line = "wrk.body = [==[" + body.decode("ascii") + "]==]"
    script = workdir / f"{name}.lua"
    lua_paths = ", ".join(json.dumps(p) for p in paths)  # ids and paths are plain ASCII
    script.write_text(WRK_LUA % {"method": method, "body": body_line, "paths": lua_paths})
    duration = max(1, round(seconds))
    cmd = ["wrk", "-t", str(threads), "-c", str(connections), "-d", f"{duration}s",
           "--timeout", "10s", "-s", str(script), f"http://{HOST}:{port}{paths[0]}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False,  # noqa: S603
                          timeout=duration + 60)
    data: dict[str, Any] | None = None
    samples: list[str] = []
    for line in proc.stdout.splitlines():
        if line.startswith("BENCH_JSON "):
            data = json.loads(line[len("BENCH_JSON "):])
        elif line.startswith("BENCH_SAMPLE "):
            samples.append(line[len("BENCH_SAMPLE "):])
    if proc.returncode != 0 or data is None:
        raise BenchError(f"wrk failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return Result(
        endpoint=f"{method} {paths[0]}",
        requests=int(data["requests"]),
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
        statuses={str(k): int(v) for k, v in data["statuses"].items()},
        socket_errors=int(data["socket_errors"]),
        samples=samples,
    )


# ---------------------------------------------------------------------------------------
# Load generator 2: Python processes, each with threads that own one keep-alive connection


def _client_thread(port: int, method: str, paths: list[str], body: bytes | None, start_at: float,
                   deadline: float, max_requests: int, out: dict[str, Any]) -> None:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    latencies: list[float] = out["latencies"]
    statuses: dict[str, int] = out["statuses"]
    samples: list[str] = out["samples"]
    time.sleep(max(0.0, start_at - time.time()))
    out["began"] = time.time()
    for n in range(max_requests):  # bounded even if the clock misbehaves
        if time.time() >= deadline:
            break
        began = time.perf_counter()
        try:
            conn.request(method, paths[n % len(paths)], body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        except (OSError, http.client.HTTPException):
            out["socket_errors"] += 1
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
            continue
        latencies.append(time.perf_counter() - began)
        key = str(resp.status)
        statuses[key] = statuses.get(key, 0) + 1
        if resp.status != 200 and len(samples) < 3:
            samples.append(f"{key} {' '.join(data.decode('utf-8', 'replace').split())[:300]}")
        if resp.will_close:
            conn.close()
            conn = http.client.HTTPConnection(HOST, port, timeout=10)
    conn.close()


def _client_process(port: int, method: str, paths: list[str], body: bytes | None, nconn: int,
                    start_at: float, deadline: float, max_requests: int,
                    queue: multiprocessing.Queue[dict[str, Any]]) -> None:
    import threading

    outs: list[dict[str, Any]] = []
    threads = []
    for _ in range(nconn):
        out: dict[str, Any] = {"latencies": [], "statuses": {}, "samples": [], "socket_errors": 0,
                               "began": start_at}
        outs.append(out)
        threads.append(threading.Thread(
            target=_client_thread,
            args=(port, method, paths, body, start_at, deadline, max_requests, out),
        ))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merged: dict[str, Any] = {"latencies": [], "statuses": {}, "samples": [], "socket_errors": 0,
                              "began": min(out["began"] for out in outs)}
    for out in outs:
        merged["latencies"].extend(out["latencies"])
        merged["samples"].extend(out["samples"])
        merged["socket_errors"] += out["socket_errors"]
        for k, v in out["statuses"].items():
            merged["statuses"][k] = merged["statuses"].get(k, 0) + v
    queue.put(merged)


def run_python(port: int, method: str, paths: list[str], body: bytes | None, *, connections: int,
               processes: int, seconds: float) -> Result:
    processes = max(1, min(processes, connections))
    # fork: the children need none of the imports again; the parent runs no threads.
    ctx = multiprocessing.get_context("fork")
    queue: multiprocessing.Queue[dict[str, Any]] = ctx.Queue()
    start_at = time.time() + 1.0  # every process starts sending at the same moment
    deadline = start_at + seconds
    share = [connections // processes + (1 if i < connections % processes else 0)
             for i in range(processes)]
    procs = [
        ctx.Process(target=_client_process,
                    args=(port, method, paths, body, n, start_at, deadline, 10_000_000, queue))
        for n in share
    ]
    try:
        for p in procs:
            p.start()
        try:
            parts = [queue.get(timeout=seconds + 60) for _ in procs]
        except Empty:
            raise BenchError("a Python load process gave no result") from None
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.terminate()
    latencies = sorted(x for part in parts for x in part["latencies"])
    statuses: dict[str, int] = {}
    for part in parts:
        for k, v in part["statuses"].items():
            statuses[k] = statuses.get(k, 0) + v
    # The window runs from the first request sent (normally start_at) to the deadline.
    window = deadline - min(part["began"] for part in parts)
    return Result(
        endpoint=f"{method} {paths[0]}",
        requests=len(latencies),
        seconds=window,
        p50_ms=percentile(latencies, 50) * 1000,
        p99_ms=percentile(latencies, 99) * 1000,
        statuses=statuses,
        socket_errors=sum(part["socket_errors"] for part in parts),
        samples=[s for part in parts for s in part["samples"]][:3],
    )


# ---------------------------------------------------------------------------------------
# The database, the server, the link


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def git_commit() -> str:
    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True,  # noqa: S603, S607
                                 text=True, check=False)
        except OSError:
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    commit = git("rev-parse", "--short=12", "HEAD") or "unknown"
    return commit + (" (work tree has changes)" if git("status", "--porcelain") else "")


class Database:
    """A migrated database for one run: a SQLite file, or a PostgreSQL schema dropped after."""

    def __init__(self, base_url: str | None, workdir: Path) -> None:
        self.schema: str | None = None
        self.admin_url: str | None = None
        if base_url is None:
            self.url = "sqlite:///" + str(workdir / "shlhost.db")
        else:
            base = normalise_url(base_url)
            if make_url(base).get_backend_name() != "postgresql":
                raise BenchError("--database-url must be a PostgreSQL url (SQLite is the default)")
            self.admin_url = base
            self.schema = f"shlhost_bench_{uuid.uuid4().hex[:12]}"
            sep = "&" if "?" in base else "?"
            self.url = f"{base}{sep}options=-csearch_path%3D{self.schema}"
        self.label = "sqlite"

    def create(self) -> None:
        if self.admin_url and self.schema:
            admin = create_engine(self.admin_url)
            try:
                with admin.begin() as conn:
                    conn.execute(text(f'CREATE SCHEMA "{self.schema}"'))
            finally:
                admin.dispose()
        engine = make_engine(self.url)
        try:
            try:
                migrate.upgrade(engine)
            except Exception as exc:  # noqa: BLE001 - any failure here means "cannot run"
                raise BenchError(f"the migrations failed: {type(exc).__name__}: {exc}") from exc
            with engine.connect() as conn:
                if engine.dialect.name == "postgresql":
                    version = conn.execute(text("SHOW server_version")).scalar()
                    self.label = f"postgresql {str(version).split()[0]} (schema {self.schema})"
                else:
                    version = conn.execute(text("SELECT sqlite_version()")).scalar()
                    self.label = f"sqlite {version} (WAL, file in a temporary folder)"
        finally:
            engine.dispose()

    def drop(self) -> None:
        if self.admin_url and self.schema:
            admin = create_engine(self.admin_url)
            try:
                with admin.begin() as conn:
                    conn.execute(text(f'DROP SCHEMA IF EXISTS "{self.schema}" CASCADE'))
            finally:
                admin.dispose()


class Server:
    """The production server: gunicorn with shlhost's own config file, on 127.0.0.1."""

    def __init__(self, db_url: str, workdir: Path, workers: int | None, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        self.log_path = workdir / "gunicorn.log"
        # Nothing of the caller's own shlhost, gunicorn or metrics set-up leaks in (a
        # PROMETHEUS_MULTIPROC_DIR of theirs would be emptied by gunicorn_conf.py).
        env = {k: v for k, v in os.environ.items()
               if not k.startswith("SHLHOST_")
               and k not in ("GUNICORN_CMD_ARGS", "PROMETHEUS_MULTIPROC_DIR")}
        env.update({
            "SHLHOST_ENV": "testing",
            "SHLHOST_INSTANCE_PATH": str(workdir / "instance"),
            "SHLHOST_DATABASE_URL": db_url,
            "SHLHOST_BLOB_PATH": str(workdir / "blobs"),
            "SHLHOST_PUBLIC_URL": self.url,
            "SHLHOST_RATELIMIT_ENABLED": "false",
            "SHLHOST_SECRET_KEY": "bench-" + secrets.token_urlsafe(32),
            "SHLHOST_KEY_ENCRYPTION_KEY":
                base64.urlsafe_b64encode(secrets.token_bytes(32)).decode().rstrip("="),
        })
        conf = ROOT / "shlhost" / "gunicorn_conf.py"
        self.cmd = [sys.executable, "-m", "gunicorn", "-c", str(conf),
                    "-b", f"{HOST}:{self.port}", "--threads", str(threads),
                    *(["-w", str(workers)] if workers else []), "shlhost.wsgi:app"]
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - handed to the child, closed in stop()
        self._log = log
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=log,  # noqa: S603
                                     stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BenchError(f"gunicorn exited early:\n{self.log_tail()}")
            try:
                status, _body = http_call(self.port, "GET", "/readyz", timeout=1)
                # Every worker, not just the first: connections opened while some are
                # still loading the app would all go to the ones that are up.
                if status == 200 and 0 < len(self.workers()) <= self.workers_ready():
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise BenchError(f"gunicorn did not become ready in {timeout:.0f} s:\n{self.log_tail()}")

    def workers(self) -> list[str]:
        """The worker processes' ids."""
        return Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text().split()

    def workers_ready(self) -> int:
        """Workers that have loaded the app (gunicorn_conf.py's post_worker_init line)."""
        try:
            return self.log_path.read_text(errors="replace").count("Worker ready (pid:")
        except OSError:
            return 0

    @property
    def pid(self) -> int:
        assert self.proc is not None, "the server is not started"
        return self.proc.pid

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # graceful: workers finish their requests
            try:
                self.proc.wait(35)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if getattr(self, "_log", None) is not None:
            self._log.close()


def http_call(port: int, method: str, path: str, body: Any = None,
              headers: dict[str, str] | None = None, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = dict(headers or {})
        if data is not None:
            hdrs["Content-Type"] = "application/json"
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


@dataclass
class BenchLink:
    id: str
    token: str
    key: bytes
    jwe_size: int


def create_link(port: int) -> BenchLink:
    upload = {"files": [{"contentType": "application/fhir+json", "content": BUNDLE}]}
    status, raw = http_call(port, "POST", "/api/links", upload)
    if status != 201:
        raise BenchError(f"POST /api/links answered {status}: {raw[:500]!r}")
    answer = json.loads(raw)
    shlink = answer.get("shlink")
    if not shlink:
        raise BenchError("POST /api/links gave no shlink")
    key = b64url_decode(shl_payload.decode(shlink).key)
    return BenchLink(answer["id"], answer["management_token"], key, int(answer["files"][0]["size"]))


def check_manifest(port: int, link: BenchLink) -> None:
    """One manifest request checked in full before the load: 200, embedded, decrypts."""
    status, raw = http_call(port, "POST", f"/shl/{link.id}", MANIFEST_BODY)
    if status != 200:
        raise BenchError(f"the manifest answered {status}: {raw[:500]!r}")
    manifest = json.loads(raw)
    files = manifest.get("files") or []
    if len(files) != 1 or "embedded" not in files[0]:
        raise BenchError(f"the manifest should embed the one file: {manifest!r:.500}")
    _header, plain = jwe.decrypt(files[0]["embedded"], link.key)
    if json.loads(plain) != BUNDLE:
        raise BenchError("the embedded file does not decrypt to the uploaded Bundle")


def link_uses(port: int, link: BenchLink) -> int:
    status, raw = http_call(port, "GET", f"/api/links/{link.id}",
                            headers={"Authorization": f"Bearer {link.token}"})
    if status != 200:
        raise BenchError(f"GET /api/links/<id> answered {status}")
    uses: int = json.loads(raw)["uses"]
    return uses


# ---------------------------------------------------------------------------------------
# The run


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Manifest throughput of shlhost against its trivial endpoint, same run.")
    p.add_argument("--database-url", help="PostgreSQL url (a fresh schema is made and dropped); "
                                          "default: SQLite in a temporary folder")
    p.add_argument("--workers", type=int,
                   help="gunicorn worker processes (default: as shlhost/gunicorn_conf.py "
                        "decides, min(4, 2 x CPUs))")
    p.add_argument("--threads", type=int, default=4, help="threads per worker (default 4)")
    p.add_argument("--connections", type=int, default=16,
                   help="concurrent client connections (default 16)")
    p.add_argument("--duration", type=float, default=10.0,
                   help="seconds of load per endpoint (default 10)")
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of unmeasured load per endpoint first (default 2; 0 for none)")
    p.add_argument("--loader", choices=("auto", "wrk", "python"), default="auto",
                   help="load generator: wrk if installed (auto), or the Python client")
    p.add_argument("--links", type=int, default=1,
                   help="links the manifest load is spread over (default 1: every request "
                        "updates the same row, the worst case)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if min(args.workers or 1, args.threads, args.connections, args.links) < 1 or args.duration <= 0:
        p.error("workers, threads, connections, links and duration must be positive")
    return args


def choose_loader(wanted: str) -> str:
    have_wrk = shutil.which("wrk") is not None
    if wanted == "wrk" and not have_wrk:
        raise BenchError("--loader wrk: wrk is not installed (apt-get install wrk)")
    if wanted == "auto":
        return "wrk" if have_wrk else "python"
    return wanted


def load(loader: str, port: int, method: str, paths: list[str], body: bytes | None, *,
         seconds: float, connections: int, workdir: Path, name: str) -> Result:
    cpus = os.cpu_count() or 1
    if loader == "wrk":
        return run_wrk(port, method, paths, body, connections=connections,
                       threads=max(1, min(cpus, connections)), seconds=seconds, workdir=workdir,
                       name=name)
    return run_python(port, method, paths, body, connections=connections, processes=cpus,
                      seconds=seconds)


def process_tree_cpu(root_pid: int) -> float | None:
    """User + system CPU seconds of ``root_pid`` and its children (gunicorn's workers)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    try:
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                stat = Path(entry.path, "stat").read_text()
            except OSError:
                continue  # the process ended meanwhile
            fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) "
            ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
            if int(entry.name) == root_pid or ppid == root_pid:
                total += utime + stime
    except OSError:
        return None
    return total / tick


def connections_per_worker(master: int, port: int) -> list[int]:
    """Established connections to ``port`` held by each of the master's worker processes
    (most first): gunicorn's workers race for accept(), and keep-alive pins a connection
    to the worker that won it, so the load may sit on one worker while another idles."""
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if int(fields[1].rsplit(":", 1)[1], 16) == port and fields[3] == "01":
                inodes.add(fields[9])
    counts = []
    for child in Path(f"/proc/{master}/task/{master}/children").read_text().split():
        held = 0
        try:
            for fd in Path(f"/proc/{child}/fd").iterdir():
                target = os.readlink(fd)
                held += target.startswith("socket:[") and target[8:-1] in inodes
        except OSError:
            continue
        counts.append(held)
    return sorted(counts, reverse=True)


def loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run(args: argparse.Namespace) -> dict[str, Any]:
    loader = choose_loader(args.loader)
    cpus = os.cpu_count() or 1
    loader_label = (f"{wrk_version()}, {max(1, min(cpus, args.connections))} threads"
                    if loader == "wrk" else
                    f"python http.client, {min(cpus, args.connections)} processes")
    load_before = loadavg()
    workdir = Path(tempfile.mkdtemp(prefix="shlhost-bench-"))
    db = Database(args.database_url, workdir)
    server: Server | None = None
    try:
        db.create()
        server = Server(db.url, workdir, args.workers, args.threads)
        server.start()
        workers = len(server.workers())
        links = [create_link(server.port) for _ in range(args.links)]
        for link in links:
            check_manifest(server.port, link)
        body = json.dumps(MANIFEST_BODY).encode()
        targets = [
            ("healthz", "GET", ["/healthz"], None),
            ("manifest", "POST", [f"/shl/{link.id}" for link in links], body),
        ]
        results: dict[str, Result] = {}
        warm: dict[str, Result] = {}
        for name, method, paths, data in targets:
            if args.warmup > 0:
                warm[name] = load(loader, server.port, method, paths, data, seconds=args.warmup,
                                  connections=args.connections, workdir=workdir,
                                  name=f"{name}-warmup")
            cpu_before = process_tree_cpu(server.pid)
            spread: list[int] = []
            sampler = threading.Timer(
                1.0, lambda out=spread: out.extend(connections_per_worker(server.pid, server.port))
            )
            sampler.start()
            results[name] = load(loader, server.port, method, paths, data, seconds=args.duration,
                                 connections=args.connections, workdir=workdir, name=name)
            sampler.join()
            results[name].per_worker = spread
            cpu_after = process_tree_cpu(server.pid)
            if cpu_before is not None and cpu_after is not None:
                results[name].server_cpu_s = cpu_after - cpu_before
        uses = sum(link_uses(server.port, link) for link in links)
        trivial, manifest = results["healthz"], results["manifest"]
        manifest.endpoint = "POST /shl/<id>"
        # Every 200 the clients saw was counted by the server before it was sent; answers
        # still in flight when the clock stopped may add more, never fewer.
        seen_ok = len(links) + manifest.statuses.get("200", 0)
        if "manifest" in warm:
            seen_ok += warm["manifest"].statuses.get("200", 0)
        ratio = manifest.rps / trivial.rps if trivial.rps else 0.0
        clean = trivial.errors == 0 and manifest.errors == 0 and uses >= seen_ok
        return {
            "bench": "manifest",
            "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
            "commit": git_commit(),
            "machine": {"cpus": cpus, "platform": platform.platform(),
                        "python": platform.python_version(),
                        "loadavg_1m_before": load_before, "loadavg_1m_after": loadavg()},
            "server": {"gunicorn": "FairThreadWorker (gthread)", "workers": workers,
                       "threads": args.threads,
                       "rate_limit": False, "env": "testing"},
            "database": db.label,
            "loader": loader_label,
            "connections": args.connections,
            "duration_s": args.duration,
            "warmup_s": args.warmup,
            "links": len(links),
            "file": {"contentType": "application/fhir+json", "jwe_bytes": links[0].jwe_size,
                     "delivery": "embedded"},
            "results": [trivial.to_json(), manifest.to_json()],
            "ratio": round(ratio, 3),
            "target": TARGET_RATIO,
            "pass": ratio >= TARGET_RATIO and clean,
            "uses": {"counted_by_server": uses, "200s_seen_by_clients": seen_ok,
                     "ok": uses >= seen_ok},
        }
    finally:
        if server is not None:
            server.stop()
        try:
            db.drop()  # IF EXISTS: safe whatever part of the set-up ran
        except Exception as exc:  # noqa: BLE001 - report, but do not hide the first error
            print(f"warning: could not drop schema {db.schema}: {exc}", file=sys.stderr)
        shutil.rmtree(workdir, ignore_errors=True)


def print_table(report: dict[str, Any]) -> None:
    srv = report["server"]
    print(f"shlhost bench: manifest throughput   {report['date']}")
    print(f"commit    {report['commit']}")
    m = report["machine"]
    print(f"machine   {m['cpus']} CPUs, {m['platform']}, Python {m['python']}, "
          f"load average {m['loadavg_1m_before']} before, {m['loadavg_1m_after']} after")
    print(f"server    gunicorn {srv['gunicorn']}, {srv['workers']} workers x {srv['threads']} "
          "threads, rate limit off, otherwise shlhost/gunicorn_conf.py and the defaults")
    print(f"database  {report['database']}")
    print(f"load      {report['loader']}, {report['connections']} connections, "
          f"{report['duration_s']:g} s per endpoint after {report['warmup_s']:g} s warm-up, "
          f"keep-alive, {HOST} only")
    spread = "one link" if report["links"] == 1 else f"{report['links']} links in turn"
    print(f"file      one FHIR Bundle per link, JWE {report['file']['jwe_bytes']} bytes, embedded "
          f"(embeddedLengthMax 100000); {spread}")
    print()
    header = (f"{'endpoint':<18} {'requests':>9} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'errors':>7} {'server CPU ms/req':>18} {'conns per worker':>17}")
    print(header)
    print("-" * len(header))
    for r in report["results"]:
        cpu = r["server_cpu_ms_per_request"]
        cpu_text = "n/a" if cpu is None else f"{cpu:.2f}"
        spread_text = "/".join(str(n) for n in r["per_worker"]) or "n/a"
        print(f"{r['endpoint']:<18} {r['requests']:>9} {r['rps']:>9.1f} {r['p50_ms']:>8.2f} "
              f"{r['p99_ms']:>8.2f} {r['errors']:>7} {cpu_text:>18} {spread_text:>17}")
    print()
    verdict = "PASS" if report["pass"] else "FAIL"
    print(f"manifest/trivial = {report['ratio']:.2f}   target >= {report['target']:.2f}   "
          f"{verdict}")
    for r in report["results"]:
        if r["errors"]:
            bad = {k: v for k, v in r["statuses"].items() if k != "200"}
            print(f"errors on {r['endpoint']}: statuses {bad}, no answer {r['socket_errors']}")
            for sample in r["samples"]:
                print(f"  e.g. {sample}")
    uses = report["uses"]
    print(f"uses counted by the server: {uses['counted_by_server']}; 200s seen by clients "
          f"(check, warm-up, measured): {uses['200s_seen_by_clients']}; "
          + ("ok (the rest were in flight when the clock stopped)" if uses["ok"]
             else "LOST UPDATES: the server counted fewer uses than it answered"))


def _terminate(signum: int, _frame: Any) -> None:
    raise SystemExit(128 + signum)  # unwinds through run()'s finally: the server is stopped


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _terminate)
    try:
        report = run(args)
    except (BenchError, OSError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print_table(report)
    return 0 if report["pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
