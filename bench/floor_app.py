"""The transport floor for bench/upload.py: a bare WSGI app under the same gunicorn that only
moves bytes. ``POST /`` copies the request body to a temporary file (as werkzeug spools an
upload) and answers its length; ``GET /`` sends the file named by ``FLOOR_FILE`` through the
server's file wrapper (as shlhost serves a blob). No parsing, no encryption, no database."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from typing import Any


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    if environ["REQUEST_METHOD"] == "POST":
        stream = environ["wsgi.input"]
        total = 0
        with tempfile.TemporaryFile() as spool:
            while chunk := stream.read(1 << 16):
                spool.write(chunk)
                total += len(chunk)
        body = str(total).encode()
        start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
        return [body]
    path = os.environ["FLOOR_FILE"]
    fh = open(path, "rb")  # noqa: SIM115 - the server's file wrapper closes it
    start_response("200 OK", [("Content-Type", "application/octet-stream"),
                              ("Content-Length", str(os.path.getsize(path)))])
    wrapper: Iterable[bytes] = environ["wsgi.file_wrapper"](fh, 1 << 16)
    return wrapper
