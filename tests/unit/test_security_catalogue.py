"""The bad-input catalogue in docs/security.md cites tests as ``file::test``: each must exist,
so that renaming or deleting a test cannot silently leave a case uncovered."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Written alongside the patient web app; cited before they land.
PENDING = {"functional/test_patient_pages.py"}


def _catalogue() -> str:
    text = (ROOT / "docs" / "security.md").read_text(encoding="utf-8")
    assert "## Bad-input catalogue" in text
    return text.split("## Bad-input catalogue", 1)[1]


def test_every_cited_test_exists() -> None:
    cited = set(re.findall(r"`((?:functional|unit|live|e2e)/[\w/]+\.py)::([\w:]+)`", _catalogue()))
    assert len(cited) > 40
    missing = []
    for path, name in sorted(cited):
        file = ROOT / "tests" / path
        if not file.exists():
            if path not in PENDING:
                missing.append(f"{path} (no such file)")
            continue
        tree = ast.parse(file.read_text(encoding="utf-8"))
        defined = {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        if not all(part in defined for part in name.split("::")):
            missing.append(f"{path}::{name}")
    assert not missing, f"docs/security.md cites tests that do not exist: {missing}"
