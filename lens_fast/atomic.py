"""Atomic file writes: the bytes go to a temporary file beside the target (same folder,
so the same file system), are flushed to disk, and ``os.replace`` puts the finished
file in place. A reader sees the old file or the new one, never half of one; a process
killed mid-write leaves at most a ``.tmp-*`` file, never a truncated target. The file
gets the permissions ``open`` would give it (0666 less the umask). Write
errors (disk full, permissions, the folder removed underneath) raise ``StorageError``
naming the target."""
from __future__ import annotations

import json
import os
import tempfile
from typing import IO, Any, Callable, Optional

from .errors import InvalidValue, storage_error

TMP_PREFIX = ".tmp-"


def _read_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _read_umask()  # read once, at import: os.umask is process-wide, so not read while threads write


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> str:
    """Call ``write(f)`` on a binary temporary file, then move it to ``path``."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=TMP_PREFIX + os.path.basename(path) + ".", dir=folder)
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), 0o666 & ~_UMASK)  # as open() would create it (mkstemp makes 0600)
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise storage_error(f"cannot write {path}", e) from e
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass
    return path


def write_bytes(path: str, data: bytes) -> str:
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str, text: str) -> str:
    return write_bytes(path, text.encode("utf-8"))


def write_json(path: str, obj: Any, indent: int = 1) -> str:
    return write_text(path, json.dumps(obj, indent=indent, default=str) + "\n")


def image_format(path: str) -> str:
    """PIL's format name for the file extension of ``path`` (.png -> PNG)."""
    from PIL import Image

    fmt = Image.registered_extensions().get(os.path.splitext(path)[1].lower())
    if fmt is None:
        raise InvalidValue(f"cannot tell the image format of {path}; expected an extension such as .png")
    return fmt


def save_image(image, path: str, fmt: Optional[str] = None) -> str:
    """Save a PIL image atomically; the format comes from the file extension unless given."""
    fmt = fmt or image_format(path)
    return atomic_write(path, lambda f: image.save(f, format=fmt))
