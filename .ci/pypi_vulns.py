#!/usr/bin/env python3
"""Look up known vulnerabilities of pinned Python packages in PyPI's JSON API.

    pypi_vulns.py requirements.lock     # the pins of a requirements file (name==version)
    pypi_vulns.py --installed           # the distributions of the interpreter running this

PyPI publishes, for each release, the advisories (PYSEC, GHSA, CVE) that affect it; this is
the data pip-audit's "pypi" service reads. The per-release document
(/pypi/NAME/VERSION/json) is asked first. Where it is not served (these machines' route to
PyPI answers 404 for it) the project document (/pypi/NAME/json) is used instead: its
"vulnerabilities" are those of the project's newest release, so it settles a pin only when
the pin is that newest release. Every other pin is reported as not audited.

Exit status: 0 nothing known found (pins that could not be audited are listed as a
warning), 1 a known vulnerability in some pin, 2 PyPI could not be reached at all.
Standard library only, so it runs before or without the project's virtual environment.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

PYPI = "https://pypi.org/pypi"
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def same_version(a: str, b: str) -> bool:
    try:
        from packaging.version import Version

        return Version(a) == Version(b)
    except Exception:  # packaging missing or a version it cannot parse
        return a == b


def pins_from_file(path: str) -> dict[str, str]:
    pins: dict[str, str] = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            m = PIN.match(line.strip())
            if m:
                pins[canonical(m.group(1))] = m.group(2)
    return pins


def pins_installed() -> dict[str, str]:
    from importlib.metadata import distributions

    pins: dict[str, str] = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if not name:
            continue
        direct = json.loads(dist.read_text("direct_url.json") or "{}")
        if direct.get("dir_info", {}).get("editable"):
            continue  # the project itself, installed with pip install -e
        pins[canonical(name)] = dist.version
    return pins


class Unreachable(Exception):
    pass


def get_json(url: str) -> dict | None:
    """The JSON document at url; None on 404; Unreachable after retries on anything else."""
    last: Exception | None = None
    for attempt in range(4):
        try:
            req = urllib.request.Request(url, headers={"Accept": "application/json"})  # noqa: S310
            with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 (https URL built here)
                return json.load(resp)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None
            last = e
        except (urllib.error.URLError, TimeoutError, OSError, ValueError) as e:
            last = e
        time.sleep(1 + 2 * attempt)
    raise Unreachable(f"{url}: {last}")


def live(vulns: list[dict]) -> list[dict]:
    return [v for v in vulns or [] if not v.get("withdrawn")]


def check(name: str, version: str) -> tuple[str, str, str, list[dict]]:
    """(name, version, outcome, vulnerabilities); outcome is audited, unaudited or unreachable."""
    try:
        doc = get_json(f"{PYPI}/{name}/{version}/json")
        if doc is not None:
            return name, version, "audited", live(doc.get("vulnerabilities", []))
        doc = get_json(f"{PYPI}/{name}/json")
    except Unreachable as e:
        return name, version, "unreachable", [{"id": str(e)}]
    if doc is None:
        return name, version, "unaudited", [{"id": "not on PyPI"}]
    latest = doc.get("info", {}).get("version", "")
    if same_version(latest, version):
        return name, version, "audited", live(doc.get("vulnerabilities", []))
    return name, version, "unaudited", [{"id": f"newest release is {latest}"}]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("requirements", nargs="?", help="a requirements file of name==version pins")
    ap.add_argument("--installed", action="store_true", help="audit this interpreter's packages")
    ap.add_argument(
        "--ignore",
        action="append",
        default=[],
        metavar="ID",
        help="an advisory id (or alias) accepted after review; repeatable",
    )
    args = ap.parse_args()
    if bool(args.requirements) == args.installed:
        ap.error("give either a requirements file or --installed")
    pins = pins_installed() if args.installed else pins_from_file(args.requirements)
    if not pins:
        print("pypi_vulns: no pinned packages found", file=sys.stderr)
        return 2

    with ThreadPoolExecutor(max_workers=8) as pool:
        results = sorted(pool.map(lambda kv: check(*kv), pins.items()))

    found, unaudited, unreachable, audited = [], [], [], 0
    ignore = set(args.ignore)
    for name, version, outcome, vulns in results:
        if outcome == "audited":
            audited += 1
            for v in vulns:
                if ignore & {v.get("id"), *(v.get("aliases") or [])}:
                    continue
                found.append((name, version, v))
        elif outcome == "unaudited":
            unaudited.append((name, version, vulns[0]["id"]))
        else:
            unreachable.append((name, version, vulns[0]["id"]))

    for name, version, v in found:
        ids = ", ".join([v.get("id", "?"), *(v.get("aliases") or [])])
        fixed = ", ".join(v.get("fixed_in") or []) or "no fixed release"
        print(f"VULNERABLE {name}=={version}: {ids} (fixed in {fixed})")
        if v.get("link"):
            print(f"    {v['link']}")
    print(
        f"pypi_vulns: {len(pins)} pins, {audited} audited, {len(found)} known "
        f"vulnerabilities, {len(unaudited)} not audited, {len(unreachable)} unreachable"
    )
    if unaudited:
        print("pypi_vulns: WARNING: not audited (PyPI answers only for the newest release here):")
        for name, version, why in unaudited:
            print(f"    {name}=={version}: {why}")
    if unreachable:
        print("pypi_vulns: WARNING: could not reach PyPI for:")
        for name, version, why in unreachable:
            print(f"    {name}=={version}: {why}")
    if found:
        return 1
    if unreachable and not audited:
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
