"""QR codes: the PNG and SVG decode (with zxing-cpp) to exactly the link, at level M."""

from __future__ import annotations

import io
import re
import xml.etree.ElementTree as ET

import pytest
import zxingcpp
from PIL import Image, ImageDraw

from shlhost import qr
from shlhost.shl.payload import Payload, decode, encode

SVG_NS = "{http://www.w3.org/2000/svg}"
KEY = "rxTgYlOaKJPFtcEd0qcceN8wEU4p94SqAwIWQe6uX7Q"
LABEL_80 = ("Ada Example: medication list and allergies for the cardiology referral "
            "appointment")[:80]


def shlink(public: str, *, label: str | None = None, exp: int | None = None, flag: str = "",
           viewer: bool = False) -> str:
    """A link shaped like shlhost's own: url PUBLIC_URL/shl/<43>, viewer PUBLIC_URL/view."""
    payload = Payload(url=f"{public}/shl/" + "k" * 43, key=KEY, exp=exp, flag=flag, label=label)
    return encode(payload, f"{public}/view" if viewer else None)


SHORT = shlink("https://shl.example.org")
# A long deployment host, the longest label, an expiry and both flags, behind the viewer.
WORST = shlink("https://records.cardiology.hospital.example.org", label=LABEL_80, exp=4102444800,
               flag="LP", viewer=True)


def decode_image(image: Image.Image) -> list[zxingcpp.Barcode]:
    return list(zxingcpp.read_barcodes(image, formats=zxingcpp.BarcodeFormat.QRCode))


def assert_single_qr(results: list[zxingcpp.Barcode], text: str) -> None:
    assert len(results) == 1
    result = results[0]
    assert result.valid
    assert result.format == zxingcpp.BarcodeFormat.QRCode
    assert result.text == text
    assert result.ec_level == "M"


def test_worst_case_fixture_is_really_long() -> None:
    assert len(LABEL_80) == 80
    assert len(WORST) > 420
    assert WORST.startswith("https://records.cardiology.hospital.example.org/view#shlink:/")


# --- PNG ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [SHORT, shlink("http://127.0.0.1:5000", viewer=True), WORST],
                         ids=["short", "viewer", "worst"])
def test_png_decodes_to_the_exact_link_at_level_m(text: str) -> None:
    data = qr.png(text)
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    image = Image.open(io.BytesIO(data))
    assert_single_qr(decode_image(image), text)


@pytest.mark.parametrize("text", ["shlink:/", "shlink:/" + "A" * 22, SHORT])
def test_not_boosted_above_m(text: str) -> None:
    code = qr.make(text)
    assert code.error == "M"
    assert code.designator.endswith("-M")
    assert not code.is_micro
    assert_single_qr(decode_image(Image.open(io.BytesIO(qr.png(text)))), text)


def test_boost_would_have_changed_these_short_texts() -> None:
    """segno boosts by default: the texts above really exercise boost_error=False."""
    import segno

    assert segno.make("shlink:/", error="m", micro=False).error in ("Q", "H")
    assert segno.make("shlink:/" + "A" * 22, error="m", micro=False).error in ("Q", "H")


def test_worst_case_fits_version_16() -> None:
    code = qr.make(WORST)
    assert code.error == "M"
    assert isinstance(code.version, int)
    assert code.version <= 16


def test_png_scale_and_border() -> None:
    code = qr.make(SHORT)
    image = Image.open(io.BytesIO(qr.png(SHORT, scale=5, border=2)))
    side = (code.symbol_size(scale=1, border=0)[0] + 4) * 5
    assert image.size == (side, side)


# --- SVG: an independent rasteriser for the paths segno writes ---------------------------------

_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_TOKEN = re.compile(rf"[MmHhVvZz]|{_NUMBER}")


def _transform(text: str | None) -> tuple[float, float, float, float]:
    """(sx, sy, tx, ty) for a transform made of scale() and translate() only."""
    sx = sy = 1.0
    tx = ty = 0.0
    if not text:
        return sx, sy, tx, ty
    for name, args in re.findall(r"(\w+)\(([^)]*)\)", text):
        values = [float(v) for v in re.findall(_NUMBER, args)]
        if name == "scale":
            fx, fy = values[0], values[1] if len(values) > 1 else values[0]
            sx, sy, tx, ty = sx * fx, sy * fy, tx, ty
        elif name == "translate":
            dx, dy = values[0], values[1] if len(values) > 1 else 0.0
            tx, ty = tx + sx * dx, ty + sy * dy
        else:
            raise AssertionError(f"unexpected SVG transform {name}")
    return sx, sy, tx, ty


