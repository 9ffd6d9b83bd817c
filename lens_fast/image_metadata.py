"""What was generated, written into the image file itself, so that anyone holding the file
can see and reproduce it.

PNG: one text chunk per field (``prompt``, ``rewritten_prompt``, ``negative_prompt``,
``seed``, ``settings`` as JSON, ...; international text chunks, so any language survives)
plus ``lens_fast``, all fields as one JSON object. JPEG and WebP have no text chunks: the
same JSON object goes into the EXIF ImageDescription tag (ASCII, non-ASCII escaped).
``read_image_metadata`` reads either back as a dict. The file is written next to its
destination and renamed into place, so a crash never leaves half an image.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict

_EXIF_DESCRIPTION = 0x010E
JSON_KEY = "lens_fast"


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def save_image(image, path: str, metadata: Dict[str, Any]) -> None:
    """Saves a PIL ``image`` to ``path`` (.png, .jpg/.jpeg, .webp) atomically
    (``lens_fast.atomic``) with ``metadata`` (JSON-serialisable values; None values are left out)."""
    from PIL import Image, PngImagePlugin

    from .atomic import atomic_write
    from .errors import InvalidValue

    fields = {k: v for k, v in metadata.items() if v is not None}
    ext = os.path.splitext(path)[1].lower()
    if ext == ".png":
        fmt, extra = "PNG", {"pnginfo": PngImagePlugin.PngInfo()}
        for key, value in fields.items():
            extra["pnginfo"].add_itxt(key, _text(value))
        extra["pnginfo"].add_itxt(JSON_KEY, json.dumps(fields, sort_keys=True))
    elif ext in (".jpg", ".jpeg", ".webp"):
        exif = Image.Exif()
        exif[_EXIF_DESCRIPTION] = json.dumps({JSON_KEY: fields}, sort_keys=True, ensure_ascii=True)
        fmt, extra = ("WEBP" if ext == ".webp" else "JPEG"), {"exif": exif}
    else:
        raise InvalidValue(f"{path}: cannot record metadata in a {ext or 'extension-less'} file; expected .png, "
                           ".jpg, .jpeg or .webp")
    atomic_write(path, lambda f: image.save(f, format=fmt, **extra))


def read_image_metadata(path: str) -> Dict[str, Any]:
    """The metadata ``save_image`` wrote into ``path`` ({} when there is none)."""
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", None) or {}
        if JSON_KEY in text:
            return json.loads(text[JSON_KEY])
        description = im.getexif().get(_EXIF_DESCRIPTION)
    if isinstance(description, bytes):
        description = description.decode("ascii", "replace")
    try:
        payload = json.loads(description) if description else {}
    except json.JSONDecodeError:
        return {}
    return payload.get(JSON_KEY, {}) if isinstance(payload, dict) else {}
