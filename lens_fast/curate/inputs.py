"""Inputs: folders of images, WebDataset tars, or parquet / JSONL lists of local files,
split into units of work.

A tar is one unit. A folder (searched recursively, files with an image extension, sorted)
or a list is split into units of ``unit_size`` images. Every image gets an id that says
where it is (the file's absolute path, or ``TAR#KEY``), and may bring a caption: a
``.txt`` or ``.json`` ("caption") beside a file or in its tar sample, a ``caption``
column in a list. The listing of every input is fixed when a run starts (``scan``) and
saved with it, so a resumed run works on exactly the same units.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
from typing import Dict, Iterator, List, Optional, Tuple

from lens_fast.train.webdata import read_samples

from ..errors import InvalidValue, MissingDependency, MissingFile

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
TAR_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff")
LIST_PATH_COLUMNS = ("path", "file", "image", "image_path")


class Item(dict):
    """One input image: id, unit, source, key, offset (tar), caption_in."""


def _list_rows(path: str) -> List[dict]:
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise MissingDependency("reading a parquet list needs pyarrow: pip install -e '.[curate]'") from None
        rows = pq.read_table(path).to_pylist()
    else:
        rows = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise InvalidValue(f"{path} line {n} is not JSON ({e}); expected one object per line") from None
    column = next((c for c in LIST_PATH_COLUMNS if rows and c in rows[0]), None)
    if rows and column is None:
        raise InvalidValue(f"{path}: no path column; expected one of {list(LIST_PATH_COLUMNS)} "
                         f"(the first row has {sorted(rows[0])})")
    base = os.path.dirname(os.path.abspath(path))
    out = []
    for n, row in enumerate(rows):
        p = row.get(column)
        if not isinstance(p, str) or not p:
            raise InvalidValue(f"{path} row {n}: {column}={p!r}; expected a local file path")
        if "://" in p:
            raise InvalidValue(f"{path} row {n}: {p!r} is a URL; expected local files (download them first, "
                             "e.g. with img2dataset)")
        caption = row.get("caption")
        out.append({"path": os.path.normpath(os.path.join(base, p)),
                    "caption": caption if isinstance(caption, str) else None})
    return out


def _folder_rows(folder: str) -> Tuple[List[dict], int]:
    rows, ignored = [], 0
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            if name.lower().endswith(IMAGE_EXTENSIONS):
                rows.append({"path": os.path.abspath(os.path.join(dirpath, name)), "caption": None})
            elif not name.lower().endswith((".txt", ".json")):
                ignored += 1
    rows.sort(key=lambda r: r["path"])
    return rows, ignored


def expand_inputs(specs: List[str]) -> List[str]:
    """Paths and globs -> existing input paths (folders, .tar, .parquet, .jsonl)."""
    if not specs:
        raise InvalidValue("no input given: expected folders of images, WebDataset .tar files, or a .parquet/.jsonl list")
    out = []
    for spec in specs:
        hits = sorted(glob.glob(spec)) if any(c in spec for c in "*?[") else [spec]
        if not hits or not all(os.path.exists(h) for h in hits):
            raise MissingFile(f"input {spec!r} does not exist")
        for h in hits:
            if not (os.path.isdir(h) or h.endswith((".tar", ".parquet", ".jsonl"))):
                raise InvalidValue(f"input {h!r}: expected a folder, a .tar, a .parquet or a .jsonl file")
            out.append(os.path.abspath(h))
    return sorted(dict.fromkeys(out))


def scan(specs: List[str], unit_size: int, listing_dir: str) -> Tuple[List[dict], dict]:
    """The units of work of these inputs, and a summary (counts, ignored files). Listings of
    folders and lists are written to ``listing_dir`` (one JSON per input)."""
    units, summary = [], {"inputs": [], "ignored_files": 0}
    os.makedirs(listing_dir, exist_ok=True)
    for path in expand_inputs(specs):
        tag = hashlib.sha1(path.encode()).hexdigest()[:10]
        if path.endswith(".tar"):
            st = os.stat(path)
            units.append({"id": f"tar-{tag}", "kind": "tar", "source": path})
            summary["inputs"].append({"path": path, "kind": "tar", "bytes": st.st_size})
            continue
        if os.path.isdir(path):
            rows, ignored = _folder_rows(path)
            summary["ignored_files"] += ignored
            kind = "folder"
        else:
            rows, kind = _list_rows(path), "list"
        listing = os.path.join(listing_dir, f"{tag}.json")
        with open(listing + ".tmp", "w", encoding="utf-8") as f:
            json.dump(rows, f)
        os.replace(listing + ".tmp", listing)
        digest = hashlib.sha256(json.dumps(rows).encode()).hexdigest()[:16]
        summary["inputs"].append({"path": path, "kind": kind, "images": len(rows), "listing": digest})
        for k, start in enumerate(range(0, len(rows), unit_size)):
            units.append({"id": f"{kind}-{tag}-{k:06d}", "kind": "listing", "source": path, "listing": listing,
                          "start": start, "stop": min(start + unit_size, len(rows))})
    return units, summary


def _read_file(path: str) -> Optional[bytes]:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def _sidecar_caption(path: str) -> Optional[str]:
    stem = os.path.splitext(path)[0]
    data = _read_file(stem + ".txt")
    if data is not None:
        return data.decode("utf-8", "replace").strip() or None
    data = _read_file(stem + ".json")
    if data is not None:
        try:
            caption = json.loads(data).get("caption")
        except (ValueError, AttributeError):
            return None
        return caption if isinstance(caption, str) else None
    return None


def _tar_caption(files: Dict[str, bytes]) -> Optional[str]:
    if "txt" in files:
        return files["txt"].decode("utf-8", "replace").strip() or None
    if "json" in files:
        try:
            caption = json.loads(files["json"]).get("caption")
        except (ValueError, AttributeError):
            return None
        return caption if isinstance(caption, str) else None
    return None


def iter_unit(unit: dict) -> Iterator[Tuple[Item, Optional[bytes], Optional[str]]]:
    """(item, file bytes or None, why the bytes are missing) for every image of a unit."""
    if unit["kind"] == "tar":
        path = unit["source"]
        for key, files, start, _ in read_samples(path, 0):
            if files is None:
                item = Item(id=f"{path}#@{start}", unit=unit["id"], source=path, key=None, offset=start,
                            caption_in=None)
                yield item, None, f"the tar is truncated or corrupt from byte {start} on"
                return
            ext = next((e for e in TAR_IMAGE_KEYS if e in files), None)
            item = Item(id=f"{path}#{key}", unit=unit["id"], source=path, key=key, offset=start,
                        caption_in=_tar_caption(files))
            if ext is None:
                yield item, None, f"the sample has no image member (members: {sorted(files)})"
            else:
                yield item, files[ext], None
        return
    with open(unit["listing"], encoding="utf-8") as f:
        rows = json.load(f)[unit["start"]:unit["stop"]]
    for row in rows:
        path = row["path"]
        caption = row["caption"] if row["caption"] is not None else _sidecar_caption(path)
        item = Item(id=path, unit=unit["id"], source=path, key=None, offset=None, caption_in=caption)
        data = _read_file(path)
        yield item, data, None if data is not None else f"cannot read {path}"


def read_item(item: dict) -> Optional[bytes]:
    """The bytes of one image again (for the shard writer)."""
    if item.get("offset") is None:
        return _read_file(item["source"])
    for _, files, _, _ in read_samples(item["source"], int(item["offset"])):
        if files is None:
            return None
        ext = next((e for e in TAR_IMAGE_KEYS if e in files), None)
        return files[ext] if ext else None
    return None
