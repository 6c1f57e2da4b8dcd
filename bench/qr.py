"""QR rendering time per link: PNG and SVG, bare ``shlink:/`` and viewer-prefixed.

    .venv/bin/python bench/qr.py [--links 200] [--json]

Real links (a fresh 43-character id, a fresh key, an expiry, flags and a label, encoded by
shlhost.shl.payload exactly as the API does) are drawn with shlhost.qr, the code behind
``/api/links/<id>/qr.png`` and ``qr.svg``. Beside each: the floor, segno's QR encoding of the
same text alone (the matrix, no image), so the ratio says what drawing the image costs.
Times are per link: the median over ``--links`` links, after a warm-up. Every tenth image is
decoded back (zxing-cpp) to check it carries the exact link.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import statistics
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shlhost import qr  # noqa: E402 - after the path is set
from shlhost.crypto.b64 import b64url_encode  # noqa: E402
from shlhost.shl import payload  # noqa: E402

VIEWER = "https://shl.example.org/view"


def link() -> str:
    data = payload.Payload(
        url=f"https://shl.example.org/shl/{secrets.token_urlsafe(32)}",
        key=b64url_encode(os.urandom(32)),
        exp=int(time.time()) + 30 * 86400,
        flag="LP",
        label="Ada's summary for Dr Rivera",
    )
    return payload.encode(data, None)


def per_link(fn: Callable[[str], Any], texts: list[str]) -> float:
    for text in texts[:5]:
        fn(text)  # warm-up
    samples = []
    for text in texts:
        start = time.perf_counter()
        fn(text)
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def check(texts: list[str]) -> None:
    import zxingcpp
    from PIL import Image

    for text in texts[::10]:
        import io

        image = Image.open(io.BytesIO(qr.png(text)))
        # QR only: scanning every format can find spurious 1D barcodes in the modules.
        found = [r.text for r in zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode)]
        if found != [text]:
            raise SystemExit(f"a PNG did not decode back to its link: {found!r}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--links", type=int, default=200)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    bare = [link() for _ in range(args.links)]
    viewer = [f"{VIEWER}#{text}" for text in bare]
    rows = []
    for name, texts in (("bare shlink:/", bare), ("viewer-prefixed", viewer)):
        floor = per_link(lambda t: qr.make(t).matrix, texts)
        row = {"link": name, "chars": len(texts[0]), "version": qr.make(texts[0]).version,
               "encode_ms": floor * 1000}
        for kind, fn in (("png", qr.png), ("svg", qr.svg)):
            row[f"{kind}_ms"] = per_link(fn, texts) * 1000
            row[f"{kind}_bytes"] = len(fn(texts[0]))
        rows.append(row)
        check(texts)
    if args.json:
        print(json.dumps(rows, indent=2))
    print(f"bench/qr.py, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_version()}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.2f}, median of {args.links} links each")
    print("| link | chars | QR version | encode only ms | PNG ms | PNG / encode | PNG bytes "
          "| SVG ms | SVG / encode | SVG bytes |")
    print("|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['link']} | {r['chars']} | {r['version']} | {r['encode_ms']:.2f} | {r['png_ms']:.2f} "
              f"| {r['png_ms'] / r['encode_ms']:.1f} | {r['png_bytes']} | {r['svg_ms']:.2f} "
              f"| {r['svg_ms'] / r['encode_ms']:.1f} | {r['svg_bytes']} |")
    print("every tenth PNG decoded back (zxing-cpp) to its exact link")
    return 0


if __name__ == "__main__":
    sys.exit(main())
