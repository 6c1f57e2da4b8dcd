"""Bad inputs from the catalogue in docs/security.md that no other test covered."""

from __future__ import annotations

from tests.functional.conftest import Fhir


def test_conflict_id_past_any_database_integer_is_404(fhir: Fhir) -> None:
    """Found by the schemathesis run: a 20-digit id reached the driver and answered 500."""
    r = fhir.post("$conflicts/27279383978505211904/$resolve", json={"resolution": "keep-stored"})
    assert r.status_code == 404
    assert r.get_json()["resourceType"] == "OperationOutcome"
