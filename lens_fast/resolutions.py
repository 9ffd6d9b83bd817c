"""Image sizes: Lens's official resolution buckets and the training buckets derived from them.

A leaf module (of lens_fast it imports only the error classes): the pipeline resolves
``base_resolution`` / ``aspect_ratio`` here, the engine pre-warms these sizes and the
trainer scales them into its aspect-ratio buckets, so all three agree by construction.
Ratios are written W:H.
"""
from __future__ import annotations

import math
from typing import Dict, Tuple, Union

from .errors import InvalidValue

RATIOS = ("1:2", "9:16", "2:3", "3:4", "1:1", "4:3", "3:2", "16:9", "2:1")
# Official resolution buckets: base -> aspect ratio -> (height, width).
RESOLUTION_BUCKETS: Dict[int, Dict[str, Tuple[int, int]]] = {
    1024: dict(zip(RATIOS, [(1472, 736), (1376, 768), (1248, 832), (1152, 864), (1024, 1024),
                            (864, 1152), (832, 1248), (768, 1376), (736, 1472)])),
    1440: dict(zip(RATIOS, [(2080, 1040), (1936, 1088), (1760, 1168), (1616, 1216), (1440, 1440),
                            (1216, 1616), (1168, 1760), (1088, 1936), (1040, 2080)])),
}


def resolve_resolution(base_resolution: int, aspect_ratio: str) -> Tuple[int, int]:
    """(height, width) of an official bucket."""
    if base_resolution not in RESOLUTION_BUCKETS:
        raise InvalidValue(f"base_resolution={base_resolution!r} is not a bucket; expected one of "
                         f"{sorted(RESOLUTION_BUCKETS)}")
    table = RESOLUTION_BUCKETS[base_resolution]
    if aspect_ratio not in table:
        raise InvalidValue(f"aspect_ratio={aspect_ratio!r} is not a bucket; expected one of {list(table)}")
    return table[aspect_ratio]


def official_resolutions(which: Union[str, int] = "official") -> Tuple[Tuple[int, int], ...]:
    """(height, width) of the official buckets: 'official' (all 18), 1024 or 1440."""
    if which in ("official", "all"):
        bases = sorted(RESOLUTION_BUCKETS)
    elif str(which).isdigit() and int(which) in RESOLUTION_BUCKETS:
        bases = [int(which)]
    else:
        raise InvalidValue(f"prewarm={which!r}: expected 'official', one of {sorted(RESOLUTION_BUCKETS)} "
                         "or a list of (height, width)")
    return tuple(hw for base in bases for hw in RESOLUTION_BUCKETS[base].values())


def parse_ratio(ratio: str) -> float:
    """'W:H' -> W / H."""
    try:
        w, h = (float(x) for x in str(ratio).split(":"))
    except ValueError:
        raise InvalidValue(f"ratio {ratio!r}: expected W:H such as 16:9") from None
    if w <= 0 or h <= 0:
        raise InvalidValue(f"ratio {ratio!r}: both sides must be positive")
    return w / h


def bucket_size(area: int, ratio: str, multiple: int = 16) -> Tuple[int, int]:
    """(height, width) of the training bucket for a base side and a W:H ratio: for the nine
    official ratios the official 1024 bucket scaled to the base side, so training sees the
    shapes users sample at; any other ratio r gets H = base / sqrt(r), W = base * sqrt(r).
    Sides are rounded to ``multiple``."""
    def snap(x):
        return max(multiple, int(round(x / multiple)) * multiple)

    official = RESOLUTION_BUCKETS[1024].get(ratio)
    if official is not None:
        return snap(official[0] * area / 1024), snap(official[1] * area / 1024)
    r = parse_ratio(ratio)
    return snap(area / math.sqrt(r)), snap(area * math.sqrt(r))
