"""The OpenAPI 3 description of every JSON endpoint, kept beside the code.

``tests/unit/test_openapi.py`` checks it against the app's url_map (every JSON route is
documented, no stale path), and ``tests/live/test_schemathesis.py`` fuzzes a live server
with it: no 500, every answer matches. Served at ``GET /api/openapi.json``.

When you add, remove or change a JSON route under ``/api``, ``/shl``, ``/fhir``,
``/healthz`` or ``/readyz``, change this description in the same commit.
"""

from __future__ import annotations

import copy
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify

from shlhost import __version__

bp = Blueprint("openapi", __name__)

# Paths (Flask rule prefixes) whose routes answer JSON and so must be described here.
JSON_PREFIXES = ("/api/", "/shl/", "/fhir/", "/healthz", "/readyz")

_ERROR = {"$ref": "#/components/schemas/Error"}
_OUTCOME = {"$ref": "#/components/schemas/OperationOutcome"}
_RESOURCE = {"$ref": "#/components/schemas/Resource"}
_BUNDLE = {"$ref": "#/components/schemas/Bundle"}
_LINK = {"$ref": "#/components/schemas/Link"}

JSON = "application/json"
FHIR = "application/fhir+json"


def _json(schema: dict[str, Any], description: str, media: str = JSON) -> dict[str, Any]:
    return {"description": description, "content": {media: {"schema": schema}}}


