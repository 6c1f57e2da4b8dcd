"""Mixed load against 1, 2 and 4 gunicorn workers on PostgreSQL: requests per second and
p50/p99 latency, overall and per kind of request.

Run from the repository root::

    .venv/bin/python bench/load.py                      # workers 1, 2, 4; 10 s each
    .venv/bin/python bench/load.py --workers 1,2 --duration 5 --clients 16
    .venv/bin/python bench/load.py --database-url postgresql://user@db-host/bench

What it does: makes a fresh PostgreSQL schema (dropped at the end) and runs the real
migrations; starts the production server (gunicorn with ``shlhost/gunicorn_conf.py``,
ENV=production with random secrets, argon2's production profile, JSON logs to a file,
local blob store, rate limiter off) on 127.0.0.1 once per worker count; creates 20 plain
links and 20 passcode links carrying a small FHIR Bundle through ``POST /api/links``; then
runs a closed loop of ``--clients`` persistent keep-alive connections (spread over two
client processes) for ``--duration`` seconds after one second of warm-up, each request
drawn at random with these weights:

    manifest   40  POST /shl/<id> (no passcode), answered with a location
    file       30  GET  the location of an earlier manifest (ticket URL)
    passcode   15  POST /shl/<id> with the right passcode (one argon2 verification)
    qr         15  GET  /api/links/<id>/qr.png with the management token

Every answer must be 200; anything else is counted as an error and the exit status is 1.
The clients run on the same two cores as the server: the figures are a floor for what a
machine with the load generator elsewhere does. Nothing is sent beyond 127.0.0.1.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import math
import multiprocessing
import os
import platform
import random
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from sqlalchemy import create_engine, text  # noqa: E402 - after the path is set

from shlhost.storage import migrate  # noqa: E402
from shlhost.storage.db import make_engine, normalise_url  # noqa: E402

HOST = "127.0.0.1"
PASSCODE = "bench-4711"
WEIGHTS = {"manifest": 40, "file": 30, "passcode": 15, "qr": 15}
LINKS_PER_KIND = 20
BUNDLE: dict[str, Any] = {
    "resourceType": "Bundle",
    "type": "collection",
    "entry": [
        {
            "resource": {
                "resourceType": "Patient",
                "id": "p",
                "name": [{"family": "Load", "given": ["Ada"]}],
                "birthDate": "1980-01-01",
            }
        },
        {
            "resource": {
                "resourceType": "Observation",
                "id": "o",
                "status": "final",
                "subject": {"reference": "Patient/p"},
                "code": {"coding": [{"system": "http://loinc.org", "code": "8480-6"}]},
                "valueQuantity": {"value": 142, "unit": "mmHg"},
            }
        },
    ],
}


def percentile(values: list[float], pct: float) -> float:
    """Nearest rank of an already sorted list."""
    if not values:
        return 0.0
    return values[min(len(values), max(1, math.ceil(pct / 100 * len(values)))) - 1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


# --- the server ------------------------------------------------------------------------------


class Server:
    def __init__(
        self,
        workers: int,
        threads: int,
        database_url: str,
        folder: Path,
        secrets_env: dict[str, str],
    ):
        self.port = free_port()
        self.url = f"http://{HOST}:{self.port}"
        env = {
            **os.environ,
            **secrets_env,
            "SHLHOST_ENV": "production",
            "SHLHOST_INSTANCE_PATH": str(folder / "instance"),
            "SHLHOST_DATABASE_URL": database_url,
            "SHLHOST_BLOB_PATH": str(folder / "blobs"),
            "SHLHOST_PUBLIC_URL": self.url,
            "SHLHOST_RATELIMIT_ENABLED": "false",
            "SHLHOST_TICKET_LIFETIME": "3600",
            "SHLHOST_LOG_FORMAT": "json",
        }
        env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.log_path = folder / f"gunicorn-{workers}w.log"
        self.log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(  # noqa: S603 - fixed arguments
            [
                sys.executable,
                "-m",
                "gunicorn",
                "-c",
                str(ROOT / "shlhost" / "gunicorn_conf.py"),
                "-b",
                f"{HOST}:{self.port}",
                "-w",
                str(workers),
                "--threads",
                str(threads),
                "shlhost.wsgi:app",
            ],
            env=env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gunicorn exited early; see {self.log_path}")
            try:
                if request("GET", self.url + "/readyz")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"gunicorn did not become ready; see {self.log_path}")

    def cpu_seconds(self) -> float:
        """User + system CPU of the master and its workers so far (Linux /proc)."""
        total = 0.0
        tick = os.sysconf("SC_CLK_TCK")
        pids = [self.proc.pid]
        try:
            children = (
                Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children").read_text().split()
            )
            pids += [int(p) for p in children]
        except OSError:
            pass
        for pid in pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / tick
            except (OSError, IndexError, ValueError):
                pass
        return total

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.log.close()


def request(
    method: str, url: str, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """One request on a fresh connection (set-up only; the load uses persistent ones)."""
    parsed = http.client.urlsplit(url)  # type: ignore[attr-defined]
    conn = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=60)
    try:
        data = json.dumps(body).encode() if body is not None else None
        hdrs = (
            {"Content-Type": "application/json", **(headers or {})} if data else dict(headers or {})
        )
        conn.request(
            method,
            parsed.path + (f"?{parsed.query}" if parsed.query else ""),
            body=data,
            headers=hdrs,
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def make_links(url: str) -> dict[str, list[dict[str, str]]]:
    made: dict[str, list[dict[str, str]]] = {"plain": [], "passcode": []}
    for kind in made:
        for i in range(LINKS_PER_KIND):
            body: dict[str, Any] = {
                "files": [{"contentType": "application/fhir+json", "content": BUNDLE}],
                "label": f"load {kind} {i}",
            }
            if kind == "passcode":
                body["passcode"] = PASSCODE
            status, raw = request("POST", url + "/api/links", body)
            if status != 201:
                raise RuntimeError(f"creating a link answered {status}: {raw[:200]!r}")
            created = json.loads(raw)
            made[kind].append({"id": created["id"], "token": created["management_token"]})
    return made


# --- the load ---------------------------------------------------------------------------------


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    errors: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    samples: list[str] = field(default_factory=list)


def client_process(
    port: int,
    links: dict[str, list[dict[str, str]]],
    threads: int,
    start_at: float,
    measure_from: float,
    stop_at: float,
    seed: int,
    weights_: dict[str, int],
    out: Any,
) -> None:
    import threading

    tallies = [Tally() for _ in range(threads)]

    def loop(index: int) -> None:
        rng = random.Random(seed * 1000 + index)  # noqa: S311 - choosing requests, not secrets
        tally = tallies[index]
        conn = http.client.HTTPConnection(HOST, port, timeout=60)
        locations: dict[str, str] = {}
        kinds, weights = list(weights_), list(weights_.values())
        while time.time() < start_at:
            time.sleep(0.001)
        while True:
            began = time.time()
            if began >= stop_at:
                break
            kind = rng.choices(kinds, weights)[0]
            if kind == "file" and not locations:
                kind = "manifest"
            try:
                if kind in ("manifest", "passcode"):
                    link = rng.choice(links["plain" if kind == "manifest" else "passcode"])
                    body: dict[str, Any] = {"recipient": "load test"}
                    if kind == "passcode":
                        body["passcode"] = PASSCODE
                    conn.request(
                        "POST",
                        f"/shl/{link['id']}",
                        body=json.dumps(body),
                        headers={"Content-Type": "application/json"},
                    )
                elif kind == "file":
                    conn.request("GET", rng.choice(list(locations.values())))
                else:
                    link = rng.choice(links["plain"])
                    conn.request(
                        "GET",
                        f"/api/links/{link['id']}/qr.png",
                        headers={"Authorization": f"Bearer {link['token']}"},
                    )
                resp = conn.getresponse()
                data = resp.read()
                status = resp.status
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                conn = http.client.HTTPConnection(HOST, port, timeout=60)
                status, data = 0, repr(exc).encode()
            elapsed = time.time() - began
            if status == 200 and kind in ("manifest", "passcode"):
                answer = json.loads(data)
                location = answer["files"][0]["location"]
                path = location.split(f":{port}", 1)[1]
                locations[path.split("/files/")[0]] = path
            if began < measure_from:
                continue
            if status == 200:
                tally.latencies[kind].append(elapsed)
            else:
                tally.errors[kind] += 1
                if len(tally.samples) < 3:
                    tally.samples.append(f"{kind}: {status} {data[:160]!r}")
        conn.close()

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    merged: dict[str, Any] = {
        "latencies": defaultdict(list),
        "errors": defaultdict(int),
        "samples": [],
    }
    for tally in tallies:
        for kind, values in tally.latencies.items():
            merged["latencies"][kind].extend(values)
        for kind, n in tally.errors.items():
            merged["errors"][kind] += n
        merged["samples"].extend(tally.samples)
    out.put(
        {
            "latencies": dict(merged["latencies"]),
            "errors": dict(merged["errors"]),
            "samples": merged["samples"],
        }
    )


@dataclass
class RunResult:
    workers: int
    seconds: float
    latencies: dict[str, list[float]]
    errors: dict[str, int]
    samples: list[str]
    server_cpu_s: float

    def count(self, kind: str | None = None) -> int:
        if kind is None:
            return sum(len(v) for v in self.latencies.values())
        return len(self.latencies.get(kind, []))

    def all_sorted(self, kind: str | None = None) -> list[float]:
        if kind is None:
            return sorted(x for v in self.latencies.values() for x in v)
        return sorted(self.latencies.get(kind, []))


def run_load(
    server: Server,
    links: dict[str, list[dict[str, str]]],
    clients: int,
    duration: float,
    workers: int,
) -> RunResult:
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    processes = 2 if clients >= 2 else 1
    start_at = time.time() + 2.0  # time for the client processes to start
    measure_from = start_at + 1.0  # one second of warm-up
    stop_at = measure_from + duration
    per = [clients // processes + (1 if i < clients % processes else 0) for i in range(processes)]
    procs = [
        ctx.Process(
            target=client_process,
            args=(
                server.port,
                links,
                n,
                start_at,
                measure_from,
                stop_at,
                i + 1,
                dict(WEIGHTS),
                out,
            ),
        )
        for i, n in enumerate(per)
    ]
    for proc in procs:
        proc.start()
    while time.time() < measure_from:
        time.sleep(0.01)
    cpu_before = server.cpu_seconds()
    while time.time() < stop_at:
        time.sleep(0.01)
    cpu_after = server.cpu_seconds()
    results = [out.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(30)
    latencies: dict[str, list[float]] = defaultdict(list)
    errors: dict[str, int] = defaultdict(int)
    samples: list[str] = []
    for result in results:
        for kind, values in result["latencies"].items():
            latencies[kind].extend(values)
        for kind, n in result["errors"].items():
            errors[kind] += n
        samples.extend(result["samples"])
    return RunResult(
        workers, duration, dict(latencies), dict(errors), samples, cpu_after - cpu_before
    )


# --- the database ----------------------------------------------------------------------------


def fresh_schema(base: str) -> tuple[str, str]:
    base = normalise_url(base)
    schema = f"shlhost_load_{uuid.uuid4().hex[:10]}"
    admin = create_engine(base)
    with admin.begin() as conn:
        conn.execute(text(f'CREATE SCHEMA "{schema}"'))
    admin.dispose()
    sep = "&" if "?" in base else "?"
    url = f"{base}{sep}options=-csearch_path%3D{schema}"
    engine = make_engine(url)
    migrate.upgrade(engine)
    engine.dispose()
    return url, schema


def drop_schema(base: str, schema: str) -> None:
    admin = create_engine(normalise_url(base))
    with admin.begin() as conn:
        conn.execute(text(f'DROP SCHEMA "{schema}" CASCADE'))
    admin.dispose()


def postgres_version(url: str) -> str:
    engine = create_engine(normalise_url(url))
    with engine.connect() as conn:
        version = str(conn.execute(text("SHOW server_version")).scalar())
    engine.dispose()
    return version


# --- output -----------------------------------------------------------------------------------


def table(results: list[RunResult]) -> str:
    lines = [
        "| workers | req/s | p50 ms | p99 ms | errors | server CPU ms/req |",
        "|--:|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        everything = r.all_sorted()
        n = r.count()
        cpu = r.server_cpu_s * 1000 / n if n else 0.0
        lines.append(
            f"| {r.workers} | {n / r.seconds:.0f} | {percentile(everything, 50) * 1000:.1f} | "
            f"{percentile(everything, 99) * 1000:.1f} | {sum(r.errors.values())} | {cpu:.1f} |"
        )
    lines += [
        "",
        "| workers | " + " | ".join(f"{k} req/s, p50/p99 ms" for k in WEIGHTS) + " |",
        "|--:|" + "--:|" * len(WEIGHTS),
    ]
    for r in results:
        cells = []
        for kind in WEIGHTS:
            values = r.all_sorted(kind)
            cells.append(
                f"{len(values) / r.seconds:.0f}, {percentile(values, 50) * 1000:.1f}/"
                f"{percentile(values, 99) * 1000:.1f}"
            )
        lines.append(f"| {r.workers} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--database-url",
        default=os.environ.get("BENCH_DATABASE_URL", "postgresql://root@127.0.0.1:5432/test"),
    )
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--threads", type=int, default=4, help="gunicorn threads per worker")
    parser.add_argument("--clients", type=int, default=16, help="concurrent keep-alive connections")
    parser.add_argument(
        "--duration", type=float, default=10.0, help="measured seconds per worker count"
    )
    parser.add_argument(
        "--mix",
        default=",".join(f"{k}={v}" for k, v in WEIGHTS.items()),
        help="weights of the request kinds, e.g. manifest=50,file=50,passcode=0,qr=0",
    )
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    args = parser.parse_args()
    counts = [int(x) for x in args.workers.split(",") if x.strip()]
    for item in args.mix.split(","):
        kind, _, weight = item.partition("=")
        if kind.strip() not in WEIGHTS:
            parser.error(f"unknown request kind {kind!r} in --mix")
        WEIGHTS[kind.strip()] = int(weight)
    load_before = os.getloadavg()

    base = args.database_url
    try:
        pg = postgres_version(base)
    except Exception as exc:  # noqa: BLE001 - say why and stop
        print(f"cannot reach PostgreSQL at {base}: {exc}", file=sys.stderr)
        return 2
    url, schema = fresh_schema(base)
    folder = Path(tempfile.mkdtemp(prefix="shlhost-load-"))
    secrets_env = {
        "SHLHOST_SECRET_KEY": secrets.token_urlsafe(32),
        "SHLHOST_KEY_ENCRYPTION_KEY": base64.urlsafe_b64encode(secrets.token_bytes(32))
        .decode()
        .rstrip("="),
    }
    results: list[RunResult] = []
    links: dict[str, list[dict[str, str]]] | None = None
    try:
        for workers in counts:
            server = Server(workers, args.threads, url, folder, secrets_env)
            try:
                if links is None:
                    links = make_links(server.url)
                print(
                    f"... {workers} worker(s): {args.duration:.0f} s of load, "
                    f"{args.clients} clients",
                    file=sys.stderr,
                )
                results.append(run_load(server, links, args.clients, args.duration, workers))
            finally:
                server.stop()
    finally:
        drop_schema(base, schema)
        shutil.rmtree(folder, ignore_errors=True)

    print(
        f"\nshlhost mixed load on PostgreSQL {pg}: {args.clients} keep-alive clients on the "
        f"same machine, gthread x {args.threads} threads per worker, {args.duration:.0f} s per "
        "row after 1 s warm-up"
    )
    print(
        f"machine: {os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), "
        f"Python {platform.python_version()}, {platform.system()} {platform.release()}; "
        f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f}"
    )
    print("mix: " + ", ".join(f"{k} {v}%" for k, v in WEIGHTS.items()) + "\n")
    print(table(results))
    failed = [s for r in results for s in r.samples]
    if failed:
        print("\nerrors (first few):\n  " + "\n  ".join(failed[:6]))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        "workers": r.workers,
                        "seconds": r.seconds,
                        "server_cpu_s": r.server_cpu_s,
                        "errors": r.errors,
                        "requests": {k: len(v) for k, v in r.latencies.items()},
                        "p50_ms": {
                            k: percentile(sorted(v), 50) * 1000 for k, v in r.latencies.items()
                        },
                        "p99_ms": {
                            k: percentile(sorted(v), 99) * 1000 for k, v in r.latencies.items()
                        },
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    return 1 if any(r.errors for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
