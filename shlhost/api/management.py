"""shlhost's management API: create links from uploads, then inspect, change and revoke them.

Every route below ``/api/links/<id>`` takes ``Authorization: Bearer <management token>``;
a wrong token answers the same 404 as a link that does not exist.
"""

from __future__ import annotations

import json
from typing import Any

from flask import Blueprint, Flask, Response, current_app, jsonify, request, url_for

from shlhost import qr
from shlhost.accounts import TOKEN_PREFIX, account_for_token
from shlhost.api.common import bearer_token, db, json_body, links, now, runtime
from shlhost.crypto import jwe
from shlhost.errors import BadRequest, Conflict, Unauthorized, UnsupportedMediaType
from shlhost.phr import sharing
from shlhost.phr.formats import prepare_json, prepare_upload
from shlhost.shl.links import EncryptedFile, LinkOptions, LinkService, NewFile, parse_exp
from shlhost.storage.models import Link

bp = Blueprint("api", __name__, url_prefix="/api")

OPTION_FIELDS = ("label", "passcode", "exp", "flags", "max_uses")


def _files_from_json(items: Any) -> list[NewFile]:
    if not isinstance(items, list):
        raise BadRequest("files must be a list", code="invalid_files")
    files: list[NewFile] = []
    for index, item in enumerate(items):
        if not isinstance(item, dict) or not isinstance(item.get("contentType"), str):
            raise BadRequest(f"files[{index}] needs a contentType", code="invalid_files")
        has_content, has_jwe = "content" in item, "jwe" in item
        if has_content == has_jwe:
            raise BadRequest(f"files[{index}] needs exactly one of content or jwe", code="invalid_files")
        if has_jwe:
            if not isinstance(item["jwe"], str):
                raise BadRequest(f"files[{index}].jwe must be a compact JWE string", code="invalid_jwe")
            files.append(EncryptedFile(item["contentType"], item["jwe"]))
        else:
            files.append(prepare_json(item["contentType"], item["content"]))
    return files


JWE_SUFFIXES = (".jwe", ".jose")


def _files_from_form() -> list[NewFile]:
    """Uploaded files, read as streams: werkzeug spools each part to a temporary file as it
    parses the body (refusing a body over MAX_CONTENT_LENGTH as it reads), and what is made
    of it (a Bundle from a record, a JWE) is written a chunk at a time as well.

    A file named ``*.jwe`` (or sent as ``application/jose``) is a pre-encrypted compact
    JWE; its content type is the ``contentType`` form field, else its header's ``cty``."""
    password = request.form.get("sphr_password") or None
    limit = int(current_app.config["MAX_CONTENT_LENGTH"])
    files: list[NewFile] = []
    for upload in request.files.getlist("file"):
        name = upload.filename or ""
        if name.lower().endswith(JWE_SUFFIXES) or upload.mimetype == "application/jose":
            header = jwe.check_stream(upload.stream).header
            ctype = request.form.get("contentType") or header.get("cty")
            if not isinstance(ctype, str) or not ctype:
                raise BadRequest(f"say the content type of {name or 'the JWE'}: a contentType field "
                                 "or a cty in its header", code="invalid_files")
            files.append(EncryptedFile(ctype, upload.stream))
        else:
            files.append(prepare_upload(name, upload.stream, password=password, max_size=limit))
    return files


def _read_request() -> tuple[list[NewFile], dict[str, Any]]:
    """Files and options from a multipart form or a JSON body."""
    mimetype = request.mimetype
    if mimetype == "multipart/form-data":
        options = {name: request.form.get(name) for name in OPTION_FIELDS if name in request.form}
        return _files_from_form(), options
    if mimetype == "application/json" or mimetype.endswith("+json"):
        body = json_body()
        options = {name: body.get(name) for name in OPTION_FIELDS if name in body}
        return _files_from_json(body.get("files")), options
    raise UnsupportedMediaType("send multipart/form-data or application/json",
                               code="unsupported_media_type")


def _options(raw: dict[str, Any]) -> LinkOptions:
    flags = raw.get("flags") or ""
    if not isinstance(flags, str):
        raise BadRequest("flags must be a string such as 'L' or 'LU'", code="invalid_flags")
    return LinkOptions(
        label=raw.get("label"),
        passcode=raw.get("passcode"),
        exp=parse_exp(raw.get("exp"), now()),
        flags=flags,
        max_uses=raw.get("max_uses"),
    )


def _qr_urls(link_id: str) -> dict[str, str]:
    return {
        "png": url_for("api.qr_png", link_id=link_id, _external=False),
        "svg": url_for("api.qr_svg", link_id=link_id, _external=False),
    }


def _caller_account() -> int | None:
    """The account of an API token in Authorization, None without one; 401 for a bad one."""
    token = bearer_token()
    if token is None or not token.startswith(TOKEN_PREFIX):
        return None
    found = account_for_token(db(), token)
    if found is None:
        raise Unauthorized("this API token is not valid", code="invalid_token")
    return found