def _json_body(
    properties: dict[str, Any], *, required: list[str] | None = None, body_required: bool = True
) -> dict[str, Any]:
    """A request body that is one JSON object with these properties."""
    schema: dict[str, Any] = {"type": "object"}
    if required:
        schema["required"] = required
    schema["properties"] = properties
    return {"required": body_required, "content": {JSON: {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json(_ERROR, description)


def _fhir_error(description: str) -> dict[str, Any]:
    return _json(_OUTCOME, description, FHIR)


def _param(
    name: str,
    where: str,
    schema: dict[str, Any] | None = None,
    *,
    required: bool = False,
    description: str = "",
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "in": where,
        "required": required or where == "path",
        "schema": schema or {"type": "string"},
    }
    if description:
        out["description"] = description
    return out


LINK_ID = _param("link_id", "path", description="the link id (base64url, 43 characters)")
FILE_ID = _param("file_id", "path")
RTYPE = _param("rtype", "path", description="a FHIR R4 resource type")
RID = _param("rid", "path", description="a resource id")
MGMT_SECURITY = [{"managementToken": []}, {"apiToken": []}]
API_SECURITY = [{"apiToken": []}]

_MGMT_ERRORS = {
    "400": _error("bad input"),
    "401": _error("an API token that is not valid"),
    "404": _error("no such link, or a wrong token (the same answer)"),
    "409": _error("not possible in the link's state"),
    "413": _error("body too large"),
    "415": _error("wrong content type"),
    "429": _error("rate limited"),
}
_FHIR_ERRORS = {
    "400": _fhir_error("bad input"),
    "401": _fhir_error("no or a wrong API token"),
    "404": _fhir_error("not found"),
    "405": _fhir_error("method not allowed"),
    "409": _fhir_error("conflict"),
    "410": _fhir_error("deleted"),
    "412": _fhir_error("If-Match does not match"),
    "413": _fhir_error("body too large"),
    "415": _fhir_error("wrong content type"),
    "422": _fhir_error("not a valid resource"),
}

_UPLOAD_BODY = {
    "required": True,
    "content": {
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "file": {
                        "type": "array",
                        "items": {"type": "string", "format": "binary"},
                        "description": "a FHIR Bundle or resource (.json), .phr/.ndjson, .sphr, a SMART "
                        "Health Card file, or a pre-encrypted compact JWE (*.jwe)",
                    },
                    "contentType": {
                        "type": "string",
                        "description": "content type of *.jwe parts (default: the JWE header's cty)",
                    },
                    "label": {"type": "string"},
                    "passcode": {"type": "string"},
                    "exp": {"type": "string"},
                    "flags": {"type": "string"},
                    "max_uses": {"type": "string"},
                    "sphr_password": {"type": "string"},
                },
            }
        },
        JSON: {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "properties": {
                                "contentType": {"type": "string"},
                                "content": {},
                                "jwe": {"type": "string"},
                            },
                        },
                    },
                    "record": {},
                    "label": {"type": ["string", "null"]},
                    "passcode": {"type": ["string", "null"]},
                    "exp": {},
                    "flags": {"type": ["string", "null"]},
                    "max_uses": {"type": ["integer", "null"]},
                },
            }
        },
    },
}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "shlhost",
        "version": __version__,
        "description": "SMART Health Links host: management API (/api), SHL data plane (/shl) "
        "and the versioned FHIR R4 record store (/fhir). Errors are JSON "
        "{error, message}; under /fhir they are OperationOutcomes.",
    },
    "servers": [{"url": "/"}],
    "components": {
        "securitySchemes": {
            "managementToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "the management token returned once by POST /api/links",
            },
            "apiToken": {
                "type": "http",
                "scheme": "bearer",
                "description": "an account's API token (prefix shl_)",
            },
        },
        "schemas": {
            "Error": {
                "type": "object",
                "required": ["error", "message"],
                "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
            },
            "OperationOutcome": {
                "type": "object",
                "required": ["resourceType", "issue"],
                "properties": {
                    "resourceType": {"const": "OperationOutcome"},
                    "issue": {"type": "array", "items": {"type": "object"}},
                },
            },
            "Resource": {
                "type": "object",
                "required": ["resourceType"],
                "properties": {"resourceType": {"type": "string"}, "id": {"type": "string"}},
            },
            "Bundle": {
                "type": "object",
                "required": ["resourceType", "type"],
                "properties": {
                    "resourceType": {"const": "Bundle"},
                    "type": {"type": "string"},
                    "total": {"type": "integer"},
                    "entry": {"type": "array", "items": {"type": "object"}},
                },
            },
            "File": {
                "type": "object",
                "required": ["id", "contentType"],
                "properties": {
                    "id": {"type": "string"},
                    "contentType": {"type": "string"},
                    "lastUpdated": {"type": ["string", "null"]},
                    "size": {"type": ["integer", "null"]},
                    "purged": {"type": "boolean"},
                },
            },
            "Link": {
                "type": "object",
                "required": ["id", "url", "flag", "status", "files"],
                "properties": {
                    "id": {"type": "string"},
                    "url": {"type": "string"},
                    "flag": {"type": "string"},
                    "label": {"type": ["string", "null"]},
                    "exp": {"type": ["integer", "null"]},
                    "status": {
                        "enum": ["active", "paused", "expired", "locked", "used_up", "revoked"]
                    },
                    "active": {"type": "boolean"},
                    "long_term": {"type": "boolean"},
                    "passcode": {"type": "boolean"},
                    "attempts_left": {"type": ["integer", "null"]},
                    "max_uses": {"type": ["integer", "null"]},
                    "uses": {"type": "integer"},
                    "uses_left": {"type": ["integer", "null"]},
                    "server_keyed": {"type": "boolean"},
                    "from_record": {},
                    "created_at": {"type": ["string", "null"]},
                    "revoked_at": {"type": ["string", "null"]},
                    "files": {"type": "array", "items": {"$ref": "#/components/schemas/File"}},
                    "shlink": {"type": ["string", "null"]},
                    "viewer_url": {"type": ["string", "null"]},
                    "management_token": {"type": "string"},
                    "qr": {
                        "type": "object",
                        "properties": {"png": {"type": "string"}, "svg": {"type": "string"}},
                    },
                },
            },
            "Manifest": {
                "type": "object",
                "required": ["files"],
                "properties": {
                    "status": {"type": "string"},
                    "files": {
                        "type": "array",
                        "items": {
                            "type": "object",
                            "required": ["contentType"],
                            "properties": {
                                "contentType": {"type": "string"},
                                "embedded": {"type": "string"},
                                "location": {"type": "string"},
                                "lastUpdated": {"type": "string"},
                            },
                        },
                    },
                },
            },
        },
    },
    "paths": {
        "/healthz": {
            "get": {
                "summary": "the process is up",
                "operationId": "healthz",
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["status"],
                            "properties": {"status": {"const": "ok"}},
                        },
                        "up",
                    )
                },
            }
        },
        "/readyz": {
            "get": {
                "summary": "database and blob store reachable",
                "operationId": "readyz",
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"status": {"const": "ready"}}}, "ready"
                    ),
                    "503": _json(
                        {
                            "type": "object",
                            "properties": {
                                "status": {"const": "unavailable"},
                                "problems": {"type": "object"},
                            },
                        },
                        "a dependency is unreachable",
                    ),
                },
            }
        },
        "/api/openapi.json": {
            "get": {
                "summary": "this description",
                "operationId": "openapi",
                "responses": {
                    "200": _json(
                        {"type": "object", "required": ["openapi", "paths"]},
                        "OpenAPI 3 description",
                    )
                },
            }
        },
        "/api/links": {
            "get": {
                "summary": "the links of the API token's account",
                "operationId": "listLinks",
                "security": API_SECURITY,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["links"],
                            "properties": {"links": {"type": "array", "items": _LINK}},
                        },
                        "links, newest first",
                    ),
                    "401": _error("no or a wrong API token"),
                },
            },
            "post": {
                "summary": "create a link from uploaded files, or from the caller's record",
                "operationId": "createLink",
                "security": [{"apiToken": []}, {}],
                "requestBody": _UPLOAD_BODY,
                "responses": {
                    "201": _json(_LINK, "the new link, with its management token"),
                    **_MGMT_ERRORS,
                },
            },
        },
        "/api/links/{link_id}": {
            "parameters": [LINK_ID],
            "get": {
                "summary": "settings and status",
                "operationId": "getLink",
                "security": MGMT_SECURITY,
                "responses": {"200": _json(_LINK, "the link"), **_MGMT_ERRORS},
            },
            "patch": {
                "summary": "change active, exp, label, passcode, max_uses",
                "operationId": "patchLink",
                "security": MGMT_SECURITY,
                "requestBody": _json_body(
                    {
                        "active": {"type": "boolean"},
                        "exp": {},
                        "label": {"type": ["string", "null"]},
                        "passcode": {"type": ["string", "null"]},
                        "max_uses": {"type": ["integer", "null"]},
                    }
                ),
                "responses": {"200": _json(_LINK, "the changed link"), **_MGMT_ERRORS},
            },
            "delete": {
                "summary": "revoke: ciphertext and key purged",
                "operationId": "revokeLink",
                "security": MGMT_SECURITY,
                "responses": {"204": {"description": "revoked"}, **_MGMT_ERRORS},
            },
        },
        "/api/links/{link_id}/files": {
            "parameters": [LINK_ID],
            "post": {
                "summary": "add files to an L link",
                "operationId": "addFiles",
                "security": MGMT_SECURITY,
                "requestBody": _UPLOAD_BODY,
                "responses": {"201": _json(_LINK, "the changed link"), **_MGMT_ERRORS},
            },
        },
        "/api/links/{link_id}/files/{file_id}": {
            "parameters": [LINK_ID, FILE_ID],
            "put": {
                "summary": "replace one file of an L link",
                "operationId": "replaceFile",
                "security": MGMT_SECURITY,
                "requestBody": _UPLOAD_BODY,
                "responses": {"200": _json(_LINK, "the changed link"), **_MGMT_ERRORS},
            },
            "delete": {
                "summary": "remove one file of an L link",
                "operationId": "deleteFile",
                "security": MGMT_SECURITY,
                "responses": {"204": {"description": "removed"}, **_MGMT_ERRORS},
            },
        },
        "/api/links/{link_id}/accesses": {
            "parameters": [LINK_ID],
            "get": {
                "summary": "the access log",
                "operationId": "accesses",
                "security": MGMT_SECURITY,
                "responses": {
                    "200": _json(
                        {
                            "type": "object",
                            "required": ["accesses"],
                            "properties": {
                                "accesses": {"type": "array", "items": {"type": "object"}}
                            },
                        },
                        "newest first",
                    ),
                    **_MGMT_ERRORS,
                },
            },
        },
        "/api/links/{link_id}/qr.png": {
            "parameters": [LINK_ID, _param("viewer", "query")],
            "get": {
                "summary": "QR code (PNG)",
                "operationId": "qrPng",
                "security": MGMT_SECURITY,
                "responses": {
                    "200": {
                        "description": "PNG",
                        "content": {
                            "image/png": {"schema": {"type": "string", "format": "binary"}}
                        },
                    },
                    **_MGMT_ERRORS,
                },
            },
        },
        "/api/links/{link_id}/qr.svg": {
            "parameters": [LINK_ID, _param("viewer", "query")],
            "get": {
                "summary": "QR code (SVG)",
                "operationId": "qrSvg",
                "security": MGMT_SECURITY,
                "responses": {
                    "200": {
                        "description": "SVG",
                        "content": {"image/svg+xml": {"schema": {"type": "string"}}},
                    },
                    **_MGMT_ERRORS,
                },
            },
        },
        "/shl/{link_id}": {
            "parameters": [LINK_ID],
            "post": {
                "summary": "SHL manifest",
                "operationId": "manifest",
                "requestBody": _json_body(
                    {
                        "recipient": {"type": "string"},
                        "passcode": {"type": "string"},
                        "embeddedLengthMax": {"type": "integer", "minimum": 0},
                    },
                    required=["recipient"],
                ),
                "responses": {
                    "200": _json({"$ref": "#/components/schemas/Manifest"}, "the manifest"),
                    "400": _error("bad input"),
                    "401": _json(
                        {
                            "type": "object",
                            "required": ["remainingAttempts"],
                            "properties": {"remainingAttempts": {"type": "integer"}},
                        },
                        "passcode missing or wrong",
                    ),
                    "404": _error("no such link, or no longer available"),
                    "429": _error("rate limited"),
                },
            },
            "get": {
                "summary": "U link: the one JWE",
                "operationId": "direct",
                "parameters": [_param("recipient", "query", required=True)],
                "responses": {
                    "200": {
                        "description": "compact JWE",
                        "content": {"application/jose": {"schema": {"type": "string"}}},
                    },
                    "400": _error("bad input"),
                    "404": _error("no such link, or not a U link"),
                    "429": _error("rate limited"),
                },
            },
        },
        "/shl/{link_id}/files/{file_id}": {
            "parameters": [LINK_ID, FILE_ID, _param("ticket", "query", required=True)],
            "get": {
                "summary": "a manifest's location",
                "operationId": "file",
                "responses": {
                    "200": {
                        "description": "compact JWE",
                        "content": {"application/jose": {"schema": {"type": "string"}}},
                    },
                    "404": _error("unknown, expired ticket or dead link"),
                },
            },
        },
        "/fhir/metadata": {
            "get": {
                "summary": "CapabilityStatement",
                "operationId": "metadata",
                "responses": {"200": _json(_RESOURCE, "CapabilityStatement", FHIR)},
            }
        },
        "/fhir/OperationDefinition/{name}": {
            "parameters": [_param("name", "path")],
            "get": {
                "summary": "phr-export and phr-import definitions",
                "operationId": "operationDefinition",
                "responses": {
                    "200": _json(_RESOURCE, "OperationDefinition", FHIR),
                    "404": _fhir_error("unknown"),
                },
            },
        },
        "/fhir/Bundle/$import": {
            "post": {
                "summary": "import NDJSON/.phr, a Bundle or a .sphr",
                "operationId": "phrImport",
                "security": API_SECURITY,
                "parameters": [
                    _param("source", "query"),
                    _param("strategy", "query", {"enum": ["merge", "replace"]}),
                    _param("mode", "query", {"enum": ["commit", "validate"]}),
                    _param("strict", "query"),
                    _param("X-SPHR-Password", "header"),
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/x-ndjson": {"schema": {"type": "string"}},
                        FHIR: {"schema": _RESOURCE},
                        "application/zip": {"schema": {"type": "string", "format": "binary"}},
                    },
                },
                "responses": {"200": _json(_OUTCOME, "counts and issues", FHIR), **_FHIR_ERRORS},
            },
        },
        "/fhir/Bundle/$phr-export": {
            "get": {
                "summary": "export the record",
                "operationId": "phrExport",
                "security": API_SECURITY,
                "parameters": [
                    _param("outputFormat", "query", {"enum": ["bundle", "ndjson", "phr", "sphr"]}),
                    _param("patient", "query"),
                    _param("_type", "query"),
                    _param("start", "query"),
                    _param("end", "query"),
                    _param("_since", "query"),
                    _param("X-SPHR-Password", "header"),
                ],
                "responses": {
                    "200": {
                        "description": "the export",
                        "content": {
                            FHIR: {"schema": _BUNDLE},
                            "application/x-ndjson": {"schema": {"type": "string"}},
                            "application/zip": {"schema": {"type": "string", "format": "binary"}},
                        },
                    },
                    **_FHIR_ERRORS,
                },
            },
        },
        "/fhir/$conflicts": {
            "get": {
                "summary": "conflicts between sources",
                "operationId": "conflicts",
                "security": API_SECURITY,
                "parameters": [_param("all", "query")],
                "responses": {
                    "200": _json(_BUNDLE, "a collection of Parameters", FHIR),
                    **_FHIR_ERRORS,
                },
            },
        },
        "/fhir/$conflicts/{conflict_id}/$resolve": {
            "parameters": [_param("conflict_id", "path", {"type": "integer", "minimum": 0})],
            "post": {
                "summary": "resolve a conflict",
                "operationId": "resolveConflict",
                "security": API_SECURITY,
                "parameters": [_param("resolution", "query")],
                "requestBody": _json_body({"resolution": {"type": "string"}}, body_required=False),
                "responses": {
                    "200": _json(_RESOURCE, "the conflict as Parameters", FHIR),
                    **_FHIR_ERRORS,
                },
            },
        },
        "/fhir/{rtype}": {
            "parameters": [RTYPE],
            "get": {
                "summary": "search",
                "operationId": "search",
                "security": API_SECURITY,
                "parameters": [
                    _param("patient", "query"),
                    _param("_count", "query"),
                    _param("_offset", "query"),
                ],
                "responses": {"200": _json(_BUNDLE, "searchset", FHIR), **_FHIR_ERRORS},
            },
        },
        "/fhir/{rtype}/_history": {
            "parameters": [RTYPE],
            "get": {
                "summary": "history of a type",
                "operationId": "historyType",
                "security": API_SECURITY,
                "parameters": [_param("_since", "query"), _param("_count", "query")],
                "responses": {"200": _json(_BUNDLE, "history", FHIR), **_FHIR_ERRORS},
            },
        },
        "/fhir/{rtype}/{rid}": {
            "parameters": [RTYPE, RID],
            "get": {
                "summary": "read",
                "operationId": "read",
                "security": API_SECURITY,
                "responses": {"200": _json(_RESOURCE, "the current version", FHIR), **_FHIR_ERRORS},
            },
            "put": {
                "summary": "update (If-Match)",
                "operationId": "update",
                "security": API_SECURITY,
                "parameters": [_param("If-Match", "header"), _param("source", "query")],
                "requestBody": {
                    "required": True,
                    "content": {FHIR: {"schema": _RESOURCE}, JSON: {"schema": _RESOURCE}},
                },
                "responses": {
                    "200": _json(_RESOURCE, "updated or unchanged", FHIR),
                    "201": _json(_RESOURCE, "created", FHIR),
                    **_FHIR_ERRORS,
                },
            },
        },
        "/fhir/{rtype}/{rid}/_history": {
            "parameters": [RTYPE, RID],
            "get": {
                "summary": "history of a resource",
                "operationId": "history",
                "security": API_SECURITY,
                "responses": {
                    "200": _json(_BUNDLE, "versions, newest first", FHIR),
                    **_FHIR_ERRORS,
                },
            },
        },
        "/fhir/{rtype}/{rid}/_history/{vid}": {
            "parameters": [RTYPE, RID, _param("vid", "path")],
            "get": {
                "summary": "vread",
                "operationId": "vread",
                "security": API_SECURITY,
                "responses": {"200": _json(_RESOURCE, "that version", FHIR), **_FHIR_ERRORS},
            },
        },
        "/fhir/{rtype}/{rid}/$revert": {
            "parameters": [RTYPE, RID],
            "post": {
                "summary": "revert to an earlier version",
                "operationId": "revert",
                "security": API_SECURITY,
                "parameters": [_param("version", "query", required=True)],
                "responses": {
                    "200": _json(_RESOURCE, "the new current version", FHIR),
                    **_FHIR_ERRORS,
                },
            },
        },
    },
}

