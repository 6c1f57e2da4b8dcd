"""shlhost's CapabilityStatement and OperationDefinitions (the PHR guide publishes none)."""

from __future__ import annotations

from typing import Any

from shlhost.phr.fhir import R4_RESOURCE_TYPES

PHR_EXPORT_URL = "http://hl7.org/fhir/uv/phr/OperationDefinition/phr-export"
PHR_IMPORT_URL = "http://hl7.org/fhir/uv/phr/OperationDefinition/phr-import"


def _param(
    name: str, use: str, type_: str, doc: str, *, min_: int = 0, max_: str = "1"
) -> dict[str, Any]:
    return {"name": name, "use": use, "min": min_, "max": max_, "type": type_, "documentation": doc}


def operation_definitions(base: str) -> dict[str, dict[str, Any]]:
    export = {
        "resourceType": "OperationDefinition",
        "id": "phr-export",
        "url": PHR_EXPORT_URL,
        "name": "PhrExport",
        "title": "Export a personal health record",
        "status": "active",
        "kind": "operation",
        "code": "phr-export",
        "resource": ["Bundle"],
        "system": False,
        "type": True,
        "instance": False,
        "affectsState": False,
        "description": "Exports a patient's record as a document Bundle, NDJSON, .phr or .sphr.",
        "parameter": [
            _param("outputFormat", "in", "code", "bundle (default) | ndjson | phr | sphr"),
            _param("start", "in", "string", "a year, year-month or date; resources on or after it"),
            _param(
                "end", "in", "string", "a year, year-month or date; inclusive of its whole period"
            ),
            _param("patient", "in", "string", "Patient/<id>, for stores with many patients"),
            _param("_type", "in", "string", "comma-separated resource types"),
            _param("_since", "in", "instant", "only resources changed since this instant"),
            _param("return", "out", "Binary", "the export", min_=1),
        ],
    }
    import_ = {
        "resourceType": "OperationDefinition",
        "id": "phr-import",
        "url": PHR_IMPORT_URL,
        "name": "PhrImport",
        "title": "Import a personal health record",
        "status": "active",
        "kind": "operation",
        "code": "import",
        "resource": ["Bundle"],
        "system": False,
        "type": True,
        "instance": False,
        "affectsState": True,
        "description": (
            "Imports NDJSON/.phr, a Bundle (document, collection, transaction) or a .sphr into the "
            "caller's record in one transaction, deduplicating by logical id, business identifier "
            "and content, recording a Provenance, and keeping disagreements as conflicts "
            f"(listed at {base}/$conflicts). The body is the file; its Content-Type says which."
        ),
        "parameter": [
            _param("strategy", "in", "code", "merge (default) | replace"),
            _param(
                "mode", "in", "code", "commit (default) | validate: check everything, write nothing"
            ),
            _param(
                "strict",
                "in",
                "boolean",
                "validate against R4 structure definitions; any error refuses the whole file",
            ),
            _param(
                "source", "in", "uri", "where the data comes from (meta.source of what is written)"
            ),
            _param("return", "out", "OperationOutcome", "counts and one issue per problem", min_=1),
        ],
    }
    return {"phr-export": export, "phr-import": import_}


# The operations this build serves; capability_statement lists only these.
OPERATIONS = {"phr-export": PHR_EXPORT_URL, "import": PHR_IMPORT_URL}


def capability_statement(base: str, version: str, now: str) -> dict[str, Any]:
    interactions = [
        {"code": c}
        for c in ("read", "vread", "update", "history-instance", "history-type", "search-type")
    ]
    resources = [
        {
            "type": rtype,
            "versioning": "versioned-update",
            "readHistory": True,
            "updateCreate": True,
            "interaction": interactions,
            "searchParam": [
                {"name": "patient", "type": "reference"},
                {"name": "_count", "type": "number"},
            ],
        }
        for rtype in sorted(R4_RESOURCE_TYPES)
    ]
    operations = [{"name": name, "definition": url} for name, url in OPERATIONS.items()]
    for resource in resources:
        if resource["type"] == "Bundle":
            resource["operation"] = operations
    return {
        "resourceType": "CapabilityStatement",
        "status": "active",
        "date": now,
        "kind": "instance",
        "software": {"name": "shlhost", "version": version},
        "implementation": {"description": "shlhost personal health record store", "url": base},
        "fhirVersion": "4.0.1",
        "format": ["application/fhir+json", "json"],
        "rest": [
            {
                "mode": "server",
                "security": {
                    "description": "Authorization: Bearer <API token> (shlhost token create EMAIL)"
                },
                "resource": resources,
                "operation": operations,
            }
        ],
    }
