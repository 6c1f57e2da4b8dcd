"""QR codes for links: PNG and SVG at error-correction level M, never boosted above M."""

from __future__ import annotations

import io

import segno


def make(data: str) -> segno.QRCode:
    return segno.make(data, error="m", boost_error=False, micro=False)


def png(data: str, *, scale: int = 8, border: int = 4) -> bytes:
    buf = io.BytesIO()
    make(data).save(buf, kind="png", scale=scale, border=border)
    return buf.getvalue()


def svg(data: str, *, scale: int = 8, border: int = 4, title: str | None = None) -> bytes:
    buf = io.BytesIO()
    make(data).save(
        buf,
        kind="svg",
        scale=scale,
        border=border,
        xmldecl=False,
        title=title,
        svgclass="shl-qr",
        nl=False,
    )
    return buf.getvalue()
