"""NDJSON export speed and memory: $phr-export of a synthetic record, beside the floor.

    .venv/bin/python bench/export.py [--sizes 10000,100000] [--json]

For each size, a store is filled once (bench/import.py's synthetic record), then two
phases run, each in its own process so each peak memory (ru_maxrss) is its own:

- floor:  the same current rows read in the same chunks and serialised to NDJSON lines,
          straight from the database, no web layer;
- export: GET /fhir/Bundle/$phr-export?outputFormat=ndjson through the Flask app (WSGI),
          the streamed body consumed chunk by chunk.

Targets (issue 4): >= 30,000 resources/s, and peak memory independent of the record size.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _import_bench():  # bench/import.py is a script, not a package module
    spec = importlib.util.spec_from_file_location("bench_import", ROOT / "bench" / "import.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader
    spec.loader.exec_module(module)
    return module


def build(url: str, size: int, tmp: str) -> str:
    """Fill a fresh store with ``size`` resources; return an API token for its account."""
    from shlhost.accounts import create_token
    from shlhost.crypto.passcodes import hasher
    from shlhost.phr.importer import Importer, ImportOptions, ndjson_items
    from shlhost.storage import migrate
    from shlhost.storage.db import make_engine, make_sessionmaker
    from shlhost.storage.models import Account

    data = Path(tmp) / "record.ndjson"
    _import_bench().synthetic_record(size, data)
    engine = make_engine(url)
    migrate.upgrade(engine)
    with make_sessionmaker(engine)() as session:
        account = Account(email="bench@example.org", password_hash=hasher("cheapest").hash("x"))
        session.add(account)
        session.commit()
        with data.open("rb") as fh:
            Importer(session, account.id, ImportOptions(source="bench"), now=datetime.now(UTC)).run(
                ndjson_items(fh)
            )
        token = create_token(session, account, now=datetime.now(UTC))
    engine.dispose()
    data.unlink()
    return token


def phase(name: str, url: str, token: str, tmp: str) -> dict[str, float]:
    started = time.perf_counter()
    count = 0
    if name == "floor":
        import orjson
        from sqlalchemy import select

        from shlhost.phr.store import render
        from shlhost.storage.db import make_engine, make_sessionmaker
        from shlhost.storage.models import ResourceRow

        sessions = make_sessionmaker(make_engine(url))
        started = time.perf_counter()
        for rtype in (
            "Condition",
            "Encounter",
            "Immunization",
            "MedicationRequest",
            "Observation",
            "Patient",
            "Procedure",
        ):
            after = ""
            while True:
                with sessions() as session:
                    rows = session.execute(
                        select(
                            ResourceRow.resource_type,
                            ResourceRow.resource_id,
                            ResourceRow.version_id,
                            ResourceRow.last_updated,
                            ResourceRow.content,
                            ResourceRow.source,
                            ResourceRow.current,
                        )
                        .where(
                            ResourceRow.account_id == 1,
                            ResourceRow.resource_type == rtype,
                            ResourceRow.current.is_(True),
                            ResourceRow.resource_id > after,
                        )
                        .order_by(ResourceRow.resource_id)
                        .limit(1000)
                    ).all()
                if not rows:
                    break
                for row in rows:
                    if row.current:
                        orjson.dumps(render(row))
                        count += 1
                after = rows[-1].resource_id
    else:
        from shlhost import create_app

        app = create_app(
            {
                "ENV": "testing",
                "DATABASE_URL": url,
                "BLOB_PATH": f"{tmp}/blobs",
                "RATELIMIT_ENABLED": False,
            }
        )
        client = app.test_client()
        started = time.perf_counter()
        response = client.get(
            "/fhir/Bundle/$phr-export?outputFormat=ndjson",
            buffered=False,
            headers={"Authorization": f"Bearer {token}"},
        )
        assert response.status_code == 200, response.status_code
        for chunk in response.response:
            count += chunk.count(b"\n")
        response.close()
    seconds = time.perf_counter() - started
    return {
        "resources": count,
        "seconds": seconds,
        "per_second": count / seconds,
        "peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--token", help=argparse.SUPPRESS)
    parser.add_argument("--tmp", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase == "build":
        print(json.dumps({"token": build(args.url, int(args.token), args.tmp)}))
        return
    if args.phase:
        print(json.dumps(phase(args.phase, args.url, args.token, args.tmp)))
        return
    os.environ.setdefault("SHLHOST_INSTANCE_PATH", tempfile.mkdtemp())
    results: dict[int, dict[str, dict[str, float]]] = {}
    for size in (int(s) for s in args.sizes.split(",")):
        with tempfile.TemporaryDirectory() as tmp:
            url = f"sqlite:///{tmp}/export.db"
            # Every step in its own process: Linux carries ru_maxrss across fork and exec, so
            # a phase started from a parent that built the store would inherit its peak.
            env = {**os.environ, "SHLHOST_INSTANCE_PATH": tmp}
            built = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--phase",
                    "build",
                    "--url",
                    url,
                    "--token",
                    str(size),
                    "--tmp",
                    tmp,
                ],
                capture_output=True,
                text=True,
                check=True,
                env=env,
            )
            token = json.loads(built.stdout.strip().splitlines()[-1])["token"]
            results[size] = {}
            for name in ("floor", "export"):
                out = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--phase",
                        name,
                        "--url",
                        url,
                        "--token",
                        token,
                        "--tmp",
                        tmp,
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=env,
                )
                results[size][name] = json.loads(out.stdout.strip().splitlines()[-1])
    if args.json:
        print(json.dumps(results))
        return
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(f"bench/export.py  commit {commit}  {os.cpu_count()} CPUs  database SQLite  NDJSON")
    print(
        f"{'resources':>10} {'phase':7} {'resources/s':>12} {'seconds':>8} {'vs floor':>9} {'peak MB':>8}"
    )
    for size, phases in results.items():
        floor = phases["floor"]["per_second"]
        for name, r in phases.items():
            print(
                f"{size:10,} {name:7} {r['per_second']:12,.0f} {r['seconds']:8.2f} {r['per_second'] / floor:9.2f} "
                f"{r['peak_mb']:8.0f}"
            )
    sizes = sorted(results)
    growth = results[sizes[-1]]["export"]["peak_mb"] - results[sizes[0]]["export"]["peak_mb"]
    rate = results[sizes[-1]]["export"]["per_second"]
    print(
        f"export peak memory grows {growth:.0f} MB from {sizes[0]:,} to {sizes[-1]:,} resources; "
        f"target >= 30,000 resources/s: {'PASS' if rate >= 30_000 else 'FAIL'} ({rate:,.0f})"
    )


if __name__ == "__main__":
    main()
