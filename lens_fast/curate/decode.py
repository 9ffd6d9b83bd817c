"""Stage 1: open an image file safely, or say why it cannot be used.

Everything is judged from the header before any pixel is decoded: an empty file, bytes
that no decoder recognises, a header claiming more than ``max_pixels`` (a decompression
bomb: a few kilobytes that would inflate to gigabytes) or an aspect ratio beyond
``max_aspect`` are refused unread. Then the pixels are decoded (a truncated or damaged
file is refused here), the EXIF orientation is applied (width and height are the image as
seen), and every mode becomes 8-bit RGB: CMYK through PIL's conversion, 16-bit and 32-bit
grayscale scaled (not clipped) to 8 bits, alpha and palette transparency composited on
``background``.
"""
from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

_ORIENTATION = 0x0112
_HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")


class BadImage(ValueError):
    """A file stage 1 refuses; ``reason`` is a short label (counted in the report)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass
class Decoded:
    image: Image.Image  # RGB, 8 bits, orientation applied
    width: int
    height: int
    format: Optional[str]
    mode: str  # the file's own mode
    rotated: bool  # an EXIF orientation was applied


def probe(data: bytes, max_pixels: int, max_aspect: float) -> Tuple[Image.Image, int, int, int]:
    """The opened (not decoded) image, its displayed (width, height) and its EXIF
    orientation (1: as stored), or ``BadImage``."""
    if not data:
        raise BadImage("empty", "the file has zero bytes")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        if isinstance(e, UnidentifiedImageError):
            raise BadImage("not_an_image", f"no decoder recognises these {len(data)} bytes") from None
        raise BadImage("bomb", str(e)) from None
    except Exception as e:  # noqa: BLE001 - a damaged header
        raise BadImage("corrupt", f"{type(e).__name__}: {e}") from None
    w, h = im.size
    if w <= 0 or h <= 0:
        raise BadImage("corrupt", f"the header gives a size of {w}x{h}")
    if w * h > max_pixels:
        raise BadImage("bomb", f"{w}x{h} = {w * h} pixels, over the limit of {max_pixels} (decompression bomb)")
    if max(w, h) / min(w, h) > max_aspect:
        raise BadImage("aspect", f"{w}x{h} has an aspect ratio of {max(w, h) / min(w, h):.1f}:1, over {max_aspect:g}:1")
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - unreadable EXIF: no orientation
        orientation = 1
    if orientation not in range(1, 9):
        orientation = 1
    if orientation in (5, 6, 7, 8):
        w, h = h, w
    return im, w, h, orientation


def _to_rgb(im: Image.Image, background: Sequence[int]) -> Image.Image:
    if im.mode in _HIGH_BIT_MODES:
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if (im.mode.startswith("I;16") or arr.max(initial=0) > 255) else 255.0
        if im.mode == "F" and arr.max(initial=0) <= 1.0:
            top = 1.0
        im = Image.fromarray(np.clip(np.rint(arr * (255.0 / top)), 0, 255).astype(np.uint8), "L")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, tuple(int(v) for v in background))
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im if im.mode == "RGB" else im.convert("RGB")


def decode(data: bytes, max_pixels: int = 89_478_485, max_aspect: float = 4.0,
           background: Sequence[int] = (255, 255, 255), draft_side: Optional[int] = None) -> Decoded:
    """The image as seen (orientation applied, RGB), or ``BadImage``. ``draft_side``: a JPEG
    may be decoded at a reduced scale (1/2 .. 1/8) whose short side stays >= this."""
    im, w, h, orientation = probe(data, max_pixels, max_aspect)
    fmt, mode = im.format, im.mode
    try:
        if draft_side and fmt == "JPEG" and min(im.size) > 2 * draft_side:
            scale = min(im.size) / draft_side
            im.draft("RGB", (int(im.size[0] / scale), int(im.size[1] / scale)))
        im.load()
        rgb = _to_rgb(ImageOps.exif_transpose(im) if orientation != 1 else im, background)
    except Exception as e:  # noqa: BLE001 - truncated or damaged pixel data
        raise BadImage("corrupt", f"{fmt or 'image'} {w}x{h} does not decode ({type(e).__name__}: {e})") from None
    return Decoded(rgb, w, h, fmt, mode, orientation != 1)


def encode(image: Image.Image, fmt: str, quality: int = 95) -> bytes:
    """RGB image -> file bytes (jpg, png or webp)."""
    buf = io.BytesIO()
    if fmt == "jpg":
        image.save(buf, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2)
    elif fmt == "webp":
        image.save(buf, "WEBP", quality=quality)
    else:
        image.save(buf, "PNG")
    return buf.getvalue()
