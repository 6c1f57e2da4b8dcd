"""Import speed and memory: a synthetic 100,000-resource record into an empty SQLite store.

    .venv/bin/python bench/import.py [--resources 100000] [--database-url URL] [--json]

Three phases, each in its own process so each peak memory (ru_maxrss) is its own:

- floor:    read the NDJSON, parse and validate every line (what $import does before the
            store), no database at all;
- import:   the same file through shlhost's importer into an empty store (one transaction);
- reimport: the same file again (everything unchanged: the no-op pull).

Targets (issue 3): import >= 10,000 resources/s, re-import >= 30,000/s, peak < 500 MB.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CODES = [
    ("8302-2", "Body Height", "cm", 150, 200),
    ("29463-7", "Body Weight", "kg", 50, 120),
    ("8867-4", "Heart rate", "/min", 50, 110),
    ("2339-0", "Glucose", "mg/dL", 70, 180),
    ("2093-3", "Cholesterol", "mg/dL", 120, 280),
    ("718-7", "Hemoglobin", "g/dL", 11, 17),
]


def synthetic_record(n: int, path: Path, seed: int = 7) -> None:
    """Synthea-shaped NDJSON: one Patient, then encounters each with observations,
    conditions, medication requests, procedures, immunizations and reports."""
    rnd = random.Random(seed)
    pid = str(uuid.UUID(int=rnd.getrandbits(128)))
    start = datetime(2000, 1, 1, tzinfo=UTC)
    with path.open("w") as out:
        out.write(
            json.dumps(
                {
                    "resourceType": "Patient",
                    "id": pid,
                    "meta": {
                        "profile": [
                            "http://hl7.org/fhir/us/core/StructureDefinition/us-core-patient"
                        ]
                    },
                    "identifier": [
                        {"system": "https://github.com/synthetichealth/synthea", "value": pid}
                    ],
                    "name": [
                        {"use": "official", "family": "Bench", "given": ["Mark"], "prefix": ["Mr."]}
                    ],
                    "gender": "male",
                    "birthDate": "1970-04-01",
                    "address": [
                        {"line": ["1 Main St"], "city": "Boston", "state": "MA", "country": "US"}
                    ],
                }
            )
            + "\n"
        )
        written, enc = 1, None
        while written < n:
            when = start + timedelta(minutes=written * 37)
            stamp = when.isoformat()
            rid = str(uuid.UUID(int=rnd.getrandbits(128)))
            kind = written % 10
            subject = {"reference": f"Patient/{pid}"}
            if kind == 0 or enc is None:
                enc = rid
                res = {
                    "resourceType": "Encounter",
                    "id": rid,
                    "status": "finished",
                    "class": {
                        "system": "http://terminology.hl7.org/CodeSystem/v3-ActCode",
                        "code": "AMB",
                    },
                    "type": [
                        {
                            "coding": [
                                {
                                    "system": "http://snomed.info/sct",
                                    "code": "185349003",
                                    "display": "Encounter for check up",
                                }
                            ],
                            "text": "Check up",
                        }
                    ],
                    "subject": subject,
                    "period": {"start": stamp, "end": stamp},
                    "serviceProvider": {
                        "reference": "Organization/org-1",
                        "display": "General Hospital",
                    },
                }
            elif kind <= 5:
                code, text, unit, lo, hi = rnd.choice(CODES)
                res = {
                    "resourceType": "Observation",
                    "id": rid,
                    "status": "final",
                    "category": [
                        {
                            "coding": [
                                {
                                    "system": "http://terminology.hl7.org/CodeSystem/observation-category",
                                    "code": "vital-signs",
                                    "display": "vital-signs",
                                }
                            ]
                        }
                    ],
                    "code": {
                        "coding": [{"system": "http://loinc.org", "code": code, "display": text}],
                        "text": text,
                    },
                    "subject": subject,
                    "encounter": {"reference": f"Encounter/{enc}"},
                    "effectiveDateTime": stamp,
                    "issued": stamp,
                    "valueQuantity": {
                        "value": round(rnd.uniform(lo, hi), 1),
                        "unit": unit,
                        "system": "http://unitsofmeasure.org",
                        "code": unit,
                    },
                }
            elif kind == 6:
                res = {
                    "resourceType": "Condition",
                    "id": rid,
                    "clinicalStatus": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/condition-clinical",
                                "code": "active",
                            }
                        ]
                    },
                    "code": {
                        "coding": [
                            {
                                "system": "http://snomed.info/sct",
                                "code": "38341003",
                                "display": "Hypertension",
                            }
                        ],
                        "text": "Hypertension",
                    },
                    "subject": subject,
                    "encounter": {"reference": f"Encounter/{enc}"},
                    "onsetDateTime": stamp,
                    "recordedDate": stamp,
                }
            elif kind == 7:
                res = {
                    "resourceType": "MedicationRequest",
                    "id": rid,
                    "status": "active",
                    "intent": "order",
                    "medicationCodeableConcept": {
                        "coding": [
                            {
                                "system": "http://www.nlm.nih.gov/research/umls/rxnorm",
                                "code": "314076",
                                "display": "lisinopril 10 MG",
                            }
                        ],
                        "text": "lisinopril 10 MG Oral Tablet",
                    },
                    "subject": subject,
                    "encounter": {"reference": f"Encounter/{enc}"},
                    "authoredOn": stamp,
                    "dosageInstruction": [
                        {
                            "sequence": 1,
                            "text": "once daily",
                            "timing": {"repeat": {"frequency": 1, "period": 1, "periodUnit": "d"}},
                        }
                    ],
                }
            elif kind == 8:
                res = {
                    "resourceType": "Procedure",
                    "id": rid,
                    "status": "completed",
                    "code": {
                        "coding": [
                            {
                                "system": "http://snomed.info/sct",
                                "code": "430193006",
                                "display": "Medication reconciliation",
                            }
                        ]
                    },
                    "subject": subject,
                    "encounter": {"reference": f"Encounter/{enc}"},
                    "performedPeriod": {"start": stamp, "end": stamp},
                }
            else:
                res = {
                    "resourceType": "Immunization",
                    "id": rid,
                    "status": "completed",
                    "vaccineCode": {
                        "coding": [
                            {
                                "system": "http://hl7.org/fhir/sid/cvx",
                                "code": "140",
                                "display": "Influenza, seasonal",
                            }
                        ]
                    },
                    "patient": subject,
                    "encounter": {"reference": f"Encounter/{enc}"},
                    "occurrenceDateTime": stamp,
                    "primarySource": True,
                }
            out.write(json.dumps(res) + "\n")
            written += 1


def phase(name: str, path: str, url: str) -> dict[str, float]:
    """Run one phase in this process; return its numbers."""
    from shlhost.phr import fhir
    from shlhost.phr.formats import iter_ndjson_stream

    started = time.perf_counter()
    if name == "floor":
        count = 0
        with open(path, "rb") as fh:
            for _n, res, _problems in iter_ndjson_stream(fh, None, 64 << 20):
                if res is not None:
                    fhir.light_problems(res)
                    fhir.content_hash(res)
                    count += 1
    else:
        from shlhost.phr.importer import Importer, ImportOptions, ndjson_items
        from shlhost.storage.db import make_engine, make_sessionmaker
        from shlhost.storage.models import Account

        engine = make_engine(url)
        sessions = make_sessionmaker(engine)
        with sessions() as session:
            account = session.query(Account).filter_by(email="bench@example.org").one()
            with open(path, "rb") as fh:
                result = Importer(
                    session, account.id, ImportOptions(source="bench"), now=datetime.now(UTC)
                ).run(ndjson_items(fh))
        c = result.counts
        count = c["created"] + c["updated"] + c["unchanged"]
        expected = "created" if name == "import" else "unchanged"
        assert c[expected] == count, c
    seconds = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "resources": count,
        "seconds": seconds,
        "per_second": count / seconds,
        "peak_mb": peak_mb,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--resources", type=int, default=100_000)
    parser.add_argument("--database-url", default=None, help="default: a fresh SQLite file")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--phase", help=argparse.SUPPRESS)
    parser.add_argument("--file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, args.file, args.database_url)))
        return

    from shlhost.storage import migrate
    from shlhost.storage.db import make_engine, make_sessionmaker
    from shlhost.storage.models import Account

    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "record.ndjson"
        synthetic_record(args.resources, data)
        url = args.database_url or f"sqlite:///{tmp}/bench.db"
        engine = make_engine(url)
        migrate.upgrade(engine)
        with make_sessionmaker(engine)() as session:
            session.add(Account(email="bench@example.org", password_hash="x"))
            session.commit()
        engine.dispose()
        results = {}
        for name in ("floor", "import", "reimport"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--phase",
                    name,
                    "--file",
                    str(data),
                    "--database-url",
                    url,
                ],
                capture_output=True,
                text=True,
                check=True,
            )
            results[name] = json.loads(out.stdout.strip().splitlines()[-1])
        size_mb = data.stat().st_size / 1e6

    if args.json:
        print(json.dumps({"resources": args.resources, "file_mb": size_mb, **results}))
        return
    floor = results["floor"]["per_second"]
    targets = {"floor": None, "import": 10_000, "reimport": 30_000}
    commit = subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    print(
        f"bench/import.py  commit {commit}  {os.cpu_count()} CPUs  {args.resources} resources "
        f"({size_mb:.0f} MB NDJSON)  database {'SQLite' if url.startswith('sqlite') else url.split('@')[-1]}"
    )
    print(
        f"{'phase':10} {'resources/s':>12} {'seconds':>8} {'vs floor':>9} {'peak MB':>8} {'target':>9}  result"
    )
    for name, r in results.items():
        target = targets[name]
        verdict = (
            "-"
            if target is None
            else ("PASS" if r["per_second"] >= target and r["peak_mb"] < 500 else "FAIL")
        )
        print(
            f"{name:10} {r['per_second']:12,.0f} {r['seconds']:8.2f} {r['per_second'] / floor:9.2f} "
            f"{r['peak_mb']:8.0f} {target or '':>9}  {verdict}"
        )


if __name__ == "__main__":
    main()