# Paths served by blueprints that a deployment may not register: described only when the
# blueprint (named by the key) is there, so the description never lists a missing route.
OPTIONAL_PATHS: dict[str, dict[str, Any]] = {
    "pull": {
        "/api/pull": {
            "post": {
                "summary": "import what a SMART Health Link carries into the token's account",
                "operationId": "pull",
                "security": API_SECURITY,
                "requestBody": _json_body(
                    {"link": {"type": "string"}, "passcode": {"type": "string"}}, required=["link"]
                ),
                "responses": {
                    "200": _json(_OUTCOME, "the import's counts", FHIR),
                    **_MGMT_ERRORS,
                    "502": _error("the remote link could not be resolved"),
                },
            },
        },
    },
}


def spec(public_url: str | None = None, blueprints: Any = ()) -> dict[str, Any]:
    """A copy of the description (with the optional paths of the given blueprint names),
    with this server's URL when given."""
    out = copy.deepcopy(SPEC)
    for name, paths in OPTIONAL_PATHS.items():
        if name in blueprints:
            out["paths"].update(copy.deepcopy(paths))
    if public_url:
        out["servers"] = [{"url": public_url}]
    return out


@bp.get("/api/openapi.json")
def openapi_json() -> Response:
    return jsonify(spec(str(current_app.config["PUBLIC_URL"]), current_app.blueprints))


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