@bp.get("/links")
def list_links() -> Response:
    """The links of the API token's account, newest first."""
    account = _caller_account()
    if account is None:
        raise Unauthorized("listing links needs an API token: Authorization: Bearer <token>", code="unauthorized")
    service = links()
    moment = now()
    return jsonify({"links": [service.describe(link, moment) for link in service.list_links(account)]})


@bp.post("/links")
def create_link() -> tuple[Response, int]:
    account = _caller_account()
    query = None
    if request.mimetype == "application/json" and "record" in json_body():
        # A link made from the caller's own record rather than from uploaded files.
        if account is None:
            raise Unauthorized("a link from the record needs an API token", code="unauthorized")
        body = json_body()
        if "files" in body:
            raise BadRequest("send either files or record, not both", code="invalid_files")
        query = sharing.normalise_query(body["record"])
        db().rollback()  # the export reads in its own transactions; hold no lock meanwhile
        files: list[NewFile] = [sharing.record_file(runtime().sessions, account, query)]
        raw = {name: body.get(name) for name in OPTION_FIELDS if name in body}
    else:
        files, raw = _read_request()
    service = links()
    created = service.create(files, _options(raw), now=now(), account_id=account,
                             record_query=json.dumps(query) if query is not None else None)
    link = created.link
    answer = service.describe(link, now())
    answer.update({"management_token": created.management_token, "qr": _qr_urls(link.id)})
    answer.setdefault("shlink", None)
    answer.setdefault("viewer_url", None)
    if answer["shlink"] is None:
        answer["message"] = "The server never saw the key: add it to the link yourself."
    resp = jsonify(answer)
    resp.headers["Location"] = url_for("api.get_link", link_id=link.id)
    resp.headers["Cache-Control"] = "no-store"
    return resp, 201


def _owned(link_id: str) -> tuple[LinkService, Link]:
    """The link, if the bearer is its management token or an API token of its account."""
    service = links()
    token = bearer_token()
    account = account_for_token(db(), token) if token and token.startswith(TOKEN_PREFIX) else None
    return service, service.owned(link_id, token, account_id=account)


@bp.get("/links/<link_id>")
def get_link(link_id: str) -> Response:
    service, link = _owned(link_id)
    resp = jsonify({**service.describe(link, now()), "qr": _qr_urls(link.id)})
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.patch("/links/<link_id>")
def patch_link(link_id: str) -> Response:
    service, link = _owned(link_id)
    service.update(link, json_body(), now=now())
    return jsonify(service.describe(link, now()))


@bp.delete("/links/<link_id>")
def revoke_link(link_id: str) -> tuple[str, int]:
    service, link = _owned(link_id)
    service.revoke(link, now=now())
    return "", 204


@bp.post("/links/<link_id>/files")
def add_files(link_id: str) -> tuple[Response, int]:
    service, link = _owned(link_id)
    files, _options_ignored = _read_request()
    service.add_files(link, files, now=now())
    return jsonify(service.describe(link, now())), 201


@bp.put("/links/<link_id>/files/<file_id>")
def replace_file(link_id: str, file_id: str) -> Response:
    service, link = _owned(link_id)
    files, _options_ignored = _read_request()
    if len(files) != 1:
        raise BadRequest("send exactly one file", code="invalid_files")
    service.replace_file(link, file_id, files[0], now=now())
    return jsonify(service.describe(link, now()))


@bp.delete("/links/<link_id>/files/<file_id>")
def delete_file(link_id: str, file_id: str) -> tuple[str, int]:
    service, link = _owned(link_id)
    service.delete_file(link, file_id, now=now())
    return "", 204


@bp.get("/links/<link_id>/accesses")
def accesses(link_id: str) -> Response:
    service, link = _owned(link_id)
    return jsonify({"accesses": service.accesses(link)})


def _qr_text(link_id: str) -> str:
    service, link = _owned(link_id)
    text = service.shlink(link, viewer=request.args.get("viewer", "0") in ("1", "true", "yes"))
    if text is None:
        raise Conflict(
            "the server does not hold this link's key (pre-encrypted or revoked), so it cannot draw it",
            code="no_key",
        )
    return text


@bp.get("/links/<link_id>/qr.png")
def qr_png(link_id: str) -> Response:
    resp = Response(qr.png(_qr_text(link_id)), mimetype="image/png")
    resp.headers["Cache-Control"] = "no-store"
    return resp


@bp.get("/links/<link_id>/qr.svg")
def qr_svg(link_id: str) -> Response:
    resp = Response(qr.svg(_qr_text(link_id), title="SMART Health Link"), mimetype="image/svg+xml")
    resp.headers["Cache-Control"] = "no-store"
    return resp


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
