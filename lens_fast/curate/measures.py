"""The deterministic measures of stages 2, 6, 7 and 8 (area, clarity, entropy, luminance).

Each is a plain function of an RGB uint8 array ([H, W, 3]), written so that a test can
compute the expected value by hand:

- ``gray``: ITU-R BT.601 luma, 0.299 R + 0.587 G + 0.114 B, in float64 on the 0..255 scale
  (what PIL's ``convert("L")`` computes before rounding);
- ``clarity``: the population variance of the 4-neighbour Laplacian
  ``g[y-1,x] + g[y+1,x] + g[y,x-1] + g[y,x+1] - 4 g[y,x]`` over the interior pixels of the
  gray image, after scaling the image so its short side is ``side`` pixels (bilinear, on
  the float gray image), so the number means the same for a thumbnail and a 4K photo;
- ``entropy``: the Shannon entropy in bits of the 256-bin histogram of the gray image
  rounded to integers (0 for a flat image, 8 at most);
- ``luminance``: the mean of V = max(R, G, B) / 255 of HSV, in [0, 1].
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from ..errors import InvalidValue

LUMA = (0.299, 0.587, 0.114)


def gray(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise InvalidValue(f"expected an RGB array [H, W, 3], got shape {rgb.shape}")
    return rgb[..., 0] * LUMA[0] + rgb[..., 1] * LUMA[1] + rgb[..., 2] * LUMA[2]


def scale_to_side(g: np.ndarray, side: Optional[int]) -> np.ndarray:
    """The float gray image resized (bilinear) so that its short side is ``side``; None or
    0 keeps it as it is."""
    if not side:
        return g
    h, w = g.shape
    if min(h, w) == side:
        return g
    s = side / min(h, w)
    size = (max(1, round(w * s)), max(1, round(h * s)))
    return np.asarray(Image.fromarray(g.astype(np.float32), mode="F").resize(size, Image.BILINEAR),
                      dtype=np.float64)


def laplacian_variance(g: np.ndarray) -> float:
    if g.shape[0] < 3 or g.shape[1] < 3:
        return 0.0
    lap = g[:-2, 1:-1] + g[2:, 1:-1] + g[1:-1, :-2] + g[1:-1, 2:] - 4.0 * g[1:-1, 1:-1]
    return float(lap.var())


def clarity(rgb: np.ndarray, side: Optional[int] = 512) -> float:
    return clarity_of_gray(gray(rgb), side)


def clarity_of_gray(g: np.ndarray, side: Optional[int] = 512) -> float:
    return laplacian_variance(scale_to_side(g, side))


def entropy(rgb: np.ndarray) -> float:
    return entropy_of_gray(gray(rgb))


def entropy_of_gray(g: np.ndarray) -> float:
    levels = np.clip(np.rint(g), 0, 255).astype(np.uint8)
    counts = np.bincount(levels.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0: no -0.0 for a flat image


def luminance(rgb: np.ndarray) -> float:
    a = np.asarray(rgb)
    v = np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])  # 10x faster than max(axis=2) on uint8
    return float(v.sum(dtype=np.float64) / v.size / 255.0)


def area(width: int, height: int) -> float:
    return float(width) * float(height)
