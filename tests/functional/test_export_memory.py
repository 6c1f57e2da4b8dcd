"""A 100,000-resource record exported as NDJSON with bounded memory (issue 4).

Runs bench/export.py, which measures each phase in a fresh process. Holding the export in
memory would grow the peak by at least the output's size (about 63 MB at 100,000
resources); streaming keeps the growth to allocator and page-cache slack.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT


@pytest.mark.slow
def test_ndjson_export_of_100k_resources_has_bounded_memory():
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "export.py"), "--sizes", "30000,100000", "--json"],
                         capture_output=True, text=True, timeout=600, check=True)
    results = {int(k): v for k, v in json.loads(out.stdout.strip().splitlines()[-1]).items()}
    small, large = results[30000]["export"], results[100000]["export"]
    assert small["resources"] == 30000 and large["resources"] == 100000
    assert large["peak_mb"] - small["peak_mb"] < 30, results
