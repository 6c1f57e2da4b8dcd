"""The clinician viewer: ``/view#shlink:/...``.

The page is static. Everything that touches the link happens in the browser
(``static/viewer.js``): the key lives in the URL fragment, which browsers never send to a
server, so this view cannot see it and must not try.
"""

from __future__ import annotations

from flask import Blueprint, Flask, Response, make_response, render_template

bp = Blueprint("viewer", __name__)


@bp.get("/view")
def view() -> Response:
    resp = make_response(render_template("view.html"))
    # The page itself holds no data; let browsers revalidate so an updated viewer.js
    # reference is picked up, and keep it out of shared caches all the same.
    resp.headers["Cache-Control"] = "no-cache, private"
    return resp


def init_app(app: Flask) -> None:
    app.register_blueprint(bp)