def rasterise_svg(svg: bytes) -> Image.Image:
    """Render segno's SVG: stroked paths of horizontal/vertical lines (M m H h V v Z z)."""
    root = ET.fromstring(svg)  # noqa: S314 - our own output
    assert root.tag == f"{SVG_NS}svg"
    width, height = round(float(root.attrib["width"])), round(float(root.attrib["height"]))
    image = Image.new("L", (width, height), 255)
    draw = ImageDraw.Draw(image)
    paths = list(root.iter(f"{SVG_NS}path"))
    assert paths, "segno draws the dark modules as a path"
    for path in paths:
        assert path.get("fill", "none") == "none" or path.get("stroke")
        assert path.get("stroke", "#000") in ("#000", "#000000", "black")
        sx, sy, tx, ty = _transform(path.get("transform"))
        half = float(path.get("stroke-width", "1")) / 2

        def fill(x0: float, y0: float, x1: float, y1: float,
                 sx: float = sx, sy: float = sy, tx: float = tx, ty: float = ty) -> None:
            left, right = sorted((tx + sx * x0, tx + sx * x1))
            top, bottom = sorted((ty + sy * y0, ty + sy * y1))
            if round(right) > round(left) and round(bottom) > round(top):
                draw.rectangle([round(left), round(top), round(right) - 1, round(bottom) - 1], fill=0)

        tokens = _TOKEN.findall(path.attrib["d"])
        x = y = start_x = start_y = 0.0
        i, command = 0, ""
        while i < len(tokens):
            if tokens[i].isalpha():
                command = tokens[i]
                i += 1
                if command in "Zz":
                    if x != start_x:
                        fill(x, start_y - half, start_x, start_y + half)
                    elif y != start_y:
                        fill(start_x - half, y, start_x + half, start_y)
                    x, y = start_x, start_y
                    continue
            assert command, "a path starts with a command"
            if command in "Mm":
                dx, dy = float(tokens[i]), float(tokens[i + 1])
                i += 2
                x, y = (dx, dy) if command == "M" else (x + dx, y + dy)
                start_x, start_y = x, y
                command = "L" if command == "M" else "l"  # SVG: later pairs are line-tos
            elif command in "Hh":
                value = float(tokens[i])
                i += 1
                new_x = value if command == "H" else x + value
                fill(x, y - half, new_x, y + half)
                x = new_x
            elif command in "Vv":
                value = float(tokens[i])
                i += 1
                new_y = value if command == "V" else y + value
                fill(x - half, y, x + half, new_y)
                y = new_y
            else:
                raise AssertionError(f"unexpected path command {command!r} (segno draws only h/v lines)")
    return image


def module_grid(image: Image.Image, scale: int, border: int, size: int) -> list[list[bool]]:
    """Dark/light at the centre of each module."""
    return [
        [image.getpixel((int((border + c + 0.5) * scale), int((border + r + 0.5) * scale))) < 128
         for c in range(size)]
        for r in range(size)
    ]


def test_svg_shape_as_segno_writes_it() -> None:
    """The rasteriser below relies on this shape: fail loudly if segno changes it."""
    svg = qr.svg(SHORT).decode()
    assert svg.startswith("<svg")  # no XML declaration
    root = ET.fromstring(svg)  # noqa: S314 - our own output
    assert root.attrib["class"] == "shl-qr"
    (path,) = root.iter(f"{SVG_NS}path")
    assert path.attrib["transform"] == "scale(8)"
    assert set(re.sub(_NUMBER, "", path.attrib["d"]).replace(" ", "")) <= set("MmHhVvZz")


def test_svg_title() -> None:
    root = ET.fromstring(qr.svg(SHORT, title="SMART Health Link"))  # noqa: S314 - our own output
    title = root.find(f"{SVG_NS}title")
    assert title is not None and title.text == "SMART Health Link"


@pytest.mark.parametrize("text", [SHORT, WORST], ids=["short", "worst"])
@pytest.mark.parametrize(("scale", "border"), [(8, 4), (3, 2), (1, 4), (5, 0)])
def test_svg_modules_match_the_qr_matrix(text: str, scale: int, border: int) -> None:
    code = qr.make(text)
    size = code.symbol_size(scale=1, border=0)[0]
    image = rasterise_svg(qr.svg(text, scale=scale, border=border))
    assert image.size == ((size + 2 * border) * scale,) * 2
    expected = [[bool(cell) for cell in row] for row in code.matrix]
    assert module_grid(image, scale, border, size) == expected
    if border:
        # The quiet zone is light.
        assert image.getpixel((0, 0)) == 255
        assert image.getpixel((image.width - 1, image.height - 1)) == 255


@pytest.mark.parametrize("text", [SHORT, shlink("http://127.0.0.1:5000", viewer=True), WORST],
                         ids=["short", "viewer", "worst"])
def test_svg_decodes_to_the_exact_link_at_level_m(text: str) -> None:
    image = rasterise_svg(qr.svg(text, title="SMART Health Link"))
    assert_single_qr(decode_image(image), text)


def test_rasteriser_is_not_trivially_permissive() -> None:
    """A corrupted path must stop decoding or change the matrix: the check can fail."""
    svg = qr.svg(SHORT).decode()
    broken = re.sub(r'd="M(\d+) ', lambda m: f'd="M{int(m.group(1)) + 3} ', svg, count=1)
    assert broken != svg
    image = rasterise_svg(broken.encode())
    code = qr.make(SHORT)
    size = code.symbol_size(scale=1, border=0)[0]
    assert module_grid(image, 8, 4, size) != [[bool(c) for c in row] for row in code.matrix]


def test_worst_case_bare_link_fits_version_16() -> None:
    """The spec's worst case: a 128-character url, 80-character label, exp and LP.

    (A viewer-prefixed link adds the viewer URL's length and may need a larger version.)
    """
    public = "https://" + "a" * (128 - 48 - 8)
    text = shlink(public, label="W" * 80, exp=4102444800, flag="LP", viewer=False)
    assert len(decode(text).url) == 128
    assert qr.make(text).version <= 16
