"""Security headers on every answer: a strict Content-Security-Policy and friends.

The policy allows no inline script or style anywhere, so templates carry neither
``<script>`` bodies nor ``style=`` attributes. ``connect-src *`` is deliberate: the viewer
(``/view``) fetches manifests and files from any SMART Health Links server, not only this one.
A view that needs something else sets its own header first; nothing here overwrites it.
"""

from __future__ import annotations

from flask import Flask, Response, request

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data: blob:",
        # The viewer reads SHL manifests and files hosted by any server.
        "connect-src *",
        # The QR scanner shows the camera stream; PDFs from records open as blob: URLs.
        "media-src 'self' blob:",
        "object-src 'none'",
        "base-uri 'none'",
        "frame-ancestors 'none'",
        "form-action 'self'",
    )
)

HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    # The viewer's URL carries the link key in its fragment; browsers never send fragments
    # as Referer, but no page here has a reason to send any Referer at all.
    "Referrer-Policy": "no-referrer",
    "Permissions-Policy": "camera=(self), microphone=(), geolocation=(), payment=(), usb=()",
    "X-Frame-Options": "DENY",
    "Cross-Origin-Opener-Policy": "same-origin",
}

HSTS = "max-age=31536000; includeSubDomains"


def add_security_headers(resp: Response) -> Response:
    for name, value in HEADERS.items():
        resp.headers.setdefault(name, value)
    # Only over HTTPS (directly or behind a proxy that gunicorn trusts): over plain HTTP
    # the header is meaningless, and on a dev box it would pin localhost to HTTPS.
    if request.is_secure:
        resp.headers.setdefault("Strict-Transport-Security", HSTS)
    return resp


def init_app(app: Flask) -> None:
    app.after_request(add_security_headers)
